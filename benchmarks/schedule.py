"""The GNS batch-size schedule against fixed batch sizes, in one process (no Ray).

    python benchmarks/schedule.py                      # blobs-noisy and linreg-ill, seeds 0-2, three settings
    python benchmarks/schedule.py --tasks blobs-noisy --seeds 5 --variant 1,10,0.95 [--json]

For each task and seed: every batch size of the task's sweep grid trained at
the sweep's default (centre) lr -- the task's lr scaled linearly from its own
batch size, capped at half the largest stable lr of the largest batch, as
`gns-sweep empirical` plans it -- and the schedule (gns_sweep.schedule, per-example
monitor) between the grid's ends with the same lr rule and cap, all to the
task's target within its budget.

Per seed it prints the schedule's steps, examples and wall time to the target,
and the best fixed batch size that uses no more examples than the schedule did
(of those that reached the target with at most the schedule's examples, the one
with the fewest steps), with the ratios schedule / fixed. A ratio below 1 means
the schedule needed fewer steps at no more examples. Fixed runs at one batch size
spread widely between seeds (on blobs-noisy, batch 64 took 52 steps on one seed
and about 200 on the others), so it also sets the schedule's median run (steps
and examples, over the seeds) beside the fixed runs' median frontier. Goal:
steps ratio <= 0.8 on at least two tasks, across seeds.

Beside each seed's measured ratio, the model's reading of that run
(gns_sweep.schedule_model: McCandlish et al.'s model applied step by step along
the run's own path of batch sizes and B_noise): how far B_noise varied (max/min),
the run's steps over the best one batch size with its examples, and the floor --
the best schedule's steps over that batch's, the least any schedule could reach
with those examples under the model.

Settings (`--variant k,every,beta`, repeatable): by default the schedule's
defaults (k 1, a decision every step, an EMA over about 5 steps), one that
reacts slower (a decision every 10 steps, the monitor's default EMA of about 20
steps), and k = 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

from gns_sweep.empirical.planning import stable_lr
from gns_sweep.schedule import ScheduleConfig, run_schedule
from gns_sweep.schedule_model import floor_of
from gns_sweep.tasks import Task, load_task
from gns_sweep.train import TrainConfig, train

TASKS = ("blobs-noisy", "linreg-ill")
GOAL = 0.8


@dataclass(frozen=True)
class Run:
    """One run to the target: steps and examples to it (None: not reached), and its wall time."""

    batch: str  # the fixed batch size, or "gns"
    steps: int | None
    examples: int | None
    wall: float
    model: dict | None = None  # a schedule run's schedule_model.Floor, with its spread


def fixed_runs(task: Task, seed: int, cap: float) -> list[Run]:
    runs = []
    for b in sorted(task.batch_sizes):
        lr = min(task.lr * b / task.batch_size, cap)
        start = time.perf_counter()
        r = train(task, TrainConfig(b, lr, task.budget_examples, task.target_loss, seed=seed))
        to = r.steps_to_target
        runs.append(Run(str(b), to, None if to is None else to * b, time.perf_counter() - start))
    return runs


@dataclass(frozen=True)
class Variant:
    """The schedule's knobs that the benchmark varies."""

    k: float  # batch = nearest power of two to k * B_noise
    every: int  # steps between decisions
    beta: float  # the monitor's EMA decay

    def label(self) -> str:
        return f"k {self.k:g}, every {self.every}, beta {self.beta:g}"


DEFAULT = Variant(ScheduleConfig.k, ScheduleConfig.every, ScheduleConfig.beta)
VARIANTS = (DEFAULT, Variant(1.0, 10, 0.95), Variant(2.0, 1, 0.8))


def schedule_run(task: Task, seed: int, cap: float, v: Variant) -> Run:
    config = ScheduleConfig.from_task(task, seed=seed, lr_max=cap, k=v.k, every=v.every, beta=v.beta)
    r = run_schedule(task, config)
    f = floor_of(r, config)
    model = {**f.__dict__, "spread": f.spread}
    return Run("gns", r.steps_to_target, r.examples_to_target, r.wall_seconds, model)


def best_fixed(fixed: list[Run], examples: int | None) -> Run | None:
    """Of the fixed runs that reached the target with at most `examples`, the one with the fewest steps."""
    fits = [r for r in fixed if r.steps is not None and examples is not None and r.examples <= examples]
    return min(fits, key=lambda r: (r.steps, r.examples), default=None)


def median_frontier(per_seed: list[list[Run]]) -> list[Run]:
    """Per batch size, the median steps and examples over the seeds (None where half or more missed)."""
    out = []
    for runs in zip(*per_seed, strict=True):
        steps = sorted(r.steps if r.steps is not None else float("inf") for r in runs)
        mid = steps[len(steps) // 2]
        ok = mid != float("inf")
        b = int(runs[0].batch)
        out.append(Run(runs[0].batch, int(mid) if ok else None, int(mid) * b if ok else None, 0.0))
    return out


def compare(gns: Run, fixed: list[Run]) -> dict:
    best = best_fixed(fixed, gns.examples)
    row = {"gns": gns.__dict__, "best_fixed": None if best is None else best.__dict__}
    if best is not None and gns.steps is not None:
        row["steps_ratio"] = gns.steps / best.steps
        row["examples_ratio"] = gns.examples / best.examples
        row["wall_ratio"] = gns.wall / best.wall if best.wall > 0 else None
    return row


def bench(name: str, seeds: int, variants: tuple[Variant, ...]) -> dict:
    task = load_task(name)
    cap = stable_lr(task, max(task.batch_sizes), start=task.lr) / 2
    fixed = [fixed_runs(task, seed, cap) for seed in range(seeds)]
    frontier = median_frontier(fixed)
    out = {"task": name, "lr_cap": cap, "target": task.target_loss, "grid": list(task.batch_sizes)}
    out["fixed"] = [[r.__dict__ for r in runs] for runs in fixed]
    out["variants"] = []
    for v in variants:
        gns = [schedule_run(task, seed, cap, v) for seed in range(seeds)]
        per_seed = [{"seed": s, **compare(g, fixed[s])} for s, g in enumerate(gns)]
        reached = [g for g in gns if g.steps is not None]
        median = None
        if len(reached) > len(gns) // 2:  # the schedule's median run against the fixed runs' median frontier
            steps, examples = (statistics.median_low([getattr(g, f) for g in reached]) for f in ("steps", "examples"))
            median = compare(Run("gns", steps, examples, 0.0), frontier)
        out["variants"].append({"variant": v.__dict__, "label": v.label(), "seeds": per_seed, "median": median})
    return out


def show(result: dict) -> None:
    print(f"\n{result['task']}: target {result['target']}, grid {result['grid']}, lr cap {result['lr_cap']:g}")
    for variant in result["variants"]:
        print(f" schedule: {variant['label']}")
        head = " seed   gns steps  examples   wall |  best fixed  steps  examples   wall |"
        print(head + "  steps  examples   wall (gns/fixed) | B_noise max/min  model: run  floor")
        ratios, floors = [], []
        for row in variant["seeds"]:
            g, b = row["gns"], row["best_fixed"]
            left = f" {row['seed']:>4}  {_n(g['steps']):>10}  {_n(g['examples']):>8}  {g['wall']:5.1f}s |"
            m = g["model"]
            right = f" | {m['spread']:15.3g}  {m['run_ratio']:10.2f}  {m['sqrt_ratio']:5.2f}"
            floors.append(m["sqrt_ratio"])
            if b is None or "steps_ratio" not in row:
                print(left + "  no fixed batch size reached the target with no more examples" + right)
                continue
            ratios.append(row["steps_ratio"])
            print(
                left + f"  {'B=' + b['batch']:>10}  {b['steps']:>5}  {b['examples']:>8}  {b['wall']:5.1f}s |"
                f"  {row['steps_ratio']:5.2f}  {row['examples_ratio']:8.2f}  {row['wall_ratio']:5.2f}" + right
            )
        if ratios:
            met = len(ratios) == len(variant["seeds"]) and all(r <= GOAL for r in ratios)
            print(
                f" steps ratio {min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f}) over "
                f"{len(ratios)} seeds: goal <= {GOAL} {'met' if met else 'missed'}"
            )
        print(
            f" model floor {min(floors):.2f}-{max(floors):.2f} (median {statistics.median(floors):.2f}): the least "
            "steps ratio any schedule reaches with the run's examples, under the model"
        )
        m = variant["median"]
        if m is not None and "steps_ratio" in m:
            g, b = m["gns"], m["best_fixed"]
            print(
                f" medians over seeds: gns {g['steps']} steps, {g['examples']} examples; fixed B={b['batch']} "
                f"{b['steps']} steps, {b['examples']} examples: steps ratio {m['steps_ratio']:.2f}"
            )


def _n(x) -> str:
    return "-" if x is None else str(x)


def _variant(text: str) -> Variant:
    k, every, beta = text.split(",")
    return Variant(float(k), int(every), float(beta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variant", action="append", type=_variant, help="k,every,beta (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = tuple(args.variant) if args.variant else VARIANTS
    results = [bench(t, args.seeds, variants) for t in args.tasks.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("GNS schedule against fixed batch sizes (per-example monitor, lr linear in the batch up to the cap)")
    for r in results:
        show(r)


if __name__ == "__main__":
    main()
