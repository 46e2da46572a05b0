"""Each per-layer rule of the fast engine against the per-example loop, with no fallback taken.

Shapes include N = 1 and 3-D+ inputs; parametrised layer options reach each code path of a rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gns_sweep.per_example.rules.norm as norm_rules
import gns_sweep.per_example.rules.outer as outer
from gns_sweep.per_example.rules import find_rule
from gns_sweep.per_example.rules.base import Scratch
from gns_sweep.per_example.rules.outer import full_flops, gram_flops, outer_stats

from .helpers import check, example_ce, f64, half_sq, seq_model, spy, token_mean_ce
from .models import Checkpointed, MaskedConv2d, TwiceNorm

# --- Linear -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7])
def test_linear_2d(n, fallback_names):
    model = seq_model(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    check(model, torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)), example_ce)
    assert fallback_names == []


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 6), (3, 2, 6), (3, 9, 6), (2, 3, 4, 6)],  # N = 1, Gram-friendly (T=2), materialised (T=9), 4-D
)
def test_linear_3d_and_4d(shape, fallback_names):
    model = seq_model(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5, bias=False))
    x = torch.randn(*shape, dtype=torch.float64)
    check(model, x, torch.randn(*shape[:-1], 5, dtype=torch.float64), half_sq)
    assert fallback_names == []


def test_linear_3d_token_mean_loss(fallback_names):
    model = seq_model(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 7))
    check(model, torch.randn(4, 5, 6, dtype=torch.float64), torch.randint(0, 7, (4, 5)), token_mean_ce)
    assert fallback_names == []


@pytest.mark.parametrize(
    ("t", "k", "m", "path"),
    [(2, 64, 64, "_gram_sq_norms"), (9, 6, 16, "_materialised_stats"), (1, 5, 3, None)],  # None: rank one
)
def test_gram_and_materialised_agree(t, k, m, path, monkeypatch):
    torch.manual_seed(1)
    a, d = torch.randn(3, 2, t, k, dtype=torch.float64), torch.randn(3, 2, t, m, dtype=torch.float64)
    g = d.transpose(-1, -2) @ a  # (B, C, M, K) explicit per-example gradients
    sq_norms = g.square().sum((1, 2, 3))  # (B,)
    taken = spy(monkeypatch, outer, "_gram_sq_norms", "_materialised_stats")
    total2, sq2, none = outer_stats(a, d, param_moments=False)
    assert [name for name, calls in taken.items() if calls] == ([path] if path else [])  # the cost model's pick
    total, sq, sq_sum = outer_stats(a, d, param_moments=True)
    assert none is None
    for t in (total, total2):
        torch.testing.assert_close(t, g.sum(0))
    for s in (sq, sq2):
        torch.testing.assert_close(s, sq_norms)
    torch.testing.assert_close(sq_sum, g.square().sum(0))
    # both general forms on every shape, whichever the cost model picks
    torch.testing.assert_close(outer._gram_sq_norms(a, d), sq_norms)
    total3, sq3, _ = outer._materialised_stats(a, d, param_moments=False, empty=outer._fresh)
    torch.testing.assert_close(total3, g.sum(0))
    torch.testing.assert_close(sq3, sq_norms)


def test_materialised_chunks_reuse_one_buffer_without_aliasing_results(monkeypatch):
    torch.manual_seed(2)
    a, d = torch.randn(7, 1, 9, 6, dtype=torch.float64), torch.randn(7, 1, 9, 16, dtype=torch.float64)
    g = d.transpose(-1, -2) @ a
    monkeypatch.setattr(outer, "CHUNK_BYTES", 3 * 16 * 6 * 8)  # chunks of 3, 3 and 1 examples
    scratch = Scratch()
    for pm in (False, True):
        total, sq, sq_sum = outer_stats(a, d, param_moments=pm, empty=scratch.take)
        scratch.take((7 * 16 * 6,), a).fill_(float("nan"))  # the next user of the buffer
        torch.testing.assert_close(total[0], g.sum(0)[0])
        torch.testing.assert_close(sq, g.square().sum((1, 2, 3)))
        if pm:
            torch.testing.assert_close(sq_sum, g.square().sum(0))


def test_cost_model_picks_gram_only_for_few_positions():
    assert gram_flops(2, 1024, 1024) < full_flops(2, 1024, 1024)
    assert gram_flops(64, 128, 512) > full_flops(64, 128, 512)


# --- Conv ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(3, 4, 3),
        lambda: nn.Conv1d(4, 6, 2, stride=2, padding=1, groups=2, padding_mode="circular", bias=False),
        lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2),
        lambda: nn.Conv2d(3, 4, 3, padding=1),
        lambda: nn.Conv2d(4, 6, (2, 3), stride=(2, 1), dilation=(1, 2), groups=2, padding=1, padding_mode="reflect"),
        lambda: nn.Conv2d(3, 5, (2, 4), padding="same"),
    ],
)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv(conv, n, fallback_names):
    layer = conv()
    dims = 1 if isinstance(layer, nn.Conv1d) else 2
    x = torch.randn(n, layer.in_channels, *([7] * dims), dtype=torch.float64)
    model = seq_model(layer, nn.Tanh(), nn.Flatten())
    y = torch.randn(model(x).shape, dtype=torch.float64)
    check(model, x, y, half_sq)
    assert fallback_names == []


def set_later(conv, **attributes):
    for name, value in attributes.items():  # the forward reads them at call time; __init__'s padding goes stale
        setattr(conv, name, value)
    return conv


@pytest.mark.parametrize(
    "conv",
    [
        lambda: set_later(nn.Conv1d(2, 4, 3, stride=3), padding=(1,)),  # the same output length: wrong, silently
        lambda: set_later(nn.Conv2d(2, 3, 3), padding=(1, 2)),
        lambda: set_later(nn.Conv1d(2, 3, 4), padding="same"),
        lambda: set_later(nn.Conv2d(2, 3, 3), padding=1, stride=2),  # ints, as the conv also takes
        lambda: set_later(nn.Conv2d(2, 3, 3, padding="same"), dilation=2),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_attributes_changed_after_construction(conv, fallback_names):
    model = seq_model(conv(), nn.Tanh(), nn.Flatten())
    x = torch.randn(3, 2, *([9] * (model[0].weight.dim() - 2)), dtype=torch.float64)
    check(model, x, torch.randn(model(x).shape, dtype=torch.float64), half_sq)
    assert fallback_names == []


def test_conv_subclass_that_masks_its_weight_has_no_rule(fallback_names):
    assert find_rule(MaskedConv2d(2, 3, 3)) is None
    model = seq_model(MaskedConv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten())
    check(model, torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 48, dtype=torch.float64), half_sq)
    assert fallback_names == [("0.weight", "0.bias")] * 2


# --- Embedding ----------------------------------------------------------------


@pytest.mark.parametrize("vocab", [6, 40])  # dense per-example rows (vocab <= 4 tokens/example), distinct pairs
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_repeats_and_padding(padding_idx, vocab, fallback_names):
    model = seq_model(nn.Embedding(vocab, 4, padding_idx=padding_idx), nn.Linear(4, 6))
    ids = torch.tensor([[1, 1, 2, 0], [0, 0, 0, 0], [3, 5, 3, 3]])  # repeats within an example, an all-padding one
    check(model, ids, torch.randint(0, 6, (3, 4)), token_mean_ce)
    assert fallback_names == []


def test_embedding_one_token_per_example_and_n1(fallback_names):
    model = seq_model(nn.Embedding(5, 3), nn.Linear(3, 5))
    check(model, torch.tensor([4, 1, 4]), torch.tensor([0, 1, 2]), example_ce)
    check(model, torch.tensor([2]), torch.tensor([0]), example_ce)
    assert fallback_names == []


def test_embedding_scale_grad_by_freq_falls_back(fallback_names):
    """Its gradient divides by token counts over the whole batch: not a sum of per-example terms."""
    model = seq_model(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Linear(3, 5))
    check(model, torch.tensor([[1, 1, 2], [2, 3, 3]]), torch.randint(0, 5, (2, 3)), token_mean_ce)
    assert fallback_names == [("0.weight",)] * 2  # once per check's call; the Linear keeps its rule


# --- normalisation layers -----------------------------------------------------


NORMS = [
    lambda: (nn.LayerNorm(6), (4, 3, 6)),
    lambda: (nn.LayerNorm((3, 6), bias=False), (4, 3, 6)),
    lambda: (nn.GroupNorm(2, 4), (4, 4, 5)),
    lambda: (nn.BatchNorm1d(4).eval(), (4, 4, 5)),
]
if hasattr(nn, "RMSNorm"):
    NORMS.append(lambda: (nn.RMSNorm(6), (4, 3, 6)))


@pytest.mark.parametrize("make", NORMS)
@pytest.mark.parametrize("n", [1, 4])
def test_norm_layers(make, n, fallback_names):
    norm, shape = make()
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial affine and running statistics
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if isinstance(norm, nn.BatchNorm1d):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    model = seq_model(nn.Linear(shape[-1], shape[-1]), norm, nn.Tanh())
    x = torch.randn(n, *shape[1:], dtype=torch.float64)
    check(model, x, torch.randn(n, *shape[1:], dtype=torch.float64), half_sq)
    assert fallback_names == []


def test_layer_norm_inside_activation_checkpointing(fallback_names):
    """Saved tensors of a checkpointed region can be unpacked once: the rules must not touch them."""
    check(f64(Checkpointed()), torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64),
          half_sq)  # fmt: skip
    assert fallback_names == []


class _CountLayerNorm:
    """torch.nn.functional as the LayerNorm rule sees it, counting its layer_norm calls (the model's own
    forward reads torch's module, not this one)."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(F, name)

    def layer_norm(self, *args, **kwargs):
        self.calls += 1
        return F.layer_norm(*args, **kwargs)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_layer_norm_reads_the_forwards_statistics_unless_hooked(checkpointed, fallback_names, monkeypatch):
    """x_hat from the mean and 1/std the forward saved, or recomputed where saved-tensor hooks (activation
    checkpointing's) were active: both against the loop."""
    counted = _CountLayerNorm()
    monkeypatch.setattr(norm_rules, "F", counted)
    torch.manual_seed(0)
    model = f64(Checkpointed()) if checkpointed else seq_model(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = 3 if checkpointed else 6
    check(model, torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, out, dtype=torch.float64), half_sq)
    assert fallback_names == []
    assert (counted.calls > 0) == checkpointed


def test_layer_norm_saved_statistics_of_another_input_are_not_used(monkeypatch):
    """A node whose saved input is not the call's x (a cast under autocast, say) gives no x_hat of x."""
    counted = _CountLayerNorm()
    monkeypatch.setattr(norm_rules, "F", counted)
    torch.manual_seed(0)
    ln = nn.LayerNorm(6).double()
    x, other = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    node = ln(other.requires_grad_()).grad_fn
    rule = find_rule(ln)
    torch.testing.assert_close(rule.normalised(ln, other.detach(), node), F.layer_norm(other.detach(), (6,)))
    assert counted.calls == 0  # read off the node
    torch.testing.assert_close(rule.normalised(ln, x, node), F.layer_norm(x, (6,)))
    assert counted.calls == 1  # recomputed


def test_layer_norm_called_twice(fallback_names):
    check(f64(TwiceNorm()), torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64),
          half_sq)  # fmt: skip
    assert fallback_names == []
