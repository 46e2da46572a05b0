"""The sweep's plan: the optimizer, batch sizes, an lr grid per batch size (capped by a stability probe), a
target."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gns_sweep.empirical.config import GNS, EmpiricalConfig, Plan, ScheduleSpec, TrialSpec, schedule_trial_id, trial_id
from gns_sweep.monitor import PER_EXAMPLE
from gns_sweep.optim import SQRT, OptimizerSpec
from gns_sweep.schedule import ScheduleConfig, estimator_for, smallest_batch
from gns_sweep.tasks import Task
from gns_sweep.train import DIVERGED, TrainConfig, init_model, reference_lr, train

LR_POINTS = 5  # default lr grid: this many points ...
LR_FACTOR = 2.0  # ... a factor this apart
STABILITY_STEPS = 30  # steps of the stability probe at the largest batch size
PILOT_FRACTION = 0.9  # a pilot-chosen target is this far from the initial to the pilot's best loss ...
PILOT_HARDEST = 0.98  # ... or, tightened so the largest batch needs tens of steps, at most this far
PILOT_MIN_STEPS = 40  # steps the largest batch needs at its centre lr for a pilot-chosen target (its best lr: ~half)


@dataclass(frozen=True)
class Target:
    """The sweep's target loss and why it is that."""

    loss: float
    source: str  # "task", "--target-loss" or "pilot"
    reason: str  # one line for the user


def stable_lr(
    task: Task,
    batch_size: int,
    *,
    start: float,
    optimizer: OptimizerSpec = OptimizerSpec(),
    steps: int = STABILITY_STEPS,
) -> float:
    """Largest lr on a factor-2 ladder from `start` whose short run at batch_size, with this optimizer, ends
    below its initial loss.

    Scaling the lr with the batch size stops working past the curvature's stability limit;
    the default grid is capped below this so large batch sizes are not all diverged.
    """

    def stable(lr: float) -> bool:
        cfg = TrainConfig(batch_size, lr, steps * batch_size, None, seed=0, optimizer=optimizer)
        r = train(task, cfg, stop_after=steps)
        return r.status != DIVERGED and r.final_eval_loss < r.initial_eval_loss

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


def lr_grid(
    task: Task,
    batch_size: int,
    config: EmpiricalConfig,
    cap: float | None,
    *,
    optimizer: OptimizerSpec = OptimizerSpec(),
    base_lr: float | None = None,
) -> tuple[float, ...]:
    """The lr at the task's batch size (base_lr; None: the task's) scaled with the batch size as the optimizer's
    rule says, linearly or with the square root (capped), times factor-2 multipliers."""
    if config.lrs is not None:
        return tuple(sorted(set(config.lrs)))
    centre = centre_lr(task.lr if base_lr is None else base_lr, batch_size, task.batch_size, optimizer)
    if cap is not None:
        centre = min(centre, cap)
    mults = config.lr_multipliers or tuple(LR_FACTOR**k for k in range(-(LR_POINTS // 2), LR_POINTS - LR_POINTS // 2))
    return tuple(sorted({float(f"{centre * m:.6g}") for m in mults}))


def centre_lr(base: float, batch_size: int, reference: int, optimizer: OptimizerSpec) -> float:
    """The lr at batch_size, from `base` at batch size `reference`, by the optimizer's rule: linear in the
    batch size (SGD, momentum, LARS) or in its square root (Adam, AdamW: their step is normalized by the
    gradient's scale, and the noise of a mean over B examples falls as 1/sqrt(B); docs/optimizers.md)."""
    if optimizer.lr_scaling == SQRT:
        return base * math.sqrt(batch_size / reference)
    return base * batch_size / reference


def pilot_target(
    task: Task,
    sizes: tuple[int, ...],
    grids: tuple[tuple[float, ...], ...],
    budget: int,
    *,
    optimizer: OptimizerSpec = OptimizerSpec(),
) -> Target:
    """A target most batch sizes reach within the budget, yet the largest batch needs tens of steps for.

    A pilot at the middle batch size sets the easy end: PILOT_FRACTION of the way from the initial
    loss to its best. A pilot at the largest batch size checks that target is not reached within
    PILOT_MIN_STEPS steps; where it is, the target is tightened to what the large batch has not
    reached by then, so the measured frontier has a large-batch end (S_min of tens of steps)."""
    mid_lrs, big_lrs = grids[len(sizes) // 2], grids[-1]
    mid_size = sizes[len(sizes) // 2]
    mid = train(task, TrainConfig(mid_size, mid_lrs[len(mid_lrs) // 2], budget, None, seed=0, optimizer=optimizer))
    first, best = mid.initial_eval_loss, min(x for x in mid.curve_losses if math.isfinite(x))
    easy = first - PILOT_FRACTION * (first - best)
    big = train(task, TrainConfig(sizes[-1], big_lrs[len(big_lrs) // 2], budget, None, seed=0, optimizer=optimizer))
    early = [x for s, x in zip(big.curve_steps, big.curve_losses, strict=True) if s <= PILOT_MIN_STEPS]
    reached_early = min((x for x in early if math.isfinite(x)), default=math.inf)
    what = (
        f"{PILOT_FRACTION:.0%} of the way from the initial eval loss {first:.4g} to a batch-"
        f"{sizes[len(sizes) // 2]} pilot's best {best:.4g}"
    )
    if reached_early > easy:
        return Target(_round(easy), "pilot", f"{what}; batch {sizes[-1]} needs over {PILOT_MIN_STEPS} steps for it")
    hardest = first - PILOT_HARDEST * (first - best)  # still reached by most batch sizes within the budget
    tight = reached_early - 1e-3 * (first - best)
    if tight >= hardest:
        return Target(
            _round(tight),
            "pilot",
            f"tightened from {easy:.4g} ({what}) so that batch {sizes[-1]} needs over {PILOT_MIN_STEPS} steps",
        )
    return Target(
        _round(hardest),
        "pilot",
        f"{PILOT_HARDEST:.0%} of the way ({what}); batch {sizes[-1]} gets there within {PILOT_MIN_STEPS} steps: "
        "expect a small S_min (large batches barely need more than a step or two)",
    )


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def make_plan(config: EmpiricalConfig, task: Task) -> Plan:
    """Resolve defaults (the task's optimizer, its lr at the task's batch size, a stability probe for the lr
    cap, a pilot for a missing target)."""
    optimizer = config.optimizer or task.optimizer or OptimizerSpec()
    sizes = tuple(sorted(set(task.batch_sizes if config.batch_sizes is None else config.batch_sizes)))
    budget = task.budget_examples if config.budget_examples is None else config.budget_examples
    cap, base, lr_reason = None, None, "given with --lrs"
    if config.lrs is None:
        ref = reference_lr(task, optimizer)
        base, lr_reason = ref.lr, ref.reason
        # Half the largest stable lr: the grid then reaches one step past it.
        cap = stable_lr(task, max(sizes), start=base, optimizer=optimizer) / 2
    grids = tuple(lr_grid(task, b, config, cap, optimizer=optimizer, base_lr=base) for b in sizes)
    if config.target_loss is not None:
        target, source, reason = float(config.target_loss), "--target-loss", "given with --target-loss"
    elif task.target_loss is not None:
        target, source, reason = float(task.target_loss), "task", "the task's default"
    else:
        chosen = pilot_target(task, sizes, grids, budget, optimizer=optimizer)
        target, source, reason = chosen.loss, chosen.source, chosen.reason
    seeds = tuple(range(config.seeds))
    trials = tuple(
        TrialSpec(trial_id(b, lr, s), b, lr, s)
        for b, grid in zip(sizes, grids, strict=True)
        for lr in grid
        for s in seeds
    )
    if config.schedule == GNS:
        trials += schedule_trials(task, sizes, seeds, config, optimizer, base=base, cap=cap)
    return Plan(
        task.name,
        sizes,
        grids,
        seeds,
        budget,
        target,
        source,
        reason,
        cap,
        trials,
        optimizer=optimizer,
        reference_lr=base,
        lr_reason=lr_reason,
        schedule=config.schedule,
        schedule_k=config.schedule_k if config.schedule == GNS else None,
    )


def schedule_trials(
    task: Task,
    sizes: tuple[int, ...],
    seeds: tuple[int, ...],
    config: EmpiricalConfig,
    optimizer: OptimizerSpec,
    *,
    base: float | None,
    cap: float | None,
) -> tuple[TrialSpec, ...]:
    """One adaptive-batch trial per seed, between the grid's ends, at the lr the grid is centred on (the
    optimizer's lr at the task's batch size, scaled by its rule and capped where the grid's centre is); measured
    with micro-batches where the model couples examples (schedule.estimator_for)."""
    lr = reference_lr(task, optimizer).lr if base is None else base
    estimator = estimator_for(init_model(task, seed=0))
    least = smallest_batch(estimator, ScheduleConfig.micro_batches, coupled=estimator != PER_EXAMPLE)
    floor = max(least, min(sizes))  # validate made sure the grid reaches it
    spec = ScheduleSpec(
        base_batch=task.batch_size, floor=floor, ceiling=max(sizes), k=config.schedule_k, lr_max=cap,
        estimator=estimator,
    )  # fmt: skip
    return tuple(TrialSpec(schedule_trial_id(s), floor, lr, s, schedule=spec) for s in seeds)
