"""What a per-layer rule sees and returns.

A rule turns one forward call of a layer -- its input and the gradient of the
summed per-example losses w.r.t. its output -- into the sum over examples and
per-example statistics of the layer's own parameters' gradients, without a
backward pass per example (the engine does not ask autograd for parameter
gradients at all, so the rule's sum replaces the usual weight-gradient matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class Scratch:
    """One reusable buffer for a rule's largest intermediate (materialised per-example gradients).

    A fresh multi-megabyte tensor is mmapped by the allocator and page-faulted in on
    every call, which doubled the time of the matmul writing it (measured, CPU); an
    engine keeps one Scratch, grown as needed, and rules take views of it. A view is
    valid until the next `take`, so nothing a rule returns may be one.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buf = like.new_empty(numel)
        return buf[:numel].view(shape)


@dataclass(frozen=True)
class Call:
    """One forward call of a layer, examples on dim 0 of both tensors."""

    x: torch.Tensor  # the call's input, (B, ...)
    grad: torch.Tensor  # d(sum of losses)/d(output), same shape as the output, (B, ...)
    scratch: Scratch | None = None  # the engine's reusable buffer, if it has one
    node: object = None  # autograd node that made the output (or the base of a reshaped one), given only where
    # the tensors it saved may be read again: no saved-tensor hooks (activation checkpointing) at the forward

    def rows(self, start: int, stop: int) -> Call:
        return Call(self.x[start:stop], self.grad[start:stop], self.scratch)

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A temporary of this shape: a view of the scratch buffer when there is one."""
        return like.new_empty(shape) if self.scratch is None else self.scratch.take(shape, like)


@dataclass(frozen=True)
class ParamStats:
    """Per-example statistics of one parameter tensor over one call."""

    sum: torch.Tensor  # (*param.shape) sum_i g_i
    sq_norms: torch.Tensor  # (B,) ||g_i||^2 of each example's gradient
    sq_sum: torch.Tensor | None  # (*param.shape) sum_i g_i^2, None unless asked for


class Rule:
    """Base rule: subclasses give `grads`; `stats` may take a cheaper route."""

    param_names: tuple[str, ...] = ("weight", "bias")  # the parameters the rule understands
    methods: tuple[str, ...] = ("forward",)  # what a subclass must not override to keep the rule

    def accepts(self, module: nn.Module, x: torch.Tensor, n: int) -> bool:
        """Whether this call can be handled: x must carry the n examples on dim 0."""
        return x.dim() >= 1 and x.shape[0] == n

    def grads(self, module: nn.Module, call: Call, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Materialised per-example gradients, name -> (B, *param.shape)."""
        raise NotImplementedError

    def stats(
        self, module: nn.Module, call: Call, names: tuple[str, ...], *, param_moments: bool
    ) -> dict[str, ParamStats]:
        return {k: stats_of(g, param_moments=param_moments) for k, g in self.grads(module, call, names).items()}


def stats_of(g: torch.Tensor, *, param_moments: bool) -> ParamStats:
    """Statistics of explicit per-example gradients g (B, ...)."""
    g2 = g.square()
    return ParamStats(g.sum(0), g2.flatten(1).sum(1), g2.sum(0) if param_moments else None)
