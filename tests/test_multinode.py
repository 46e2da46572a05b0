"""Two real Ray nodes, each in its own network namespace (tests/netns_cluster.py): the driver runs on
the head node, work lands on both, and a killed worker process or worker node costs nothing but time.

One token cluster and one tokenless cluster (whose worker has a logical GPU), each shared by its
tests; the test that kills the token cluster's worker node comes last. Skipped where network
namespaces cannot be made.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from gns_sweep_cli.main import app
from netns_cluster import TIMEOUT, TwoNodes, two_nodes
from typer.testing import CliRunner

PREDICT = ["predict", "--task", "linreg", "--probe-size", "512", "--checkpoints", "3", "--shards", "4"]
# 12 trials that run their whole budget (the target is unreachable), about a second each
LONG_SWEEP = [
    "empirical", "--task", "blobs-noisy", "--batch-sizes", "4,8", "--lrs", "0.05,0.1", "--seeds", "3",
    "--budget-examples", "8000", "--target-loss", "0",
]  # fmt: skip
SHORT_SWEEP = [
    "empirical", "--task", "blobs-noisy", "--batch-sizes", "16,64", "--lrs", "0.1,0.2", "--seeds", "2",
    "--budget-examples", "3200",
]  # fmt: skip


@pytest.fixture(scope="module")
def token_nodes():
    """Head and worker node with RAY_AUTH_MODE=token and a fresh token; 1 CPU each."""
    with two_nodes(token=True) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def tokenless_nodes():
    """Head and worker node without token authentication; the worker has 1 logical GPU. Ray keeps
    CPU-only tasks off GPU nodes when it can: turned off, so a short sweep uses both nodes."""
    with two_nodes(token=False, worker_gpus=1, env={"RAY_scheduler_avoid_gpu_nodes": "0"}) as nodes:
        yield nodes


def test_predict_on_two_nodes_gives_the_numbers_of_a_local_run(token_nodes, ray_address, tmp_path):
    spread = token_nodes.run(
        token_nodes.cli(*PREDICT, "--out", str(tmp_path / "two"), "--address", token_nodes.address)
    )
    assert spread.returncode == 0, spread.stderr
    local = CliRunner().invoke(app, [*PREDICT, "--out", str(tmp_path / "one"), "--address", ray_address])
    assert local.exit_code == 0, local.output
    two, one = (pd.read_parquet(tmp_path / d / "predict.parquet") for d in ("two", "one"))
    assert len(two) == len(one) == 3 * 2  # checkpoints x (total + the one layer)
    for col in ("grad_sq_norm", "trace_sigma", "b_simple", "b_simple_lo", "b_simple_hi", "snr_mean", "train_loss"):
        np.testing.assert_allclose(two[col], one[col], rtol=1e-9, atol=0, err_msg=col)
    nodes = {n for ids in two.node_ids for n in ids}
    assert nodes == {token_nodes.node_id("head"), token_nodes.node_id("worker")}
    assert "shards ran on 2 Ray node(s)" in spread.stdout


@pytest.mark.parametrize(
    ("env", "unset", "fragment"),
    [
        ({}, ["RAY_AUTH_TOKEN_PATH"], "requires a token and this machine has none"),
        ({"RAY_AUTH_TOKEN": "not-the-token"}, [], "refused the token from RAY_AUTH_TOKEN"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_a_missing_or_wrong_token_is_one_line_exit_2_in_seconds(token_nodes, tmp_path, env, unset, fragment):
    out = tmp_path / "refused"
    env = {"HOME": str(tmp_path), **env}  # no ~/.ray/auth_token; RAY_AUTH_MODE unset, as by a user who never set it
    argv = token_nodes.cli(
        *PREDICT, "--out", str(out), "--address", token_nodes.address, env=env, unset=["RAY_AUTH_MODE", *unset]
    )
    start = time.monotonic()
    result = token_nodes.run(argv)
    assert time.monotonic() - start < 30, "took too long to refuse"
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert "ray get-auth-token" in lines[0]
    assert not out.exists()


def test_a_worker_process_killed_mid_sweep_is_retried(token_nodes, tmp_path):
    out = tmp_path / "killed-worker"
    sweep = _start(token_nodes, [*LONG_SWEEP, "--out", str(out), "--address", token_nodes.address])
    victim = _running_task(token_nodes, sweep, out, "worker")
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    _finishes_with_every_trial_once(sweep, out, 12)
    trials = pd.read_parquet(out / "trials.parquet")
    assert set(trials.node_id) == {token_nodes.node_id("head"), token_nodes.node_id("worker")}


def test_a_tokenless_cluster_is_joined_without_a_token_even_with_one_at_hand(tokenless_nodes, tmp_path):
    """A token on the driver's machine (here RAY_AUTH_TOKEN) must not switch the driver to token mode:
    the worker node could not then fetch the objects the driver owns, and its trials would fail."""
    out = tmp_path / "tokenless"
    argv = tokenless_nodes.cli(
        *SHORT_SWEEP, "--out", str(out), "--address", tokenless_nodes.address,
        env={"RAY_AUTH_TOKEN": "a-token-this-cluster-does-not-use"}, unset=["RAY_AUTH_MODE"],
    )  # fmt: skip
    result = tokenless_nodes.run(argv)
    assert result.returncode == 0, result.stderr
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 8 and (trials.status != "failed").all()
    assert set(trials.node_id) == {tokenless_nodes.node_id("head"), tokenless_nodes.node_id("worker")}


def test_gpu_trials_land_on_the_gpu_node_and_fail_there_without_cuda(tokenless_nodes, tmp_path):
    """The worker node offers a logical GPU but torch there sees no CUDA device: each trial fails with
    a recorded message, is not retried, and never trains on the CPU instead."""
    out = tmp_path / "gpu"
    args = [*SHORT_SWEEP[:6], "0.1", "--seeds", "1", "--budget-examples", "3200", "--gpus-per-trial", "1"]
    result = tokenless_nodes.run(tokenless_nodes.cli(*args, "--out", str(out), "--address", tokenless_nodes.address))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "2 of 2 trials failed" in lines[0] and "--resume" in lines[0], result.stderr
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials.status == "failed").all() and (trials.device == "cuda").all()
    assert set(trials.node_id) == {tokenless_nodes.node_id("worker")}
    assert trials.error.str.contains("sees no CUDA device").all()
    assert (trials.steps == 0).all()


def test_the_worker_node_killed_mid_sweep(token_nodes, tmp_path):
    """Last of the token cluster's tests: its worker node does not come back."""
    out = tmp_path / "killed-node"
    sweep = _start(token_nodes, [*LONG_SWEEP, "--out", str(out), "--address", token_nodes.address])
    _running_task(token_nodes, sweep, out, "worker")
    token_nodes.kill_worker_node()
    _finishes_with_every_trial_once(sweep, out, 12)


def _start(nodes: TwoNodes, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(nodes.cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _running_task(nodes: TwoNodes, sweep: subprocess.Popen, out: Path, node: str) -> int:
    """Once two trials are on disk: the pid of a worker process of `node` that is running a trial."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert sweep.poll() is None, f"the sweep ended before the kill: {sweep.communicate()[1]}"
        assert time.monotonic() < deadline, "no trial running on the node in time"
        done = len(list((out / "trials").glob("*.parquet"))) if (out / "trials").is_dir() else 0
        pids = nodes.task_pids(node) if done >= 2 else []
        if pids:
            return pids[0]
        time.sleep(0.05)


def _finishes_with_every_trial_once(sweep: subprocess.Popen, out: Path, n: int) -> None:
    try:
        _, err = sweep.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        sweep.send_signal(signal.SIGKILL)
        raise AssertionError("the sweep did not finish") from None
    assert sweep.returncode == 0, err
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == n and trials.trial_id.is_unique and (trials.status == "budget").all()
    files = sorted((out / "trials").iterdir())
    assert [p.stem for p in files] == sorted(trials.trial_id)  # one file per trial, no temporary leftovers
    for path in [*files, out / "trials.parquet", out / "curves.parquet", out / "plan.parquet"]:
        pq.read_table(path)  # every file whole
