"""`predict`: B_simple from per-example gradient statistics along a reference run.

The probe set is cut into shards (one Ray task each) and, independently, into
jackknife blocks; each shard returns the moments of its pieces of each block,
the driver merges them. Merging is exact, so the result and its interval do
not depend on the number of shards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gns_sweep import __version__
from gns_sweep import stats as st
from gns_sweep.errors import UsageError
from gns_sweep.per_example import (
    DEFAULT_ENGINE,
    ENGINES,
    TOTAL,
    ParamLayout,
    SumAccumulator,
    get_engine,
    param_layout,
)
from gns_sweep.per_example.base import check_losses, refuse_coupled_layers
from gns_sweep.progress import ProgressEvent, ProgressFn, no_progress
from gns_sweep.runtime import Cluster, Resources, WorkerInfo
from gns_sweep.storage import PREDICT_FILE, PREDICT_SCHEMA, write_table
from gns_sweep.tasks import Task, load_task
from gns_sweep.train import TrainConfig, eval_loss, init_model, train

ESTIMATOR = "per-example"


@dataclass(frozen=True)
class PredictConfig:
    """Settings of one predict run (all recorded in predict.parquet)."""

    task: str  # built-in name or package.module:attr
    probe_size: int | None = None  # probe examples from the training set (None: min(4096, all))
    shards: int = 4  # Ray tasks per checkpoint
    blocks: int = 16  # jackknife blocks of the probe set (capped at probe_size)
    layer: str | None = None  # report only this layer (and the total)
    warmup_steps: int = 20  # reference-run steps before the first checkpoint
    checkpoints: int = 8  # measurements along the reference run
    seed: int = 0  # initial weights, data order and probe draw
    engine: str = DEFAULT_ENGINE  # per-example engine (see gns_sweep.per_example.ENGINES)
    max_batch: int = 256  # micro-batch size inside a shard: bounds peak memory
    cpus_per_shard: float = 1.0
    gpus_per_shard: float = 0.0


@dataclass(frozen=True)
class ReferenceRun:
    """The small-batch run along which the checkpoints are taken."""

    batch_size: int  # the task's small batch size
    lr: float  # the task's learning rate
    target_loss: float | None  # the task's target eval loss
    steps_to_target: int | None  # first step at or below the target (None: not reached)
    end_step: int  # last step measured (target, budget, or warm-up)
    checkpoint_steps: tuple[int, ...]  # steps at which B_simple was measured


@dataclass(frozen=True)
class ScopeRow:
    """One (checkpoint, scope) measurement: a row of predict.parquet."""

    task: str
    checkpoint: int
    step: int
    examples_seen: int
    train_loss: float
    eval_loss: float
    scope: str
    n_params: int
    n_examples: int
    estimator: str
    engine: str
    grad_sq_norm: float
    grad_sq_norm_biased: float
    trace_sigma: float
    b_simple: float
    b_simple_lo: float
    b_simple_hi: float
    b_simple_lower_bound: float
    resolved: bool
    snr_mean: float


@dataclass(frozen=True)
class LayerFlag:
    """How one layer's noise compares with the reference batch size at the last checkpoint."""

    scope: str
    b_simple: float  # NaN when unresolved
    verdict: str  # "noise-dominated", "signal-dominated" or "unresolved"


@dataclass(frozen=True)
class Headline:
    """The prediction a user acts on, for the total scope."""

    b_simple_window: float  # tr and |G|^2 averaged over the last quarter of checkpoints, then divided
    b_simple_run: float  # the same over every checkpoint
    b_simple_start: float  # at the first checkpoint
    window_checkpoints: tuple[int, ...]  # checkpoints in the window


@dataclass(frozen=True)
class PredictResult:
    task: str
    config: PredictConfig
    reference: ReferenceRun
    rows: tuple[ScopeRow, ...]
    headline: Headline
    layer_flags: tuple[LayerFlag, ...]
    noisiest_layer: str | None  # layer with the largest B_simple (or lower bound) at the last checkpoint
    snr_edges: tuple[float, ...]  # 11 edges of the per-parameter SNR histogram (last checkpoint)
    snr_counts: tuple[int, ...]  # 10 counts
    out_dir: Path | None = field(default=None)


def settings(config: PredictConfig) -> dict:
    return {"command": "predict", "version": __version__, **asdict(config)}


DEFAULT_PROBE = 4096


def validate(config: PredictConfig) -> tuple[Task, PredictConfig]:
    """Check everything that can be checked before any work or any file.

    Returns the task and the config with defaults that depend on it filled in."""
    task = load_task(config.task)
    if config.probe_size is None:
        config = replace(config, probe_size=min(DEFAULT_PROBE, task.n_train))
    if task.n_train < 2:
        raise UsageError(f"task '{task.name}' has {task.n_train} training example; predict needs at least 2")
    if config.probe_size < 2:
        raise UsageError(f"--probe-size {config.probe_size}: need at least 2 examples to estimate a variance")
    if config.probe_size > task.n_train:
        raise UsageError(
            f"--probe-size {config.probe_size} exceeds the {task.n_train} training examples of task "
            f"'{task.name}'; use at most {task.n_train}"
        )
    if config.shards < 1:
        raise UsageError(f"--shards {config.shards}: need at least 1 shard")
    if config.shards > config.probe_size:
        raise UsageError(
            f"--shards {config.shards} is more than the {config.probe_size} probe examples; "
            f"use at most {config.probe_size} shards"
        )
    if config.blocks < 2:
        raise UsageError(f"--blocks {config.blocks}: the jackknife needs at least 2 blocks")
    if config.probe_size - _largest_block(config.probe_size, config.blocks) < 2:
        need = next(  # 2 * blocks always works: blocks of 2
            p for p in range(config.probe_size, 2 * config.blocks + 1) if p - _largest_block(p, config.blocks) >= 2
        )
        raise UsageError(
            f"--probe-size {config.probe_size} in --blocks {config.blocks}: leaving one block out (the jackknife) "
            f"leaves fewer than 2 examples; use --probe-size {need} or more"
        )
    if config.warmup_steps < 0:
        raise UsageError(f"--warmup-steps {config.warmup_steps} must be >= 0")
    budget_steps = max(1, task.budget_examples // task.batch_size)  # where the reference run stops at the latest
    if config.warmup_steps >= budget_steps:
        raise UsageError(
            f"--warmup-steps {config.warmup_steps} is past the end of the reference run (task '{task.name}': "
            f"{budget_steps} steps of batch {task.batch_size} in its budget); use fewer than {budget_steps}"
        )
    if config.checkpoints < 1:
        raise UsageError(f"--checkpoints {config.checkpoints} must be >= 1")
    if config.max_batch < 1:
        raise UsageError(f"--max-batch {config.max_batch} must be >= 1")
    if config.engine not in ENGINES:
        raise UsageError(f"unknown --engine '{config.engine}'; choose one of: {', '.join(ENGINES)}")
    if not (math.isfinite(config.cpus_per_shard) and config.cpus_per_shard > 0):
        raise UsageError(f"--cpus-per-shard {config.cpus_per_shard}: must be a number > 0")
    if not (math.isfinite(config.gpus_per_shard) and config.gpus_per_shard >= 0):
        raise UsageError(f"--gpus-per-shard {config.gpus_per_shard}: must be a number >= 0 (0: CPU only)")
    model = init_model(task, config.seed)  # on the CPU, as the reference run makes it
    # what the shards would refuse after the whole reference run, found now: a layer that couples
    # examples, or a loss that does not return one value per example
    refuse_coupled_layers(model)
    n = min(2, task.n_train)
    with torch.no_grad():
        check_losses(task.loss(model(task.train_inputs[:n].cpu()), task.train_targets[:n].cpu()), n)
    if config.layer is not None:
        layers = param_layout(model).layers()
        if config.layer not in layers:
            raise UsageError(f"unknown --layer '{config.layer}'; layers with trainable parameters: {', '.join(layers)}")
    return task, config


def _largest_block(probe_size: int, blocks: int) -> int:
    e = edges(probe_size, min(blocks, probe_size))
    return max(b - a for a, b in pairwise(e))


def checkpoint_steps(warmup: int, end: int, count: int) -> tuple[int, ...]:
    """`count` distinct steps from warmup to end (extended when the run is too short)."""
    end = max(end, warmup + count - 1)
    if count == 1:
        return (warmup,)
    return tuple(int(round(s)) for s in np.linspace(warmup, end, count))


def reference_run(task: Task, config: PredictConfig, progress: ProgressFn) -> tuple[ReferenceRun, dict[int, dict]]:
    """Find where the reference run ends, then replay it to snapshot the checkpoints."""
    tcfg = TrainConfig(
        batch_size=task.batch_size,
        lr=task.lr,
        budget_examples=task.budget_examples,
        target_loss=task.target_loss,
        seed=config.seed,
    )
    steps_to_target = None
    end = config.warmup_steps
    if config.checkpoints > 1:
        progress(ProgressEvent("reference run", 0, 1))
        first = train(task, tcfg)
        steps_to_target = first.steps_to_target
        end = first.steps
        progress(ProgressEvent("reference run", 1, 1))
    steps = checkpoint_steps(config.warmup_steps, end, config.checkpoints)
    wanted = set(steps)
    snapshots: dict[int, dict] = {}

    def keep(step: int, model: nn.Module) -> None:
        if step in wanted:
            snapshots[step] = copy.deepcopy(model.state_dict())

    # Replay with no target so it reaches the last checkpoint even past the target.
    replay = TrainConfig(**{**asdict(tcfg), "target_loss": None, "budget_examples": (steps[-1] + 1) * task.batch_size})
    train(task, replay, on_step=keep, stop_after=steps[-1])
    ref = ReferenceRun(task.batch_size, task.lr, task.target_loss, steps_to_target, end, steps)
    return ref, snapshots


def probe_indices(task: Task, config: PredictConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.seed + 104729)
    return torch.randperm(task.n_train, generator=gen)[: config.probe_size]


def edges(n: int, parts: int) -> list[int]:
    return [int(round(x)) for x in np.linspace(0, n, parts + 1)]


Unit = tuple[int, int, int]  # (block index, first example, end example): one micro-batch


def micro_batches(n: int, block_edges: Sequence[int], max_batch: int, shards: int) -> list[Unit]:
    """A fixed grid of micro-batches: blocks cut at multiples of max_batch.

    The grid does not depend on the shard count, so every micro-batch is computed
    identically however the work is split, and results agree to rounding in the
    float64 merge. Only when there are more shards than micro-batches are the
    micro-batches halved until every shard gets one.
    """
    cuts = sorted(set(block_edges) | set(range(0, n, max_batch)) | {n})
    units = [(int(np.searchsorted(block_edges, lo, side="right") - 1), lo, hi) for lo, hi in pairwise(cuts)]
    while len(units) < shards:
        units = [piece for b, lo, hi in units for piece in _halve(b, lo, hi)]
    return units


def _halve(b: int, lo: int, hi: int) -> list[Unit]:
    if hi - lo < 2:
        return [(b, lo, hi)]
    mid = (lo + hi) // 2
    return [(b, lo, mid), (b, mid, hi)]


def assign(units: Sequence[Unit], shards: int) -> list[list[Unit]]:
    """Contiguous runs of micro-batches, about equal in examples, none empty."""
    starts = [lo for _, lo, _ in units]
    n = units[-1][2]
    bounds = [0]
    for k in range(1, shards):
        i = int(np.searchsorted(starts, k * n / shards))
        bounds.append(min(max(i, bounds[-1] + 1), len(units) - (shards - k)))
    bounds.append(len(units))
    return [list(units[a:b]) for a, b in pairwise(bounds)]


def probe_shard(
    *,
    model: nn.Module,
    probe: tuple,
    units: Sequence[Unit],
    engine: str,
    param_moments: bool,
    worker: WorkerInfo,
) -> list[tuple[int, st.Moments, float]]:
    """Runs on a worker: the moments of its pieces of each block.

    Consecutive micro-batches of one block are folded into one float64
    accumulator, so a block costs one conversion to Moments, however many
    micro-batches it holds. Returns (block index, moments, loss sum) per piece.
    """
    inputs, targets, loss = probe
    model = model.to(worker.device).train()
    refuse_coupled_layers(model)
    layout = param_layout(model)
    eng = get_engine(engine)
    out: list[tuple[int, st.Moments, float]] = []
    acc, block = None, None
    for b, lo, hi in units:
        if b != block:
            if acc is not None:
                out.append((block, acc.moments(), acc.loss_sum))
            acc, block = SumAccumulator(layout, param_moments=param_moments), b
        x = inputs[lo:hi].to(worker.device)
        y = targets[lo:hi].to(worker.device)
        acc.add(eng.batch_sums(model, x, y, loss, layout, param_moments=param_moments))
    if acc is not None:
        out.append((block, acc.moments(), acc.loss_sum))
    return out


def measure(
    pieces: Sequence[tuple[int, st.Moments, float]], n_blocks: int
) -> tuple[st.Moments, list[st.Moments], float]:
    """Merge shard pieces into blocks, and blocks into the total."""
    by_block: list[list[st.Moments]] = [[] for _ in range(n_blocks)]
    loss_sum = 0.0
    for b, m, ls in pieces:  # in example order: the merge tree is the same for any sharding
        by_block[b].append(m)
        loss_sum += ls
    blocks = [st.merge_all(parts) for parts in by_block]
    return st.merge_all(blocks), blocks, loss_sum


@dataclass(frozen=True)
class Checkpoint:
    """Where a measurement was taken: the columns shared by its rows."""

    task: str
    checkpoint: int  # index along the reference run
    step: int  # SGD steps taken
    examples_seen: int  # step * reference batch size
    eval_loss: float  # eval loss of the weights measured
    engine: str  # per-example engine used


def scope_rows(
    where: Checkpoint, total: st.Moments, blocks: Sequence[st.Moments], loss_sum: float, layout: ParamLayout
) -> list[ScopeRow]:
    """One row per scope: the estimate, its jackknife interval, mean SNR."""
    snr = st.snr(total)
    rows = []
    for scope, groups in layout.scopes.items():
        est = st.estimate_scope(total, groups)
        ci = st.jackknife_interval(total, blocks, groups)
        mask = np.concatenate([np.arange(layout.offsets[g], layout.offsets[g + 1]) for g in groups])
        rows.append(
            ScopeRow(
                **asdict(where),
                train_loss=loss_sum / total.n,
                scope=scope,
                n_params=int(mask.size),
                n_examples=total.n,
                estimator=ESTIMATOR,
                grad_sq_norm=est.grad_sq_norm,
                grad_sq_norm_biased=est.grad_sq_norm_biased,
                trace_sigma=est.trace_sigma,
                b_simple=est.b_simple,
                b_simple_lo=ci.lo,
                b_simple_hi=ci.hi,
                b_simple_lower_bound=est.b_simple_lower,
                resolved=est.resolved,
                snr_mean=float(snr[mask].mean()),
            )
        )
    return rows


def run_predict(
    config: PredictConfig,
    cluster: Cluster,
    *,
    out_dir: Path | None = None,
    progress: ProgressFn = no_progress,
) -> PredictResult:
    """The whole pipeline. Writes DIR/predict.parquet after every checkpoint when out_dir is given."""
    task, config = validate(config)
    resources = Resources(num_cpus=config.cpus_per_shard, num_gpus=config.gpus_per_shard)
    cluster.check_resources(resources)  # fail before any work
    ref, snapshots = reference_run(task, config, progress)
    idx = probe_indices(task, config)
    probe_ref = cluster.put((task.train_inputs[idx].contiguous(), task.train_targets[idx].contiguous(), task.loss))
    n_blocks = min(config.blocks, config.probe_size)
    units = micro_batches(config.probe_size, edges(config.probe_size, n_blocks), config.max_batch, config.shards)
    work = assign(units, config.shards)
    model = init_model(task, config.seed)
    layout = param_layout(model)
    if config.layer is not None:
        layout = layout.restrict(config.layer)
    rows: list[ScopeRow] = []
    last_total = None
    for c, step in enumerate(ref.checkpoint_steps):
        model.load_state_dict(snapshots[step])
        model_ref = cluster.put(model)
        calls = [
            dict(model=model_ref, probe=probe_ref, units=work[k], engine=config.engine, param_moments=True)
            for k in range(config.shards)
        ]
        stage = f"checkpoint {c + 1}/{len(ref.checkpoint_steps)} (step {step}): shards"
        results = cluster.run(probe_shard, calls, resources=resources, stage=stage, progress=progress)
        total, blocks, loss_sum = measure([p for r in results for p in r], n_blocks)
        where = Checkpoint(task.name, c, step, step * ref.batch_size, eval_loss(model, task), config.engine)
        rows += scope_rows(where, total, blocks, loss_sum, layout)
        last_total = total
        if out_dir is not None:
            write_table(Path(out_dir) / PREDICT_FILE, [asdict(r) for r in rows], PREDICT_SCHEMA, settings(config))
    edges_, counts = snr_histogram(st.snr(last_total))
    flags, noisiest = layer_flags(rows, ref.batch_size)
    return PredictResult(
        task=task.name,
        config=config,
        reference=ref,
        rows=tuple(rows),
        headline=headline(rows),
        layer_flags=flags,
        noisiest_layer=noisiest,
        snr_edges=edges_,
        snr_counts=counts,
        out_dir=Path(out_dir) if out_dir is not None else None,
    )


def headline(rows: Sequence[ScopeRow]) -> Headline:
    """Windowed B_simple: the last quarter of the checkpoints (DESIGN.md)."""
    total = sorted((r for r in rows if r.scope == TOTAL), key=lambda r: r.checkpoint)
    k = max(1, math.ceil(len(total) / 4))
    window = total[-k:]
    return Headline(
        b_simple_window=st.windowed_b_simple([r.grad_sq_norm for r in window], [r.trace_sigma for r in window]),
        b_simple_run=st.windowed_b_simple([r.grad_sq_norm for r in total], [r.trace_sigma for r in total]),
        b_simple_start=total[0].b_simple,
        window_checkpoints=tuple(r.checkpoint for r in window),
    )


def layer_flags(rows: Sequence[ScopeRow], batch_size: int) -> tuple[tuple[LayerFlag, ...], str | None]:
    last = max(r.checkpoint for r in rows)
    layers = [r for r in rows if r.checkpoint == last and r.scope != TOTAL]
    flags = []
    for r in layers:
        if not r.resolved:
            verdict = "unresolved"
        elif r.b_simple > batch_size:
            verdict = "noise-dominated"
        else:
            verdict = "signal-dominated"
        flags.append(LayerFlag(r.scope, r.b_simple, verdict))
    noisiest = None
    if layers:
        noisiest = max(layers, key=lambda r: (not r.resolved, r.b_simple if r.resolved else r.b_simple_lower_bound))
        noisiest = noisiest.scope
    return tuple(flags), noisiest


def snr_histogram(snr: np.ndarray, bins: int = 10) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Histogram of per-parameter SNR on log-spaced bins (SNR spans decades)."""
    values = snr[np.isfinite(snr) & (snr > 0)]
    if values.size == 0:
        return tuple(np.linspace(0, 1, bins + 1)), (0,) * bins
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo * 1.0001 + 1e-12
    bin_edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
    bin_edges[0], bin_edges[-1] = lo, hi  # exact ends, so rounding never drops the extremes
    counts, _ = np.histogram(values, bins=bin_edges)
    counts[0] += int((snr == 0).sum())
    return tuple(float(e) for e in bin_edges), tuple(int(c) for c in counts)


@dataclass(frozen=True)
class NoiseRow:
    """The predicted cost of training at batch size B (McCandlish eqs. 2.11-2.12)."""

    batch_size: int
    noise: float  # B_simple / B: > 1 means noise-dominated
    steps_multiplier: float  # S(B)/S_min = 1 + B_simple/B
    examples_multiplier: float  # E(B)/E_min = 1 + B/B_simple


def noise_table(b_simple: float, *, max_batch: int | None = None) -> tuple[NoiseRow, ...]:
    """Powers of two from 1 to a few times B_simple."""
    if not (b_simple > 0 and math.isfinite(b_simple)):
        return ()
    top = max_batch or 2 ** min(24, max(4, math.ceil(math.log2(b_simple)) + 3))
    out, b = [], 1
    while b <= top:
        out.append(NoiseRow(b, b_simple / b, 1 + b_simple / b, 1 + b / b_simple))
        b *= 2
    return tuple(out)
