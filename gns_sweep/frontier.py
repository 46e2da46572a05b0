"""The steps/examples frontier of a batch-size sweep (pure math, numpy only).

McCandlish et al. eq. 2.11: steps to a target S(B) = S_min (1 + B_crit/B), i.e.
S = S_min + E_min/B with B_crit = E_min/S_min. The fit is least squares on
log S: a linear fit in 1/B is dominated by the small-batch points (thousands
of steps) and swings wildly between seeds. For a fixed B_crit the best log S_min is a
weighted mean, so the fit is a 1-D search over log B_crit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LR_EDGE_LOW = "low"
LR_EDGE_HIGH = "high"
SEARCH_DECADES = 3.0  # B_crit is searched from min(B)/10^3 to max(B)*10^3


class FitError(ValueError):
    """Too few uncensored batch sizes to fit two parameters."""


@dataclass(frozen=True)
class BatchPoint:
    """One batch size of the sweep, at its best learning rate."""

    batch_size: int
    best_lr: float  # lr with the fewest median steps to target (NaN if no lr reached it)
    lr_edge: str  # "low"/"high" when best_lr is the smallest/largest lr tried, else ""
    steps: float  # median steps-to-target over seeds at best_lr; inf when censored
    examples: float  # steps * batch_size
    seeds_reached: int  # seeds that reached the target at best_lr
    seeds: int  # seeds run at best_lr
    censored: bool  # no lr reached the target in most seeds: left out of the fit


@dataclass(frozen=True)
class Frontier:
    """The fitted S(B) = S_min + E_min/B."""

    s_min: float  # steps needed with infinite batch
    e_min: float  # examples needed with batch size -> 0
    b_crit: float  # E_min / S_min
    n_points: int  # batch sizes in the fit
    rms_log: float  # root-mean-square residual of ln S
    at_bound: bool  # B_crit hit the search range: the measured curve does not bend inside the grid


def median_steps(steps: np.ndarray) -> float:
    """Median over seeds with failures as +inf: censored unless most seeds reached."""
    values = np.where(np.isfinite(steps), steps, np.inf)
    return float(np.median(values))


def batch_points(
    batch_size: Sequence[int], lr: Sequence[float], seed: Sequence[int], steps: Sequence[float]
) -> tuple[BatchPoint, ...]:
    """Best lr per batch size. Trials are rows; steps is NaN where the target was not reached."""
    bs, lrs, stp = np.asarray(batch_size), np.asarray(lr, dtype=float), np.asarray(steps, dtype=float)
    del seed  # one row per seed already; kept in the signature so callers pass whole trials
    points = []
    for b in np.unique(bs):
        rows = bs == b
        grid = np.unique(lrs[rows])
        medians = np.array([median_steps(stp[rows & (lrs == x)]) for x in grid])
        reached = np.array([int(np.isfinite(stp[rows & (lrs == x)]).sum()) for x in grid])
        if np.isfinite(medians).any():
            # fewest steps; ties go to the lr where more seeds reached, then the smaller lr
            k = min(range(len(grid)), key=lambda i: (medians[i], -reached[i], grid[i]))
            edge = ""
            if len(grid) > 1 and k == 0:
                edge = LR_EDGE_LOW
            elif len(grid) > 1 and k == len(grid) - 1:
                edge = LR_EDGE_HIGH
            s = float(medians[k])
            points.append(
                BatchPoint(
                    int(b),
                    float(grid[k]),
                    edge,
                    s,
                    s * int(b),
                    int(reached[k]),
                    int((lrs[rows] == grid[k]).sum()),
                    False,
                )
            )
        else:
            k = int(np.argmax(reached))
            seeds = int((lrs[rows] == grid[k]).sum())
            points.append(BatchPoint(int(b), math.nan, "", math.inf, math.inf, int(reached[k]), seeds, True))
    return tuple(points)


def _profile(log_b: np.ndarray, batch: np.ndarray, log_s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate ln B_crit (K,): the best ln S_min and the weighted SSE."""
    shape = np.log1p(np.exp(log_b)[:, None] / batch[None, :])  # (K, n): ln(1 + B_crit/B)
    resid = log_s[None, :] - shape  # (K, n): ln S_min + error
    log_s_min = (resid * w).sum(axis=1) / w.sum()  # (K,)
    sse = (((resid - log_s_min[:, None]) ** 2) * w).sum(axis=1)
    return log_s_min, sse


def fit_frontier(
    batch_sizes: Sequence[float], steps: Sequence[float], *, weights: Sequence[float] | None = None
) -> Frontier:
    """Fit S = S_min + E_min/B by least squares on ln S over finite points."""
    batch = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(s) & (s > 0) & (w > 0)
    batch, s, w = batch[keep], s[keep], w[keep]
    if np.unique(batch).size < 2:
        raise FitError(f"need at least 2 batch sizes that reached the target to fit the frontier, got {batch.size}")
    log_s = np.log(s)
    lo = math.log(batch.min()) - SEARCH_DECADES * math.log(10)
    hi = math.log(batch.max()) + SEARCH_DECADES * math.log(10)
    grid = np.linspace(lo, hi, 601)
    _, sse = _profile(grid, batch, log_s, w)
    k = int(np.argmin(sse))
    # refine inside the neighbouring grid cells by golden-section search
    a, c = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        x1, x2 = c - ratio * (c - a), a + ratio * (c - a)
        f1, f2 = _profile(np.array([x1, x2]), batch, log_s, w)[1]
        if f1 < f2:
            c = x2
        else:
            a = x1
    log_b = (a + c) / 2
    log_s_min, sse_best = _profile(np.array([log_b]), batch, log_s, w)
    s_min = float(math.exp(log_s_min[0]))
    b_crit = float(math.exp(log_b))
    return Frontier(
        s_min=s_min,
        e_min=s_min * b_crit,
        b_crit=b_crit,
        n_points=int(batch.size),
        rms_log=float(math.sqrt(sse_best[0] / w.sum())),
        at_bound=k in (0, len(grid) - 1),
    )


def fit_points(points: Sequence[BatchPoint]) -> Frontier:
    """Fit the uncensored batch points."""
    good = [p for p in points if not p.censored]
    return fit_frontier([p.batch_size for p in good], [p.steps for p in good])


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval."""

    lo: float  # 2.5th percentile (NaN when no resample could be fitted)
    hi: float  # 97.5th percentile
    fitted: int  # resamples that could be fitted
    resamples: int  # resamples drawn


def bootstrap_b_crit(
    batch_size: Sequence[int],
    lr: Sequence[float],
    seed: Sequence[int],
    steps: Sequence[float],
    *,
    resamples: int = 500,
    rng_seed: int = 0,
) -> Interval:
    """95% interval of B_crit from resampling the seeds with replacement.

    A resample keeps every trial of each drawn seed (a seed shares its initial
    weights across batch sizes, so its trials are not independent), then picks
    the best lr again and refits.
    """
    bs, lrs = np.asarray(batch_size), np.asarray(lr, dtype=float)
    seeds, stp = np.asarray(seed), np.asarray(steps, dtype=float)
    unique = np.unique(seeds)
    rng = np.random.default_rng(rng_seed)
    values = []
    for _ in range(resamples):
        drawn = rng.choice(unique, size=unique.size, replace=True)
        idx = np.concatenate([np.flatnonzero(seeds == s) for s in drawn])
        relabel = np.repeat(np.arange(drawn.size), [int((seeds == s).sum()) for s in drawn])
        try:
            fit = fit_points(batch_points(bs[idx], lrs[idx], relabel, stp[idx]))
        except FitError:
            continue
        values.append(fit.b_crit)
    if not values:
        return Interval(math.nan, math.nan, 0, resamples)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return Interval(float(lo), float(hi), len(values), resamples)


def frontier_steps(s_min: float, b_crit: float, batch: np.ndarray) -> np.ndarray:
    """S(B) = S_min (1 + B_crit/B); with B_crit = B_simple it is the predicted curve."""
    return s_min * (1.0 + b_crit / np.asarray(batch, dtype=float))
