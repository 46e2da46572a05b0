"""`compare`: fit the measured frontier to get B_crit and set it beside predict's B_simple."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gns_sweep import __version__
from gns_sweep import frontier as fr
from gns_sweep.errors import UsageError
from gns_sweep.plot import FrontierPlot, plot_frontier
from gns_sweep.results import TOTAL, ScopeRow, headline
from gns_sweep.storage import (
    COMPARISON_SCHEMA,
    FRONTIER_SCHEMA,
    PREDICT_SCHEMA,
    TRIALS_SCHEMA,
    SweepDir,
    read_result,
    write_table,
)

BOOTSTRAP_RESAMPLES = 500


@dataclass(frozen=True)
class Prediction:
    """B_simple from predict.parquet (scope total)."""

    start: float  # at the first checkpoint
    run: float  # tr(Sigma) and |G|^2 averaged over every checkpoint, then divided
    target: float  # the same over the last quarter of checkpoints (near the target): the headline
    batch_size: int  # reference run's batch size
    eval_loss: float  # eval loss at the last checkpoint


@dataclass(frozen=True)
class Comparison:
    task: str
    target_loss: float  # the sweep's target
    budget_examples: int
    points: tuple[fr.BatchPoint, ...]  # per batch size, at its best lr
    seed_points: tuple[tuple[int, float], ...]  # (batch size, steps) of each seed at the best lr
    frontier: fr.Frontier | None  # None when fewer than 2 batch sizes reached the target
    interval: fr.Interval  # bootstrap over seeds
    prediction: Prediction
    statuses: dict[str, int]  # trials per status
    notes: tuple[str, ...]  # what a reader must know before trusting the numbers
    out: SweepDir | None = None  # where it was read and written

    @property
    def b_crit(self) -> float:
        return self.frontier.b_crit if self.frontier else math.nan

    def ratio(self, b_simple: float) -> float:
        return b_simple / self.b_crit if self.frontier and self.b_crit > 0 else math.nan

    @property
    def censored(self) -> tuple[int, ...]:
        return tuple(p.batch_size for p in self.points if p.censored)

    @property
    def lr_edges(self) -> tuple[int, ...]:
        return tuple(p.batch_size for p in self.points if p.lr_edge)


def read_inputs(out: SweepDir) -> tuple[list[dict], list[dict]]:
    """predict rows and trial rows; a missing piece names the command that makes it."""
    d = out.path
    if not d.is_dir():
        raise UsageError(f"{d} is not a folder; give the --out folder of `gns-sweep run` (or of predict and empirical)")
    if not out.predict.exists():
        raise UsageError(f"{d} has no {out.predict.name}; run `gns-sweep predict --task TASK --out {d}` first")
    if not out.trials.exists():
        hint = "--resume " if out.plan.exists() else ""
        raise UsageError(f"{d} has no {out.trials.name}; run `gns-sweep empirical --task TASK {hint}--out {d}` first")
    predict_rows = read_result(
        out.predict, PREDICT_SCHEMA, f"run `gns-sweep predict --task TASK --out {d} --overwrite` again"
    )
    trial_rows = read_result(
        out.trials, TRIALS_SCHEMA, f"run `gns-sweep empirical --task TASK --resume --out {d}` again"
    )
    if not trial_rows:
        raise UsageError(f"{out.trials} holds no trials; run `gns-sweep empirical --resume --out {d}`")
    tasks = {r["task"] for r in predict_rows} | {r["task"] for r in trial_rows}
    if len(tasks) > 1:
        raise UsageError(
            f"{d} mixes tasks {sorted(tasks)} between {out.predict.name} and {out.trials.name}; "
            "rerun predict or empirical for one task"
        )
    return predict_rows, trial_rows


def prediction(predict_rows: Sequence[dict]) -> Prediction:
    rows = [ScopeRow(**r) for r in predict_rows]
    h = headline(rows)
    total = sorted((r for r in rows if r.scope == TOTAL), key=lambda r: r.checkpoint)
    batch = total[-1].examples_seen // max(total[-1].step, 1) if total[-1].step else 0
    return Prediction(h.b_simple_start, h.b_simple_run, h.b_simple_window, int(batch), total[-1].eval_loss)


def compare_trials(trial_rows: Sequence[dict], pred: Prediction, *, resamples: int = BOOTSTRAP_RESAMPLES) -> Comparison:
    """Pure part of compare: best lr per batch size, the fit, the bootstrap, the notes."""
    rows = list(trial_rows)
    bs = np.array([r["batch_size"] for r in rows])
    lrs = np.array([r["lr"] for r in rows], dtype=float)
    seeds = np.array([r["seed"] for r in rows])
    steps = np.array([math.nan if r["steps_to_target"] is None else r["steps_to_target"] for r in rows], dtype=float)
    points = fr.batch_points(bs, lrs, seeds, steps)
    seed_points = tuple(
        (p.batch_size, float(s))
        for p in points
        if not p.censored
        for s in steps[(bs == p.batch_size) & (lrs == p.best_lr)]
        if math.isfinite(s)
    )
    notes = []
    try:
        fit = fr.fit_points(points)
    except fr.FitError as exc:
        fit = None
        notes.append(f"{exc}: lower the target or raise --budget-examples")
    interval = (
        fr.bootstrap_b_crit(bs, lrs, seeds, steps, resamples=resamples)
        if fit
        else fr.Interval(math.nan, math.nan, 0, 0)
    )
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return Comparison(
        task=rows[0]["task"],
        target_loss=float(rows[0]["target_loss"]),
        budget_examples=int(rows[0]["budget_examples"]),
        points=points,
        seed_points=seed_points,
        frontier=fit,
        interval=interval,
        prediction=pred,
        statuses=statuses,
        notes=tuple(notes + _notes(points, fit, n_seeds=len(set(seeds.tolist())))),
    )


def _notes(points: Sequence[fr.BatchPoint], fit: fr.Frontier | None, *, n_seeds: int) -> list[str]:
    """What a reader must know before trusting the fit."""
    notes = []
    censored = [p.batch_size for p in points if p.censored]
    if censored:
        notes.append(f"batch sizes {_join(censored)} never reached the target in most seeds: censored, not fitted")
    edges = [f"{p.batch_size} ({p.lr_edge})" for p in points if p.lr_edge]
    if edges:
        notes.append(f"best lr on the edge of the grid at batch sizes {', '.join(edges)}: widen --lrs there")
    if fit and fit.at_bound:
        notes.append("the measured steps do not bend inside the batch-size grid: B_crit is only a bound")
    if fit and fit.s_min < 10:
        notes.append(f"S_min = {fit.s_min:.3g} steps: the target is nearly trivial at large batch; tighten it")
    if n_seeds < 2:
        notes.append("one seed only: no bootstrap interval")
    return notes


def _join(values: Sequence) -> str:
    return ",".join(str(v) for v in values)


def settings(out_dir: Path) -> dict:
    return {"command": "compare", "version": __version__, "dir": str(out_dir)}


def comparison_row(c: Comparison) -> dict:
    f, p = c.frontier, c.prediction
    nan = math.nan
    ratio = c.ratio(p.target)
    return {
        "task": c.task,
        "target_loss": c.target_loss,
        "b_crit": c.b_crit,
        "b_crit_lo": c.interval.lo,
        "b_crit_hi": c.interval.hi,
        "s_min": f.s_min if f else nan,
        "e_min": f.e_min if f else nan,
        "fit_points": f.n_points if f else 0,
        "fit_rms_log": f.rms_log if f else nan,
        "b_crit_at_bound": bool(f.at_bound) if f else False,
        "censored_batch_sizes": _join(c.censored),
        "lr_edge_batch_sizes": _join(c.lr_edges),
        "b_simple_start": p.start,
        "b_simple_avg": p.run,
        "b_simple_target": p.target,
        "ratio": ratio,
        "log10_ratio": math.log10(ratio) if ratio > 0 else nan,
        "ratio_avg": c.ratio(p.run),
        "ratio_start": c.ratio(p.start),
        "reference_batch_size": p.batch_size,
        "reference_eval_loss": p.eval_loss,
    }


def frontier_rows(c: Comparison) -> list[dict]:
    out = []
    for pt in c.points:
        fitted = predicted = math.nan
        if c.frontier:
            fitted = float(fr.frontier_steps(c.frontier.s_min, c.frontier.b_crit, pt.batch_size))
            if c.prediction.target > 0:
                predicted = float(fr.frontier_steps(c.frontier.s_min, c.prediction.target, pt.batch_size))
        out.append(
            {
                "batch_size": pt.batch_size,
                "best_lr": pt.best_lr,
                "lr_edge": pt.lr_edge,
                "steps": pt.steps,
                "examples": pt.examples,
                "seeds_reached": pt.seeds_reached,
                "seeds": pt.seeds,
                "censored": pt.censored,
                "fitted_steps": fitted,
                "predicted_steps": predicted,
            }
        )
    return out


def plot_data(c: Comparison) -> FrontierPlot:
    """What comparison.png shows, as plain numbers."""
    f = c.frontier
    return FrontierPlot(
        title=f"{c.task}: eval loss {c.target_loss:g}, best lr per batch size",
        measured=tuple((p.batch_size, p.examples, p.steps) for p in c.points if not p.censored),
        seed_points=c.seed_points,
        censored=c.censored,
        budget_examples=c.budget_examples,
        s_min=f.s_min if f else math.nan,
        b_crit=f.b_crit if f else math.nan,
        b_crit_interval=(c.interval.lo, c.interval.hi),
        b_simple=c.prediction.target,
    )


def run_compare(out_dir: Path, *, plot: bool = True, resamples: int = BOOTSTRAP_RESAMPLES) -> Comparison:
    """Read DIR, compare, write comparison.parquet, frontier.parquet and comparison.png."""
    out = SweepDir(out_dir)
    predict_rows, trial_rows = read_inputs(out)
    c = compare_trials(trial_rows, prediction(predict_rows), resamples=resamples)
    c = replace(c, out=out)
    sets = settings(out.path)
    write_table(out.comparison, [comparison_row(c)], COMPARISON_SCHEMA, sets)
    write_table(out.frontier, frontier_rows(c), FRONTIER_SCHEMA, sets)
    if plot:
        plot_frontier(plot_data(c), out.plot)
    return c
