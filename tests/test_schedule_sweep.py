"""The GNS batch-size schedule as a kind of trial: a real sweep on a loopback Ray cluster, --resume's check of
the schedule setting, and compare's schedule.parquet against a hand computation from the trial rows."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gns_sweep_cli.main import app
from typer.testing import CliRunner

from gns_sweep.storage import TRIALS_SCHEMA, SweepDir, read_settings
from gns_sweep.storage.sweep_dir import curve_rows

runner = CliRunner()
GRID = (32, 128, 512)


def invoke(*args: str):
    return runner.invoke(app, list(args))


def sweep_args(out, address: str, *extra: str) -> list[str]:
    return [
        "empirical", "--task", "blobs-noisy", "--batch-sizes", ",".join(map(str, GRID)), "--lrs", "0.125,0.5",
        "--seeds", "2", "--budget-examples", "16384", "--out", str(out), "--address", address, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scheduled(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("schedule") / "run"
    pred = invoke(
        "predict", "--task", "blobs-noisy", "--probe-size", "256", "--checkpoints", "2", "--shards", "2",
        "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert pred.exit_code == 0, pred.output
    emp = invoke(*sweep_args(out, ray_address, "--schedule", "gns"))
    assert emp.exit_code == 0, emp.output
    assert "schedule gns-s0:" in emp.output
    return out


@pytest.mark.slow  # a predict and a sweep with schedule trials: ~60 s on 2 busy cores
def test_schedule_trials_record_their_batch_size_trajectory(scheduled):
    trials = pd.read_parquet(scheduled / "trials.parquet")
    gns = trials[trials.schedule == "gns"].set_index("trial_id")
    fixed = trials[trials.schedule == "fixed"]
    assert sorted(gns.index) == ["gns-s0", "gns-s1"] and len(fixed) == len(GRID) * 2 * 2
    assert list(trials.trial_id[-2:]) == ["gns-s0", "gns-s1"]  # after the fixed trials
    curves = pd.read_parquet(scheduled / "curves.parquet")
    for tid, row in gns.iterrows():
        c = curves[curves.trial_id == tid].sort_values("step")
        sizes = c.batch_size.to_numpy()
        assert ((sizes >= GRID[0]) & (sizes <= GRID[-1])).all()
        assert all(b & (b - 1) == 0 for b in sizes)  # powers of two
        assert row.batch_size == sizes[-1]  # the row holds the last step's batch
        # examples grow by at least one batch per step between evaluations, and never pass the budget
        gained, stepped = c.examples.diff().iloc[1:], c.step.diff().iloc[1:]
        assert (gained >= stepped * GRID[0]).all() and (gained <= stepped * GRID[-1]).all()
        assert c.examples.iloc[-1] <= row.budget_examples and c.examples.iloc[0] == 0
        if row.status == "reached":
            assert c.examples[c.step == row.steps_to_target].item() == row.examples_to_target
    # fixed trials: their constant batch and lr at every point
    f = curves[curves.trial_id.isin(fixed.trial_id)].merge(fixed[["trial_id", "batch_size", "lr"]], on="trial_id")
    assert (f.batch_size_x == f.batch_size_y).all() and (f.lr_x == f.lr_y).all()
    assert (f.examples == f.step * f.batch_size_x).all()
    settings = read_settings(scheduled / "plan.parquet")
    assert settings["schedule"] == "gns" and settings["schedule_k"] == 1.0
    assert set(gns.schedule_estimator) == {"per-example"} and fixed.schedule_estimator.isna().all()


@pytest.mark.slow  # a predict and a sweep with schedule trials: ~60 s on 2 busy cores
def test_resume_refuses_another_schedule_setting(scheduled, ray_address):
    for extra in (["--schedule", "none"], ["--schedule", "gns", "--schedule-k", "2"]):
        result = invoke(*sweep_args(scheduled, ray_address, "--resume", *extra))
        assert result.exit_code == 2, result.output
        assert "planned with different schedule" in result.output
    same = invoke(*sweep_args(scheduled, ray_address, "--resume", "--schedule", "gns"))
    assert same.exit_code == 0 and f"{len(GRID) * 4 + 2} already on disk" in same.output, same.output


def test_bad_schedule_is_one_line_exit_2(tmp_path):
    out = tmp_path / "bad"
    for extra, message in (
        (["--schedule", "adaptive"], "--schedule 'adaptive'"),
        (["--schedule-k", "0"], "--schedule-k"),
    ):
        result = invoke(*sweep_args(out, "127.0.0.1:1", *extra))
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow  # a predict and a sweep with schedule trials: ~60 s on 2 busy cores
def test_compare_sets_the_schedule_beside_the_best_fixed_batch(scheduled):
    result = invoke("compare", str(scheduled))
    assert result.exit_code == 0, result.output
    assert "GNS schedule vs the best fixed batch size" in result.output and "schedule.parquet" in result.output
    got = pd.read_parquet(scheduled / "schedule.parquet")
    trials = pd.read_parquet(scheduled / "trials.parquet")
    frontier = pd.read_parquet(scheduled / "frontier.parquet")
    comparison = pd.read_parquet(scheduled / "comparison.parquet")
    assert len(got) == 2 * len(comparison)  # every target judged, each seed
    # schedule trials are not fitted: the frontier holds the grid's batch sizes only
    assert set(frontier.batch_size) == set(GRID)
    # by hand, at the sweep's own target (where every trial stopped, so steps_to_target and wall_seconds are to it)
    own = trials.target_loss.iloc[0]
    best_lr = frontier[(frontier.target_loss == own) & ~frontier.censored].set_index("batch_size").best_lr
    fixed = trials[(trials.schedule == "fixed") & trials.steps_to_target.notna()]
    at_own = got[got.sweep_target].set_index("seed")
    checked = 0  # seeds whose ratios were checked by hand: the settings above give at least one
    for _, s in trials[trials.schedule == "gns"].iterrows():
        row = at_own.loc[s.seed]
        assert row.reached == (s.status == "reached")
        if not row.reached:
            assert math.isnan(row.steps_ratio)
            continue
        assert row.steps == s.steps_to_target and row.examples == s.examples_to_target
        assert row.wall_seconds == pytest.approx(s.wall_seconds)
        mine = fixed[(fixed.seed == s.seed) & (fixed.lr == fixed.batch_size.map(best_lr))]
        within = mine[mine.steps_to_target * mine.batch_size <= s.examples_to_target]
        if within.empty:
            assert pd.isna(row.fixed_batch_size) and math.isnan(row.steps_ratio)
            continue
        best = within.sort_values(["steps_to_target", "batch_size"]).iloc[0]
        assert row.fixed_batch_size == best.batch_size and row.fixed_lr == best.lr
        assert row.steps_ratio == pytest.approx(s.steps_to_target / best.steps_to_target)
        assert row.examples_ratio == pytest.approx(s.examples_to_target / (best.steps_to_target * best.batch_size))
        assert row.examples_ratio >= 1  # the fixed batch uses no more examples
        assert row.wall_ratio == pytest.approx(s.wall_seconds / best.wall_seconds)
        checked += 1
    assert checked >= 1, at_own
    assert (scheduled / "comparison.png").stat().st_size > 10_000


def test_a_schedule_on_a_batchnorm_model_needs_room_for_its_micro_batches(tmp_path):
    """4 micro-batches of at least 2 examples each (BatchNorm cannot normalise one): refused before Ray."""
    out = tmp_path / "bn"
    args = ["empirical", "--task", "example_tasks:batchnorm", "--batch-sizes", "2,4", "--schedule", "gns"]
    result = invoke(*args, "--out", str(out), "--address", "127.0.0.1:1")
    assert result.exit_code == 2, result.output
    assert "BatchNorm1d" in result.output and "at least 8" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_batchnorm_model_gets_a_micro_batch_schedule_trial(ray_address, tmp_path):
    """A real sweep of 5 trials on a BatchNorm MLP (3-9 s on 2 cores): its schedule trial runs, with micro-batches."""
    out = tmp_path / "bn"
    result = invoke(
        "empirical", "--task", "example_tasks:batchnorm_blobs", "--batch-sizes", "4,16,64,256", "--lrs", "0.5",
        "--seeds", "1", "--budget-examples", "8192", "--target-loss", "1.0", "--schedule", "gns",
        "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    gns = trials.loc["gns-s0"]
    assert gns.schedule == "gns" and gns.schedule_estimator == "micro-batch" and gns.status != "failed", gns.error
    assert trials[trials.schedule == "fixed"].schedule_estimator.isna().all()
    c = pd.read_parquet(out / "curves.parquet").query("trial_id == 'gns-s0'").sort_values("step")
    sizes = c.batch_size.to_numpy()
    assert sizes[0] == 8 and ((sizes >= 8) & (sizes <= 256)).all()  # the floor: 4 micro-batches of 2
    assert len(set(sizes)) >= 2 and c.eval_loss.iloc[-1] < c.eval_loss.iloc[0]
    plan = pd.read_parquet(out / "plan.parquet").set_index("trial_id")
    assert plan.loc["gns-s0"].batch_size == 8


def test_a_trial_file_from_before_the_per_point_columns_reads_as_a_fixed_trial(tmp_path):
    sweep = SweepDir(tmp_path / "old")
    old = [f for f in TRIALS_SCHEMA if f.name not in ("schedule", "schedule_estimator")]
    given = {"trial_id": "b8-lr0.1-s0", "task": "t", "batch_size": 8, "lr": 0.1, "seed": 0, "status": "reached"}
    row = {f.name: None for f in old} | given | {"curve_steps": [0, 2, 5], "curve_losses": [1.0, 0.8, 0.5]}
    schema = pa.schema(
        old + [pa.field("curve_steps", pa.list_(pa.int64())), pa.field("curve_losses", pa.list_(pa.float64()))]
    )
    sweep.trials_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=schema), sweep.trial(row["trial_id"]))
    trials = sweep.consolidate([row["trial_id"]], {"command": "empirical"})
    assert trials.column("schedule").to_pylist() == [None]  # compare reads it as fixed
    assert trials.column("schedule_estimator").to_pylist() == [None]
    curves = pd.read_parquet(sweep.curves)
    assert list(curves.examples) == [0, 16, 40] and set(curves.batch_size) == {8} and set(curves.lr) == {0.1}
    assert [p["examples"] for p in curve_rows(row)] == [0, 16, 40]
