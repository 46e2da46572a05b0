"""What predict costs next to the sweep it predicts, on default settings.

    python benchmarks/predict_cost.py [--task blobs-noisy] [--num-cpus 2]

Starts its own loopback Ray cluster (`ray start --head` with a private temp
dir), then runs `predict` and the `empirical` sweep with their defaults. CPU
time of each = this driver's CPU time + the CPU time of every process of that
cluster (raylet, workers, ...) over the run, read from /proc, so both pay the
same overheads. Prints the ratio (goal: <= 2%). Linux only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from gns_sweep.empirical import EmpiricalConfig, prepare_empirical, run_empirical
from gns_sweep.predict import PredictConfig, prepare_predict, run_predict
from gns_sweep.runtime import Cluster, ClusterConfig
from gns_sweep.storage import SweepDir

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cluster_pids(marker: str) -> list[int]:
    """Processes started with the cluster's temp dir, and their descendants (Ray workers
    rename themselves to `ray::...`, so their command line no longer shows the marker)."""
    roots, parent = set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                roots.add(pid)
            parent[pid] = int(_stat(pid)[1])
        except OSError:
            continue
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in found}
        found |= frontier
    return sorted(found)


def cpu_seconds(marker: str) -> float:
    """This process + every process of the cluster (user + system), including reaped children."""
    total = time.process_time()
    for pid in cluster_pids(marker):
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICKS  # utime stime cutime cstime
    return total


def start_head(num_cpus: int) -> tuple[str, str]:
    tmp = tempfile.mkdtemp(prefix="gnsbench-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    if not Path(ray_bin).exists():
        ray_bin = shutil.which("ray") or "ray"
    subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}"],
        check=True, capture_output=True, timeout=120, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )  # fmt: skip
    return f"127.0.0.1:{port}", tmp


def stop_head(tmp: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(tmp):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="blobs-noisy")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--probe-size", type=int, default=None, help="predict's (default: its own)")
    parser.add_argument("--shards", type=int, default=None, help="predict's shards per checkpoint (default: its own)")
    parser.add_argument("--skip-sweep", action="store_true", help="time predict only")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the driver's reference run, like a 1-CPU worker: no idle spinning threads
    address, tmp = start_head(args.num_cpus)
    pconfig = PredictConfig(task=args.task, probe_size=args.probe_size)
    if args.shards is not None:
        pconfig = replace(pconfig, shards=args.shards)
    try:
        with Cluster(ClusterConfig(address=address)) as cluster, tempfile.TemporaryDirectory() as out:
            time.sleep(2.0)  # let the cluster settle before counting

            def timed(fn) -> tuple[float, float, float, object]:
                c, d, w = cpu_seconds(tmp), time.process_time(), time.perf_counter()
                value = fn()
                return cpu_seconds(tmp) - c, time.process_time() - d, time.perf_counter() - w, value

            # cold: the first work on a fresh cluster, as in `gns-sweep run`; warm: once more
            def predict(folder: str):
                return run_predict(prepare_predict(pconfig, out=SweepDir(Path(out) / folder)), cluster)

            def sweep_all():  # the plan (stability probe, maybe a pilot) is part of the sweep's cost
                job = prepare_empirical(EmpiricalConfig(task=args.task), out=SweepDir(Path(out) / "e"))
                return run_empirical(job, cluster)

            cold = timed(lambda: predict("p1"))
            warm = timed(lambda: predict("p2"))
            sweep = None if args.skip_sweep else timed(sweep_all)
    finally:
        stop_head(tmp)
    probe = pconfig.probe_size or "default"
    print(
        f"task {args.task}, {args.num_cpus} Ray CPUs, predict: {pconfig.checkpoints} checkpoints, probe {probe} "
        f"x {pconfig.shards} shards"
    )
    for name, (cpu, driver, wall, _) in (("predict, cold", cold), ("predict, warm", warm)):
        print(f"{name}: {cpu:.1f} CPU-s ({driver:.1f} in the driver), {wall:.1f} s wall")
    if sweep is not None:
        cpu, _, wall, result = sweep
        inside = sum(r["cpu_seconds"] for r in result.records)
        print(
            f"sweep: {cpu:.1f} CPU-s, {wall:.1f} s wall ({len(result.records)} trials, {inside:.1f} CPU-s inside them)"
        )
        print(f"predict / sweep = {100 * cold[0] / cpu:.2f}% cold, {100 * warm[0] / cpu:.2f}% warm (goal: <= 2%)")


if __name__ == "__main__":
    main()
