"""The frontier fit (pure math): known S_min, E_min come back from synthetic sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gns_sweep import frontier as fr

BATCH = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])


def steps_of(s_min: float, e_min: float, batch: np.ndarray) -> np.ndarray:
    return s_min + e_min / batch


@pytest.mark.parametrize("s_min, e_min", [(40.0, 2000.0), (25.0, 25.0 * 300), (100.0, 800.0)])
def test_exact_points_are_recovered(s_min, e_min):
    fit = fr.fit_frontier(BATCH, steps_of(s_min, e_min, BATCH))
    assert fit.s_min == pytest.approx(s_min, rel=1e-4)
    assert fit.e_min == pytest.approx(e_min, rel=1e-4)
    assert fit.b_crit == pytest.approx(e_min / s_min, rel=1e-4)
    assert fit.rms_log < 1e-6 and not fit.at_bound


def synthetic_sweep(s_min, e_min, *, seeds, noise, censor_above=None, rng_seed=0):
    """Trial rows (batch, lr, seed, steps) with lognormal noise; the best lr is the middle one,
    the others take 1.6x and 2.5x longer; batch sizes above censor_above never reach."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for b in BATCH:
        for lr, slow in ((0.5, 1.6), (1.0, 1.0), (2.0, 2.5)):
            for s in range(seeds):
                steps = float(round(steps_of(s_min, e_min, b) * slow * math.exp(rng.normal(0, noise))))
                if censor_above is not None and b > censor_above:
                    steps = math.nan
                rows.append((b * 1.0, lr * b, s, steps))
    return tuple(np.array(col) for col in zip(*rows, strict=True))


def test_noisy_sweep_with_censored_points():
    s_min, e_min = 30.0, 30.0 * 150
    bs, lrs, seeds, steps = synthetic_sweep(s_min, e_min, seeds=5, noise=0.15, censor_above=256)
    points = fr.batch_points(bs, lrs, seeds, steps)
    censored = [p.batch_size for p in points if p.censored]
    assert censored == [512, 1024]
    assert all(p.steps == math.inf for p in points if p.censored)
    good = [p for p in points if not p.censored]
    assert all(p.best_lr == p.batch_size for p in good)  # the middle lr (1.0 * B) is fastest
    assert all(p.lr_edge == "" for p in good)
    fit = fr.fit_points(points)
    assert fit.n_points == len(good)
    assert fit.b_crit == pytest.approx(150, rel=0.35)
    assert fit.s_min == pytest.approx(s_min, rel=0.35)
    interval = fr.bootstrap_b_crit(bs, lrs, seeds, steps, resamples=200)
    assert interval.fitted == 200
    assert interval.lo <= fit.b_crit <= interval.hi
    assert 150 / 1.5 < interval.lo < interval.hi < 150 * 1.5


def test_log_space_fit_is_not_dominated_by_small_batches():
    """A 20% error at batch 1 (thousands of steps) must not swing B_crit the way a linear fit does."""
    steps = steps_of(50.0, 5000.0, BATCH)
    steps[0] *= 1.2
    fit = fr.fit_frontier(BATCH, steps)
    assert fit.b_crit == pytest.approx(100.0, rel=0.1)


def test_median_counts_failures_and_edges_are_flagged():
    assert fr.median_steps(np.array([10.0, np.nan, 12.0])) == 12.0
    assert fr.median_steps(np.array([10.0, np.nan, np.nan])) == math.inf
    bs = np.array([8, 8, 8, 8, 64, 64, 64, 64])
    lrs = np.array([0.1, 0.1, 0.2, 0.2, 1.0, 1.0, 2.0, 2.0])
    seeds = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    steps = np.array([100, 110, 60, 70, 20, 22, np.nan, np.nan])
    p8, p64 = fr.batch_points(bs, lrs, seeds, steps)
    assert (p8.best_lr, p8.lr_edge, p8.steps) == (0.2, "high", 65.0)
    assert (p64.best_lr, p64.lr_edge, p64.seeds_reached) == (1.0, "low", 2)


def test_too_few_points_is_an_error_and_a_flat_curve_a_bound():
    with pytest.raises(fr.FitError):
        fr.fit_frontier([8, 16], [np.nan, 40])
    flat = fr.fit_frontier(BATCH, np.full(BATCH.shape, 30.0))
    assert flat.at_bound  # no bend anywhere: B_crit is pushed to the edge of the search


def test_frontier_steps():
    assert fr.frontier_steps(10.0, 100.0, np.array([100.0]))[0] == pytest.approx(20.0)
