"""The noise scale in an optimizer's preconditioned geometry, tr(P Sigma) / G'PG, against the plain
estimators fed explicit per-example gradients multiplied by sqrt(P)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from gns_sweep import stats as st
from gns_sweep.optim import OptimizerSpec
from gns_sweep.per_example import param_layout
from gns_sweep.predict import (
    Checkpoint,
    PredictConfig,
    edges,
    measure,
    micro_batches,
    prepare_predict,
    probe_indices,
    probe_shard,
    run_predict,
)
from gns_sweep.predict.reference import reference_run
from gns_sweep.predict.worker import flat_preconditioner, scope_rows
from gns_sweep.progress import no_progress
from gns_sweep.runtime import WorkerInfo
from gns_sweep.tasks import load_task
from gns_sweep.train import init_model

OFFSETS = np.array([0, 3, 4, 9])  # three groups of sizes 3, 1, 5


def direct(grads: np.ndarray, b: int = 1):
    """tr(Sigma), |G|^2 and B_simple the obvious way from explicit samples (N, P), each a mean of b examples."""
    n = grads.shape[0]
    mean = grads.mean(0)
    trace_b = ((grads - mean) ** 2).sum() / (n - 1)
    g2 = (mean**2).sum() - trace_b / n
    return b * trace_b, g2, b * trace_b / g2


@pytest.fixture
def grads():
    rng = np.random.default_rng(1)
    return rng.normal(size=(40, 9)) * rng.uniform(0.1, 3, size=9) + rng.normal(size=9) * 2


@pytest.fixture
def precond():
    return np.random.default_rng(2).uniform(0.05, 20.0, size=9)  # spans decades, as Adam's does


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("groups", [[0, 1, 2], [2], [0, 1]])
def test_preconditioned_moments_give_the_plain_estimate_of_scaled_gradients(grads, precond, b, groups):
    m = st.precondition(st.from_samples(grads, OFFSETS, param_moments=True), precond)
    est = st.estimate_scope(m, groups, micro_batch=b)
    cols = np.concatenate([np.arange(OFFSETS[g], OFFSETS[g + 1]) for g in groups])
    trace, g2, bs = direct((grads * np.sqrt(precond))[:, cols], b)
    assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-12)
    assert est.b_simple == pytest.approx(bs, rel=1e-12)
    # the same from the formulas on the unscaled moments: tr(P Sigma) = sum_k P_k M2_k / (n - 1), and so on
    plain = st.from_samples(grads[:, cols], np.array([0, cols.size]), param_moments=True)
    tr_p = b * float((precond[cols] * plain.m2_param).sum()) / (plain.n - 1)
    g2_p = float((precond[cols] * plain.mean**2).sum()) - tr_p / b / plain.n
    assert (est.trace_sigma, est.grad_sq_norm) == pytest.approx((tr_p, g2_p), rel=1e-12)


def test_a_constant_preconditioner_leaves_b_simple_alone(grads):
    m = st.from_samples(grads, OFFSETS, param_moments=True)
    for groups in ([0, 1, 2], [1]):
        plain = st.estimate_scope(m, groups)
        assert st.estimate_scope(st.precondition(m, np.ones(9)), groups) == plain  # P = 1: the same numbers
        scaled = st.estimate_scope(st.precondition(m, np.full(9, 7.5)), groups)
        assert scaled.b_simple == pytest.approx(plain.b_simple, rel=1e-12)
        assert scaled.trace_sigma == pytest.approx(7.5 * plain.trace_sigma, rel=1e-12)
        assert scaled.grad_sq_norm == pytest.approx(7.5 * plain.grad_sq_norm, rel=1e-12)


def test_a_preconditioner_that_damps_the_noisy_coordinates_lowers_the_noise_scale():
    """Coordinate 0 carries the signal, coordinate 1 the noise: damping coordinate 1 by P lowers B by about P."""
    rng = np.random.default_rng(0)
    grads = np.column_stack([1.0 + 0.1 * rng.normal(size=400), 5.0 * rng.normal(size=400)])
    m = st.from_samples(grads, np.array([0, 2]), param_moments=True)
    plain = st.estimate_scope(m, [0]).b_simple
    damped = st.estimate_scope(st.precondition(m, np.array([1.0, 0.01])), [0]).b_simple
    assert 0.005 * plain < damped < 0.02 * plain


def test_preconditioning_commutes_with_merge_and_subtract(grads, precond):
    a, b = (st.from_samples(p, OFFSETS, param_moments=True) for p in (grads[:13], grads[13:]))
    merged = st.precondition(st.merge(a, b), precond)
    of_parts = st.merge(st.precondition(a, precond), st.precondition(b, precond))
    for x, y in ((merged.mean, of_parts.mean), (merged.m2_group, of_parts.m2_group)):
        np.testing.assert_allclose(x, y, rtol=1e-12)
    rest = st.subtract(merged, st.precondition(a, precond))
    np.testing.assert_allclose(rest.m2_param, st.precondition(b, precond).m2_param, rtol=1e-10)


@pytest.mark.parametrize("b", [1, 2])
def test_preconditioned_jackknife_matches_slow_loop(grads, precond, b):
    blocks = [st.precondition(st.from_samples(p, OFFSETS, param_moments=True), precond) for p in np.split(grads, 8)]
    total = st.precondition(st.merge_all([st.from_samples(p, OFFSETS, param_moments=True) for p in np.split(grads, 8)]),
                            precond)  # fmt: skip
    ci = st.jackknife_interval(total, blocks, [0, 1, 2], micro_batch=b)
    scaled = np.split(grads * np.sqrt(precond), 8)
    bs = direct(np.concatenate(scaled), b)[2]
    logs = np.log([direct(np.concatenate([p for j, p in enumerate(scaled) if j != k]), b)[2] for k in range(8)])
    se = math.sqrt(7 / 8 * ((logs - logs.mean()) ** 2).sum())
    assert ci.lo == pytest.approx(bs * math.exp(-st.Z95 * se), rel=1e-9)
    assert ci.hi == pytest.approx(bs * math.exp(st.Z95 * se), rel=1e-9)


def test_bad_preconditioners_are_refused(grads):
    m = st.from_samples(grads, OFFSETS, param_moments=True)
    with pytest.raises(ValueError, match="per-parameter second moments"):
        st.precondition(st.from_samples(grads, OFFSETS, param_moments=False), np.ones(9))
    with pytest.raises(ValueError, match="shape"):
        st.precondition(m, np.ones(8))
    with pytest.raises(ValueError, match="finite and positive"):
        st.precondition(m, np.r_[np.ones(8), 0.0])


def adam_preconditioner(model, task, steps: int = 5) -> dict[str, torch.Tensor]:
    """Adam's P = 1/(sqrt(v_hat) + eps) after a few steps, from torch's own optimizer state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    for s in range(steps):
        idx = torch.arange(s * 16, (s + 1) * 16)
        opt.zero_grad()
        task.loss(model(task.train_inputs[idx]), task.train_targets[idx]).mean().backward()
        opt.step()
    out = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.99 ** int(state["step"]))
        out[name] = 1.0 / (v_hat.sqrt() + 1e-8)
    return out


def per_example_loop(model, task, idx) -> np.ndarray:
    """(N, P) gradients of each example's own loss, one backward pass per example, in float64."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    rows = []
    for i in idx.tolist():
        model.zero_grad()
        task.loss(model(task.train_inputs[i : i + 1]), task.train_targets[i : i + 1]).sum().backward()
        rows.append(torch.cat([params[n].grad.reshape(-1).double() for n in names]))
    return torch.stack(rows).numpy()


def test_predict_rows_match_explicit_per_example_gradients_times_sqrt_p():
    """The engine's moments, preconditioned in scope_rows, against a per-example loop scaled by sqrt(P)."""
    task = load_task("blobs-noisy")
    model = init_model(task, 0)
    precond = adam_preconditioner(model, task)
    layout = param_layout(model)
    p = flat_preconditioner(precond, layout)
    n, n_blocks = 96, 4
    probe = torch.arange(200, 200 + n)
    pieces = probe_shard(
        model=model,
        data=(task.train_inputs, task.train_targets, task.loss),
        probe=probe,
        units=micro_batches(n, edges(n, n_blocks), 32, 1),
        engine="fast",
        micro_batch=1,
        param_moments=True,
        worker=WorkerInfo("cpu", "driver", 1),
    )
    total, blocks, loss_sum = measure(pieces, n_blocks)
    where = Checkpoint(task.name, 0, 5, 80, 1.0, "fast", 1, "per-example", 1)
    rows = {r.scope: r for r in scope_rows(where, total, blocks, loss_sum, layout, {}, optimizer="adam",
                                           preconditioner=p)}  # fmt: skip
    plain = {r.scope: r for r in scope_rows(where, total, blocks, loss_sum, layout, {})}
    g = per_example_loop(model, task, probe) * np.sqrt(p)  # (N, P) in P^(1/2) coordinates
    for scope, groups in layout.scopes.items():
        cols = np.concatenate([np.arange(layout.offsets[k], layout.offsets[k + 1]) for k in groups])
        trace, g2, bs = direct(g[:, cols])
        r = rows[scope]
        assert r.optimizer == "adam"
        assert r.trace_sigma_precond == pytest.approx(trace, rel=1e-5), scope
        assert r.grad_sq_norm_precond == pytest.approx(g2, rel=1e-4, abs=1e-6 * trace), scope
        if g2 > 0:
            assert r.b_simple_precond == pytest.approx(bs, rel=1e-4), scope
            assert r.b_simple_precond_lo < r.b_simple_precond < r.b_simple_precond_hi
        # the plain columns do not depend on P, and a non-adaptive optimizer has no preconditioned ones
        assert (r.trace_sigma, r.b_simple) == (plain[scope].trace_sigma, plain[scope].b_simple)
        assert plain[scope].optimizer == "sgd" and math.isnan(plain[scope].b_simple_precond)
    assert rows["total"].b_simple_precond != pytest.approx(rows["total"].b_simple, rel=0.01)  # P is not ~ constant


def test_predict_with_adam_fills_the_preconditioned_columns_from_the_checkpoints_p(cluster):
    """A checkpoint of an Adam reference run has tr(P Sigma) and G'PG from its own P: against the per-example
    loop on the replayed weights, scaled by sqrt(P) read off the replay's optimizer. An SGD run has none."""
    cfg = PredictConfig(
        task="blobs-noisy", probe_size=96, checkpoints=1, warmup_steps=4, blocks=4, optimizer=OptimizerSpec("adam")
    )
    result = run_predict(prepare_predict(cfg), cluster)
    (total,) = [r for r in result.rows if r.scope == "total"]
    assert {r.optimizer for r in result.rows} == {"adam"} and total.step == 4
    task = load_task(cfg.task)
    _, snapshots = reference_run(
        task, seed=0, warmup_steps=4, checkpoints=1, progress=no_progress, optimizer=OptimizerSpec("adam")
    )
    model = init_model(task, 0)
    model.load_state_dict(snapshots[4].state)
    layout = param_layout(model)
    p = flat_preconditioner(snapshots[4].preconditioner, layout).astype(np.float64)
    g = per_example_loop(model, task, probe_indices(task.n_train, 96, 0, 0)) * np.sqrt(p)
    for scope, groups in layout.scopes.items():
        cols = np.concatenate([np.arange(layout.offsets[k], layout.offsets[k + 1]) for k in groups])
        trace, g2, _ = direct(g[:, cols])
        row = next(r for r in result.rows if r.scope == scope)
        assert row.trace_sigma_precond == pytest.approx(trace, rel=1e-4), scope
        assert row.grad_sq_norm_precond == pytest.approx(g2, rel=1e-3, abs=1e-5 * trace), scope
    h = result.precond_headline
    assert h is not None and h.checkpoints == 1
    assert h.b_simple == pytest.approx(total.trace_sigma_precond / total.grad_sq_norm_precond)
    sgd = run_predict(prepare_predict(replace(cfg, optimizer=None)), cluster)
    assert {r.optimizer for r in sgd.rows} == {"sgd"} and sgd.precond_headline is None
    assert all(math.isnan(r.b_simple_precond) and math.isnan(r.trace_sigma_precond) for r in sgd.rows)
