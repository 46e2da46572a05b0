"""`compare`: fit the measured frontier to get B_crit at a ladder of targets, and set each beside
predict's B_simple averaged over the reference run up to the same loss.

The prediction matches the sweep's optimizer: for an adaptive one (Adam, AdamW) it is the noise
scale in the optimizer's preconditioned geometry, tr(P Sigma)/G'PG, else B_simple. Several
results folders (one per optimizer, say) can be set side by side (`run_compare_folders`).

Only fixed-batch trials are fitted. A sweep's schedule trials (the batch follows the noise scale) are
set beside, per target and seed, the best fixed batch size that uses no more examples (`schedule_vs_fixed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gns_sweep import __version__
from gns_sweep import frontier as fr
from gns_sweep import ladder as ld
from gns_sweep.errors import UsageError
from gns_sweep.plot import FolderSeries, FoldersPlot, FrontierPlot, LadderPlot, plot_folders, plot_frontier, plot_ladder
from gns_sweep.results import SGD, Headline, headline, scope_row, total_rows
from gns_sweep.storage import (
    COMPARISON_SCHEMA,
    CURVES_SCHEMA,
    FRONTIER_SCHEMA,
    PREDICT_SCHEMA,
    SCHEDULE_SCHEMA,
    TRIALS_SCHEMA,
    SweepDir,
    read_result,
    write_table,
)
from gns_sweep.storage.schemas import FOLDERS_COMPARISON_SCHEMA

BOOTSTRAP_RESAMPLES = 500
FAILED = "failed"  # status of a trial whose own code raised: recorded, never fitted
FIXED = "fixed"  # trials.parquet's schedule of a fixed-batch trial (null in a file from before the column)
GNS = "gns"  # ... of a trial whose batch followed the noise scale: never fitted, set beside the best fixed one
PLAIN = "b_simple"  # the prediction for a sweep with a non-adaptive optimizer
PRECOND = "b_simple_precond"  # the prediction for a sweep with an adaptive one: the preconditioned noise scale
LABELS = {PLAIN: "B_simple", PRECOND: "B_simple^P"}  # how tables and plots name them
ADAPTIVE = frozenset({"adam", "adamw"})  # optimizers with a per-parameter preconditioner (1/(sqrt(v_hat)+eps))


@dataclass(frozen=True)
class AtTarget:
    """B_crit measured at one target loss, beside B_simple from the reference run up to that loss."""

    target_loss: float
    own: bool  # the sweep's own target (the trials stopped there)
    points: tuple[fr.BatchPoint, ...]  # per batch size, at its best lr
    seed_points: tuple[tuple[int, float], ...]  # (batch size, steps) of each seed at the best lr
    frontier: fr.Frontier | None  # None when fewer than 2 batch sizes reached the target
    interval: fr.Interval  # bootstrap over seeds
    prediction: Headline  # the matching prediction averaged from the start of the reference run to this loss
    notes: tuple[str, ...]  # what a reader must know before trusting the numbers
    plain: Headline | None = None  # B_simple up to this loss (None: the prediction is B_simple)
    precond: Headline | None = None  # tr(P Sigma)/G'PG up to this loss (None: predict's optimizer is not adaptive)

    @property
    def b_crit(self) -> float:
        return self.frontier.b_crit if self.frontier else math.nan

    @property
    def measured(self) -> bool:
        """The frontier has two ends: B_crit here is a measurement, not a bound or a guess."""
        return ld.measurable(self.frontier, self.points)

    def ratio(self, b_simple: float) -> float:
        return b_simple / self.b_crit if self.frontier and self.b_crit > 0 else math.nan

    @property
    def censored(self) -> tuple[int, ...]:
        return tuple(p.batch_size for p in self.points if p.censored)

    @property
    def lr_edges(self) -> tuple[int, ...]:
        return tuple(p.batch_size for p in self.points if p.lr_edge)


@dataclass(frozen=True)
class Comparison:
    task: str
    budget_examples: int
    statuses: dict[str, int]  # trials per status
    targets: tuple[AtTarget, ...]  # easiest (highest loss) first; the sweep's own is among them
    ladder: ld.Ladder  # how the targets were chosen
    reference_batch_size: int  # predict's reference run
    reference_eval_loss: float  # eval loss at predict's last checkpoint
    out: SweepDir | None = None  # where it was read and written
    optimizer: str = SGD  # the sweep's
    predict_optimizer: str = SGD  # predict's reference run's
    prediction: str = PLAIN  # which noise scale the ratios use: PLAIN or PRECOND
    warnings: tuple[str, ...] = ()  # the optimizers of the sweep and of predict differ
    reading: str | None = None  # how to read the ratio for the sweep's optimizer (optimizer_reading)
    schedule: tuple[ScheduleVsFixed, ...] = ()  # per (target, seed), easiest target first; () without schedule trials

    @property
    def label(self) -> str:
        """The prediction's name in tables and plots."""
        return LABELS[self.prediction]

    @property
    def main(self) -> AtTarget:
        """The sweep's own target (else the hardest judged)."""
        return next((t for t in self.targets if t.own), self.targets[-1])


def read_inputs(out: SweepDir) -> tuple[list[dict], list[dict], list[dict]]:
    """predict rows, trial rows and curve points; a missing piece names the command that makes it."""
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
    if not out.curves.exists():
        raise UsageError(f"{d} has no {out.curves.name}; run `gns-sweep empirical --task TASK --resume --out {d}`")
    curve_rows = read_result(out.curves, CURVES_SCHEMA, f"run `gns-sweep empirical --task TASK --resume --out {d}`")
    tasks = {r["task"] for r in predict_rows} | {r["task"] for r in trial_rows}
    if len(tasks) > 1:
        raise UsageError(
            f"{d} mixes tasks {sorted(tasks)} between {out.predict.name} and {out.trials.name}; "
            "rerun predict or empirical for one task"
        )
    return predict_rows, trial_rows, curve_rows


def compare(
    trial_rows: Sequence[dict],
    curve_rows: Sequence[dict],
    predict_rows: Sequence[dict],
    *,
    targets: Sequence[float] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Comparison:
    """Pure part of compare: the ladder of targets, and at each the fit, its bootstrap and the prediction
    that matches the sweep's optimizer."""
    rows = [scope_row(r) for r in predict_rows]
    total = total_rows(rows)
    ran = [r for r in trial_rows if r["status"] != FAILED]  # a crashed trial measured nothing: not a censored one
    if not ran:
        raise UsageError(f"every trial failed ({len(trial_rows)}); fix the cause and rerun empirical with --resume")
    fixed = [r for r in ran if (r.get("schedule") or FIXED) == FIXED]
    scheduled = [r for r in ran if r.get("schedule") == GNS]
    if not fixed:
        raise UsageError("no fixed-batch trial ran to fit the frontier; rerun empirical with --resume")
    trials = ld.trials_from_rows(fixed, curve_rows)
    own = float(trial_rows[0]["target_loss"])
    ladder = ld.default_ladder(trials, own) if targets is None else _chosen(targets, own)
    judged = sorted(set(ladder.targets) | {own}, reverse=True)  # the sweep's own target is always judged
    statuses: dict[str, int] = {}
    for r in trial_rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    last = total[-1]
    swept, predicted = sweep_optimizer(trial_rows), last.optimizer
    has_precond = any(math.isfinite(r.trace_sigma_precond) for r in total)
    prediction, warnings = matching_prediction(swept, predicted, has_precond=has_precond)
    at = []
    for t in judged:
        plain = headline(rows, until_loss=t)
        precond = headline(rows, until_loss=t, preconditioned=True) if has_precond else None
        chosen = precond if prediction == PRECOND else plain
        at.append(at_target(trials, t, chosen, own=t == own, resamples=resamples, plain=plain, precond=precond))
    return Comparison(
        task=trial_rows[0]["task"],
        budget_examples=int(trial_rows[0]["budget_examples"]),
        statuses=statuses,
        targets=tuple(at),
        ladder=ladder,
        reference_batch_size=int(last.examples_seen // last.step) if last.step else 0,
        reference_eval_loss=last.eval_loss,
        optimizer=swept,
        predict_optimizer=predicted,
        prediction=prediction,
        warnings=warnings,
        reading=optimizer_reading(swept),
        schedule=tuple(
            row
            for t in at
            for row in schedule_vs_fixed(t, trials, fixed, scheduled, curve_rows, task=trial_rows[0]["task"])
        ),
    )


@dataclass(frozen=True)
class ScheduleVsFixed:
    """One schedule trial at one target beside the best fixed batch size using no more examples (a row of
    schedule.parquet: SCHEDULE_SCHEMA says what each field is)."""

    task: str
    target_loss: float
    sweep_target: bool
    seed: int
    trial_id: str
    reached: bool
    steps: float
    examples: float
    wall_seconds: float
    batch_size_at_target: int | None
    fixed_batch_size: int | None
    fixed_lr: float
    fixed_steps: float
    fixed_examples: float
    fixed_wall_seconds: float
    steps_ratio: float
    examples_ratio: float
    wall_ratio: float


def schedule_vs_fixed(
    t: AtTarget,
    trials: ld.Trials,
    fixed: Sequence[dict],
    scheduled: Sequence[dict],
    curve_rows: Sequence[dict],
    *,
    task: str,
) -> list[ScheduleVsFixed]:
    """Each schedule trial at target t beside, for its seed, the fixed batch size (at its best lr at t) with the
    fewest steps to t among those whose examples to t are no more than the schedule's.

    Wall time to a target is the trial's wall time times the share of its examples used by then (the work of
    a step is its examples; exact at the sweep's own target, where the trials stopped)."""
    if not scheduled:
        return []
    nan = math.nan
    points: dict[str, list[tuple[int, int, int, float]]] = {r["trial_id"]: [] for r in scheduled}
    for p in curve_rows:
        if p["trial_id"] in points:
            points[p["trial_id"]].append((p["step"], p["examples"], p["batch_size"], p["eval_loss"]))
    steps = trials.steps_to(t.target_loss)  # (N,) aligned with `fixed`
    best_lr = {p.batch_size: p.best_lr for p in t.points if not p.censored}
    out = []
    for r in sorted(scheduled, key=lambda r: r["seed"]):
        curve = sorted(points[r["trial_id"]])
        hit = next((c for c in curve if c[3] <= t.target_loss), None)
        total = curve[-1][1] if curve else 0
        s_steps, s_examples = (float(hit[0]), float(hit[1])) if hit else (nan, nan)
        s_wall = r["wall_seconds"] * (hit[1] / total if total else 1.0) if hit else nan
        candidates = []  # (steps, examples, batch size, lr, wall) of this seed at each batch size's best lr
        for i, f in enumerate(fixed):
            b = f["batch_size"]
            if f["seed"] != r["seed"] or best_lr.get(b) != f["lr"] or not math.isfinite(steps[i]):
                continue
            wall = f["wall_seconds"] * (steps[i] / f["steps"] if f["steps"] else 1.0)
            candidates.append((float(steps[i]), float(steps[i] * b), b, f["lr"], wall))
        within = [c for c in candidates if hit and c[1] <= s_examples]
        best = min(within, default=None)  # fewest steps, then fewest examples
        fs, fe, fb, flr, fw = best if best else (nan, nan, None, nan, nan)
        out.append(
            ScheduleVsFixed(
                task=task,
                target_loss=t.target_loss,
                sweep_target=t.own,
                seed=int(r["seed"]),
                trial_id=r["trial_id"],
                reached=hit is not None,
                steps=s_steps,
                examples=s_examples,
                wall_seconds=s_wall,
                batch_size_at_target=int(hit[2]) if hit else None,
                fixed_batch_size=fb,
                fixed_lr=flr,
                fixed_steps=fs,
                fixed_examples=fe,
                fixed_wall_seconds=fw,
                steps_ratio=_ratio(s_steps, fs),
                examples_ratio=_ratio(s_examples, fe),
                wall_ratio=_ratio(s_wall, fw),
            )
        )
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def schedule_rows(c: Comparison) -> list[dict]:
    """schedule.parquet: one row per (target, schedule trial)."""
    return [asdict(row) for row in c.schedule]


def sweep_optimizer(trial_rows: Sequence[dict]) -> str:
    """The optimizer of the sweep's trials (SGD for a file from before the column); one per results folder."""
    names = sorted({r.get("optimizer") or SGD for r in trial_rows})
    if len(names) > 1:
        raise UsageError(
            f"the trials mix optimizers {', '.join(names)}; a results folder holds one optimizer's sweep: "
            "sweep each into its own --out and compare the folders side by side"
        )
    return names[0]


def matching_prediction(swept: str, predicted: str, *, has_precond: bool) -> tuple[str, tuple[str, ...]]:
    """(which noise scale to set beside B_crit, warnings). An adaptive sweep is judged by the
    preconditioned noise scale when predict measured one; optimizers that differ are warned about,
    not refused, so that folders of different optimizers can still be set side by side."""
    rerun = f"rerun predict with --optimizer {swept} for the matching prediction"
    if swept in ADAPTIVE and has_precond:
        if predicted == swept:
            return PRECOND, ()
        return PRECOND, (
            f"the sweep trained with {swept} but predict's reference run with {predicted}: the preconditioned noise "
            f"scale comes from {predicted}'s run; {rerun}",
        )
    if swept in ADAPTIVE:
        return PLAIN, (
            f"the sweep trained with {swept} but predict's reference run with {predicted}, which has no "
            f"preconditioner: plain B_simple stands in for the preconditioned noise scale; {rerun}",
        )
    if predicted != swept:
        return PLAIN, (
            f"the sweep trained with {swept} but predict's reference run with {predicted}: B_simple was measured "
            f"along another optimizer's path; {rerun}",
        )
    return PLAIN, ()


def optimizer_reading(swept: str) -> str | None:
    """What the sweep's optimizer does to the ratio, where B_simple is known to miss it (docs/optimizers.md)."""
    if swept == "momentum":
        return (
            "momentum can reach a target in fewer steps at large batches where curvature, not noise, limits them, "
            "which raises B_crit and which B_simple does not see: read B_simple as a lower estimate "
            "(docs/optimizers.md, Momentum and the comparison)"
        )
    if swept == "lars":
        return (
            "LARS rescales each layer's step by trust * |w| / |g|, which B_simple does not describe; no matching "
            "prediction is claimed for it (docs/optimizers.md)"
        )
    return None


def _chosen(targets: Sequence[float], own: float) -> ld.Ladder:
    harder = [t for t in targets if t < own]
    if harder:
        raise UsageError(
            f"--targets {harder[0]:g} is below the sweep's target {own:g}, where its trials stopped; choose targets "
            f">= {own:g}, or run the sweep again with --target-loss {min(harder):g}"
        )
    return ld.Ladder(tuple(sorted(set(targets), reverse=True)), "chosen with --targets")


def at_target(
    trials: ld.Trials,
    target: float,
    prediction: Headline,
    *,
    own: bool,
    resamples: int = BOOTSTRAP_RESAMPLES,
    plain: Headline | None = None,
    precond: Headline | None = None,
) -> AtTarget:
    """Best lr per batch size at this target, the fit, the bootstrap over seeds, the notes."""
    steps = trials.steps_to(target)
    bs, lrs, seeds = trials.batch_size, trials.lr, trials.seed
    points, fit = ld.fit_at(trials, target)
    seed_points = tuple(
        (p.batch_size, float(s))
        for p in points
        if not p.censored
        for s in steps[(bs == p.batch_size) & (lrs == p.best_lr)]
        if math.isfinite(s)
    )
    notes = []
    if fit is None:
        notes.append("fewer than 2 batch sizes reached the target: lower the target or raise --budget-examples")
    interval = (
        fr.bootstrap_b_crit(bs, lrs, seeds, steps, resamples=resamples)
        if fit
        else fr.Interval(math.nan, math.nan, 0, 0)
    )
    if not prediction.reached:
        notes.append("predict's reference run never reached this loss: the prediction is averaged over all of it")
    return AtTarget(
        target_loss=float(target),
        own=own,
        points=points,
        seed_points=seed_points,
        frontier=fit,
        interval=interval,
        prediction=prediction,
        notes=tuple(notes + _notes(points, fit, n_seeds=len(set(seeds.tolist())))),
        plain=plain,
        precond=precond,
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
    if fit and fit.s_min < ld.MEASURABLE_S_MIN:
        notes.append(
            f"S_min = {fit.s_min:.3g} steps: the largest batches need almost no steps, so this is not a measurement "
            "of B_crit; judge a harder target"
        )
    if n_seeds < 2:
        notes.append("one seed only: no bootstrap interval")
    return notes


def _join(values: Sequence) -> str:
    return ",".join(str(v) for v in values)


def settings(out_dir: Path) -> dict:
    return {"command": "compare", "version": __version__, "dir": str(out_dir)}


def comparison_rows(c: Comparison) -> list[dict]:
    """comparison.parquet: one row per target judged."""
    return [_comparison_row(c, t) for t in c.targets]


def _comparison_row(c: Comparison, t: AtTarget) -> dict:
    f, h = t.frontier, t.prediction
    b = t.plain or h  # plain B_simple: the prediction itself unless that is another noise scale
    nan = math.nan
    ratio = t.ratio(h.b_simple)
    p = t.precond
    return {
        "task": c.task,
        "target_loss": t.target_loss,
        "sweep_target": t.own,
        "b_crit": t.b_crit,
        "b_crit_lo": t.interval.lo,
        "b_crit_hi": t.interval.hi,
        "b_crit_measured": t.measured,
        "s_min": f.s_min if f else nan,
        "e_min": f.e_min if f else nan,
        "fit_points": f.n_points if f else 0,
        "fit_rms_log": f.rms_log if f else nan,
        "b_crit_at_bound": bool(f.at_bound) if f else False,
        "censored_batch_sizes": _join(t.censored),
        "lr_edge_batch_sizes": _join(t.lr_edges),
        "b_simple": b.b_simple,
        "b_simple_lo": b.b_simple_lo,
        "b_simple_hi": b.b_simple_hi,
        "b_simple_late": b.b_simple_late,
        "b_simple_start": b.b_simple_start,
        "b_simple_checkpoints": h.checkpoints,
        "reference_reached": h.reached,
        "b_simple_precond": p.b_simple if p else nan,
        "b_simple_precond_lo": p.b_simple_lo if p else nan,
        "b_simple_precond_hi": p.b_simple_hi if p else nan,
        "b_simple_precond_late": p.b_simple_late if p else nan,
        "b_simple_precond_start": p.b_simple_start if p else nan,
        "optimizer": c.optimizer,
        "predict_optimizer": c.predict_optimizer,
        "prediction": c.prediction,
        "ratio": ratio,
        "log10_ratio": math.log10(ratio) if ratio > 0 else nan,
        "ratio_late": t.ratio(h.b_simple_late),
        "ratio_start": t.ratio(h.b_simple_start),
        "reference_batch_size": c.reference_batch_size,
        "reference_eval_loss": c.reference_eval_loss,
    }


def frontier_rows(c: Comparison) -> list[dict]:
    """frontier.parquet: one row per (target, batch size)."""
    return [row for t in c.targets for row in target_frontier_rows(t)]


def target_frontier_rows(t: AtTarget) -> list[dict]:
    out = []
    for pt in t.points:
        fitted = predicted = math.nan
        if t.frontier:
            fitted = float(fr.frontier_steps(t.frontier.s_min, t.frontier.b_crit, pt.batch_size))
            if t.prediction.b_simple > 0:
                predicted = float(fr.frontier_steps(t.frontier.s_min, t.prediction.b_simple, pt.batch_size))
        out.append(
            {
                "target_loss": t.target_loss,
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


def frontier_plot(c: Comparison) -> FrontierPlot:
    """What comparison.png shows (the sweep's own target), as plain numbers."""
    t = c.main
    f = t.frontier
    return FrontierPlot(
        title=f"{c.task}: eval loss {t.target_loss:g}, best lr per batch size",
        measured=tuple((p.batch_size, p.examples, p.steps) for p in t.points if not p.censored),
        seed_points=t.seed_points,
        censored=t.censored,
        budget_examples=c.budget_examples,
        s_min=f.s_min if f else math.nan,
        b_crit=f.b_crit if f else math.nan,
        b_crit_interval=(t.interval.lo, t.interval.hi),
        b_simple=t.prediction.b_simple,
        prediction_label=c.label,
        schedule=tuple((r.examples, r.steps) for r in c.schedule if r.target_loss == t.target_loss and r.reached),
    )


def ladder_plot(c: Comparison) -> LadderPlot:
    """What targets.png shows: B_crit and B_simple against the target loss."""
    return LadderPlot(
        title=f"{c.task}: critical batch size by target",
        targets=tuple(t.target_loss for t in c.targets),
        b_crit=tuple((t.b_crit, t.interval.lo, t.interval.hi) for t in c.targets),
        measured=tuple(t.measured for t in c.targets),
        b_simple=tuple((t.prediction.b_simple, t.prediction.b_simple_lo, t.prediction.b_simple_hi) for t in c.targets),
        prediction_label=c.label,
    )


def run_compare(
    out_dir: Path,
    *,
    targets: Sequence[float] | None = None,
    plot: bool = True,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Comparison:
    """Read DIR, compare at each target, write comparison.parquet, frontier.parquet, comparison.png, targets.png,
    and schedule.parquet when the sweep has schedule trials (else an older one is removed: it would not match)."""
    out = SweepDir(out_dir)
    predict_rows, trial_rows, curve_rows = read_inputs(out)
    c = compare(trial_rows, curve_rows, predict_rows, targets=targets, resamples=resamples)
    c = replace(c, out=out)
    sets = {**settings(out.path), "targets": list(targets) if targets is not None else None}
    write_table(out.comparison, comparison_rows(c), COMPARISON_SCHEMA, sets)
    write_table(out.frontier, frontier_rows(c), FRONTIER_SCHEMA, sets)
    if c.schedule:
        write_table(out.schedule, schedule_rows(c), SCHEDULE_SCHEMA, sets)
    else:
        out.schedule.unlink(missing_ok=True)
    if plot:
        plot_frontier(frontier_plot(c), out.plot)
        plot_ladder(ladder_plot(c), out.ladder_plot)
    return c


# --- several results folders side by side ------------------------------------------------------------


def check_folders_out(dirs: Sequence[Path], out_dir: Path) -> SweepDir:
    """The folder the side-by-side table goes to: not one of the folders compared, nor any sweep's folder
    (its own comparison.parquet has other columns)."""
    out = SweepDir(out_dir)
    if len({Path(d).resolve() for d in dirs}) < len(dirs):
        raise UsageError("a results folder is given twice; name each folder once")
    if any(out.path.resolve() == Path(d).resolve() for d in dirs):
        raise UsageError(f"--out {out.path} is one of the folders compared; give a folder of its own")
    if out.predict.exists() or out.trials.exists():
        raise UsageError(f"--out {out.path} holds a sweep's results; give a folder of its own for the comparison")
    return out


def run_compare_folders(
    dirs: Sequence[Path],
    out_dir: Path,
    *,
    targets: Sequence[float] | None = None,
    plot: bool = True,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[Comparison, ...]:
    """Compare each folder (one optimizer's sweep, say) as `run_compare` would, without writing into it;
    write one comparison.parquet (a `folder` column, one row per folder and target) and one targets.png
    into out_dir. Every folder is read and checked before anything is written."""
    out = check_folders_out(dirs, out_dir)
    inputs = [(SweepDir(d), read_inputs(SweepDir(d))) for d in dirs]
    comparisons = tuple(
        replace(compare(trial_rows, curve_rows, predict_rows, targets=targets, resamples=resamples), out=d)
        for d, (predict_rows, trial_rows, curve_rows) in inputs
    )
    sets = {
        "command": "compare",
        "version": __version__,
        "dirs": [str(d) for d in dirs],
        "targets": list(targets) if targets is not None else None,
    }
    write_table(out.comparison, folders_rows(dirs, comparisons), FOLDERS_COMPARISON_SCHEMA, sets)
    if plot:
        plot_folders(folders_plot(dirs, comparisons), out.ladder_plot)
    return comparisons


def folders_rows(dirs: Sequence[Path], comparisons: Sequence[Comparison]) -> list[dict]:
    """The side-by-side comparison.parquet: each folder's rows, with the folder as given."""
    return [{"folder": str(d), **row} for d, c in zip(dirs, comparisons, strict=True) for row in comparison_rows(c)]


def folder_labels(dirs: Sequence[Path]) -> list[str]:
    """Short names for tables and plots: each folder's last component, or the paths as given where those clash."""
    names = [Path(d).name or str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def folders_plot(dirs: Sequence[Path], comparisons: Sequence[Comparison]) -> FoldersPlot:
    """B_crit and each folder's matching prediction against the target loss, one series per folder."""
    return FoldersPlot(
        title=f"{', '.join(sorted({c.task for c in comparisons}))}: critical batch size by target",
        series=tuple(
            FolderSeries(
                label=f"{label} ({c.optimizer})" if c.optimizer not in label else label,
                targets=tuple(t.target_loss for t in c.targets),
                b_crit=tuple(t.b_crit for t in c.targets),
                measured=tuple(t.measured for t in c.targets),
                prediction=tuple(t.prediction.b_simple for t in c.targets),
                prediction_label=c.label,
            )
            for label, c in zip(folder_labels(dirs), comparisons, strict=True)
        ),
    )
