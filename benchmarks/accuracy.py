"""How good is the prediction? B_simple against the measured B_crit, across predict seeds and targets.

    python benchmarks/accuracy.py [--tasks blobs-noisy,linreg-ill,linreg] [--seeds 5] [--json]
    python benchmarks/accuracy.py --tasks charmlp,tinygpt,digits-cnn --seeds 3   # the tasks on real data

For each built-in sweep task: the sweep once (its default seeds), predict with seeds
0..N-1, and compare at every target of the default ladder. `--seeds` takes one number for
every task, or one per task, as in `--seeds 5,tinygpt=3` (predict on tinygpt costs about
two minutes of two cores per seed); each task's section names the seeds it ran and its wall
time. `--work DIR` keeps the runs in DIR instead of a temporary folder and resumes from
it: a finished predict is kept, and a sweep runs only its trials not yet on disk.

For each candidate headline (B_simple over the whole reference run to the target, over
its last quarter, at its first checkpoint) it prints the values across predict seeds,
their spread (max/min) and their ratio to B_crit, and whether the headline's interval
covers the median over seeds. A task with no target of its own (blobs-noisy without one)
checks the pilot's choice: S_min at the chosen target. Goals are printed beside what was
measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gns_sweep.compare import Comparison, compare
from gns_sweep.empirical import EmpiricalConfig, prepare_empirical, run_empirical
from gns_sweep.predict import PredictConfig, prepare_predict, run_predict
from gns_sweep.runtime import Cluster, ClusterConfig
from gns_sweep.storage import CURVES_SCHEMA, PREDICT_SCHEMA, TRIALS_SCHEMA, SweepDir, read_result
from gns_sweep.tasks import load_task

CANDIDATES = {  # name -> how to read it off a target's prediction
    "run (headline)": "b_simple",
    "last quarter": "b_simple_late",
    "first checkpoint": "b_simple_start",
}
GOAL_SPREAD = 1.5  # max/min of the headline over predict seeds
GOAL_COVER = 0.8  # of the seeds: the headline's interval covers the median over seeds
GOAL_RATIO = 2.0  # B_simple/B_crit within this factor at every target and seed
GOAL_PILOT_S_MIN = 10.0


def rows(path: Path, schema) -> list[dict]:
    return read_result(path, schema, "rerun the benchmark")


def sweep(task_name: str, cluster: Cluster, root: Path, *, target_free: bool = False) -> SweepDir:
    out = SweepDir(root / f"{task_name}{'-no-target' if target_free else ''}")
    task = load_task(task_name)
    if target_free:
        task = replace(task, name=f"{task.name}-no-target", target_loss=None)
    job = prepare_empirical(EmpiricalConfig(task=task_name), task=task, out=out, resume=True)
    run_empirical(job, cluster)
    return out


def predictions(task_name: str, seeds: int, cluster: Cluster, root: Path) -> list[list[dict]]:
    out = []
    for seed in range(seeds):
        folder = SweepDir(root / f"{task_name}-predict-{seed}")
        job = prepare_predict(PredictConfig(task=task_name, seed=seed), out=folder, resume=True)
        if not job.kept:
            run_predict(job, cluster)
        out.append(rows(folder.predict, PREDICT_SCHEMA))
    return out


def comparisons(swept: SweepDir, predicted: list[list[dict]]) -> list[Comparison]:
    trials, curves = rows(swept.trials, TRIALS_SCHEMA), rows(swept.curves, CURVES_SCHEMA)
    return [compare(trials, curves, p) for p in predicted]


def task_report(name: str, cs: list[Comparison], seconds: float) -> dict:
    """Per target: B_crit, and per candidate the values over seeds, spread, ratios, coverage."""
    targets = []
    for i, t0 in enumerate(cs[0].targets):
        at = [c.targets[i] for c in cs]
        entry = {
            "target_loss": t0.target_loss,
            "sweep_target": t0.own,
            "b_crit": t0.b_crit,
            "b_crit_interval": [t0.interval.lo, t0.interval.hi],
            "s_min": t0.frontier.s_min if t0.frontier else math.nan,
            "measured": t0.measured,
            "candidates": {},
        }
        for label, field in CANDIDATES.items():
            values = [getattr(a.prediction, field) for a in at]
            finite = [v for v in values if v > 0 and math.isfinite(v)]
            entry["candidates"][label] = {
                "values": values,
                "spread": max(finite) / min(finite) if len(finite) == len(values) else math.inf,
                "ratios": [v / t0.b_crit if t0.b_crit > 0 else math.nan for v in values],
            }
        median = statistics.median(a.prediction.b_simple for a in at)
        entry["covers_median"] = sum(a.prediction.b_simple_lo <= median <= a.prediction.b_simple_hi for a in at)
        targets.append(entry)
    return {"task": name, "ladder": cs[0].ladder.reason, "seeds": len(cs), "seconds": seconds, "targets": targets}


def fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def print_task(report: dict) -> None:
    seeds = report["seeds"]
    print(f"\n== {report['task']}: predict seeds 0..{seeds - 1}, {report['seconds']:.0f} s ({report['ladder']})")
    for t in report["targets"]:
        mark = " (sweep's target)" if t["sweep_target"] else ""
        lo, hi = t["b_crit_interval"]
        measured = "" if t["measured"] else "  NOT A MEASUREMENT (S_min < 5 or no bend)"
        print(f"  target {t['target_loss']:.4g}{mark}: B_crit {fmt(t['b_crit'])} [{fmt(lo)}, {fmt(hi)}], "
              f"S_min {fmt(t['s_min'])}{measured}")  # fmt: skip
        for label, c in t["candidates"].items():
            ratios = " ".join(fmt(r) for r in c["ratios"])
            print(f"    {label:17s} {' '.join(fmt(v) for v in c['values']):34s} spread {fmt(c['spread']):5s} "
                  f"B_simple/B_crit {ratios}")  # fmt: skip
        print(f"    headline interval covers the {seeds}-seed median in {t['covers_median']} of {seeds} seeds")


def goals(reports: list[dict], pilot: dict | None) -> list[str]:
    lines = []
    for r in reports:
        seeds = r["seeds"]
        own = next(t for t in r["targets"] if t["sweep_target"])
        head = own["candidates"]["run (headline)"]
        ok = head["spread"] <= GOAL_SPREAD
        lines.append(f"{r['task']}: headline spread {fmt(head['spread'])} over {seeds} seeds (goal <= {GOAL_SPREAD}): "
                     f"{'met' if ok else 'missed'}")  # fmt: skip
        cover, need = own["covers_median"], math.ceil(GOAL_COVER * seeds)
        lines.append(f"{r['task']}: interval covers the median in {cover} of {seeds} (goal >= {need}): "
                     f"{'met' if cover >= need else 'missed'}")  # fmt: skip
        measured = [t for t in r["targets"] if t["measured"]]
        ratios = [x for t in measured for x in t["candidates"]["run (headline)"]["ratios"]]
        within = sum(1 / GOAL_RATIO <= x <= GOAL_RATIO for x in ratios)
        span = f"{fmt(min(ratios))} ... {fmt(max(ratios))}" if ratios else "-"
        lines.append(f"{r['task']}: B_simple/B_crit {span} at {len(measured)} measured targets x {seeds} seeds; "
                     f"within {GOAL_RATIO:g}x in {within} of {len(ratios)}")  # fmt: skip
    if pilot is not None:
        ok = pilot["s_min"] >= GOAL_PILOT_S_MIN
        lines.append(f"{pilot['task']} (no target): pilot chose {pilot['target']:.4g}, S_min {fmt(pilot['s_min'])} "
                     f"(goal >= {GOAL_PILOT_S_MIN:g}): {'met' if ok else 'missed'}")  # fmt: skip
    return lines


def pilot_check(name: str, cluster: Cluster, root: Path, predicted: list[dict]) -> dict:
    swept = sweep(name, cluster, root, target_free=True)
    c = compare(rows(swept.trials, TRIALS_SCHEMA), rows(swept.curves, CURVES_SCHEMA), predicted)
    s_min = c.main.frontier.s_min if c.main.frontier else math.nan
    return {"task": name, "target": c.main.target_loss, "s_min": s_min, "b_crit": c.main.b_crit}


def seeds_per_task(spec: str, tasks: list[str]) -> dict[str, int]:
    """'5' -> 5 for every task; '5,tinygpt=3' -> 3 for tinygpt, 5 for the others."""
    default, own = None, {}
    for part in spec.split(","):
        name, _, n = part.rpartition("=")
        if name:
            own[name] = int(n)
        else:
            default = int(n)
    unknown = set(own) - set(tasks)
    if unknown or (default is None and set(own) != set(tasks)):
        raise SystemExit(f"--seeds {spec!r}: give a number for every task of --tasks {','.join(tasks)}")
    return {t: own.get(t, default) for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="blobs-noisy,linreg-ill,linreg")
    parser.add_argument("--seeds", default="5", help="predict seeds: N, or per task as in 5,tinygpt=3")
    parser.add_argument("--pilot-task", default="blobs-noisy", help="swept again without its target ('' to skip)")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here and resume from them")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    seeds = seeds_per_task(args.seeds, tasks)
    start = time.perf_counter()
    reports, pilot = [], None
    with Cluster(ClusterConfig(num_cpus=args.num_cpus)) as cluster, tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        for name in tasks:
            t0 = time.perf_counter()
            predicted = predictions(name, seeds[name], cluster, root)
            cs = comparisons(sweep(name, cluster, root), predicted)
            reports.append(task_report(name, cs, time.perf_counter() - t0))
            if name == args.pilot_task:
                pilot = pilot_check(name, cluster, root, predicted[0])
    lines = goals(reports, pilot)
    if args.json:
        print(json.dumps({"tasks": reports, "pilot": pilot, "goals": lines}, default=str))
        return
    for r in reports:
        print_task(r)
    print(f"\ngoals ({time.perf_counter() - start:.0f} s):")
    for line in lines:
        print(f"  {line}")


if __name__ == "__main__":
    main()
