"""`gns-sweep compare DIR`: the measured B_crit beside the predicted B_simple."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from gns_sweep_cli import options as o
from gns_sweep_cli.common import fmt, handle_errors, json_ready, out
from rich.table import Table

from gns_sweep.compare import Comparison, comparison_row, frontier_rows, run_compare
from gns_sweep.errors import RunError


@handle_errors
def compare(
    out_dir: Annotated[Path, typer.Argument(help="Folder holding predict.parquet and trials.parquet.")],
    as_json: o.AsJson = False,
) -> None:
    """Fit S = S_min + E_min/B to the sweep, B_crit = E_min/S_min, and set it beside B_simple."""
    show(run_compare(out_dir), as_json)


def show(c: Comparison, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary(c)))
    else:
        render(c)
    check(c)


def check(c: Comparison) -> None:
    """No fitted B_crit is a failure (exit 1), raised once the reasons are printed."""
    if c.frontier is None:
        raise RunError(f"no B_crit for {c.out.path if c.out else 'these trials'}: {c.notes[0]}")


def summary(c: Comparison) -> dict:
    return {
        "out": str(c.out.path) if c.out else None,
        "comparison": {k: json_ready(v) for k, v in comparison_row(c).items()},
        "batch_sizes": [{k: json_ready(v) for k, v in row.items()} for row in frontier_rows(c)],
        "statuses": c.statuses,
        "notes": list(c.notes),
        "interval": {k: json_ready(v) for k, v in asdict(c.interval).items()},
    }


def render(c: Comparison) -> None:
    render_frontier(c)
    render_verdict(c)
    for note in c.notes:
        out.print(f"note: {note}")
    if c.out is not None:
        out.print(f"wrote {c.out.comparison}, {c.out.frontier} and {c.out.plot}")


def render_frontier(c: Comparison) -> None:
    t = Table(title=f"{c.task}: steps to eval loss {c.target_loss:g} at the best lr (median over seeds)")
    for col in ("batch", "best lr", "steps", "examples", "seeds reached", "fit steps", "predicted steps", "note"):
        t.add_column(col, justify="right" if col != "note" else "left")
    for row in frontier_rows(c):
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


def render_verdict(c: Comparison) -> None:
    r = comparison_row(c)
    t = Table(title="critical batch size: measured vs predicted")
    for col in ("quantity", "value", "B_simple / B_crit", "log10"):
        t.add_column(col, justify="right" if col != "quantity" else "left")
    interval = f" [{fmt(r['b_crit_lo'])}, {fmt(r['b_crit_hi'])}]" if math.isfinite(r["b_crit_lo"]) else ""
    bound = " (bound: no bend in grid)" if r["b_crit_at_bound"] else ""
    t.add_row("B_crit = E_min/S_min (95% bootstrap over seeds)", f"{fmt(r['b_crit'])}{interval}{bound}", "", "")
    t.add_row("  S_min (steps) / E_min (examples)", f"{fmt(r['s_min'])} / {fmt(r['e_min'])}", "", "")
    for label, key, ratio in (
        ("B_simple near the target (headline)", "b_simple_target", "ratio"),
        ("B_simple averaged over the reference run", "b_simple_avg", "ratio_avg"),
        ("B_simple at the start", "b_simple_start", "ratio_start"),
    ):
        value = r[ratio]
        t.add_row(label, fmt(r[key]), fmt(value, 2), fmt(math.log10(value), 2) if value > 0 else "-")
    out.print(t)
    ratio = r["ratio"]
    if ratio > 0:
        verdict = "within a factor 2" if 0.5 <= ratio <= 2 else f"off by {max(ratio, 1 / ratio):.2g}x"
        out.print(f"[bold]B_simple/B_crit = {ratio:.2g}[/] ({verdict})")
