"""The torch.func engine against a per-example loop."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example import get_engine, param_layout, shard_moments
from gns_sweep.per_example.general import GeneralEngine, per_example_grads
from gns_sweep.per_example.loop import loop_grads

from .helpers import check, example_ce, f64, token_mean_ce
from .models import Checkpointed, Recurrent, SpecialTokens, TiedLM


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


# --- models torch.func cannot vmap: the loop, warned once per model -----------


def _unvmappable():
    """(name, model, inputs, targets, loss) of models torch.func fails on, each for its own reason: an RNN,
    non-reentrant checkpointing (saved-tensor hooks), control flow on the data (`if special.any()`)."""
    torch.manual_seed(4)
    seq, cls = torch.randn(4, 6, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    flat = torch.randn(4, 4, dtype=torch.float64)
    ids = torch.tensor([[1, 8, 2, 0, 3], [9, 9, 1, 2, 3], [0, 1, 2, 3, 4], [7, 1, 7, 1, 7]])
    return [
        ("gru", f64(Recurrent(nn.GRU)), seq, cls, example_ce),
        ("lstm", f64(Recurrent(nn.LSTM)), seq, cls, example_ce),
        ("checkpoint", f64(Checkpointed()), flat, cls, example_ce),
        ("control-flow", f64(SpecialTokens()), ids, ids.roll(1, 1), token_mean_ce),
    ]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _unvmappable()])
def test_models_torch_func_cannot_vmap_take_the_loop_once_warned(case):
    _, model, x, y, loss = _unvmappable()[case]
    layout, engine = param_layout(model), get_engine("general")
    with pytest.warns(RuntimeWarning, match=r"the general engine takes them by one backward per example"):
        first = engine.batch_sums(model, x, y, loss, layout, param_moments=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model: the engine goes to the loop straight away
        again = engine.batch_sums(model, x, y, loss, layout, param_moments=True)
    ref = get_engine("loop").batch_sums(model, x, y, loss, layout, param_moments=True)
    for sums in (first, again):
        assert sums.n == ref.n
        torch.testing.assert_close(sums.sq_norm_sum, ref.sq_norm_sum, rtol=1e-12, atol=0)
        for a, b in zip([*sums.grad_sum, *sums.param_sq_sum], [*ref.grad_sum, *ref.param_sq_sum], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        assert float(sums.loss_sum) == pytest.approx(float(ref.loss_sum), rel=1e-12)
    other = _unvmappable()[case][1]  # a new model: torch.func is tried, and fails, again
    with pytest.warns(RuntimeWarning, match="general engine"):
        engine.batch_sums(other, x, y, loss, param_layout(other), param_moments=False)


def test_general_keeps_torch_func_on_models_it_can_vmap():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_engine("general").batch_sums(model, x, y, ce, param_layout(model), param_moments=False)


def test_general_does_not_hide_a_loss_of_the_wrong_shape_behind_the_loop():
    model = nn.Linear(3, 2)
    with pytest.raises(UsageError, match="one loss per example"):
        get_engine("general").batch_sums(
            model, torch.randn(3, 3), torch.randint(0, 2, (3,)), nn.functional.cross_entropy, param_layout(model),
            param_moments=False,
        )  # fmt: skip


@pytest.mark.parametrize("functional", [False, True])
def test_tied_weights_match_loop(functional):
    """The model runs inside a wrapper with its loss: tied parameters are still swapped in together."""
    ids = torch.tensor([[1, 2, 2, 0], [3, 0, 6, 6], [5, 5, 5, 5]])
    check(f64(TiedLM(functional=functional)), ids, torch.randint(0, 7, (3, 4)), token_mean_ce, engine=GeneralEngine)
