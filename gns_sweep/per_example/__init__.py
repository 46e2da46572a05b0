"""Per-example gradient statistics behind one small interface.

`ENGINES` maps an engine name to its class. An engine returns the raw sums of
one micro-batch (`BatchSums`); `shard_moments` runs it over a set of examples
in micro-batches of at most `max_batch`, so peak memory is bounded by the
micro-batch, not the probe size, and folds the sums into float64 Moments.
`register_rule` gives the fast engine a rule for a layer type of one's own
(docs/register-rule.md). The "micro-batch" engine measures models whose layers
couple examples (`coupled_layers` names them): its samples are micro-batch mean
gradients, which `stats.estimate(..., micro_batch=b)` puts on the per-example scale.
"""

from __future__ import annotations

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example.base import BatchMoments, Engine, LossFn, coupled_layers, refuse_coupled_layers
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.general import GeneralEngine
from gns_sweep.per_example.layout import ROOT, TOTAL, ParamLayout, param_layout
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.per_example.micro_batch import DEFAULT_MICRO_BATCH, MicroBatchEngine, check_divisible
from gns_sweep.per_example.rules import Call, ParamStats, RegisteredRule, Rule, register_rule, stats_of
from gns_sweep.per_example.sums import BatchSums, SumAccumulator

ENGINES: dict[str, type] = {
    "fast": FastEngine,
    "general": GeneralEngine,
    "loop": LoopEngine,
    "micro-batch": MicroBatchEngine,
}
DEFAULT_ENGINE = "fast"

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_MICRO_BATCH",
    "ENGINES",
    "ROOT",
    "TOTAL",
    "BatchMoments",
    "BatchSums",
    "Call",
    "Engine",
    "MicroBatchEngine",
    "ParamLayout",
    "ParamStats",
    "RegisteredRule",
    "Rule",
    "get_engine",
    "param_layout",
    "register_rule",
    "stats_of",
    "SumAccumulator",
    "batch_moments",
    "coupled_layers",
    "shard_moments",
]


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]()
    except KeyError:
        raise UsageError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}") from None


def shard_moments(
    engine: Engine,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFn,
    layout: ParamLayout,
    *,
    max_batch: int,
    param_moments: bool,
) -> BatchMoments:
    """Moments of all given examples, computed in micro-batches of at most max_batch.

    For an engine with samples of `micro_batch` examples (the micro-batch engine) the calls take a multiple
    of it: max_batch rounded down, or one micro-batch if max_batch is smaller. Layers that couple examples
    are refused unless the engine is one of those."""
    step = max_batch
    b = getattr(engine, "micro_batch", None)
    if b is None:
        refuse_coupled_layers(model)
    else:
        check_divisible(inputs.shape[0], b)  # before any work
        step = max(b, max_batch - max_batch % b)
    acc = SumAccumulator(layout, param_moments=param_moments)
    for start in range(0, inputs.shape[0], step):
        x, y = inputs[start : start + step], targets[start : start + step]
        acc.add(engine.batch_sums(model, x, y, loss, layout, param_moments=param_moments))
    return BatchMoments(acc.moments(), acc.loss_sum)


def batch_moments(
    engine: Engine,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFn,
    layout: ParamLayout,
    *,
    param_moments: bool,
) -> BatchMoments:
    """Moments of one micro-batch: all examples in a single engine call."""
    n = max(1, inputs.shape[0])
    return shard_moments(engine, model, inputs, targets, loss, layout, max_batch=n, param_moments=param_moments)
