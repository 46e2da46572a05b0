"""The fast engine against the per-example loop: every rule, the fallback, and the guards."""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example import batch_moments, get_engine, param_layout, shard_moments
from gns_sweep.per_example.batch_dim import probe_sizes
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.general import per_example_grads
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.per_example.rules import find_rule
from gns_sweep.per_example.rules.base import Scratch
from gns_sweep.per_example.rules.outer import full_flops, gram_flops, outer_stats
from gns_sweep.stats import group_sums

# --- helpers ------------------------------------------------------------------


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


@pytest.fixture
def fallback_names(monkeypatch):
    """The parameter names each call sent to the fallback (torch.func, or the loop where it fails)."""
    import gns_sweep.per_example.fast as fast

    seen: list[tuple[str, ...]] = []

    def spy(stats, model, inputs, targets, loss, layout, groups, **kwargs):
        seen.append(tuple(layout.names[g] for g in groups))
        return real(stats, model, inputs, targets, loss, layout, groups, **kwargs)

    real = fast._fallback
    monkeypatch.setattr(fast, "_fallback", spy)
    return seen


def check(model, x, y, loss, *, rtol=1e-9, param_moments=(False, True)):
    """Compare the fast engine with the loop on every Moments field and on loss_sum."""
    layout = param_layout(model)
    for pm in param_moments:
        fast = batch_moments(FastEngine(), model, x, y, loss, layout, param_moments=pm)
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
    torch.manual_seed(0)
    return module.double()


def seq_model(*layers):
    return f64(nn.Sequential(*layers))


# --- Linear -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7])
def test_linear_2d(n):
    model = seq_model(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    check(model, torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)), example_ce)


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 6), (3, 2, 6), (3, 9, 6), (2, 3, 4, 6)],  # N = 1, Gram-friendly (T=2), materialised (T=9), 4-D
)
def test_linear_3d_and_4d(shape):
    model = seq_model(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5, bias=False))
    x = torch.randn(*shape, dtype=torch.float64)
    check(model, x, torch.randn(*shape[:-1], 5, dtype=torch.float64), half_sq)


def test_linear_3d_token_mean_loss():
    model = seq_model(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 7))
    check(model, torch.randn(4, 5, 6, dtype=torch.float64), torch.randint(0, 7, (4, 5)), token_mean_ce)


@pytest.mark.parametrize("t,k,m", [(2, 64, 64), (9, 6, 16), (1, 5, 3)])
def test_gram_and_materialised_agree(t, k, m):
    torch.manual_seed(1)
    a, d = torch.randn(3, 2, t, k, dtype=torch.float64), torch.randn(3, 2, t, m, dtype=torch.float64)
    g = d.transpose(-1, -2) @ a  # (B, C, M, K) explicit per-example gradients
    total, sq, sq_sum = outer_stats(a, d, param_moments=True)
    total2, sq2, none = outer_stats(a, d, param_moments=False)
    assert none is None
    for t in (total, total2):
        torch.testing.assert_close(t, g.sum(0))
    for s in (sq, sq2):
        torch.testing.assert_close(s, g.square().sum((1, 2, 3)))
    torch.testing.assert_close(sq_sum, g.square().sum(0))


def test_materialised_chunks_reuse_one_buffer_without_aliasing_results(monkeypatch):
    import gns_sweep.per_example.rules.outer as outer

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
def test_conv(conv, n):
    layer = conv()
    dims = 1 if isinstance(layer, nn.Conv1d) else 2
    x = torch.randn(n, layer.in_channels, *([7] * dims), dtype=torch.float64)
    model = seq_model(layer, nn.Tanh(), nn.Flatten())
    y = torch.randn(model(x).shape, dtype=torch.float64)
    check(model, x, y, half_sq)


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
def test_conv_attributes_changed_after_construction(conv):
    model = seq_model(conv(), nn.Tanh(), nn.Flatten())
    x = torch.randn(3, 2, *([9] * (model[0].weight.dim() - 2)), dtype=torch.float64)
    check(model, x, torch.randn(model(x).shape, dtype=torch.float64), half_sq)


class MaskedConv2d(nn.Conv2d):
    """PixelCNN-style: keeps Conv2d.forward, masks the weight in _conv_forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        mask[:, :, 1, 2:] = mask[:, :, 2:] = 0
        self.register_buffer("mask", mask)

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * self.mask, bias)


def test_conv_subclass_that_masks_its_weight_has_no_rule(fallback_names):
    assert find_rule(MaskedConv2d(2, 3, 3)) is None
    model = seq_model(MaskedConv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten())
    check(model, torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 48, dtype=torch.float64), half_sq)
    assert fallback_names == [("0.weight", "0.bias")] * 2


# --- Embedding ----------------------------------------------------------------


@pytest.mark.parametrize("vocab", [6, 40])  # dense per-example rows (vocab <= 4 tokens/example), distinct pairs
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_repeats_and_padding(padding_idx, vocab):
    model = seq_model(nn.Embedding(vocab, 4, padding_idx=padding_idx), nn.Linear(4, 6))
    ids = torch.tensor([[1, 1, 2, 0], [0, 0, 0, 0], [3, 5, 3, 3]])  # repeats within an example, an all-padding one
    check(model, ids, torch.randint(0, 6, (3, 4)), token_mean_ce)


def test_embedding_one_token_per_example_and_n1():
    model = seq_model(nn.Embedding(5, 3), nn.Linear(3, 5))
    check(model, torch.tensor([4, 1, 4]), torch.tensor([0, 1, 2]), example_ce)
    check(model, torch.tensor([2]), torch.tensor([0]), example_ce)


def test_embedding_scale_grad_by_freq_falls_back():
    model = seq_model(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Linear(3, 5))
    check(model, torch.tensor([[1, 1, 2], [2, 3, 3]]), torch.randint(0, 5, (2, 3)), token_mean_ce)


# --- normalisation layers ----------------------------------------------------

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
def test_norm_layers(make, n):
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


def test_layer_norm_inside_activation_checkpointing():
    """Saved tensors of a checkpointed region can be unpacked once: the rules must not touch them."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.ln, self.out = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, x):
            h = checkpoint(lambda h: torch.tanh(self.ln(h)), self.inp(x), use_reentrant=False)
            return self.out(h)

    check(f64(Checkpointed()), torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64),
          half_sq)  # fmt: skip


class TwiceNorm(nn.Module):
    """One LayerNorm applied twice: its per-example gradients are materialised, x_hat recomputed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(torch.tanh(self.norm(self.proj(x))))


def test_layer_norm_called_twice(fallback_names):
    check(f64(TwiceNorm()), torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64),
          half_sq)  # fmt: skip
    assert fallback_names == []


# --- in-place ops, views, buffers made by the forward --------------------------


class ViewThenInPlace(nn.Module):
    """A Linear on 3-D input returns a view; using it, then changing it in place, moves its history."""

    def __init__(self, keep_copy: bool):
        super().__init__()
        self.keep_copy = keep_copy
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        res = h.clone() if self.keep_copy else 0.0
        h = F.relu(h, inplace=True)
        return self.b(h + res)


@pytest.mark.parametrize("keep_copy", [True, False])
def test_in_place_op_on_a_reshaped_linear_output(keep_copy, fallback_names):
    model = f64(ViewThenInPlace(keep_copy))
    check(model, torch.randn(4, 5, 4, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64), half_sq)
    assert fallback_names == []


class LazyTable(nn.Module):
    """A Linear applied to a (T, D) buffer the first forward builds: no example dimension, though T == B."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", None, persistent=False)
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if self.table is None:
            self.table = torch.sin(torch.arange(x.shape[1] * 4, dtype=x.dtype).view(-1, 4))
        return self.out(torch.tanh(x + self.proj(self.table)))


class Positions(nn.Module):
    """Holds a (T, D) position table as a buffer."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table, persistent=False)


class LazySubmodule(LazyTable):
    """As LazyTable, but the first forward adds a whole submodule holding the buffer."""

    def forward(self, x):
        if not hasattr(self, "positions"):
            self.positions = Positions(torch.sin(torch.arange(x.shape[1] * 4, dtype=x.dtype).view(-1, 4)))
        return self.out(torch.tanh(x + self.proj(self.positions.table)))


@pytest.mark.parametrize("kind", [LazyTable, LazySubmodule])
def test_buffer_made_by_the_forward_is_no_example_batch(kind):
    model = f64(kind())
    x, y = torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3, 3))
    layout, engine = param_layout(model), FastEngine()
    got = batch_moments(engine, model, x, y, token_mean_ce, layout, param_moments=False).moments  # builds it
    ref = batch_moments(LoopEngine(), model, x, y, token_mean_ce, layout, param_moments=False).moments
    np.testing.assert_allclose(got.m2_group, ref.m2_group, rtol=1e-9)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-9, atol=1e-12)


# --- inputs with as many rows as examples, but no examples on dim 0 ---------


class LearnedPositions(nn.Module):
    """GPT-style: token and position embeddings, the positions from arange(T)."""

    def __init__(self, vocab=7, length=4, width=5):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))))


class TableInput(nn.Module):
    """A Linear on a (T, D) table: a buffer slice, a parameter expression, or a buffer the forward remakes
    from a parameter (so it is no leaf)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.src = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("table", torch.randn(8, 4))
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):  # (B, T, 4)
        if self.kind == "slice":
            t = self.table[: x.shape[1]]
        elif self.kind == "expr":
            t = self.src * 1.0
        else:
            self.table = self.src * 1.0
            t = self.table
        return self.out(torch.tanh(x + self.proj(t)))


@pytest.mark.parametrize("n", [3, 4])  # 4: as many examples as positions
def test_position_table_is_no_example_batch(n, fallback_names):
    ids, y = torch.randint(0, 7, (n, 4)), torch.randint(0, 7, (n, 4))
    check(f64(LearnedPositions()), ids, y, token_mean_ce)
    assert set(fallback_names) <= {("positions.weight",)}


@pytest.mark.parametrize("kind", ["slice", "expr", "remade buffer"])
def test_linear_on_a_table_with_as_many_rows_as_examples(kind, fallback_names):
    check(f64(TableInput(kind)), torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3, 3)),
          token_mean_ce)  # fmt: skip
    assert fallback_names and all("proj.weight" in names for names in fallback_names)


class SequenceFirst(nn.Module):
    """Layers that see (T, B, D): with T == B, dim 0 looks like the examples but is not."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):  # (B, T, 4)
        h = torch.tanh(self.norm(self.a(x.transpose(0, 1))))  # (T, B, 6)
        return self.b(h).transpose(0, 1)  # (B, T, 2)


def test_sequence_first_layers_with_as_many_positions_as_examples(fallback_names):
    check(f64(SequenceFirst()), torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3, 3)), token_mean_ce)
    assert fallback_names  # every layer sees positions on dim 0: all go to the fallback


class FixedBatch(nn.Module):
    """Runs only on one example (the loop) or n, so the probe at another size fails and finds nothing."""

    def __init__(self, n):
        super().__init__()
        self.n, self.a, self.b = n, nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] not in (1, self.n):
            raise ValueError(f"this model takes 1 or {self.n} examples, not {x.shape[0]}")
        return self.b(torch.tanh(self.a(x)))


def test_model_bound_to_its_batch_size_still_works(fallback_names):
    check(f64(FixedBatch(5)), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == []


def test_probe_keeps_the_random_state_and_runs_once():
    model = seq_model(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).train()
    x, y, layout = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), param_layout(model)
    warm = FastEngine()
    warm.batch_sums(model, x, y, example_ce, layout, param_moments=False)  # probes
    state = torch.get_rng_state()
    fresh_sums = FastEngine().batch_sums(model, x, y, example_ce, layout, param_moments=False)  # probes
    after_fresh = torch.get_rng_state()
    torch.set_rng_state(state)
    warm_sums = warm.batch_sums(model, x, y, example_ce, layout, param_moments=False)  # does not
    assert torch.equal(torch.get_rng_state(), after_fresh)  # the probe drew no random numbers
    assert torch.equal(fresh_sums.sq_norm_sum, warm_sums.sq_norm_sum)  # the same dropout masks


class RunningScale(nn.Module):
    """Updates buffers in place in its forward, after the lowest layer: a running scale and a counter."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("scale", torch.ones(6))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            self.scale.mul_(0.9).add_(0.1 * h.abs().mean(0))
            self.calls += 1
        return self.b(torch.tanh(h / self.scale))


def test_probe_leaves_the_buffers_as_one_forward_does():
    model = f64(RunningScale())
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    FastEngine().batch_sums(model, x, y, example_ce, param_layout(model), param_moments=False)  # probes first
    twin(x)
    assert float(model.calls) == 1.0
    torch.testing.assert_close(model.scale, twin.scale, rtol=0, atol=0)


def test_an_empty_first_call_does_not_settle_the_probe(fallback_names):
    model, engine = f64(LearnedPositions()), FastEngine()
    layout = param_layout(model)  # the same model and layout: the engine keeps what it read
    ids, y = torch.randint(0, 7, (4, 4)), torch.randint(0, 7, (4, 4))
    with contextlib.suppress(RuntimeError):  # nothing to probe with
        engine.batch_sums(model, ids[:0], y[:0], token_mean_ce, layout, param_moments=False)
    fallback_names.clear()
    engine.batch_sums(model, ids, y, token_mean_ce, layout, param_moments=False)
    assert fallback_names == [("positions.weight",)]


def test_probe_sizes_avoid_the_batch():
    assert probe_sizes(5) == (2, 3)
    assert probe_sizes(2) == (3, 4)
    assert probe_sizes(3) == (2, 4)


class InnerGradient(nn.Module):
    """A forward that differentiates through a rule layer itself: output hooks fire before the plan."""

    def __init__(self):
        super().__init__()
        self.p, self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(6, 3)

    def forward(self, x):
        h0 = torch.tanh(self.p(x))
        h = torch.tanh(self.a(h0))
        (g,) = torch.autograd.grad(self.b(h).sum(), h0, retain_graph=True)  # a feature with no graph
        return self.c(h) + g.sum(1, keepdim=True)


def test_backward_inside_the_forward(fallback_names):
    check(f64(InnerGradient()), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == []


class SpecialTokens(nn.Module):
    """A projector applied only to the special tokens (id >= 7), skipped when a batch has none: the probe's
    first examples have none, so it never sees the layer, whose input then has a data-dependent row count."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.out = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10)

    def forward(self, ids):
        h = self.embed(ids)
        special = ids >= 7
        if special.any():  # control flow on the data: torch.func cannot vmap it either
            h = h.masked_scatter(special.unsqueeze(-1), self.proj(h[special]))
        return self.out(torch.tanh(h))


def test_a_layer_the_probe_never_called_is_not_taken_for_batch_first(fallback_names):
    ids = torch.tensor([[0, 2, 4], [6, 1, 0], [2, 2, 4], [7, 8, 0], [9, 7, 8]])  # 5 special tokens, 5 examples
    with pytest.warns(RuntimeWarning, match=r"proj\.weight, proj\.bias .*one backward per example"):
        check(f64(SpecialTokens()), ids, ids.roll(1, 1), token_mean_ce)
    assert fallback_names == [("proj.weight", "proj.bias")] * 2


class SkipsAtFirst(nn.Module):
    """Skips a layer in its first forward, as a LayerDrop might, and draws a random number in each."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out, self.unused = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(3, 3)
        self.draws = []

    def forward(self, x):
        self.draws.append(float(torch.rand(())))
        h = torch.tanh(self.a(x))
        return self.out(h if len(self.draws) == 1 else torch.tanh(self.b(h)))


def test_a_layer_the_first_probe_run_saw_at_one_size_is_probed_again(fallback_names):
    model = f64(SkipsAtFirst())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    state = torch.get_rng_state()
    FastEngine().batch_sums(model, x, y, example_ce, param_layout(model), param_moments=False)
    torch.set_rng_state(state)
    assert fallback_names == []
    # two probe runs of two forwards, not more for the layer no run calls, then the engine's own forward
    assert len(model.draws) == 5
    assert len(set(model.draws[:4])) == 4  # the second run draws new numbers: a LayerDrop would skip others
    assert model.draws[4] == model.draws[0]  # the engine's own forward draws as if no probe had run


class FlaggedTable(nn.Module):
    """Adds a projection of a 2-row table when every example of the batch is flagged."""

    def __init__(self):
        super().__init__()
        self.a, self.table, self.out = nn.Linear(4, 6), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if (x[:, 0] > 0).all():
            rows = torch.arange(2, dtype=x.dtype)[:, None] * torch.arange(1, 6, dtype=x.dtype)
            h = h + self.table(torch.sin(rows)).sum(0)  # (2, 5) rows of a table, not examples
        return self.out(h)


@pytest.mark.filterwarnings("ignore:torch.func cannot")  # control flow on the data: the loop
def test_a_table_seen_at_one_probe_size_is_not_taken_for_batch_first(fallback_names):
    model, engine = f64(FlaggedTable()), FastEngine()
    layout = param_layout(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    x[:, 0] = torch.tensor([1.0, 1, -1, 1, -1])  # the probes' 2-example runs flag all in one run, 3-example ones never
    engine.batch_sums(model, x, torch.randint(0, 3, (5,)), example_ce, layout, param_moments=False)
    assert fallback_names == []  # the table was not called on this batch
    x2, y2 = torch.randn(2, 4, dtype=torch.float64).abs(), torch.randint(0, 3, (2,))  # as many examples as rows
    fast, ref = sums_and_loop(model, x2, y2, engine=engine, layout=layout)
    assert fallback_names == [("table.weight", "table.bias")]
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=1e-10, atol=0)


class TrainOnlyCodebook(nn.Module):
    """In train mode the head also runs on a 4-row codebook, which eval-mode probes never see."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.code = nn.Linear(4, 8), nn.Linear(8, 3), nn.Embedding(4, 8)

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x)))
        return out + 0.3 * self.head(torch.tanh(self.code.weight)).mean(0) if self.training else out


def test_probes_are_kept_per_mode_of_every_module(fallback_names):
    model, engine = f64(nn.Sequential(TrainOnlyCodebook())), FastEngine()
    model[0].eval()  # a part in eval mode, the whole in train mode
    layout = param_layout(model)
    engine.batch_sums(model, *rows(5), example_ce, layout, param_moments=False)
    assert fallback_names == []
    model[0].train()  # as many examples as the codebook has rows
    fast, ref = sums_and_loop(model, *rows(4), engine=engine, layout=layout)
    assert fallback_names == [("0.head.weight", "0.head.bias", "0.code.weight")]  # code: used outside its layer
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=1e-10, atol=0)


def rows(n):
    torch.manual_seed(n)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


class AuxHead(nn.Module):
    """An auxiliary head only train mode calls (Inception-style)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + 0.3 * self.aux(h) if self.training else self.head(h)


def test_a_layer_only_the_other_mode_calls_is_probed_in_that_mode(fallback_names):
    model, engine = f64(AuxHead()).eval(), FastEngine()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    layout = param_layout(model)
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)
    model.train()
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)
    assert fallback_names == []
    check(model, x, y, example_ce)


class OnlySomeExamplesReach(nn.Module):
    """A layer only flagged examples reach: unsettled until a probe runs on flagged examples."""

    def __init__(self):
        super().__init__()
        self.a, self.flagged, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mask = x[:, 0] > 0
        if mask.all():
            h = torch.tanh(self.flagged(h))
        return self.out(h)


@pytest.mark.filterwarnings("ignore:torch.func cannot")
def test_a_call_of_an_unsettled_layer_probes_again_on_the_next_call(fallback_names):
    model, engine = f64(OnlySomeExamplesReach()), FastEngine()
    layout = param_layout(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    x[:, 0] = -1.0  # no probe run calls the flagged layer
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)
    x.abs_()  # every example flagged: the layer is called, unsettled, so it takes the fallback once
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)
    assert fallback_names == [("flagged.weight", "flagged.bias")]
    fallback_names.clear()
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)  # probed again first
    assert fallback_names == []


# --- tied, reused, frozen, fallback ------------------------------------------


class TiedLM(nn.Module):
    """Embedding and output layer share one Parameter; the block is applied twice."""

    def __init__(self, vocab=7, width=5, functional=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.block = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.functional = functional
        if not functional:
            self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return F.linear(h, self.embed.weight) if self.functional else self.out(h)


@pytest.mark.parametrize("functional", [False, True])
def test_tied_weights_and_reused_layer(functional, fallback_names):
    model = f64(TiedLM(functional=functional))
    ids = torch.tensor([[1, 2, 2, 0], [3, 0, 6, 6], [5, 5, 5, 5]])
    check(model, ids, torch.randint(0, 7, (3, 4)), token_mean_ce)
    # module-tied weights and the twice-used block are summed from materialised per-example gradients;
    # a weight also used outside its layer (F.linear on embed.weight) goes to the fallback
    assert fallback_names == ([("embed.weight",)] * 2 if functional else [])


def test_frozen_parameters_are_ignored():
    model = seq_model(nn.Embedding(6, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6))
    model[0].weight.requires_grad_(False)
    model[1].weight.requires_grad_(False)  # its bias stays trainable
    assert param_layout(model).names == ("1.bias", "3.weight", "3.bias")
    check(model, torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3, 4)), token_mean_ce)


class Scale(nn.Module):
    """A layer without a rule, with its own Parameter."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.gain


class ReLULinear(nn.Linear):
    """A Linear subclass with its own forward: must not use the Linear rule."""

    def forward(self, x):
        return super().forward(torch.relu(x)) * 2


def test_subclass_with_own_forward_has_no_rule():
    assert find_rule(ReLULinear(2, 2)) is None
    assert find_rule(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) is not None


def test_layers_without_rule_fall_back(fallback_names):
    model = seq_model(nn.Linear(4, 6), Scale(6), nn.Tanh(), ReLULinear(6, 3), nn.Linear(3, 3))
    check(model, torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == [("1.gain", "3.weight", "3.bias")] * 2  # only the rule-less layers' parameters


def test_unused_parameters_have_zero_gradient():
    model = seq_model(nn.Linear(4, 3), nn.Linear(3, 3))  # used only partly: call model[0] alone
    only_first = lambda out, y: example_ce(out, y)  # noqa: E731

    class FirstOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m[0](x)

    check(FirstOnly(), torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), only_first)


class PositionTable(nn.Module):
    """A Linear applied to a parameter table (T, D): its rows are positions, not examples."""

    def __init__(self, t=3, width=4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(t, width))
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):  # (B, T, D)
        return self.out(torch.tanh(x + self.proj(self.table)))


@pytest.mark.parametrize("n", [2, 3])  # n = 3 = T: the table's dim 0 looks like an example dimension
def test_layer_on_a_parameter_table_falls_back(n, fallback_names):
    model = f64(PositionTable())
    check(model, torch.randn(n, 3, 4, dtype=torch.float64), torch.randint(0, 2, (n, 3)), token_mean_ce)
    assert fallback_names == [("table", "proj.weight", "proj.bias")] * 2


def test_user_hooks_that_replace_outputs_are_respected():
    model = seq_model(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].register_forward_hook(lambda module, args, output: 2 * output)
    check(model, torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), example_ce)
    assert len(model[0]._forward_hooks) == 1  # the user's hook stays, ours is gone


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.scale = Scale(4)
        self.bn = nn.BatchNorm1d(8).eval()
        self.head = nn.Linear(4 * 16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))  # (B, 4, 4, 4)
        h = self.scale(h.transpose(1, 3)).transpose(1, 3)
        return self.out(torch.tanh(self.bn(self.head(h.flatten(1)))))


def test_mixed_model(fallback_names):
    model = f64(MixedNet())
    check(model, torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,)), example_ce)
    assert fallback_names == [("scale.gain",)] * 2


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_attention_block_falls_back_where_needed(fallback_names):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ln = nn.LayerNorm(8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            h = self.attn(x, x, x, need_weights=False)[0]
            return self.out(self.ln(x + h))

    model = f64(Attn()).train()
    check(model, torch.randn(3, 5, 8, dtype=torch.float64), torch.randint(0, 4, (3, 5)), token_mean_ce)
    # out_proj is a Linear whose forward MultiheadAttention never calls: the graph check catches it
    names = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias")
    assert fallback_names == [names] * 2


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.out = cell(3, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):  # (B, T, 3)
        return self.out(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_layers_torch_func_cannot_vmap_take_the_loop_once_warned(cell, fallback_names, monkeypatch):
    import gns_sweep.per_example.fast as fast

    tried = []
    monkeypatch.setattr(fast, "per_example_grads", lambda *args: tried.append(1) or real(*args))
    real = per_example_grads
    model, engine = f64(Recurrent(cell)), FastEngine()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    layout = param_layout(model)
    with pytest.warns(RuntimeWarning, match="rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 and 1 more"):
        first = engine.batch_sums(model, x, y, example_ce, layout, param_moments=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model: the engine goes to the loop straight away
        again = engine.batch_sums(model, x, y, example_ce, layout, param_moments=True)
    assert len(tried) == 1 and len(fallback_names) == 2  # torch.func tried on the first call only
    ref = LoopEngine().batch_sums(model, x, y, example_ce, layout, param_moments=True)
    for sums in (first, again):
        torch.testing.assert_close(sums.sq_norm_sum, ref.sq_norm_sum, rtol=1e-10, atol=0)
        for a, b in zip([*sums.grad_sum, *sums.param_sq_sum], [*ref.grad_sum, *ref.param_sq_sum], strict=True):
            torch.testing.assert_close(a.double().reshape(-1), b.reshape(-1), rtol=1e-9, atol=1e-12)


def test_global_hooks_that_replace_outputs_are_respected():
    model = seq_model(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    replace = lambda module, args, output: 2 * output if isinstance(module, nn.Linear) else None  # noqa: E731
    handle = nn.modules.module.register_module_forward_hook(replace)
    try:
        check(model, torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), example_ce)
        assert len(nn.modules.module._global_forward_hooks) == 1  # the user's hook stays, ours is gone
        assert not nn.modules.module._global_forward_hooks_with_kwargs  # with the entry torch's handle leaves
    finally:
        handle.remove()


class ChangedInput(nn.Module):
    """Changes a norm layer's input in place after the call; RMSNorm's backward does not need it, but its
    rule would read the changed values."""

    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.RMSNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = x.detach().clone()  # needs no gradient, so autograd never checks its version
        y = self.norm(h)
        h.add_(1.0)  # not a scaling, which RMSNorm would not see
        return self.out(y + 0.1 * h)


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch < 2.4")
def test_input_changed_in_place_after_the_call_falls_back(fallback_names):
    model = f64(ChangedInput())
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(4, dtype=torch.float64))
    check(model, torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == [("norm.weight",)] * 2


def test_float16_squares_do_not_overflow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)).half()  # every gradient entry below 65504...
    x, y = (300 * torch.randn(5, 6)).half(), torch.randint(0, 3, (5,))  # ...but their squares above it
    fast, ref = sums_and_loop(model, x, y)
    assert float(ref.sq_norm_sum.max()) > 65504
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=2e-3, atol=0)
    for a, b in zip(fast.param_sq_sum, ref.param_sq_sum, strict=True):
        torch.testing.assert_close(a.double(), b.reshape(a.shape), rtol=2e-3, atol=1e-3)


def test_float16_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).half().eval()
    fast, ref = sums_and_loop(model, torch.randn(5, 6).half(), torch.randint(0, 3, (5,)))
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=2e-3, atol=1e-6)


class Autocast(nn.Module):
    """A forward that runs one layer under autocast: its output gradient is bfloat16, its input float32."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.hidden(x))
        return self.out(h.float())


def test_autocast_inside_the_forward():
    torch.manual_seed(0)
    fast, ref = sums_and_loop(Autocast(), torch.randn(5, 8), torch.randint(0, 3, (5,)))  # loop: bfloat16
    torch.testing.assert_close(fast.sq_norm_sum, ref.sq_norm_sum, rtol=2e-2, atol=0)


# --- float32 ------------------------------------------------------------------


class CharModel(nn.Module):
    def __init__(self, vocab=11, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.final = nn.RMSNorm(width) if hasattr(nn, "RMSNorm") else nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.mlp(self.norm(h))
        return self.out(self.final(h))


def test_float32_agrees_to_1e5(fallback_names, monkeypatch):
    import gns_sweep.per_example.rules.embedding as embedding
    import gns_sweep.per_example.rules.outer as outer

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


class OtherPaths(nn.Module):
    """The rules and paths CharModel misses: Embedding by distinct pairs (vocab > 4x tokens), Linear in
    Gram form (2 wide positions), Conv1d, BatchNorm in eval mode."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(60, 64)
        self.wide = nn.Linear(64, 64)
        self.conv = nn.Conv1d(64, 6, 2)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        h = torch.tanh(self.wide(self.embed(ids)))  # (B, 2, 64)
        h = self.bn(self.conv(h.transpose(1, 2)))  # (B, 6, 1)
        return self.out(h.flatten(1))


# --- guards and plumbing ------------------------------------------------------


def test_batchnorm_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    layout = param_layout(model)
    with pytest.raises(UsageError, match=r"'1'.*BatchNorm1d"):
        batch_moments(FastEngine(), model, x, y, example_ce, layout, param_moments=False)
    with pytest.raises(UsageError, match=r"'1'.*BatchNorm1d"):
        shard_moments(FastEngine(), model, x, y, example_ce, layout, max_batch=2, param_moments=False)


def test_engine_follows_the_model_it_is_given():
    """The engine keeps what it read off a model between calls; a new model or layout is read again,
    and a BatchNorm switched to train mode is refused even on a model seen before."""
    engine = FastEngine()
    torch.manual_seed(3)
    first = f64(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).eval(), nn.Linear(4, 2)))
    second = f64(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    for model in (first, second, first):
        layout = param_layout(model)
        got = batch_moments(engine, model, x, y, example_ce, layout, param_moments=True).moments
        ref = batch_moments(LoopEngine(), model, x, y, example_ce, layout, param_moments=True).moments
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.m2_group, ref.m2_group, rtol=1e-9)
    first[1].train()
    with pytest.raises(UsageError, match=r"'1'.*BatchNorm1d"):
        batch_moments(engine, first, x, y, example_ce, layout, param_moments=False)


def test_micro_batches_equal_one_batch():
    model = f64(CharModel())
    ids, y = torch.randint(0, 11, (7, 5)), torch.randint(0, 11, (7, 5))
    layout = param_layout(model)
    whole = batch_moments(FastEngine(), model, ids, y, token_mean_ce, layout, param_moments=True)
    parts = shard_moments(get_engine("fast"), model, ids, y, token_mean_ce, layout, max_batch=3, param_moments=True)
    assert parts.moments.n == whole.moments.n == 7
    for field in ("mean", "m2_group", "m2_param"):
        np.testing.assert_allclose(getattr(parts.moments, field), getattr(whole.moments, field), rtol=1e-10, atol=1e-14)
    assert parts.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)


def test_model_grads_and_hooks_left_alone():
    model = f64(TiedLM())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.full_like(model.block.weight, 3.0)
    model.block.weight.grad = marker
    engine = FastEngine()
    for _ in range(2):  # a second call on the same engine too
        batch_moments(
            engine,
            model,
            torch.randint(0, 7, (3, 4)),
            torch.randint(0, 7, (3, 4)),
            token_mean_ce,
            param_layout(model),
            param_moments=True,
        )
    assert model.block.weight.grad is marker and bool((marker == 3.0).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "block.weight")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_inputs_are_freed_during_the_backward():
    """Once a layer's rule has run and autograd is done with its input, the engine holds it no longer:
    otherwise every layer's input would live until the end of the call, beside the growing sums."""
    import weakref

    model = seq_model(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    inputs: list[weakref.ref] = []  # the inputs of model[2] and model[4], as the Tanh layers return them
    alive_at_the_bottom: list[list[bool]] = []

    def keep_ref(module, args, output):
        inputs.append(weakref.ref(output))

    def at_the_bottom(module, args, output):  # runs after the engine's own hook on this output
        output.register_hook(lambda d: alive_at_the_bottom.append([r() is not None for r in inputs]))

    model[1].register_forward_hook(keep_ref)
    model[3].register_forward_hook(keep_ref)
    model[0].register_forward_hook(at_the_bottom)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    FastEngine().batch_sums(model, x, y, example_ce, param_layout(model), param_moments=True)
    assert alive_at_the_bottom == [[False, False]]


class Branches(nn.Module):
    """Two Linear layers on one input: with `trunk`, a shared Linear below both."""

    def __init__(self, trunk: bool):
        super().__init__()
        self.trunk = nn.Linear(4, 4) if trunk else nn.Identity()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.a(h) + self.b(torch.sin(h))


@pytest.mark.parametrize(
    ("make", "lowest"),
    [
        (lambda: seq_model(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)), 1),
        (lambda: f64(Branches(trunk=False)), 2),  # neither branch is below the other
        (lambda: f64(Branches(trunk=True)), 1),
    ],
)
def test_autograd_is_asked_for_the_lowest_calls_only(make, lowest, monkeypatch):
    """Asking autograd for every layer's output gradient would hold them all until the backward ends."""
    import gns_sweep.per_example.fast as fast

    plans, real = [], fast._make_plan
    monkeypatch.setattr(fast, "_make_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    check(make(), torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,)), example_ce)
    assert plans and all(len(p.edges) == lowest for p in plans)


@pytest.mark.parametrize("make", [TiedLM, CharModel])  # with multi-use parameters; rules only
def test_calls_leave_no_reference_cycles(make):
    """A cycle through a call's autograd graph would keep its activations alive until the garbage
    collector runs: memory grew with every micro-batch of a shard. (torch.func, behind the fallback,
    makes cycles of its own, without tensors in them.)"""
    import gc

    model = f64(make())
    engine, layout = FastEngine(), param_layout(model)
    x, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    loss = token_mean_ce
    engine.batch_sums(model, x, y, loss, layout, param_moments=True)
    gc.collect()
    gc.disable()
    try:
        engine.batch_sums(model, x, y, loss, layout, param_moments=True)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_engine_is_registered():
    assert get_engine("fast").name == "fast"
