"""The slow, obviously-correct reference: one backward pass per example."""

from __future__ import annotations

import torch

from gns_sweep.per_example.base import check_losses
from gns_sweep.per_example.sums import BatchSums, sums_of_samples


def loop_grads(model, inputs, targets, loss, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients (B, P) and losses (B,) by a plain loop."""
    named = dict(model.named_parameters())
    params = [named[k] for k in layout.names]
    rows, losses = [], []
    for i in range(inputs.shape[0]):
        li = loss(model(inputs[i : i + 1]), targets[i : i + 1])
        check_losses(li, 1)
        gs = torch.autograd.grad(li[0], params, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params, strict=True)])
        )
        losses.append(li[0].detach())
    return torch.stack(rows), torch.stack(losses)


class LoopEngine:
    name = "loop"

    def batch_sums(self, model, inputs, targets, loss, layout, *, param_moments) -> BatchSums:
        flat, losses = loop_grads(model, inputs, targets, loss, layout)
        return sums_of_samples(flat, losses, layout, param_moments=param_moments)
