"""`gns-sweep compare DIR`: the measured B_crit beside the predicted B_simple."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from gns_sweep_cli import options as o
from gns_sweep_cli.common import fmt, handle_errors, json_ready, out
from rich.table import Table

from gns_sweep.compare import Comparison, comparison_rows, run_compare, target_frontier_rows
from gns_sweep.errors import RunError


@handle_errors
def compare(
    out_dir: Annotated[Path, typer.Argument(help="Folder holding predict.parquet and trials.parquet.")],
    targets: o.Targets = None,
    as_json: o.AsJson = False,
) -> None:
    """Fit S = S_min + E_min/B at a ladder of targets, B_crit = E_min/S_min, and set each beside B_simple."""
    show(run_compare(out_dir, targets=o.parse_targets(targets)), as_json)


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
    }


def render(c: Comparison) -> None:
    render_frontier(c)
    render_ladder(c)
    render_verdict(c)
    for note in c.main.notes:
        out.print(f"note: {note}")
    if c.out is not None:
        out.print(f"wrote {c.out.comparison}, {c.out.frontier}, {c.out.plot} and {c.out.ladder_plot}")


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


def render_ladder(c: Comparison) -> None:
    t = Table(title="critical batch size by target: measured B_crit vs predicted B_simple (95% intervals)")
    for col in ("target loss", "B_crit", "S_min", "B_simple", "B_simple / B_crit", "note"):
        t.add_column(col, justify="right" if col != "note" else "left")
    for row, at in zip(comparison_rows(c), c.targets, strict=True):
        note = "sweep's target" if at.own else ""
        if not at.measured:
            note = "not a measurement of B_crit (S_min < 5, or no bend)"
        t.add_row(
            fmt(row["target_loss"], 4),
            f"{fmt(row['b_crit'])} [{fmt(row['b_crit_lo'])}, {fmt(row['b_crit_hi'])}]",
            fmt(row["s_min"]),
            f"{fmt(row['b_simple'])} [{fmt(row['b_simple_lo'])}, {fmt(row['b_simple_hi'])}]",
            fmt(row["ratio"], 2),
            note,
        )
    out.print(t)
    out.print(f"targets: {c.ladder.reason}")


def render_verdict(c: Comparison) -> None:
    """One line over every target whose B_crit is a measurement."""
    ratios = [t.ratio(t.prediction.b_simple) for t in c.targets if t.measured]
    ratios = [r for r in ratios if r > 0]
    if not ratios:
        out.print("[bold]no target has a measured B_crit[/]: see the notes")
        return
    within = sum(0.5 <= r <= 2 for r in ratios)
    out.print(
        f"[bold]B_simple/B_crit = {min(ratios):.2g} ... {max(ratios):.2g}[/] over {len(ratios)} targets "
        f"(within a factor 2 at {within} of {len(ratios)})"
    )
