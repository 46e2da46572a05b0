"""A sweep's files without Ray: one file per trial, and trials.parquet / curves.parquet streamed from them."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gns_sweep.storage import CURVES_SCHEMA, TRIALS_SCHEMA, SweepDir, read_rows, read_settings
from gns_sweep.storage import sweep_dir as sd
from gns_sweep.storage.tables import parquet_stream

SETTINGS = {"command": "empirical", "task": "t", "seeds": [0, 1]}


def trial(b: int, lr: float, seed: int, status: str = "budget", curve: tuple = ((0, 2.0), (1, 1.5))) -> dict:
    nan = math.nan
    failed = status == "failed"
    return {
        "trial_id": f"b{b}-lr{lr:g}-s{seed}",
        "task": "t",
        "schedule": "fixed",
        "schedule_estimator": None,
        "batch_size": b,
        "lr": lr,
        "optimizer": "sgd",
        "optimizer_settings": '{"name": "sgd"}',
        "seed": seed,
        "status": status,
        "steps": 0 if failed else max((s for s, _ in curve), default=0),
        "steps_to_target": 1 if status == "reached" else None,
        "examples_to_target": b if status == "reached" else None,
        "target_loss": 1.6,
        "initial_eval_loss": nan if failed else curve[0][1],
        "final_eval_loss": nan if failed else curve[-1][1],
        "best_eval_loss": nan if failed else min(x for _, x in curve),
        "budget_examples": 64,
        "wall_seconds": nan if failed else 0.01 * b,
        "cpu_seconds": nan if failed else 0.01,
        "node_id": "n1",
        "device": "cpu",
        "update_ratio_max": nan if failed else 0.1,
        "update_ratios": "{}" if failed else '{"w": 0.1}',
        "error": "ValueError: broken" if failed else None,
        "curve_steps": tuple(s for s, _ in curve),
        "curve_losses": tuple(x for _, x in curve),
        "curve_batch_sizes": tuple(b for _ in curve),
        "curve_examples": tuple(s * b for s, _ in curve),
        "curve_lrs": tuple(lr for _ in curve),
    }


def rows() -> list[dict]:
    """Trials of every kind, in no particular order."""
    return [
        trial(8, 0.2, 1, "reached", ((0, 2.0), (1, 1.2))),
        trial(8, 0.1, 0, curve=tuple((s, 2.0 - 0.1 * s) for s in range(7))),
        trial(2, 0.4, 0, "diverged", ((0, 2.0), (1, 9.0), (2, math.inf))),
        trial(2, 0.1, 1, "failed", ()),
        trial(8, 0.1, 1),
        trial(2, 0.1, 0),
        trial(4, 0.1, 0, curve=((0, 2.0),)),
    ]


def old_tables(trials: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """trials.parquet and curves.parquet as the sweep wrote them before: every row in memory, sorted, whole."""
    trials = sorted(trials, key=lambda r: (r["batch_size"], r["lr"], r["seed"]))
    table = pa.Table.from_pylist([{k: r.get(k) for k in TRIALS_SCHEMA.names} for r in trials], schema=TRIALS_SCHEMA)
    curves = pa.Table.from_pylist([p for r in trials for p in sd.curve_rows(r)], schema=CURVES_SCHEMA)
    return table.to_pandas(), curves.to_pandas()


def in_order(trials: list[dict]) -> list[str]:
    return [r["trial_id"] for r in sorted(trials, key=lambda r: (r["batch_size"], r["lr"], r["seed"]))]


@pytest.fixture
def small_steps(monkeypatch):
    """Consolidate two trials per step and three curve rows per row group: every boundary gets crossed."""
    monkeypatch.setattr(sd, "CONSOLIDATE_TRIALS", 2)
    monkeypatch.setattr(sd, "CURVE_ROW_GROUP", 3)


@pytest.mark.parametrize("known", ["none", "some", "all"])
def test_streamed_tables_equal_the_whole_rewrite_of_before(tmp_path, small_steps, known):
    """From the trial files alone (a resumed sweep), with some rows at hand (its trials run now and
    earlier) or all of them: the same tables as rewriting everything in memory gave."""
    out = SweepDir(tmp_path)
    trials = rows()
    for r in trials[:3]:
        out.write_trial(r, SETTINGS)
    for r in trials[3:]:
        out.write_trial_file(r["trial_id"], sd.encode_trial(r, sd.trial_metadata(SETTINGS)))  # as a worker does
    at_hand = {"none": [], "some": trials[::2], "all": trials}[known]
    table = pa.Table.from_pylist([sd.light_row(r) for r in at_hand], schema=TRIALS_SCHEMA) if at_hand else None

    returned = out.consolidate(in_order(trials), SETTINGS, table)

    want_trials, want_curves = old_tables(trials)
    pd.testing.assert_frame_equal(pd.read_parquet(out.trials), want_trials)
    pd.testing.assert_frame_equal(pd.read_parquet(out.curves), want_curves)
    pd.testing.assert_frame_equal(returned.to_pandas(), want_trials)
    assert pq.ParquetFile(out.curves).num_row_groups > 1  # written a batch at a time
    assert read_settings(out.trials) == read_settings(out.curves) == SETTINGS
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_a_trial_file_from_before_the_error_column_reads_as_null(tmp_path):
    """A resumed sweep whose older trial files (full Arrow schema, no `error` column) sit beside new ones."""
    out = SweepDir(tmp_path)
    old, new = trial(4, 0.1, 0), trial(4, 0.1, 1, "failed", ())
    schema = sd.TRIAL_FILE_SCHEMA.remove(sd.TRIAL_FILE_SCHEMA.get_field_index("error"))
    out.trials_dir.mkdir()
    pq.write_table(pa.Table.from_pylist([old], schema=schema), out.trial(old["trial_id"]))
    out.write_trial(new, SETTINGS)
    table = out.consolidate([old["trial_id"], new["trial_id"]], SETTINGS)
    assert table.column("error").to_pylist() == [None, "ValueError: broken"] and table.schema.equals(TRIALS_SCHEMA)
    assert len(pd.read_parquet(out.curves)) == 2


def test_a_trial_written_again_has_one_file_and_its_latest_row(tmp_path):
    """A failed trial run anew by --resume: its file is replaced, and the newer row is the one kept."""
    out = SweepDir(tmp_path)
    failed, fixed = trial(8, 0.1, 0, "failed", ()), trial(8, 0.1, 0, "reached")
    out.write_trial(failed, SETTINGS)
    out.write_trial(fixed, SETTINGS)
    assert out.finished_trial_ids() == {fixed["trial_id"]}
    assert read_rows(out.trial(fixed["trial_id"]))[0]["status"] == "reached"
    known = pa.Table.from_pylist([sd.light_row(failed), sd.light_row(fixed)], schema=TRIALS_SCHEMA)
    table = out.consolidate([fixed["trial_id"]], SETTINGS, known)
    assert table.column("status").to_pylist() == ["reached"]
    assert len(pd.read_parquet(out.curves)) == 2


def test_a_worker_encoded_file_reads_back_as_its_row(tmp_path):
    out = SweepDir(tmp_path)
    row = trial(2, 0.4, 0, "diverged", ((0, 2.0), (1, 9.0), (2, math.inf)))
    out.write_trial_file(row["trial_id"], sd.encode_trial(row, sd.trial_metadata(SETTINGS)))
    back = read_rows(out.trial(row["trial_id"]))[0]
    curves = {k: tuple(v) for k, v in back.items() if k.startswith("curve_")}
    assert {**back, **curves} == row
    assert read_settings(out.trial(row["trial_id"])) == SETTINGS
    assert out.trial_statuses() == {row["trial_id"]: "diverged"}


def test_what_a_killed_writer_leaves_is_never_a_trial_and_is_cleaned_up(tmp_path):
    out = SweepDir(tmp_path)
    row = trial(8, 0.1, 0)
    out.write_trial(row, SETTINGS)
    leftovers = [
        out.trials_dir / ".b8-lr0.2-s0.parquet.k3j2.tmp",  # a trial file being written when the driver died
        tmp_path / ".curves.parquet.a8x1.tmp",  # the end of a sweep, interrupted for good
        tmp_path / ".trials.parquet.zz01.tmp",
    ]
    for p in leftovers:
        p.write_bytes(b"half a file")
    other = tmp_path / ".predict.parquet.q1.tmp"  # not the sweep's: left alone
    other.write_bytes(b"x")
    assert out.finished_trial_ids() == {row["trial_id"]}
    out.remove_temporaries()
    assert not any(p.exists() for p in leftovers) and other.exists()
    assert out.finished_trial_ids() == {row["trial_id"]}


def test_a_stream_that_fails_leaves_no_file(tmp_path):
    path = tmp_path / "curves.parquet"
    with pytest.raises(RuntimeError), parquet_stream(path, CURVES_SCHEMA, SETTINGS) as writer:
        writer.write_table(CURVES_SCHEMA.empty_table())
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
