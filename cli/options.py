"""Every command-line option, declared once; defaults come from the library's config dataclasses.

A command lists the options it takes by these names, and `from_options` turns the
values into a config, so a new setting is one field in a config and one line here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from gns_sweep.empirical import EmpiricalConfig
from gns_sweep.errors import UsageError
from gns_sweep.optim import OPTIMIZERS, OptimizerSpec, choose, parse_betas
from gns_sweep.predict import DEFAULT_PROBE, PredictConfig
from gns_sweep.tasks import DEFAULT_TASK, Task

C = TypeVar("C")
P = PredictConfig(task=DEFAULT_TASK)  # the defaults, read as attributes below
E = EmpiricalConfig(task=DEFAULT_TASK)
S = OptimizerSpec()

# --- shared by every command that runs work --------------------------------------------------------
TaskName = Annotated[str, typer.Option("--task", help="Built-in task (see `gns-sweep tasks`) or package.module:attr.")]
OutDir = Annotated[Path | None, typer.Option("--out", help="Output folder (default: a new one under results/).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace results of a different run in --out.")]
Resume = Annotated[bool, typer.Option("--resume", help="Keep what is finished in --out and do only the rest.")]
Address = Annotated[
    str | None,
    typer.Option(
        "--address", help="Connect to a running Ray cluster (host:port or 'auto'); default: start a local one."
    ),
]
NumCpus = Annotated[
    int | None, typer.Option("--num-cpus", help="CPUs of the local Ray instance (default: all).", min=1)
]
AsJson = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary instead of tables.")]
MaxRetries = Annotated[
    int,
    typer.Option(
        "--max-retries",
        help="Re-runs of a Ray task whose worker process or node dies (an error in the task's own code is not re-run).",
    ),
]

# --- the optimizer (predict's reference run and the sweep's trials) ---------------------------------
# Not given (None): the task's default optimizer and settings; a setting given changes only that one.
Optimizer = Annotated[
    str | None,
    typer.Option(
        "--optimizer",
        help=f"Optimizer: {', '.join(OPTIMIZERS)} (default: the task's, else sgd); see docs/optimizers.md.",
    ),
]
Momentum = Annotated[
    float | None,
    typer.Option("--momentum", help=f"Heavy-ball coefficient of momentum and lars (default {S.momentum:g})."),
]
Betas = Annotated[
    str | None,
    typer.Option("--betas", help=f"beta1,beta2 of adam and adamw (default {S.betas[0]:g},{S.betas[1]:g})."),
]
WeightDecay = Annotated[
    float | None,
    typer.Option(
        "--weight-decay", help=f"Weight decay: L2 in the gradient, decoupled for adamw (default {S.weight_decay:g})."
    ),
]
TrustCoefficient = Annotated[
    float | None,
    typer.Option(
        "--trust-coefficient", help=f"LARS trust coefficient: layer-wise lr = trust ||w||/||g|| (default {S.trust:g})."
    ),
]

# --- predict ---------------------------------------------------------------------------------------
ProbeSize = Annotated[
    int | None,
    typer.Option(
        "--probe-size", help=f"Probe examples drawn afresh at each checkpoint (default: {DEFAULT_PROBE}, or all)."
    ),
]
Shards = Annotated[int, typer.Option("--shards", help="Ray tasks per checkpoint (the result does not depend on it).")]
Blocks = Annotated[int, typer.Option("--blocks", help="Jackknife blocks for the 95% interval.")]
Layer = Annotated[str | None, typer.Option("--layer", help="Report only this layer (and the total).")]
WarmupSteps = Annotated[
    int, typer.Option("--warmup-steps", help="Reference-run SGD steps before the first checkpoint.")
]
Checkpoints = Annotated[
    int, typer.Option("--checkpoints", help="Measurements from the warm-up to the target (every step if fewer).")
]
Seed = Annotated[int, typer.Option("--seed", help="predict: seeds the weights, the data order and the probe draws.")]
Engine = Annotated[str, typer.Option("--engine", help="Per-example gradient engine: fast, general or loop.")]
Estimator = Annotated[
    str,
    typer.Option(
        "--estimator",
        help="auto (micro-batch where a layer such as BatchNorm couples examples, else per-example), "
        "per-example or micro-batch.",
    ),
]
MicroBatch = Annotated[
    int,
    typer.Option("--micro-batch", help="Examples per sample of the micro-batch estimator (part of what it measures)."),
]
MaxBatch = Annotated[int, typer.Option("--max-batch", help="Micro-batch size inside a shard (bounds memory).")]
CpusPerShard = Annotated[float, typer.Option("--cpus-per-shard", help="CPUs per shard task.")]
GpusPerShard = Annotated[float, typer.Option("--gpus-per-shard", help="GPUs per shard task (0: CPU).")]

# --- empirical -------------------------------------------------------------------------------------
BatchSizes = Annotated[
    str | None, typer.Option("--batch-sizes", help="Comma list of batch sizes, e.g. 4,16,64,256 (default: the task's).")
]
Lrs = Annotated[
    str | None,
    typer.Option(
        "--lrs",
        help="Learning rates tried at every batch size: values (0.05,0.1,0.2) or multipliers of each batch size's "
        "centre lr (x0.25,x0.5,x1,x2,x4). Default: 5 points a factor 2 apart around the task's lr scaled with B.",
    ),
]
Seeds = Annotated[int, typer.Option("--seeds", help="Seeds per (batch size, lr): 0..N-1.")]
BudgetExamples = Annotated[
    int | None, typer.Option("--budget-examples", help="Training examples per trial (default: the task's).")
]
TargetLoss = Annotated[
    float | None, typer.Option("--target-loss", help="Eval-loss target (default: the task's, else a pilot picks one).")
]
CpusPerTrial = Annotated[float, typer.Option("--cpus-per-trial", help="CPUs per trial (torch threads match).")]
GpusPerTrial = Annotated[float, typer.Option("--gpus-per-trial", help="GPUs per trial (> 0 trains on cuda).")]
Schedule = Annotated[
    str,
    typer.Option(
        "--schedule",
        help="none, or gns: also one trial per seed whose batch size follows the monitored noise scale, between "
        "the grid's ends (compare sets it beside the best fixed batch size).",
    ),
]
ScheduleK = Annotated[
    float, typer.Option("--schedule-k", help="With --schedule gns: the batch is the power of two nearest k * B_noise.")
]


# --- compare ---------------------------------------------------------------------------------------
Targets = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="Eval-loss targets to judge, comma list (default: 5 from the easiest whose frontier has two ends to "
        "the sweep's own).",
    ),
]


def from_options(cls: type[C], values: dict[str, Any]) -> C:
    """The config of class `cls` from a command's option values (matched by field name)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def empirical_config(values: dict[str, Any], task: Task) -> EmpiricalConfig:
    """EmpiricalConfig from option values, with --batch-sizes, --lrs and the optimizer's options parsed."""
    lrs, multipliers = parse_lrs(values.get("lrs"))
    parsed = {**values, "batch_sizes": parse_batch_sizes(values.get("batch_sizes")), "lrs": lrs}
    parsed["optimizer"] = optimizer_spec(values, task)
    return from_options(EmpiricalConfig, {**parsed, "lr_multipliers": multipliers})


def predict_config(values: dict[str, Any], task: Task) -> PredictConfig:
    """PredictConfig from option values, with the optimizer's options parsed."""
    return from_options(PredictConfig, {**values, "optimizer": optimizer_spec(values, task)})


def optimizer_spec(values: dict[str, Any], task: Task) -> OptimizerSpec | None:
    """The optimizer the options ask for, from the task's default; None when none of them is given."""
    return choose(
        task.optimizer,
        name=values.get("optimizer"),
        momentum=values.get("momentum"),
        betas=parse_betas(values.get("betas")),
        weight_decay=values.get("weight_decay"),
        trust=values.get("trust_coefficient"),
    )


def parse_batch_sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--batch-sizes {text!r} is empty; give a comma list such as 8,64,512")
    try:
        return tuple(int(s) for s in items)
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: not a comma list of integers; e.g. 8,64,512") from None


def parse_lrs(text: str | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(values, multipliers): items starting with 'x' are multipliers of the centre lr."""
    if text is None:
        return None, None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--lrs {text!r} is empty; give values (0.05,0.1) or multipliers (x0.5,x1,x2)")
    mult = [s.lower().startswith("x") for s in items]
    if any(mult) and not all(mult):
        raise UsageError(f"--lrs {text!r} mixes values and multipliers; use all values or all x-multipliers")
    try:
        values = tuple(float(s[1:] if m else s) for s, m in zip(items, mult, strict=True))
    except ValueError:
        raise UsageError(f"--lrs {text!r}: not a comma list of numbers; e.g. 0.05,0.1,0.2 or x0.5,x1,x2") from None
    return (None, values) if all(mult) else (values, None)


def parse_targets(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--targets {text!r}: not a comma list of eval losses; e.g. 0.8,0.76,0.74") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--targets {text!r}: give finite eval losses, e.g. 0.8,0.76,0.74")
    return values
