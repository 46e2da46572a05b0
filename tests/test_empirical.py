"""`gns-sweep empirical` on a real loopback Ray cluster: resume after SIGKILL, divergence, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from gns_sweep_cli.main import app
from typer.testing import CliRunner

from gns_sweep.storage import SweepDir, read_rows, read_settings

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_diverged_trials_are_recorded(ray_address, tmp_path):
    out = tmp_path / "div"
    result = invoke(
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "16", "--lrs", "0.5,5000", "--seeds", "1",
        "--budget-examples", "1600", "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    trials = pd.read_parquet(out / "trials.parquet").set_index("lr")
    assert len(trials) == 2
    assert trials.loc[5000, "status"] == "diverged"
    assert pd.isna(trials.loc[5000, "steps_to_target"])
    assert trials.loc[0.5, "status"] in ("reached", "budget")
    assert trials.loc[0.5, "update_ratio_max"] > 0
    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves.trial_id) == set(trials.trial_id)
    assert (curves.examples == curves.step * curves.batch_size).all()


@pytest.mark.machine
def test_resume_after_sigkill_completes_without_duplicates(ray_address, tmp_path):
    """Depends on the machine's speed: the kill must land after 2 and before all 12 trials finish
    (each runs ~1 s here); on a much faster or slower machine it can miss that window."""
    out = tmp_path / "killed"
    sweep = SweepDir(out)
    # 12 trials that each run their whole budget (the target is unreachable), ~1 s apiece
    args = [
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "4,8", "--lrs", "0.05,0.1", "--seeds", "3",
        "--budget-examples", "8000", "--target-loss", "0.0", "--out", str(out), "--address", ray_address,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gns_sweep_cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    try:
        while len(sweep.finished_trial_ids()) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = sweep.finished_trial_ids()
    assert 2 <= len(done_before) < 12
    planned = {row["trial_id"] for row in read_rows(sweep.plan)}
    assert len(planned) == 12

    again = invoke(*args)
    assert again.exit_code == 2 and "--resume" in again.output  # refuses to clobber silently

    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{len(done_before)} already on disk" in result.output
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 12 and trials.trial_id.is_unique
    assert set(trials.trial_id) == planned == sweep.finished_trial_ids()
    assert not [p for p in sweep.trials_dir.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert (trials.status == "budget").all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-sizes", ""], "--batch-sizes"),
        (["--batch-sizes", "0,8"], "contains 0"),
        (["--batch-sizes=-8"], "contains -8"),
        (["--batch-sizes", "eight"], "not a comma list"),
        (["--lrs", "0,0.1"], "contains 0"),
        (["--lrs=-0.1"], "-0.1"),
        (["--lrs", "x0"], "contains 0"),
        (["--batch-sizes", "8,1024", "--budget-examples", "512"], "smaller than the largest batch size 1024"),
        (["--seeds", "0"], "--seeds 0"),
        (["--task", "no-such-task"], "unknown task"),
        (["--gpus-per-trial", "nan"], "--gpus-per-trial nan"),
        (["--cpus-per-trial", "nan"], "--cpus-per-trial nan"),
        (["--task", "example_tasks:nan_target"], "target_loss must be a finite number"),
        (["--task", "example_tasks:frozen", "--batch-sizes", "8,16"], "has no trainable parameters"),
        (["--task", "example_tasks:nan_inputs"], "train_inputs holds NaN or infinite values in 1 example(s)"),
        (["--max-retries=-1"], "--max-retries -1"),
        (["--optimizer", "rmsprop"], "unknown --optimizer 'rmsprop'; choose one of: sgd, momentum, adam, adamw, lars"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum does not apply to optimizer 'adam'; drop"),
        (["--betas", "0.9,0.99"], "--betas does not apply to optimizer 'sgd'"),
        (["--optimizer", "adamw", "--betas", "0.9"], "--betas '0.9': give two numbers"),
        (["--optimizer", "adam", "--betas", "0.9,1.5"], "beta2 1.5 must be >= 0 and < 1"),
        (["--optimizer", "momentum", "--momentum", "1"], "momentum 1 must be >= 0 and < 1"),
        (["--optimizer", "lars", "--trust-coefficient", "0"], "trust coefficient 0 must be > 0"),
        (["--weight-decay=-0.1"], "weight decay -0.1 must be >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "bad"
    result = invoke("empirical", *args, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_trial_whose_own_code_raises_is_recorded_and_resume_runs_it_again(ray_address, tmp_path, monkeypatch):
    """The batch-16 trials fail in the user's loss (not retried); the others finish; exit 1 names the
    failures; the failed trials are in trials.parquet with their error; --resume runs just those again."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    flag = tmp_path / "loss-is-broken"
    flag.write_text("")
    monkeypatch.setenv("GNS_TEST_FAIL_FLAG", str(flag))
    out = tmp_path / "flaky"
    args = [
        "empirical", "--task", "example_tasks:fails_at_batch_16", "--batch-sizes", "8,16", "--lrs", "0.1",
        "--seeds", "2", "--budget-examples", "160", "--target-loss", "0.01", "--out", str(out),
        "--address", ray_address,
    ]  # fmt: skip
    first = invoke(*args)
    assert first.exit_code == 1, first.output
    last = first.output.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 4 trials failed (b16-lr0.1-s0, b16-lr0.1-s1)"), last
    assert "ValueError: the user's loss refuses batches of 16" in last and "--resume" in last
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert len(trials) == 4
    failed = trials[trials.batch_size == 16]
    assert (failed.status == "failed").all() and (
        failed.error == "ValueError: the user's loss refuses batches of 16"
    ).all()
    assert failed.node_id.notna().all()  # where it failed
    assert trials[trials.batch_size == 8].error.isna().all()
    assert read_rows(SweepDir(out).trial("b16-lr0.1-s0"))[0]["status"] == "failed"  # its own file says so too

    flag.unlink()  # the cause, fixed
    again = invoke(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert "2 already on disk" in again.output
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and trials.trial_id.is_unique
    assert (trials.status != "failed").all() and trials.error.isna().all()


def test_missing_gpu_is_a_usage_error_not_a_hang(ray_address, tmp_path):
    out = tmp_path / "gpu"
    result = invoke(
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "64", "--lrs", "0.1", "--seeds", "1",
        "--budget-examples", "640", "--gpus-per-trial", "1", "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "GPU" in result.output
    assert not out.exists()


def test_resume_refuses_a_different_plan(ray_address, tmp_path):
    out = tmp_path / "plan"
    base = ["empirical", "--task", "blobs-noisy", "--batch-sizes", "64", "--lrs", "0.1", "--seeds", "1"]
    first = invoke(*base, "--budget-examples", "640", "--out", str(out), "--address", ray_address)
    assert first.exit_code == 0, first.output
    other = invoke(*base, "--budget-examples", "1280", "--out", str(out), "--address", ray_address, "--resume")
    assert other.exit_code == 2 and "budget_examples" in other.output
    assert Path(out / "trials.parquet").exists()
    again = [*base, "--budget-examples", "640", "--out", str(out), "--address", ray_address, "--resume"]
    momentum = invoke(*again, "--optimizer", "momentum")
    assert momentum.exit_code == 2 and "planned with different optimizer, optimizer_settings" in momentum.output
    decay = invoke(*again, "--weight-decay", "0.01")
    assert decay.exit_code == 2 and "planned with different optimizer_settings;" in decay.output
    # a sweep planned before the optimizer was recorded was plain SGD: it resumes
    plan = pq.read_table(out / "plan.parquet")
    old = {k: v for k, v in read_settings(out / "plan.parquet").items() if not k.startswith("optimizer")}
    plan = plan.replace_schema_metadata({b"gns_sweep.settings": json.dumps(old).encode()})
    pq.write_table(plan, out / "plan.parquet")
    resumed = invoke(*again)
    assert resumed.exit_code == 0 and "1 already on disk" in resumed.output, resumed.output


def test_an_adam_sweep_records_its_optimizer_and_scales_its_lrs_with_the_square_root(ray_address, tmp_path):
    out = tmp_path / "adam"
    args = [
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "8,32", "--lrs", "x1", "--seeds", "1",
        "--budget-examples", "320", "--target-loss", "0", "--optimizer", "adam", "--betas", "0.8,0.99",
        "--out", str(out), "--address", ray_address,
    ]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "with adam (betas 0.8,0.99, eps 1e-08, weight_decay 0)" in result.output
    settings = read_settings(out / "plan.parquet")
    assert settings["optimizer"] == "adam" and settings["lr_scaling"] == "sqrt"
    assert settings["optimizer_settings"] == {"name": "adam", "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": 0.0}
    ref, cap = settings["reference_lr"], settings["lr_cap"]
    assert settings["lrs"] == [[float(f"{min(ref, cap):.6g}")], [float(f"{min(2 * ref, cap):.6g}")]]  # sqrt(32/8) = 2
    assert 1e-3 < ref < 0.1  # Adam's scale, matched to the task's SGD lr 0.125
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials.optimizer == "adam").all() and trials.optimizer_settings.map(json.loads).eq(
        settings["optimizer_settings"]
    ).all()
    assert (trials.update_ratio_max > 0).all() and (trials.steps == [40, 10]).all()


def test_the_lr_grid_scales_linearly_or_with_the_square_root_and_keeps_the_cap():
    from gns_sweep.empirical import EmpiricalConfig, lr_grid
    from gns_sweep.optim import OptimizerSpec
    from gns_sweep.tasks import load_task

    task = load_task("blobs-noisy")  # lr 0.125 at batch 8
    config = EmpiricalConfig(task="blobs-noisy", lr_multipliers=(0.5, 1.0))
    assert lr_grid(task, 32, config, None) == (0.25, 0.5)  # plain SGD: x 32/8
    assert lr_grid(task, 32, config, None, optimizer=OptimizerSpec("lars"), base_lr=2.0) == (4.0, 8.0)
    assert lr_grid(task, 32, config, None, optimizer=OptimizerSpec("adamw"), base_lr=0.01) == (0.01, 0.02)
    assert lr_grid(task, 128, config, 0.03, optimizer=OptimizerSpec("adam"), base_lr=0.01) == (0.015, 0.03)


@pytest.mark.slow  # two pilot-planned sweeps: ~35 s
def test_a_pilot_target_needs_tens_of_steps_at_the_largest_batch(monkeypatch):
    """Without a target the pilot picks one the largest batch size cannot reach in a few steps at any lr of
    its grid, so the frontier has a large-batch end (S_min >= 10), and the middle batch size reaches it."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from example_tasks import separable_without_target

    from gns_sweep.empirical import EmpiricalConfig, make_plan
    from gns_sweep.train import TrainConfig, train

    task = separable_without_target()
    plan = make_plan(EmpiricalConfig(task="example_tasks:separable_without_target", seeds=1), task)
    assert plan.target_source == "pilot" and "tightened" in plan.target_reason, plan.target_reason
    big, mid = plan.batch_sizes[-1], plan.batch_sizes[len(plan.batch_sizes) // 2]
    steps = [train(task, TrainConfig(big, lr, plan.budget_examples, plan.target_loss, seed=0)) for lr in plan.lrs[-1]]
    reached = [r.steps_to_target for r in steps if r.steps_to_target is not None]
    assert reached and min(reached) >= 10, [r.steps_to_target for r in steps]
    mid_lrs = plan.lrs[len(plan.batch_sizes) // 2]
    assert train(task, TrainConfig(mid, mid_lrs[2], plan.budget_examples, plan.target_loss, seed=1)).status == "reached"


def test_short_calls_share_ray_tasks_and_a_raising_call_does_not_stop_its_chunk(cluster):
    """Cluster.stream packs short calls several to a Ray task and hands back each once; a call that
    raises is reported on its own while the calls after it in the same task still run."""
    task_state = {}  # pickled with fn: one fresh copy per Ray task

    def fn(*, i, scale, worker):
        task_state.setdefault("task", os.urandom(8).hex())
        if i % 10 == 3:
            raise ValueError(f"call {i} refuses")
        return i * scale, task_state["task"]

    results, errors = {}, {}
    cluster.stream(
        fn,
        [{"i": i} for i in range(150)],
        shared={"scale": cluster.put(2)},
        on_result=lambda i, value, worker: results.setdefault(i, []).append(value),
        on_error=lambda i, error, worker: errors.setdefault(i, []).append((str(error), worker)),
    )
    assert set(results) | set(errors) == set(range(150)) and not set(results) & set(errors)
    assert all(len(v) == 1 for v in [*results.values(), *errors.values()])  # each call handed back once
    assert all(value == i * 2 for i, [(value, _)] in results.items())
    assert set(errors) == {i for i in range(150) if i % 10 == 3}
    assert all(message == f"ValueError: call {i} refuses" and worker for i, [(message, worker)] in errors.items())
    tasks: dict[str, list[int]] = {}
    for i, [(_, task)] in results.items():
        tasks.setdefault(task, []).append(i)
    assert max(map(len, tasks.values())) > 1  # several calls per Ray task
    # some task ran calls on both sides of a call that raised: its chunk went on
    assert any(min(ids) < i < max(ids) for ids in tasks.values() for i in errors)


def test_chunks_follow_the_measured_call_time_and_shrink_towards_the_end():
    from gns_sweep.runtime import CHUNK_SECONDS, MAX_CHUNK, _ChunkState

    state = _ChunkState(total=10_000)
    assert state.chunk_size(slots=2, chunk_seconds=CHUNK_SECONDS) == 1  # nothing measured yet
    state.measured(0.005)
    assert state.chunk_size(slots=2, chunk_seconds=0.5) == 100
    state.measured(2.0)  # long calls: one per task, as a sweep of long trials always had
    for _ in range(30):
        state.measured(2.0)
    assert state.chunk_size(slots=2, chunk_seconds=0.5) == 1
    tiny = _ChunkState(total=100_000, seconds=1e-6)
    assert tiny.chunk_size(slots=2, chunk_seconds=0.5) == MAX_CHUNK
    tiny.next_call = 100_000 - 40
    assert tiny.chunk_size(slots=2, chunk_seconds=0.5) == 10  # the last ones: two chunks per slot at least


def test_a_killed_sweep_resumes_with_only_its_unwritten_trials(ray_address, tmp_path):
    """What a driver killed mid-sweep leaves (some trial files, a half-written one, no tables): --resume
    runs just the trials without a file, keeps the others as they were, and each is in the tables once."""
    out = tmp_path / "resumed"
    sweep = SweepDir(out)
    args = [
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "8,16", "--lrs", "0.1,0.2", "--seeds", "2",
        "--budget-examples", "64", "--target-loss", "0", "--out", str(out), "--address", ray_address,
    ]  # fmt: skip
    assert invoke(*args).exit_code == 0
    first = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    first_curves = pd.read_parquet(out / "curves.parquet")
    lost = sorted(first.index)[::3]
    for tid in lost:
        sweep.trial(tid).unlink()
    (sweep.trials_dir / f".{lost[0]}.parquet.x1y2.tmp").write_bytes(b"half a file")
    (out / "trials.parquet").unlink()
    (out / "curves.parquet").unlink()

    result = invoke(*args, "--resume", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["trials"] == 8 and doc["resumed"] == 8 - len(lost)
    assert set(doc["rows"][0]) == set(pd.read_parquet(out / "trials.parquet").columns)  # no curves
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert sorted(trials.index) == sorted(first.index) and trials.index.is_unique
    kept = first.index.difference(lost)
    pd.testing.assert_frame_equal(trials.loc[kept], first.loc[kept])  # not run again
    assert not (trials.loc[lost, "wall_seconds"] == first.loc[lost, "wall_seconds"]).any()  # run again
    curves = pd.read_parquet(out / "curves.parquet")
    assert len(curves) == len(first_curves) and set(curves.trial_id) == set(first.index)
    assert sweep.finished_trial_ids() == set(first.index)
    assert not [p for p in out.rglob(".*")]
