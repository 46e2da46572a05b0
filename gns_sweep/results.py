"""What predict measured, in the form compare reads back: a predict.parquet row and the headline.

Plain data and numpy only, so reading results never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from gns_sweep import stats as st

TOTAL = "total"  # the scope of the whole model
NORM = "norm-layers"  # the scope of every normalization layer's parameters together
SUMMARY_SCOPES = (TOTAL, NORM)  # scopes that are not one layer
SGD = "sgd"  # the optimizer of a file written before optimizers were recorded


@dataclass(frozen=True)
class ScopeRow:
    """One (checkpoint, scope) measurement: a row of predict.parquet (columns in docs/schemas.md)."""

    task: str
    checkpoint: int
    step: int
    examples_seen: int
    train_loss: float
    eval_loss: float
    n_checkpoints: int
    scope: str
    n_params: int
    n_examples: int
    estimator: str
    micro_batch: int
    engine: str
    grad_sq_norm: float
    grad_sq_norm_biased: float
    trace_sigma: float
    b_simple: float
    b_simple_lo: float
    b_simple_hi: float
    b_simple_lower_bound: float
    resolved: bool
    snr_mean: float
    update_ratio: float
    # In the reference run's optimizer's geometry (docs/method.md, "The preconditioned noise scale"):
    # g~ = P^(1/2) g with Adam's P = 1/(sqrt(v_hat) + eps) at this checkpoint; NaN for a non-adaptive optimizer.
    optimizer: str = SGD  # the reference run's optimizer
    trace_sigma_precond: float = math.nan  # unbiased tr(P Sigma)
    grad_sq_norm_precond: float = math.nan  # unbiased G' P G (may be <= 0: unresolved)
    b_simple_precond: float = math.nan  # tr(P Sigma) / G' P G; NaN when unresolved
    b_simple_precond_lo: float = math.nan  # 95% jackknife interval, as for b_simple
    b_simple_precond_hi: float = math.nan


@dataclass(frozen=True)
class Headline:
    """The prediction a user acts on, for the whole model, from the start of the reference run to a loss."""

    b_simple: float  # mean tr(Sigma) / mean |G|^2 over the checkpoints: the headline
    b_simple_lo: float  # 95% bootstrap over checkpoints (each has its own probe: covers probe and path noise)
    b_simple_hi: float
    b_simple_late: float  # the same ratio over the last quarter of those checkpoints
    b_simple_start: float  # at the first checkpoint
    checkpoints: int  # checkpoints averaged
    reached: bool  # the reference run reached the loss (else: every checkpoint, and the value is for less)


def total_rows(rows: Sequence[ScopeRow], scope: str = TOTAL) -> list[ScopeRow]:
    """The rows of one scope (the whole model by default), in checkpoint order."""
    return sorted((r for r in rows if r.scope == scope), key=lambda r: r.checkpoint)


def scope_row(record: Mapping[str, Any]) -> ScopeRow:
    """A predict.parquet row as read back; a file from before the optimizer columns (nulls there) is SGD's."""
    kept = {k: v for k, v in record.items() if k in _FIELDS}
    if kept.get("optimizer") is None:
        kept["optimizer"] = SGD
    for name in PRECOND_FIELDS:
        if kept.get(name) is None:
            kept[name] = math.nan
    return ScopeRow(**kept)


_FIELDS = frozenset(f.name for f in fields(ScopeRow))
PRECOND_FIELDS = (
    "trace_sigma_precond",
    "grad_sq_norm_precond",
    "b_simple_precond",
    "b_simple_precond_lo",
    "b_simple_precond_hi",
)


def headline(
    rows: Sequence[ScopeRow], *, until_loss: float | None = None, scope: str = TOTAL, preconditioned: bool = False
) -> Headline:
    """B_simple averaged over the reference run, numerator and denominator separately, then divided.

    Every checkpoint from the start counts, up to the first whose eval loss is at or below
    `until_loss` (all of them without one). The ratio of means is dominated by no single
    checkpoint whose |G|^2 happens to be near zero, and tracks B_crit, which is itself an average
    of the noise scale along the path from the initial weights to the target (docs/method.md).
    preconditioned: the same from tr(P Sigma) and G' P G, the noise scale in the optimizer's geometry, over
    the checkpoints that have a preconditioner (NaN when none has)."""
    total = total_rows(rows, scope)
    reached = until_loss is None
    if until_loss is not None:
        hit = next((i for i, r in enumerate(total) if r.eval_loss <= until_loss), None)
        reached = hit is not None
        total = total if hit is None else total[: hit + 1]
    if preconditioned:  # the initial weights have no preconditioner yet: those checkpoints are left out
        total = [r for r in total if math.isfinite(r.trace_sigma_precond) and math.isfinite(r.grad_sq_norm_precond)]
        if not total:
            return Headline(math.nan, math.nan, math.nan, math.nan, math.nan, 0, reached)
        g2, tr = [r.grad_sq_norm_precond for r in total], [r.trace_sigma_precond for r in total]
        start = total[0].b_simple_precond
    else:
        g2, tr = [r.grad_sq_norm for r in total], [r.trace_sigma for r in total]
        start = total[0].b_simple
    late = max(1, math.ceil(len(total) / 4))
    lo, hi = st.bootstrap_ratio_of_means(tr, g2)
    return Headline(
        b_simple=st.windowed_b_simple(g2, tr),
        b_simple_lo=lo,
        b_simple_hi=hi,
        b_simple_late=st.windowed_b_simple(g2[-late:], tr[-late:]),
        b_simple_start=start,
        checkpoints=len(total),
        reached=reached,
    )
