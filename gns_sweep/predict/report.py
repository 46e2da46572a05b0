"""What predict tells a user beyond the rows: per-layer verdicts, the SNR histogram, the cost per batch size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gns_sweep.results import SUMMARY_SCOPES, ScopeRow


@dataclass(frozen=True)
class LayerFlag:
    """How one layer's noise compares with the reference batch size at the last checkpoint."""

    scope: str
    b_simple: float  # NaN when unresolved
    verdict: str  # "noise-dominated", "signal-dominated" or "unresolved"


def layer_flags(rows: Sequence[ScopeRow], batch_size: int) -> tuple[tuple[LayerFlag, ...], str | None]:
    """Each layer's verdict at the last checkpoint, and the layer with the largest noise scale."""
    last = max(r.checkpoint for r in rows)
    layers = [r for r in rows if r.checkpoint == last and r.scope not in SUMMARY_SCOPES]
    flags = []
    for r in layers:
        if not r.resolved:
            verdict = "unresolved"
        elif r.b_simple > batch_size:
            verdict = "noise-dominated"
        else:
            verdict = "signal-dominated"
        flags.append(LayerFlag(r.scope, r.b_simple, verdict))
    noisiest = None
    if layers:
        # an unresolved layer is noisier than any resolved one: its B_simple is at least the probe size
        top = max(layers, key=lambda r: (not r.resolved, r.b_simple if r.resolved else r.b_simple_lower_bound))
        noisiest = top.scope
    return tuple(flags), noisiest


def snr_histogram(snr: np.ndarray, bins: int = 10) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Histogram of per-parameter SNR on log-spaced bins (SNR spans decades)."""
    values = snr[np.isfinite(snr) & (snr > 0)]
    if values.size == 0:
        return tuple(np.linspace(0, 1, bins + 1)), (0,) * bins
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo * 1.0001 + 1e-12
    bin_edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
    bin_edges[0], bin_edges[-1] = lo, hi  # exact ends, so rounding never drops the extremes
    counts, _ = np.histogram(values, bins=bin_edges)
    counts[0] += int((snr == 0).sum())
    return tuple(float(e) for e in bin_edges), tuple(int(c) for c in counts)


@dataclass(frozen=True)
class NoiseRow:
    """The predicted cost of training at batch size B (McCandlish et al. 2018, eqs. 2.11-2.12)."""

    batch_size: int
    noise: float  # B_simple / B: > 1 means noise-dominated
    steps_multiplier: float  # S(B)/S_min = 1 + B_simple/B
    examples_multiplier: float  # E(B)/E_min = 1 + B/B_simple


def noise_table(b_simple: float, *, max_batch: int | None = None) -> tuple[NoiseRow, ...]:
    """Powers of two from 1 to a few times B_simple."""
    if not (b_simple > 0 and math.isfinite(b_simple)):
        return ()
    top = max_batch or 2 ** min(24, max(4, math.ceil(math.log2(b_simple)) + 3))
    out, b = [], 1
    while b <= top:
        out.append(NoiseRow(b, b_simple / b, 1 + b_simple / b, 1 + b / b_simple))
        b *= 2
    return tuple(out)
