"""predict on a real Ray cluster: closed forms, shard invariance, the noisy/clean contrast."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gns_sweep.per_example import get_engine, param_layout
from gns_sweep.predict import (
    Checkpoint,
    PredictConfig,
    assign,
    edges,
    measure,
    micro_batches,
    prepare_predict,
    probe_indices,
    probe_shard,
    run_predict,
    scope_rows,
)
from gns_sweep.runtime import WorkerInfo
from gns_sweep.tasks import load_task
from gns_sweep.tasks.builtin import LINREG, LINREG_ILL
from gns_sweep.train import TrainConfig, init_model, train


def predict(config, cluster):
    return run_predict(prepare_predict(config), cluster)


def total_rows(result):
    return [r for r in result.rows if r.scope == "total"]


@pytest.mark.parametrize(("name", "spec"), [("linreg", LINREG), ("linreg-ill", LINREG_ILL)])
def test_linreg_matches_closed_form(cluster, name, spec):
    """At the initial weights, B_simple = ((e'Le + s^2) tr L + e'L^2 e) / e'L^2 e."""
    task = load_task(name)
    cfg = PredictConfig(task=name, probe_size=task.n_train, shards=2, warmup_steps=0, checkpoints=1)
    result = predict(cfg, cluster)
    w = init_model(task, cfg.seed).weight.detach().double().reshape(-1)
    (row,) = total_rows(result)
    assert row.step == 0
    # The population value, within the sampling error of 16k examples (~2% here).
    assert row.b_simple == pytest.approx(spec.b_simple(w), rel=0.06)
    # The same sample, the slow way: explicit per-example gradients x_i (x_i.w - y_i).
    x, y = task.train_inputs.double(), task.train_targets.double()
    g = x * (x @ w - y)[:, None]  # (N, d)
    n = len(g)
    trace = float(((g - g.mean(0)) ** 2).sum()) / (n - 1)
    g2 = float((g.mean(0) ** 2).sum()) - trace / n
    assert row.trace_sigma == pytest.approx(trace, rel=1e-5)
    assert row.b_simple == pytest.approx(trace / g2, rel=1e-4)
    assert row.b_simple_lo < row.b_simple < row.b_simple_hi


def test_shard_count_does_not_change_the_result(cluster):
    base = dict(task="blobs-noisy", probe_size=600, warmup_steps=3, checkpoints=2, blocks=5)
    results = [predict(PredictConfig(shards=k, **base), cluster) for k in (1, 3, 7)]
    ref = results[0].rows
    for other in results[1:]:
        for a, b in zip(ref, other.rows, strict=True):
            assert (a.checkpoint, a.scope) == (b.checkpoint, b.scope)
            for field in ("grad_sq_norm", "trace_sigma", "b_simple", "b_simple_lo", "b_simple_hi", "snr_mean"):
                assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-9, nan_ok=True), field


def test_ray_result_equals_in_process_computation(cluster):
    cfg = PredictConfig(task="blobs-clean", probe_size=500, shards=4, blocks=4, warmup_steps=0, checkpoints=1)
    result = predict(cfg, cluster)
    task = load_task(cfg.task)
    model = init_model(task, cfg.seed)
    pieces = probe_shard(
        model=model,
        data=(task.train_inputs, task.train_targets, task.loss),
        probe=probe_indices(task.n_train, cfg.probe_size, cfg.seed, 0),
        units=micro_batches(cfg.probe_size, edges(cfg.probe_size, cfg.blocks), cfg.max_batch, 1),
        micro_batch=1,
        engine=cfg.engine,
        param_moments=True,
        worker=WorkerInfo("cpu", "driver", 1),
    )
    total, blocks, loss_sum = measure(pieces, cfg.blocks)
    where = Checkpoint(task.name, 0, 0, 0, 0.0, cfg.engine, 1, "per-example", 1)
    rows = scope_rows(where, total, blocks, loss_sum, param_layout(model), {})
    for a, b in zip(result.rows, rows, strict=True):
        assert a.scope == b.scope
        assert a.b_simple == pytest.approx(b.b_simple, rel=1e-9)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-9)


def test_noisy_labels_give_a_far_larger_noise_scale(cluster):
    def headline(name):
        return predict(PredictConfig(task=name, probe_size=2048, shards=2, checkpoints=4), cluster).headline

    noisy, clean = headline("blobs-noisy"), headline("blobs-clean")
    assert noisy.b_simple > 3 * clean.b_simple


def test_layers_scopes_and_checkpoints(cluster):
    cfg = PredictConfig(task="blobs-noisy", probe_size=256, shards=2, warmup_steps=5, checkpoints=3)
    result = predict(cfg, cluster)
    steps = result.reference.checkpoint_steps
    assert len(steps) == 3 and steps[0] == 5 and list(steps) == sorted(set(steps))
    assert {r.scope for r in result.rows} == {"total", "0", "2"}
    layer_only = predict(PredictConfig(**{**cfg.__dict__, "layer": "2"}), cluster)
    assert {r.scope for r in layer_only.rows} == {"total", "2"}
    # Per-layer |G|^2 and tr(Sigma) add up to the total's (squared norms split across layers).
    for c in range(3):
        rows = {r.scope: r for r in result.rows if r.checkpoint == c}
        assert rows["0"].trace_sigma + rows["2"].trace_sigma == pytest.approx(rows["total"].trace_sigma, rel=1e-9)
        assert rows["0"].grad_sq_norm + rows["2"].grad_sq_norm == pytest.approx(rows["total"].grad_sq_norm, rel=1e-9)
    assert sum(result.snr_counts) == rows["total"].n_params
    assert np.all(np.diff(result.snr_edges) > 0)


def test_warmup_zero_single_checkpoint_measures_the_built_model(cluster):
    cfg = PredictConfig(task="linreg", probe_size=300, shards=1, warmup_steps=0, checkpoints=1)
    result = predict(cfg, cluster)
    task = load_task("linreg")
    model = init_model(task, 0)
    with torch.no_grad():
        idx = probe_indices(task.n_train, result.config.probe_size, result.config.seed, 0)
        loss = task.loss(model(task.train_inputs[idx]), task.train_targets[idx]).double().mean()
    (row,) = total_rows(result)
    assert row.step == 0 and row.examples_seen == 0
    assert row.train_loss == pytest.approx(float(loss), rel=1e-6)
    assert math.isfinite(row.b_simple)


def test_engines_agree(cluster):
    base = dict(task="blobs-noisy", probe_size=64, shards=2, warmup_steps=2, checkpoints=1, blocks=4)
    a = predict(PredictConfig(engine="general", **base), cluster)
    b = predict(PredictConfig(engine="loop", **base), cluster)
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert ra.b_simple == pytest.approx(rb.b_simple, rel=1e-5)
    assert get_engine("loop").name == "loop"


@pytest.mark.parametrize(
    ("n", "blocks", "max_batch", "shards"), [(600, 5, 256, 7), (10, 2, 4, 10), (2, 2, 256, 2), (4096, 16, 256, 3)]
)
def test_micro_batch_grid_covers_the_probe_once(n, blocks, max_batch, shards):
    units = micro_batches(n, edges(n, blocks), max_batch, shards)
    work = assign(units, shards)
    flat = [u for w in work for u in w]
    assert len(work) == shards and all(work)
    assert [lo for _, lo, _ in flat] == [0] + [hi for _, _, hi in flat[:-1]] and flat[-1][2] == n
    assert all(hi - lo <= max_batch for _, lo, hi in flat)
    block_edges = edges(n, blocks)
    assert all(block_edges[b] <= lo and hi <= block_edges[b + 1] for b, lo, hi in flat)
    if shards <= len(micro_batches(n, block_edges, max_batch, 1)):
        assert units == micro_batches(n, block_edges, max_batch, 1)  # the grid ignores the sharding


def test_the_micro_batch_estimator_agrees_with_the_closed_form(cluster):
    """On linear regression (no coupling) micro-batches of 8 estimate the same B_simple: the closed form at
    the initial weights, within sampling error, and the per-example estimate of the same examples."""
    task = load_task("linreg")
    base = dict(task="linreg", probe_size=task.n_train, warmup_steps=0, checkpoints=1, shards=2)
    micro = predict(PredictConfig(estimator="micro-batch", micro_batch=8, **base), cluster)
    per_example = predict(PredictConfig(estimator="per-example", **base), cluster)
    (m,), (p,) = total_rows(micro), total_rows(per_example)
    assert (m.estimator, m.micro_batch, m.engine, m.n_examples) == ("micro-batch", 8, "micro-batch", task.n_train)
    assert (p.estimator, p.micro_batch) == ("per-example", 1)
    w = init_model(task, 0).weight.detach().double().reshape(-1)
    assert m.b_simple == pytest.approx(LINREG.b_simple(w), rel=0.15)  # 2048 samples: ~3x the per-example error
    assert m.b_simple_lo < p.b_simple < m.b_simple_hi
    assert m.grad_sq_norm_biased == pytest.approx(p.grad_sq_norm_biased, rel=1e-6)  # the same mean gradient


def test_auto_measures_a_batchnorm_model_with_micro_batches(cluster, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = PredictConfig(task="example_tasks:batchnorm_blobs", probe_size=256, checkpoints=3, micro_batch=4, blocks=8)
    result = predict(cfg, cluster)
    assert result.config.estimator == "micro-batch"
    rows = total_rows(result)
    assert {r.estimator for r in rows} == {"micro-batch"} and {r.micro_batch for r in rows} == {4}
    assert all(r.n_examples == 256 and r.trace_sigma > 0 for r in rows)
    assert math.isfinite(result.headline.b_simple) and result.headline.b_simple > 0
    assert {r.scope for r in result.rows} >= {"total", "norm-layers", "1"}  # BatchNorm is a normalization layer


def test_norm_layer_scope_and_update_ratios(cluster, monkeypatch):
    """norm-layers holds the normalization layers' parameters together: its tr(Sigma) and |G|^2 are theirs
    summed. update_ratio is ||lr grad|| / ||w|| of the reference run's step that made each checkpoint."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = PredictConfig(task="example_tasks:layernorm_blobs", probe_size=128, checkpoints=3, blocks=4)
    result = predict(cfg, cluster)
    task = load_task(cfg.task)
    for c in range(3):
        at = {r.scope: r for r in result.rows if r.checkpoint == c}
        assert at["norm-layers"].trace_sigma == pytest.approx(at["1"].trace_sigma + at["3"].trace_sigma, rel=1e-9)
        assert at["norm-layers"].grad_sq_norm == pytest.approx(at["1"].grad_sq_norm + at["3"].grad_sq_norm, rel=1e-9)
        assert at["norm-layers"].n_params == at["1"].n_params + at["3"].n_params
    assert math.isnan(next(r for r in result.rows if r.checkpoint == 0).update_ratio)  # step 0: no step yet
    assert result.norm_headline is not None and result.norm_headline.b_simple > 0
    assert "norm-layers" not in {f.scope for f in result.layer_flags}
    # the slow way: replay to the last checkpoint and read the last step's gradient
    step = result.reference.checkpoint_steps[-1]
    model = init_model(task, cfg.seed)
    train(task, TrainConfig(task.batch_size, task.lr, (step + 1) * task.batch_size, None, seed=cfg.seed),
          model=model, stop_after=step)  # fmt: skip
    params = dict(model.named_parameters())
    for scope, names in (("total", list(params)), ("1", ["1.weight", "1.bias"]), ("0", ["0.weight", "0.bias"])):
        step_norm = math.sqrt(sum(float((task.lr * params[n].grad).square().sum()) for n in names))
        weight_norm = math.sqrt(sum(float(params[n].detach().square().sum()) for n in names))
        row = next(r for r in result.rows if r.checkpoint == 2 and r.scope == scope)
        assert row.update_ratio == pytest.approx(step_norm / weight_norm, rel=1e-6), scope
