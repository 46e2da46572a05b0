"""Normalisation layers with an elementwise affine y = x_hat * w + b.

Per example, w's gradient is sum over positions of d * x_hat and b's is sum of d.
These are as small as the parameters, so they are materialised; x_hat is
recomputed from the saved input (dividing the output by w would fail at w = 0;
reading the mean and 1/std the forward saved would use up saved tensors that
torch.utils.checkpoint lets be unpacked only once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep.per_example.rules.base import Call, Rule


class _AffineRule(Rule):
    def normalised(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x_hat, shaped like x."""
        raise NotImplementedError

    def per_example(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Sum t (B, ...) over the positions that share one affine entry -> (B, *param.shape)."""
        raise NotImplementedError

    def grads(self, module, call: Call, names) -> dict[str, torch.Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = self.per_example(module, self.normalised(module, call.x).mul_(call.grad))
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
    def normalised(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)


class RMSNormRule(_LastDimsRule):
    param_names = ("weight",)

    def normalised(self, module, x):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class _ChannelRule(_AffineRule):
    """Affine per channel, dim 1 of a (B, C, *spatial) input (GroupNorm, BatchNorm in eval mode)."""

    def accepts(self, module, x, n) -> bool:
        return x.dim() >= 2 and x.shape[0] == n

    def per_example(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)  # (B, C)


class GroupNormRule(_ChannelRule):
    def normalised(self, module, x):
        return F.group_norm(x, module.num_groups, eps=module.eps)


class BatchNormEvalRule(_ChannelRule):
    """Only with running statistics in eval mode: otherwise the batch statistics couple the examples."""

    def accepts(self, module, x, n) -> bool:
        return not module.training and module.running_mean is not None and super().accepts(module, x, n)

    def normalised(self, module, x):
        # in x's dtype: the engine widens a float16 layer's input to float32
        mean, var = module.running_mean.to(x.dtype), module.running_var.to(x.dtype)
        return F.batch_norm(x, mean, var, training=False, eps=module.eps)
