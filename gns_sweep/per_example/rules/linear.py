"""nn.Linear: y = x W^T + b, per-example weight gradient sum_t d_t x_t^T."""

from __future__ import annotations

import torch
from torch import nn

from gns_sweep.per_example.rules.base import Call, ParamStats, Rule
from gns_sweep.per_example.rules.outer import outer_grads, outer_stats


class LinearRule(Rule):
    def accepts(self, module: nn.Module, x: torch.Tensor, n: int) -> bool:
        return x.dim() >= 2 and x.shape[0] == n

    def stats(self, module, call: Call, names, *, param_moments: bool) -> dict[str, ParamStats]:
        x, d = call.x, call.grad
        out: dict[str, ParamStats] = {}
        if x.dim() == 2:  # one position per example: ||g_i||^2 = ||x_i||^2 ||d_i||^2, sum_i g_i^2 = (d^2)^T (x^2)
            if param_moments:
                # the squares go before the weight-gradient matmul: its output would otherwise sit beside them
                d2 = d.square()  # (B, out)
                d_norms = d2.sum(1)  # (B,)
                if "bias" in names:
                    out["bias"] = ParamStats(d.sum(0), d_norms, d2.sum(0))
                if "weight" in names:
                    x2 = x.square()  # (B, in)
                    norms, sq_sum = x2.sum(1).mul_(d_norms), d2.T @ x2
                    del d2, x2
                    out["weight"] = ParamStats(d.T @ x, norms, sq_sum)
                return out
            d_norms = torch.linalg.vector_norm(d, dim=1).square_()  # (B,), with no squared copy of d or x
            if "weight" in names:
                out["weight"] = ParamStats(d.T @ x, torch.linalg.vector_norm(x, dim=1).square_() * d_norms, None)
            if "bias" in names:
                out["bias"] = ParamStats(d.sum(0), d_norms, None)
            return out
        a, dd = _positions(x, d)
        if "bias" in names:  # first, while d is still in cache from the op that made it
            s = dd.sum(1)  # (B, out) per-example bias gradients
            if param_moments:
                s2 = s.square()
                out["bias"] = ParamStats(s.sum(0), s2.sum(1), s2.sum(0))
            else:
                out["bias"] = ParamStats(s.sum(0), torch.linalg.vector_norm(s, dim=1).square_(), None)
        if "weight" in names:
            total, sq, sq_sum = outer_stats(a[:, None], dd[:, None], param_moments=param_moments, empty=call.empty)
            out["weight"] = ParamStats(total[0], sq, None if sq_sum is None else sq_sum[0])
        return out

    def grads(self, module, call: Call, names) -> dict[str, torch.Tensor]:
        a, dd = _positions(call.x, call.grad)
        out = {}
        if "weight" in names:
            out["weight"] = outer_grads(a[:, None], dd[:, None])[:, 0]  # (B, out, in)
        if "bias" in names:
            out["bias"] = dd.sum(1)  # (B, out)
        return out


def _positions(x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ..., in), (B, ..., out) -> (B, T, in), (B, T, out) with T the positions per example."""
    n = x.shape[0]
    return x.reshape(n, -1, x.shape[-1]), d.reshape(n, -1, d.shape[-1])
