"""Folding micro-batch sums into float64 Moments, against the two-pass computation."""

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep import stats as st
from gns_sweep.per_example import BatchSums, SumAccumulator, param_layout
from gns_sweep.per_example.sums import sums_of_samples


@pytest.fixture
def layout():
    return param_layout(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False)))  # groups of 6, 2, 2


def samples(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64) + 3.0  # a mean far from 0: cancellation matters


@pytest.mark.parametrize("cuts", [[40], [1, 40], [7, 20, 40], list(range(1, 41))])
def test_fold_of_micro_batches_equals_two_pass(layout, cuts):
    grads = samples(40, layout.n_params, 0)
    acc = SumAccumulator(layout, param_moments=True)
    for lo, hi in zip([0, *cuts[:-1]], cuts, strict=True):
        acc.add(sums_of_samples(grads[lo:hi], torch.ones(hi - lo), layout, param_moments=True))
    got = acc.moments()
    ref = st.from_samples(grads.numpy(), layout.offsets, param_moments=True)
    assert got.n == ref.n == 40 and acc.loss_sum == 40.0
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(got.m2_group, ref.m2_group, rtol=1e-10)
    np.testing.assert_allclose(got.m2_param, ref.m2_param, rtol=1e-10)
    np.testing.assert_array_equal(got.offsets, layout.offsets)


def test_float32_sums_fold_in_float64(layout):
    grads = samples(64, layout.n_params, 1)
    acc = SumAccumulator(layout, param_moments=False)
    for part in grads.split(16):
        acc.add(sums_of_samples(part.float(), torch.zeros(16), layout, param_moments=False))
    got, ref = acc.moments(), st.from_samples(grads.numpy(), layout.offsets, param_moments=False)
    assert got.mean.dtype == np.float64 and got.m2_param is None
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(got.m2_group, ref.m2_group, rtol=1e-4)


def test_groups_without_gradient_are_zero(layout):
    grads = samples(5, layout.n_params, 2)
    full = sums_of_samples(grads, torch.zeros(5), layout, param_moments=True)
    drop = lambda xs: [None if g == 1 else x for g, x in enumerate(xs)]  # noqa: E731
    sq = full.sq_norm_sum.clone()
    sq[1] = 0.0
    part = BatchSums(5, full.loss_sum, drop(full.grad_sum), sq, drop(full.param_sq_sum))
    acc = SumAccumulator(layout, param_moments=True)
    acc.add(part)
    acc.add(part)  # the group stays empty: not left as uninitialised memory
    m = acc.moments()
    lo, hi = layout.offsets[1], layout.offsets[2]
    assert m.n == 10 and m.m2_group[1] == 0.0
    assert not m.mean[lo:hi].any() and not m.m2_param[lo:hi].any()
    assert m.m2_group[0] > 0


def test_empty_and_misuse(layout):
    acc = SumAccumulator(layout, param_moments=False)
    m = acc.moments()
    assert m.n == 0 and not m.mean.any()
    grads = samples(3, layout.n_params, 3)
    with pytest.raises(ValueError, match="second moments"):
        SumAccumulator(layout, param_moments=True).add(
            sums_of_samples(grads, torch.zeros(3), layout, param_moments=False)
        )
    acc.add(sums_of_samples(grads, torch.zeros(3), layout, param_moments=False))
    acc.moments()
    with pytest.raises(RuntimeError, match="already taken"):
        acc.moments()
