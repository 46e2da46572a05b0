"""The stretch-by-stretch model of what a batch-size schedule can save: closed forms, a brute-force search
over per-stretch batch sizes, and a real schedule run's own path."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from gns_sweep.schedule import ScheduleConfig, run_schedule
from gns_sweep.schedule_model import (
    excess_factor,
    fixed_batch,
    fixed_steps,
    floor_of,
    model_examples,
    model_steps,
    path,
    sqrt_batches,
    sqrt_steps,
)
from gns_sweep.tasks import load_task


def random_stretches(seed: int, n: int = 12, spread: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 3.0, n), spread ** rng.uniform(0, 1, n)


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_the_rule_k_times_b_noise_is_the_fixed_batch_k_c_over_a(k):
    s, b = random_stretches(1)
    a, c = s.sum(), (s * b).sum()
    assert model_steps(s, b, k * b) == pytest.approx(a * (1 + 1 / k), rel=1e-12)
    assert model_examples(s, b, k * b) == pytest.approx((1 + k) * c, rel=1e-12)
    one = np.full_like(s, k * c / a)
    assert model_steps(s, b, one) == pytest.approx(model_steps(s, b, k * b), rel=1e-12)
    assert model_examples(s, b, one) == pytest.approx(model_examples(s, b, k * b), rel=1e-12)
    assert fixed_batch(s, b, (1 + k) * c) == pytest.approx(k * c / a, rel=1e-12)


def test_two_stretches_with_a_tenfold_growth():
    """S = (1, 1), B = (1, 10); examples at which the one batch takes twice S_min: E - C = C."""
    s, b = np.array([1.0, 1.0]), np.array([1.0, 10.0])
    a, c, d = 2.0, 11.0, 1 + math.sqrt(10)
    assert excess_factor(s, b) == pytest.approx(d**2 / (a * c), rel=1e-12) == pytest.approx(0.7874, abs=1e-4)
    e = 2 * c
    assert fixed_steps(s, b, e) == pytest.approx(2 * a, rel=1e-12)
    assert sqrt_steps(s, b, e) == pytest.approx(a + d**2 / c, rel=1e-12)
    assert sqrt_steps(s, b, e) / fixed_steps(s, b, e) == pytest.approx(0.8937, abs=1e-4)
    assert sqrt_batches(s, b, e) == pytest.approx(c / d * np.sqrt(b), rel=1e-12)
    assert model_examples(s, b, sqrt_batches(s, b, e)) == pytest.approx(e, rel=1e-12)


@pytest.mark.parametrize("examples", [2.0, 30.0, 5000.0])
def test_a_constant_noise_scale_leaves_nothing_to_save(examples):
    s, b = np.array([0.3, 1.0, 2.5, 0.7]), np.full(4, 1.5)
    assert excess_factor(s, b) == pytest.approx(1.0, rel=1e-12)
    assert sqrt_steps(s, b, examples) == pytest.approx(fixed_steps(s, b, examples), rel=1e-12)
    assert sqrt_batches(s, b, examples) == pytest.approx(np.full(4, fixed_batch(s, b, examples)), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_the_best_schedule_is_bounded_by_cauchy_schwarz_and_beats_any_other(seed):
    s, b = random_stretches(seed)
    c = (s * b).sum()
    factor = excess_factor(s, b)
    assert 0 < factor < 1
    rng = np.random.default_rng(100 + seed)
    for e in (1.01 * c, 2 * c, 50 * c):
        fixed, best = fixed_steps(s, b, e), sqrt_steps(s, b, e)
        a = s.sum()
        assert best - a == pytest.approx(factor * (fixed - a), rel=1e-10)  # only the excess shrinks
        assert best < fixed
        for _ in range(50):  # any other split of the examples beyond C takes more steps
            share = rng.dirichlet(np.ones(len(s)))
            other = share * (e - c) / s
            assert model_examples(s, b, other) == pytest.approx(e, rel=1e-10)
            assert model_steps(s, b, other) >= best * (1 - 1e-12)


def brute_force(s: np.ndarray, b: np.ndarray, examples: float, grid: int) -> tuple[float, np.ndarray]:
    """The fewest steps over every split of the examples beyond C among the stretches, on a grid of shares."""
    c = float((s * b).sum())
    if len(s) == 2:
        u = np.arange(1, grid) / grid
        shares = np.stack([u, 1 - u], axis=1)
    else:
        u1, u2 = np.meshgrid(np.arange(1, grid) / grid, np.arange(1, grid) / grid, indexing="ij")
        keep = u1 + u2 < 1
        shares = np.stack([u1[keep], u2[keep], 1 - u1[keep] - u2[keep]], axis=1)
    best, argmin = math.inf, None
    for share in shares:  # one candidate schedule at a time: slow and plain
        batch = share * (examples - c) / s
        steps = float(np.sum(s * (1 + b / batch)))
        if steps < best:
            best, argmin = steps, batch
    return best, argmin


@pytest.mark.parametrize(
    ("s", "b"),
    [((1.0, 1.0), (1.0, 10.0)), ((3.0, 0.5), (2.0, 400.0)), ((1.0, 2.0, 0.5), (5.0, 40.0, 300.0))],
)
def test_the_square_root_rule_is_what_a_brute_force_search_finds(s, b):
    s, b = np.array(s), np.array(b)
    e = 3 * float((s * b).sum())
    found, batches = brute_force(s, b, e, grid=2000 if len(s) == 2 else 300)
    assert found >= sqrt_steps(s, b, e) * (1 - 1e-12)  # nothing on the grid beats it ...
    assert found == pytest.approx(sqrt_steps(s, b, e), rel=1e-4)  # ... and the grid's best comes close
    assert batches == pytest.approx(sqrt_batches(s, b, e), rel=0.03)


def test_the_best_one_batch_is_what_a_scan_of_batch_sizes_finds():
    s, b = random_stretches(7, n=6, spread=50.0)
    e = 4 * float((s * b).sum())
    sizes = np.linspace(0.01, 200, 200_001)[:, None]  # (M, 1) against the stretches' (n,)
    steps, examples = (s * (1 + b / sizes)).sum(1), (s * (sizes + b)).sum(1)
    fits = steps[examples <= e]
    assert fits.min() == pytest.approx(fixed_steps(s, b, e), rel=1e-5)
    assert fits.min() >= fixed_steps(s, b, e) * (1 - 1e-12)


def test_a_path_counts_an_unresolved_reading_as_twice_the_batch():
    p = path([4, 8, 16], [2.0, math.nan, 48.0])
    assert p.b_noise.tolist() == [2.0, 16.0, 48.0] and p.unresolved == 1
    assert p.s_min == pytest.approx([4 / 6, 8 / 24, 16 / 64])
    with pytest.raises(ValueError, match="one batch size and one reading per step"):
        path([4, 8], [1.0])


@pytest.fixture(scope="module")
def linreg_run():
    task = load_task("linreg")
    config = ScheduleConfig.from_task(task, floor=4, ceiling=1024, lr_max=0.5, seed=1)
    return run_schedule(task, config), config


def test_a_runs_own_path_gives_back_its_steps_and_examples(linreg_run):
    result, config = linreg_run
    assert result.status == "reached"
    n = result.steps_to_target
    p = path(result.step_batch_sizes[:n], result.step_b_noise[:n])
    assert model_steps(p.s_min, p.b_noise, p.batch) == pytest.approx(n, rel=1e-12)
    assert model_examples(p.s_min, p.b_noise, p.batch) == pytest.approx(result.examples_to_target, rel=1e-12)
    f = floor_of(result, config)
    assert (f.steps, f.examples) == (n, result.examples_to_target)
    assert f.s_min == pytest.approx(p.s_min.sum()) and f.s_min < n
    assert f.spread == pytest.approx(p.b_noise.max() / p.b_noise.min()) and f.spread > 1
    assert f.sqrt_ratio <= min(f.run_ratio, 1.0)  # no schedule beats the best one, the run included
    fixed = fixed_steps(p.s_min, p.b_noise, f.examples)
    assert f.run_ratio == pytest.approx(n / fixed)
    assert f.sqrt_ratio == pytest.approx((f.s_min + f.excess_factor * (fixed - f.s_min)) / fixed)


def test_the_rule_without_rounding_or_clamping_saves_nothing(linreg_run):
    """Readings that are k times a power of two inside [floor, ceiling]: the rule's batch is exactly k B."""
    result, config = linreg_run
    config = replace(config, k=2.0, floor=2, ceiling=2**20)
    n = result.steps_to_target
    readings = tuple(2.0 ** (1 + i % 9) for i in range(n))
    f = floor_of(replace(result, step_b_noise=readings + result.step_b_noise[n:]), config)
    assert f.rule_ratio == pytest.approx(1.0, rel=1e-12)
    assert f.spread == 256.0 and f.sqrt_ratio < 1
