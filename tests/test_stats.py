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


# --- micro-batch means as the samples -----------------------------------------


def direct_micro(means: np.ndarray, b: int):
    """tr(Sigma), |G|^2 and B_simple the obvious way from micro-batch means (M, P) of b examples each."""
    big_m = means.shape[0]
    mbar = means.mean(0)
    trace_b = ((means - mbar) ** 2).sum() / (big_m - 1)
    g2 = (mbar**2).sum() - trace_b / big_m
    return b * trace_b, g2, b * trace_b / g2


@pytest.mark.parametrize("b", [2, 3, 16])
def test_micro_batch_estimate_matches_direct(grads, b):
    m = st.from_samples(grads, OFFSETS, param_moments=True)  # the 40 rows taken as micro-batch means
    est = st.estimate_scope(m, [0, 1, 2], micro_batch=b)
    trace, g2, bs = direct_micro(grads, b)
    assert est.n == 40 * b and est.micro_batch == b
    assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-12)
    assert est.b_simple == pytest.approx(bs, rel=1e-12)
    assert est.grad_sq_norm_biased == pytest.approx((grads.mean(0) ** 2).sum(), rel=1e-12)
    assert est.b_simple_lower == pytest.approx(min(40 * b, trace / est.grad_sq_norm_biased), rel=1e-12)
    layer = st.estimate_scope(m, [2], micro_batch=b)
    assert layer.b_simple == pytest.approx(direct_micro(grads[:, 4:9], b)[2], rel=1e-12)


def test_micro_batch_one_is_the_per_example_estimate(grads):
    m = st.from_samples(grads, OFFSETS, param_moments=True)
    for groups in ([0, 1, 2], [1]):
        assert st.estimate_scope(m, groups, micro_batch=1) == st.estimate_scope(m, groups)
    assert st.estimate(7, 2.0, 3.0, micro_batch=1) == st.estimate(7, 2.0, 3.0)
    np.testing.assert_array_equal(st.snr(m, micro_batch=1), st.snr(m))
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        st.estimate(1, 1.0, 0.0, micro_batch=4)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        st.estimate(5, 1.0, 1.0, micro_batch=0)


@pytest.mark.parametrize(("b", "big_m"), [(2, 2), (4, 3), (8, 5)])
def test_micro_batch_estimates_are_unbiased_for_independent_examples(b, big_m):
    """Examples g_i ~ N(G, Sigma) in groups of b: averaged over many draws, b tr(Sigma_b) and
    ||mbar||^2 - tr(Sigma_b)/M land on tr(Sigma) and |G|^2 within 4 standard errors."""
    rng = np.random.default_rng(b * 100 + big_m)
    mean, std = np.array([1.0, 0.5, 0.0, -0.5]), np.array([1.0, 1.5, 0.5, 2.0])  # Sigma = diag(std^2)
    draws = 4000
    g = mean + std * rng.normal(size=(draws, big_m, b, 4))  # (R, M, b, P) per-example gradients
    means = g.mean(2)  # (R, M, P) micro-batch means
    offsets = np.array([0, 4])
    ests = [st.estimate_scope(st.from_samples(m, offsets, param_moments=False), [0], micro_batch=b) for m in means]
    for got, want in (
        ([e.trace_sigma for e in ests], (std**2).sum()),
        ([e.grad_sq_norm for e in ests], (mean**2).sum()),
    ):
        se = np.std(got, ddof=1) / math.sqrt(draws)
        assert abs(np.mean(got) - want) < 4 * se, (np.mean(got), want, se)


def test_micro_batch_jackknife_matches_slow_loop(grads):
    b = 4
    blocks = [st.from_samples(p, OFFSETS, param_moments=False) for p in np.split(grads, 8)]
    total = st.merge_all(blocks)
    ci = st.jackknife_interval(total, blocks, [0, 1, 2], micro_batch=b)
    bs = st.estimate_scope(total, [0, 1, 2], micro_batch=b).b_simple
    assert bs == pytest.approx(direct_micro(grads, b)[2], rel=1e-12)
    logs = np.log(
        [direct_micro(np.concatenate([p for j, p in enumerate(np.split(grads, 8)) if j != k]), b)[2] for k in range(8)]
    )
    se = math.sqrt(7 / 8 * ((logs - logs.mean()) ** 2).sum())
    assert ci.lo == pytest.approx(bs * math.exp(-st.Z95 * se), rel=1e-9)
    assert ci.hi == pytest.approx(bs * math.exp(st.Z95 * se), rel=1e-9)


def test_micro_batch_snr_is_per_example(grads):
    """A mean of b examples has 1/b of an example's variance: the per-example std is sqrt(b) times larger."""
    m = st.from_samples(grads, OFFSETS, param_moments=True)
    expected = np.abs(grads.mean(0)) / (math.sqrt(5) * grads.std(0, ddof=1) + 1e-12)
    np.testing.assert_allclose(st.snr(m, micro_batch=5), expected, rtol=1e-10)
