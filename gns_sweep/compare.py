"""`compare`: fit the measured frontier to get B_crit and set it beside predict's B_simple."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gns_sweep import __version__
from gns_sweep import frontier as fr
from gns_sweep.errors import UsageError
from gns_sweep.predict import ScopeRow, headline
from gns_sweep.storage import (
    COMPARISON_FILE,
    COMPARISON_PLOT,
    COMPARISON_SCHEMA,
    FRONTIER_FILE,
    FRONTIER_SCHEMA,
    PLAN_FILE,
    PREDICT_FILE,
    PREDICT_SCHEMA,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    read_result,
    read_settings,
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
    out_dir: Path | None = None

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


def read_inputs(out_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """predict rows, trial rows, sweep settings; a missing piece names the command that makes it."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(
            f"{out_dir} is not a folder; give the --out folder of `gns-sweep run` (or of predict and empirical)"
        )
    if not (out_dir / PREDICT_FILE).exists():
        raise UsageError(f"{out_dir} has no {PREDICT_FILE}; run `gns-sweep predict --task TASK --out {out_dir}` first")
    if not (out_dir / TRIALS_FILE).exists():
        hint = "--resume " if (out_dir / PLAN_FILE).exists() else ""
        raise UsageError(
            f"{out_dir} has no {TRIALS_FILE}; run `gns-sweep empirical --task TASK {hint}--out {out_dir}` first"
        )
    predict_rows = read_result(
        out_dir / PREDICT_FILE, PREDICT_SCHEMA, f"run `gns-sweep predict --task TASK --out {out_dir} --overwrite` again"
    )
    trial_rows = read_result(
        out_dir / TRIALS_FILE, TRIALS_SCHEMA, f"run `gns-sweep empirical --task TASK --resume --out {out_dir}` again"
    )
    if not trial_rows:
        raise UsageError(f"{out_dir / TRIALS_FILE} holds no trials; run `gns-sweep empirical --resume --out {out_dir}`")
    sweep = read_settings(out_dir / TRIALS_FILE) or {}
    tasks = {r["task"] for r in predict_rows} | {r["task"] for r in trial_rows}
    if len(tasks) > 1:
        raise UsageError(
            f"{out_dir} mixes tasks {sorted(tasks)} between {PREDICT_FILE} and {TRIALS_FILE}; "
            "rerun predict or empirical for one task"
        )
    return predict_rows, trial_rows, sweep


def prediction(predict_rows: Sequence[dict]) -> Prediction:
    rows = [ScopeRow(**r) for r in predict_rows]
    h = headline(rows)
    total = sorted((r for r in rows if r.scope == "total"), key=lambda r: r.checkpoint)
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
    if len(set(seeds.tolist())) < 2:
        notes.append("one seed only: no bootstrap interval")
    target = float(rows[0]["target_loss"])
    return Comparison(
        task=rows[0]["task"],
        target_loss=target,
        budget_examples=int(rows[0]["budget_examples"]),
        points=points,
        seed_points=seed_points,
        frontier=fit,
        interval=interval,
        prediction=pred,
        statuses=statuses,
        notes=tuple(notes),
    )


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


def run_compare(out_dir: Path, *, plot: bool = True, resamples: int = BOOTSTRAP_RESAMPLES) -> Comparison:
    """Read DIR, compare, write comparison.parquet, frontier.parquet and comparison.png."""
    out_dir = Path(out_dir)
    predict_rows, trial_rows, _ = read_inputs(out_dir)
    c = compare_trials(trial_rows, prediction(predict_rows), resamples=resamples)
    c = Comparison(**{**c.__dict__, "out_dir": out_dir})
    sets = settings(out_dir)
    write_table(out_dir / COMPARISON_FILE, [comparison_row(c)], COMPARISON_SCHEMA, sets)
    write_table(out_dir / FRONTIER_FILE, frontier_rows(c), FRONTIER_SCHEMA, sets)
    if plot:
        from gns_sweep.plot import plot_comparison

        plot_comparison(c, out_dir / COMPARISON_PLOT)
    return c
