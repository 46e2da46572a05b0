"""One trial, as a Ray task runs it: a training run from the seed's initial weights, and its record."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gns_sweep.empirical.config import TrialSpec
from gns_sweep.optim import OptimizerSpec
from gns_sweep.runtime import WorkerInfo
from gns_sweep.schedule import ScheduleConfig, run_schedule
from gns_sweep.storage.sweep_dir import encode_trial, light_row
from gns_sweep.tasks import Task
from gns_sweep.train import FAILED, TrainConfig, train


@dataclass(frozen=True)
class TrialRecord:
    """What one trial did: a row of trials.parquet plus its eval curve."""

    trial_id: str
    task: str
    schedule: str  # "fixed", or "gns": the batch size followed the noise scale (TrialSpec.kind)
    schedule_estimator: str | None  # a schedule trial's noise-scale estimator (per-example, micro-batch); None: fixed
    batch_size: int  # a schedule trial's: that of its last step
    lr: float  # a schedule trial's: that of its last step
    optimizer: str  # the optimizer's name
    optimizer_settings: str  # JSON: the optimizer's name and the settings it reads (OptimizerSpec.key)
    seed: int
    status: str  # reached, budget, diverged or failed
    steps: int
    steps_to_target: int | None
    examples_to_target: int | None  # examples used up to steps_to_target
    target_loss: float
    initial_eval_loss: float
    final_eval_loss: float
    best_eval_loss: float
    budget_examples: int
    wall_seconds: float
    cpu_seconds: float
    node_id: str | None  # None: a failed trial that never reached a worker
    device: str | None
    update_ratio_max: float
    update_ratios: str  # JSON {parameter: ||update||/||w||} at the last step (update: lr*grad for plain SGD)
    curve_steps: tuple[int, ...]
    curve_losses: tuple[float, ...]
    curve_batch_sizes: tuple[int, ...]  # batch size of each evaluated step
    curve_examples: tuple[int, ...]  # examples used up to each evaluated step
    curve_lrs: tuple[float, ...]  # lr of each evaluated step
    error: str | None = None  # why a failed trial failed (one line); None otherwise


def optimizer_columns(optimizer: OptimizerSpec) -> dict[str, str]:
    """A trial row's optimizer and optimizer_settings."""
    return {"optimizer": optimizer.name, "optimizer_settings": json.dumps(optimizer.key(), sort_keys=True)}


def run_trial(
    *,
    task: Task,
    trial: TrialSpec,
    target_loss: float,
    budget_examples: int,
    worker: WorkerInfo,
    optimizer: OptimizerSpec = OptimizerSpec(),
) -> TrialRecord:
    """Runs on a worker: one training run, from the seed's initial weights."""
    if trial.schedule is not None:
        return _run_schedule_trial(
            task=task, trial=trial, target_loss=target_loss, budget_examples=budget_examples, worker=worker,
            optimizer=optimizer,
        )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    cfg = TrainConfig(trial.batch_size, trial.lr, budget_examples, target_loss, seed=trial.seed, optimizer=optimizer)
    r = train(task, cfg, device=worker.device)
    n = len(r.curve_steps)
    return _record(
        task=task, trial=trial, r=r, target_loss=target_loss, budget_examples=budget_examples, worker=worker,
        optimizer=optimizer, since=(wall, cpu),
        batch_size=trial.batch_size,
        lr=trial.lr,
        examples_to_target=None if r.steps_to_target is None else r.steps_to_target * trial.batch_size,
        update_ratio_max=max(r.update_ratios.values(), default=math.nan),
        update_ratios=json.dumps(r.update_ratios),
        curve_batch_sizes=(trial.batch_size,) * n,
        curve_examples=tuple(s * trial.batch_size for s in r.curve_steps),
        curve_lrs=(trial.lr,) * n,
    )  # fmt: skip


def _record(
    *, task: Task, trial: TrialSpec, r, target_loss: float, budget_examples: int, worker: WorkerInfo,
    optimizer: OptimizerSpec, since: tuple[float, float], **own,
) -> TrialRecord:  # fmt: skip
    """The columns every finished trial fills the same way from its run `r`; `own` holds the rest."""
    finite = [x for x in r.curve_losses if math.isfinite(x)]
    return TrialRecord(
        trial_id=trial.trial_id,
        task=task.name,
        schedule=trial.kind,
        schedule_estimator=_estimator(trial),
        **optimizer_columns(optimizer),
        seed=trial.seed,
        status=r.status,
        steps=r.steps,
        steps_to_target=r.steps_to_target,
        target_loss=target_loss,
        initial_eval_loss=r.initial_eval_loss,
        final_eval_loss=r.final_eval_loss,
        best_eval_loss=min(finite) if finite else math.inf,
        budget_examples=budget_examples,
        wall_seconds=time.perf_counter() - since[0],
        cpu_seconds=time.process_time() - since[1],
        node_id=worker.node_id,
        device=worker.device,
        curve_steps=r.curve_steps,
        curve_losses=r.curve_losses,
        **own,
    )


def _run_schedule_trial(
    *,
    task: Task,
    trial: TrialSpec,
    target_loss: float,
    budget_examples: int,
    worker: WorkerInfo,
    optimizer: OptimizerSpec,
) -> TrialRecord:
    """An adaptive-batch run (gns_sweep.schedule) as a trial: its row holds the last step's batch size and
    lr, its curve the batch size, examples and lr of every evaluated step."""
    wall, cpu = time.perf_counter(), time.process_time()
    spec = trial.schedule
    config = ScheduleConfig.from_task(
        task,
        lr=trial.lr,
        base_batch=spec.base_batch,
        floor=spec.floor,
        ceiling=spec.ceiling,
        budget_examples=budget_examples,
        target_loss=target_loss,
        seed=trial.seed,
        k=spec.k,
        lr_max=spec.lr_max,
        optimizer=optimizer,
        estimator=spec.estimator,
    )
    r = run_schedule(task, config, device=worker.device)
    return _record(
        task=task, trial=trial, r=r, target_loss=target_loss, budget_examples=budget_examples, worker=worker,
        optimizer=optimizer, since=(wall, cpu),
        batch_size=r.curve_batch_sizes[-1],
        lr=r.curve_lrs[-1],
        examples_to_target=r.examples_to_target,
        update_ratio_max=math.nan,  # the schedule does not measure it
        update_ratios="{}",
        curve_batch_sizes=r.curve_batch_sizes,
        curve_examples=r.curve_examples,
        curve_lrs=r.curve_lrs,
    )  # fmt: skip


def _estimator(trial: TrialSpec) -> str | None:
    """trials.parquet's schedule_estimator: the schedule's, None for a fixed trial."""
    return None if trial.schedule is None else trial.schedule.estimator


def run_trial_file(
    *,
    task: Task,
    trial: TrialSpec,
    target_loss: float,
    budget_examples: int,
    metadata: Mapping[bytes, bytes] | None,
    worker: WorkerInfo,
    optimizer: OptimizerSpec = OptimizerSpec(),
) -> tuple[dict[str, Any], bytes | None]:
    """What the sweep runs on a worker per trial: `run_trial`, then its trials.parquet row (no curve) for
    the driver and, when the sweep is written (metadata: the trial files' settings), its whole file as
    bytes, encoded here so the driver only copies them to disk."""
    record = run_trial(
        task=task,
        trial=trial,
        target_loss=target_loss,
        budget_examples=budget_examples,
        worker=worker,
        optimizer=optimizer,
    )
    row = asdict(record)
    return light_row(row), None if metadata is None else encode_trial(row, metadata)


def failed_record(
    *,
    task: str,
    trial: TrialSpec,
    target_loss: float,
    budget_examples: int,
    error: str,
    worker: WorkerInfo | None,
    optimizer: OptimizerSpec = OptimizerSpec(),
) -> TrialRecord:
    """A trial whose own code raised: its row says so, with the error and where it ran; nothing measured."""
    nan = math.nan
    return TrialRecord(
        trial_id=trial.trial_id,
        task=task,
        schedule=trial.kind,
        schedule_estimator=_estimator(trial),
        batch_size=trial.batch_size,
        lr=trial.lr,
        **optimizer_columns(optimizer),
        seed=trial.seed,
        status=FAILED,
        steps=0,
        steps_to_target=None,
        examples_to_target=None,
        target_loss=target_loss,
        initial_eval_loss=nan,
        final_eval_loss=nan,
        best_eval_loss=nan,
        budget_examples=budget_examples,
        wall_seconds=nan,
        cpu_seconds=nan,
        node_id=worker.node_id if worker else None,
        device=worker.device if worker else None,
        update_ratio_max=nan,
        update_ratios="{}",
        curve_steps=(),
        curve_losses=(),
        curve_batch_sizes=(),
        curve_examples=(),
        curve_lrs=(),
        error=error,
    )
