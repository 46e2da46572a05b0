"""What GnsMonitor costs a training step, on the tinygpt task's model and data.

    python benchmarks/monitor_overhead.py                  # a table
    python benchmarks/monitor_overhead.py --json           # {"ms": {...}, "ratios": {...}}
    python benchmarks/monitor_overhead.py --rounds 40 --batch 32 --micro-batches 4
    python benchmarks/monitor_overhead.py --ddp            # the data-parallel estimator, 2 ranks

Five kinds of training step, each on its own copy of TinyGPT (torch's default
initialisation, seed 0) with torch.optim.SGD, on the same batch of BATCH windows
of the tinygpt training set (a different batch every round):

- `plain`: zero_grad, loss_fn(model(x), y).mean().backward(), optimizer.step();
- `per-example`: zero_grad, monitor.forward_backward(x, y) (the fast engine's
  per-example norms), optimizer.step();
- `per-example/4`: the same with GnsMonitor(..., every=4), which measures one
  step in 4 and takes a plain backward in the others (a steady rotation: the
  ratio's range covers both kinds of round);
- `accumulate`: zero_grad, MICRO micro-batches of the same batch, each
  (loss.mean() / MICRO).backward(), optimizer.step() -- plain gradient accumulation;
- `accumulate+monitor`: the same with monitor.micro_batch(b) after each backward
  and monitor.update() before the step (the micro-batch estimator).

The ratios are per-example / plain, per-example/4 / plain and
accumulate+monitor / accumulate: the monitor against the step it replaces. All
five run in interleaved rounds (one
call of each per round, in a rotating order), so drift in the machine's load
hits them alike; each ratio is taken within a round (per-example/4's within a
block of 4 rounds, which holds one measuring step), and the table gives the
median over the rounds with the range of the middle 80 % of rounds, in wall
time and in CPU time of the process (which another process's load on a shared
machine disturbs less; the verdict reads it). Goals: per-example <= 1.25x,
micro-batch <= 1.05x.
`--threads N` sets torch's threads (default: torch's own).

`--ddp` times instead two kinds of DistributedDataParallel step in 2 spawned
processes (gloo on loopback, 1 torch thread each), each rank on its own
BATCH/2 windows: `ddp` (zero_grad, backward, optimizer.step()) and
`ddp+monitor` (the same with GnsMonitor(ddp_model) and monitor.update(n)), in
interleaved rounds that start with a barrier; the ratio is rank 0's
ddp+monitor / ddp per round. Goal: <= 1.05x.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from gns_sweep.monitor import GnsMonitor
from gns_sweep.tasks import tinygpt

BATCH = 32  # windows of 64 characters per step: the largest batch of the tinygpt grid
MICRO = 4  # micro-batches of gradient accumulation
ROUNDS = 30
WARMUP = 3  # rounds not timed: the engine's first call reads the model and probes its batch dimension
EVERY = 4  # the per-example monitor of `per-example/4` measures one step in EVERY
METHODS = ("plain", "per-example", "per-example/4", "accumulate", "accumulate+monitor")
RATIOS = {  # name: (method, baseline, rounds per block: the ratio is taken over blocks of this many rounds)
    "per-example": ("per-example", "plain", 1),
    "per-example/4": ("per-example/4", "plain", EVERY),  # a block holds one measuring call and three plain ones
    "micro-batch": ("accumulate+monitor", "accumulate", 1),
}
GOALS = {"per-example": 1.25, "per-example/4": 1.25, "micro-batch": 1.05}
DDP_METHODS = ("ddp", "ddp+monitor")
DDP_RATIOS = {"data-parallel": ("ddp+monitor", "ddp", 1)}
DDP_GOALS = {"data-parallel": 1.05}
RANKS = 2


def steps(micro: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    """The four step functions, each with its own model and optimizer."""
    torch.manual_seed(0)
    base = tinygpt.TinyGPT()
    loss_fn = tinygpt.sequence_cross_entropy
    models = {m: copy.deepcopy(base) for m in METHODS}
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-3) for m in METHODS}
    per_example = GnsMonitor(models["per-example"], loss=loss_fn)
    sparse = GnsMonitor(models["per-example/4"], loss=loss_fn, every=EVERY)
    micro_monitor = GnsMonitor(models["accumulate+monitor"])

    def plain(x, y):
        opts["plain"].zero_grad()
        loss_fn(models["plain"](x), y).mean().backward()
        opts["plain"].step()

    def monitored(name: str, monitor: GnsMonitor):
        def step(x, y):
            opts[name].zero_grad()
            monitor.forward_backward(x, y)
            opts[name].step()

        return step

    def accumulate(name: str, monitor: GnsMonitor | None):
        model, opt = models[name], opts[name]

        def step(x, y):
            opt.zero_grad()
            for xb, yb in zip(x.tensor_split(micro), y.tensor_split(micro), strict=True):
                (loss_fn(model(xb), yb).mean() / micro).backward()
                if monitor is not None:
                    monitor.micro_batch(xb.shape[0])
            if monitor is not None:
                monitor.update()
            opt.step()

        return step

    return {
        "plain": plain,
        "per-example": monitored("per-example", per_example),
        "per-example/4": monitored("per-example/4", sparse),
        "accumulate": accumulate("accumulate", None),
        "accumulate+monitor": accumulate("accumulate+monitor", micro_monitor),
    }


def measure(batch: int, micro: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each method, per timed round: {"wall": {method: [...]}, "cpu": {...}}."""
    fns = steps(micro)
    (x_all, y_all), _ = tinygpt.split()
    times: dict[str, dict[str, list[float]]] = {"wall": {m: [] for m in METHODS}, "cpu": {m: [] for m in METHODS}}
    for r in range(WARMUP + rounds):
        idx = torch.arange(r * batch, (r + 1) * batch) % x_all.shape[0]
        x, y = x_all[idx], y_all[idx]
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]  # rotating: no method always first
        for m in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[m](x, y)
            if r >= WARMUP:
                times["wall"][m].append(time.perf_counter() - wall)
                times["cpu"][m].append(time.process_time() - cpu)
    return times


def _ddp_rank(rank: int, store: str, out: str, batch: int, rounds: int) -> None:
    """One rank of measure_ddp; rank 0 writes its times to out (JSON)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, RANKS), rank=rank, world_size=RANKS)
    try:
        torch.manual_seed(0)
        base = tinygpt.TinyGPT()
        loss_fn = tinygpt.sequence_cross_entropy
        models = {m: torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base)) for m in DDP_METHODS}
        opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-3) for m in DDP_METHODS}
        monitor = GnsMonitor(models["ddp+monitor"])
        (x_all, y_all), _ = tinygpt.split()
        local = batch // RANKS
        times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in DDP_METHODS} for c in ("wall", "cpu")}
        for r in range(WARMUP + rounds):
            idx = (torch.arange(local) + (r * RANKS + rank) * local) % x_all.shape[0]  # each rank its own windows
            x, y = x_all[idx], y_all[idx]
            for m in DDP_METHODS[r % 2 :] + DDP_METHODS[: r % 2]:
                dist.barrier()  # both ranks start the step together: no wait for the other carried over
                wall, cpu = time.perf_counter(), time.process_time()
                opts[m].zero_grad()
                loss_fn(models[m](x), y).mean().backward()
                if m == "ddp+monitor":
                    monitor.update(local)
                opts[m].step()
                if r >= WARMUP:
                    times["wall"][m].append(time.perf_counter() - wall)
                    times["cpu"][m].append(time.process_time() - cpu)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def measure_ddp(batch: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Rank 0's seconds per DDP step, per timed round, as measure() gives them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        args = (os.path.join(tmp, "store"), out, batch, rounds)
        torch.multiprocessing.spawn(_ddp_rank, args=args, nprocs=RANKS, join=True)
        with open(out) as f:
            return json.load(f)


def summarise(times: dict[str, dict[str, list[float]]], ratio_defs: dict = RATIOS) -> dict:
    """Median ms per method, and each ratio's median and middle-80 % range over the rounds, per clock."""
    out = {}
    for clock, per_method in times.items():
        ratios = {}
        for name, (num, den, block) in ratio_defs.items():
            a, b = per_method[num], per_method[den]
            cut = range(0, len(a) - block + 1, block)
            per_round = sorted(sum(a[i : i + block]) / sum(b[i : i + block]) for i in cut)
            k = len(per_round) // 10  # the middle 80 %
            ratios[name] = {"median": statistics.median(per_round), "lo": per_round[k], "hi": per_round[-1 - k]}
        out[clock] = {"ms": {m: 1e3 * statistics.median(t) for m, t in per_method.items()}, "ratios": ratios}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--micro-batches", type=int, default=MICRO)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ddp", action="store_true", help="time DDP steps in 2 ranks instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ddp:
        methods, goals = DDP_METHODS, DDP_GOALS
        result = summarise(measure_ddp(args.batch, args.rounds), DDP_RATIOS)
        title = f"{RANKS} ranks x {args.batch // RANKS} windows, 1 torch thread each"
    else:
        methods, goals = METHODS, GOALS
        result = summarise(measure(args.batch, args.micro_batches, args.rounds))
        title = f"{args.micro_batches} micro-batches, {torch.get_num_threads()} torch threads"
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"tinygpt, batch {args.batch} x {tinygpt.CONTEXT} tokens, {title}, {args.rounds} rounds")
    print(f"  {'method':<20} {'wall ms':>9} {'cpu ms':>9}   (medians)")
    for m in methods:
        print(f"  {m:<20} {result['wall']['ms'][m]:9.1f} {result['cpu']['ms'][m]:9.1f}")
    for name, goal in goals.items():
        cells = []
        for clock in ("wall", "cpu"):
            r = result[clock]["ratios"][name]
            cells.append(f"{clock} {r['median']:.3f}x [{r['lo']:.3f}-{r['hi']:.3f}]")
        met = "met" if result["cpu"]["ratios"][name]["median"] <= goal else "missed"
        print(f"  {name:<20} {'   '.join(cells)}   goal <= {goal:.2f}x (cpu median): {met}")


if __name__ == "__main__":
    main()
