"""register_rule: a rule for a layer type of the user's own, against the per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example import Call, Rule, register_rule
from gns_sweep.per_example.rules import find_rule

from .helpers import check, f64, half_sq, seq_model
from .models import Scale


class ScaleRule(Rule):
    """Scale: y = x * gain, so example i's gain gradient is its sum over positions of x * d. Records its calls."""

    param_names = ("gain",)

    def __init__(self) -> None:
        self.calls: list[str] = []  # "stats" or "grads", in the order the engine called them

    def grads(self, module: nn.Module, call: Call, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        self.calls.append("grads")
        x, d = call.x, call.grad  # (B, ..., D) each
        return {"gain": (x * d).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}  # (B, D)

    def stats(self, module, call, names, *, param_moments):
        self.calls.append("stats")
        return super().stats(module, call, names, param_moments=param_moments)  # from grads


class TwiceScaled(nn.Module):
    """One Scale applied twice: its gradient is the sum of two calls' per-example gradients."""

    def __init__(self):
        super().__init__()
        self.proj, self.scale, self.out = nn.Linear(4, 6), Scale(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.scale(torch.tanh(self.scale(self.proj(x)))))


class ShiftedScale(Scale):
    """A Scale with its own forward: its subclass must not inherit the rule."""

    def forward(self, x):
        return super().forward(x) + 1.0


def scaled_model() -> nn.Sequential:
    return seq_model(nn.Linear(6, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("shape", [(1, 6), (5, 6), (1, 4, 6), (3, 4, 6)])  # N = 1, 2-D and 3-D inputs
def test_a_registered_rule_gives_the_loops_statistics(shape, fallback_names):
    model, rule = scaled_model(), ScaleRule()
    x = torch.randn(*shape, dtype=torch.float64)
    with register_rule(Scale, rule):
        check(model, x, torch.randn(*shape[:-1], 3, dtype=torch.float64), half_sq)
    assert fallback_names == []
    assert rule.calls == ["stats", "grads"] * 2  # one call per engine call (check runs two)
    assert find_rule(Scale(2)) is None  # removed on leaving the block


def test_without_registration_the_layer_falls_back(fallback_names):
    check(scaled_model(), torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), half_sq)
    assert fallback_names == [("1.gain",)] * 2


def test_a_layer_called_twice_sums_the_rules_grads(fallback_names):
    rule = ScaleRule()
    with register_rule(Scale, rule):
        check(f64(TwiceScaled()), torch.randn(4, 5, 4, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64),
              half_sq)  # fmt: skip
    assert fallback_names == []
    assert rule.calls == ["grads"] * 4  # both calls, in each engine call; stats of one call would not add up


def test_subclasses_share_the_rule_only_while_they_keep_the_forward():
    class Kept(Scale):
        pass

    rule = ScaleRule()
    with register_rule(Scale, rule):
        assert find_rule(Scale(2)) is rule and find_rule(Kept(2)) is rule
        assert find_rule(ShiftedScale(2)) is None


def test_remove_puts_back_the_rule_the_type_had():
    builtin = find_rule(nn.Linear(2, 2))
    handle = register_rule(nn.Linear, ScaleRule())
    assert find_rule(nn.Linear(2, 2)) is handle.rule
    handle.remove()
    handle.remove()  # a second remove changes nothing
    assert find_rule(nn.Linear(2, 2)) is builtin
    outer = register_rule(Scale, ScaleRule())
    inner = register_rule(Scale, ScaleRule())
    inner.remove()
    assert find_rule(Scale(2)) is outer.rule
    outer.remove()
    assert find_rule(Scale(2)) is None


class NoGrads(Rule):
    pass


@pytest.mark.parametrize(
    ("layer", "rule", "message"),
    [
        (Scale(2), ScaleRule(), r"got Scale\(\): pass the class, Scale, not an instance"),
        (int, ScaleRule(), r"first argument must be a layer class; got <class 'int'>"),
        (nn.Module, ScaleRule(), r"got <class 'torch.nn.modules.module.Module'>"),
        (Scale, ScaleRule, r"got <class '.*ScaleRule'>: pass an instance, ScaleRule\(\), not the class"),
        (Scale, "scale", r"must be a Rule; got 'scale': subclass gns_sweep.per_example.Rule"),
        (Scale, NoGrads(), r"NoGrads for Scale does not define grads"),
    ],
)
def test_register_rule_names_the_bad_argument(layer, rule, message):
    with pytest.raises(UsageError, match=message):
        register_rule(layer, rule)
