"""GnsMonitor: its estimates against gns_sweep.stats and predict, its .grad against a plain backward,
the micro-batch estimator's bias against a closed form, the EMA, and the errors for misuse."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep import GnsMonitor, stats
from gns_sweep.errors import UsageError
from gns_sweep.monitor import accumulation_estimate, two_batch_estimate
from gns_sweep.per_example import batch_moments, param_layout
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.tasks.builtin import LINREG, half_squared_error


def half_sq(out, y):
    return 0.5 * (out.squeeze(-1) - y) ** 2  # (N,)


def norm_model(seed: int = 0) -> nn.Module:
    """An MLP with a LayerNorm (a norm-layers scope) on a regression whose targets sit far from the
    initial outputs, so the gradient is resolved at a few dozen examples."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))


def regression_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, 2.0 + x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def test_per_example_reading_is_the_statistics_of_the_batch_per_scope():
    """Unsmoothed |G|^2, tr(Sigma) and B_simple of one forward_backward equal gns_sweep.stats on the loop
    engine's per-example gradients of the same examples, for every scope."""
    model = norm_model()
    x, y = regression_batch(48)
    monitor = GnsMonitor(model, loss=half_sq)
    monitor.forward_backward(x, y)
    layout = param_layout(model)
    ref = batch_moments(LoopEngine(), model, x, y, half_sq, layout, param_moments=False).moments
    readings = monitor.read_all(smoothed=False)
    assert list(readings) == list(layout.scopes) and "norm-layers" in readings
    for scope, groups in layout.scopes.items():
        want, got = stats.estimate_scope(ref, groups), readings[scope]
        assert got.grad_sq_norm == pytest.approx(want.grad_sq_norm, rel=1e-5, abs=1e-6 * want.trace_sigma), scope
        assert got.trace_sigma == pytest.approx(want.trace_sigma, rel=1e-5), scope
        if scope == "total":
            assert want.resolved and got.b_simple == pytest.approx(want.b_simple, rel=1e-4)
    assert readings["total"].updates == 1 and not readings["total"].smoothed


def test_grad_after_forward_backward_is_a_plain_backward():
    """.grad holds the batch's mean gradient, accumulated like backward's, and the returned loss is the mean."""
    model = norm_model()
    (x, y), (x2, y2) = regression_batch(32), regression_batch(20, seed=2)
    loss = half_sq(model(x), y).mean()
    loss.backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    got = GnsMonitor(model, loss=half_sq).forward_backward(x, y)
    assert not got.requires_grad and float(got) == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(grads(model), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # accumulation over two batches, each weighted, as (loss * w).backward() twice
    model.zero_grad(set_to_none=True)
    (half_sq(model(x), y).mean() * 0.25).backward()
    (half_sq(model(x2), y2).mean() * 0.75).backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    monitor = GnsMonitor(model, loss=half_sq)
    monitor.forward_backward(x, y, weight=0.25)
    monitor.forward_backward(x2, y2, weight=0.75)
    for a, b in zip(grads(model), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert monitor.updates == 2


def test_every_measures_one_call_in_m_and_leaves_the_same_grad():
    """every=3: calls 1 and 4 measure (the reading is the batch's statistics), calls 2, 3 and 5 are plain
    backwards; .grad is the batch's mean gradient after each."""
    model = norm_model()
    monitor = GnsMonitor(model, loss=half_sq, every=3, beta=0.0)
    layout = param_layout(model)
    for call in range(1, 6):
        x, y = regression_batch(24, seed=call)
        model.zero_grad(set_to_none=True)
        half_sq(model(x), y).mean().backward()
        plain = grads(model)
        model.zero_grad(set_to_none=True)
        loss = monitor.forward_backward(x, y)
        assert loss.item() == pytest.approx(half_sq(model(x), y).mean().item(), rel=1e-6)
        for a, b in zip(grads(model), plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert monitor.updates == (1 if call < 4 else 2)
        if call in (1, 4):
            ref = batch_moments(LoopEngine(), model, x, y, half_sq, layout, param_moments=False).moments
            want = stats.estimate_scope(ref, layout.scopes["total"])
            assert monitor.read(smoothed=False).trace_sigma == pytest.approx(want.trace_sigma, rel=1e-5)
    with pytest.raises(UsageError, match="every must be a positive integer"):
        GnsMonitor(model, loss=half_sq, every=0)


def test_a_step_with_the_monitor_matches_a_plain_step():
    """Training for a few SGD steps through forward_backward follows the plain loop's weights."""
    plain_model, monitored = norm_model(), norm_model()
    monitor = GnsMonitor(monitored, loss=half_sq)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain_model, monitored)]
    for step in range(5):
        x, y = regression_batch(16, seed=10 + step)
        for opt in opts:
            opt.zero_grad()
        half_sq(plain_model(x), y).mean().backward()
        monitor.forward_backward(x, y)
        for opt in opts:
            opt.step()
    for a, b in zip(plain_model.parameters(), monitored.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def micro_step(monitor, model, x, y, sizes, *, scale=None):
    """One step of gradient accumulation over micro-batches of the given sizes; returns their mean-loss
    gradients m_j (flattened) as the slow reference."""
    model.zero_grad(set_to_none=True)
    ms, start, n = [], 0, sum(sizes)
    for b in sizes:
        xb, yb = x[start : start + b], y[start : start + b]
        start += b
        loss = half_sq(model(xb), yb).mean()
        parts = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        ms.append(torch.cat([g.reshape(-1) for g in parts]).double())
        c = b / n if scale is None else scale
        (loss * c).backward()
        monitor.micro_batch(b, scale=scale)
    monitor.update()
    return ms


def test_micro_batch_reading_is_the_two_batch_estimate():
    """k equal micro-batches: |G|^2 and tr(Sigma) are McCandlish's two-batch estimate with B_small = b
    (|G_small|^2 the mean of the micro-batches' squared norms) and B_big = k b, per scope; the loop's scaling
    of the loss does not matter once it is given; .grad is left as the loop made it."""
    model = norm_model()
    x, y = regression_batch(32)
    monitor = GnsMonitor(model, beta=0.0)
    ms = micro_step(monitor, model, x, y, [8, 8, 8, 8])
    loop_grad = grads(model)
    half_sq(model(x), y).mean().backward()  # on top of the step's: twice the whole batch's mean gradient
    for a, b in zip(grads(model), loop_grad, strict=True):
        torch.testing.assert_close(a, 2 * b, rtol=1e-5, atol=1e-7)
    layout = param_layout(model)
    for scope, groups in layout.scopes.items():
        idx = np.concatenate([np.arange(layout.offsets[g], layout.offsets[g + 1]) for g in groups])
        small = float(np.mean([float(m[idx].square().sum()) for m in ms]))
        big = float(torch.stack(ms).mean(0)[idx].square().sum())
        g2, trace = two_batch_estimate(torch.tensor(small), torch.tensor(big), b_small=8, b_big=32)
        got = monitor.read(scope, smoothed=False)
        assert got.grad_sq_norm == pytest.approx(float(g2), rel=1e-5, abs=1e-7), scope
        assert got.trace_sigma == pytest.approx(float(trace), rel=1e-5), scope
    unscaled = GnsMonitor(model, beta=0.0)  # sum of the micro-batches' mean losses, said so with scale=1
    micro_step(unscaled, model, x, y, [8, 8, 8, 8], scale=1.0)
    for scope in layout.scopes:
        a, b = unscaled.read(scope), monitor.read(scope)
        assert a.grad_sq_norm == pytest.approx(b.grad_sq_norm, rel=1e-5, abs=1e-7)
        assert a.trace_sigma == pytest.approx(b.trace_sigma, rel=1e-5)


def test_accumulation_estimate_solves_its_two_equations():
    """For any scales and sizes, the expectations E||S||^2 and E sum||d_j||^2 written with the true |G|^2
    and tr(Sigma) give them back."""
    g2, trace = torch.tensor([2.0, 0.5]), torch.tensor([30.0, 7.0])
    sizes, scales = [3, 5, 8], [0.2, 1.0, 0.5]
    c, b = torch.tensor(scales, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)
    t = float((c**2 / b).sum())
    part = torch.stack([cj**2 * (g2 + trace / bj) for cj, bj in zip(c, b, strict=True)])  # (k, G) expectations
    total = float(c.sum()) ** 2 * g2 + t * trace
    got_g2, got_trace = accumulation_estimate(part.double(), total.double(), sizes, scales)
    torch.testing.assert_close(got_g2, g2.double())
    torch.testing.assert_close(got_trace, trace.double())


def linreg_population(model: nn.Module) -> tuple[float, float]:
    """|G|^2 = e'L^2 e and tr(Sigma) = (e'Le + s^2) tr L + e'L^2 e of LINREG at the model's weights."""
    lam = LINREG.eigs()
    e = model.weight.detach().double().reshape(-1) - LINREG.w_star()
    el2e = float((lam * lam * e * e).sum())
    return el2e, (float((lam * e * e).sum()) + LINREG.noise_std**2) * float(lam.sum()) + el2e


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [5, 8, 11, 8], [16, 48]])
def test_micro_batch_estimator_is_unbiased_on_linear_regression(sizes):
    """Averaged over many steps on fresh draws, the unsmoothed estimates (equal or unequal micro-batches)
    come within 4 standard errors of the closed-form population values, as do the per-example ones."""
    torch.manual_seed(0)
    model = LINREG.model()
    want_g2, want_trace = linreg_population(model)
    micro, per_example = GnsMonitor(model), GnsMonitor(model, loss=half_squared_error)
    gen = torch.Generator().manual_seed(5)
    rows = {"micro": [], "per-example": []}
    for _ in range(300):
        x, y = LINREG.sample(sum(sizes), gen)
        micro_step(micro, model, x, y, sizes)
        per_example.forward_backward(x, y)
        for name, m in (("micro", micro), ("per-example", per_example)):
            r = m.read(smoothed=False)
            rows[name].append((r.grad_sq_norm, r.trace_sigma))
    for name, values in rows.items():
        values = np.array(values)  # (steps, 2)
        mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values))
        assert abs(mean[0] - want_g2) < 4 * se[0], (name, mean[0], want_g2, se[0])
        assert abs(mean[1] - want_trace) < 4 * se[1], (name, mean[1], want_trace, se[1])
        assert se[0] < 0.2 * want_g2 and se[1] < 0.05 * want_trace  # the tolerance is a real one


def test_ema_is_bias_corrected_and_smooths_numerator_and_denominator_apart():
    """After t updates the reading of each of |G|^2 and tr(Sigma) is sum_s beta^(t-s) x_s / sum_s beta^(t-s),
    B_simple their ratio; beta = 0 reads the last update; read(smoothed=False) is always the last."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))  # layers "0", "1": one tensor each
    g2s = [torch.tensor([1.0, 0.5]), torch.tensor([-0.4, 0.1]), torch.tensor([2.0, 1.0])]
    traces = [torch.tensor([10.0, 2.0]), torch.tensor([30.0, 1.0]), torch.tensor([5.0, 5.0])]
    for beta in (0.0, 0.5, 0.9):
        monitor = GnsMonitor(model, beta=beta)
        assert math.isnan(monitor.b_simple()) and monitor.read().updates == 0
        for t, (g2, trace) in enumerate(zip(g2s, traces, strict=True), start=1):
            monitor.observe(g2, trace)
            w = np.array([beta ** (t - s) for s in range(1, t + 1)])
            want_g2 = sum(wi * float(g.sum()) for wi, g in zip(w, g2s, strict=False)) / w.sum()
            want_tr = sum(wi * float(tr.sum()) for wi, tr in zip(w, traces, strict=False)) / w.sum()
            got = monitor.read()
            assert got.grad_sq_norm == pytest.approx(want_g2) and got.trace_sigma == pytest.approx(want_tr)
            want_b = want_tr / want_g2 if want_g2 > 0 else math.nan  # beta = 0, t = 2: |G|^2 < 0, unresolved
            assert got.b_simple == pytest.approx(want_b, nan_ok=True) and got.updates == t
            last = monitor.read(smoothed=False)
            assert last.grad_sq_norm == pytest.approx(float(g2.sum())) and last.trace_sigma == float(trace.sum())
            assert monitor.read("0").grad_sq_norm == pytest.approx(
                sum(wi * float(g[0]) for wi, g in zip(w, g2s, strict=False)) / w.sum()
            )
    monitor = GnsMonitor(model, beta=0.5)
    monitor.observe(torch.tensor([-1.0, 0.2]), torch.tensor([1.0, 1.0]))  # |G|^2 <= 0: unresolved
    assert math.isnan(monitor.b_simple())
    monitor.reset()
    assert monitor.updates == 0 and math.isnan(monitor.read().grad_sq_norm)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_misuse_is_refused_in_one_line_that_names_the_fix():
    model = norm_model()
    x, y = regression_batch(8)
    with pytest.raises(UsageError) as e:
        GnsMonitor(model).forward_backward(x, y)
    assert "GnsMonitor(model, loss=fn)" in one_line(e)
    with pytest.raises(UsageError) as e:
        GnsMonitor(model, loss=half_sq).micro_batch(4)
    assert "without loss=" in one_line(e)
    with pytest.raises(UsageError) as e:
        GnsMonitor(model, loss=half_sq).forward_backward(x[:1], y[:1])
    assert "at least 2" in one_line(e)
    monitor = GnsMonitor(model)
    with pytest.raises(UsageError) as e:
        monitor.update()
    assert "found 0 micro-batch" in one_line(e)
    model.zero_grad(set_to_none=True)
    with pytest.raises(UsageError) as e:
        monitor.micro_batch(4)
    assert "after the micro-batch's loss.backward()" in one_line(e)
    half_sq(model(x), y).mean().backward()
    monitor.micro_batch(8)
    with pytest.raises(UsageError) as e:
        monitor.update()
    assert "k >= 2" in one_line(e)
    with pytest.raises(UsageError) as e:
        monitor.micro_batch(8, scale=0.5)
    assert "every micro_batch() of a step, or to none" in one_line(e)
    model.zero_grad(set_to_none=True)
    with pytest.raises(UsageError) as e:
        monitor.micro_batch(8)
    assert "cleared between micro_batch() calls" in one_line(e)
    with pytest.raises(UsageError) as e:
        monitor.micro_batch(0)
    assert "positive int" in one_line(e)
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    with pytest.raises(UsageError) as e:
        GnsMonitor(bn, loss=half_sq).forward_backward(x, y)
    assert "'1' (BatchNorm1d)" in one_line(e) and "micro_batch()/update()" in one_line(e)
    with pytest.raises(UsageError) as e:
        GnsMonitor(model, beta=1.0)
    assert "beta" in one_line(e)
    with pytest.raises(UsageError) as e:
        GnsMonitor(model).read("nope")
    assert "'nope'" in one_line(e) and "total" in one_line(e)
    with pytest.raises(UsageError) as e:
        GnsMonitor(model).observe(torch.zeros(3), torch.zeros(3))
    assert "layout.names" in one_line(e)
    with pytest.raises(UsageError) as e:
        two_batch_estimate(torch.tensor(1.0), torch.tensor(1.0), b_small=8, b_big=8)
    assert "b_small < b_big" in one_line(e)


def test_the_monitor_reads_what_predict_measures(cluster, monkeypatch):
    """predict at one checkpoint (the built model) with a fixed probe, against the monitor's reading of the
    same examples: per scope, the same |G|^2, tr(Sigma) and B_simple."""
    from gns_sweep.predict import PredictConfig, prepare_predict, probe_indices, run_predict
    from gns_sweep.tasks import load_task
    from gns_sweep.train import init_model

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = PredictConfig(task="example_tasks:layernorm_blobs", probe_size=200, checkpoints=1, blocks=4)
    result = run_predict(prepare_predict(cfg), cluster)
    task = load_task(cfg.task)
    model = init_model(task, cfg.seed)
    idx = probe_indices(task.n_train, cfg.probe_size, cfg.seed, 0)
    monitor = GnsMonitor(model, loss=task.loss)
    monitor.forward_backward(task.train_inputs[idx], task.train_targets[idx])
    readings = monitor.read_all(smoothed=False)
    rows = {r.scope: r for r in result.rows}
    assert set(rows) == set(readings) and "norm-layers" in rows and rows["total"].resolved
    for scope, row in rows.items():
        got = readings[scope]
        assert got.grad_sq_norm == pytest.approx(row.grad_sq_norm, rel=1e-5, abs=1e-7 * row.trace_sigma), scope
        assert got.trace_sigma == pytest.approx(row.trace_sigma, rel=1e-6), scope
        assert got.b_simple == pytest.approx(row.b_simple, rel=1e-4, nan_ok=True), scope


def test_import_gns_sweep_stays_light():
    """GnsMonitor is exported lazily: importing the package does not import torch."""
    import subprocess
    import sys

    code = (
        "import sys, gns_sweep; assert 'torch' not in sys.modules; gns_sweep.GnsMonitor; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cross_entropy_model_and_unused_parameters():
    """A classifier with a parameter no example reaches: its .grad stays None (as after a plain backward)
    and its layer reads zero, in both estimators."""

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.spare = nn.Linear(3, 4)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = WithSpare()
    x, y = torch.randn(12, 3), torch.randint(0, 4, (12,))
    ce = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    GnsMonitor(model, loss=ce).forward_backward(x, y)
    assert model.spare.weight.grad is None and model.body.weight.grad is not None
    monitor = GnsMonitor(model)
    model.zero_grad(set_to_none=True)
    for xb, yb in zip(x.chunk(3), y.chunk(3), strict=True):
        (ce(model(xb), yb).mean() / 3).backward()
        monitor.micro_batch(4)
    monitor.update()
    spare = monitor.read("spare", smoothed=False)
    assert spare.grad_sq_norm == 0 and spare.trace_sigma == 0 and math.isnan(spare.b_simple)
    assert monitor.read("body", smoothed=False).trace_sigma > 0
