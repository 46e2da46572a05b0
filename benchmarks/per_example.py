"""Cost of per-example gradient statistics, relative to one plain training step.

    python benchmarks/per_example.py          # a table
    python benchmarks/per_example.py --json   # {workload: {method: {"ms", "ratio", "peak_mb", "batch"}}}
    python benchmarks/per_example.py --workloads tinygpt --runs 3 --no-memory   # one workload, timed 3 times
    python benchmarks/per_example.py --workloads tinygpt --batch 256             # at predict's --max-batch
    python benchmarks/per_example.py --workloads tinygpt --threads 1             # as monitor_overhead.py times

norms and moments time the fast engine's call, which ends at BatchSums: the
sum of the per-example gradients (what .grad holds after a plain step), the
per-example squared norms summed per parameter tensor and, for moments, the
per-parameter sums of squares, in float32 torch. predict then folds them into
float64 and makes Moments once per jackknife block (SumAccumulator; with the
default probe of 4096, 16 blocks and --max-batch 256, once per micro-batch).
That is reported beside them: "fold_ms" (median time of one add + moments),
"ratio_with_fold" = (ms + fold_ms) / plain ms, and "fold_peak_mb". norms also
reports "probe_8x_peak_mb": the peak of shard_moments over 8 batches' worth of
examples in micro-batches of one batch, folded into one float64 accumulator --
about the same as one batch, as peak memory is bounded by --max-batch.

Workloads: `mlp` (784-512-512-10, ReLU, batch 256, cross-entropy) and
`transformer` (char model: vocab 96, width 128, 2 blocks of LayerNorm + MLP
128-512-128 with residual, final LayerNorm, Linear to vocab; batch 32 x 64
tokens; per-example loss = mean token cross-entropy), on random data; and
`tinygpt`, the built-in task's model (gns_sweep.tasks.tinygpt: 4 pre-norm
blocks with causal self-attention, 214k parameters) at its initial weights of
seed 0, on 32 real windows of its training text (64 characters each, evenly
spread over the training set), with the task's loss. float32 throughout.
Before timing, each workload prints how the fast engine routes its parameters
(by one layer's rule, summed over several calls, or to the torch.func
fallback), read off the engine's plan in one call.

Methods: `plain` (forward + loss.mean().backward()), `norms` / `moments` (the
fast engine with param_moments False / True), `torch_func` (the general engine),
`loop` (one backward per example); the last two with param_moments=False.

What moments cannot avoid: per-parameter second moments need one more matmul
per Linear, sum_i g_i^2 = (d^2)^T (x^2) (for 2-D input, g_i = d_i x_i^T squares
entrywise to d_i^2 (x_i^2)^T), as large as its weight-gradient matmul.
Where every Linear sees 2-D input (`mlp`), those matmuls alone -- on the
squared tensors of a real step, timed in the same rounds as plain -- are
reported as moments' "matmul_ms" and "matmul_floor_ratio" = (plain ms +
matmul_ms) / plain ms: a floor for any engine that computes them in float32.
What a hook-based engine cannot avoid: on `mlp`, the same rules on bare
forward and tensor hooks, with no routing, checks or statistics objects, are
reported as norms' and moments' "hooks_ms" and "hooks_floor_ratio" = hooks_ms /
plain ms.

Time: median wall time of repeats after warm-up, all methods in this process
(torch's default threads, or `--threads N`). plain, norms and moments are timed in interleaved
rounds (one call of each per round), so drift in machine load hits all three
alike; the slow torch_func and loop get fewer repeats afterwards (see REPEATS).
On `mlp` these two materialise (B, 670k) gradients and are measured at batch 64
(SLOW_BATCH); their ms and peak_mb are scaled by 256/64 -- both grow linearly in
the batch -- and the entry's "batch" says what was run. `--runs N` times the
fast methods N times over and reports the median of the runs' medians and the
range of their ratios to plain ("ratio_range").

Peak memory: each (workload, method) runs in its own subprocess with
MALLOC_MMAP_THRESHOLD_=65536, so large buffers are mmapped and returned to the
OS on free and the resident set follows the live tensors. After one warm-up
call (and with .grad cleared) the kernel's resident high-water mark is reset
(/proc/self/clear_refs), the method runs once with a fresh engine, and
peak_mb = VmHWM - VmRSS before the call: the extra memory of one call
(activations, gradients, the engine's intermediates and float64 buffers, the
returned moments), beyond model and data.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gns_sweep.per_example.fast as fast_engine
from gns_sweep.allocator import keep_freed_memory
from gns_sweep.per_example import SumAccumulator, param_layout, shard_moments
from gns_sweep.per_example.fast import FastEngine
from gns_sweep.per_example.general import GeneralEngine
from gns_sweep.per_example.loop import LoopEngine
from gns_sweep.tasks import tinygpt

METHODS = ("plain", "norms", "moments", "torch_func", "loop")
WORKLOADS = ("mlp", "transformer", "tinygpt")
FAST, SLOW = ("plain", "norms", "moments"), ("torch_func", "loop")
FOLDS = {"norms": "fold_norms", "moments": "fold_moments"}  # the float64 step after each engine method
FLOOR = "moments_matmuls"  # the extra matmuls of second moments alone (see the module docstring)
HOOKS = {"norms": "norms_hooks", "moments": "moments_hooks"}  # the rules on bare hooks, no routing (module docstring)
REPEATS = {"plain": 60, "norms": 60, "moments": 60, "torch_func": 3, "loop": 3, "fold_norms": 60, "fold_moments": 60}
WARMUP = {"plain": 3, "norms": 3, "moments": 3, "torch_func": 1, "loop": 1, "fold_norms": 3, "fold_moments": 3}
for _name in (FLOOR, *HOOKS.values()):
    REPEATS[_name], WARMUP[_name] = 60, 3
BATCH = {"mlp": 256, "transformer": 32, "tinygpt": 32}
SLOW_BATCH = {"mlp": 64, "transformer": 32, "tinygpt": 32}  # batch at which torch_func and loop run


@dataclass(frozen=True)
class Workload:
    model: nn.Module
    inputs: torch.Tensor  # (B, ...)
    targets: torch.Tensor  # (B, ...)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # per-example losses (B,)


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))  # (B, T, D)


class CharModel(nn.Module):
    def __init__(self, vocab: int = 96, width: int = 128, hidden: int = 512, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*(Block(width, hidden) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.blocks(self.embed(ids))))  # (B, T, V)


def token_mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)  # (B,)


def example_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")  # (B,)


def workload(name: str, batch: int | None = None) -> Workload:
    torch.manual_seed(0)
    b = batch or BATCH[name]
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return Workload(model, torch.randn(b, 784), torch.randint(0, 10, (b,)), example_ce)
    if name == "transformer":
        return Workload(CharModel(), torch.randint(0, 96, (b, 64)), torch.randint(0, 96, (b, 64)), token_mean_ce)
    if name == "tinygpt":
        model = tinygpt.TinyGPT()
        (x, y), _ = tinygpt.split()
        pick = torch.linspace(0, x.shape[0] - 1, b).round().long()  # (b,) evenly spread windows
        return Workload(model, x[pick], y[pick], tinygpt.sequence_cross_entropy)
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


PROBE = "probe_8x"  # memory only: norms over 8 batches' examples in micro-batches of one batch, folded


def run_batch(workload_name: str, method_name: str) -> int:
    if method_name == PROBE:
        return 8 * BATCH[workload_name]
    return SLOW_BATCH[workload_name] if method_name in SLOW else BATCH[workload_name]


def method(name: str, w: Workload) -> Callable[[], object]:
    layout = param_layout(w.model)

    def plain():
        w.model.zero_grad(set_to_none=True)
        w.loss(w.model(w.inputs), w.targets).mean().backward()

    def engine(e, param_moments):
        return lambda: e.batch_sums(w.model, w.inputs, w.targets, w.loss, layout, param_moments=param_moments)

    if name in FOLDS.values():
        return fold(w, param_moments=name == FOLDS["moments"])
    if name == PROBE:
        batch = len(w.inputs) // 8
        return lambda: shard_moments(
            FastEngine(), w.model, w.inputs, w.targets, w.loss, layout, max_batch=batch, param_moments=False
        )
    return {
        "plain": plain,
        "norms": engine(FastEngine(), False),
        "moments": engine(FastEngine(), True),
        "torch_func": engine(GeneralEngine(), False),
        "loop": engine(LoopEngine(), False),
    }[name]


def fold(w: Workload, param_moments: bool) -> Callable[[], object]:
    """What predict does with one micro-batch's sums when it is a whole block: float64 Moments."""
    layout = param_layout(w.model)
    sums = FastEngine().batch_sums(w.model, w.inputs, w.targets, w.loss, layout, param_moments=param_moments)

    def run():
        acc = SumAccumulator(layout, param_moments=param_moments)
        acc.add(sums)
        return acc.moments()

    return run


def moments_matmuls(w: Workload) -> Callable[[], object] | None:
    """The (d^2)^T (x^2) matmuls of one step's Linear layers, alone; None unless every Linear input is 2-D."""
    model = copy.deepcopy(w.model)  # hooks on a copy: the timed methods keep the model's hook-free fast path
    squares: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, output):
        x = args[0].detach()
        output.register_hook(lambda d: squares.append((d.square(), x.square())))

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in linears]
    w.loss(model(w.inputs), w.targets).sum().backward()
    for h in handles:
        h.remove()
    if len(squares) != len(linears) or any(x2.dim() != 2 for _, x2 in squares):
        return None
    return lambda: [d2.T @ x2 for d2, x2 in squares]


def rule_hooks(w: Workload, *, param_moments: bool) -> Callable[[], object] | None:
    """The 2-D Linear rule on bare hooks: sums, per-example squared norms and, if asked, (d^2)^T (x^2);
    no routing, no checks.

    None unless the model is a chain of Linear layers (and parameter-free layers) on 2-D input. What
    the engine costs beyond this is its bookkeeping: the graph walk that routes each parameter, the
    plan, the statistics objects."""
    model = copy.deepcopy(w.model)  # hooks on a copy, as in moments_matmuls
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    in_linears = sum(p.numel() for m in linears for p in m.parameters())
    if (
        not isinstance(model, nn.Sequential)
        or w.inputs.dim() != 2
        or in_linears != sum(p.numel() for p in model.parameters())
    ):
        return None

    def norms(d, x):
        d_norms = torch.linalg.vector_norm(d, dim=1).square_()
        x_norms = torch.linalg.vector_norm(x, dim=1).square_()
        return d.T @ x, (x_norms * d_norms).sum(), d.sum(0), d_norms.sum()

    def moments(d, x):
        d2, x2 = d.square(), x.square()
        d_norms = d2.sum(1)
        return d.T @ x, (x2.sum(1) * d_norms).sum(), d2.T @ x2, d.sum(0), d_norms.sum(), d2.sum(0)

    rule = moments if param_moments else norms

    def run():
        sums, handles, outputs = [], [], []

        def forward_hook(module, args, output):
            x = args[0]
            handles.append(output.register_hook(lambda d: sums.append(rule(d, x))))
            outputs.append(output)

        handles.extend(m.register_forward_hook(forward_hook) for m in linears)
        with torch.enable_grad():
            total = w.loss(model(w.inputs), w.targets).sum()
            torch.autograd.grad(total, outputs[0])  # the lowest layer: every hook above it fires on the way
        for h in handles:
            h.remove()
        return sums

    return run


def routes(w: Workload) -> dict[str, list[str]]:
    """The fast engine's plan for this workload: which parameters take one layer's rule, the sum over several
    calls, or the torch.func fallback (read off fast._route in one call)."""
    seen: dict[str, list[str]] = {}
    real = fast_engine._route

    def spy(static, *args, **kwargs):
        single, multi, fallback, planned = real(static, *args, **kwargs)
        names = static.layout.names
        seen.update(rule=[names[g] for g in single], summed=[names[g] for g in multi])
        seen["fallback"] = [names[g] for g in fallback]
        return single, multi, fallback, planned

    fast_engine._route = spy
    try:
        FastEngine().batch_sums(w.model, w.inputs, w.targets, w.loss, param_layout(w.model), param_moments=False)
    finally:
        fast_engine._route = real
    return seen


def time_ms(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median ms per method, the methods interleaved round by round after warm-up."""
    for name, fn in fns.items():
        for _ in range(WARMUP[name]):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(REPEATS[name] for name in fns)):
        for name, fn in fns.items():
            if len(times[name]) < REPEATS[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_mb_child(workload_name: str, method_name: str) -> float:
    """Run in a fresh process: extra resident memory of one call (see the module docstring)."""
    w = workload(workload_name, run_batch(workload_name, method_name))
    method(method_name, w)()  # warm-up: one-time allocations (thread pools, kernels) are not counted
    fn = method(method_name, w)  # a fresh engine: its reusable buffers are counted too
    w.model.zero_grad(set_to_none=True)  # .grad of the warm-up would hide the plain step's own
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(workload_name: str, method_name: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--peak-child", workload_name, method_name, "--batch", str(BATCH[workload_name])]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def run(memory: bool, workloads: tuple[str, ...] = WORKLOADS, runs: int = 1) -> dict[str, dict[str, dict]]:
    results = {}
    for wname in workloads:
        w = workload(wname)
        plan = routes(w)
        fast = {m: method(m, w) for m in FAST}
        floor = moments_matmuls(w)
        if floor is not None:
            fast[FLOOR] = floor
        for m, name in HOOKS.items():
            hooks = rule_hooks(w, param_moments=m == "moments")
            if hooks is not None:
                fast[name] = hooks
        per_run = [time_ms(fast) for _ in range(runs)]  # each run: interleaved rounds of every fast method
        ms = {m: statistics.median(r[m] for r in per_run) for m in fast}
        ratio_range = {
            m: [min(r[m] / r["plain"] for r in per_run), max(r[m] / r["plain"] for r in per_run)] for m in fast
        }
        ms.update(time_ms({m: method(m, w) for m in FOLDS.values()}))
        slow = workload(wname, SLOW_BATCH[wname])
        for m in SLOW:
            ms.update(time_ms({m: method(m, slow)}))
        row = {}
        for m in METHODS:
            batch = run_batch(wname, m)
            scale = BATCH[wname] / batch  # per-example methods: time and memory linear in the batch
            mem = round(scale * peak_mb(wname, m), 1) if memory else None
            row[m] = {"ms": round(scale * ms[m], 2), "peak_mb": mem, "batch": batch}
            if m in FOLDS:
                row[m]["fold_ms"] = round(ms[FOLDS[m]], 2)
                row[m]["fold_peak_mb"] = round(peak_mb(wname, FOLDS[m]), 1) if memory else None
            if m == "norms":  # peak memory does not grow with the probe: micro-batches are folded as they come
                row[m]["probe_8x_peak_mb"] = round(peak_mb(wname, PROBE), 1) if memory else None
        plain_ms = row["plain"]["ms"]
        for m, name in HOOKS.items():
            if name in ms:
                row[m]["hooks_ms"] = round(ms[name], 2)
                row[m]["hooks_floor_ratio"] = round(ms[name] / plain_ms, 3)
        if FLOOR in ms:
            row["moments"]["matmul_ms"] = round(ms[FLOOR], 2)
            row["moments"]["matmul_floor_ratio"] = round((plain_ms + ms[FLOOR]) / plain_ms, 3)
        for m, r in row.items():
            r["ratio"] = round(r["ms"] / plain_ms, 3)
            if m in ratio_range:
                r["ratio_range"] = [round(x, 3) for x in ratio_range[m]]
            if "fold_ms" in r:
                r["ratio_with_fold"] = round((r["ms"] + r["fold_ms"]) / plain_ms, 3)
        results[wname] = row
        results[f"{wname}_routes"] = plan
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--default-malloc", action="store_true", help="time under glibc's default trimming (see gns_sweep.allocator)"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--runs", type=int, default=1, help="time the fast methods this many times over")
    parser.add_argument("--batch", type=int, default=None, help="examples per call instead of each workload's own")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--peak-child", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    chosen = [args.peak_child[0]] if args.peak_child else args.workloads.split(",")
    if args.batch is not None:
        for name in set(chosen) & set(WORKLOADS):
            BATCH[name], SLOW_BATCH[name] = args.batch, min(SLOW_BATCH[name], args.batch)
    if args.peak_child:
        print(peak_mb_child(*args.peak_child))
        return
    kept = False if args.default_malloc else keep_freed_memory()
    workloads = tuple(args.workloads.split(","))
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    results = run(memory=not args.no_memory, workloads=workloads, runs=args.runs)
    results["settings"] = {"freed_memory_kept": kept, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms and MB scaled to the full batch")
    print("freed memory kept (gns_sweep.allocator)" if kept else "glibc's default malloc trimming")
    for wname in workloads:
        row, plan = results[wname], results[f"{wname}_routes"]
        print(f"\n{wname} (batch {BATCH[wname]}): the fast engine takes {len(plan['rule'])} parameters by a rule, "
              f"{len(plan['summed'])} summed over calls, {len(plan['fallback'])} by torch.func "
              f"{plan['fallback'] or ''}")  # fmt: skip
        print(f"  {'':12s}       ms  x plain  peak MB  batch | fold ms  x plain  fold MB")
        for mname, r in row.items():
            mem = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            line = f"  {mname:12s} {r['ms']:8.2f} {r['ratio']:8.2f} {mem:>8s}  {r['batch']:5d}"
            if "ratio_range" in r and args.runs > 1:
                line += f"  [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f} over {args.runs} runs]"
            if "fold_ms" in r:
                fmem = "-" if r["fold_peak_mb"] is None else f"{r['fold_peak_mb']:.1f}"
                line += f" | {r['fold_ms']:7.2f} {r['ratio_with_fold']:8.2f} {fmem:>8s}"
            if "hooks_floor_ratio" in r:
                line += f"   (the rule on bare hooks: {r['hooks_floor_ratio']:.2f}x)"
            if "matmul_floor_ratio" in r:
                line += f"   (its extra matmuls alone: floor {r['matmul_floor_ratio']:.2f}x)"
            if r.get("probe_8x_peak_mb") is not None:
                line += f"   (8x the examples in micro-batches: {r['probe_8x_peak_mb']:.1f} MB)"
            print(line)


if __name__ == "__main__":
    main()
