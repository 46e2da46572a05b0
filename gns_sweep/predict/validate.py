"""Everything predict can check before any training, any Ray task or any file."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from gns_sweep.errors import UsageError
from gns_sweep.per_example import ENGINES, param_layout
from gns_sweep.per_example.base import check_losses, refuse_coupled_layers
from gns_sweep.predict.config import DEFAULT_PROBE, PredictConfig
from gns_sweep.predict.shards import largest_block
from gns_sweep.tasks import Task, check_trainable
from gns_sweep.train import init_model


def validate(config: PredictConfig, task: Task) -> PredictConfig:
    """The config with defaults that depend on the task filled in; UsageError on bad input."""
    if config.probe_size is None:
        config = replace(config, probe_size=min(DEFAULT_PROBE, task.n_train))
    _check_probe(config, task)
    _check_run(config, task)
    _check_resources(config)
    _check_model(config, task)
    return config


def _check_probe(config: PredictConfig, task: Task) -> None:
    if task.n_train < 2:
        raise UsageError(f"task '{task.name}' has {task.n_train} training example; predict needs at least 2")
    if config.probe_size < 2:
        raise UsageError(f"--probe-size {config.probe_size}: need at least 2 examples to estimate a variance")
    if config.probe_size > task.n_train:
        raise UsageError(
            f"--probe-size {config.probe_size} exceeds the {task.n_train} training examples of task "
            f"'{task.name}'; use at most {task.n_train}"
        )
    if config.shards < 1:
        raise UsageError(f"--shards {config.shards}: need at least 1 shard")
    if config.shards > config.probe_size:
        raise UsageError(
            f"--shards {config.shards} is more than the {config.probe_size} probe examples; "
            f"use at most {config.probe_size} shards"
        )
    if config.blocks < 2:
        raise UsageError(f"--blocks {config.blocks}: the jackknife needs at least 2 blocks")
    if config.probe_size - largest_block(config.probe_size, config.blocks) < 2:
        need = next(  # 2 * blocks always works: blocks of 2
            p for p in range(config.probe_size, 2 * config.blocks + 1) if p - largest_block(p, config.blocks) >= 2
        )
        raise UsageError(
            f"--probe-size {config.probe_size} in --blocks {config.blocks}: leaving one block out (the jackknife) "
            f"leaves fewer than 2 examples; use --probe-size {need} or more"
        )
    if config.max_batch < 1:
        raise UsageError(f"--max-batch {config.max_batch} must be >= 1")
    if config.engine not in ENGINES:
        raise UsageError(f"unknown --engine '{config.engine}'; choose one of: {', '.join(ENGINES)}")


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


def _check_model(config: PredictConfig, task: Task) -> None:
    """What the shards would refuse after the whole reference run, found now on two examples:
    a model with nothing to train, a layer that couples examples, a loss that does not return one value
    per example, an unknown layer."""
    model = init_model(task, config.seed)  # on the CPU, as the reference run makes it
    check_trainable(task, model)
    refuse_coupled_layers(model)
    n = min(2, task.n_train)
    with torch.no_grad():
        check_losses(task.loss(model(task.train_inputs[:n].cpu()), task.train_targets[:n].cpu()), n)
    if config.layer is not None:
        layers = param_layout(model).layers()
        if config.layer not in layers:
            raise UsageError(f"unknown --layer '{config.layer}'; layers with trainable parameters: {', '.join(layers)}")
