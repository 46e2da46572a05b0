"""predict's reference run: the small-batch SGD run along which the checkpoints are taken."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from gns_sweep.progress import ProgressEvent, ProgressFn
from gns_sweep.tasks import Task
from gns_sweep.train import TrainConfig, eval_loss, train


@dataclass(frozen=True)
class ReferenceRun:
    """Where the reference run went and where it was measured."""

    batch_size: int  # the task's small batch size
    lr: float  # the task's learning rate
    target_loss: float | None  # the task's target eval loss
    steps_to_target: int | None  # first step at or below the target (None: not reached)
    end_step: int  # last step measured (target, budget, or warm-up)
    checkpoint_steps: tuple[int, ...]  # steps at which B_simple was measured
    checkpoint_eval_losses: tuple[float, ...]  # eval loss of the weights at each of them


def checkpoint_steps(warmup: int, end: int, count: int) -> tuple[int, ...]:
    """Up to `count` distinct steps evenly spread from warmup to end: every step when the run is shorter."""
    count = max(1, min(count, end - warmup + 1))
    if count == 1:
        return (warmup,)
    return tuple(int(round(s)) for s in np.linspace(warmup, end, count))


@dataclass(frozen=True)
class Snapshot:
    """The reference run at one checkpoint."""

    state: dict  # the model's state_dict
    updates: dict[str, tuple[float, float]]  # per parameter: (||lr * grad||^2, ||w||^2) of the step that led here


def reference_run(
    task: Task, *, seed: int, warmup_steps: int, checkpoints: int, progress: ProgressFn
) -> tuple[ReferenceRun, dict[int, Snapshot]]:
    """Find where the reference run ends, then replay it to snapshot the checkpoints' weights."""
    tcfg = TrainConfig(task.batch_size, task.lr, task.budget_examples, task.target_loss, seed=seed)
    steps_to_target, end = None, warmup_steps
    if checkpoints > 1:
        progress(ProgressEvent("reference run", 0, 1))
        first = train(task, tcfg)
        steps_to_target, end = first.steps_to_target, first.steps
        progress(ProgressEvent("reference run", 1, 1))
    steps = checkpoint_steps(warmup_steps, end, checkpoints)
    wanted = set(steps)
    snapshots: dict[int, Snapshot] = {}
    losses: dict[int, float] = {}

    def keep(step: int, model: nn.Module) -> None:
        if step in wanted:
            updates = _updates(model, task.lr) if step > 0 else {}  # no step led to the initial weights
            snapshots[step] = Snapshot(copy.deepcopy(model.state_dict()), updates)
            losses[step] = eval_loss(model, task)

    # Replay with no target so it reaches the last checkpoint even past the target.
    replay = replace(tcfg, target_loss=None, budget_examples=(steps[-1] + 1) * task.batch_size)
    train(task, replay, on_step=keep, stop_after=steps[-1])
    evals = tuple(losses[s] for s in steps)
    ref = ReferenceRun(task.batch_size, task.lr, task.target_loss, steps_to_target, end, steps, evals)
    return ref, snapshots


@torch.no_grad()
def _updates(model: nn.Module, lr: float) -> dict[str, tuple[float, float]]:
    """(||lr * grad||^2, ||w||^2) per trainable parameter, from the gradient of the step just taken."""
    return {
        name: (float((lr * p.grad).square().sum()) if p.grad is not None else 0.0, float(p.detach().square().sum()))
        for name, p in model.named_parameters()
        if p.requires_grad
    }
