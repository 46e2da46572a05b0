"""Does the prediction follow the optimizer? B_crit measured per optimizer beside its matching prediction.

    python benchmarks/optimizers.py [--task blobs-noisy] [--optimizers sgd,momentum,adam,lars] [--work DIR] [--json]
    python benchmarks/optimizers.py --optimizers sgd,lars --lars-multipliers 0.0625,0.125,0.25,0.5,1

For each optimizer: the sweep (the task's default grid, scaled by the optimizer's own lr rule)
into its own folder, predict with the same optimizer, and compare at the default ladder of
targets. The prediction is the one compare sets beside B_crit: B_simple for sgd, momentum and
lars, the preconditioned noise scale tr(P Sigma)/G'PG for adam and adamw (B_simple is printed
beside it). Per target it prints B_crit with its interval, the prediction and their ratio
(goal: within 2x); then, measured in the same run, each optimizer's B_crit at the sweep's own
target over SGD's. The folders are also compared side by side into DIR/side-by-side
(comparison.parquet with a folder column, targets.png). `--work DIR` keeps the runs there and
resumes from them (a finished predict is kept, a sweep runs only its missing trials).
`--lars-multipliers` moves LARS's lr grid (its matched lr can sit well above its best).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from gns_sweep.compare import PRECOND, Comparison, compare, run_compare_folders
from gns_sweep.empirical import EmpiricalConfig, prepare_empirical, run_empirical
from gns_sweep.optim import OPTIMIZERS, SGD, OptimizerSpec
from gns_sweep.predict import PredictConfig, prepare_predict, run_predict
from gns_sweep.runtime import Cluster, ClusterConfig
from gns_sweep.storage import CURVES_SCHEMA, PREDICT_SCHEMA, TRIALS_SCHEMA, SweepDir, read_result

GOAL_RATIO = 2.0  # the matching prediction within this factor of B_crit


def rows(path: Path, schema) -> list[dict]:
    return read_result(path, schema, "rerun the benchmark")


def folder_name(task: str, name: str, multipliers: tuple[float, ...] | None) -> str:
    return f"{task}-{name}" + ("" if multipliers is None else "-" + "-".join(f"{m:g}" for m in multipliers))


def measure(
    task: str, name: str, cluster: Cluster, root: Path, *, multipliers: tuple[float, ...] | None = None
) -> tuple[Comparison, float]:
    """Sweep and predict with one optimizer into its own folder under root; compare there. (comparison, seconds)"""
    start = time.perf_counter()
    folder = SweepDir(root / folder_name(task, name, multipliers))
    spec = OptimizerSpec(name)
    pjob = prepare_predict(PredictConfig(task=task, optimizer=spec), out=folder, resume=True)
    if not pjob.kept:
        run_predict(pjob, cluster)
    sweep = EmpiricalConfig(task=task, optimizer=spec, lr_multipliers=multipliers)
    run_empirical(prepare_empirical(sweep, out=folder, resume=True), cluster)
    c = compare(
        rows(folder.trials, TRIALS_SCHEMA), rows(folder.curves, CURVES_SCHEMA), rows(folder.predict, PREDICT_SCHEMA)
    )
    return c, time.perf_counter() - start


def report(name: str, c: Comparison, seconds: float) -> dict:
    targets = []
    for t in c.targets:
        h = t.prediction
        targets.append(
            {
                "target_loss": t.target_loss,
                "sweep_target": t.own,
                "measured": t.measured,
                "b_crit": t.b_crit,
                "b_crit_interval": [t.interval.lo, t.interval.hi],
                "prediction": h.b_simple,
                "prediction_interval": [h.b_simple_lo, h.b_simple_hi],
                "b_simple": (t.plain or h).b_simple,
                "ratio": t.ratio(h.b_simple),
            }
        )
    return {
        "optimizer": name,
        "prediction": c.prediction,
        "warnings": list(c.warnings),
        "seconds": seconds,
        "ladder": c.ladder.reason,
        "targets": targets,
    }


def fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def print_report(r: dict) -> None:
    name = "B_simple^P" if r["prediction"] == PRECOND else "B_simple"
    print(f"\n== {r['optimizer']}: prediction {name}, {r['seconds']:.0f} s ({r['ladder']})")
    for w in r["warnings"]:
        print(f"  warning: {w}")
    for t in r["targets"]:
        lo, hi = t["b_crit_interval"]
        plo, phi = t["prediction_interval"]
        mark = " (sweep's target)" if t["sweep_target"] else ""
        note = "" if t["measured"] else "  not a measurement of B_crit"
        extra = f", B_simple {fmt(t['b_simple'])}" if r["prediction"] == PRECOND else ""
        pred = f"{name} {fmt(t['prediction'])} [{fmt(plo)}, {fmt(phi)}]{extra}"
        print(f"  target {t['target_loss']:.4g}{mark}: B_crit {fmt(t['b_crit'])} [{fmt(lo)}, {fmt(hi)}], "
              f"{pred}, ratio {fmt(t['ratio'])}{note}")  # fmt: skip


def own(r: dict) -> dict:
    return next(t for t in r["targets"] if t["sweep_target"])


def goals(reports: list[dict]) -> list[str]:
    lines = []
    for r in reports:
        ratios = [t["ratio"] for t in r["targets"] if t["measured"] and t["ratio"] > 0]
        within = sum(1 / GOAL_RATIO <= x <= GOAL_RATIO for x in ratios)
        span = f"{fmt(min(ratios))} ... {fmt(max(ratios))}" if ratios else "-"
        lines.append(
            f"{r['optimizer']}: prediction/B_crit {span} over {len(ratios)} measured targets, within "
            f"{GOAL_RATIO:g}x at {within} (goal: all); at the sweep's target {fmt(own(r)['ratio'])}"
        )
    base = next((r for r in reports if r["optimizer"] == SGD), None)
    if base is not None and own(base)["b_crit"] > 0:
        for r in reports:
            if r is not base:
                same = own(r)["target_loss"] == own(base)["target_loss"]
                where = (
                    "" if same else f" (targets differ: {own(r)['target_loss']:.4g} vs {own(base)['target_loss']:.4g})"
                )
                lines.append(
                    f"{r['optimizer']}: B_crit at the sweep's target / SGD's = "
                    f"{fmt(own(r)['b_crit'] / own(base)['b_crit'])}{where}"
                )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="blobs-noisy")
    ap.add_argument("--optimizers", default="sgd,momentum,adam,lars", help="comma list; sgd first gives the baseline")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here and resume from them")
    ap.add_argument(
        "--lars-multipliers",
        default=None,
        help="LARS's lr grid as multiples of its centre, e.g. 0.0625,0.125,0.25,0.5,1 (default: the sweep's own)",
    )
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        ap.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    with tempfile.TemporaryDirectory(prefix="gns-optimizers-") as tmp:
        root = args.work or Path(tmp)
        reports = []
        try:
            lars = None if args.lars_multipliers is None else tuple(float(x) for x in args.lars_multipliers.split(","))
        except ValueError:
            ap.error(f"--lars-multipliers {args.lars_multipliers!r}: give numbers separated by commas")
        grids = {n: lars if n == "lars" else None for n in names}
        with Cluster(ClusterConfig(num_cpus=args.num_cpus)) as cluster:
            for name in names:
                c, seconds = measure(args.task, name, cluster, root, multipliers=grids[name])
                reports.append(report(name, c, seconds))
                reports[-1]["lr_multipliers"] = grids[name]
                if not args.json:
                    print_report(reports[-1])
        dirs = [root / folder_name(args.task, n, grids[n]) for n in names]
        run_compare_folders(dirs, root / "side-by-side")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    doc = {"task": args.task, "date": time.strftime("%Y-%m-%d"), "machine": machine, "optimizers": reports,
           "goals": goals(reports)}  # fmt: skip
    if args.json:
        print(json.dumps(doc, default=lambda x: None))
        return
    print(f"\n{doc['date']}, {machine}")
    for line in doc["goals"]:
        print(line)


if __name__ == "__main__":
    main()
