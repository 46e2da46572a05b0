"""Models in float16, float32 and under autocast: the rules' squares and sums against the loop's."""

from __future__ import annotations

import torch
from torch import nn

import gns_sweep.per_example.rules.embedding as embedding
import gns_sweep.per_example.rules.outer as outer

from .helpers import check, example_ce, spy, sums_and_loop, token_mean_ce
from .models import Autocast, CharModel, OtherPaths


def test_float16_squares_do_not_overflow(fallback_names):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)).half()  # every gradient entry below 65504...
    x, y = (300 * torch.randn(5, 6)).half(), torch.randint(0, 3, (5,))  # ...but their squares above it
    fast, ref = sums_and_loop(model, x, y)
    assert float(ref.sq_norm_sum.max()) > 65504
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=2e-3, atol=0)
    for a, b in zip(fast.param_sq_sum, ref.param_sq_sum, strict=True):
        torch.testing.assert_close(a.double(), b.reshape(a.shape), rtol=2e-3, atol=1e-3)
    assert fallback_names == []  # the rules' squares: the fallback's float64 ones cannot overflow


def test_float16_batchnorm_in_eval_mode(fallback_names):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).half().eval()
    fast, ref = sums_and_loop(model, torch.randn(5, 6).half(), torch.randint(0, 3, (5,)))
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=2e-3, atol=1e-6)
    assert fallback_names == []


def test_autocast_inside_the_forward(fallback_names):
    torch.manual_seed(0)
    fast, ref = sums_and_loop(Autocast(), torch.randn(5, 8), torch.randint(0, 3, (5,)))  # loop: bfloat16
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=2e-2, atol=0)
    assert fallback_names == []


def test_float32_agrees_to_1e5(fallback_names, monkeypatch):
    taken = spy(monkeypatch, outer, "_gram_sq_norms", "_materialised_stats")
    taken_by_embedding = spy(monkeypatch, embedding, "_dense", "_by_pairs")
    torch.manual_seed(0)
    check(CharModel(), torch.randint(0, 11, (6, 12)), torch.randint(0, 11, (6, 12)), token_mean_ce, rtol=1e-5)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 5))
    check(conv, torch.randn(5, 3, 4, 4), torch.randint(0, 5, (5,)), example_ce, rtol=1e-5)
    torch.manual_seed(0)
    check(OtherPaths().eval(), torch.randint(0, 60, (4, 2)), torch.randint(0, 3, (4,)), example_ce, rtol=1e-5)
    assert fallback_names == []
    assert all(taken.values()) and all(taken_by_embedding.values()), (taken, taken_by_embedding)  # every path ran
