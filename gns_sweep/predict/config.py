"""predict's settings: what the user asks for, with its defaults (the CLI reads them from here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from gns_sweep import __version__
from gns_sweep.optim import OptimizerSpec
from gns_sweep.per_example import DEFAULT_ENGINE, DEFAULT_MICRO_BATCH
from gns_sweep.runtime import DEFAULT_MAX_RETRIES
from gns_sweep.storage import stored_settings

DEFAULT_PROBE = 512  # probe examples per checkpoint when the task has that many
PER_EXAMPLE = "per-example"  # samples are single examples' gradients (needs no layer coupling examples)
MICRO_BATCH = "micro-batch"  # samples are micro-batches' mean gradients (any model)
AUTO = "auto"  # micro-batch where a layer couples examples, else per-example
ESTIMATORS = (AUTO, PER_EXAMPLE, MICRO_BATCH)
PER_EXAMPLE_ENGINES = ("fast", "general", "loop")  # how the per-example estimator gets its statistics


@dataclass(frozen=True)
class PredictConfig:
    """Settings of one predict run (all recorded in predict.parquet)."""

    task: str  # built-in name or package.module:attr
    probe_size: int | None = None  # examples drawn afresh at each checkpoint (None: min(DEFAULT_PROBE, all))
    shards: int = 1  # Ray tasks per checkpoint (the result does not depend on it); checkpoints run in parallel
    blocks: int = 16  # jackknife blocks of each checkpoint's probe (capped at probe_size)
    layer: str | None = None  # report only this layer (and the total)
    warmup_steps: int = 0  # reference-run steps before the first checkpoint
    checkpoints: int = 64  # measurements along the reference run (every step when it is shorter)
    seed: int = 0  # initial weights, data order and probe draw
    estimator: str = AUTO  # one of ESTIMATORS; validate resolves auto
    micro_batch: int = DEFAULT_MICRO_BATCH  # examples per sample of the micro-batch estimator
    engine: str = DEFAULT_ENGINE  # per-example engine (one of PER_EXAMPLE_ENGINES)
    max_batch: int = 256  # micro-batch size inside a shard: bounds peak memory
    cpus_per_shard: float = 1.0  # Ray CPUs per shard task (and its torch threads)
    gpus_per_shard: float = 0.0  # Ray GPUs per shard task (> 0: the shard runs on cuda)
    max_retries: int = DEFAULT_MAX_RETRIES  # re-runs of a shard whose worker process or node dies (not recorded)
    optimizer: OptimizerSpec | None = None  # the reference run's; None: the task's (sgd if none), set by validate


# How the work is run, not what it computes: left out of the settings a file records and compares.
RUN_ONLY = ("max_retries",)


def settings(config: PredictConfig) -> dict:
    """What predict.parquet records, and what --resume compares."""
    kept = {k: v for k, v in asdict(config).items() if k not in RUN_ONLY}
    kept["optimizer"] = None if config.optimizer is None else config.optimizer.key()  # the settings it reads
    return {"command": "predict", "version": __version__, **kept}


def recorded_settings(path: Path) -> dict | None:
    """The settings a predict.parquet records. One written before the optimizer was recorded trained plain
    SGD, so it is read as such and a plain-SGD run can resume it."""
    stored = stored_settings(path)
    if stored is not None and stored.get("command") == "predict" and "optimizer" not in stored:
        stored = {**stored, "optimizer": OptimizerSpec().key()}
    return stored


def sample_size(config: PredictConfig) -> int:
    """Examples per sample: b for the micro-batch estimator, 1 for the per-example one."""
    return config.micro_batch if config.estimator == MICRO_BATCH else 1
