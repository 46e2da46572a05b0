"""Which path each parameter takes: one rule call, several calls summed, or the fallback.

Tied and reused weights, parameters used outside their layer, layers without a rule, in-place ops,
and hooks of the user's, each against the per-example loop and with the fallback's use checked.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gns_sweep.per_example.fast as fast
from gns_sweep.per_example import param_layout
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.general import per_example_grads
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.per_example.rules import find_rule

from .helpers import check, example_ce, f64, half_sq, seq_model, token_mean_ce
from .models import (
    Attention,
    Branches,
    ChangedInput,
    FirstLayerOnly,
    InnerGradient,
    MixedNet,
    Recurrent,
    ReLULinear,
    Scale,
    TiedLM,
    ViewThenInPlace,
)

# --- the autograd graph: tied, reused, frozen, unused, changed in place -------


@pytest.mark.parametrize("functional", [False, True])
def test_tied_weights_and_reused_layer(functional, fallback_names):
    model = f64(TiedLM(functional=functional))
    ids = torch.tensor([[1, 2, 2, 0], [3, 0, 6, 6], [5, 5, 5, 5]])
    check(model, ids, torch.randint(0, 7, (3, 4)), token_mean_ce)
    # module-tied weights and the twice-used block are summed from materialised per-example gradients;
    # a weight also used outside its layer (F.linear on embed.weight) goes to the fallback
    assert fallback_names == ([("embed.weight",)] * 2 if functional else [])


def test_frozen_parameters_are_ignored(fallback_names):
    model = seq_model(nn.Embedding(6, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6))
    model[0].weight.requires_grad_(False)
    model[1].weight.requires_grad_(False)  # its bias stays trainable
    assert param_layout(model).names == ("1.bias", "3.weight", "3.bias")
    check(model, torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3, 4)), token_mean_ce)
    assert fallback_names == []


def test_unused_parameters_have_zero_gradient(fallback_names):
    model = FirstLayerOnly(seq_model(nn.Linear(4, 3), nn.Linear(3, 3)))
    got = check(model, torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), example_ce).moments
    assert fallback_names == []
    unused = slice(got.offsets[2], got.offsets[4])  # m.1.weight, m.1.bias
    assert got.mean[: unused.start].any() and not got.mean[unused].any() and not got.m2_param[unused].any()
    np.testing.assert_array_equal(got.m2_group[2:4], 0.0)


@pytest.mark.parametrize("keep_copy", [True, False])
def test_in_place_op_on_a_reshaped_linear_output(keep_copy, fallback_names):
    model = f64(ViewThenInPlace(keep_copy))
    check(model, torch.randn(4, 5, 4, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64), half_sq)
    assert fallback_names == []


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch < 2.4")
def test_input_changed_in_place_after_the_call_falls_back(fallback_names):
    model = f64(ChangedInput())
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(4, dtype=torch.float64))
    check(model, torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == [("norm.weight",)] * 2


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
    plans, real = [], fast._make_plan
    monkeypatch.setattr(fast, "_make_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    check(make(), torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,)), example_ce)
    assert plans and all(len(p.edges) == lowest for p in plans)


# --- layers without a rule ----------------------------------------------------


def test_subclass_with_own_forward_has_no_rule():
    assert find_rule(ReLULinear(2, 2)) is None
    assert find_rule(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) is not None


def test_layers_without_rule_fall_back(fallback_names):
    model = seq_model(nn.Linear(4, 6), Scale(6), nn.Tanh(), ReLULinear(6, 3), nn.Linear(3, 3))
    check(model, torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == [("1.gain", "3.weight", "3.bias")] * 2  # only the rule-less layers' parameters


def test_mixed_model(fallback_names):
    model = f64(MixedNet())
    check(model, torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,)), example_ce)
    assert fallback_names == [("scale.gain",)] * 2


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_attention_block_falls_back_where_needed(fallback_names):
    model = f64(Attention()).train()
    check(model, torch.randn(3, 5, 8, dtype=torch.float64), torch.randint(0, 4, (3, 5)), token_mean_ce)
    # out_proj is a Linear whose forward MultiheadAttention never calls: the graph check catches it
    names = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias")
    assert fallback_names == [names] * 2


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_layers_torch_func_cannot_vmap_take_the_loop_once_warned(cell, fallback_names, monkeypatch):
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


# --- hooks of the user's -----------------------------------------------------


def test_user_hooks_that_replace_outputs_are_respected(fallback_names):
    model = seq_model(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].register_forward_hook(lambda module, args, output: 2 * output)
    check(model, torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), example_ce)
    assert len(model[0]._forward_hooks) == 1  # the user's hook stays, ours is gone
    assert fallback_names == []  # the rule saw the replaced output's gradient


def test_global_hooks_that_replace_outputs_are_respected(fallback_names):
    model = seq_model(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    replace = lambda module, args, output: 2 * output if isinstance(module, nn.Linear) else None  # noqa: E731
    handle = nn.modules.module.register_module_forward_hook(replace)
    try:
        check(model, torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), example_ce)
        assert len(nn.modules.module._global_forward_hooks) == 1  # the user's hook stays, ours is gone
        assert not nn.modules.module._global_forward_hooks_with_kwargs  # with the entry torch's handle leaves
        assert fallback_names == []
    finally:
        handle.remove()


def test_backward_inside_the_forward(fallback_names):
    check(f64(InnerGradient()), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), example_ce)
    assert fallback_names == []
