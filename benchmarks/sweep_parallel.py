"""Does a sweep use the cores? The same trials on Ray vs one at a time in this process.

    python benchmarks/sweep_parallel.py [--address HOST:PORT] [--trials 16]

Prints both wall times and their ratio (goal on 2 cores: >= 1.7). Both runs use
one torch thread per trial, as a 1-CPU Ray trial does, and the same malloc
setting (gns_sweep.allocator, which Ray tasks apply).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gns_sweep.allocator import keep_freed_memory
from gns_sweep.empirical import TrialSpec, run_trial, trial_id
from gns_sweep.runtime import Cluster, ClusterConfig, Resources, WorkerInfo
from gns_sweep.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="existing Ray cluster (default: a local one)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of a local Ray instance")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--task", default="blobs-noisy")
    parser.add_argument("--budget-examples", type=int, default=48_000, help="per trial; ~1.5 s each at batch 16")
    parser.add_argument("--repeats", type=int, default=3, help="each mode this many times; medians are compared")
    args = parser.parse_args()
    keep_freed_memory()  # as in the Ray tasks, so the in-process baseline is not slowed by page faults

    task = load_task(args.task)
    lrs = [0.05 * (1.1**k) for k in range(args.trials)]
    # target 0: every trial runs its whole budget, so both runs do identical work
    trials = [TrialSpec(trial_id(16, lr, 0), 16, lr, 0) for lr in lrs]
    common = dict(target_loss=0.0, budget_examples=args.budget_examples)

    config = ClusterConfig(address=args.address, num_cpus=None if args.address else args.num_cpus)
    with Cluster(config) as cluster:
        slots = int(cluster.resources().get("CPU", 1))
        task_ref = cluster.put(task)
        # warm up one worker per CPU (a cold worker spends seconds importing torch)
        cluster.run(run_trial, [dict(task=task_ref, trial=t, **common) for t in trials[:slots]])
        parallel_runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            cluster.run(run_trial, [dict(task=task_ref, trial=t, **common) for t in trials], resources=Resources(1))
            parallel_runs.append(time.perf_counter() - start)

    torch.set_num_threads(1)
    worker = WorkerInfo(device="cpu", node_id="driver", threads=1)
    sequential_runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for t in trials:
            run_trial(task=task, trial=t, worker=worker, **common)
        sequential_runs.append(time.perf_counter() - start)
    sequential, parallel = statistics.median(sequential_runs), statistics.median(parallel_runs)

    print(f"{len(trials)} trials of {args.budget_examples} examples at batch 16 on {args.task}; Ray CPUs: {slots}")
    print(f"one at a time (driver, 1 thread): {sequential:.1f} s (runs: {_fmt(sequential_runs)})")
    print(f"Ray sweep:                        {parallel:.1f} s (runs: {_fmt(parallel_runs)})")
    print(f"speed-up: {sequential / parallel:.2f}x (goal on 2 cores: >= 1.7x)")


def _fmt(runs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in runs)


if __name__ == "__main__":
    main()
