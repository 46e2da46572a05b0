"""The sweep's settings and its resolved plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from gns_sweep import __version__
from gns_sweep.monitor import PER_EXAMPLE
from gns_sweep.optim import OptimizerSpec
from gns_sweep.runtime import DEFAULT_MAX_RETRIES

FIXED = "fixed"  # a trial at one batch size and lr throughout
GNS = "gns"  # a trial whose batch size follows the monitored noise scale (gns_sweep.schedule)
NONE = "none"  # --schedule none: fixed trials only
SCHEDULES = (NONE, GNS)  # what --schedule takes


@dataclass(frozen=True)
class EmpiricalConfig:
    """What the user asked for; `make_plan` resolves the defaults."""

    task: str  # built-in name or package.module:attr
    batch_sizes: tuple[int, ...] | None = None  # None: the task's grid
    lrs: tuple[float, ...] | None = None  # explicit lrs, the same at every batch size
    lr_multipliers: tuple[float, ...] | None = None  # multiples of each batch size's centre lr (None: x1/4 ... x4)
    seeds: int = 3  # seeds 0..seeds-1
    budget_examples: int | None = None  # None: the task's budget
    target_loss: float | None = None  # None: the task's target, or a pilot's
    cpus_per_trial: float = 1.0  # Ray CPUs per trial (and its torch threads)
    gpus_per_trial: float = 0.0  # Ray GPUs per trial (> 0: the trial trains on cuda)
    max_retries: int = DEFAULT_MAX_RETRIES  # re-runs of a trial whose worker process or node dies (not recorded)
    optimizer: OptimizerSpec | None = None  # every trial's; None: the task's (plain SGD if it names none)
    schedule: str = NONE  # one of SCHEDULES: GNS adds one adaptive-batch trial per seed
    schedule_k: float = 1.0  # the schedule's batch is the power of two nearest k * B_noise


@dataclass(frozen=True)
class ScheduleSpec:
    """What an adaptive-batch trial needs beyond its seed (gns_sweep.schedule.ScheduleConfig's settings)."""

    base_batch: int  # the batch size the trial's lr is given for (the task's)
    floor: int  # the grid's smallest batch size (at least 2: a variance needs two examples), the first one
    ceiling: int  # the grid's largest batch size
    k: float  # the batch is the power of two nearest k * B_noise
    lr_max: float | None  # the sweep's cap on the centre lr (None: no cap, as with --lrs)
    estimator: str = PER_EXAMPLE  # the monitor's: micro-batch for a model whose layers couple examples


@dataclass(frozen=True)
class TrialSpec:
    """One (batch size, lr, seed) of the plan, or one seed's adaptive-batch trial."""

    trial_id: str  # stable name, also the file name
    batch_size: int  # a schedule trial's first batch size (its floor)
    lr: float  # a schedule trial's lr at schedule.base_batch
    seed: int
    schedule: ScheduleSpec | None = None  # None: a fixed trial

    @property
    def kind(self) -> str:
        """trials.parquet's schedule column: FIXED or GNS."""
        return FIXED if self.schedule is None else GNS


@dataclass(frozen=True)
class Plan:
    """The resolved sweep: identical plans may resume each other."""

    task: str  # the task's name
    batch_sizes: tuple[int, ...]
    lrs: tuple[tuple[float, ...], ...]  # lr grid of each batch size, same order as batch_sizes
    seeds: tuple[int, ...]
    budget_examples: int  # training examples allowed per trial
    target_loss: float
    target_source: str  # "task", "--target-loss" or "pilot"
    target_reason: str  # why this target, for the user
    lr_cap: float | None  # centre lrs were capped here (half the largest stable lr); None: explicit lrs
    trials: tuple[TrialSpec, ...] = field(repr=False)
    optimizer: OptimizerSpec = OptimizerSpec()  # what every trial trains with
    reference_lr: float | None = None  # the grid's centre at the task's batch size, before the cap (None: --lrs)
    lr_reason: str = ""  # where reference_lr comes from (gns_sweep.train.reference_lr)
    schedule: str = NONE  # one of SCHEDULES; GNS: trials holds one schedule trial per seed, after the fixed ones
    schedule_k: float | None = None  # the schedule's k (None without a schedule)

    def key(self) -> dict:
        """What must match for --resume to continue a sweep."""
        return {
            "task": self.task,
            "optimizer": self.optimizer.name,
            "optimizer_settings": self.optimizer.key(),
            "batch_sizes": list(self.batch_sizes),
            "lrs": [list(g) for g in self.lrs],
            "seeds": list(self.seeds),
            "budget_examples": self.budget_examples,
            "target_loss": self.target_loss,
            "schedule": self.schedule,
            "schedule_k": self.schedule_k,
        }


def trial_id(batch_size: int, lr: float, seed: int) -> str:
    return f"b{batch_size}-lr{lr:.6g}-s{seed}"


def schedule_trial_id(seed: int) -> str:
    """A schedule trial's name: one per seed (its settings are the plan's, checked by --resume)."""
    return f"gns-s{seed}"


def settings(config: EmpiricalConfig, plan: Plan) -> dict:
    """What every sweep file records."""
    return {
        "command": "empirical",
        "version": __version__,
        **plan.key(),
        "target_source": plan.target_source,
        "lr_cap": plan.lr_cap,
        "lr_scaling": plan.optimizer.lr_scaling,
        "reference_lr": plan.reference_lr,
        "cpus_per_trial": config.cpus_per_trial,
        "gpus_per_trial": config.gpus_per_trial,
    }
