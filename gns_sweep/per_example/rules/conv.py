"""nn.Conv1d / nn.Conv2d: unfold the input into patches, then a conv is a Linear per position.

With U (B, C_in*k, L) the patches at the L output positions and d (B, C_out, L)
the output gradients, each example's weight gradient is d U^T, per conv group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep.per_example.rules.base import Call, ParamStats, Rule
from gns_sweep.per_example.rules.outer import outer_grads, outer_stats


class ConvRule(Rule):
    methods = ("forward", "_conv_forward")

    def __init__(self, dims: int) -> None:
        self.dims = dims  # spatial dimensions: 1 or 2

    def accepts(self, module: nn.Module, x: torch.Tensor, n: int) -> bool:
        return x.dim() == self.dims + 2 and x.shape[0] == n  # batched (B, C, *spatial) only

    def stats(self, module, call: Call, names, *, param_moments: bool) -> dict[str, ParamStats]:
        out = {}
        if "weight" in names:
            a, d = self._patches(module, call)
            # (g, C_out/g, C_in/g*k), (B,), and the same shape again or None
            total, sq, sq_sum = outer_stats(a, d, param_moments=param_moments, empty=call.empty)
            shape = module.weight.shape
            out["weight"] = ParamStats(total.reshape(shape), sq, None if sq_sum is None else sq_sum.reshape(shape))
        if "bias" in names:
            s = _bias_grads(call)  # (B, C_out)
            s2 = s.square()
            out["bias"] = ParamStats(s.sum(0), s2.sum(1), s2.sum(0) if param_moments else None)
        return out

    def grads(self, module, call: Call, names) -> dict[str, torch.Tensor]:
        out = {}
        if "weight" in names:
            a, d = self._patches(module, call)
            out["weight"] = outer_grads(a, d).reshape(a.shape[0], *module.weight.shape)
        if "bias" in names:
            out["bias"] = _bias_grads(call)
        return out

    def _patches(self, module, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, groups, L, C_in/g*k) and output gradients (B, groups, L, C_out/g)."""
        x, d = call.x, call.grad
        n, g = x.shape[0], module.groups
        # per spatial dim: as set after construction, these may be ints, which the conv takes too
        kernel, dilation, stride = (
            _per_dim(getattr(module, k), self.dims) for k in ("kernel_size", "dilation", "stride")
        )
        if module.padding_mode == "zeros":  # the conv pads by module.padding, read at call time
            x = F.pad(x, _zero_padding(module.padding, kernel, dilation))
        else:  # the forward pads first, by the amounts __init__ fixed
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        if self.dims == 1:  # as a 2-D conv of height 1
            x, kernel, dilation, stride = x[:, :, None], (1, *kernel), (1, *dilation), (1, *stride)
        u = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C_in*k, L), channels major
        a = u.reshape(n, g, -1, u.shape[-1]).transpose(-1, -2)  # (B, g, L, C_in/g*k)
        dd = d.reshape(n, g, -1, u.shape[-1]).transpose(-1, -2)  # (B, g, L, C_out/g)
        return a, dd


def _per_dim(value, dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


def _zero_padding(padding, kernel, dilation) -> list[int]:
    """F.pad's amounts, last dim first, for a conv's padding: per-dim ints, 'valid' or 'same'."""
    if padding == "valid":
        return [0, 0] * len(kernel)
    padding = padding if isinstance(padding, str) else _per_dim(padding, len(kernel))
    out = []
    for i in reversed(range(len(kernel))):
        if padding == "same":  # as the conv pads: the odd one of the total on the right
            total = dilation[i] * (kernel[i] - 1)
            out += [total // 2, total - total // 2]
        else:
            out += [padding[i], padding[i]]
    return out


def _bias_grads(call: Call) -> torch.Tensor:
    d = call.grad
    return d.reshape(d.shape[0], d.shape[1], -1).sum(2)  # (B, C_out)
