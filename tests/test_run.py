"""`gns-sweep run`: predict, empirical and compare in one folder; --resume keeps what is done."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from gns_sweep_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()

TINY = [
    "--task", "blobs-noisy", "--batch-sizes", "256,1024", "--lrs", "x1", "--seeds", "2",
    "--budget-examples", "131072", "--probe-size", "256", "--checkpoints", "2",
]  # fmt: skip


def test_run_writes_everything_and_resumes(ray_address, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *TINY, "--max-retries", "1", "--out", str(out), "--address", ray_address])
    assert result.exit_code == 0, result.output
    for name in ("predict.parquet", "trials.parquet", "curves.parquet", "comparison.parquet", "comparison.png"):
        assert (out / name).exists(), name
    assert "critical batch size by target" in result.output and "targets.png" in result.output
    first = pd.read_parquet(out / "trials.parquet")
    assert len(first) == 4

    # --max-retries is how the work runs, not what it computes: another value still resumes
    again = runner.invoke(app, ["run", *TINY, "--out", str(out), "--address", ray_address, "--resume"])
    assert again.exit_code == 0, again.output
    assert "kept" in again.output and "4 already on disk" in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "trials.parquet"), first)

    # a predict.parquet from before the optimizer was recorded trained plain SGD: kept for an SGD run only
    table = pq.read_table(out / "predict.parquet")
    meta = dict(table.schema.metadata)
    recorded = json.loads(meta[b"gns_sweep.settings"])
    del recorded["optimizer"]
    meta[b"gns_sweep.settings"] = json.dumps(recorded).encode()
    pq.write_table(table.replace_schema_metadata(meta), out / "predict.parquet")
    kept = runner.invoke(app, ["run", *TINY, "--out", str(out), "--address", ray_address, "--resume"])
    assert kept.exit_code == 0 and "kept" in kept.output, kept.output
    momentum = runner.invoke(app, ["run", *TINY, "--optimizer", "momentum", "--out", str(out), "--resume"])
    assert momentum.exit_code == 2 and "differs in: optimizer" in momentum.output, momentum.output

    # --resume never replaces a different predict run; it refuses and names what differs
    other = [a if a != "256" else "128" for a in TINY]
    refused = runner.invoke(app, ["run", *other, "--out", str(out), "--address", ray_address, "--resume"])
    assert refused.exit_code == 2 and "differs in: probe_size" in refused.output, refused.output

    # an interrupted predict (fewer checkpoints than planned) is computed again, not kept as the verdict
    table = pq.read_table(out / "predict.parquet")
    partial = table.filter(pc.equal(table["checkpoint"], 0))
    pq.write_table(partial.replace_schema_metadata(table.schema.metadata), out / "predict.parquet")
    redone = runner.invoke(app, ["run", *TINY, "--out", str(out), "--address", ray_address, "--resume"])
    assert redone.exit_code == 0, redone.output
    assert "has 1 of 2 checkpoints" in redone.output
    assert set(pd.read_parquet(out / "predict.parquet").checkpoint) == {0, 1}

    # a damaged one too, and the finished trials stay
    (out / "predict.parquet").write_bytes(b"garbage")
    redone = runner.invoke(app, ["run", *TINY, "--out", str(out), "--address", ray_address, "--resume"])
    assert redone.exit_code == 0, redone.output
    assert "cannot read" in redone.output and "4 already on disk" in redone.output
    assert set(pd.read_parquet(out / "predict.parquet").checkpoint) == {0, 1}


def test_run_bad_input(tmp_path):
    out = tmp_path / "bad"
    result = runner.invoke(app, ["run", *TINY, "--target-loss", "0.5", "--out", str(out)])
    assert result.exit_code == 2 and "--target-loss" in result.output
    result = runner.invoke(app, ["run", "--task", "blobs-noisy", "--batch-sizes", "8,0", "--out", str(out)])
    assert result.exit_code == 2 and "contains 0" in result.output
    assert not out.exists()
