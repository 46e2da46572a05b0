"""Ctrl-C (and SIGTERM) stop a run cleanly: outstanding work is cancelled, Ray stops, exit code 130 (143)."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from gns_sweep.runtime import Cluster, ClusterConfig


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow), (signal.SIGTERM, 143)],  # the same path; ~20 s each
)
def test_a_signal_stops_predict_cleanly(tmp_path, signum, code):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "gns_sweep_cli", "predict", "--task", "blobs-noisy", "--engine", "loop",
           "--probe-size", "4096", "--checkpoints", "20", "--warmup-steps", "0", "--shards", "2",
           "--num-cpus", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "predict.parquet").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the first checkpoint is on disk; the rest is still running
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not stop within 60 s of {signum!r}") from None
    assert proc.returncode == code, err
    assert "interrupted" in err and "SIGTERM received" not in err  # not Ray's native stack dump
    # What finished before the interrupt is on disk and readable.
    df = pd.read_parquet(out / "predict.parquet")
    assert df["checkpoint"].min() == 0


def test_the_sigterm_handler_from_before_the_cluster_comes_back(ray_address):
    before = signal.getsignal(signal.SIGTERM)
    with Cluster(ClusterConfig(address=ray_address)):
        assert signal.getsignal(signal.SIGTERM) is not before  # ours, not Ray's: stops like Ctrl-C
    assert signal.getsignal(signal.SIGTERM) is before
