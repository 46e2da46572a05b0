"""One training run: an optimizer (plain SGD by default) at a constant lr towards an eval-loss target
within a budget.

Used by predict's reference run and by every trial of the empirical sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gns_sweep.optim import ADAM, ADAMW, LARS, MOMENTUM, OptimizerSpec, build
from gns_sweep.tasks import Task

REACHED = "reached"
BUDGET = "budget"
DIVERGED = "diverged"
FAILED = "failed"  # a sweep trial whose own code raised: recorded with its error, never measured

EVAL_RESOLUTION = 0.02  # the step of first reaching the target is known to within 2%
DENSE_EVAL_STEPS = 50  # evaluate every step up to here (2% of 50 is one step)
DIVERGE_FACTOR = 10.0  # eval loss above this multiple of the initial loss counts as divergence
MATCH_STEPS = 100  # steps of the two short runs that match another family's lr to the task's (`reference_lr`)
# The lr each family's short run takes (a usual small value; the matched lr scales it).
MATCH_START = {"heavy-ball": 0.1, "adam": 1e-3, "lars": 1.0}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run."""

    batch_size: int  # examples per step
    lr: float  # constant learning rate
    budget_examples: int  # stop after this many training examples
    target_loss: float | None  # stop when the eval loss first reaches this (None: run the budget)
    seed: int  # seeds the initial weights and the data order
    optimizer: OptimizerSpec = OptimizerSpec()  # plain SGD unless said otherwise


@dataclass(frozen=True)
class TrainResult:
    """What one run did. Curves hold every eval point."""

    status: str  # REACHED, BUDGET or DIVERGED
    steps: int  # optimizer steps taken
    steps_to_target: int | None  # first evaluated step with eval loss <= target
    initial_eval_loss: float  # eval loss of the initial weights
    final_eval_loss: float  # eval loss at the last evaluated step
    curve_steps: tuple[int, ...]  # steps at which the eval loss was measured
    curve_losses: tuple[float, ...]  # the eval losses there
    update_ratios: dict[str, float]  # per parameter: ||update|| / ||weight|| at the last step (Stepper.update_sq)


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
    on_step: Callable[[int, nn.Module, Stepper], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train from `init_model(task, seed)` (or the given model) with config.optimizer.

    on_step(step, model, stepper) is called after step 0 (the initial weights) and after
    every optimizer step; stop_after ends the run after that many steps regardless.
    """
    if model is None:
        model = init_model(task, config.seed, device)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    stepper = Stepper(config.optimizer, named, config.lr)
    x_all, y_all = task.train_inputs.to(device), task.train_targets.to(device)
    max_steps = max(1, config.budget_examples // config.batch_size)
    if stop_after is not None:
        max_steps = min(max_steps, stop_after)
    curve = _Curve(eval_loss(model, task, device=device), config.target_loss)
    if on_step is not None:
        on_step(0, model, stepper)
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
            stepper.measured = False  # this step took none: no last update (plain SGD: no gradient)
            break
        loss.backward()
        # A run stops only after an evaluation: the last step's update is needed there (and at every step a
        # caller watches), so the weights before a step are kept only then.
        stepper.step(measure=on_step is not None or eval_due(step) or step == max_steps)
        if on_step is not None:
            on_step(step, model, stepper)
        if (eval_due(step) or step == max_steps) and curve.add(step, eval_loss(model, task, device=device)):
            break
    return curve.result(step, stepper.update_ratios())


class Stepper:
    """The optimizer as a run applies it, and the size of the last update it made.

    Plain SGD takes the bare in-place update `_sgd_step` (no torch optimizer); its update is lr * grad,
    read off the gradient. Any other optimizer is torch's (gns_sweep.optim.build), and its update is
    measured: the weights before a step are kept (when asked: `measure`), so its update is w_after - w_before.
    """

    def __init__(self, spec: OptimizerSpec, named: list[tuple[str, nn.Parameter]], lr: float) -> None:
        self.spec, self.lr = spec, lr
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = None if spec.plain else build(spec, self.params, lr)  # None: the fast SGD path
        self.before = None if spec.plain else [torch.empty_like(p) for p in self.params]  # weights before a step
        self.steps = 0
        self.measured = False  # the weights before the last step were kept

    def step(self, *, measure: bool = True) -> None:
        """One update; measure: keep the weights from before it, so that its size can be read (not needed
        for plain SGD)."""
        if self.optimizer is None:
            _sgd_step(self.params, self.lr)
        else:
            if measure:
                with torch.no_grad():
                    for b, p in zip(self.before, self.params, strict=True):
                        b.copy_(p)
            self.optimizer.step()
        self.steps += 1
        self.measured = measure

    @torch.no_grad()
    def update_sq(self) -> dict[str, float]:
        """||update||^2 per trainable parameter of the last step; empty before the first, and for an
        optimizer other than plain SGD when that step was not measured.

        The update is lr * grad for plain SGD, w_after - w_before for any other optimizer (a parameter
        without a gradient counts 0 for plain SGD)."""
        if self.steps == 0 or (self.optimizer is not None and not self.measured):
            return {}
        if self.optimizer is None:
            return {
                n: float((self.lr * p.grad).square().sum()) if p.grad is not None else 0.0
                for n, p in zip(self.names, self.params, strict=True)
            }
        return {n: float((p - b).square().sum()) for n, p, b in zip(self.names, self.params, self.before, strict=True)}

    @torch.no_grad()
    def update_ratios(self) -> dict[str, float]:
        """||update|| / ||w|| per parameter at the last step (w after it): the lr sanity check. Plain SGD
        leaves out the parameters without a gradient, as they had no update."""
        out = {}
        measured = self.update_sq() if self.optimizer is not None else {}
        for name, p in zip(self.names, self.params, strict=True):
            if self.optimizer is None:
                if p.grad is None:
                    continue
                step = float(self.lr * p.grad.detach().norm())
            elif name in measured:
                step = math.sqrt(measured[name])
            else:
                continue  # no step yet
            w = float(p.detach().norm())
            out[name] = step / w if w > 0 else math.inf
        return out


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


@dataclass(frozen=True)
class ReferenceLr:
    """The learning rate of an optimizer at the task's own batch size, and where it comes from."""

    lr: float
    reason: str  # one line for the user


def family(spec: OptimizerSpec) -> str:
    """Optimizers whose learning rates are on the same scale: heavy-ball (SGD is momentum 0), adam, lars."""
    return {ADAM: "adam", ADAMW: "adam", LARS: "lars"}.get(spec.name, "heavy-ball")


def heavy_ball(spec: OptimizerSpec) -> float:
    """The heavy-ball coefficient: 0 for SGD."""
    return spec.momentum if spec.name == MOMENTUM else 0.0


def reference_lr(task: Task, optimizer: OptimizerSpec) -> ReferenceLr:
    """The lr of `optimizer` at task.batch_size: predict's reference run trains at it, the sweep's lr grid is
    centred on it there.

    task.lr is for the task's own optimizer (plain SGD unless it names one). The same family takes it
    as it is, except that heavy-ball momentum m keeps the effective lr lr/(1 - m) (SGD: m = 0), the lr at
    which its path follows SGD's. Another family's lr is on another scale: it is matched to the task's by
    the update:data ratio (median over the first MATCH_STEPS steps): a run at MATCH_START's lr is rescaled
    so that its steps move the weights by as much, relative to their size, as the task's optimizer's at
    task.lr. A heuristic that puts the sweep's grid on the right scale (docs/optimizers.md)."""
    own = task.optimizer or OptimizerSpec()
    if family(own) == family(optimizer):
        if family(optimizer) != "heavy-ball" or heavy_ball(own) == heavy_ball(optimizer):
            return ReferenceLr(task.lr, f"the task's lr for {own.name}")
        lr = task.lr * (1 - heavy_ball(optimizer)) / (1 - heavy_ball(own))
        return ReferenceLr(
            _round(lr), f"the task's {own.name} lr {task.lr:g} at the same effective lr, lr / (1 - momentum)"
        )
    steps = min(MATCH_STEPS, max(1, task.budget_examples // task.batch_size))
    wanted = update_ratio(task, own, task.lr, steps=steps)
    lr = MATCH_START[family(optimizer)]
    got = update_ratio(task, optimizer, lr, steps=steps)
    while not math.isfinite(got) and lr > 1e-12:  # diverged: come down until it does not
        lr /= 16
        got = update_ratio(task, optimizer, lr, steps=steps)
    if math.isfinite(wanted) and wanted > 0 and math.isfinite(got) and got > 0:
        lr *= wanted / got  # one rescaling: the ratio grows slower than the lr, so more rounds overshoot
    return ReferenceLr(
        _round(lr),
        f"matched to the task's {own.name} lr {task.lr:g} at batch {task.batch_size} by the update:data ratio, "
        f"{wanted:.2g} per step",
    )


def update_ratio(task: Task, optimizer: OptimizerSpec, lr: float, *, steps: int) -> float:
    """Median over the first `steps` steps at task.batch_size of ||update|| / ||w|| (all trainable
    parameters together); inf if the run diverges."""
    ratios: list[float] = []

    def record(step: int, model: nn.Module, stepper: Stepper) -> None:
        if step > 0:
            w = sum(float(p.detach().square().sum()) for p in stepper.params)
            ratios.append(math.sqrt(sum(stepper.update_sq().values()) / w) if w > 0 else math.inf)

    cfg = TrainConfig(task.batch_size, lr, steps * task.batch_size, None, seed=0, optimizer=optimizer)
    if train(task, cfg, on_step=record, stop_after=steps).status == DIVERGED or not ratios:
        return math.inf
    ratios.sort()
    return ratios[len(ratios) // 2]


def _round(x: float) -> float:
    return float(f"{x:.6g}")
