"""The micro-batch engine: gradients of micro-batches of b examples, for layers that couple examples.

Where a layer mixes the examples of a batch (BatchNorm in train mode), an
example has no gradient of its own. A micro-batch of b examples does: the
gradient m_j of the mean loss over its b examples, with the coupling layer
computing its statistics over those b. The engine splits the examples it is
given into consecutive micro-batches of b, runs one ordinary forward and
backward per micro-batch, and returns `BatchSums` in which each m_j plays the
part of one example: n counts micro-batches and the loss sum adds the
micro-batches' mean losses. `SumAccumulator` and `stats.Moments` take them
unchanged; `stats.estimate(..., micro_batch=b)` turns their moments into the
per-example scale, tr(Sigma) = b tr(Sigma_b) (docs/method.md, "The micro-batch
estimator").

The model is run in the mode it is given: BatchNorm couples the examples in
train mode, which is how predict measures. Each micro-batch sees the model's
buffers as they were given (BatchNorm's running statistics, which its forward
updates, are put back after each), so a micro-batch's gradient does not depend
on which micro-batches ran before it, nor on how the examples were split into
calls. The number of examples must be a multiple of b: a partial micro-batch
would be a sample of another size, whose covariance is not Sigma_b.
"""

from __future__ import annotations

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example.base import LossFn, check_losses
from gns_sweep.per_example.batch_dim import buffers_kept
from gns_sweep.per_example.layout import ParamLayout
from gns_sweep.per_example.sums import BatchSums

# A BatchNorm1d on (B, C) features maps each feature to +-1 at b = 2, whatever the input's scale, so
# almost no gradient reaches the layers below it; at 8 its statistics are those of a small but ordinary
# batch. Without a coupling layer the estimate does not depend on b in expectation, and only tr(Sigma)'s
# sampling error grows with b (|G|^2's hardly changes), so a moderate b costs little.
DEFAULT_MICRO_BATCH = 8


class MicroBatchEngine:
    """Gradient statistics with micro-batches of `micro_batch` examples as the samples (module docstring).

    Set `micro_batch` to the batch size whose noise you want where a layer couples examples: the coupled
    gradient noise depends on it. b = 1 gives the per-example gradients (the loop engine's), which exist
    only without coupling."""

    name = "micro-batch"

    def __init__(self, micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise UsageError(f"micro_batch must be a positive integer (examples per micro-batch), got {micro_batch!r}")
        self.micro_batch = micro_batch  # also tells shard_moments not to refuse coupling layers

    def batch_sums(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss: LossFn,
        layout: ParamLayout,
        *,
        param_moments: bool,
    ) -> BatchSums:
        b, n = self.micro_batch, inputs.shape[0]
        check_divisible(n, b)
        named = dict(model.named_parameters())
        params = [named[k] for k in layout.names]
        kw = {"dtype": torch.float64, "device": params[0].device}
        grad_sum = torch.zeros(layout.n_params, **kw)  # (P,) sum_j m_j
        sq_sum = torch.zeros(layout.n_params, **kw) if param_moments else None  # (P,) sum_j m_j^2
        sq_norm_sum = torch.zeros(len(params), **kw)  # (G,) sum_j ||m_j[group]||^2
        loss_sum = torch.zeros((), **kw)  # sum_j of the micro-batch mean losses
        for start in range(0, n, b):
            m, mean_loss = micro_batch_grad(model, inputs[start : start + b], targets[start : start + b], loss, params)
            grad_sum.add_(m)
            sq = m.square_()  # m is ours: squared in place
            sq_norm_sum.add_(torch.stack([part.sum() for part in sq.split(list(layout.sizes))]))
            if sq_sum is not None:
                sq_sum.add_(sq)
            loss_sum.add_(mean_loss)
        return BatchSums(
            n=n // b,
            loss_sum=loss_sum,
            grad_sum=_per_param(grad_sum, params),
            sq_norm_sum=sq_norm_sum,
            param_sq_sum=None if sq_sum is None else _per_param(sq_sum, params),
        )


def _per_param(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat (P,) vector as views shaped like each parameter."""
    return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]


def check_divisible(n: int, b: int) -> None:
    if n % b:
        raise UsageError(
            f"{n} examples do not split into micro-batches of {b}; give a multiple of {b} examples "
            "(a partial micro-batch would be a sample of another size)"
        )


def micro_batch_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn, params: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of the mean loss over one micro-batch, flattened in the order of `params` in float64
    (P,), and that mean loss (0-d float64). The model's buffers are put back after the backward (not
    between forward and backward: that would change tensors the graph saved)."""
    with torch.enable_grad(), buffers_kept(model, every=True):
        losses = loss(model(x), y)  # (b,)
        check_losses(losses, x.shape[0])
        mean = losses.mean()
        grads = torch.autograd.grad(mean, params, allow_unused=True)
    flat = torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )
    return flat.to(torch.float64), mean.detach().double()
