"""The optimizers: settings and their checks, LARS against a hand-computed step, Adam's preconditioner
against a hand computation, and what heavy-ball momentum does to the batch-size comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.frontier import fit_frontier
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
    assert OptimizerSpec("adamw", betas=(0.8, 0.99)).describe() == "adamw (betas 0.8,0.99, eps 1e-08, weight_decay 0)"
    assert OptimizerSpec().describe() == "sgd (weight_decay 0)"


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


# --- heavy-ball momentum and the batch-size comparison, on a noisy quadratic -----------------------
# L(w) = 1/2 sum_k h_k w_k^2; a batch of B examples has gradient H w + noise of variance c_k / B per
# coordinate (per-example noise c_k, proportional to the curvature as for a well-specified model).
CURV = np.array([1.0, 0.3, 0.1, 0.03])  # h_k
NOISE = 20.0 * CURV  # c_k: B_simple = sum c / |H w|^2 is 20 at the start and grows as |H w| falls
START_SQ = 1 / CURV  # w_k(0)^2: every coordinate starts at loss 1/2
START_LOSS = 0.5 * float((CURV * START_SQ).sum())
SIZES = [2**k for k in range(2, 11)]  # batch sizes 4 ... 1024


def _second_moments(
    momentum: float, lrs: list[float], sizes: list[int], steps: int, curv: np.ndarray = CURV
) -> np.ndarray:
    """E[w_k^2] at steps 0..steps (steps + 1, configs, d) of heavy ball v <- m v + g, w <- w - lr v (m = 0: SGD)
    for every (batch size, lr), exactly: the second moments of (w, v) per coordinate follow a linear recursion.
    curv: h_k, with noise 20 h_k and w_k(0)^2 = 1 / h_k as CURV has."""
    lr = np.array([[x] for _ in sizes for x in lrs])  # (K, 1)
    q = np.array([[1.0 / b] for b in sizes for _ in lrs]) * 20.0 * curv  # (K, d): noise variance of a batch
    a, b = 1 - lr * curv, -lr * momentum  # w' = a w + b v - lr n;  v' = h w + m v + n
    ww, wv, vv = np.tile(1 / curv, (len(lr), 1)), np.zeros((len(lr), len(curv))), np.zeros((len(lr), len(curv)))
    out = [ww]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            ww, wv, vv = (
                a * a * ww + 2 * a * b * wv + b * b * vv + lr**2 * q,
                a * curv * ww + (a * momentum + b * curv) * wv + b * momentum * vv - lr * q,
                curv**2 * ww + 2 * curv * momentum * wv + momentum**2 * vv + q,
            )
            out.append(ww)
    return np.array(out)


def _losses(ww: np.ndarray, curv: np.ndarray = CURV) -> np.ndarray:
    return 0.5 * (curv * ww).sum(-1)  # E[L]


def _steps_to(losses: np.ndarray, target: float) -> np.ndarray:
    """First step at or below target per config (losses: (steps + 1, configs), from step 0); inf if never."""
    hit = losses <= target
    return np.where(hit.any(0), hit.argmax(0).astype(float), np.inf)


def _best_steps(losses: np.ndarray, lrs: list[float], target: float, sizes: list[int] = SIZES) -> np.ndarray:
    """Steps to target at each batch size's best lr: (batch sizes,)."""
    return _steps_to(losses, target).reshape(len(sizes), len(lrs)).min(1)


def _b_simple(ww: np.ndarray, target: float, curv: np.ndarray = CURV) -> float:
    """tr(Sigma) / |G|^2 of one run (ww: (steps + 1, d)), numerator and denominator averaged over the run from
    its start to the target, as predict's headline does; |G|^2 = sum_k h_k^2 E[w_k^2]."""
    end = int(_steps_to(_losses(ww, curv)[:, None], target)[0])
    return float(20.0 * curv.sum() / (curv**2 * ww[: end + 1]).sum(-1).mean())


def test_the_exact_moments_are_what_torch_s_momentum_does():
    """The recursion of the test below against torch.optim.SGD (with and without momentum) on 512 noisy
    replicas of the quadratic: the mean loss within 4 standard errors at steps 10, 50 and 150."""
    gen = torch.Generator().manual_seed(0)
    for spec, lr in ((OptimizerSpec("momentum", momentum=0.9), 0.01), (OptimizerSpec(), 0.1)):
        w = nn.Parameter(torch.tensor(np.sqrt(START_SQ)).repeat(512, 1))  # (replicas, d)
        opt = build(spec, [w], lr)
        exact = _losses(_second_moments(0.9 if spec.name == "momentum" else 0.0, [lr], [64], 150))[:, 0]
        curv, noise = torch.tensor(CURV), torch.tensor(np.sqrt(NOISE / 64))
        for t in range(1, 151):
            w.grad = curv * w.detach() + noise * torch.randn(w.shape, generator=gen, dtype=torch.float64)
            opt.step()
            if t in (10, 50, 150):
                losses = 0.5 * (curv * w.detach() ** 2).sum(1)  # (replicas,)
                se = float(losses.std()) / math.sqrt(len(losses))
                assert abs(float(losses.mean()) - exact[t]) < 4 * se, (spec.name, t)


def test_momentum_at_the_matched_lr_gives_sgd_s_frontier_and_b_simple():
    """Heavy ball m = 0.9 at lr = eta (1 - m) against SGD at eta, for effective lrs eta up to 0.2 / h_max: the
    steps to the target at each batch size's best lr, the fitted B_crit and B_simple along a batch-8 run agree
    within 10% (they differ by 0-8% here); momentum at the raw lr eta, not matched, is 5-10x faster at the
    smallest lr, so a rule off by a factor of two or more fails."""
    lrs, m, target, steps = [0.025, 0.05, 0.1, 0.2], 0.9, 0.1 * START_LOSS, 6000
    sgd = _second_moments(0.0, lrs, SIZES, steps)
    heavy = _second_moments(m, [x * (1 - m) for x in lrs], SIZES, steps)
    s_sgd, s_heavy = _best_steps(_losses(sgd), lrs, target), _best_steps(_losses(heavy), lrs, target)
    assert np.isfinite(s_sgd).all() and s_sgd[0] > 3 * s_sgd[-1]  # every batch size reaches it; a real frontier
    assert s_heavy == pytest.approx(s_sgd, rel=0.10)
    b_crit_sgd = fit_frontier(SIZES, s_sgd).b_crit
    assert 4 < b_crit_sgd < 256  # inside the grid
    assert fit_frontier(SIZES, s_heavy).b_crit == pytest.approx(b_crit_sgd, rel=0.10)
    at_8 = SIZES.index(8) * len(lrs) + lrs.index(0.05)  # a batch-8 reference run at the effective lr 0.05
    assert _b_simple(heavy[:, at_8], target) == pytest.approx(_b_simple(sgd[:, at_8], target), rel=0.10)
    slow = [0.025]  # at the smallest lr, where the matched rule holds best, the unmatched one is far off:
    raw = _steps_to(_losses(_second_moments(m, slow, SIZES, steps)), target)  # momentum at lr eta itself
    unmatched = _steps_to(_losses(sgd[:, :: len(lrs)]), target) / raw  # (batch sizes,) SGD's steps / its steps
    assert (unmatched[SIZES.index(32) :] > 5).all(), unmatched


def test_tuned_momentum_raises_b_crit_where_curvature_limits_large_batches():
    """Past small lr, with the lr tuned per batch size: on an ill-conditioned quadratic (curvatures 1 ... 0.001)
    heavy ball reaches the target in about 3x fewer steps at the largest batches and as many at the smallest,
    so its B_crit is about 3x SGD's, while B_simple along a batch-8 run is the same (within 15%). On CURV (curvatures
    1 ... 0.03) the two frontiers stay within 15%. B_simple, a statistic of the gradients alone, cannot tell
    these apart: where it falls short of a momentum sweep's B_crit, this is why."""
    lrs, m, sizes = [0.025 * 2**k for k in range(10)], 0.9, [2**k for k in range(2, 13)]  # effective lrs to 12.8
    ratios = {}
    for name, curv in (("ill", np.array([1.0, 0.1, 0.01, 0.001])), ("mild", CURV)):
        target = 0.3 * 0.5 * len(curv)  # 30% of the start
        sgd = _second_moments(0.0, lrs, sizes, 1500, curv)
        heavy = _second_moments(m, [x * (1 - m) for x in lrs], sizes, 1500, curv)
        s_sgd = _best_steps(_losses(sgd, curv), lrs, target, sizes)
        s_heavy = _best_steps(_losses(heavy, curv), lrs, target, sizes)
        assert np.isfinite(s_sgd).all() and np.isfinite(s_heavy).all()
        assert s_heavy[0] == pytest.approx(s_sgd[0], rel=0.1)  # the noise-limited end: the same
        ratios[name] = (
            fit_frontier(sizes, s_heavy).b_crit / fit_frontier(sizes, s_sgd).b_crit,
            s_sgd[-1] / s_heavy[-1],
        )
        at_8 = sizes.index(8) * len(lrs) + lrs.index(0.05)
        assert _b_simple(heavy[:, at_8], target, curv) == pytest.approx(_b_simple(sgd[:, at_8], target, curv), rel=0.15)
    assert ratios["ill"][0] > 2.5 and ratios["ill"][1] > 2.5, ratios
    assert ratios["mild"][0] == pytest.approx(1.0, abs=0.15), ratios


@pytest.mark.parametrize("command", ["predict", "empirical", "run"])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum does not apply to optimizer 'adam'"),
        (["--optimizer", "nadam"], "unknown --optimizer 'nadam'"),
        (["--optimizer", "adamw", "--betas", "0.9;0.99"], "--betas '0.9;0.99': give two numbers"),
    ],
)
def test_every_command_refuses_bad_optimizer_options_in_one_line(tmp_path, command, args, message):
    from gns_sweep_cli.main import app
    from typer.testing import CliRunner

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [command, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
