"""A tiny real predict -> empirical -> compare on a loopback Ray cluster, and compare's input errors."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest
from gns_sweep_cli.main import app
from typer.testing import CliRunner

from gns_sweep.compare import Prediction, compare_trials

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def swept(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    pred = invoke(
        "predict", "--task", "blobs-noisy", "--probe-size", "256", "--checkpoints", "2", "--shards", "2",
        "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert pred.exit_code == 0, pred.output
    emp = invoke(
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "64,256,1024", "--lrs", "x0.5,x1", "--seeds", "2",
        "--budget-examples", "131072", "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert emp.exit_code == 0, emp.output
    return out


def test_tiny_sweep_writes_every_file(swept):
    result = invoke("compare", str(swept))
    assert result.exit_code == 0, result.output
    assert "B_crit" in result.output and "B_simple" in result.output
    for name in ("predict.parquet", "trials.parquet", "curves.parquet", "comparison.parquet", "comparison.png"):
        assert (swept / name).exists(), name
    assert (swept / "comparison.png").stat().st_size > 10_000
    trials = pd.read_parquet(swept / "trials.parquet")
    assert len(trials) == 3 * 2 * 2
    required = {
        "trial_id", "task", "batch_size", "lr", "seed", "status", "steps_to_target", "examples_to_target",
        "target_loss", "final_eval_loss", "budget_examples", "wall_seconds", "node_id", "device",
    }  # fmt: skip
    assert required <= set(trials.columns)
    assert set(trials.status) <= {"reached", "budget", "diverged"}
    assert (trials.device == "cpu").all()
    comp = pd.read_parquet(swept / "comparison.parquet")
    row = comp.iloc[0]
    for col in ("task", "target_loss", "b_crit", "b_crit_lo", "b_crit_hi", "s_min", "e_min", "b_simple_avg", "ratio"):
        assert col in comp.columns
    assert row.task == "blobs-noisy" and row.b_crit > 0 and row.s_min > 0
    assert row.ratio == pytest.approx(row.b_simple_target / row.b_crit)
    frontier = pd.read_parquet(swept / "frontier.parquet")
    assert list(frontier.batch_size) == [64, 256, 1024]


def test_compare_json(swept):
    import json

    result = invoke("compare", str(swept), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["comparison"]["task"] == "blobs-noisy"
    assert len(doc["batch_sizes"]) == 3


def test_compare_input_errors(tmp_path, swept):
    missing = invoke("compare", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "not a folder" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    only_trials = tmp_path / "only-trials"
    only_trials.mkdir()
    (only_trials / "trials.parquet").write_bytes((swept / "trials.parquet").read_bytes())
    result = invoke("compare", str(only_trials))
    assert result.exit_code == 2 and "gns-sweep predict" in result.output
    assert sorted(p.name for p in only_trials.iterdir()) == ["trials.parquet"]  # nothing written
    only_predict = tmp_path / "only-predict"
    only_predict.mkdir()
    (only_predict / "predict.parquet").write_bytes((swept / "predict.parquet").read_bytes())
    result = invoke("compare", str(only_predict))
    assert result.exit_code == 2 and "gns-sweep empirical" in result.output
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "trials.parquet").write_bytes((swept / "trials.parquet").read_bytes())
    (damaged / "predict.parquet").write_bytes(b"not parquet at all")
    result = invoke("compare", str(damaged))
    assert result.exit_code == 2 and "is not a readable Parquet file" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    (damaged / "predict.parquet").write_bytes((swept / "trials.parquet").read_bytes())  # the wrong table
    result = invoke("compare", str(damaged))
    assert result.exit_code == 2 and "lacks the column(s)" in result.output, result.output


def test_result_files_follow_the_umask(swept):
    for name in ("predict.parquet", "trials.parquet", "plan.parquet"):
        mode = (swept / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask(), (name, oct(mode))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_censored_and_unfittable_sweeps():
    pred = Prediction(start=10.0, run=20.0, target=40.0, batch_size=8, eval_loss=0.7)

    def row(b, lr, seed, steps):
        return {
            "task": "t", "batch_size": b, "lr": lr, "seed": seed, "steps_to_target": steps,
            "status": "reached" if steps else "budget", "target_loss": 0.5, "budget_examples": 10_000,
        }  # fmt: skip

    rows = [row(b, 0.1, s, 30 + 2000 // b) for b in (8, 32, 128) for s in (0, 1)]
    rows += [row(512, 0.1, s, None) for s in (0, 1)]
    c = compare_trials(rows, pred, resamples=50)
    assert c.censored == (512,)
    assert any("censored" in note for note in c.notes)
    assert c.b_crit == pytest.approx(2000 / 30, rel=0.05)
    only_one = compare_trials([row(8, 0.1, 0, 40), row(512, 0.1, 0, None)], pred, resamples=10)
    assert only_one.frontier is None and math.isnan(only_one.b_crit)
