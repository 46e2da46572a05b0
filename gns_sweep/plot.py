"""comparison.png (measured steps vs examples, the fitted frontier, the predicted curve),
targets.png (B_crit and the prediction against the target loss), and the same for several
results folders at once (one colour per folder).

Takes plain numbers, so it knows nothing of how they were computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FrontierPlot:
    """Everything comparison.png shows."""

    title: str
    measured: tuple[tuple[int, float, float], ...]  # (batch size, examples, steps): median over seeds, best lr
    seed_points: tuple[tuple[int, float], ...]  # (batch size, steps) of each seed at the best lr
    censored: tuple[int, ...]  # batch sizes that never reached the target (drawn at the budget)
    budget_examples: int
    s_min: float  # fitted frontier (NaN: no fit)
    b_crit: float
    b_crit_interval: tuple[float, float]  # (NaN, NaN) when there is none
    b_simple: float  # the prediction (NaN or <= 0: not drawn)
    prediction_label: str = "B_simple"  # its name: B_simple, or B_simple^P for an adaptive optimizer
    schedule: tuple[tuple[float, float], ...] = ()  # (examples, steps) to the target of each seed's schedule trial


@dataclass(frozen=True)
class LadderPlot:
    """Everything targets.png shows, one entry per target."""

    title: str
    targets: tuple[float, ...]  # eval-loss targets
    b_crit: tuple[tuple[float, float, float], ...]  # (value, lo, hi); NaN where there is none
    measured: tuple[bool, ...]  # the frontier has two ends (else drawn hollow)
    b_simple: tuple[tuple[float, float, float], ...]  # (value, lo, hi) of the prediction
    prediction_label: str = "B_simple"  # its name: B_simple, or B_simple^P for an adaptive optimizer


@dataclass(frozen=True)
class FolderSeries:
    """One results folder's B_crit and prediction, one entry per target."""

    label: str  # the folder (and its optimizer)
    targets: tuple[float, ...]  # eval-loss targets
    b_crit: tuple[float, ...]  # NaN where there is none
    measured: tuple[bool, ...]  # the frontier has two ends (else drawn hollow)
    prediction: tuple[float, ...]  # the folder's matching prediction
    prediction_label: str  # B_simple or B_simple^P


@dataclass(frozen=True)
class FoldersPlot:
    """Everything the side-by-side targets.png shows."""

    title: str
    series: tuple[FolderSeries, ...]  # one colour each


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(path)


def plot_ladder(data: LadderPlot, path: Path) -> None:
    """B_crit (with its bootstrap over seeds) and B_simple (with its bootstrap over checkpoints)
    against the target loss, log scale; write it atomically to path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=110)
    x = np.asarray(data.targets, dtype=float)
    for series, color, marker, label in (
        (data.b_crit, "C0", "D", "B_crit measured (95% bootstrap over seeds)"),
        (data.b_simple, "C1", "*", f"{data.prediction_label} predicted (95% bootstrap over checkpoints)"),
    ):
        v, lo, hi = (np.asarray(col, dtype=float) for col in zip(*series, strict=True))
        ok = np.isfinite(v) & (v > 0)
        err = np.array([np.where(np.isfinite(lo), v - lo, 0), np.where(np.isfinite(hi), hi - v, 0)])
        ax.errorbar(x[ok], v[ok], yerr=err[:, ok], color=color, marker=marker, ms=7, capsize=3, lw=1.2, label=label)
    hollow = [i for i, m in enumerate(data.measured) if not m and np.isfinite(data.b_crit[i][0])]
    if hollow:
        ax.scatter(x[hollow], [data.b_crit[i][0] for i in hollow], s=110, facecolors="w", edgecolors="C3", zorder=5,
                   label="not a measurement (S_min < 5 or no bend in the grid)")  # fmt: skip
    ax.set_yscale("log")
    ax.invert_xaxis()  # harder targets (lower loss) to the right, as training goes
    ax.set_xlabel("target eval loss")
    ax.set_ylabel("batch size")
    ax.set_title(data.title, fontsize=11)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_folders(data: FoldersPlot, path: Path) -> None:
    """Per folder, in its own colour: B_crit (solid, diamonds; hollow where not a measurement) and its
    prediction (dashed, stars) against the target loss, log scale; written atomically to path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.0), dpi=110)
    for i, s in enumerate(data.series):
        color = f"C{i % 10}"
        x = np.asarray(s.targets, dtype=float)
        b, pred = np.asarray(s.b_crit, dtype=float), np.asarray(s.prediction, dtype=float)
        ok = np.isfinite(b) & (b > 0)
        ax.plot(x[ok], b[ok], color=color, marker="D", ms=6, lw=1.4, label=f"{s.label}: B_crit measured")
        hollow = ok & ~np.asarray(s.measured, dtype=bool)
        if hollow.any():
            ax.scatter(x[hollow], b[hollow], s=90, facecolors="w", edgecolors=color, zorder=5)
        ok = np.isfinite(pred) & (pred > 0)
        ax.plot(x[ok], pred[ok], color=color, marker="*", ms=9, lw=1.2, ls="--",
                label=f"{s.label}: {s.prediction_label} predicted")  # fmt: skip
    ax.set_yscale("log")
    ax.invert_xaxis()  # harder targets (lower loss) to the right, as training goes
    ax.set_xlabel("target eval loss")
    ax.set_ylabel("batch size")
    ax.set_title(f"{data.title}\n(hollow: not a measurement of B_crit)", fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over the data
    fig.tight_layout()
    _save(fig, path)


def plot_frontier(data: FrontierPlot, path: Path) -> None:
    """Draw the plot and write it atomically to path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    sizes = [b for b, _, _ in data.measured] + list(data.censored)
    dense = np.geomspace(min(sizes) / 4, max(sizes) * 4, 200)  # batch sizes for the curves
    _measured(ax, data)
    _censored(ax, data)
    if data.schedule:
        e, s = np.array(data.schedule, dtype=float).T
        ax.scatter(e, s, marker="X", s=80, color="C3", edgecolors="k", zorder=6, label="GNS schedule (each seed)")
    if math.isfinite(data.b_crit):
        _fit(ax, data, dense)
        if data.b_simple > 0 and math.isfinite(data.b_simple):
            _prediction(ax, data, dense)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to target  E = S·B")
    ax.set_ylabel("steps to target  S")
    ax.set_title(data.title, fontsize=11)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def _measured(ax, data: FrontierPlot) -> None:
    if data.seed_points:
        sb, ss = np.array(data.seed_points).T
        ax.scatter(sb * ss, ss, s=14, color="0.6", alpha=0.7, label="each seed at the best lr", zorder=2)
    if not data.measured:
        return
    b, e, s = (list(col) for col in zip(*data.measured, strict=True))
    ax.scatter(e, s, s=46, color="C0", zorder=4, label="measured: median over seeds")
    for bi, ei, si in data.measured:
        ax.annotate(f"B={bi}", (ei, si), textcoords="offset points", xytext=(5, 4), fontsize=7)


def _censored(ax, data: FrontierPlot) -> None:
    if not data.censored:
        return
    budget = data.budget_examples
    steps = [budget / b for b in data.censored]
    ax.scatter(
        [budget] * len(steps),
        steps,
        marker="^",
        facecolors="none",
        edgecolors="C3",
        s=46,
        zorder=4,
        label="not reached within the budget (censored)",
    )
    for b, s in zip(data.censored, steps, strict=True):
        ax.annotate(f"B={b}", (budget, s), xytext=(5, -10), textcoords="offset points", fontsize=7, color="C3")


def _fit(ax, data: FrontierPlot, dense: np.ndarray) -> None:
    """The fitted frontier S = S_min (1 + B_crit/B), with B_crit at its knee (S = 2 S_min)."""
    s_min, b_crit = data.s_min, data.b_crit
    e_min = s_min * b_crit
    s = s_min * (1 + b_crit / dense)
    ax.plot(s * dense, s, color="C0", lw=1.6, label=f"fit: S_min={s_min:.3g}, E_min={e_min:.3g}")
    ax.axhline(s_min, color="C0", lw=0.7, ls=":")
    ax.axvline(e_min, color="C0", lw=0.7, ls=":")
    lo, hi = data.b_crit_interval
    interval = f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else ""
    label = f"B_crit = {b_crit:.3g}{interval}"
    ax.scatter([2 * e_min], [2 * s_min], marker="D", s=60, color="C0", edgecolors="k", zorder=5, label=label)


def _prediction(ax, data: FrontierPlot, dense: np.ndarray) -> None:
    """The predicted curve S_min (1 + B_simple/B), B_simple at its knee."""
    s_min, b_simple = data.s_min, data.b_simple
    sp = s_min * (1 + b_simple / dense)
    name = data.prediction_label
    ax.plot(sp * dense, sp, color="C1", lw=1.4, ls="--", label=f"predicted: S_min (1 + {name}/B)")
    label = f"{name} = {b_simple:.3g} (ratio {b_simple / data.b_crit:.2g})"
    ax.scatter(
        [2 * s_min * b_simple], [2 * s_min], marker="*", s=140, color="C1", edgecolors="k", zorder=5, label=label
    )
