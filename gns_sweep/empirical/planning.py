"""The sweep's plan: batch sizes, an lr grid per batch size (capped by a stability probe), a target."""

from __future__ import annotations

import math

from gns_sweep.empirical.config import EmpiricalConfig, Plan, TrialSpec, trial_id
from gns_sweep.tasks import Task
from gns_sweep.train import TrainConfig, train

LR_POINTS = 5  # default lr grid: this many points ...
LR_FACTOR = 2.0  # ... a factor this apart
STABILITY_STEPS = 30  # steps of the stability probe at the largest batch size
PILOT_FRACTION = 0.9  # a pilot-chosen target is this far from the initial to the pilot's best loss


def stable_lr(task: Task, batch_size: int, *, start: float, steps: int = STABILITY_STEPS) -> float:
    """Largest lr on a factor-2 ladder from `start` whose short run at batch_size ends below its initial loss.

    Linear lr scaling stops working past the curvature's stability limit; the
    default grid is capped below this so large batch sizes are not all diverged.
    """

    def stable(lr: float) -> bool:
        r = train(task, TrainConfig(batch_size, lr, steps * batch_size, None, seed=0), stop_after=steps)
        return r.status != "diverged" and r.final_eval_loss < r.initial_eval_loss

    lr = start
    if stable(lr):
        while lr < start * 2**20 and stable(lr * 2):
            lr *= 2
        return lr
    while lr > start * 2**-20:
        lr /= 2
        if stable(lr):
            return lr
    return lr


def lr_grid(task: Task, batch_size: int, config: EmpiricalConfig, cap: float | None) -> tuple[float, ...]:
    """The task's lr scaled linearly with batch size (capped), times factor-2 multipliers."""
    if config.lrs is not None:
        return tuple(sorted(set(config.lrs)))
    centre = task.lr * batch_size / task.batch_size
    if cap is not None:
        centre = min(centre, cap)
    mults = config.lr_multipliers or tuple(LR_FACTOR**k for k in range(-(LR_POINTS // 2), LR_POINTS - LR_POINTS // 2))
    return tuple(sorted({float(f"{centre * m:.6g}") for m in mults}))


def pilot_target(task: Task, batch_size: int, lr: float, budget: int) -> float:
    """A target most batch sizes can reach: PILOT_FRACTION of the way to the pilot's best loss."""
    r = train(task, TrainConfig(batch_size, lr, budget, None, seed=0))
    finite = [x for x in r.curve_losses if math.isfinite(x)]
    best = min(finite)
    return float(f"{r.initial_eval_loss - PILOT_FRACTION * (r.initial_eval_loss - best):.6g}")


def make_plan(config: EmpiricalConfig, task: Task) -> Plan:
    """Resolve defaults (a stability probe for the lr cap, a pilot for a missing target)."""
    sizes = tuple(sorted(set(task.batch_sizes if config.batch_sizes is None else config.batch_sizes)))
    budget = task.budget_examples if config.budget_examples is None else config.budget_examples
    cap = None
    if config.lrs is None:
        # Half the largest stable lr: the grid then reaches one step past it.
        cap = stable_lr(task, max(sizes), start=task.lr) / 2
    grids = tuple(lr_grid(task, b, config, cap) for b in sizes)
    if config.target_loss is not None:
        target, source = float(config.target_loss), "--target-loss"
    elif task.target_loss is not None:
        target, source = float(task.target_loss), "task"
    else:
        mid = sizes[len(sizes) // 2]
        grid = grids[len(sizes) // 2]
        target, source = pilot_target(task, mid, grid[len(grid) // 2], budget), "pilot"
    seeds = tuple(range(config.seeds))
    trials = tuple(
        TrialSpec(trial_id(b, lr, s), b, lr, s)
        for b, grid in zip(sizes, grids, strict=True)
        for lr in grid
        for s in seeds
    )
    return Plan(task.name, sizes, grids, seeds, budget, target, source, cap, trials)
