"""Losses, the fast-engine-against-loop comparison, and spies shared by the per-example tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep.per_example import batch_moments, param_layout
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.stats import group_sums


def example_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")  # (B,)


def token_mean_ce(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)  # (B,) averaged over tokens


def half_sq(out, y):
    return 0.5 * (out - y).pow(2).flatten(1).sum(1)  # (B,)


def assert_close(a, b, offsets, rtol, scale=None):
    """Per group, max |a - b| <= rtol * max |scale| (scale defaults to b; entries near zero are
    judged on the group's scale, and centred moments on the uncentred ones they are cut from)."""
    scale = np.abs(b) if scale is None else scale
    for g in range(len(offsets) - 1):
        lo, hi = offsets[g], offsets[g + 1]
        err, ref = np.abs(a[lo:hi] - b[lo:hi]).max(), max(scale[lo:hi].max(), 1e-300)
        assert err <= rtol * ref, (g, err / ref)


def check(model, x, y, loss, *, rtol=1e-9, param_moments=(False, True), engine=FastEngine):
    """Compare the fast engine (or a new `engine()` of another kind) with the loop on every Moments field
    and on loss_sum."""
    layout = param_layout(model)
    for pm in param_moments:
        fast = batch_moments(engine(), model, x, y, loss, layout, param_moments=pm)
        ref = batch_moments(LoopEngine(), model, x, y, loss, layout, param_moments=pm)
        a, b = fast.moments, ref.moments
        assert a.n == b.n == x.shape[0]
        np.testing.assert_array_equal(a.offsets, b.offsets)
        n, sq_mean = b.n, b.mean * b.mean
        assert_close(a.mean, b.mean, a.offsets, rtol)
        groups = np.arange(len(a.offsets))  # one entry per group
        assert_close(a.m2_group, b.m2_group, groups, rtol, scale=b.m2_group + n * group_sums(sq_mean, b.offsets))
        if pm:
            assert_close(a.m2_param, b.m2_param, a.offsets, rtol, scale=b.m2_param + n * sq_mean)
        else:
            assert a.m2_param is None
        assert fast.loss_sum == pytest.approx(ref.loss_sum, rel=rtol)
    return fast


def sums_and_loop(model, x, y, *, engine=None, layout=None):
    """BatchSums of one call of `engine` (a fresh fast engine by default) and of the loop, with moments.
    An engine keeps what it read of a model while the same layout object comes back."""
    layout = layout or param_layout(model)
    fast = (engine or FastEngine()).batch_sums(model, x, y, example_ce, layout, param_moments=True)
    return fast, LoopEngine().batch_sums(model, x, y, example_ce, layout, param_moments=True)


def f64(module):
    """The module in float64, and a fixed seed for the data drawn after it."""
    torch.manual_seed(0)
    return module.double()


def seq_model(*layers):
    return f64(nn.Sequential(*layers))


def rows(n):
    """n examples (n, 4) of a 3-class problem, the same for the same n."""
    torch.manual_seed(n)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def spy(monkeypatch, module, *names) -> dict[str, int]:
    """Count the calls of module-level functions."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls
