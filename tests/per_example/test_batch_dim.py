"""Inputs whose dim 0 is not the examples, and the batch-dimension probe that finds them.

A layer's input with as many rows as the micro-batch has examples -- a position table, a buffer, a
parameter expression, a sequence-first layout -- must go to the fallback; the probes (batch_dim) must
settle each layer without disturbing the model's random state or buffers.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep.per_example import batch_moments, param_layout
from gns_sweep.per_example.batch_dim import probe_sizes
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.loop import LoopEngine

from .helpers import check, example_ce, f64, rows, seq_model, sums_and_loop, token_mean_ce
from .models import (
    AuxHead,
    FixedBatch,
    FlaggedTable,
    LazySubmodule,
    LazyTable,
    LearnedPositions,
    OnlySomeExamplesReach,
    PositionTable,
    RunningScale,
    SequenceFirst,
    SkipsAtFirst,
    SpecialTokens,
    TableInput,
    TrainOnlyCodebook,
)

# --- tables with as many rows as examples ------------------------------------


@pytest.mark.parametrize("kind", [LazyTable, LazySubmodule])
def test_buffer_made_by_the_forward_is_no_example_batch(kind, fallback_names):
    model = f64(kind())
    x, y = torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3, 3))
    layout, engine = param_layout(model), FastEngine()
    got = batch_moments(engine, model, x, y, token_mean_ce, layout, param_moments=False).moments  # builds it
    ref = batch_moments(LoopEngine(), model, x, y, token_mean_ce, layout, param_moments=False).moments
    np.testing.assert_allclose(got.m2_group, ref.m2_group, rtol=1e-9)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-9, atol=1e-12)
    assert fallback_names == [("proj.weight", "proj.bias")]


@pytest.mark.parametrize("n", [2, 3])  # n = 3 = T: the table's dim 0 looks like an example dimension
def test_layer_on_a_parameter_table_falls_back(n, fallback_names):
    model = f64(PositionTable())
    check(model, torch.randn(n, 3, 4, dtype=torch.float64), torch.randint(0, 2, (n, 3)), token_mean_ce)
    assert fallback_names == [("table", "proj.weight", "proj.bias")] * 2


@pytest.mark.parametrize("n", [3, 4])  # 4: as many examples as positions
def test_position_table_is_no_example_batch(n, fallback_names):
    ids, y = torch.randint(0, 7, (n, 4)), torch.randint(0, 7, (n, 4))
    check(f64(LearnedPositions()), ids, y, token_mean_ce)
    assert fallback_names == [("positions.weight",)] * 2  # n = 3 by its shape, n = 4 by the probe


@pytest.mark.parametrize(
    ("kind", "outside"),
    [("slice", ()), ("expr", ("src",)), ("remade buffer", ("src",))],  # src: a parameter used outside any rule
)
def test_linear_on_a_table_with_as_many_rows_as_examples(kind, outside, fallback_names):
    check(f64(TableInput(kind)), torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3, 3)),
          token_mean_ce)  # fmt: skip
    assert fallback_names == [(*outside, "proj.weight", "proj.bias")] * 2


def test_sequence_first_layers_with_as_many_positions_as_examples(fallback_names):
    check(f64(SequenceFirst()), torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3, 3)), token_mean_ce)
    every = ("a.weight", "a.bias", "norm.weight", "norm.bias", "b.weight", "b.bias")
    assert fallback_names == [every] * 2  # every layer sees positions on dim 0: all go to the fallback


# --- probes -------------------------------------------------------------------


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


def test_a_layer_the_probe_never_called_is_not_taken_for_batch_first(fallback_names):
    ids = torch.tensor([[0, 2, 4], [6, 1, 0], [2, 2, 4], [7, 8, 0], [9, 7, 8]])  # 5 special tokens, 5 examples
    with pytest.warns(RuntimeWarning, match=r"proj\.weight, proj\.bias .*one backward per example"):
        check(f64(SpecialTokens()), ids, ids.roll(1, 1), token_mean_ce)
    assert fallback_names == [("proj.weight", "proj.bias")] * 2


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


def test_a_layer_only_the_other_mode_calls_is_probed_in_that_mode(fallback_names):
    model, engine = f64(AuxHead()).eval(), FastEngine()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    layout = param_layout(model)
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)
    model.train()
    engine.batch_sums(model, x, y, example_ce, layout, param_moments=False)
    assert fallback_names == []
    check(model, x, y, example_ce)


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
