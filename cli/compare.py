"""`gns-sweep compare DIR [DIR ...]`: the measured B_crit beside the prediction that matches the sweep's
optimizer; several folders side by side with --out."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from gns_sweep_cli import options as o
from gns_sweep_cli.common import check_out_dir, fmt, handle_errors, json_ready, out
from rich.table import Table

from gns_sweep.compare import (
    Comparison,
    check_folders_out,
    comparison_rows,
    folder_labels,
    run_compare,
    run_compare_folders,
    schedule_rows,
    target_frontier_rows,
)
from gns_sweep.errors import RunError, UsageError
from gns_sweep.storage import SweepDir

FoldersOut = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write the folders side by side here (comparison.parquet with a folder column, targets.png); "
        "required with several folders. Without it, one folder's results are written into that folder.",
    ),
]


@handle_errors
def compare(
    out_dirs: Annotated[
        list[Path], typer.Argument(help="Folder(s) holding predict.parquet and trials.parquet, e.g. one per optimizer.")
    ],
    targets: o.Targets = None,
    side_by_side: FoldersOut = None,
    as_json: o.AsJson = False,
) -> None:
    """Fit S = S_min + E_min/B at a ladder of targets, B_crit = E_min/S_min, and set each beside the prediction
    (B_simple, or the preconditioned noise scale for an Adam-family sweep)."""
    parsed = o.parse_targets(targets)
    if side_by_side is None:
        if len(out_dirs) > 1:
            raise UsageError(
                f"{len(out_dirs)} folders need --out DIR for the side-by-side table; with one folder compare "
                "writes into it"
            )
        show(run_compare(out_dirs[0], targets=parsed), as_json)
        return
    check_folders_out(out_dirs, side_by_side)  # before the folder is made
    folder = SweepDir(check_out_dir(side_by_side))
    show_folders(out_dirs, run_compare_folders(out_dirs, folder.path, targets=parsed), folder, as_json)


def show_folders(dirs: list[Path], cs: tuple[Comparison, ...], folder: SweepDir, as_json: bool) -> None:
    if as_json:
        doc = {
            "out": str(folder.path),
            "folders": [{"folder": str(d), **summary(c)} for d, c in zip(dirs, cs, strict=True)],
        }
        out.print_json(json.dumps(doc))
    else:
        render_folders(dirs, cs)
        out.print(f"wrote {folder.comparison} and {folder.ladder_plot}")
    failed = [str(d) for d, c in zip(dirs, cs, strict=True) if c.main.frontier is None]
    if failed:
        raise RunError(f"no B_crit at the sweep's own target for {', '.join(failed)}: see the notes above")


def render_folders(dirs: list[Path], cs: tuple[Comparison, ...]) -> None:
    """One table of every (folder, target), then each folder's warnings, notes and verdict."""
    t = Table(title="critical batch size by folder and target: measured B_crit vs the matching prediction (95%)")
    labels = folder_labels(dirs)
    for col in ("folder", "optimizer", "target", "B_crit", "prediction", "value", "ratio", "note"):
        left = col in ("folder", "optimizer", "prediction", "note")
        width = min(24, max(map(len, labels))) if col == "folder" else None  # the folder stays readable
        t.add_column(col, justify="left" if left else "right", no_wrap=col in ("optimizer", "prediction", "ratio"),
                     min_width=width)  # fmt: skip
    for d, c in zip(labels, cs, strict=True):
        for row, at in zip(comparison_rows(c), c.targets, strict=True):
            h = at.prediction
            t.add_row(
                str(d),
                c.optimizer,
                fmt(row["target_loss"], 4),
                f"{fmt(row['b_crit'])} [{fmt(row['b_crit_lo'])}, {fmt(row['b_crit_hi'])}]",
                c.label,
                f"{fmt(h.b_simple)} [{fmt(h.b_simple_lo)}, {fmt(h.b_simple_hi)}]",
                fmt(row["ratio"], 2),
                "not measured" if not at.measured else "own target" if at.own else "",
            )
    out.print(t)
    out.print("own target: the sweep's own target; not measured: S_min < 5 or no bend, B_crit is not a measurement")
    for d, c in zip(labels, cs, strict=True):
        for w in c.warnings:
            out.print(f"[bold yellow]warning[/] ({d}): {w}")
        for note in c.main.notes:
            out.print(f"note ({d}): {note}")
        if c.reading:
            out.print(f"note ({d}): {c.reading}")
        out.print(f"{d}: ", end="")
        render_verdict(c)


def show(c: Comparison, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary(c)))
    else:
        render(c)
    check(c)


def check(c: Comparison) -> None:
    """No fitted B_crit at the sweep's own target is a failure (exit 1), raised once the reasons are printed."""
    if c.main.frontier is None:
        raise RunError(f"no B_crit for {c.out.path if c.out else 'these trials'}: {c.main.notes[0]}")


def summary(c: Comparison) -> dict:
    return {
        "out": str(c.out.path) if c.out else None,
        "ladder": c.ladder.reason,
        "targets": [
            {
                "comparison": json_ready(row),
                "batch_sizes": json_ready(target_frontier_rows(t)),
                "notes": list(t.notes),
                "interval": json_ready(asdict(t.interval)),
            }
            for row, t in zip(comparison_rows(c), c.targets, strict=True)
        ],
        "statuses": c.statuses,
        "optimizer": c.optimizer,
        "predict_optimizer": c.predict_optimizer,
        "prediction": c.prediction,
        "warnings": list(c.warnings),
        "reading": c.reading,
        "schedule": json_ready(schedule_rows(c)),
    }


def render(c: Comparison) -> None:
    for w in c.warnings:
        out.print(f"[bold yellow]warning:[/] {w}")
    render_frontier(c)
    render_ladder(c)
    render_verdict(c)
    if c.reading:
        out.print(f"note: {c.reading}")
    render_schedule(c)
    for note in c.main.notes:
        out.print(f"note: {note}")
    if c.out is not None:
        wrote = f"{c.out.comparison}, {c.out.frontier}, " + (f"{c.out.schedule}, " if c.schedule else "")
        out.print(f"wrote {wrote}{c.out.plot} and {c.out.ladder_plot}")


def render_frontier(c: Comparison) -> None:
    m = c.main
    t = Table(title=f"{c.task}: steps to eval loss {m.target_loss:g} at the best lr (median over seeds)")
    for col in ("batch", "best lr", "steps", "examples", "seeds reached", "fit steps", "predicted steps", "note"):
        t.add_column(col, justify="right" if col != "note" else "left")
    for row in target_frontier_rows(m):
        note = "censored: not reached" if row["censored"] else ""
        if row["lr_edge"]:
            note = f"best lr on the {row['lr_edge']} edge of the grid"
        t.add_row(
            str(row["batch_size"]),
            fmt(row["best_lr"]),
            fmt(row["steps"], 4),
            fmt(row["examples"], 4),
            f"{row['seeds_reached']}/{row['seeds']}",
            fmt(row["fitted_steps"], 4),
            fmt(row["predicted_steps"], 4),
            note,
        )
    out.print(t)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(c.statuses.items()))
    out.print(f"trials: {counts}")


def _target_note(at) -> str:
    if not at.measured:
        return "not a measurement of B_crit (S_min < 5, or no bend)"
    return "sweep's target" if at.own else ""


def render_ladder(c: Comparison) -> None:
    name = c.label
    t = Table(title=f"critical batch size by target: measured B_crit vs predicted {name} (95% intervals)")
    for col in ("target loss", "B_crit", "S_min", name, f"{name} / B_crit", "note"):
        t.add_column(col, justify="right" if col != "note" else "left")
    for row, at in zip(comparison_rows(c), c.targets, strict=True):
        h = at.prediction
        t.add_row(
            fmt(row["target_loss"], 4),
            f"{fmt(row['b_crit'])} [{fmt(row['b_crit_lo'])}, {fmt(row['b_crit_hi'])}]",
            fmt(row["s_min"]),
            f"{fmt(h.b_simple)} [{fmt(h.b_simple_lo)}, {fmt(h.b_simple_hi)}]",
            fmt(row["ratio"], 2),
            _target_note(at),
        )
    out.print(t)
    out.print(f"targets: {c.ladder.reason}")


def render_schedule(c: Comparison) -> None:
    """The schedule trials beside the best fixed batch size using no more examples, per target and seed, and
    one line of steps ratios at the sweep's own target."""
    if not c.schedule:
        return
    t = Table(title="GNS schedule vs the best fixed batch size using no more examples (per seed, fixed at best lr)")
    cols = ("target loss", "seed", "steps", "examples", "batch at target", "fixed batch", "fixed steps")
    for col in (*cols, "fixed examples", "steps ratio", "examples ratio", "wall ratio"):
        t.add_column(col, justify="right")
    for r in c.schedule:
        t.add_row(
            fmt(r.target_loss, 4) + (" *" if r.sweep_target else ""),
            str(r.seed),
            fmt(r.steps, 4),
            fmt(r.examples, 4),
            str(r.batch_size_at_target) if r.batch_size_at_target is not None else "-",
            str(r.fixed_batch_size) if r.fixed_batch_size is not None else "none",
            fmt(r.fixed_steps, 4),
            fmt(r.fixed_examples, 4),
            fmt(r.steps_ratio, 2),
            fmt(r.examples_ratio, 2),
            fmt(r.wall_ratio, 2),
        )
    out.print(t)
    own = [r for r in c.schedule if r.sweep_target]
    ratios = sorted(r.steps_ratio for r in own if r.steps_ratio == r.steps_ratio)
    if ratios:
        out.print(
            f"[bold]schedule / best fixed steps = {ratios[len(ratios) // 2]:.2g}[/] (median; {ratios[0]:.2g} ... "
            f"{ratios[-1]:.2g} over {len(ratios)} of {len(own)} seeds) at the sweep's target (*)"
        )
    else:
        out.print("schedule: no seed has a fixed batch size to set beside it at the sweep's target (see the table)")


def render_verdict(c: Comparison) -> None:
    """One line over every target whose B_crit is a measurement."""
    ratios = [t.ratio(t.prediction.b_simple) for t in c.targets if t.measured]
    ratios = [r for r in ratios if r > 0]
    if not ratios:
        out.print("[bold]no target has a measured B_crit[/]: see the notes")
        return
    within = sum(0.5 <= r <= 2 for r in ratios)
    out.print(
        f"[bold]{c.label}/B_crit = {min(ratios):.2g} ... {max(ratios):.2g}[/] over {len(ratios)} targets "
        f"(within a factor 2 at {within} of {len(ratios)})"
    )
