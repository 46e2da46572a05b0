"""Per-example gradient statistics behind one small interface.

`ENGINES` maps an engine name to its class; `shard_moments` runs an engine over
a set of examples in micro-batches of at most `max_batch`, so peak memory is
bounded by the micro-batch, not the probe size.
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
from gns_sweep.stats import merge_all

ENGINES: dict[str, type] = {"fast": FastEngine, "general": GeneralEngine, "loop": LoopEngine}
DEFAULT_ENGINE = "fast"

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ROOT",
    "TOTAL",
    "BatchMoments",
    "Engine",
    "ParamLayout",
    "get_engine",
    "param_layout",
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
    """Moments of all given examples, computed in micro-batches and merged."""
    refuse_coupled_layers(model)
    parts, loss_sum = [], 0.0
    for start in range(0, inputs.shape[0], max_batch):
        out = engine.batch_moments(
            model,
            inputs[start : start + max_batch],
            targets[start : start + max_batch],
            loss,
            layout,
            param_moments=param_moments,
        )
        parts.append(out.moments)
        loss_sum += out.loss_sum
    return BatchMoments(merge_all(parts), loss_sum)
