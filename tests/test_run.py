"""`gns-sweep run`: predict, empirical and compare in one folder; --resume keeps what is done."""

from __future__ import annotations

import pandas as pd
from gns_sweep_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()

TINY = [
    "--task", "blobs-noisy", "--batch-sizes", "256,1024", "--lrs", "x1", "--seeds", "2",
    "--budget-examples", "131072", "--probe-size", "256", "--checkpoints", "2",
]  # fmt: skip


def test_run_writes_everything_and_resumes(ray_address, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *TINY, "--out", str(out), "--address", ray_address])
    assert result.exit_code == 0, result.output
    for name in ("predict.parquet", "trials.parquet", "curves.parquet", "comparison.parquet", "comparison.png"):
        assert (out / name).exists(), name
    assert "B_simple/B_crit" in result.output
    first = pd.read_parquet(out / "trials.parquet")
    assert len(first) == 4

    again = runner.invoke(app, ["run", *TINY, "--out", str(out), "--address", ray_address, "--resume"])
    assert again.exit_code == 0, again.output
    assert "kept" in again.output and "4 already on disk" in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "trials.parquet"), first)


def test_run_bad_input(tmp_path):
    out = tmp_path / "bad"
    result = runner.invoke(app, ["run", *TINY, "--target-loss", "0.5", "--out", str(out)])
    assert result.exit_code == 2 and "--target-loss" in result.output
    result = runner.invoke(app, ["run", "--task", "blobs-noisy", "--batch-sizes", "8,0", "--out", str(out)])
    assert result.exit_code == 2 and "contains 0" in result.output
    assert not out.exists()
