"""The fast engine as a whole: guards, micro-batching, what it leaves behind, and get_engine."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example import ENGINES, batch_moments, get_engine, param_layout, shard_moments
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.loop import LoopEngine

from .helpers import example_ce, f64, seq_model, token_mean_ce
from .models import CharModel, TiedLM


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


@pytest.mark.parametrize("make", [TiedLM, CharModel])  # with multi-use parameters; rules only
def test_calls_leave_no_reference_cycles(make):
    """A cycle through a call's autograd graph would keep its activations alive until the garbage
    collector runs: memory would grow with every micro-batch of a shard. (torch.func, behind the fallback,
    makes cycles of its own, without tensors in them.)"""
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


def test_get_engine_makes_a_new_engine_of_the_named_kind():
    """An engine keeps what it read off a model, so each name gives a new one of its class."""
    assert set(ENGINES) == {"fast", "general", "loop", "micro-batch"}
    for name, cls in ENGINES.items():
        engine = get_engine(name)
        assert type(engine) is cls and engine.name == name
        assert get_engine(name) is not engine
    with pytest.raises(UsageError, match=r"unknown engine 'fastest'; choose one of: fast, general, loop, micro-batch"):
        get_engine("fastest")
