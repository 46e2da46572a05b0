"""A training run whose batch size follows the monitored noise scale.

The optimizer of train.py's runs (plain SGD unless the config names another,
applied by train.Stepper), from the seed's initial weights and in the seed's
data order (train.batches' permutations, taken however many examples a
step needs), with a GnsMonitor doing every step's backward (per-example norms,
or micro-batches of gradient accumulation: ScheduleConfig.estimator). Every `every`
steps (default: every step) the batch size becomes the power of two nearest k * B_noise, B_noise
being the monitor's smoothed B_simple of the whole model, clamped to
[floor, ceiling]; the lr follows the batch by the optimizer's rule (linear
for SGD and momentum: lr * B / base_batch; the square root of that ratio for
Adam and AdamW), up to lr_max. The monitor measures the plain gradient's noise
scale, whichever the optimizer. An unresolved estimate (smoothed
|G|^2 <= 0: the gradient is lost in the noise at the batch sizes measured)
says only that B_noise is at least about the current batch B, so it is taken
as 2B, one power of two up: with k = 1 the batch doubles. The run stops at
the eval-loss target, at divergence, or before a step that would pass the
budget of examples. It is evaluated on train.eval_due's schedule, and the
result keeps, per evaluated step, the batch size, the examples so far, the lr
and B_noise beside the eval loss, and per step its batch size and B_noise
(gns_sweep.schedule_model reads the run's path from them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.monitor import MICRO_BATCH, PER_EXAMPLE, GnsMonitor
from gns_sweep.optim import LINEAR, SQRT, OptimizerSpec
from gns_sweep.per_example import coupled_layers
from gns_sweep.tasks import Task
from gns_sweep.train import Stepper, _Curve, batches, eval_due, eval_loss, init_model

CONSTANT = "constant"  # the same lr at every batch size
LR_RULES = (LINEAR, SQRT, CONSTANT)  # lr proportional to the batch (SGD), to its square root (Adam), or fixed
ESTIMATORS = (PER_EXAMPLE, MICRO_BATCH)
# The monitor's EMA over about 1 / (1 - 0.8) = 5 steps, against its default of 20: B_noise grows over a run, and the
# built-in tasks reach their targets in 50-200 steps, where a 20-step window lags behind it (docs/schedule.md).
SCHEDULE_BETA = 0.8


@dataclass(frozen=True)
class ScheduleConfig:
    """Settings of one adaptive-batch run (`from_task` fills them from a task's defaults)."""

    lr: float  # the optimizer's lr at batch size base_batch
    base_batch: int  # the batch size `lr` is given for (B0 of the lr rule)
    floor: int  # smallest batch size, and the first one
    ceiling: int  # largest batch size
    budget_examples: int  # no step starts that would pass this many training examples
    target_loss: float | None  # stop when the eval loss first reaches this (None: run the budget)
    seed: int = 0  # seeds the initial weights and the data order, as train.py's runs
    k: float = 1.0  # the batch is the power of two nearest k * B_noise
    every: int = 1  # steps between batch-size decisions (the EMA already smooths: see SCHEDULE_BETA)
    lr_rule: str | None = None  # one of LR_RULES; None: the optimizer's (OptimizerSpec.lr_scaling)
    lr_max: float | None = None  # cap on the scaled lr (None: no cap)
    beta: float = SCHEDULE_BETA  # the monitor's EMA decay per step
    estimator: str = PER_EXAMPLE  # one of ESTIMATORS: the fast engine's per-example norms, or micro-batches
    micro_batches: int = 4  # micro-batches per step of the micro-batch estimator
    optimizer: OptimizerSpec = OptimizerSpec()  # plain SGD unless said otherwise

    @classmethod
    def from_task(cls, task: Task, **changes) -> ScheduleConfig:
        """The task's lr, optimizer, small batch, budget and target, between the ends of its sweep grid (the
        floor raised to the fewest examples the estimator can measure). task.lr is for the task's own optimizer:
        with another, give its lr too (train.reference_lr matches one)."""
        least = smallest_batch(changes.get("estimator", cls.estimator), changes.get("micro_batches", cls.micro_batches))
        base = cls(
            lr=task.lr,
            base_batch=task.batch_size,
            floor=max(least, min(task.batch_sizes)),
            ceiling=max(task.batch_sizes),
            budget_examples=task.budget_examples,
            target_loss=task.target_loss,
            optimizer=task.optimizer or OptimizerSpec(),
        )
        return replace(base, **changes)


@dataclass(frozen=True)
class Decision:
    """One batch-size decision, taken after `step`."""

    step: int  # steps taken when it was made
    b_noise: float  # the monitor's smoothed B_simple then (NaN: unresolved)
    batch_size: int  # the batch size of the steps that follow
    lr: float  # their lr


@dataclass(frozen=True)
class ScheduleResult:
    """What one adaptive run did. The curve_* tuples have one entry per evaluated step."""

    status: str  # train.REACHED, BUDGET or DIVERGED
    steps: int  # optimizer steps taken
    steps_to_target: int | None  # first evaluated step with eval loss <= target
    examples: int  # training examples used
    examples_to_target: int | None  # examples used up to steps_to_target
    wall_seconds: float  # the whole run, evaluations included
    initial_eval_loss: float  # eval loss of the initial weights
    final_eval_loss: float  # eval loss at the last evaluated step
    curve_steps: tuple[int, ...]  # evaluated steps (0: the initial weights)
    curve_losses: tuple[float, ...]  # their eval losses
    curve_batch_sizes: tuple[int, ...]  # the batch size of each evaluated step (step 0: the first batch's)
    curve_examples: tuple[int, ...]  # examples used up to each evaluated step
    curve_lrs: tuple[float, ...]  # the lr of each evaluated step (step 0: the first batch's)
    curve_b_noise: tuple[float, ...]  # the monitor's smoothed B_simple after each evaluated step (NaN at step 0)
    decisions: tuple[Decision, ...]  # every batch-size decision, in order
    step_batch_sizes: tuple[int, ...] = ()  # the batch size of every step taken (steps 1 .. steps)
    step_b_noise: tuple[float, ...] = ()  # the monitor's smoothed B_simple after every step (NaN: unresolved)


def smallest_batch(estimator: str, micro_batches: int, *, coupled: bool = False) -> int:
    """The fewest examples a step of the estimator measures: 2 per-example (a variance needs two samples); one
    per micro-batch, at least 2 of them; two per micro-batch where a layer couples the examples (BatchNorm in
    train mode cannot normalise one example)."""
    if estimator == PER_EXAMPLE:
        return 2
    return max(2, micro_batches) * (2 if coupled else 1)


def estimator_for(model: nn.Module) -> str:
    """The estimator a sweep's schedule trial measures with: per-example norms, or micro-batches of gradient
    accumulation for a model whose layers couple the examples of a batch (BatchNorm in train mode), which has no
    per-example gradients. With micro-batches such a layer normalises each micro-batch on its own."""
    return MICRO_BATCH if coupled_layers(model) else PER_EXAMPLE


def nearest_power_of_two(x: float) -> int:
    """2^round(log2 x): the nearest power of two on a log scale (1 for x <= 1)."""
    return 1 if x <= 1 else 2 ** round(math.log2(x))


def choose_batch(b_noise: float, current: int, config: ScheduleConfig) -> int:
    """The batch size after a decision: nearest power of two to k * B_noise, clamped to [floor, ceiling];
    unresolved (NaN) B_noise counts as twice the current batch (module docstring)."""
    want = nearest_power_of_two(config.k * (2 * current if math.isnan(b_noise) else b_noise))
    return max(config.floor, min(config.ceiling, want))


def lr_for(batch_size: int, config: ScheduleConfig) -> float:
    ratio = batch_size / config.base_batch
    rule = config.lr_rule or config.optimizer.lr_scaling
    lr = config.lr * (ratio if rule == LINEAR else math.sqrt(ratio) if rule == SQRT else 1.0)
    return lr if config.lr_max is None else min(lr, config.lr_max)


def check_config(config: ScheduleConfig) -> None:
    """One-line UsageErrors for settings no run can use."""

    def positive_int(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")

    for name in ("base_batch", "floor", "ceiling", "budget_examples", "every", "micro_batches"):
        positive_int(name, getattr(config, name))
    least = smallest_batch(config.estimator, config.micro_batches)
    if config.estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {config.estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if config.estimator == MICRO_BATCH and config.micro_batches < 2:
        raise UsageError(f"micro_batches must be >= 2 for the micro-batch estimator, got {config.micro_batches}")
    if config.floor < least:
        raise UsageError(
            f"floor {config.floor} is too small for the {config.estimator} estimator; give floor >= {least} "
            "(a variance needs two samples per step)"
        )
    if config.ceiling < config.floor:
        raise UsageError(f"ceiling {config.ceiling} is below floor {config.floor}; give ceiling >= floor")
    if config.budget_examples < config.floor:
        raise UsageError(f"budget_examples {config.budget_examples} is less than one step at the floor {config.floor}")
    for name in ("lr", "k"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{name} must be a finite number > 0, got {value!r}")
    if config.lr_max is not None and not (math.isfinite(config.lr_max) and config.lr_max > 0):
        raise UsageError(f"lr_max must be a finite number > 0 or None (no cap), got {config.lr_max!r}")
    if config.lr_rule is not None and config.lr_rule not in LR_RULES:
        raise UsageError(f"unknown lr_rule {config.lr_rule!r}; choose one of: {', '.join(LR_RULES)}")
    if not 0 <= config.beta < 1:
        raise UsageError(f"beta must be in [0, 1), got {config.beta!r}")
    if config.target_loss is not None and not math.isfinite(config.target_loss):
        raise UsageError(f"target_loss must be a finite number or None, got {config.target_loss!r}")


def run_schedule(task: Task, config: ScheduleConfig, *, device: str = "cpu") -> ScheduleResult:
    """Train from `init_model(task, seed)` with the batch size following the monitored noise scale."""
    check_config(config)
    start = time.perf_counter()
    model = init_model(task, config.seed, device)
    coupled = coupled_layers(model)
    least = smallest_batch(config.estimator, config.micro_batches, coupled=bool(coupled))
    if coupled and config.estimator == MICRO_BATCH and config.floor < least:
        name, cls = coupled[0]
        raise UsageError(
            f"floor {config.floor} makes micro-batches of fewer than 2 examples, which layer '{name}' "
            f"({cls.__name__}) cannot normalise; give floor >= {least} ({config.micro_batches} micro-batches of 2)"
        )
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    per_example = config.estimator == PER_EXAMPLE
    monitor = GnsMonitor(model, loss=task.loss if per_example else None, beta=config.beta)
    x_all, y_all = task.train_inputs.to(device), task.train_targets.to(device)
    order = _Order(x_all.shape[0], config.seed)
    batch, lr = config.floor, lr_for(config.floor, config)
    stepper = Stepper(config.optimizer, named, lr)
    curve = _Curve(eval_loss(model, task, device=device), config.target_loss)
    trajectory = _Trajectory(batch, lr)
    decisions: list[Decision] = []
    step_sizes: list[int] = []
    step_noise: list[float] = []
    step = examples = 0
    stop = curve.steps_to_target is not None  # the initial weights already reach the target
    while not stop and examples + batch <= config.budget_examples:
        idx = order.take(batch)
        step += 1
        examples += batch
        for p in params:
            p.grad = None
        if per_example:
            loss = monitor.forward_backward(x_all[idx], y_all[idx])
        else:
            loss = _accumulate(monitor, task, model, x_all[idx], y_all[idx], config.micro_batches)
        b_noise = monitor.b_simple()
        step_sizes.append(batch)
        step_noise.append(b_noise)
        if not torch.isfinite(loss):
            curve.add(step, math.inf)
            trajectory.add(batch, examples, lr, b_noise)
            break
        stepper.step()
        stepped_batch, stepped_lr = batch, lr
        if step % config.every == 0:
            batch = choose_batch(b_noise, batch, config)
            lr = lr_for(batch, config)
            _set_lr(stepper, lr)
            decisions.append(Decision(step, b_noise, batch, lr))
        last = examples + batch > config.budget_examples  # the next step would pass the budget
        if eval_due(step) or last:
            stop = curve.add(step, eval_loss(model, task, device=device))
            trajectory.add(stepped_batch, examples, stepped_lr, b_noise)
    r = curve.result(step, {})
    to_target = r.steps_to_target
    return ScheduleResult(
        status=r.status,
        steps=step,
        steps_to_target=to_target,
        examples=examples,
        examples_to_target=None if to_target is None else trajectory.examples[r.curve_steps.index(to_target)],
        wall_seconds=time.perf_counter() - start,
        initial_eval_loss=r.initial_eval_loss,
        final_eval_loss=r.final_eval_loss,
        curve_steps=r.curve_steps,
        curve_losses=r.curve_losses,
        curve_batch_sizes=tuple(trajectory.sizes),
        curve_examples=tuple(trajectory.examples),
        curve_lrs=tuple(trajectory.lrs),
        curve_b_noise=tuple(trajectory.b_noise),
        decisions=tuple(decisions),
        step_batch_sizes=tuple(step_sizes),
        step_b_noise=tuple(step_noise),
    )


def _accumulate(monitor: GnsMonitor, task: Task, model, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """One step's backward as k micro-batches of gradient accumulation: .grad ends as the batch's mean
    gradient. Returns the batch's mean loss."""
    n, total = x.shape[0], torch.zeros(())
    for xb, yb in zip(x.tensor_split(k), y.tensor_split(k), strict=True):
        loss = task.loss(model(xb), yb).mean()
        (loss * (xb.shape[0] / n)).backward()
        monitor.micro_batch(xb.shape[0])
        total = total + loss.detach() * (xb.shape[0] / n)
    monitor.update()
    return total


def _set_lr(stepper: Stepper, lr: float) -> None:
    """The lr of the steps to come: plain SGD reads stepper.lr, a torch optimizer its parameter groups."""
    stepper.lr = lr
    if stepper.optimizer is not None:
        for group in stepper.optimizer.param_groups:
            group["lr"] = lr


class _Trajectory:
    """Per evaluated step, beside train._Curve's losses: batch size, examples so far, lr, B_noise."""

    def __init__(self, batch: int, lr: float) -> None:
        self.sizes, self.examples, self.lrs, self.b_noise = [batch], [0], [lr], [math.nan]  # step 0

    def add(self, batch: int, examples: int, lr: float, b_noise: float) -> None:
        self.sizes.append(batch)
        self.examples.append(examples)
        self.lrs.append(lr)
        self.b_noise.append(b_noise)


class _Order:
    """The training examples in train.batches' order -- its permutations, one per epoch, back to back --
    taken any number at a time, so a run sees the same examples as the seed's fixed-batch runs."""

    def __init__(self, n: int, seed: int) -> None:
        self._epochs = batches(n, n, seed)  # batches of a whole epoch: each one permutation
        self._pool = torch.empty(0, dtype=torch.long)

    def take(self, b: int) -> torch.Tensor:
        while self._pool.shape[0] < b:
            self._pool = torch.cat([self._pool, next(self._epochs)])
        idx, self._pool = self._pool[:b], self._pool[b:]
        return idx
