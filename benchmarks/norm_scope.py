"""Does the normalization layers' noise scale track the whole model's? Checked along a reference run.

    python benchmarks/norm_scope.py [--task tinygpt] [--seeds 3] [--warmup-fraction 0.1] [--json]
    python benchmarks/norm_scope.py --from results/a results/b   # read predict.parquet files already made

Gray et al. (2024) found that in transformers B_simple of the LayerNorm parameters alone stays close
to the whole model's past warm-up. predict writes both scopes at every checkpoint (`total` and
`norm-layers` in predict.parquet); this runs predict with its default settings at seeds 0..N-1 and
prints, per checkpoint, the step, the eval loss, B_simple of each scope and norm / total. `--from`
reads the predict.parquet of existing folders (`gns-sweep predict --out DIR`) instead of running predict.

Warm-up: the reference run is plain SGD at a constant lr, so it has no lr warm-up. The checkpoints in
its first `--warmup-fraction` of steps stand in for one (the opening transient, where the loss falls
from uniform fastest); the per-checkpoint table shows every checkpoint either way. The goal (printed
beside what was measured): norm / total within 1.5x at every resolved checkpoint past warm-up. Also
printed: the range of norm / total there, the fraction within 1.5x, the correlation of log B_simple of
the two scopes over those checkpoints (do they rise and fall together, whatever the factor), and the
ratio of the two scopes' headlines (mean tr(Sigma) / mean |G|^2 over the whole run, as predict reports).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from gns_sweep.predict import PredictConfig, prepare_predict, run_predict
from gns_sweep.results import NORM, TOTAL, Headline, ScopeRow, headline
from gns_sweep.runtime import Cluster, ClusterConfig
from gns_sweep.storage import PREDICT_SCHEMA, SweepDir, read_result, read_settings

GOAL = 1.5  # norm-layer B_simple within this factor of the whole model's, past warm-up


def checkpoint_table(rows: tuple[ScopeRow, ...], warmup_fraction: float) -> list[dict]:
    """One entry per checkpoint: both scopes' B_simple, their ratio, whether it is past warm-up."""
    by = {(r.checkpoint, r.scope): r for r in rows}
    checkpoints = sorted({r.checkpoint for r in rows})
    last_step = max(by[c, TOTAL].step for c in checkpoints)
    out = []
    for c in checkpoints:
        total, norm = by[c, TOTAL], by[c, NORM]
        resolved = total.resolved and norm.resolved
        out.append(
            {
                "checkpoint": c,
                "step": total.step,
                "eval_loss": total.eval_loss,
                "b_total": total.b_simple,
                "b_norm": norm.b_simple,
                "ratio": norm.b_simple / total.b_simple if resolved else math.nan,
                "past_warmup": total.step > warmup_fraction * last_step,
            }
        )
    return out


def summary(table: list[dict], total: Headline, norm: Headline) -> dict:
    past = [t for t in table if t["past_warmup"] and math.isfinite(t["ratio"])]
    ratios = [t["ratio"] for t in past]
    within = sum(1 / GOAL <= r <= GOAL for r in ratios)
    return {
        "log_correlation": log_correlation([t["b_total"] for t in past], [t["b_norm"] for t in past]),
        "checkpoints_past_warmup": sum(t["past_warmup"] for t in table),
        "unresolved_past_warmup": sum(t["past_warmup"] for t in table) - len(ratios),
        "ratio_min": min(ratios, default=math.nan),
        "ratio_max": max(ratios, default=math.nan),
        "ratio_median": statistics.median(ratios) if ratios else math.nan,
        "within_goal": within,
        "headline_total": [total.b_simple, total.b_simple_lo, total.b_simple_hi],
        "headline_norm": [norm.b_simple, norm.b_simple_lo, norm.b_simple_hi],
        "headline_ratio": norm.b_simple / total.b_simple,
    }


def analyse(rows: tuple[ScopeRow, ...], seed: int, warmup_fraction: float) -> dict:
    if not any(r.scope == NORM for r in rows):
        raise SystemExit(f"{rows[0].task} has no normalization layers: nothing to compare")
    table = checkpoint_table(rows, warmup_fraction)
    n_params = {r.scope: r.n_params for r in rows if r.checkpoint == 0 and r.scope in (TOTAL, NORM)}
    return {
        "task": rows[0].task,
        "seed": seed,
        "n_params": n_params,
        "table": table,
        "summary": summary(table, headline(rows), headline(rows, scope=NORM)),
    }


def log_correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation of log a and log b: does one follow the other's rises and falls, whatever the factor."""
    if len(a) < 3:
        return math.nan
    return float(np.corrcoef(np.log(a), np.log(b))[0, 1])


def measure(task: str, seed: int, cluster: Cluster, root: Path, warmup_fraction: float) -> dict:
    job = prepare_predict(PredictConfig(task=task, seed=seed), out=SweepDir(root / f"{task}-{seed}"))
    return analyse(run_predict(job, cluster).rows, seed, warmup_fraction)


def read(folder: Path, warmup_fraction: float) -> dict:
    path = SweepDir(folder).predict if folder.is_dir() else folder
    known = {f.name for f in fields(ScopeRow)}
    records = read_result(path, PREDICT_SCHEMA, "give a folder gns-sweep predict wrote")
    rows = tuple(ScopeRow(**{k: v for k, v in r.items() if k in known and v is not None}) for r in records)
    return analyse(rows, (read_settings(path) or {}).get("seed", -1), warmup_fraction)


def fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def print_seed(run: dict) -> None:
    n = run["n_params"]
    print(f"\n== {run['task']}, predict seed {run['seed']} (norm-layers: {n[NORM]:,} of {n[TOTAL]:,} parameters)")
    print("  ckpt   step  eval loss  B_simple total  B_simple norm  norm/total")
    for t in run["table"]:
        mark = "" if t["past_warmup"] else "  (warm-up)"
        print(f"  {t['checkpoint']:4d} {t['step']:6d} {t['eval_loss']:10.3f} {fmt(t['b_total']):>15s} "
              f"{fmt(t['b_norm']):>14s} {fmt(t['ratio']):>11s}{mark}")  # fmt: skip
    print("  " + summary_line(run["summary"]))


def summary_line(s: dict) -> str:
    n, ok = s["checkpoints_past_warmup"] - s["unresolved_past_warmup"], s["within_goal"]
    tot, nrm = s["headline_total"], s["headline_norm"]
    unresolved = f" ({s['unresolved_past_warmup']} unresolved left out)" if s["unresolved_past_warmup"] else ""
    return (
        f"past warm-up: norm/total {fmt(s['ratio_min'])} ... {fmt(s['ratio_max'])} (median "
        f"{fmt(s['ratio_median'])}), within {GOAL:g}x at {ok} of {n}{unresolved}, correlation of the logs "
        f"{fmt(s['log_correlation'])}; headlines: total "
        f"{fmt(tot[0])} [{fmt(tot[1])}, {fmt(tot[2])}], norm-layers {fmt(nrm[0])} [{fmt(nrm[1])}, {fmt(nrm[2])}], "
        f"ratio {fmt(s['headline_ratio'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tinygpt")
    parser.add_argument("--seeds", type=int, default=3, help="predict seeds 0..N-1")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="of the reference run's steps")
    parser.add_argument("--from", dest="folders", nargs="+", type=Path, help="predict folders to read instead")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.folders:
        runs = [read(folder, args.warmup_fraction) for folder in args.folders]
    else:
        with Cluster(ClusterConfig(num_cpus=args.num_cpus)) as cluster, tempfile.TemporaryDirectory() as tmp:
            runs = [measure(args.task, s, cluster, Path(tmp), args.warmup_fraction) for s in range(args.seeds)]
    ratios = [r for run in runs for t in run["table"] if t["past_warmup"] for r in [t["ratio"]] if math.isfinite(r)]
    within = sum(1 / GOAL <= r <= GOAL for r in ratios)
    heads = [run["summary"]["headline_ratio"] for run in runs]
    goal = {
        "ratio_min": min(ratios, default=math.nan),
        "ratio_max": max(ratios, default=math.nan),
        "within_goal": within,
        "checkpoints": len(ratios),
        "headline_ratios": heads,
        "met": bool(ratios) and within == len(ratios),
    }
    if args.json:
        print(json.dumps({"runs": runs, "goal": goal}, default=str))
        return
    for run in runs:
        print_seed(run)
    print(f"\ngoal ({time.perf_counter() - start:.0f} s, {len(runs)} seeds, warm-up = first "
          f"{args.warmup_fraction:.0%} of each run's steps):")  # fmt: skip
    print(f"  norm-layer B_simple within {GOAL:g}x of the whole model's at every checkpoint past warm-up: "
          f"{'met' if goal['met'] else 'missed'}; norm/total {fmt(goal['ratio_min'])} ... {fmt(goal['ratio_max'])}, "
          f"within {GOAL:g}x at {within} of {len(ratios)} (checkpoint, seed) pairs")  # fmt: skip
    print(f"  headline ratio (mean-based) per seed: {' '.join(fmt(h) for h in heads)}")


if __name__ == "__main__":
    main()
