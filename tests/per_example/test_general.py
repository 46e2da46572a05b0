"""The torch.func engine against a per-example loop."""

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example import get_engine, param_layout, shard_moments
from gns_sweep.per_example.general import per_example_grads
from gns_sweep.per_example.loop import loop_grads


class SeqModel(nn.Module):
    """3-D input (B, T, D) -> per-example output; exercises a token-averaged loss."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.head(torch.tanh(self.norm(self.proj(x)))))  # (B, T, 3)


def token_ce(out, y):
    return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(dim=1)  # (B,)


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("n", [1, 2, 7])
def test_mlp_matches_loop(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    layout = param_layout(model)
    fast, lf = per_example_grads(model, x, y, ce, layout)
    slow, ls = loop_grads(model, x, y, ce, layout)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lf, ls)


@pytest.mark.parametrize("n", [1, 5])
def test_sequence_model_with_frozen_layer(n):
    torch.manual_seed(1)
    model = SeqModel().double()
    x, y = torch.randn(n, 7, 4, dtype=torch.float64), torch.randint(0, 3, (n, 7))
    layout = param_layout(model)
    assert all(not name.startswith("frozen") for name in layout.names)
    fast, _ = per_example_grads(model, x, y, token_ce, layout)
    slow, _ = loop_grads(model, x, y, token_ce, layout)
    assert fast.shape == (n, layout.n_params)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_micro_batches_equal_one_batch():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 3, (50,))
    layout = param_layout(model)
    eng = get_engine("general")
    one = shard_moments(eng, model, x, y, ce, layout, max_batch=50, param_moments=True)
    many = shard_moments(eng, model, x, y, ce, layout, max_batch=7, param_moments=True)
    np.testing.assert_allclose(many.moments.mean, one.moments.mean, rtol=1e-12)
    np.testing.assert_allclose(many.moments.m2_group, one.moments.m2_group, rtol=1e-10)
    np.testing.assert_allclose(many.moments.m2_param, one.moments.m2_param, rtol=1e-10, atol=1e-14)
    assert many.loss_sum == pytest.approx(one.loss_sum, rel=1e-12)


def test_layout_scopes_follow_named_modules():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1, bias=False))
    layout = param_layout(model)
    assert list(layout.scopes) == ["total", "0", "2"]
    assert layout.names == ("0.weight", "0.bias", "2.weight")
    assert layout.n_params == 8 + 4 + 4


def test_batchnorm_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    layout = param_layout(model)
    with pytest.raises(UsageError, match="layer '1' \\(BatchNorm1d\\)"):
        shard_moments(
            get_engine("general"),
            model,
            torch.randn(4, 3),
            torch.randint(0, 2, (4,)),
            ce,
            layout,
            max_batch=4,
            param_moments=False,
        )


def test_loss_must_be_per_example():
    model = nn.Linear(3, 2)
    layout = param_layout(model)

    def mean_loss(out, y):
        return nn.functional.cross_entropy(out, y)  # scalar: wrong contract

    with pytest.raises(UsageError, match="one loss per example"):
        loop_grads(model, torch.randn(3, 3), torch.randint(0, 2, (3,)), mean_loss, layout)


def test_batchnorm_without_running_stats_is_refused_in_eval_mode_too():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    layout = param_layout(model)
    with pytest.raises(UsageError, match="layer '1'"):
        shard_moments(
            get_engine("general"), model, torch.randn(4, 3), torch.randint(0, 2, (4,)), ce, layout,
            max_batch=4, param_moments=False,
        )  # fmt: skip


def test_float32_gradients_are_reduced_in_float64():
    """Nearly identical examples: M2 is a millionth of sum ||g_i||^2, which float32 sums would lose."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(1, 32).repeat(256, 1) + 1e-3 * torch.randn(256, 32)
    y = torch.zeros(256, dtype=torch.long)
    layout = param_layout(model)
    general, loop = (
        shard_moments(get_engine(name), model, x, y, ce, layout, max_batch=256, param_moments=True).moments
        for name in ("general", "loop")
    )
    np.testing.assert_allclose(general.m2_group, loop.m2_group, rtol=1e-3)
    np.testing.assert_allclose(general.m2_param, loop.m2_param, rtol=1e-3, atol=1e-3 * loop.m2_param.max())
