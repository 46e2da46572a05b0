"""Everything the sweep can check before any training, any Ray task or any file."""

from __future__ import annotations

import math

from gns_sweep.empirical.config import SCHEDULES, EmpiricalConfig
from gns_sweep.errors import UsageError
from gns_sweep.monitor import MICRO_BATCH
from gns_sweep.optim import OptimizerSpec
from gns_sweep.per_example import coupled_layers
from gns_sweep.schedule import ScheduleConfig, smallest_batch
from gns_sweep.tasks import Task, check_trainable
from gns_sweep.train import init_model


def validate(config: EmpiricalConfig, task: Task) -> None:
    """Every check that needs no training, before any file is made."""
    if config.optimizer is not None and not isinstance(config.optimizer, OptimizerSpec):
        raise UsageError(f"optimizer must be a gns_sweep.optim.OptimizerSpec, got {type(config.optimizer).__name__}")
    sizes = task.batch_sizes if config.batch_sizes is None else config.batch_sizes
    if not sizes:
        raise UsageError("--batch-sizes is empty; give at least one, e.g. --batch-sizes 8,64,512")
    bad = [b for b in sizes if b < 1]
    if bad:
        raise UsageError(f"--batch-sizes contains {bad[0]}; batch sizes must be positive integers")
    if max(sizes) > task.n_train:
        raise UsageError(
            f"--batch-sizes contains {max(sizes)}, more than the {task.n_train} training examples of task "
            f"'{task.name}'; use batch sizes up to {task.n_train}"
        )
    for name, values in (("--lrs", config.lrs), ("--lrs multiplier", config.lr_multipliers)):
        if values is not None:
            if not values:
                raise UsageError(f"{name} is empty; give at least one learning rate, e.g. --lrs 0.05,0.1,0.2")
            bad_lr = [x for x in values if not (x > 0 and math.isfinite(x))]
            if bad_lr:
                raise UsageError(f"{name} contains {bad_lr[0]:g}; learning rates must be finite and > 0")
    if config.lrs is not None and config.lr_multipliers is not None:
        raise UsageError("give --lrs as values or as multipliers (x0.5,x1,x2), not both")
    if config.seeds < 1:
        raise UsageError(f"--seeds {config.seeds}: need at least 1 seed")
    budget = task.budget_examples if config.budget_examples is None else config.budget_examples
    if budget < max(sizes):
        raise UsageError(
            f"--budget-examples {budget} is smaller than the largest batch size {max(sizes)}, so those trials "
            f"could not take one step; raise --budget-examples to at least {max(sizes)} or drop the large batch sizes"
        )
    if config.target_loss is not None and not math.isfinite(config.target_loss):
        raise UsageError(f"--target-loss {config.target_loss}: give a finite eval loss")
    if not (math.isfinite(config.cpus_per_trial) and config.cpus_per_trial > 0):
        raise UsageError(f"--cpus-per-trial {config.cpus_per_trial:g} must be a number > 0")
    if not (math.isfinite(config.gpus_per_trial) and config.gpus_per_trial >= 0):
        raise UsageError(f"--gpus-per-trial {config.gpus_per_trial:g} must be a number >= 0 (0: CPU only)")
    if config.max_retries < 0:
        raise UsageError(f"--max-retries {config.max_retries}: must be >= 0 (0: a trial whose worker dies fails)")
    if config.schedule not in SCHEDULES:
        raise UsageError(f"--schedule {config.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(config.schedule_k) and config.schedule_k > 0):
        raise UsageError(f"--schedule-k {config.schedule_k:g} must be a finite number > 0, e.g. 1")
    if config.schedule != SCHEDULES[0] and max(sizes) < 2:
        raise UsageError(
            f"--schedule {config.schedule} needs a largest batch size of at least 2 (the noise scale's variance needs "
            "two examples per step); add a larger batch size to --batch-sizes"
        )
    model = init_model(task, seed=0)
    check_trainable(task, model)  # before the plan's stability probe trains it
    coupled = coupled_layers(model)
    least = smallest_batch(MICRO_BATCH, ScheduleConfig.micro_batches, coupled=True)
    if config.schedule != SCHEDULES[0] and coupled and max(sizes) < least:
        name, cls = coupled[0]
        raise UsageError(
            f"--schedule {config.schedule} measures task '{task.name}', whose layer '{name}' ({cls.__name__}) couples "
            f"the examples of a batch, with {ScheduleConfig.micro_batches} micro-batches of at least 2 examples; "
            f"add a batch size of at least {least} to --batch-sizes"
        )
