"""The per-example engine interface: raw gradient sums of one micro-batch of examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example.layout import ParamLayout
from gns_sweep.per_example.sums import BatchSums
from gns_sweep.stats import Moments

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> (N,)


@dataclass(frozen=True)
class BatchMoments:
    """Moments of a set of examples, with their loss."""

    moments: Moments  # gradient moments over the examples
    loss_sum: float  # sum of the per-example losses (for the reported train loss)


class Engine(Protocol):
    """Computes per-example gradient statistics of a frozen model.

    An engine whose samples are micro-batches of b examples (MicroBatchEngine) also has `micro_batch = b`:
    its BatchSums count micro-batches, and layers that couple examples are not refused for it."""

    name: str

    def batch_sums(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss: LossFn,
        layout: ParamLayout,
        *,
        param_moments: bool,
    ) -> BatchSums: ...


_COUPLING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def coupled_layers(model: nn.Module) -> list[tuple[str, type]]:
    """The layers that couple the examples of a batch in the model's current mode, as (name, class).

    Empty: per-example gradients exist. Otherwise only the micro-batch engine can measure the model."""
    return [(name, type(m)) for name, m in coupling_candidates(model) if couples(m)]


def refuse_coupled_layers(model: nn.Module) -> None:
    """Per-example gradients are undefined where a layer mixes examples."""
    _refuse(coupled_layers(model))


def coupling_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that couple examples in some modes (BatchNorm), by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _COUPLING)]


def couples(module: nn.Module) -> bool:
    """Whether a coupling candidate mixes examples now. BatchNorm without running statistics normalises
    by the batch even in eval mode."""
    return module.training or not getattr(module, "track_running_stats", True)


def refuse_coupled(candidates: list[tuple[str, nn.Module]]) -> None:
    """As refuse_coupled_layers, from candidates read once (their modes can change between calls)."""
    _refuse([(name, type(m)) for name, m in candidates if couples(m)])


def _refuse(coupled: list[tuple[str, type]]) -> None:
    for name, cls in coupled[:1]:
        raise UsageError(
            f"layer '{name}' ({cls.__name__}) couples the examples of a batch (it normalises by batch "
            "statistics), so per-example gradients are undefined; replace it with GroupNorm or LayerNorm, "
            "or measure it with the engine 'micro-batch' (gradients of micro-batches of b examples)"
        )


def check_losses(losses: torch.Tensor, n: int) -> None:
    if losses.shape != (n,):
        raise UsageError(
            f"the task's loss returned shape {tuple(losses.shape)} for {n} examples; it must return one loss "
            f"per example, shape ({n},) (use reduction='none' and average over other dimensions)"
        )
