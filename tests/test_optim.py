"""The optimizers: settings and their checks, LARS against a hand-computed step, Adam's preconditioner
against a hand computation, and what heavy-ball momentum does to the batch-size comparison."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.optim import Lars, OptimizerSpec, build, choose, parse_betas, preconditioner


# --- the settings ---------------------------------------------------------------------------------
def test_key_holds_the_settings_each_optimizer_reads():
    assert OptimizerSpec().key() == {"name": "sgd", "weight_decay": 0.0}
    assert OptimizerSpec("momentum", momentum=0.5).key() == {"name": "momentum", "momentum": 0.5, "weight_decay": 0.0}
    assert OptimizerSpec("adamw", betas=[0.8, 0.99], weight_decay=0.1).key() == {
        "name": "adamw",
        "betas": [0.8, 0.99],
        "eps": 1e-8,
        "weight_decay": 0.1,
    }
    assert OptimizerSpec("lars", trust=0.02).key() == {
        "name": "lars",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "trust": 0.02,
    }
    assert [OptimizerSpec(n).adaptive for n in ("sgd", "momentum", "adam", "adamw", "lars")] == [0, 0, 1, 1, 0]
    assert [OptimizerSpec(n).lr_scaling for n in ("sgd", "momentum", "adam", "adamw", "lars")] == [
        "linear",
        "linear",
        "sqrt",
        "sqrt",
        "linear",
    ]
    assert OptimizerSpec("adam", betas=[0.9, 0.999]) == OptimizerSpec("adam")  # betas kept as a tuple


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"name": "momentum", "momentum": 1.0}, "momentum 1 must be >= 0 and < 1"),
        ({"name": "momentum", "momentum": -0.1}, "momentum -0.1"),
        ({"name": "adam", "betas": (0.9, 1.0)}, "beta2 1 must be >= 0 and < 1"),
        ({"name": "adam", "betas": (0.9,)}, "give two numbers"),
        ({"name": "adam", "eps": 0.0}, "eps 0 must be > 0"),
        ({"name": "adam", "weight_decay": -1.0}, "weight decay -1 must be >= 0"),
        ({"name": "lars", "trust": 0.0}, "trust coefficient 0 must be > 0"),
        ({"name": "lars", "momentum": float("nan")}, "momentum nan must be a finite number"),
        ({"name": "adam", "momentum": 0.5}, "momentum 0.5 does not apply to optimizer 'adam'"),
        ({"name": "sgd", "trust": 0.01}, "trust 0.01 does not apply to optimizer 'sgd' (lars use it)"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(UsageError, match=None) as err:
        OptimizerSpec(**kwargs)
    assert message in str(err.value)


def test_choose_starts_from_the_task_default_and_refuses_options_that_do_not_apply():
    task_default = OptimizerSpec("adamw", betas=(0.9, 0.95), weight_decay=0.1)
    assert choose(task_default) is None  # nothing given: the task's default stands
    assert choose(task_default, weight_decay=0.0) == OptimizerSpec("adamw", betas=(0.9, 0.95))
    assert choose(task_default, name="adamw", betas=(0.8, 0.9)) == OptimizerSpec(
        "adamw", betas=(0.8, 0.9), weight_decay=0.1
    )
    assert choose(task_default, name="momentum") == OptimizerSpec("momentum")  # another optimizer: its defaults
    assert choose(None, name="lars", trust=0.01, momentum=0.8) == OptimizerSpec("lars", trust=0.01, momentum=0.8)
    with pytest.raises(UsageError, match="--momentum does not apply to optimizer 'adam'; drop --momentum, or choose "
                       "--optimizer momentum or lars"):  # fmt: skip
        choose(None, name="adam", momentum=0.9)  # the default value, given: still refused
    with pytest.raises(UsageError, match="--betas does not apply to optimizer 'sgd'"):
        choose(None, betas=(0.9, 0.99))
    with pytest.raises(UsageError, match="--trust-coefficient does not apply to optimizer 'adamw'"):
        choose(task_default, trust=0.01)
    with pytest.raises(UsageError, match="unknown --optimizer 'sgdm'"):
        choose(None, name="sgdm")
    assert parse_betas("0.9, 0.99") == (0.9, 0.99)
    for bad in ("0.9", "0.9,0.99,0.999", "a,b"):
        with pytest.raises(UsageError, match="--betas"):
            parse_betas(bad)


def test_build_gives_torch_s_own_optimizers():
    p = [nn.Parameter(torch.ones(3))]
    assert type(build(OptimizerSpec(), p, 0.1)) is torch.optim.SGD
    sgdm = build(OptimizerSpec("momentum", momentum=0.7, weight_decay=0.01), p, 0.1)
    assert type(sgdm) is torch.optim.SGD and sgdm.defaults["momentum"] == 0.7 and sgdm.defaults["weight_decay"] == 0.01
    adam = build(OptimizerSpec("adam", betas=(0.8, 0.9), eps=1e-6), p, 0.1)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-6
    assert type(build(OptimizerSpec("adamw", weight_decay=0.1), p, 0.1)) is torch.optim.AdamW
    assert type(build(OptimizerSpec("lars"), p, 0.1)) is Lars


# --- LARS against the formula, by hand ------------------------------------------------------------
def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _lars_by_hand(w, b, x, y, *, lr, momentum, wd, trust, steps):
    """LARS (You et al. 2017, Algorithm 1) on a 2-input linear model, half squared error on one example,
    in plain Python floats: each tensor (the weight row, the bias) is its own layer."""
    vel = {"w": [0.0, 0.0], "b": [0.0]}
    params = {"w": list(w), "b": [b]}
    for _ in range(steps):
        r = params["w"][0] * x[0] + params["w"][1] * x[1] + params["b"][0] - y  # residual
        grads = {"w": [r * x[0], r * x[1]], "b": [r]}
        for k in ("w", "b"):
            p, g = params[k], grads[k]
            denom = _norm(g) + wd * _norm(p)
            local = trust * _norm(p) / denom if _norm(p) > 0 and denom > 0 else 1.0
            step = [lr * local * (gi + wd * pi) for gi, pi in zip(g, p, strict=True)]
            vel[k] = [momentum * vi + si for vi, si in zip(vel[k], step, strict=True)]
            params[k] = [pi - vi for pi, vi in zip(p, vel[k], strict=True)]
    return params["w"], params["b"][0]


@pytest.mark.parametrize("bias", [0.25, 0.0])  # 0.0: a zero-norm tensor takes local = 1
def test_lars_steps_match_the_formula_by_hand(bias):
    w0, x, y = [0.5, -1.0], [1.0, 2.0], 1.0
    settings = dict(lr=2.0, momentum=0.9, wd=0.01, trust=0.1)
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w0]))
        model.bias.fill_(bias)
    opt = build(OptimizerSpec("lars", momentum=0.9, weight_decay=0.01, trust=0.1), model.parameters(), 2.0)
    xt, yt = torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)
    for steps in (1, 2, 3):  # the second and third steps carry the velocity
        opt.zero_grad()
        (0.5 * (model(xt).squeeze(-1) - yt) ** 2).sum().backward()
        opt.step()
        w, b = _lars_by_hand(w0, bias, x, y, steps=steps, **settings)
        assert model.weight.detach()[0].tolist() == pytest.approx(w, rel=1e-12, abs=1e-15)
        assert float(model.bias.detach()) == pytest.approx(b, rel=1e-12, abs=1e-15)


# --- Adam's preconditioner against a hand computation ----------------------------------------------
def test_adam_preconditioner_is_one_over_root_v_hat_plus_eps_by_hand():
    beta1, beta2, eps, lr = 0.8, 0.9, 1e-3, 0.1
    spec = OptimizerSpec("adam", betas=(beta1, beta2), eps=eps)
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    frozen = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # never gets a gradient
    opt = build(spec, [w, frozen], lr)
    named = {"w": w, "frozen": frozen}
    assert preconditioner(opt, spec, named) is None  # t = 0: no second moments yet
    grads = [[0.3, -0.1, 0.0], [0.5, 0.2, -0.4]]
    m, v = [0.0] * 3, [0.0] * 3
    for t, g in enumerate(grads, start=1):
        w.grad = torch.tensor(g, dtype=torch.float64)
        before = w.detach().clone()
        opt.step()
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        p_hand = [1 / (math.sqrt(vi / (1 - beta2**t)) + eps) for vi in v]
        p = preconditioner(opt, spec, named)
        assert set(p) == {"w", "frozen"} and p["w"].shape == w.shape
        assert p["w"].tolist() == pytest.approx(p_hand, rel=1e-12)
        assert p["frozen"].tolist() == [1 / eps, 1 / eps]  # v_hat = 0 there
        # what Adam did is lr * P * m_hat: P is the preconditioner of its step
        m_hat = [mi / (1 - beta1**t) for mi in m]
        step = (before - w.detach()).tolist()
        assert step == pytest.approx([lr * pi * mi for pi, mi in zip(p_hand, m_hat, strict=True)], rel=1e-9)
    adamw = OptimizerSpec("adamw", betas=(beta1, beta2), eps=eps, weight_decay=0.5)
    w2 = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt2 = build(adamw, [w2], lr)
    for g in grads:
        w2.grad = torch.tensor(g, dtype=torch.float64)
        opt2.step()
    assert preconditioner(opt2, adamw, {"w": w2})["w"].tolist() == pytest.approx(p_hand, rel=1e-12)  # wd: not in v


def test_non_adaptive_optimizers_have_no_preconditioner():
    w = nn.Parameter(torch.ones(2))
    for spec in (OptimizerSpec(), OptimizerSpec("momentum"), OptimizerSpec("lars")):
        opt = build(spec, [w], 0.1)
        w.grad = torch.ones(2)
        opt.step()
        assert preconditioner(opt, spec, {"w": w}) is None
    assert preconditioner(None, OptimizerSpec("adam"), {"w": w}) is None
