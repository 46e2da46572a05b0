"""The general engine: per-example gradients with torch.func (vmap over grad).

Works for any model whose examples are independent; materialises the
(B, P) per-example gradients of one micro-batch, so keep micro-batches small
for large models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gns_sweep.per_example.base import LossFn, check_losses
from gns_sweep.per_example.layout import ParamLayout
from gns_sweep.per_example.sums import BatchSums, sums_of_samples


def per_example_grads(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: LossFn, layout: ParamLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened per-example gradients (B, P) in layout order, and losses (B,)."""
    named = dict(model.named_parameters())
    trainable = {k: named[k].detach() for k in layout.names}
    frozen = {k: v.detach() for k, v in named.items() if k not in trainable}
    buffers = dict(model.named_buffers())

    def one(params, x, y):
        out = functional_call(model, (params, frozen, buffers), (x.unsqueeze(0),))
        losses = loss(out, y.unsqueeze(0))
        check_losses(losses, 1)
        return losses[0], losses[0].detach()

    grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
        trainable, inputs, targets
    )
    flat = torch.cat([grads[k].reshape(inputs.shape[0], -1) for k in layout.names], dim=1)  # (B, P)
    return flat, losses


class GeneralEngine:
    name = "general"

    def batch_sums(self, model, inputs, targets, loss, layout, *, param_moments) -> BatchSums:
        flat, losses = per_example_grads(model, inputs, targets, loss, layout)
        return sums_of_samples(flat, losses, layout, param_moments=param_moments)
