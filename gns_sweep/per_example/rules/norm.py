"""Normalisation layers with an elementwise affine y = x_hat * w + b.

Per example, w's gradient is sum over positions of d * x_hat and b's is sum of d.
These are as small as the parameters, so they are materialised. x_hat comes
from the layer's input: for LayerNorm, with the mean and 1/std its forward
saved where the engine found no saved-tensor hooks at that forward (activation
checkpointing unpacks each saved tensor once, for its own node); otherwise, and
for the other layers, recomputed (dividing the output by w would fail at w = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep.per_example.rules.base import Call, Rule


class _AffineRule(Rule):
    def normalised(self, module: nn.Module, x: torch.Tensor, node: object = None) -> torch.Tensor:
        """x_hat, shaped like x (a new tensor); `node`: Call.node, whose saved statistics a rule may read."""
        raise NotImplementedError

    def per_example(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Sum t (B, ...) over the positions that share one affine entry -> (B, *param.shape)."""
        raise NotImplementedError

    def grads(self, module, call: Call, names) -> dict[str, torch.Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = self.per_example(module, self.normalised(module, call.x, call.node).mul_(call.grad))
        if "bias" in names:
            out["bias"] = self.per_example(module, call.grad)
        return out


class _LastDimsRule(_AffineRule):
    """Affine over the trailing `normalized_shape` dims (LayerNorm, RMSNorm)."""

    def accepts(self, module, x, n) -> bool:
        return x.dim() > len(module.normalized_shape) and x.shape[0] == n

    def per_example(self, module, t):
        return t.reshape(t.shape[0], -1, *module.normalized_shape).sum(1)  # (B, *normalized_shape)


class LayerNormRule(_LastDimsRule):
    def normalised(self, module, x, node=None):
        if type(node).__name__ == "NativeLayerNormBackward0":  # the forward's mean and 1/std, (B, ..., 1) each
            mean, rstd, seen = node._saved_result1, node._saved_result2, node._saved_input
            if mean.dtype == x.dtype and seen.shape == x.shape and seen.data_ptr() == x.data_ptr():
                return torch.sub(x, mean).mul_(rstd)  # two passes over x where the kernel takes five
        # a weight of ones changes no bit of x_hat, and takes torch's affine kernel: half the time of the
        # weightless one on CPU (measured, torch 2.13, width 64 and 512)
        return F.layer_norm(x, module.normalized_shape, x.new_ones(module.normalized_shape), eps=module.eps)


class RMSNormRule(_LastDimsRule):
    param_names = ("weight",)

    def normalised(self, module, x, node=None):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class _ChannelRule(_AffineRule):
    """Affine per channel, dim 1 of a (B, C, *spatial) input (GroupNorm, BatchNorm in eval mode)."""

    def accepts(self, module, x, n) -> bool:
        return x.dim() >= 2 and x.shape[0] == n

    def per_example(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)  # (B, C)


class GroupNormRule(_ChannelRule):
    def normalised(self, module, x, node=None):
        return F.group_norm(x, module.num_groups, eps=module.eps)


class BatchNormEvalRule(_ChannelRule):
    """Only with running statistics in eval mode: otherwise the batch statistics couple the examples."""

    def accepts(self, module, x, n) -> bool:
        return not module.training and module.running_mean is not None and super().accepts(module, x, n)

    def normalised(self, module, x, node=None):
        # in x's dtype: the engine widens a float16 layer's input to float32
        mean, var = module.running_mean.to(x.dtype), module.running_var.to(x.dtype)
        return F.batch_norm(x, mean, var, training=False, eps=module.eps)
