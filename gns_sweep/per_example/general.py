"""The general engine: per-example gradients with torch.func (vmap over grad).

Works for any model whose examples are independent; materialises the
(B, P) per-example gradients of one micro-batch, so keep micro-batches small
for large models.

The loss runs inside `functional_call` too, so a loss that reads a parameter
through the model (`model.fc.weight.square().sum()`, an L2 term written into
the loss) sees the parameter torch.func differentiates. A parameter read
through a reference of the user's own (`w = model.fc.weight` captured by the
loss, or a plain list in a module) cannot be swapped: torch.func would treat it
as a constant and drop its gradient. That use leaves an ordinary autograd graph
behind (the swapped-in parameters are detached, so nothing else can), which
`per_example_grads` finds and raises `DirectRead` for. Where torch.func fails
so, or on a model it cannot vmap (an RNN, non-reentrant checkpointing, control
flow on the data), the engine takes one backward per example instead and
warns once per model.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gns_sweep.errors import UsageError
from gns_sweep.per_example.base import LossFn, check_losses
from gns_sweep.per_example.layout import ParamLayout
from gns_sweep.per_example.loop import loop_grads
from gns_sweep.per_example.sums import BatchSums, sums_of_samples

_ACCUMULATE = torch._C._functions.AccumulateGrad  # the node that puts a gradient into a leaf's .grad


class DirectRead(RuntimeError):
    """The loss or the forward used a trainable parameter that functional_call could not swap in."""


class _WithLoss(nn.Module):
    """The model and its loss as one module: functional_call's parameters stay in place while the loss
    runs, so the loss's own reads of them (model.fc.weight) are differentiated too."""

    def __init__(self, model: nn.Module, loss: LossFn) -> None:
        super().__init__()
        self.model = model
        self.__dict__["loss"] = loss  # not a submodule: a loss module's parameters are not the model's

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = self.loss(self.model(x), y)
        check_losses(losses, 1)
        return losses[0]


def per_example_grads(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: LossFn, layout: ParamLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened per-example gradients (B, P) in layout order, and losses (B,).

    Raises DirectRead where a trainable parameter was used without functional_call swapping it in."""
    named = dict(model.named_parameters())
    trainable = {"model." + k: named[k].detach() for k in layout.names}
    frozen = {"model." + k: v.detach() for k, v in named.items() if "model." + k not in trainable}
    buffers = {"model." + k: v for k, v in model.named_buffers()}
    whole = _WithLoss(model, loss)

    def one(params, x, y):
        li = functional_call(whole, (params, frozen, buffers), (x.unsqueeze(0), y.unsqueeze(0)))
        return li, li  # the aux keeps its ordinary autograd graph, if any: see _direct_reads

    # grad mode on, so a parameter used behind functional_call's back leaves a graph (under no_grad, too)
    with torch.enable_grad():
        grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
            trainable, inputs.detach(), targets
        )
    read = _direct_reads(losses, named, layout)
    if read:
        raise DirectRead(
            f"the loss or the forward reads '{read[0]}' through a reference of its own; read it from the model"
        )
    flat = torch.cat([grads["model." + k].reshape(inputs.shape[0], -1) for k in layout.names], dim=1)  # (B, P)
    return flat, losses.detach()


def _direct_reads(losses: torch.Tensor, named: dict[str, torch.Tensor], layout: ParamLayout) -> list[str]:
    """The trainable parameters below the losses' ordinary autograd graph, by name (usually no graph)."""
    if losses.grad_fn is None:
        return []
    leaves, seen, stack = set(), {losses.grad_fn}, [losses.grad_fn]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None or child in seen:
                continue
            seen.add(child)
            if type(child) is _ACCUMULATE:
                leaves.add(id(child.variable))
            else:
                stack.append(child)
    return [k for k in layout.names if id(named[k]) in leaves]


def first_line(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first if len(first) <= 120 else first[:119] + "…"


def warn_loop(engine: str, names: list[str], error: str) -> None:
    """One warning that `engine` takes these parameters by one backward per example (stack: engine.batch_sums)."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    warnings.warn(
        f"torch.func cannot take per-example gradients of {shown} ({error}); the {engine} engine takes them by "
        "one backward per example instead, which is slow for large micro-batches",
        RuntimeWarning,
        stacklevel=3,
    )


class GeneralEngine:
    """torch.func over the whole model; the loop where torch.func fails on it (see the module docstring)."""

    name = "general"

    def __init__(self) -> None:
        self._by_loop: weakref.ref | None = None  # the model torch.func failed on: the loop straight away

    def batch_sums(self, model, inputs, targets, loss, layout, *, param_moments) -> BatchSums:
        if self._by_loop is None or self._by_loop() is not model:
            try:
                flat, losses = per_example_grads(model, inputs, targets, loss, layout)
                return sums_of_samples(flat, losses, layout, param_moments=param_moments)
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 -- the loop below raises whatever is the model's own fault
                failed = first_line(e)  # not the exception: its traceback would keep torch.func's frames alive
            self._by_loop = weakref.ref(model)
            warn_loop(self.name, list(layout.names), failed)
        with torch.enable_grad():
            flat, losses = loop_grads(model, inputs, targets, loss, layout)
        return sums_of_samples(flat, losses, layout, param_moments=param_moments)
