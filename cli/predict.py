"""`gns-sweep predict`: B_simple per layer with intervals, along a reference run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from gns_sweep_cli.common import (
    AddressOpt,
    Bars,
    JsonOpt,
    NumCpusOpt,
    OverwriteOpt,
    check_out_dir,
    cluster,
    default_out,
    fmt,
    handle_errors,
    json_ready,
    out,
)
from rich.table import Table

from gns_sweep.per_example import DEFAULT_ENGINE, TOTAL
from gns_sweep.predict import PredictConfig, PredictResult, noise_table, run_predict, settings, validate
from gns_sweep.storage import PREDICT_FILE, check_output
from gns_sweep.tasks import DEFAULT_TASK


@handle_errors
def predict(
    task: str = typer.Option(
        DEFAULT_TASK, "--task", help="Built-in task (see `gns-sweep tasks`) or package.module:attr."
    ),
    probe_size: int | None = typer.Option(
        None, "--probe-size", help="Probe examples drawn from the training set [default: 4096, or all if fewer]."
    ),
    shards: int = typer.Option(4, "--shards", help="Ray tasks per checkpoint (the result does not depend on it)."),
    blocks: int = typer.Option(16, "--blocks", help="Jackknife blocks for the 95% interval."),
    layer: str | None = typer.Option(None, "--layer", help="Report only this layer (and the total)."),
    warmup_steps: int = typer.Option(20, "--warmup-steps", help="Reference-run SGD steps before the first checkpoint."),
    checkpoints: int = typer.Option(8, "--checkpoints", help="Measurements from the warm-up to the target."),
    seed: int = typer.Option(0, "--seed", help="Seeds the weights, the data order and the probe draw."),
    engine: str = typer.Option(DEFAULT_ENGINE, "--engine", help="Per-example gradient engine."),
    max_batch: int = typer.Option(256, "--max-batch", help="Micro-batch size inside a shard (bounds memory)."),
    cpus_per_shard: float = typer.Option(1.0, "--cpus-per-shard", help="CPUs per shard task."),
    gpus_per_shard: float = typer.Option(0.0, "--gpus-per-shard", help="GPUs per shard task (0: CPU)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default: a new one under results/)."),
    overwrite: bool = OverwriteOpt,
    address: str | None = AddressOpt,
    num_cpus: int | None = NumCpusOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Predict the critical batch size: B_simple = tr(Sigma)/|G|^2 from per-example gradients."""
    config = PredictConfig(
        task=task,
        probe_size=probe_size,
        shards=shards,
        blocks=blocks,
        layer=layer,
        warmup_steps=warmup_steps,
        checkpoints=checkpoints,
        seed=seed,
        engine=engine,
        max_batch=max_batch,
        cpus_per_shard=cpus_per_shard,
        gpus_per_shard=gpus_per_shard,
    )
    loaded, config = validate(config)
    folder = check_out_dir(out_dir or default_out("predict", loaded.name))
    check_output(folder / PREDICT_FILE, settings(config), overwrite=overwrite)
    with cluster(address, num_cpus) as c, Bars(enabled=not as_json) as bars:
        result = run_predict(config, c, out_dir=folder, progress=bars)
    if as_json:
        out.print_json(json.dumps(summary(result)))
    else:
        render(result)


def summary(r: PredictResult) -> dict:
    return json_ready(
        {
            "task": r.task,
            "out": str(r.out_dir / PREDICT_FILE) if r.out_dir else None,
            "settings": settings(r.config),
            "reference": asdict(r.reference),
            "headline": asdict(r.headline),
            "noisiest_layer": r.noisiest_layer,
            "layers": [asdict(f) for f in r.layer_flags],
            "noise_table": [asdict(n) for n in noise_table(r.headline.b_simple_window)],
            "snr_histogram": {"edges": list(r.snr_edges), "counts": list(r.snr_counts)},
            "rows": [asdict(row) for row in r.rows],
        }
    )


def b_cells(row) -> tuple[str, str]:
    """B_simple and its interval; an unresolved |G|^2 shows the lower bound instead."""
    if not row.resolved:
        return f">{fmt(row.b_simple_lower_bound)}", "unresolved"
    return fmt(row.b_simple), f"{fmt(row.b_simple_lo)}-{fmt(row.b_simple_hi)}"


def render(r: PredictResult) -> None:
    ref = r.reference
    if r.config.checkpoints == 1:
        reached = "one checkpoint, so the run was not traced to its target"
    elif ref.steps_to_target is not None:
        reached = f"target {ref.target_loss:g} reached at step {ref.steps_to_target}"
    elif ref.target_loss is not None:
        reached = f"target {ref.target_loss:g} not reached within the budget"
    else:
        reached = "no target: traced to the end of the budget"
    out.print(
        f"[bold]{r.task}[/]: reference run at batch {ref.batch_size}, lr {ref.lr:g}; {reached}; "
        f"checkpoints at steps {', '.join(map(str, ref.checkpoint_steps))}"
    )
    t = Table(title="B_simple along the reference run (whole model; 95% jackknife interval)")
    for col in ("ckpt", "step", "train loss", "eval loss", "|G|^2", "tr(Sigma)", "B_simple", "95% CI", "SNR"):
        t.add_column(col, justify="right")
    for row in r.rows:
        if row.scope == TOTAL:
            t.add_row(
                str(row.checkpoint),
                str(row.step),
                fmt(row.train_loss, 4),
                fmt(row.eval_loss, 4),
                fmt(row.grad_sq_norm),
                fmt(row.trace_sigma),
                *b_cells(row),
                fmt(row.snr_mean),
            )
    out.print(t)

    last = max(row.checkpoint for row in r.rows)
    flags = {f.scope: f.verdict for f in r.layer_flags}
    t = Table(title=f"per layer at checkpoint {last} (step {ref.checkpoint_steps[-1]})")
    for col in ("scope", "params", "|G|^2", "tr(Sigma)", "B_simple", "95% CI", "SNR", "verdict"):
        t.add_column(col, justify="right" if col not in ("scope", "verdict") else "left")
    for row in r.rows:
        if row.checkpoint == last:
            verdict = flags.get(row.scope, "")
            t.add_row(
                row.scope,
                str(row.n_params),
                fmt(row.grad_sq_norm),
                fmt(row.trace_sigma),
                *b_cells(row),
                fmt(row.snr_mean),
                verdict,
            )
    out.print(t)
    if r.noisiest_layer is not None:
        out.print(f"largest noise scale: layer [bold]{r.noisiest_layer}[/]")

    t = Table(title="per-parameter SNR |mean|/std at the last checkpoint (10 log-spaced bins)")
    t.add_column("SNR from", justify="right")
    t.add_column("to", justify="right")
    t.add_column("params", justify="right")
    t.add_column("")
    peak = max(r.snr_counts) or 1
    for i, count in enumerate(r.snr_counts):
        t.add_row(fmt(r.snr_edges[i]), fmt(r.snr_edges[i + 1]), str(count), "#" * round(30 * count / peak))
    out.print(t)

    h = r.headline
    out.print(
        f"[bold]B_simple = {fmt(h.b_simple_window)}[/] (averaged over the last checkpoints "
        f"{', '.join(map(str, h.window_checkpoints))}; over the whole run {fmt(h.b_simple_run)}, "
        f"at the first checkpoint {fmt(h.b_simple_start)})"
    )
    rows = noise_table(h.b_simple_window)
    if rows:
        t = Table(title="predicted cost per batch size B: noise = B_simple/B, S(B)/S_min, E(B)/E_min")
        for col in ("B", "noise", "steps x", "examples x"):
            t.add_column(col, justify="right")
        for n in rows:
            t.add_row(str(n.batch_size), fmt(n.noise), fmt(n.steps_multiplier), fmt(n.examples_multiplier))
        out.print(t)
    else:
        out.print("B_simple is unresolved at this probe size: raise --probe-size, or measure later in training.")
    if r.out_dir is not None:
        out.print(f"wrote {r.out_dir / PREDICT_FILE}")
