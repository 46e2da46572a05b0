"""`gns-sweep empirical`: the batch-size sweep, one Ray task per (batch size, lr, seed)."""

from __future__ import annotations

import json
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
    handle_errors,
    json_ready,
    out,
)
from rich.table import Table

from gns_sweep.empirical import EmpiricalConfig, EmpiricalResult, Plan, plan, prepare_out, run_empirical, validate
from gns_sweep.errors import UsageError
from gns_sweep.storage import CURVES_FILE, TRIALS_FILE
from gns_sweep.tasks import DEFAULT_TASK

BatchSizesOpt = typer.Option(
    None, "--batch-sizes", help="Comma list of batch sizes, e.g. 4,16,64,256 (default: the task's grid)."
)
LrsOpt = typer.Option(
    None,
    "--lrs",
    help="Learning rates tried at every batch size: values (0.05,0.1,0.2) or multipliers of each batch size's "
    "centre lr (x0.25,x0.5,x1,x2,x4). Default: 5 points a factor 2 apart around the task's lr scaled with B.",
)
SeedsOpt = typer.Option(3, "--seeds", help="Seeds per (batch size, lr): 0..N-1.")
BudgetOpt = typer.Option(None, "--budget-examples", help="Training examples per trial (default: the task's).")
TargetOpt = typer.Option(None, "--target-loss", help="Eval-loss target (default: the task's, else a pilot picks one).")
CpusOpt = typer.Option(1.0, "--cpus-per-trial", help="CPUs per trial (torch threads match).")
GpusOpt = typer.Option(0.0, "--gpus-per-trial", help="GPUs per trial (> 0 trains on cuda).")
ResumeOpt = typer.Option(False, "--resume", help="Run only the trials of the plan not yet on disk in --out.")


def parse_batch_sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--batch-sizes {text!r} is empty; give a comma list such as 8,64,512")
    try:
        return tuple(int(s) for s in items)
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: not a comma list of integers; e.g. 8,64,512") from None


def parse_lrs(text: str | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(values, multipliers): items starting with 'x' are multipliers of the centre lr."""
    if text is None:
        return None, None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--lrs {text!r} is empty; give values (0.05,0.1) or multipliers (x0.5,x1,x2)")
    mult = [s.lower().startswith("x") for s in items]
    if any(mult) and not all(mult):
        raise UsageError(f"--lrs {text!r} mixes values and multipliers; use all values or all x-multipliers")
    try:
        values = tuple(float(s[1:] if m else s) for s, m in zip(items, mult, strict=True))
    except ValueError:
        raise UsageError(f"--lrs {text!r}: not a comma list of numbers; e.g. 0.05,0.1,0.2 or x0.5,x1,x2") from None
    return (None, values) if all(mult) else (values, None)


def make_config(
    task: str,
    batch_sizes: str | None,
    lrs: str | None,
    seeds: int,
    budget_examples: int | None,
    target_loss: float | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> EmpiricalConfig:
    values, multipliers = parse_lrs(lrs)
    return EmpiricalConfig(
        task=task,
        batch_sizes=parse_batch_sizes(batch_sizes),
        lrs=values,
        lr_multipliers=multipliers,
        seeds=seeds,
        budget_examples=budget_examples,
        target_loss=target_loss,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
    )


@handle_errors
def empirical(
    task: str = typer.Option(DEFAULT_TASK, "--task", help="Built-in task or package.module:attr."),
    batch_sizes: str | None = BatchSizesOpt,
    lrs: str | None = LrsOpt,
    seeds: int = SeedsOpt,
    budget_examples: int | None = BudgetOpt,
    target_loss: float | None = TargetOpt,
    cpus_per_trial: float = CpusOpt,
    gpus_per_trial: float = GpusOpt,
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default: a new one under results/)."),
    resume: bool = ResumeOpt,
    overwrite: bool = OverwriteOpt,
    address: str | None = AddressOpt,
    num_cpus: int | None = NumCpusOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measure steps-to-target over batch sizes x learning rates x seeds (the input of `compare`)."""
    config = make_config(task, batch_sizes, lrs, seeds, budget_examples, target_loss, cpus_per_trial, gpus_per_trial)
    loaded = validate(config)
    folder = check_out_dir(out_dir or default_out("empirical", loaded.name))
    the_plan = plan(config, loaded)
    prepare_out(folder, the_plan, resume=resume, overwrite=overwrite)
    if not as_json:
        describe_plan(the_plan)
    with cluster(address, num_cpus) as c, Bars(enabled=not as_json) as bars:
        result = run_empirical(
            config, c, out_dir=folder, the_plan=the_plan, resume=resume, overwrite=overwrite, progress=bars
        )
    if as_json:
        out.print_json(json.dumps(summary(result)))
    else:
        render(result)


def describe_plan(p: Plan) -> None:
    source = {"task": "the task's default", "--target-loss": "--target-loss", "pilot": "chosen by a pilot run"}
    out.print(
        f"[bold]{p.task}[/]: {len(p.trials)} trials = {len(p.batch_sizes)} batch sizes x "
        f"{len(p.lrs[0]) if len(set(map(len, p.lrs))) == 1 else 'several'} lrs x {len(p.seeds)} seeds; "
        f"target eval loss {p.target_loss:g} ({source.get(p.target_source, p.target_source)}); "
        f"budget {p.budget_examples} examples per trial"
        + (f"; centre lr capped at {p.lr_cap:.3g} (half the largest stable lr)" if p.lr_cap else "")
    )


def summary(r: EmpiricalResult) -> dict:
    rows = [{k: json_ready(v) for k, v in row.items() if k not in ("curve_steps", "curve_losses")} for row in r.records]
    return {
        "task": r.plan.task,
        "out": str(r.out_dir) if r.out_dir else None,
        "target_loss": r.plan.target_loss,
        "target_source": r.plan.target_source,
        "budget_examples": r.plan.budget_examples,
        "lr_cap": r.plan.lr_cap,
        "trials": len(r.records),
        "resumed": r.resumed,
        "wall_seconds": r.wall_seconds,
        "rows": rows,
    }


def render(r: EmpiricalResult) -> None:
    t = Table(title=f"trials per batch size (target eval loss {r.plan.target_loss:g})")
    for col in ("batch", "lrs", "reached", "budget", "diverged", "fewest steps", "at lr"):
        t.add_column(col, justify="right")
    for b, grid in zip(r.plan.batch_sizes, r.plan.lrs, strict=True):
        rows = [row for row in r.records if row["batch_size"] == b]
        counts = {s: sum(1 for row in rows if row["status"] == s) for s in ("reached", "budget", "diverged")}
        reached = [row for row in rows if row["steps_to_target"] is not None]
        best = min(reached, key=lambda row: row["steps_to_target"]) if reached else None
        t.add_row(
            str(b),
            f"{grid[0]:.3g}..{grid[-1]:.3g}" if len(grid) > 1 else f"{grid[0]:.3g}",
            str(counts["reached"]),
            str(counts["budget"]),
            str(counts["diverged"]),
            str(best["steps_to_target"]) if best else "-",
            f"{best['lr']:.3g}" if best else "-",
        )
    out.print(t)
    resumed = f" ({r.resumed} already on disk)" if r.resumed else ""
    out.print(f"{len(r.records)} trials{resumed}, {r.wall_seconds:.1f} s")
    if r.out_dir is not None:
        out.print(f"wrote {r.out_dir / TRIALS_FILE} and {r.out_dir / CURVES_FILE}; next: gns-sweep compare {r.out_dir}")
