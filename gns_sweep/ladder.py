"""Steps to any target from the trials' eval curves, and the ladder of targets compare judges.

B_crit depends on the target loss. Every trial's eval curve is stored, so the steps to
any target the trials passed on their way to the sweep's own are known without new
training. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gns_sweep import frontier as fr

LADDER_SIZE = 5  # targets in the default ladder
CANDIDATES = 40  # loss levels tried between the initial loss and the sweep's target
MEASURABLE_S_MIN = 5.0  # below this many steps at infinite batch the frontier has no large-batch end
EASY_END_S_MIN = 10.0  # the ladder starts where S_min is this large: steps are whole numbers, so smaller is coarse


@dataclass(frozen=True)
class Curve:
    """One trial's evaluations."""

    steps: np.ndarray  # (K,) int, increasing
    losses: np.ndarray  # (K,) float, eval loss after that many steps


@dataclass(frozen=True)
class Trials:
    """The sweep's trials as arrays, one entry per trial, with their curves."""

    batch_size: np.ndarray  # (N,)
    lr: np.ndarray  # (N,)
    seed: np.ndarray  # (N,)
    curves: tuple[Curve, ...]  # (N,)
    initial_loss: float  # median eval loss of the initial weights

    def steps_to(self, target: float) -> np.ndarray:
        """(N,) first evaluated step at or below target; NaN where a trial never got there."""
        return np.array([first_reach(c, target) for c in self.curves], dtype=float)


def first_reach(curve: Curve, target: float) -> float:
    hit = np.flatnonzero(curve.losses <= target)
    return float(curve.steps[hit[0]]) if hit.size else math.nan


def trials_from_rows(trial_rows: Sequence[Mapping], curve_rows: Sequence[Mapping]) -> Trials:
    """Join trials.parquet rows with their curves.parquet points (a trial without points: initial loss only)."""
    points: dict[str, list[tuple[int, float]]] = {}
    for p in curve_rows:
        points.setdefault(p["trial_id"], []).append((p["step"], p["eval_loss"]))
    curves = []
    for r in trial_rows:
        pts = sorted(points.get(r["trial_id"], [(0, r["initial_eval_loss"])]))
        curves.append(Curve(np.array([s for s, _ in pts]), np.array([x for _, x in pts], dtype=float)))
    return Trials(
        batch_size=np.array([r["batch_size"] for r in trial_rows]),
        lr=np.array([r["lr"] for r in trial_rows], dtype=float),
        seed=np.array([r["seed"] for r in trial_rows]),
        curves=tuple(curves),
        initial_loss=float(np.median([r["initial_eval_loss"] for r in trial_rows])),
    )


@dataclass(frozen=True)
class Ladder:
    """The targets compare judges, easiest (highest loss) first."""

    targets: tuple[float, ...]
    reason: str  # how they were chosen, for the user


def measurable(fit: fr.Frontier | None, points: Sequence[fr.BatchPoint], *, s_min: float = MEASURABLE_S_MIN) -> bool:
    """A frontier with two ends: a large-batch floor of several steps and a bend inside the grid."""
    fitted = sum(not p.censored for p in points)
    return fit is not None and fit.s_min >= s_min and not fit.at_bound and fitted >= 3


def fit_at(trials: Trials, target: float) -> tuple[tuple[fr.BatchPoint, ...], fr.Frontier | None]:
    points = fr.batch_points(trials.batch_size, trials.lr, trials.seed, trials.steps_to(target))
    try:
        return points, fr.fit_points(points)
    except fr.FitError:
        return points, None


def default_ladder(trials: Trials, sweep_target: float, *, size: int = LADDER_SIZE) -> Ladder:
    """From the easiest target whose frontier has two ends to the hardest that most batch sizes reach.

    Trials stop at the sweep's target, so no harder target can be judged."""
    levels = np.linspace(trials.initial_loss, sweep_target, CANDIDATES + 1)[1:]  # easy -> hard
    easy = hard = None
    for level in levels:
        points, fit = fit_at(trials, float(level))
        if easy is None and measurable(fit, points, s_min=EASY_END_S_MIN):
            easy = float(level)
        if sum(not p.censored for p in points) * 2 > len(points):
            hard = float(level)
    if easy is None or hard is None or hard > easy:
        return Ladder(
            (float(sweep_target),),
            "no easier target has a frontier with two ends (S_min >= "
            f"{EASY_END_S_MIN:g} and a bend inside the batch-size grid): the sweep's own target only",
        )
    targets = tuple(float(f"{t:.6g}") for t in np.linspace(easy, hard, size)) if size > 1 else (hard,)
    return Ladder(
        tuple(dict.fromkeys(targets)),
        f"{len(set(targets))} targets from {easy:.4g} (the easiest whose frontier has two ends) to {hard:.4g} "
        "(the hardest most batch sizes reach)",
    )
