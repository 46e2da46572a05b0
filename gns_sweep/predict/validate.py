"""Everything predict can check before any training, any Ray task or any file."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.optim import OptimizerSpec
from gns_sweep.per_example import coupled_layers, param_layout
from gns_sweep.per_example.base import check_losses
from gns_sweep.predict.config import (
    AUTO,
    DEFAULT_PROBE,
    ESTIMATORS,
    MICRO_BATCH,
    PER_EXAMPLE,
    PER_EXAMPLE_ENGINES,
    PredictConfig,
    sample_size,
)
from gns_sweep.predict.shards import largest_block
from gns_sweep.tasks import Task, check_trainable
from gns_sweep.train import init_model


def validate(config: PredictConfig, task: Task) -> PredictConfig:
    """The config with the estimator resolved and defaults that depend on the task filled in (the
    optimizer: the task's, plain SGD if it names none); UsageError on bad input."""
    if config.optimizer is not None and not isinstance(config.optimizer, OptimizerSpec):
        raise UsageError(f"optimizer must be a gns_sweep.optim.OptimizerSpec, got {type(config.optimizer).__name__}")
    config = replace(config, optimizer=config.optimizer or task.optimizer or OptimizerSpec())
    model = init_model(task, config.seed)  # on the CPU, as the reference run makes it
    check_trainable(task, model)
    config = _estimator(config, model)
    if config.probe_size is None:
        b = sample_size(config)
        config = replace(config, probe_size=max(b, min(DEFAULT_PROBE, task.n_train) // b * b))
    _check_probe(config, task)
    _check_run(config, task)
    _check_resources(config)
    _check_model(config, task, model)
    return config


def _estimator(config: PredictConfig, model: nn.Module) -> PredictConfig:
    """Resolve --estimator auto: micro-batches where a layer couples the examples of a batch."""
    if config.estimator not in ESTIMATORS:
        raise UsageError(f"unknown --estimator '{config.estimator}'; choose one of: {', '.join(ESTIMATORS)}")
    if config.engine not in PER_EXAMPLE_ENGINES:
        hint = "; for micro-batches use --estimator micro-batch" if config.engine == MICRO_BATCH else ""
        raise UsageError(f"unknown --engine '{config.engine}'; choose one of: {', '.join(PER_EXAMPLE_ENGINES)}{hint}")
    if isinstance(config.micro_batch, bool) or config.micro_batch < 2:
        raise UsageError(f"--micro-batch {config.micro_batch}: a micro-batch needs at least 2 examples")
    coupled = coupled_layers(model.train())  # predict measures in train mode
    if config.estimator == AUTO:
        return replace(config, estimator=MICRO_BATCH if coupled else PER_EXAMPLE)
    if config.estimator == PER_EXAMPLE and coupled:
        name, cls = coupled[0]
        raise UsageError(
            f"--estimator per-example: layer '{name}' ({cls.__name__}) couples the examples of a batch, so "
            "per-example gradients are undefined; use --estimator micro-batch (or auto)"
        )
    return config


def _check_probe(config: PredictConfig, task: Task) -> None:
    """The probe is counted in samples: examples, or micro-batches of b examples."""
    b = sample_size(config)
    what = "examples" if b == 1 else f"micro-batches of {b}"
    if task.n_train < 2 * b:
        raise UsageError(f"task '{task.name}' has {task.n_train} training examples; predict needs at least {2 * b}")
    if config.probe_size % b:
        lo, hi = max(b, config.probe_size // b * b), config.probe_size // b * b + b
        raise UsageError(f"--probe-size {config.probe_size} is not a multiple of --micro-batch {b}; use {lo} or {hi}")
    n = config.probe_size // b  # samples
    if n < 2:
        raise UsageError(f"--probe-size {config.probe_size}: need at least 2 {what} to estimate a variance")
    if config.probe_size > task.n_train:
        raise UsageError(
            f"--probe-size {config.probe_size} exceeds the {task.n_train} training examples of task "
            f"'{task.name}'; use at most {task.n_train}"
        )
    if config.shards < 1:
        raise UsageError(f"--shards {config.shards}: need at least 1 shard")
    if config.shards > n:
        raise UsageError(f"--shards {config.shards} is more than the {n} probe {what}; use at most {n} shards")
    if config.blocks < 2:
        raise UsageError(f"--blocks {config.blocks}: the jackknife needs at least 2 blocks")
    if n - largest_block(n, config.blocks) < 2:
        need = next(  # 2 * blocks always works: blocks of 2
            p for p in range(n, 2 * config.blocks + 1) if p - largest_block(p, config.blocks) >= 2
        )
        raise UsageError(
            f"--probe-size {config.probe_size} in --blocks {config.blocks}: leaving one block out (the jackknife) "
            f"leaves fewer than 2 {what}; use --probe-size {need * b} or more"
        )
    if config.max_batch < b:
        raise UsageError(f"--max-batch {config.max_batch} must be >= {b} (one sample)")


def _check_run(config: PredictConfig, task: Task) -> None:
    if config.warmup_steps < 0:
        raise UsageError(f"--warmup-steps {config.warmup_steps} must be >= 0")
    budget_steps = max(1, task.budget_examples // task.batch_size)  # where the reference run stops at the latest
    if config.warmup_steps >= budget_steps:
        raise UsageError(
            f"--warmup-steps {config.warmup_steps} is past the end of the reference run (task '{task.name}': "
            f"{budget_steps} steps of batch {task.batch_size} in its budget); use fewer than {budget_steps}"
        )
    if config.checkpoints < 1:
        raise UsageError(f"--checkpoints {config.checkpoints} must be >= 1")


def _check_resources(config: PredictConfig) -> None:
    if not (math.isfinite(config.cpus_per_shard) and config.cpus_per_shard > 0):
        raise UsageError(f"--cpus-per-shard {config.cpus_per_shard}: must be a number > 0")
    if not (math.isfinite(config.gpus_per_shard) and config.gpus_per_shard >= 0):
        raise UsageError(f"--gpus-per-shard {config.gpus_per_shard}: must be a number >= 0 (0: CPU only)")
    if config.max_retries < 0:
        raise UsageError(f"--max-retries {config.max_retries}: must be >= 0 (0: a shard whose worker dies fails)")


def _check_model(config: PredictConfig, task: Task, model: nn.Module) -> None:
    """What the shards would refuse after the whole reference run, found now on two examples:
    a loss that does not return one value per example, an unknown layer."""
    model.eval()  # two examples through a coupling layer in train mode may not even run
    n = min(2, task.n_train)
    with torch.no_grad():
        check_losses(task.loss(model(task.train_inputs[:n].cpu()), task.train_targets[:n].cpu()), n)
    if config.layer is not None:
        layers = param_layout(model).layers()
        if config.layer not in layers:
            raise UsageError(f"unknown --layer '{config.layer}'; layers with trainable parameters: {', '.join(layers)}")
