"""What predict measured, in the form compare reads back: a predict.parquet row and the headline.

Plain data and numpy only, so reading results never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gns_sweep import stats as st

TOTAL = "total"  # the scope of the whole model


@dataclass(frozen=True)
class ScopeRow:
    """One (checkpoint, scope) measurement: a row of predict.parquet (columns in docs/schemas.md)."""

    task: str
    checkpoint: int
    step: int
    examples_seen: int
    train_loss: float
    eval_loss: float
    scope: str
    n_params: int
    n_examples: int
    estimator: str
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


@dataclass(frozen=True)
class Headline:
    """The prediction a user acts on, for the total scope."""

    b_simple_window: float  # tr and |G|^2 averaged over the last quarter of checkpoints, then divided
    b_simple_run: float  # the same over every checkpoint
    b_simple_start: float  # at the first checkpoint
    window_checkpoints: tuple[int, ...]  # checkpoints in the window


def total_rows(rows: Sequence[ScopeRow]) -> list[ScopeRow]:
    """The whole-model rows, in checkpoint order."""
    return sorted((r for r in rows if r.scope == TOTAL), key=lambda r: r.checkpoint)


def headline(rows: Sequence[ScopeRow]) -> Headline:
    """Near the target: tr(Sigma) and |G|^2 averaged separately over the last quarter of the checkpoints.

    Averaging before dividing keeps one checkpoint whose |G|^2 is near zero from dominating."""
    total = total_rows(rows)
    k = max(1, math.ceil(len(total) / 4))
    window = total[-k:]
    return Headline(
        b_simple_window=st.windowed_b_simple([r.grad_sq_norm for r in window], [r.trace_sigma for r in window]),
        b_simple_run=st.windowed_b_simple([r.grad_sq_norm for r in total], [r.trace_sigma for r in total]),
        b_simple_start=total[0].b_simple,
        window_checkpoints=tuple(r.checkpoint for r in window),
    )
