"""`gns-sweep predict` and `gns-sweep tasks` through the CLI: outputs and every input error."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from gns_sweep_cli.common import check_out_dir
from gns_sweep_cli.main import app
from typer.testing import CliRunner

from gns_sweep.storage import read_settings

runner = CliRunner()
SMALL = ["--probe-size", "64", "--checkpoints", "2", "--warmup-steps", "2", "--shards", "2", "--blocks", "4"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # one line, no traceback
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--task", "no-such-task"], ["unknown task 'no-such-task'", "blobs-noisy"]),
        (["--task", "no_such_module_xyz:make"], ["cannot import module 'no_such_module_xyz'"]),
        (["--task", "example_tasks:not_a_task"], ["returned a dict, not a gns_sweep.Task"]),
        (["--task", "example_tasks:NOT_CALLABLE"], ["not a zero-argument callable"]),
        (["--task", "example_tasks:missing"], ["has no attribute 'missing'"]),
        (["--probe-size", "1"], ["--probe-size 1", "need at least 2 examples"]),
        (["--shards", "0"], ["--shards 0", "at least 1"]),
        (["--probe-size", "10", "--shards", "11"], ["--shards 11", "at most 10"]),
        (["--layer", "nope"], ["unknown --layer 'nope'", "0, 2"]),
        (["--engine", "turbo"], ["unknown --engine 'turbo'"]),
        (["--checkpoints", "0"], ["--checkpoints 0"]),
        (["--address", "127.0.0.1:1"], ["cannot reach a Ray cluster at --address '127.0.0.1:1'"]),
        (["--address", "nonsense"], ["--address 'nonsense' is not host:port"]),
        (["--probe-size", "3", "--blocks", "2", "--shards", "1"], ["--probe-size 3 in --blocks 2", "4 or more"]),
        (["--cpus-per-shard", "nan"], ["--cpus-per-shard nan"]),
        (["--gpus-per-shard", "nan"], ["--gpus-per-shard nan"]),
        (["--warmup-steps", "20000"], ["--warmup-steps 20000", "16384 steps"]),
        (["--task", "example_tasks:mean_loss"], ["returned shape ()", "one loss per example"]),
        (
            ["--task", "example_tasks:batchnorm", "--estimator", "per-example"],
            ["layer '1' (BatchNorm1d) couples the examples", "--estimator micro-batch"],
        ),
        (["--estimator", "bogus"], ["unknown --estimator 'bogus'"]),
        (["--engine", "micro-batch"], ["unknown --engine 'micro-batch'", "--estimator micro-batch"]),
        (["--estimator", "micro-batch", "--probe-size", "60"], ["--probe-size 60 is not a multiple", "56 or 64"]),
        (["--estimator", "micro-batch", "--micro-batch", "1"], ["--micro-batch 1"]),
        (["--task", "example_tasks:frozen"], ["task 'frozen'", "no trainable parameters", "requires_grad"]),
        (["--task", "example_tasks:nan_inputs"], ["train_inputs holds NaN or infinite values", "example 5"]),
        (["--max-retries=-1"], ["--max-retries -1", ">= 0"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, fragments):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "out"
    result = invoke("predict", "--task", "blobs-noisy", *SMALL, "--out", out, *args)
    assert_usage_error(result, *fragments)
    assert not out.exists()


def test_an_out_folder_that_cannot_be_made_is_bad_input(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = invoke("predict", *SMALL, "--out", afile / "sub" / "deeper")
    assert_usage_error(result, "cannot be made", "Not a directory")
    new = tmp_path / "a" / "b"
    result = invoke("predict", *SMALL, "--out", new, "--engine", "turbo")
    assert_usage_error(result, "--engine")
    assert not (tmp_path / "a").exists()  # the check that it can be made leaves nothing behind
    dotted = tmp_path / "absent" / ".." / "res"
    assert check_out_dir(dotted) == dotted  # '..' over a folder not yet made is fine, as mkdir -p finds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["predict", "--probe-size", "abc"], "Invalid value for '--probe-size'"),
        (["predict", "--bogus"], "No such option: --bogus"),
        (["compare"], "Missing argument"),
        (["no-such-command"], "No such command"),
    ],
)
def test_parse_errors_are_one_line_too(argv, fragment):
    proc = subprocess.run(
        [sys.executable, "-m", "gns_sweep_cli", *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert "--help" in lines[0]


def test_values_are_printed_as_typed():
    result = invoke("predict", "--task", "no_such_module_xyz:ok:x")
    assert result.exit_code == 2 and ":ok:x" in result.output, result.output  # no emoji codes


def test_predict_writes_parquet_and_refuses_a_different_run(tmp_path, ray_address):
    out = tmp_path / "run"
    result = invoke("predict", "--task", "blobs-noisy", *SMALL, "--out", out, "--address", ray_address)
    assert result.exit_code == 0, result.output
    assert "B_simple" in result.output and "largest noise scale" in result.output
    path = out / "predict.parquet"
    df = pd.read_parquet(path)
    # what is stored is the estimator's: B_simple = tr(Sigma)/|G|^2 inside its interval, and the
    # layers' |G|^2 and tr(Sigma) add up to the total's at every checkpoint
    resolved = df[df.resolved]
    assert len(resolved) >= 2
    np.testing.assert_allclose(resolved.b_simple, resolved.trace_sigma / resolved.grad_sq_norm, rtol=1e-12)
    lo_ok = resolved.b_simple_lo.isna() | (resolved.b_simple_lo < resolved.b_simple)  # NaN: a block left out
    assert (lo_ok & (resolved.b_simple < resolved.b_simple_hi)).all()  # leaves |G|^2 unresolved, hi is inf
    for _, at in df.groupby("checkpoint"):
        layers, total = at[at.scope != "total"], at[at.scope == "total"].iloc[0]
        assert layers.trace_sigma.sum() == pytest.approx(total.trace_sigma, rel=1e-9)
        assert layers.grad_sq_norm.sum() == pytest.approx(total.grad_sq_norm, rel=1e-9)
        assert layers.n_params.sum() == total.n_params
    assert len(df) == 2 * 3  # 2 checkpoints x (total + 2 layers)
    assert set(df["scope"]) == {"total", "0", "2"}
    assert (df["n_examples"] == 64).all()
    settings = read_settings(path)
    assert settings["command"] == "predict" and settings["probe_size"] == 64 and settings["task"] == "blobs-noisy"
    assert pq.read_metadata(path).num_rows == 6

    # The same command again is fine; a different one needs --overwrite.
    again = invoke("predict", "--task", "blobs-noisy", *SMALL, "--out", out, "--address", ray_address)
    assert again.exit_code == 0, again.output
    before = path.read_bytes()
    other = invoke("predict", "--task", "blobs-noisy", *SMALL, "--seed", 1, "--out", out, "--address", ray_address)
    assert_usage_error(other, "already holds a different run (differs in: seed)", "--overwrite")
    assert path.read_bytes() == before
    other = invoke("predict", "--task", "blobs-noisy", *SMALL, "--seed", "1", "--out", out, "--address", ray_address)
    assert_usage_error(other, "already holds a different run", "--overwrite")
    assert read_settings(path)["seed"] == 0
    forced = invoke(
        "predict", "--task", "blobs-noisy", *SMALL, "--seed", "1", "--out", out, "--address", ray_address, "--overwrite"
    )
    assert forced.exit_code == 0, forced.output
    assert read_settings(path)["seed"] == 1


def test_json_summary_and_user_task(tmp_path, ray_address, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "ident"
    args = ["--probe-size", "32", "--checkpoints", "1", "--warmup-steps", "0", "--shards", "2"]
    result = invoke(
        "predict", "--task", "example_tasks:identical", *args, "--out", out, "--address", ray_address, "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    (total,) = [r for r in summary["rows"] if r["scope"] == "total"]
    assert total["trace_sigma"] == 0.0 and total["b_simple"] == 0.0  # identical examples: no noise
    assert summary["out"].endswith("predict.parquet")


def test_tasks_lists_builtins():
    result = invoke("tasks")
    assert result.exit_code == 0
    for name in ("blobs-clean", "blobs-noisy", "linreg"):
        assert name in result.output


def _stale_ray_records() -> tuple[dict[str, str], str]:
    """An environment whose RAY_ADDRESS and record of the last `ray start` name a cluster long gone
    (in a private RAY_TMPDIR: the machine's own /tmp/ray is left alone). Returns (env, temp dir)."""
    tmp = tempfile.mkdtemp(prefix="gnsrt-")  # short: a local instance puts its sockets under it
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    return {**os.environ, "RAY_TMPDIR": tmp, "RAY_ADDRESS": "127.0.0.1:1"}, tmp


def test_local_ray_instance_from_a_shell(tmp_path):
    """No --address: a private local Ray instance starts, whatever RAY_ADDRESS or a stale record of the
    last `ray start` say, on 127.0.0.1 only, without a dashboard, and stops."""
    out = tmp_path / "local"
    script = f"""
import os, sys, threading, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from sockets import descendants, listening
from gns_sweep_cli.common import check_out_dir
from gns_sweep_cli.main import app

seen = set()
done = False
def watch():
    while not done:
        seen.update(listening(descendants(os.getpid())))
        time.sleep(0.2)
t = threading.Thread(target=watch, daemon=True)
t.start()
try:
    app(["predict", "--task", "linreg", "--probe-size", "128", "--checkpoints", "1", "--warmup-steps", "0",
         "--num-cpus", "1", "--out", {str(out)!r}], standalone_mode=False)
finally:
    done = True
    t.join()
print("LISTEN", sorted(seen))
print("LEFT", sorted(descendants(os.getpid()) - {{os.getpid()}}))
"""
    env, tmp = _stale_ray_records()
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    lines = {
        ln.split(" ", 1)[0]: eval(ln.split(" ", 1)[1])
        for ln in proc.stdout.splitlines()
        if ln.startswith(("LISTEN ", "LEFT "))
    }
    listening = lines["LISTEN"]
    assert len(listening) >= 3, "saw too few Ray sockets to judge"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in listening), listening
    assert all(port != 8265 for _, port in listening)  # no dashboard
    assert (out / "predict.parquet").exists()


def test_address_auto_names_a_dead_ray_address_within_seconds(tmp_path):
    env, tmp = _stale_ray_records()
    out = tmp_path / "auto"
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "gns_sweep_cli", "predict", *SMALL, "--address", "auto", "--out", str(out)],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        took = time.monotonic() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--address 'auto' = 127.0.0.1:1 (found in RAY_ADDRESS): " in lines[0], proc.stderr
    # Ray's own wait for a GCS is minutes; the refusal comes after the import and one refused connection
    # (about 5 s here, up to 40 s on a machine under heavy load): the bound only catches that wait
    assert took < 100 and not out.exists()


def test_address_auto_joins_the_cluster_in_ray_address(tmp_path, ray_address, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    tiny = ["--task", "linreg", "--probe-size", "128", "--checkpoints", "1", "--warmup-steps", "0"]
    result = invoke("predict", *tiny, "--address", "auto", "--out", tmp_path / "auto", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "auto" / "predict.parquet").exists()


def test_gpus_the_cluster_lacks_are_a_usage_error(tmp_path, ray_address):
    out = tmp_path / "gpu"
    result = invoke("predict", *SMALL, "--gpus-per-shard", "1", "--out", out, "--address", ray_address)
    assert_usage_error(result, "asks for 1 GPU(s) but the cluster has 0")
    assert not out.exists()


def test_a_failure_in_user_code_is_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    result = invoke("predict", "--task", "example_tasks:broken", *SMALL[:2], "--out", tmp_path / "b")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: RuntimeError: the user's model is broken")
    assert "Traceback" not in result.output
