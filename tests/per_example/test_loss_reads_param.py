"""A loss that reads a parameter itself (an L2 term written into each example's loss), in every engine.

The loss's own use of the parameter is part of each example's gradient: the loop includes it by
construction. torch.func used to run the loss outside functional_call and so dropped it (the mean
gradient off by ~5e-2 here); now the loss runs inside it, and a parameter the loss holds through a
reference of its own, which functional_call cannot swap, sends the engine to the loop with a warning.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep.per_example import MicroBatchEngine, param_layout
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.general import DirectRead, GeneralEngine, per_example_grads

from .helpers import check, f64
from .models import Scale

LAM = 0.1


class Net(nn.Module):
    """A Linear with a rule below a rule-less Scale and a Linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.scale, self.fc = nn.Linear(4, 6), Scale(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.scale(self.a(x))))


def losses(model: Net) -> dict:
    """Per-example losses reading parameters beside the outputs, as a user would write them. "held" keeps
    its own reference to the parameter; the others read it from the model."""
    w = model.fc.weight

    def ce(out, y):
        return F.cross_entropy(out, y, reduction="none")  # (B,)

    return {
        "l2": lambda out, y: ce(out, y) + LAM * model.fc.weight.square().sum(),  # the same term for each example
        "l2-held": lambda out, y: ce(out, y) + LAM * w.square().sum(),
        "per-example": lambda out, y: ce(out, y) + LAM * (out.tanh() * model.fc.bias).sum(1),  # (B,)
        "rule-less": lambda out, y: ce(out, y) + LAM * model.scale.gain.pow(4).sum(),
        "lower-layer": lambda out, y: ce(out, y) + LAM * (out.sum(1) * model.a.weight.sum()),
    }


def data(n=5):
    torch.manual_seed(n)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


ENGINES = {"fast": FastEngine, "general": GeneralEngine, "micro-batch b=1": functools.partial(MicroBatchEngine, 1)}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["l2", "per-example", "rule-less", "lower-layer"])
def test_a_parameter_read_from_the_model_by_the_loss_matches_the_loop(kind, engine):
    model = f64(Net())
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.func takes these: no detour by the loop
        check(model, x, y, losses(model)[kind], engine=ENGINES[engine])


def test_fast_engine_sends_only_the_parameter_the_loss_reads_to_the_fallback(fallback_names):
    """The graph walk finds the loss's use: one more edge into fc.weight than the rule's call accounts for."""
    model = f64(Net())
    x, y = data()
    check(model, x, y, losses(model)["l2"])
    assert fallback_names == [("scale.gain", "fc.weight")] * 2  # the Scale has no rule either


@pytest.mark.parametrize("engine", ["fast", "general"])
def test_a_parameter_the_loss_holds_itself_takes_the_loop_once_warned(engine):
    """torch.func cannot swap a reference the loss keeps: it would see a constant. It is caught, not dropped."""
    model = f64(Net())
    x, y = data()
    with pytest.warns(RuntimeWarning, match=r"reads 'fc\.weight' through a reference of its own"):
        check(model, x, y, losses(model)["l2-held"], engine=ENGINES[engine])


def test_per_example_grads_raises_on_a_held_parameter_and_names_it():
    model = f64(Net())
    x, y = data()
    with pytest.raises(DirectRead, match=r"'fc\.weight'"):
        per_example_grads(model, x, y, losses(model)["l2-held"], param_layout(model))
