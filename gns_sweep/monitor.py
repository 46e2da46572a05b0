"""GnsMonitor: the gradient noise scale of a user's own training loop, readable at any step.

Two estimators, chosen by how the monitor is made (docs/monitor.md has the example loops):

- **per-example** (`GnsMonitor(model, loss=fn)`): `forward_backward(x, y)` takes the place of the
  loop's forward and `loss.mean().backward()`. It runs the fast engine (per_example/fast.py) once:
  one forward and one backward that yield the sum of the per-example gradients and the per-example
  squared norms, per parameter tensor. The sum divided by the batch size goes into `.grad`, as a plain
  backward would leave it, so the optimizer step is unchanged. tr(Sigma) and |G|^2 are the unbiased
  per-example estimates of gns_sweep.stats over the batch. `every=m` measures one call in m, and makes
  the others a plain forward and backward, for 1/m of the cost.
- **micro-batch** (`GnsMonitor(model)`): the loop does its own backward for each of k >= 2 micro-batches
  of a step (gradient accumulation) and calls `micro_batch(n)` after each; `update()` ends the step. The
  gradient a micro-batch added to `.grad` is d_j = c_j m_j, with m_j the gradient of its mean loss and
  c_j what the loop scaled that loss by (b_j/B by default: what leaves the batch's mean gradient in
  `.grad`). With S = sum_j d_j (the step's `.grad`), independent micro-batches give
      E ||S||^2          = (sum c_j)^2 |G|^2 + T tr(Sigma)
      E sum_j ||d_j||^2  = (sum c_j^2) |G|^2 + T tr(Sigma),     T = sum_j c_j^2 / b_j,
  two linear equations whose solution is unbiased for both; for k equal micro-batches it is McCandlish
  et al.'s two-batch estimator with B_small = b and B_big = k b (`two_batch_estimate`). No per-example
  work: a few passes over the parameters per micro-batch.
- **data-parallel** (`GnsMonitor(ddp_model)`, a DistributedDataParallel model): the same estimator with
  the ranks as the micro-batches. A DDP communication hook takes, per parameter tensor, the squared norm
  of the rank's local gradient (the step's, accumulated under `no_sync()` or not) before the usual
  averaging all-reduce; `update(n)` ends the step with one all-reduce of those norms (G + 3 numbers) and
  solves with the averaged `.grad` as S, c_r = 1/world and b_r each rank's examples.

All three produce, per parameter tensor, one unbiased |G|^2 and tr(Sigma) per step. Each is smoothed by an
exponential moving average, numerator and denominator separately, and a scope's B_simple is the ratio
of its smoothed sums: one step's ratio of two noisy unbiased estimates is biased and heavy-tailed
when its |G|^2 is near zero, while their averages stay unbiased and their ratio steadier. The averages
are bias-corrected as in Adam (divided by 1 - beta^t after t updates), so that early readings of |G|^2
and tr(Sigma) are weighted means of the updates so far rather than values shrunk towards the zero
they start from; B_simple, a ratio of two averages with the same weights, is the same either way.
Scopes are those of predict: `total`, `norm-layers` (if the model has normalization layers) and one
per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gns_sweep.errors import UsageError
from gns_sweep.per_example.base import LossFn, check_losses, couples, coupling_candidates
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.layout import ParamLayout, param_layout
from gns_sweep.results import TOTAL

PER_EXAMPLE = "per-example"  # forward_backward: the fast engine's per-example norms
MICRO_BATCH = "micro-batch"  # micro_batch / update: the gradients of the micro-batches of accumulation
DATA_PARALLEL = "data-parallel"  # a DDP comm hook / update(n): the ranks' local gradients
DEFAULT_BETA = 0.95  # EMA decay per update: a window of about 1 / (1 - beta) = 20 updates


@dataclass(frozen=True)
class NoiseReading:
    """The noise scale of one scope, as the monitor reads it."""

    scope: str  # "total", "norm-layers" or a layer (the owning module's name)
    grad_sq_norm: float  # |G|^2: the bias-corrected EMA of the updates, or the last update's alone
    trace_sigma: float  # tr(Sigma) of one example's gradient, likewise
    b_simple: float  # trace_sigma / grad_sq_norm; NaN while grad_sq_norm <= 0 (not resolved) or before any update
    updates: int  # updates folded in so far
    smoothed: bool  # True: EMA values; False: the last update's own estimates


def two_batch_estimate(
    small_sq: torch.Tensor, big_sq: torch.Tensor, *, b_small: float, b_big: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|G|^2, tr(Sigma)) from squared gradient norms at two batch sizes (McCandlish et al., App. A.1).

    small_sq: ||g||^2 of the mean gradient of a batch of b_small examples (or the mean of several such);
    big_sq: the same for b_big examples. Any shape (per parameter tensor, per scope); unbiased when the
    batches are independent samples, since E ||g_B||^2 = |G|^2 + tr(Sigma) / B."""
    if not 0 < b_small < b_big:
        raise UsageError(f"the two-batch estimate needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def accumulation_estimate(
    part_sq: torch.Tensor, total_sq: torch.Tensor, sizes: Sequence[int], scales: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|G|^2, tr(Sigma)), each (G,), from the k micro-batches of one step (module docstring).

    part_sq: (k, G) ||d_j||^2 per micro-batch and parameter tensor, d_j = scales[j] m_j the gradient micro-batch
    j added, or (G,) their sum over the micro-batches, which is all the estimate needs (e.g. all-reduced over
    data-parallel ranks); total_sq: (G,) ||sum_j d_j||^2; sizes: b_j, the micro-batches' examples."""
    c1, c2 = math.fsum(scales), math.fsum(c * c for c in scales)
    t = math.fsum(c * c / b for c, b in zip(scales, sizes, strict=True))
    a1 = part_sq.sum(0) if part_sq.dim() == 2 else part_sq  # (G,)
    return _solve(a1, total_sq, c1, c2, t)


def _solve(a1: torch.Tensor, total_sq: torch.Tensor, c1, c2, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The two equations of the module docstring, a1 = sum_j ||d_j||^2; c1, c2, t floats or 0-d tensors."""
    g2 = (total_sq - a1) / (c1 * c1 - c2)
    return g2, (a1 - c2 * g2) / t


class GnsMonitor:
    """The noise scale of a model trained in the user's own loop (module docstring; docs/monitor.md).

    Make it after the model is built, with `loss` (per-example losses, shape (N,)) for the per-example
    estimator, or without for the micro-batch one; made with a DistributedDataParallel model (after
    init_process_group and before the first backward), it is the data-parallel one, and registers a
    communication hook on that model. Read it with `b_simple()`, `read()` or `read_all()`."""

    def __init__(
        self, model: nn.Module, loss: LossFn | None = None, *, beta: float = DEFAULT_BETA, every: int = 1
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"GnsMonitor needs the torch model (an nn.Module), got {type(model).__name__}")
        ddp = model if isinstance(model, DistributedDataParallel) else None
        if ddp is not None and loss is not None:
            raise UsageError(
                "the per-example estimator does not run under DistributedDataParallel; make the monitor without "
                "loss=, GnsMonitor(ddp_model), and call update(n) after each step's backward"
            )
        model = model if ddp is None else ddp.module  # scopes named as in the wrapped model
        if loss is not None and not callable(loss):
            raise UsageError(f"loss must be a function (outputs, targets) -> per-example losses (N,), got {loss!r}")
        if not (isinstance(beta, int | float) and 0 <= beta < 1):
            raise UsageError(f"beta must be in [0, 1) (0: no smoothing; 0.95: about 20 updates), got {beta!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive integer (measure one forward_backward in every), got {every!r}")
        try:
            self.layout: ParamLayout = param_layout(model)
        except ValueError:
            raise UsageError("the model has no trainable parameters; the monitor measures their gradients") from None
        self.model = model
        self.estimator = PER_EXAMPLE if loss is not None else MICRO_BATCH if ddp is None else DATA_PARALLEL
        self.beta = float(beta)
        self.every = every  # forward_backward measures its 1st, (every+1)th, ... call; the others are plain
        self._calls = 0
        self._loss = loss
        named = dict(model.named_parameters())
        self._params = [named[k] for k in self.layout.names]  # layout order
        self._engine = FastEngine() if loss is not None else None
        self._coupling = coupling_candidates(model)
        self._scopes = {s: np.asarray(g, dtype=np.int64) for s, g in self.layout.scopes.items()}
        self.updates = 0
        self._ema: torch.Tensor | None = None  # (2, G) float64: EMA of |G|^2 and of tr(Sigma) per tensor
        self._last: torch.Tensor | None = None  # (2, G) float64: the last update's own
        self._prev: list[torch.Tensor | None] = [None] * len(self._params)  # .grad after the last micro-batch
        self._seen = [False] * len(self._params)  # in this step: _prev holds a gradient
        self._parts: list[torch.Tensor] = []  # per micro-batch of this step: (G,) ||d_j||^2
        self._sizes: list[int] = []  # b_j
        self._scales: list[float | None] = []  # c_j as given (None: b_j / B)
        self._group = None  # data-parallel: the DDP model's process group
        self._world = 0  # data-parallel: its number of ranks
        self._index: dict[int, int] = {}  # data-parallel: id(parameter) -> its place in the layout
        self._bucket_groups: dict[tuple[int, ...], torch.Tensor] = {}  # layout places of a bucket's tensors
        self._local: torch.Tensor | None = None  # data-parallel: (G,) float64 ||local grad||^2, this step
        self._buckets: set[int] = set()  # data-parallel: the buckets all-reduced in this step
        self._twice = False  # data-parallel: a bucket was all-reduced twice in this step
        if ddp is not None:
            self._attach(ddp)

    # --- per-example ------------------------------------------------------------------------------

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, *, weight: float = 1.0) -> torch.Tensor:
        """Forward and backward of one batch, in place of `loss = loss_fn(model(x), y).mean(); loss.backward()`.

        Adds weight * (the batch's mean gradient) to each parameter's `.grad`, as `(loss * weight).backward()`
        would, and folds this batch's |G|^2 and tr(Sigma) into the monitor. Returns the mean loss (0-d,
        detached). With `every` = m > 1, only one call in m measures; the others are a plain forward and
        backward, and cost no more than one."""
        if self.estimator == DATA_PARALLEL:
            raise UsageError(
                "forward_backward() is the per-example estimator, which does not run under DistributedDataParallel; "
                "run the loop's own forward and backward through the DDP model and call update(n) after it"
            )
        if self._engine is None:
            raise UsageError(
                "forward_backward needs the per-example loss: make the monitor with GnsMonitor(model, loss=fn), "
                "fn(outputs, targets) -> (N,); without it, call micro_batch(n) after each backward and update()"
            )
        self._calls += 1
        if (self._calls - 1) % self.every:
            with torch.enable_grad():
                losses = self._loss(self.model(inputs), targets)
                check_losses(losses, inputs.shape[0])
                loss = losses.mean()
                (loss * weight).backward()
            return loss.detach()
        n = int(inputs.shape[0]) if inputs.dim() else 0
        if n < 2:
            raise UsageError(f"forward_backward got a batch of {n} example(s); a variance needs at least 2 examples")
        for name, module in self._coupling:
            if couples(module):
                raise UsageError(
                    f"layer '{name}' ({type(module).__name__}) couples the examples of a batch, so per-example "
                    "gradients are undefined; make the monitor without loss= and use micro_batch()/update()"
                )
        sums = self._engine.batch_sums(self.model, inputs, targets, self._loss, self.layout, param_moments=False)
        with torch.no_grad():
            present = [g for g, s in enumerate(sums.grad_sum) if s is not None]
            grads = [sums.grad_sum[g] for g in present]
            # (G,) ||sum_i g_i||^2, in float64: M2 below is a difference of nearly equal terms when B_simple << 1
            sq_sum = _sq_norms(grads, present, len(self._params), float64=True) if grads else sums.sq_norm_sum * 0
            # stats.estimate per tensor (linear in its sums, so scopes add): M2 = sum ||g_i||^2 - ||sum g_i||^2 / n
            m2 = (sums.sq_norm_sum - sq_sum / n).clamp_(min=0.0)
            trace = m2 / (n - 1)
            self._fold(sq_sum / (n * n) - trace / n, trace)
            _add_grads([self._params[g] for g in present], grads, weight / n)
        return sums.loss_sum / n

    # --- micro-batch ------------------------------------------------------------------------------

    def micro_batch(self, n: int, *, scale: float | None = None) -> None:
        """Record the micro-batch whose backward just ran: n examples; `.grad` has grown by its gradient.

        scale: what the loop multiplied the micro-batch's mean loss by before backward. None (default):
        n / (the step's examples), as a loop that divides each of k equal micro-batches' mean loss by k
        does; give every micro-batch of a step a scale, or none. Zero `.grad` before a step's first
        micro-batch (optimizer.zero_grad() does)."""
        if self._engine is not None:
            raise UsageError(
                "this monitor measures per-example norms in forward_backward(); for the micro-batch estimator "
                "make it without loss=: GnsMonitor(model)"
            )
        if self.estimator == DATA_PARALLEL:
            raise UsageError(
                "under DistributedDataParallel the ranks are the micro-batches: run a step's micro-batches but the "
                "last under ddp_model.no_sync(), and call update(n) once, n this rank's examples in the step"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"micro_batch(n) takes the micro-batch's number of examples, a positive int; got {n!r}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise UsageError(f"scale must be a finite number > 0 (the factor on the micro-batch's loss), got {scale!r}")
        if self._scales and (scale is None) != (self._scales[0] is None):
            raise UsageError("give scale= to every micro_batch() of a step, or to none of them")
        now = [p.grad for p in self._params]
        with torch.no_grad():
            complete = not any(grad is None for grad in now)
            if complete and all(self._seen):  # every micro-batch but a step's first
                torch._foreach_sub_(self._prev, now)  # -d_j, in the buffers that held .grad before this backward
                sq = _sq_norms(self._prev, None, len(now), float64=False)  # (G,) ||d_j||^2
                torch._foreach_copy_(self._prev, now)
            elif complete and not any(self._seen) and self._fits(now):  # a step's first: d_1 is .grad
                sq = _sq_norms(now, None, len(now), float64=False)
                torch._foreach_copy_(self._prev, now)
                self._seen = [True] * len(now)
            else:
                sq = self._first_parts(now)
        self._parts.append(sq)
        self._sizes.append(n)
        self._scales.append(scale)

    def _fits(self, now: list[torch.Tensor]) -> bool:
        """The buffers from earlier steps can hold these gradients."""
        pairs = zip(self._prev, now, strict=True)
        return all(p is not None and p.shape == g.shape and p.dtype == g.dtype for p, g in pairs)

    def _first_parts(self, now: list[torch.Tensor | None]) -> torch.Tensor:
        """micro_batch()'s squared norms where some tensor has no gradient yet, or had none before."""
        for g, grad in enumerate(now):
            if grad is None and self._seen[g]:
                raise UsageError(
                    f"the gradient of '{self.layout.names[g]}' was cleared between micro_batch() calls; zero the "
                    "gradients before a step's first micro-batch only, and call update() at the end of each step"
                )
        present = [g for g, grad in enumerate(now) if grad is not None]
        if not present:
            raise UsageError("micro_batch() found no gradient; call it after the micro-batch's loss.backward()")
        after = [g for g in present if self._seen[g]]
        first = [g for g in present if not self._seen[g]]
        diffs = torch._foreach_sub([now[g] for g in after], [self._prev[g] for g in after]) if after else []
        sq = _sq_norms(list(diffs) + [now[g] for g in first], after + first, len(now), float64=False)
        for g in present:  # the buffers persist across steps: a copy, once allocated
            prev = self._prev[g]
            if prev is None or prev.shape != now[g].shape or prev.dtype != now[g].dtype:
                self._prev[g] = now[g].detach().clone()
            else:
                prev.copy_(now[g])
            self._seen[g] = True
        return sq

    def update(self, n: int | None = None, *, scale: float | None = None) -> None:
        """End the step: fold its estimate into the monitor. Call it after the step's last backward (and
        micro_batch()), before the next step's zero_grad().

        Data-parallel only (a monitor made with a DDP model), and then on every rank: n, this rank's examples
        in the step (of all its micro-batches); scale, what the loop multiplied the mean loss of those n
        examples by (default 1: the rank's local gradient is their mean gradient, as a mean loss, or k
        micro-batches' mean losses each divided by k, leave it)."""
        if self._engine is not None:
            raise UsageError("update() ends a step of micro-batches; this monitor updates in forward_backward()")
        if self.estimator == DATA_PARALLEL:
            self._update_ranks(n, 1.0 if scale is None else scale)
            return
        if n is not None or scale is not None:
            raise UsageError(
                "update() takes no arguments with micro-batches: give each micro-batch's size and scale to "
                "micro_batch(n, scale=...)"
            )
        k = len(self._parts)
        if k < 2:
            raise UsageError(
                f"update() found {k} micro-batch(es) in this step; the estimate needs k >= 2: split the batch into "
                "micro-batches, with one backward and one micro_batch(n) call each"
            )
        total = sum(self._sizes)
        scales = [b / total if c is None else c for b, c in zip(self._sizes, self._scales, strict=True)]
        seen = [g for g in range(len(self._params)) if self._seen[g]]
        with torch.no_grad():
            part_sq = torch.stack(self._parts)  # (k, G)
            # (G,) ||S||^2, S being .grad after the last micro-batch
            groups = None if len(seen) == len(self._params) else seen
            total_sq = _sq_norms([self._prev[g] for g in seen], groups, len(self._params), float64=False)
            g2, trace = accumulation_estimate(part_sq, total_sq, self._sizes, scales)
        self._parts, self._sizes, self._scales = [], [], []
        self._seen = [False] * len(self._params)
        self._fold(g2, trace)

    # --- data-parallel ----------------------------------------------------------------------------

    def _attach(self, ddp: DistributedDataParallel) -> None:
        """Register the hook that measures each rank's local gradient on the DDP model."""
        ignored = [name for name in self.layout.names if name in ddp.parameters_to_ignore]
        if ignored:
            raise UsageError(
                f"DDP does not all-reduce the gradient of '{ignored[0]}' (parameters_to_ignore), so the ranks' "
                "gradients differ; freeze it (requires_grad=False) or let DDP synchronize it"
            )
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
                raise UsageError(
                    f"layer '{name}' has sparse gradients, which the data-parallel estimator does not read; "
                    "make it with sparse=False"
                )
        hooked = UsageError(
            "the DDP model already has a communication hook; the monitor registers its own (DDP's default "
            "averaging all-reduce, after measuring): make the monitor with a DDP model that has none"
        )
        if getattr(ddp, "_comm_hooks", None):
            raise hooked
        self._group = ddp.process_group
        self._world = dist.get_world_size(self._group)
        if self._world < 2:
            raise UsageError(
                f"the DDP model's process group has {self._world} rank; the ranks are the estimator's micro-batches "
                "and it needs 2 or more: in one process use GnsMonitor(model) with gradient accumulation"
            )
        # imported here: it needs a torch built with torch.distributed, which only a DDP model implies
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._allreduce = allreduce_hook  # DDP's result without a hook: the mean over the ranks
        self._index = {id(p): g for g, p in enumerate(self._params)}
        try:
            ddp.register_comm_hook(self._group, self._measure_bucket)
        except RuntimeError:  # a built-in hook (register_builtin_comm_hook) is not in _comm_hooks
            raise hooked from None

    def _measure_bucket(self, group, bucket):  # no annotations: DDP checks them, and these would be strings
        """DDP's comm hook (group: a ProcessGroup, bucket: a GradBucket; returns a Future): add the squared norms
        of this rank's local gradients in the bucket to the step's (G,), then average the bucket over the ranks
        as DDP does without a hook (allreduce_hook)."""
        with torch.no_grad():
            grads = bucket.gradients()  # views of bucket.buffer(), which holds the local gradients until reduced
            key = tuple(self._index[id(p)] for p in bucket.parameters())
            groups = self._bucket_groups.get(key)
            if groups is None:  # buckets are fixed after DDP's first iteration: a handful of these per run
                groups = self._bucket_groups[key] = torch.tensor(key, device=grads[0].device)
            sq = _sq_norms(grads, None, len(grads), float64=False)  # (bucket's tensors,)
            if self._local is None:
                self._local = torch.zeros(len(self._params), dtype=torch.float64, device=sq.device)
            self._local.index_add_(0, groups, sq)
            self._twice |= bucket.index() in self._buckets
            self._buckets.add(bucket.index())
        return self._allreduce(group, bucket)

    def _update_ranks(self, n: int | None, scale: float) -> None:
        """update() of the data-parallel estimator: k = world size micro-batches, d_r = (local grad of rank r)
        / world, S = .grad; one all-reduce of sum_r ||local_r||^2 and rank r's c_r, c_r^2, c_r^2 / b_r."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(
                f"with DDP, update(n) takes this rank's number of examples in the step (all its micro-batches), "
                f"a positive int; got {n!r}"
            )
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise UsageError(f"scale must be a finite number > 0 (the factor on the rank's mean loss), got {scale!r}")
        local, twice = self._local, self._twice
        self._local, self._buckets, self._twice = None, set(), False
        if local is None:
            raise UsageError(
                "update() found no all-reduced gradient since the last update; call it after the step's backward "
                "outside ddp_model.no_sync(), on every rank"
            )
        if twice:
            raise UsageError(
                "more than one backward of this step all-reduced the gradients; run every micro-batch but the last "
                "under ddp_model.no_sync(), and call update(n) once per step"
            )
        now = [p.grad for p in self._params]
        present = [g for g, grad in enumerate(now) if grad is not None]  # None: unused on every rank
        if not present:
            raise UsageError("update() found no gradient; call it after the step's backward, before zero_grad()")
        g_count, w = len(self._params), self._world
        with torch.no_grad():
            c = scale / w
            coefs = torch.tensor([c, c * c, c * c / n], dtype=torch.float64).to(local.device)
            summed = torch.cat([local, coefs])  # (G + 3,)
            dist.all_reduce(summed, group=self._group)  # the sum over the ranks
            groups = None if len(present) == g_count else present
            total_sq = _sq_norms([now[g] for g in present], groups, g_count, float64=False)  # (G,) ||S||^2
            c1, c2, t = summed[g_count:]
            g2, trace = _solve(summed[:g_count] / (w * w), total_sq, c1, c2, t)
        self._fold(g2, trace)

    # --- any estimator ----------------------------------------------------------------------------

    def observe(self, grad_sq_norm: torch.Tensor, trace_sigma: torch.Tensor) -> None:
        """Fold in one update's unbiased estimates from elsewhere, (G,) per parameter tensor in the order of
        `layout.names`: e.g. `accumulation_estimate` of a data-parallel loop that all-reduces by itself
        (docs/monitor.md)."""
        g = len(self._params)
        g2, trace = torch.as_tensor(grad_sq_norm), torch.as_tensor(trace_sigma)
        if g2.shape != (g,) or trace.shape != (g,):
            raise UsageError(
                f"observe() takes one value per parameter tensor, shape ({g},) in the order of monitor.layout.names; "
                f"got {tuple(g2.shape)} and {tuple(trace.shape)}"
            )
        self._fold(g2.to(torch.float64), trace.to(torch.float64))

    def _fold(self, g2: torch.Tensor, trace: torch.Tensor) -> None:
        last = torch.stack([g2, trace])  # (2, G) float64, on the gradients' device: no sync per step
        self._last = last
        if self._ema is None:  # started at zero, as Adam's: the reading divides by 1 - beta^t
            self._ema = torch.zeros_like(last)
        self._ema.mul_(self.beta).add_(last, alpha=1 - self.beta)
        self.updates += 1

    def reset(self) -> None:
        """Forget every update (e.g. after the model or the data changed)."""
        self._ema = self._last = None
        self.updates = 0

    # --- reading ----------------------------------------------------------------------------------

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self._scopes)

    def b_simple(self, scope: str = TOTAL) -> float:
        """The smoothed noise scale of a scope: NaN before the first update or while |G|^2 <= 0."""
        return self.read(scope).b_simple

    def read(self, scope: str = TOTAL, *, smoothed: bool = True) -> NoiseReading:
        """One scope's reading: the EMA (smoothed) or the last update's own estimates."""
        if scope not in self._scopes:
            raise UsageError(f"unknown scope {scope!r}; the monitor's scopes are: {', '.join(self._scopes)}")
        return self._readings([scope], smoothed)[scope]

    def read_all(self, *, smoothed: bool = True) -> dict[str, NoiseReading]:
        """Every scope's reading, in the order of `scopes`."""
        return self._readings(list(self._scopes), smoothed)

    def _readings(self, scopes: list[str], smoothed: bool) -> dict[str, NoiseReading]:
        state = self._ema if smoothed else self._last
        if state is None:
            return {s: NoiseReading(s, math.nan, math.nan, math.nan, 0, smoothed) for s in scopes}
        values = state.cpu().numpy()  # (2, G)
        if smoothed:  # Adam's bias correction: the weights beta^(t-s) (1 - beta) of updates 1..t sum to 1 - beta^t
            values = values / (1.0 - self.beta**self.updates)
        out = {}
        for s in scopes:
            g2, trace = (float(v) for v in values[:, self._scopes[s]].sum(1))
            b = trace / g2 if g2 > 0 and math.isfinite(g2) else math.nan
            out[s] = NoiseReading(s, g2, trace, b, self.updates, smoothed)
        return out


def _sq_norms(tensors: list[torch.Tensor], groups: list[int] | None, size: int, *, float64: bool) -> torch.Tensor:
    """(size,) float64 with ||tensors[i]||^2 at groups[i] and 0 elsewhere (groups None: all, in order).

    float64=False takes the norms in float32 (a third of the time on CPU) and squares them in float64: ~1e-7
    relative, of which the micro-batch estimate's differences lose about log10(B_noise / B) digits, far less
    than its sampling noise."""
    dtypes = {t.dtype for t in tensors}
    # float16's norms overflow from 256 on; mixed dtypes would not stack
    dtype = torch.float64 if float64 else None if dtypes in ({torch.float32}, {torch.float64}) else torch.float32
    stacked = torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    if groups is None:
        return stacked.double().square_()
    out = torch.zeros(size, dtype=torch.float64, device=stacked.device)
    return out.index_copy_(0, torch.tensor(groups, device=out.device), stacked.double().square_())


def _add_grads(params: list[torch.Tensor], grads: list[torch.Tensor], factor: float) -> None:
    """p.grad += factor * g, as a backward accumulates (a new tensor where .grad is None)."""
    scaled = torch._foreach_mul(grads, factor)
    for p, g in zip(params, scaled, strict=True):
        g = g if g.dtype == p.dtype else g.to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
