"""What an engine returns for one micro-batch, and the float64 sums it is folded into.

Engines stop at raw sums in torch, in the model's dtype and on its device: per
parameter tensor sum_i g_i (what `.grad` of a plain step holds),
sum_i ||g_i||^2 and, if asked, sum_i g_i^2. These add across micro-batches,
so a `SumAccumulator` folds any number of them into float64 and turns the
total into `stats.Moments` once. The sums are kept in float64 because
M2 = sum ||g_i||^2 - ||sum g_i||^2 / n cancels most digits of its two terms
when the examples' gradients are nearly alike. An accumulator spans one
jackknife block; blocks and shards are combined with Chan's merge.

This runs over all P parameters once per block, so it stays in torch (the
training thread pool; numpy's BLAS threads would spin against it) and works in
place: the accumulator's buffers become the Moments' arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gns_sweep.per_example.layout import ParamLayout
from gns_sweep.stats import Moments, empty


@dataclass(frozen=True)
class BatchSums:
    """Raw per-example sums over one micro-batch; group g is layout parameter g. None: zero gradient."""

    n: int  # examples
    loss_sum: torch.Tensor  # 0-d, sum of the per-example losses
    grad_sum: Sequence[torch.Tensor | None]  # per group (*param.shape) sum_i g_i
    sq_norm_sum: torch.Tensor  # (G,) float64 sum_i ||g_i[group]||^2, 0 where grad_sum is None
    param_sq_sum: Sequence[torch.Tensor | None] | None  # per group sum_i g_i^2; None unless asked for


def sums_of_samples(flat: torch.Tensor, losses: torch.Tensor, layout: ParamLayout, *, param_moments: bool) -> BatchSums:
    """BatchSums of explicit flattened per-example gradients (B, P) in layout order, reduced in float64.

    Squares of float32 values are exact in float64, so M2 = sum ||g_i||^2 - ||sum g_i||^2 / n keeps its
    digits even when the examples are nearly alike. One parameter tensor is converted at a time."""
    grad_sum, sq_norm_sum, param_sq_sum = [], [], []
    for part in flat.split(list(layout.sizes), dim=1):
        part = part.to(torch.float64, copy=True)  # squared in place below
        grad_sum.append(part.sum(0))
        sq = part.square_().sum(0)  # (P_g,) sum_i g_i^2
        sq_norm_sum.append(sq.sum())
        param_sq_sum.append(sq)
    return BatchSums(
        n=flat.shape[0],
        loss_sum=losses.detach().double().sum(),
        grad_sum=grad_sum,
        sq_norm_sum=torch.stack(sq_norm_sum),
        param_sq_sum=param_sq_sum if param_moments else None,
    )


class SumAccumulator:
    """Float64 running sums of BatchSums over one set of examples, on the engine's device."""

    def __init__(self, layout: ParamLayout, *, param_moments: bool) -> None:
        self.layout = layout
        self.param_moments = param_moments
        self.n = 0
        self._loss = 0.0
        self._sum = self._psq = self._sq = None  # allocated on the first add, where its tensors live
        self._sum_parts = self._psq_parts = ()
        self._filled: list[bool] = [False] * len(layout.names)

    def _allocate(self, device: torch.device) -> None:
        p, sizes = self.layout.n_params, list(self.layout.sizes)
        kw = {"dtype": torch.float64, "device": device}
        self._sum = torch.empty(p, **kw)
        self._sum_parts = self._sum.split(sizes)
        self._sq = torch.zeros(len(sizes), **kw)
        if self.param_moments:
            self._psq = torch.empty(p, **kw)
            self._psq_parts = self._psq.split(sizes)

    def add(self, s: BatchSums) -> None:
        if self.param_moments and s.param_sq_sum is None:
            raise ValueError("this accumulator keeps per-parameter second moments; the sums lack them")
        if self._sum is None:
            if self.n:
                raise RuntimeError("moments() was already taken from this accumulator")
            self._allocate(s.loss_sum.device)
        present = [g for g, t in enumerate(s.grad_sum) if t is not None]
        for g in present:
            fresh = not self._filled[g]  # first sums of this group: a converting copy, no zero fill
            _fold(self._sum_parts[g], s.grad_sum[g], fresh)
            if self._psq is not None:
                _fold(self._psq_parts[g], s.param_sq_sum[g], fresh)
            self._filled[g] = True
        self._sq.add_(s.sq_norm_sum)
        self.n += s.n
        self._loss += float(s.loss_sum)

    @property
    def loss_sum(self) -> float:
        return self._loss

    def moments(self) -> Moments:
        """The Moments of everything added (float64 numpy, on the host). Ends the accumulator."""
        offsets = self.layout.offsets
        if self.n == 0:
            return empty(offsets, param_moments=self.param_moments)
        if self._sum is None:
            raise RuntimeError("moments() was already taken from this accumulator")
        n, total, psq = self.n, self._sum, self._psq
        for g, filled in enumerate(self._filled):
            if not filled:  # no gradient reached this parameter
                self._sum_parts[g].zero_()
                if psq is not None:
                    self._psq_parts[g].zero_()
        sq_of_sum = torch.stack([torch.dot(part, part) for part in self._sum_parts])  # (G,) ||sum_i g_i||^2
        m2_group = self._sq.sub_(sq_of_sum.div_(n)).clamp_(min=0.0)
        mean = total.mul_(1.0 / n)  # a multiply is cheaper than a divide over P entries
        if psq is not None:  # sum_i g_ik^2 - n mean_k^2, clipped: rounding must not make it negative
            psq.addcmul_(mean, mean, value=-n).clamp_(min=0.0)
        self._sum = self._psq = self._sq = self._sum_parts = self._psq_parts = None
        host = lambda t: None if t is None else t.cpu().numpy()  # noqa: E731
        return Moments(n, host(mean), host(m2_group), host(psq), offsets)


def _fold(dst: torch.Tensor, src: torch.Tensor, fresh: bool) -> None:
    dst = dst.view(src.shape)  # not src.reshape(-1): that would copy a strided src first
    if fresh:
        dst.copy_(src)
    else:
        dst.add_(src)
