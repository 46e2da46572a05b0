"""predict's reference run: the small-batch run along which the checkpoints are taken, with the optimizer
predict was given (plain SGD by default)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from gns_sweep.optim import OptimizerSpec, preconditioner
from gns_sweep.progress import ProgressEvent, ProgressFn
from gns_sweep.tasks import Task
from gns_sweep.train import Stepper, TrainConfig, eval_loss, reference_lr, train


@dataclass(frozen=True)
class ReferenceRun:
    """Where the reference run went and where it was measured."""

    batch_size: int  # the task's small batch size
    lr: float  # the optimizer's learning rate at that batch size (the task's, for the task's own optimizer)
    target_loss: float | None  # the task's target eval loss
    steps_to_target: int | None  # first step at or below the target (None: not reached)
    end_step: int  # last step measured (target, budget, or warm-up)
    checkpoint_steps: tuple[int, ...]  # steps at which B_simple was measured
    checkpoint_eval_losses: tuple[float, ...]  # eval loss of the weights at each of them
    optimizer: OptimizerSpec = OptimizerSpec()  # what it trained with
    lr_reason: str = "the task's lr for sgd"  # where `lr` comes from (gns_sweep.train.reference_lr)


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
    # per trainable parameter: (||update||^2, ||w||^2) of the step that led here (empty at step 0); the update
    # is lr * grad for plain SGD, the optimizer's real step w_after - w_before for any other
    updates: dict[str, tuple[float, float]]
    # per trainable parameter, shaped like it: the diagonal preconditioner P = 1/(sqrt(v_hat) + eps) an adaptive
    # optimizer (adam, adamw) holds here (gns_sweep.optim.preconditioner); None for any other optimizer, and at
    # step 0, before the first step gives Adam its second moments
    preconditioner: dict[str, torch.Tensor] | None = None


def reference_run(
    task: Task,
    *,
    seed: int,
    warmup_steps: int,
    checkpoints: int,
    progress: ProgressFn,
    optimizer: OptimizerSpec | None = None,
) -> tuple[ReferenceRun, dict[int, Snapshot]]:
    """Find where the reference run ends, then replay it to snapshot the checkpoints' weights (and the
    optimizer's preconditioner there). optimizer None: the task's own (plain SGD if it names none)."""
    optimizer = optimizer or task.optimizer or OptimizerSpec()
    lr = reference_lr(task, optimizer)
    tcfg = TrainConfig(task.batch_size, lr.lr, task.budget_examples, task.target_loss, seed=seed, optimizer=optimizer)
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

    def keep(step: int, model: nn.Module, stepper: Stepper) -> None:
        if step in wanted:
            updates = _updates(model, stepper) if step > 0 else {}  # no step led to the initial weights
            params = dict(model.named_parameters())
            precond = preconditioner(stepper.optimizer, optimizer, {n: params[n] for n in stepper.names})
            snapshots[step] = Snapshot(copy.deepcopy(model.state_dict()), updates, precond)
            losses[step] = eval_loss(model, task)

    # Replay with no target so it reaches the last checkpoint even past the target.
    replay = replace(tcfg, target_loss=None, budget_examples=(steps[-1] + 1) * task.batch_size)
    train(task, replay, on_step=keep, stop_after=steps[-1])
    evals = tuple(losses[s] for s in steps)
    ref = ReferenceRun(
        task.batch_size, lr.lr, task.target_loss, steps_to_target, end, steps, evals, optimizer, lr.reason
    )
    return ref, snapshots


@torch.no_grad()
def _updates(model: nn.Module, stepper: Stepper) -> dict[str, tuple[float, float]]:
    """(||update||^2, ||w||^2) per trainable parameter, of the step just taken."""
    steps = stepper.update_sq()
    params = dict(model.named_parameters())
    return {name: (sq, float(params[name].detach().square().sum())) for name, sq in steps.items()}
