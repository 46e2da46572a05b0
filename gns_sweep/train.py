"""One training run: plain SGD at a constant lr towards an eval-loss target within a budget.

Used by predict's reference run and by every trial of the empirical sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gns_sweep.tasks import Task

REACHED = "reached"
BUDGET = "budget"
DIVERGED = "diverged"
FAILED = "failed"  # a sweep trial whose own code raised: recorded with its error, never measured

EVAL_RESOLUTION = 0.02  # the step of first reaching the target is known to within 2%
DENSE_EVAL_STEPS = 50  # evaluate every step up to here (2% of 50 is one step)
DIVERGE_FACTOR = 10.0  # eval loss above this multiple of the initial loss counts as divergence


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run."""

    batch_size: int  # examples per SGD step
    lr: float  # constant learning rate
    budget_examples: int  # stop after this many training examples
    target_loss: float | None  # stop when the eval loss first reaches this (None: run the budget)
    seed: int  # seeds the initial weights and the data order


@dataclass(frozen=True)
class TrainResult:
    """What one run did. Curves hold every eval point."""

    status: str  # REACHED, BUDGET or DIVERGED
    steps: int  # SGD steps taken
    steps_to_target: int | None  # first evaluated step with eval loss <= target
    initial_eval_loss: float  # eval loss of the initial weights
    final_eval_loss: float  # eval loss at the last evaluated step
    curve_steps: tuple[int, ...]  # steps at which the eval loss was measured
    curve_losses: tuple[float, ...]  # the eval losses there
    update_ratios: dict[str, float]  # per parameter: ||lr * grad|| / ||weight|| at the last step


def eval_due(step: int) -> bool:
    """Evaluate often enough that the first step below target is exact to ~2%."""
    if step <= DENSE_EVAL_STEPS:
        return True
    return step % max(1, int(step * EVAL_RESOLUTION)) == 0


@torch.no_grad()
def eval_loss(model: nn.Module, task: Task, *, device: str = "cpu", chunk: int = 8192) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    n = task.eval_inputs.shape[0]
    for start in range(0, n, chunk):
        x = task.eval_inputs[start : start + chunk].to(device)
        y = task.eval_targets[start : start + chunk].to(device)
        total += float(task.loss(model(x), y).double().sum())
    model.train(was_training)
    return total / n


def init_model(task: Task, seed: int, device: str = "cpu") -> nn.Module:
    """The same initial weights for a seed, whatever the batch size."""
    torch.manual_seed(seed)
    return task.build_model().to(device).train()


def batches(n: int, batch_size: int, seed: int):
    """Endless index batches: a fresh permutation per epoch, remainder carried over."""
    gen = torch.Generator().manual_seed(seed + 7919)
    carry = torch.empty(0, dtype=torch.long)
    while True:
        pool = torch.cat([carry, torch.randperm(n, generator=gen)])
        full = (len(pool) // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield pool[start : start + batch_size]
        carry = pool[full:]


def train(
    task: Task,
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    device: str = "cpu",
    on_step: Callable[[int, nn.Module], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train from `init_model(task, seed)` (or the given model) with plain SGD.

    on_step(step, model) is called after step 0 (the initial weights) and after
    every SGD step; stop_after ends the run after that many steps regardless.
    """
    if model is None:
        model = init_model(task, config.seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    x_all, y_all = task.train_inputs.to(device), task.train_targets.to(device)
    max_steps = max(1, config.budget_examples // config.batch_size)
    if stop_after is not None:
        max_steps = min(max_steps, stop_after)
    curve = _Curve(eval_loss(model, task, device=device), config.target_loss)
    if on_step is not None:
        on_step(0, model)
    if curve.steps_to_target is not None:  # the initial weights already reach the target
        max_steps = 0
    step = 0
    data = batches(x_all.shape[0], config.batch_size, config.seed)
    while step < max_steps:
        idx = next(data)
        step += 1
        for p in params:
            p.grad = None
        loss = task.loss(model(x_all[idx]), y_all[idx]).mean()
        if not torch.isfinite(loss):
            curve.add(step, math.inf)
            break
        loss.backward()
        _sgd_step(params, config.lr)
        if on_step is not None:
            on_step(step, model)
        if (eval_due(step) or step == max_steps) and curve.add(step, eval_loss(model, task, device=device)):
            break
    return curve.result(step, _update_ratios(model, config.lr))


class _Curve:
    """The eval curve of one run, and whether it has reached its target or diverged."""

    def __init__(self, first: float, target: float | None) -> None:
        self.first, self.target = first, target
        self.steps, self.losses = [0], [first]
        self.diverged = False
        self.steps_to_target = 0 if target is not None and first <= target else None

    def add(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when the run should stop (diverged, or the target reached)."""
        self.steps.append(step)
        self.losses.append(loss)
        if not math.isfinite(loss) or loss > DIVERGE_FACTOR * max(self.first, 1e-12):
            self.diverged = True
            return True
        if self.steps_to_target is None and self.target is not None and loss <= self.target:
            self.steps_to_target = step
            return True
        return False

    def result(self, steps: int, update_ratios: dict[str, float]) -> TrainResult:
        status = DIVERGED if self.diverged else REACHED if self.steps_to_target is not None else BUDGET
        return TrainResult(
            status=status,
            steps=steps,
            steps_to_target=self.steps_to_target,
            initial_eval_loss=self.first,
            final_eval_loss=self.losses[-1],
            curve_steps=tuple(self.steps),
            curve_losses=tuple(self.losses),
            update_ratios=update_ratios,
        )


@torch.no_grad()
def _sgd_step(params: list[torch.Tensor], lr: float) -> None:
    """w -= lr * grad. The same update as torch.optim.SGD without momentum, minus
    ~0.2 ms of per-step bookkeeping that dominates small-batch trials."""
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-lr)


def _update_ratios(model: nn.Module, lr: float) -> dict[str, float]:
    """||lr * grad|| / ||w|| per parameter from the last step's gradient: the lr sanity check."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        w = float(p.detach().norm())
        out[name] = float(lr * p.grad.detach().norm()) / w if w > 0 else math.inf
    return out
