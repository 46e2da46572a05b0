"""The mergeable moments and estimators against direct computations."""

import math

import numpy as np
import pytest

from gns_sweep import stats as st


def direct(grads: np.ndarray, groups=None):
    """B_simple the obvious way from explicit per-example gradients (N, P)."""
    g = grads if groups is None else grads[:, groups]
    n = g.shape[0]
    mean = g.mean(0)
    trace = ((g - mean) ** 2).sum() / (n - 1)
    g2 = (mean**2).sum() - trace / n
    return trace, g2, trace / g2


OFFSETS = np.array([0, 3, 4, 9])  # three groups of sizes 3, 1, 5


@pytest.fixture
def grads():
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 9)) + rng.normal(size=9) * 2


def test_from_samples_matches_direct(grads):
    m = st.from_samples(grads, OFFSETS, param_moments=True)
    est = st.estimate_scope(m, [0, 1, 2])
    trace, g2, b = direct(grads)
    assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-12)
    assert est.b_simple == pytest.approx(b, rel=1e-12)
    layer = st.estimate_scope(m, [2])
    assert layer.b_simple == pytest.approx(direct(grads, slice(4, 9))[2], rel=1e-12)


@pytest.mark.parametrize("cuts", [[20], [1, 39], [5, 6, 30], list(range(1, 40))])
def test_merge_of_parts_equals_whole(grads, cuts):
    whole = st.from_samples(grads, OFFSETS, param_moments=True)
    parts = [st.from_samples(p, OFFSETS, param_moments=True) for p in np.split(grads, cuts)]
    merged = st.merge_all(parts)
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2_group, whole.m2_group, rtol=1e-12)
    np.testing.assert_allclose(merged.m2_param, whole.m2_param, rtol=1e-12)


def test_subtract_inverts_merge(grads):
    a = st.from_samples(grads[:13], OFFSETS, param_moments=True)
    b = st.from_samples(grads[13:], OFFSETS, param_moments=True)
    rest = st.subtract(st.merge(a, b), a)
    assert rest.n == b.n
    np.testing.assert_allclose(rest.mean, b.mean, rtol=1e-10)
    np.testing.assert_allclose(rest.m2_group, b.m2_group, rtol=1e-10)
    np.testing.assert_allclose(rest.m2_param, b.m2_param, rtol=1e-10)


def test_identical_examples_have_no_noise():
    grads = np.tile(np.array([1.0, -2.0, 0.5, 3, 0, 0, 1, 1, 1]), (10, 1))
    est = st.estimate_scope(st.from_samples(grads, OFFSETS, param_moments=False), [0, 1, 2])
    assert est.trace_sigma == 0.0
    assert est.b_simple == 0.0
    assert est.resolved


def test_unresolved_gives_nan_and_a_finite_lower_bound():
    # Pure noise with true mean 0: the unbiased |G|^2 is often <= 0.
    for seed in range(50):
        grads = np.random.default_rng(seed).normal(size=(5, 9))
        est = st.estimate_scope(st.from_samples(grads, OFFSETS, param_moments=False), [0, 1, 2])
        if not est.resolved:
            break
    assert not est.resolved
    assert math.isnan(est.b_simple)
    assert est.b_simple_lower == 5  # unresolved with n examples: B_simple >~ n
    ci = st.jackknife_interval(st.from_samples(grads, OFFSETS, param_moments=False), [], [0, 1, 2])
    assert math.isnan(ci.lo) and math.isnan(ci.hi)


def test_estimate_needs_two_examples():
    with pytest.raises(ValueError, match="at least 2"):
        st.estimate(1, 1.0, 0.0)


def test_jackknife_interval_brackets_and_matches_slow_loop(grads):
    blocks = [st.from_samples(p, OFFSETS, param_moments=False) for p in np.split(grads, 8)]
    total = st.merge_all(blocks)
    ci = st.jackknife_interval(total, blocks, [0, 1, 2])
    b = st.estimate_scope(total, [0, 1, 2]).b_simple
    assert ci.lo < b < ci.hi
    # Slow reference: recompute every leave-one-block-out estimate from raw gradients.
    logs = np.log(
        [direct(np.concatenate([p for j, p in enumerate(np.split(grads, 8)) if j != k]))[2] for k in range(8)]
    )
    se = math.sqrt(7 / 8 * ((logs - logs.mean()) ** 2).sum())
    assert ci.lo == pytest.approx(b * math.exp(-st.Z95 * se), rel=1e-9)
    assert ci.hi == pytest.approx(b * math.exp(st.Z95 * se), rel=1e-9)


def test_windowed_average_divides_averages():
    assert st.windowed_b_simple([1.0, 3.0], [10.0, 10.0]) == pytest.approx(10 / 2)
    assert math.isnan(st.windowed_b_simple([-1.0], [1.0]))


def test_snr_per_parameter(grads):
    m = st.from_samples(grads, OFFSETS, param_moments=True)
    expected = np.abs(grads.mean(0)) / (grads.std(0, ddof=1) + 1e-12)
    np.testing.assert_allclose(st.snr(m), expected, rtol=1e-10)
