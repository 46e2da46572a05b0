"""Mergeable gradient statistics and the noise-scale estimators (pure math).

Conventions: g_i is the gradient of example i's own loss (not divided by a batch size). Per
scope, with N examples,
    tr(Sigma) = 1/(N-1) sum ||g_i - gbar||^2            (unbiased)
    |G|^2     = ||gbar||^2 - tr(Sigma)/N                 (unbiased)
    B_simple  = tr(Sigma) / |G|^2, only when |G|^2 > 0.
Where a layer couples the examples (BatchNorm), the samples are instead the mean
gradients m_j of M micro-batches of b examples; `micro_batch=b` then gives
tr(Sigma) = b tr(Sigma_b), tr(Sigma_b) = 1/(M-1) sum ||m_j - mbar||^2 and
|G|^2 = ||mbar||^2 - tr(Sigma_b)/M (docs/method.md).
For an optimizer with a diagonal preconditioner P (Adam's 1/(sqrt(v_hat)+eps)), the same estimators
applied to g~_i = P^(1/2) g_i give B_simple^P = tr(P Sigma)/(G' P G): `precondition` maps the moments
of the g_i to those of the g~_i, exactly, so every estimator below applies unchanged.

Statistics are kept in the (n, mean, M2) form and combined with Chan et al.'s
pairwise update, so merging shards never subtracts two large sums. Parameters
are flattened into one vector of P entries, cut into G contiguous groups (one
per parameter tensor); a scope (a layer, or the whole model) is a set of groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a set of flattened per-example gradients."""

    n: int  # number of examples
    mean: np.ndarray  # (P,) float64, mean gradient over the examples
    m2_group: np.ndarray  # (G,) float64, sum_i ||g_i[group] - mean[group]||^2
    m2_param: np.ndarray | None  # (P,) float64, sum_i (g_ik - mean_k)^2; None if not collected
    offsets: np.ndarray  # (G+1,) int64, group g is mean[offsets[g]:offsets[g+1]]


def empty(offsets: np.ndarray, *, param_moments: bool) -> Moments:
    p = int(offsets[-1])
    return Moments(
        n=0,
        mean=np.zeros(p),
        m2_group=np.zeros(len(offsets) - 1),
        m2_param=np.zeros(p) if param_moments else None,
        offsets=np.asarray(offsets, dtype=np.int64),
    )


def group_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum a (P,) vector within each group -> (G,), in float64."""
    starts = offsets[:-1]
    sums = np.add.reduceat(values, starts, dtype=np.float64) if values.size else np.zeros(len(starts))
    empty = offsets[1:] == starts  # reduceat returns values[start] for an empty group
    if empty.any():
        sums[empty] = 0.0
    return sums


def from_samples(grads: np.ndarray, offsets: np.ndarray, *, param_moments: bool) -> Moments:
    """Moments of explicit per-example gradients grads (N, P), two-pass."""
    grads = np.asarray(grads, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    mean = grads.mean(axis=0)
    dev2 = ((grads - mean) ** 2).sum(axis=0)  # (P,)
    return Moments(grads.shape[0], mean, group_sums(dev2, offsets), dev2 if param_moments else None, offsets)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise merge of the moments of two disjoint example sets."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    w = a.n * b.n / n
    m2_param = None
    if a.m2_param is not None and b.m2_param is not None:
        m2_param = a.m2_param + b.m2_param + w * delta * delta
    return Moments(
        n=n,
        mean=a.mean + delta * (b.n / n),
        m2_group=a.m2_group + b.m2_group + w * group_sums(delta * delta, a.offsets),
        m2_param=m2_param,
        offsets=a.offsets,
    )


def merge_all(parts: Sequence[Moments]) -> Moments:
    """Merge in a balanced tree, so rounding does not depend on a long chain."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    while len(parts) > 1:
        parts = [merge(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def subtract(total: Moments, part: Moments) -> Moments:
    """The moments of `total` without the examples of `part` (inverse of merge)."""
    n = total.n - part.n
    if n < 0:
        raise ValueError(f"cannot remove {part.n} examples from {total.n}")
    if n == 0:
        return empty(total.offsets, param_moments=total.m2_param is not None)
    mean = (total.n * total.mean - part.n * part.mean) / n
    delta = part.mean - mean
    w = n * part.n / total.n
    m2_group = total.m2_group - part.m2_group - w * group_sums(delta * delta, total.offsets)
    m2_param = None
    if total.m2_param is not None and part.m2_param is not None:
        m2_param = np.maximum(total.m2_param - part.m2_param - w * delta * delta, 0.0)
    return Moments(n, mean, np.maximum(m2_group, 0.0), m2_param, total.offsets)


def precondition(m: Moments, p: np.ndarray) -> Moments:
    """The moments of g~_i = P^(1/2) g_i for a diagonal preconditioner P, p its (P,) diagonal (> 0).

    A rescaling of each coordinate: mean~_k = sqrt(p_k) mean_k and M2~_k = p_k M2_k, so the scope sums
    give tr(P Sigma) = sum_k p_k M2_k/(n-1) and ||gbar~||^2 = sum_k p_k mean_k^2, and merge, subtract
    and the jackknife act on them as on any moments. Needs the per-parameter M2 (param_moments=True)."""
    if m.m2_param is None:
        raise ValueError("preconditioning needs the per-parameter second moments (param_moments=True)")
    p = np.asarray(p, dtype=np.float64)
    if p.shape != m.mean.shape:
        raise ValueError(f"preconditioner has shape {p.shape}, the gradient {m.mean.shape}")
    if not (np.all(np.isfinite(p)) and np.all(p > 0)):
        raise ValueError("a preconditioner must be finite and positive")
    m2_param = p * m.m2_param
    return Moments(m.n, np.sqrt(p) * m.mean, group_sums(m2_param, m.offsets), m2_param, m.offsets)


@dataclass(frozen=True)
class ScopeEstimate:
    """The noise scale of one scope from one set of moments."""

    n: int  # examples
    grad_sq_norm: float  # unbiased |G|^2 (may be <= 0: then unresolved)
    grad_sq_norm_biased: float  # ||gbar||^2, biased upward by tr(Sigma)/n
    trace_sigma: float  # unbiased tr(Sigma)
    b_simple: float  # tr(Sigma)/|G|^2, NaN when unresolved
    b_simple_lower: float  # min(n, tr(Sigma)/||gbar||^2): a rough lower bound, finite even when unresolved
    resolved: bool  # |G|^2 > 0 at this n
    micro_batch: int = 1  # examples per sample: 1 for per-example gradients, b for micro-batch means


def estimate(n: int, sq_mean: float, m2: float, *, micro_batch: int = 1) -> ScopeEstimate:
    """B_simple from n, ||gbar||^2 and M2 = sum ||g_i - gbar||^2 of one scope.

    With micro_batch = b > 1 the n samples are micro-batch mean gradients m_j (each the gradient of the
    mean loss over b examples; docs/method.md, "The micro-batch estimator"): tr(Sigma_b) = M2/(n-1) is
    their covariance trace, and the estimate is put on the per-example scale, tr(Sigma) = b tr(Sigma_b)
    and |G|^2 = ||mbar||^2 - tr(Sigma_b)/n, over n b examples (the returned n). b = 1 is the per-example
    estimator, unchanged."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if n < 2:
        unit = "examples" if micro_batch == 1 else "micro-batches"
        raise ValueError(f"need at least 2 {unit} to estimate a variance, got {n}")
    trace_b = m2 / (n - 1)  # of the samples' covariance: tr(Sigma)/b when examples are independent
    g2 = sq_mean - trace_b / n
    trace = micro_batch * trace_b
    examples = n * micro_batch
    resolved = g2 > 0 and math.isfinite(g2)
    # E||gbar||^2 = |G|^2 + tr/N >= |G|^2 (N examples, as tr_b/n = tr/N), so tr/||gbar||^2 is (in
    # expectation) below B_simple; when unresolved, ||gbar||^2 <= tr/N and the data only say B_simple >~ N.
    lower = min(float(examples), trace / sq_mean) if sq_mean > 0 else float(examples)
    return ScopeEstimate(
        n=examples,
        grad_sq_norm=g2,
        grad_sq_norm_biased=sq_mean,
        trace_sigma=trace,
        b_simple=trace / g2 if resolved else math.nan,
        b_simple_lower=lower,
        resolved=resolved,
        micro_batch=micro_batch,
    )


def scope_sums(m: Moments, groups: Sequence[int]) -> tuple[float, float]:
    """(||gbar||^2, M2) of the scope made of `groups`."""
    idx = np.asarray(groups, dtype=np.int64)
    sq = group_sums(m.mean * m.mean, m.offsets)
    return float(sq[idx].sum()), float(m.m2_group[idx].sum())


def estimate_scope(m: Moments, groups: Sequence[int], *, micro_batch: int = 1) -> ScopeEstimate:
    """The estimate of one scope; micro_batch = b when the moments' samples are means of b examples."""
    sq_mean, m2 = scope_sums(m, groups)
    return estimate(m.n, sq_mean, m2, micro_batch=micro_batch)


@dataclass(frozen=True)
class Interval:
    """A 95% interval for B_simple."""

    lo: float  # NaN when it cannot be computed (fewer than 2 blocks, unresolved)
    hi: float  # +inf when a leave-one-out estimate is unresolved


def jackknife_interval(
    total: Moments, blocks: Sequence[Moments], groups: Sequence[int], *, micro_batch: int = 1
) -> Interval:
    """Delete-one-block jackknife on log B_simple (B is a positive ratio, so the
    interval is formed on the log scale and is never negative). micro_batch = b
    when the samples are micro-batch means (a block is then whole micro-batches)."""
    full = estimate_scope(total, groups, micro_batch=micro_batch)
    k = len(blocks)
    if k < 2 or not full.resolved:
        return Interval(math.nan, math.nan)
    if full.b_simple == 0:  # no noise at all (identical gradients)
        return Interval(0.0, 0.0)
    logs = []
    for block in blocks:
        rest = estimate_scope(subtract(total, block), groups, micro_batch=micro_batch)
        if not rest.resolved:
            return Interval(math.nan, math.inf)
        if rest.b_simple <= 0:
            return Interval(0.0, math.nan)
        logs.append(math.log(rest.b_simple))
    logs_arr = np.asarray(logs)
    se = math.sqrt((k - 1) / k * float(((logs_arr - logs_arr.mean()) ** 2).sum()))
    centre = math.log(full.b_simple)
    return Interval(math.exp(centre - Z95 * se), math.exp(centre + Z95 * se))


def snr(m: Moments, eps: float = 1e-12, *, micro_batch: int = 1) -> np.ndarray:
    """Per-parameter signal-to-noise |gbar_k| / (std_k + eps), (P,), std_k of one example's gradient.

    With micro_batch = b the samples are means of b examples, whose variance is 1/b of an example's."""
    if m.m2_param is None:
        raise ValueError("per-parameter second moments were not collected")
    var = m.m2_param / max(m.n - 1, 1)
    std = np.sqrt(var if micro_batch == 1 else micro_batch * var)
    return np.abs(m.mean) / (std + eps)


def windowed_b_simple(grad_sq_norms: Sequence[float], traces: Sequence[float]) -> float:
    """B_simple over several checkpoints: average numerator and denominator
    separately, then divide (McCandlish et al.). NaN if the mean |G|^2 <= 0."""
    g2 = float(np.mean(grad_sq_norms))
    tr = float(np.mean(traces))
    return tr / g2 if g2 > 0 else math.nan


def bootstrap_ratio_of_means(
    numerators: Sequence[float], denominators: Sequence[float], *, resamples: int = 1000, rng_seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of mean(num)/mean(den), resampling the (num, den) pairs with replacement.

    A resample whose mean denominator is <= 0 has no finite ratio and counts as +inf. (NaN, NaN)
    with fewer than 2 pairs."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(rng_seed)
    idx = rng.integers(0, num.size, size=(resamples, num.size))  # (R, K)
    mean_num, mean_den = num[idx].mean(axis=1), den[idx].mean(axis=1)
    ratios = np.where(mean_den > 0, mean_num / np.where(mean_den > 0, mean_den, 1.0), np.inf)
    lo, hi = np.percentile(ratios, [2.5, 97.5], method="inverted_cdf")  # resampled values, inf included
    return float(lo), float(hi)
