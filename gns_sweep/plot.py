"""comparison.png: measured steps vs examples, the fitted frontier, the predicted curve."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gns_sweep.compare import Comparison


def plot_comparison(c: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    sizes = [p.batch_size for p in c.points]
    b_lo, b_hi = min(sizes) / 4, max(sizes) * 4
    dense = np.geomspace(b_lo, b_hi, 200)

    if c.seed_points:
        sb, ss = np.array(c.seed_points).T
        ax.scatter(sb * ss, ss, s=14, color="0.6", alpha=0.7, label="each seed at the best lr", zorder=2)
    good = [p for p in c.points if not p.censored]
    ax.scatter(
        [p.examples for p in good],
        [p.steps for p in good],
        s=46,
        color="C0",
        zorder=4,
        label="measured: median over seeds",
    )
    for p in good:
        ax.annotate(f"B={p.batch_size}", (p.examples, p.steps), textcoords="offset points", xytext=(5, 4), fontsize=7)
    censored = [p for p in c.points if p.censored]
    if censored:
        budget = c.budget_examples
        ax.scatter(
            [budget for _ in censored],
            [budget / p.batch_size for p in censored],
            marker="^",
            facecolors="none",
            edgecolors="C3",
            s=46,
            zorder=4,
            label="not reached within the budget (censored)",
        )
        for p in censored:
            ax.annotate(
                f"B={p.batch_size}",
                (budget, budget / p.batch_size),
                xytext=(5, -10),
                textcoords="offset points",
                fontsize=7,
                color="C3",
            )

    f = c.frontier
    if f is not None:
        s = f.s_min * (1 + f.b_crit / dense)
        ax.plot(s * dense, s, color="C0", lw=1.6, label=f"fit: S_min={f.s_min:.3g}, E_min={f.e_min:.3g}")
        ax.axhline(f.s_min, color="C0", lw=0.7, ls=":")
        ax.axvline(f.e_min, color="C0", lw=0.7, ls=":")
        interval = ""
        if math.isfinite(c.interval.lo):
            interval = f" [{c.interval.lo:.3g}, {c.interval.hi:.3g}]"
        ax.scatter(
            [2 * f.e_min],
            [2 * f.s_min],
            marker="D",
            s=60,
            color="C0",
            edgecolors="k",
            zorder=5,
            label=f"B_crit = {f.b_crit:.3g}{interval}",
        )
        b_simple = c.prediction.target
        if b_simple > 0 and math.isfinite(b_simple):
            sp = f.s_min * (1 + b_simple / dense)
            ax.plot(sp * dense, sp, color="C1", lw=1.4, ls="--", label="predicted: S_min (1 + B_simple/B)")
            ax.scatter(
                [2 * f.s_min * b_simple],
                [2 * f.s_min],
                marker="*",
                s=140,
                color="C1",
                edgecolors="k",
                zorder=5,
                label=f"B_simple = {b_simple:.3g} (ratio {b_simple / f.b_crit:.2g})",
            )

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to target  E = S·B")
    ax.set_ylabel("steps to target  S")
    ax.set_title(f"{c.task}: eval loss {c.target_loss:g}, best lr per batch size", fontsize=11)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
