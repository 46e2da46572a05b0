"""Per-example gradient statistics behind one small interface.

`ENGINES` maps an engine name to its class. An engine returns the raw sums of
one micro-batch (`BatchSums`); `shard_moments` runs it over a set of examples
in micro-batches of at most `max_batch`, so peak memory is bounded by the
micro-batch, not the probe size, and folds the sums into float64 Moments.
`register_rule` gives the fast engine a rule for a layer type of one's own
(docs/register-rule.md).
"""

from __future__ import annotations

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example.base import BatchMoments, Engine, LossFn, refuse_coupled_layers
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.general import GeneralEngine
from gns_sweep.per_example.layout import ROOT, TOTAL, ParamLayout, param_layout
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.per_example.rules import Call, ParamStats, RegisteredRule, Rule, register_rule, stats_of
from gns_sweep.per_example.sums import BatchSums, SumAccumulator

ENGINES: dict[str, type] = {"fast": FastEngine, "general": GeneralEngine, "loop": LoopEngine}
DEFAULT_ENGINE = "fast"

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ROOT",
    "TOTAL",
    "BatchMoments",
    "BatchSums",
    "Call",
    "Engine",
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
    """Moments of all given examples, computed in micro-batches of at most max_batch."""
    refuse_coupled_layers(model)
    acc = SumAccumulator(layout, param_moments=param_moments)
    for start in range(0, inputs.shape[0], max_batch):
        x, y = inputs[start : start + max_batch], targets[start : start + max_batch]
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
