"""`gns-sweep empirical`: the batch-size sweep, a Ray task per (batch size, lr, seed) or per chunk of short ones."""

from __future__ import annotations

import json

from gns_sweep_cli import options as o
from gns_sweep_cli.common import Bars, cluster, handle_errors, json_ready, out, results_dir
from rich.table import Table

from gns_sweep.empirical import GNS, EmpiricalResult, Plan, prepare_empirical, run_empirical
from gns_sweep.tasks import load_task


@handle_errors
def empirical(
    task: o.TaskName = o.DEFAULT_TASK,
    batch_sizes: o.BatchSizes = None,
    lrs: o.Lrs = None,
    seeds: o.Seeds = o.E.seeds,
    budget_examples: o.BudgetExamples = o.E.budget_examples,
    target_loss: o.TargetLoss = o.E.target_loss,
    cpus_per_trial: o.CpusPerTrial = o.E.cpus_per_trial,
    gpus_per_trial: o.GpusPerTrial = o.E.gpus_per_trial,
    optimizer: o.Optimizer = None,
    momentum: o.Momentum = None,
    betas: o.Betas = None,
    weight_decay: o.WeightDecay = None,
    trust_coefficient: o.TrustCoefficient = None,
    schedule: o.Schedule = o.E.schedule,
    schedule_k: o.ScheduleK = o.E.schedule_k,
    out_dir: o.OutDir = None,
    resume: o.Resume = False,
    overwrite: o.Overwrite = False,
    address: o.Address = None,
    num_cpus: o.NumCpus = None,
    max_retries: o.MaxRetries = o.E.max_retries,
    as_json: o.AsJson = False,
) -> None:
    """Measure steps-to-target over batch sizes x learning rates x seeds (the input of `compare`)."""
    values = locals()
    loaded = load_task(task)
    config = o.empirical_config(values, loaded)
    folder = results_dir(out_dir, "empirical", loaded.name)
    job = prepare_empirical(config, task=loaded, out=folder, resume=resume, overwrite=overwrite)
    if not as_json:
        describe_plan(job.plan)
    with cluster(address, num_cpus) as c, Bars(enabled=not as_json) as bars:
        result = run_empirical(job, c, progress=bars)
    show(result, as_json)


def show(r: EmpiricalResult, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary(r)))
    else:
        render(r)


def describe_plan(p: Plan) -> None:
    out.print(
        f"[bold]{p.task}[/] with {p.optimizer.describe()}: {len(p.trials)} trials = {len(p.batch_sizes)} batch sizes x "
        f"{len(p.lrs[0]) if len(set(map(len, p.lrs))) == 1 else 'several'} lrs x {len(p.seeds)} seeds; "
        f"target eval loss {p.target_loss:g} ({p.target_reason}); "
        f"budget {p.budget_examples} examples per trial"
        + (
            f"; lr grid centred on {p.reference_lr:.3g} at the task's batch size b ({p.lr_reason}), "
            f"times {'sqrt(B/b)' if p.optimizer.lr_scaling == 'sqrt' else 'B/b'} at batch size B"
            if p.reference_lr is not None
            else ""
        )
        + (f"; centre lr capped at {p.lr_cap:.3g} (half the largest stable lr)" if p.lr_cap else "")
        + (_schedule_line(p) if p.schedule == GNS else "")
    )


def _schedule_line(p: Plan) -> str:
    spec = next(t.schedule for t in p.trials if t.schedule is not None)
    return (
        f"; of them {len(p.seeds)} schedule trials (one per seed) whose batch follows the noise scale "
        f"(nearest power of two to {p.schedule_k:g} x B_noise, {spec.floor}..{spec.ceiling}, {spec.estimator} "
        "estimator)"
    )


def summary(r: EmpiricalResult) -> dict:
    rows = [{k: json_ready(v) for k, v in row.items()} for row in r.records]
    return {
        "task": r.plan.task,
        "out": str(r.out.path) if r.out else None,
        "target_loss": r.plan.target_loss,
        "target_source": r.plan.target_source,
        "target_reason": r.plan.target_reason,
        "budget_examples": r.plan.budget_examples,
        "lr_cap": r.plan.lr_cap,
        "optimizer": r.plan.optimizer.key(),
        "lr_scaling": r.plan.optimizer.lr_scaling,
        "reference_lr": r.plan.reference_lr,
        "lr_reason": r.plan.lr_reason,
        "trials": len(r.records),
        "resumed": r.resumed,
        "wall_seconds": r.wall_seconds,
        "rows": rows,
    }


def render(r: EmpiricalResult) -> None:
    t = Table(title=f"trials per batch size (target eval loss {r.plan.target_loss:g})")
    for col in ("batch", "lrs", "reached", "budget", "diverged", "fewest steps", "at lr"):
        t.add_column(col, justify="right")
    counts = {b: dict.fromkeys(("reached", "budget", "diverged"), 0) for b in r.plan.batch_sizes}
    best: dict[int, dict] = {}  # per batch size: the trial with the fewest steps to the target
    scheduled: list[dict] = []  # the schedule trials, shown on their own
    for row in r.records:  # one pass: a sweep may hold many thousands of trials
        if row.get("schedule") == GNS:
            scheduled.append(row)
            continue
        b = row["batch_size"]
        if row["status"] in counts.get(b, {}):
            counts[b][row["status"]] += 1
        steps = row["steps_to_target"]
        if steps is not None and (b not in best or steps < best[b]["steps_to_target"]):
            best[b] = row
    for b, grid in zip(r.plan.batch_sizes, r.plan.lrs, strict=True):
        t.add_row(
            str(b),
            f"{grid[0]:.3g}..{grid[-1]:.3g}" if len(grid) > 1 else f"{grid[0]:.3g}",
            str(counts[b]["reached"]),
            str(counts[b]["budget"]),
            str(counts[b]["diverged"]),
            str(best[b]["steps_to_target"]) if b in best else "-",
            f"{best[b]['lr']:.3g}" if b in best else "-",
        )
    out.print(t)
    for row in scheduled:
        to = row["steps_to_target"]
        reached = f"{to} steps, {row['examples_to_target']} examples" if to is not None else row["status"]
        out.print(f"schedule {row['trial_id']}: {reached}, last batch {row['batch_size']}")
    resumed = f" ({r.resumed} already on disk)" if r.resumed else ""
    out.print(f"{len(r.records)} trials{resumed}, {r.wall_seconds:.1f} s")
    if r.out is not None:
        out.print(f"wrote {r.out.trials} and {r.out.curves}; next: gns-sweep compare {r.out.path}")
