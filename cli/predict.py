"""`gns-sweep predict`: B_simple per layer with intervals, along a reference run."""

from __future__ import annotations

import json
from dataclasses import asdict

from gns_sweep_cli import options as o
from gns_sweep_cli.common import Bars, cluster, fmt, handle_errors, json_ready, out, results_dir
from rich.table import Table

from gns_sweep.predict import PredictResult, noise_table, prepare_predict, run_predict, settings
from gns_sweep.predict.config import PER_EXAMPLE
from gns_sweep.results import TOTAL, ScopeRow
from gns_sweep.tasks import load_task


@handle_errors
def predict(
    task: o.TaskName = o.DEFAULT_TASK,
    probe_size: o.ProbeSize = o.P.probe_size,
    shards: o.Shards = o.P.shards,
    blocks: o.Blocks = o.P.blocks,
    layer: o.Layer = o.P.layer,
    warmup_steps: o.WarmupSteps = o.P.warmup_steps,
    checkpoints: o.Checkpoints = o.P.checkpoints,
    seed: o.Seed = o.P.seed,
    estimator: o.Estimator = o.P.estimator,
    micro_batch: o.MicroBatch = o.P.micro_batch,
    engine: o.Engine = o.P.engine,
    max_batch: o.MaxBatch = o.P.max_batch,
    cpus_per_shard: o.CpusPerShard = o.P.cpus_per_shard,
    gpus_per_shard: o.GpusPerShard = o.P.gpus_per_shard,
    optimizer: o.Optimizer = None,
    momentum: o.Momentum = None,
    betas: o.Betas = None,
    weight_decay: o.WeightDecay = None,
    trust_coefficient: o.TrustCoefficient = None,
    out_dir: o.OutDir = None,
    overwrite: o.Overwrite = False,
    address: o.Address = None,
    num_cpus: o.NumCpus = None,
    max_retries: o.MaxRetries = o.P.max_retries,
    as_json: o.AsJson = False,
) -> None:
    """Predict the critical batch size: B_simple = tr(Sigma)/|G|^2 from per-example gradients."""
    values = locals()
    loaded = load_task(task)
    config = o.predict_config(values, loaded)
    job = prepare_predict(config, task=loaded, out=results_dir(out_dir, "predict", loaded.name), overwrite=overwrite)
    with cluster(address, num_cpus) as c, Bars(enabled=not as_json) as bars:
        result = run_predict(job, c, progress=bars)
    show(result, as_json)


def show(r: PredictResult, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary(r)))
    else:
        render(r)


def summary(r: PredictResult) -> dict:
    return json_ready(
        {
            "task": r.task,
            "out": str(r.out.predict) if r.out else None,
            "settings": settings(r.config),
            "reference": asdict(r.reference),
            "headline": asdict(r.headline),
            "norm_headline": asdict(r.norm_headline) if r.norm_headline else None,
            "precond_headline": asdict(r.precond_headline) if r.precond_headline else None,
            "noisiest_layer": r.noisiest_layer,
            "layers": [asdict(f) for f in r.layer_flags],
            "noise_table": [asdict(n) for n in noise_table(r.headline.b_simple)],
            "snr_histogram": {"edges": list(r.snr_edges), "counts": list(r.snr_counts)},
            "checkpoint_node_ids": [list(ids) for ids in r.node_ids],
            "rows": [asdict(row) for row in r.rows],
        }
    )


def estimate_cells(row: ScopeRow) -> tuple[str, ...]:
    """|G|^2, tr(Sigma), B_simple and its interval, SNR; an unresolved |G|^2 shows B_simple's lower bound."""
    if row.resolved:
        b, ci = fmt(row.b_simple), f"{fmt(row.b_simple_lo)}-{fmt(row.b_simple_hi)}"
    else:
        b, ci = f">{fmt(row.b_simple_lower_bound)}", "unresolved"
    return fmt(row.grad_sq_norm), fmt(row.trace_sigma), b, ci, fmt(row.snr_mean)


def render(r: PredictResult) -> None:
    out.print(describe_reference(r))
    render_checkpoints(r)
    render_layers(r)
    render_snr(r)
    render_headline(r)
    nodes = sorted({n for ids in r.node_ids for n in ids})
    out.print(f"shards ran on {len(nodes)} Ray node(s): {', '.join(n[:12] for n in nodes)}")
    if r.out is not None:
        out.print(f"wrote {r.out.predict}")


def describe_reference(r: PredictResult) -> str:
    ref = r.reference
    if r.config.checkpoints == 1:
        reached = "one checkpoint, so the run was not traced to its target"
    elif ref.steps_to_target is not None:
        reached = f"target {ref.target_loss:g} reached at step {ref.steps_to_target}"
    elif ref.target_loss is not None:
        reached = f"target {ref.target_loss:g} not reached within the budget"
    else:
        reached = "no target: traced to the end of the budget"
    c = r.config
    how = "per-example gradients" if c.estimator == PER_EXAMPLE else f"micro-batches of {c.micro_batch} examples"
    why = "" if ref.lr_reason.startswith("the task's lr for") else f" ({ref.lr_reason})"
    return (
        f"[bold]{r.task}[/]: reference run with {ref.optimizer.describe()} at batch {ref.batch_size}, "
        f"lr {ref.lr:.3g}{why}; {reached}; "
        f"{len(ref.checkpoint_steps)} checkpoints from step {ref.checkpoint_steps[0]} to {ref.checkpoint_steps[-1]}, "
        f"each on {c.probe_size} fresh examples ({how})"
    )


SHOWN_CHECKPOINTS = 16  # rows of the per-checkpoint table; predict.parquet has them all


def render_checkpoints(r: PredictResult) -> None:
    total = [row for row in r.rows if row.scope == TOTAL]
    every = -(-len(total) // SHOWN_CHECKPOINTS)
    shown = [row for i, row in enumerate(total) if i % every == 0 or i == len(total) - 1]
    which = f"every {every} of {len(total)} checkpoints; " if every > 1 else ""
    t = Table(title=f"B_simple along the reference run (whole model; {which}95% jackknife interval)")
    for col in ("ckpt", "step", "train loss", "eval loss", "|G|^2", "tr(Sigma)", "B_simple", "95% CI", "SNR"):
        t.add_column(col, justify="right")
    for row in shown:
        t.add_row(
            str(row.checkpoint), str(row.step), fmt(row.train_loss, 4), fmt(row.eval_loss, 4), *estimate_cells(row)
        )
    out.print(t)


def render_layers(r: PredictResult) -> None:
    last = max(row.checkpoint for row in r.rows)
    flags = {f.scope: f.verdict for f in r.layer_flags}
    t = Table(
        title=f"per layer at checkpoint {last} (step {r.reference.checkpoint_steps[-1]}); "
        "update = ||step|| / ||w|| of the step that led there"
    )
    for col in ("scope", "params", "|G|^2", "tr(Sigma)", "B_simple", "95% CI", "SNR", "update", "verdict"):
        t.add_column(col, justify="right" if col not in ("scope", "verdict") else "left")
    for row in r.rows:
        if row.checkpoint == last:
            cells = estimate_cells(row)
            t.add_row(row.scope, str(row.n_params), *cells, fmt(row.update_ratio), flags.get(row.scope, ""))
    out.print(t)
    if r.noisiest_layer is not None:
        out.print(f"largest noise scale: layer [bold]{r.noisiest_layer}[/]")


def render_snr(r: PredictResult) -> None:
    t = Table(title="per-parameter SNR |mean|/std at the last checkpoint (10 log-spaced bins)")
    t.add_column("SNR from", justify="right")
    t.add_column("to", justify="right")
    t.add_column("params", justify="right")
    t.add_column("")
    peak = max(r.snr_counts) or 1
    for i, count in enumerate(r.snr_counts):
        t.add_row(fmt(r.snr_edges[i]), fmt(r.snr_edges[i + 1]), str(count), "#" * round(30 * count / peak))
    out.print(t)


def render_headline(r: PredictResult) -> None:
    h = r.headline
    out.print(
        f"[bold]B_simple = {fmt(h.b_simple)}[/] [{fmt(h.b_simple_lo)}, {fmt(h.b_simple_hi)}] (tr(Sigma) and |G|^2 "
        f"averaged over all {h.checkpoints} checkpoints, 95% bootstrap over them; over the last quarter "
        f"{fmt(h.b_simple_late)}, at the first checkpoint {fmt(h.b_simple_start)})"
    )
    if r.norm_headline is not None:
        n = r.norm_headline
        out.print(
            f"normalization layers alone: B_simple = {fmt(n.b_simple)} [{fmt(n.b_simple_lo)}, {fmt(n.b_simple_hi)}] "
            f"(ratio to the whole model {fmt(n.b_simple / h.b_simple if h.b_simple > 0 else float('nan'), 2)})"
        )
    name, b = "B_simple", h.b_simple
    if r.precond_headline is not None:  # an adaptive optimizer: its own geometry's noise scale is the prediction
        p, opt = r.precond_headline, r.reference.optimizer.name
        out.print(
            f"[bold]B_simple^P = {fmt(p.b_simple)}[/] [{fmt(p.b_simple_lo)}, {fmt(p.b_simple_hi)}] in {opt}'s "
            f"geometry (tr(P Sigma) and G'PG over the {p.checkpoints} checkpoints with a preconditioner): the "
            f"prediction for a sweep with {opt}"
        )
        name, b = "B_simple^P", p.b_simple
    rows = noise_table(b)
    if not rows:
        out.print(f"{name} is unresolved at this probe size: raise --probe-size, or measure later in training.")
        return
    t = Table(title=f"predicted cost per batch size B: noise = {name}/B, S(B)/S_min, E(B)/E_min")
    for col in ("B", "noise", "steps x", "examples x"):
        t.add_column(col, justify="right")
    for n in rows:
        t.add_row(str(n.batch_size), fmt(n.noise), fmt(n.steps_multiplier), fmt(n.examples_multiplier))
    out.print(t)
