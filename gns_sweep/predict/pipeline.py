"""predict as two calls: `prepare_predict` (checks, no Ray, writes nothing) and `run_predict` (the work).

The probe set is cut into shards (one Ray task each) and, independently, into
jackknife blocks; each shard returns the moments of its pieces of each block,
the driver merges them. Merging is exact, so the result and its interval do
not depend on the number of shards.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

from gns_sweep import stats as st
from gns_sweep.errors import UsageError
from gns_sweep.per_example import ParamLayout, param_layout
from gns_sweep.predict.config import MICRO_BATCH, PredictConfig, recorded_settings, sample_size, settings
from gns_sweep.predict.reference import ReferenceRun, reference_run
from gns_sweep.predict.report import LayerFlag, layer_flags, snr_histogram
from gns_sweep.predict.shards import Unit, assign, edges, micro_batches, probe_indices
from gns_sweep.predict.validate import validate
from gns_sweep.predict.worker import Checkpoint, Piece, flat_preconditioner, measure, probe_checkpoints, scope_rows
from gns_sweep.progress import ProgressFn, no_progress
from gns_sweep.results import NORM, Headline, ScopeRow, headline
from gns_sweep.runtime import Cluster, Resources, WorkerInfo
from gns_sweep.storage import (
    PREDICT_FILE_SCHEMA,
    SweepDir,
    check_output,
    read_rows,
    settings_diff,
    write_table,
)
from gns_sweep.tasks import Task, load_task
from gns_sweep.train import init_model


@dataclass(frozen=True)
class PredictJob:
    """A checked predict run: what prepare_predict resolved, ready for run_predict."""

    task: Task
    config: PredictConfig  # with the task's defaults filled in
    out: SweepDir | None  # where predict.parquet goes (None: nowhere)
    kept: bool = False  # --resume found this run finished on disk: nothing to do
    note: str | None = None  # what the user should know about the file on disk


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
    node_ids: tuple[tuple[str, ...], ...] = ()  # per checkpoint: the Ray nodes that ran its shards
    norm_headline: Headline | None = None  # the headline of the normalization layers' parameters alone
    precond_headline: Headline | None = None  # tr(P Sigma)/G'PG averaged likewise (adaptive optimizers only)
    out: SweepDir | None = field(default=None)


def prepare_predict(
    config: PredictConfig,
    *,
    task: Task | None = None,
    out: SweepDir | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> PredictJob:
    """Check the config, the task and the output folder; no training, no Ray, nothing written.

    With resume, a finished predict.parquet of the same settings is kept, an interrupted or
    unreadable one is computed again, and one of other settings is refused, naming what differs."""
    if resume and overwrite:
        raise UsageError("--resume keeps what is on disk and --overwrite replaces it; pass only one")
    task = task or load_task(config.task)
    config = validate(config, task)
    job = PredictJob(task, config, out)
    if out is None:
        return job
    if resume and out.predict.exists():
        return _resumed(job)
    check_output(out.predict, settings(config), overwrite=overwrite, recorded=recorded_settings)
    return job


def _resumed(job: PredictJob) -> PredictJob:
    path = job.out.predict
    try:
        rows = read_rows(path)
        done, planned = {r["checkpoint"] for r in rows}, max(r["n_checkpoints"] for r in rows)
    except Exception as exc:  # any damage: the file is only a cache of work that can be redone
        return PredictJob(job.task, job.config, job.out, note=f"cannot read {path} ({type(exc).__name__})")
    changed = settings_diff(recorded_settings(path), settings(job.config))
    if changed:
        raise UsageError(
            f"{path} holds a different predict run (differs in: {', '.join(changed)}); with --resume repeat "
            "the first run's options, or pass --overwrite instead of --resume to start again"
        )
    if len(done) < planned:
        return PredictJob(job.task, job.config, job.out, note=f"{path} has {len(done)} of {planned} checkpoints")
    return PredictJob(job.task, job.config, job.out, kept=True)


def run_predict(job: PredictJob, cluster: Cluster, *, progress: ProgressFn = no_progress) -> PredictResult:
    """The reference run, then every checkpoint's probe on the cluster, all checkpoints at once;
    predict.parquet is rewritten as each checkpoint completes."""
    task, config = job.task, job.config
    resources = Resources(config.cpus_per_shard, config.gpus_per_shard, max_retries=config.max_retries)
    cluster.check_resources(resources)  # fail before any work
    ref, snapshots = reference_run(
        task,
        seed=config.seed,
        warmup_steps=config.warmup_steps,
        checkpoints=config.checkpoints,
        progress=progress,
        optimizer=config.optimizer,
    )
    model = init_model(task, config.seed)
    layout = param_layout(model) if config.layer is None else param_layout(model).restrict(config.layer)
    n_blocks, work = probe_grid(config)
    steps = ref.checkpoint_steps
    groups = checkpoint_groups(len(steps) * len(work), _slots(cluster.resources(), resources))
    shared = dict(
        model=cluster.put(model),  # the architecture, once; each task loads its checkpoints' weights
        data=cluster.put((task.train_inputs, task.train_targets, task.loss)),  # the training set, once
        engine=config.engine,
        micro_batch=sample_size(config),
        param_moments=True,
    )
    updates = [snapshots[s].updates for s in steps]
    # An adaptive optimizer's P per checkpoint, flattened in layout order: the rows are made here, from the
    # merged moments, so P never goes to the workers (preconditioning is a rescaling of the moments).
    preconds = {
        c: flat_preconditioner(snapshots[s].preconditioner, layout)
        for c, s in enumerate(steps)
        if snapshots[s].preconditioner is not None
    }
    calls, owner = [], []
    for chunk in groups_of(len(steps), groups, len(work)):
        states = cluster.put([snapshots.pop(steps[c]).state for c in chunk])  # one copy for every shard
        probes = [probe_indices(task.n_train, config.probe_size, config.seed, c) for c in chunk]
        for k, units_k in enumerate(work):
            calls.append(dict(shared, states=states, probes=probes, units=units_k))
            owner.append([(c, k) for c in chunk])
    gather = _Gather(job, ref, layout, n_blocks, shards=len(work), updates=updates, preconds=preconds)

    def done(i: int, parts: list[list[Piece]], worker: WorkerInfo) -> None:
        for (c, k), pieces in zip(owner[i], parts, strict=True):
            gather.add(c, k, pieces, worker.node_id)

    cluster.run(
        probe_checkpoints,
        calls,
        resources=resources,
        stage=f"{len(steps)} checkpoints x {len(work)} shards in {len(calls)} tasks",
        progress=progress,
        on_result=done,
    )
    return _result(job, ref, gather, st.snr(gather.last_total, micro_batch=sample_size(config)))


TASKS_PER_SLOT = 4  # checkpoints are grouped into about this many tasks per CPU slot: balance vs overhead


def _slots(have: dict[str, float], each: Resources) -> int:
    """How many tasks of this size the cluster runs at once."""
    slots = int(have.get("CPU", 1) // each.num_cpus)
    if each.num_gpus > 0:
        slots = min(slots, int(have.get("GPU", 0) // each.num_gpus))
    return max(slots, 1)


def checkpoint_groups(units: int, slots: int) -> int:
    """How many tasks to run the (checkpoint, shard) units in: a few per slot, never more than the units."""
    return max(1, min(units, TASKS_PER_SLOT * slots))


def groups_of(checkpoints: int, groups: int, shards: int) -> list[list[int]]:
    """Consecutive runs of checkpoints, one task per run and shard: `groups` tasks in all, about."""
    runs = max(1, min(checkpoints, groups // shards))
    bounds = [round(i * checkpoints / runs) for i in range(runs + 1)]
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def probe_grid(config: PredictConfig) -> tuple[int, list[list[Unit]]]:
    """(jackknife blocks, each shard's micro-batches) of one checkpoint's probe.

    The grid is laid out in samples (examples, or micro-batches of b), so no block, micro-batch or
    shard splits a sample."""
    b = sample_size(config)
    n = config.probe_size // b
    n_blocks = min(config.blocks, n)
    units = micro_batches(n, edges(n, n_blocks), max(1, config.max_batch // b), config.shards)
    return n_blocks, assign([(blk, lo * b, hi * b) for blk, lo, hi in units], config.shards)


class _Gather:
    """Checkpoints complete in any order; each one's rows are made once all its shards are in."""

    def __init__(
        self,
        job: PredictJob,
        ref: ReferenceRun,
        layout: ParamLayout,
        n_blocks: int,
        *,
        shards: int,
        updates: list,
        preconds: dict[int, np.ndarray] | None = None,
    ):
        self.job, self.ref, self.layout, self.n_blocks, self.shards = job, ref, layout, n_blocks, shards
        self.updates = updates  # per checkpoint: the reference run's step sizes there
        self.preconds = dict(preconds or {})  # checkpoint -> (P,) preconditioner; dropped once its rows are made
        self.had_precond = bool(self.preconds)  # the optimizer is adaptive: the rows hold the *_precond columns
        self.pieces: dict[int, dict[int, list[Piece]]] = {}  # checkpoint -> shard -> its pieces
        self.nodes: dict[int, dict[int, str]] = {}  # checkpoint -> shard -> the node that ran it
        self.done: dict[int, list[ScopeRow]] = {}
        self.last_total: st.Moments | None = None

    def add(self, c: int, k: int, pieces: list[Piece], node_id: str) -> None:
        got = self.pieces.setdefault(c, {})
        got[k] = pieces  # by shard: a shard Ray ran twice still counts once
        self.nodes.setdefault(c, {})[k] = node_id
        if len(got) < self.shards:
            return
        # shards finish in any order: merge in example order, so the result does not depend on it
        ordered = [p for shard in sorted(got) for p in got[shard]]
        del self.pieces[c]
        total, blocks, loss_sum = measure(ordered, self.n_blocks)
        ref, config = self.ref, self.job.config
        step, b = ref.checkpoint_steps[c], sample_size(config)
        where = Checkpoint(
            task=self.job.task.name,
            checkpoint=c,
            step=step,
            examples_seen=step * ref.batch_size,
            eval_loss=ref.checkpoint_eval_losses[c],
            engine=MICRO_BATCH if b > 1 else config.engine,
            n_checkpoints=len(ref.checkpoint_steps),
            estimator=config.estimator,
            micro_batch=b,
        )
        self.done[c] = scope_rows(
            where,
            total,
            blocks,
            loss_sum,
            self.layout,
            self.updates[c],
            optimizer=ref.optimizer.name,
            preconditioner=self.preconds.pop(c, None),
        )
        if c == len(self.ref.checkpoint_steps) - 1:
            self.last_total = total
        if self.job.out is not None:
            write_rows(self.job.out, self.rows(), self.node_ids(), self.job.config)

    def rows(self) -> list[ScopeRow]:
        return [r for c in sorted(self.done) for r in self.done[c]]

    def node_ids(self) -> dict[int, tuple[str, ...]]:
        """Per finished checkpoint: the nodes that ran its shards, sorted."""
        return {c: tuple(sorted(set(self.nodes[c].values()))) for c in sorted(self.done)}


def write_rows(
    out: SweepDir, rows: list[ScopeRow], node_ids: dict[int, tuple[str, ...]], config: PredictConfig
) -> None:
    table = [{**asdict(r), "node_ids": list(node_ids.get(r.checkpoint, ()))} for r in rows]
    write_table(out.predict, table, PREDICT_FILE_SCHEMA, settings(config))


def _result(job: PredictJob, ref: ReferenceRun, gather: _Gather, last_snr) -> PredictResult:
    rows = gather.rows()
    edges_, counts = snr_histogram(last_snr)
    flags, noisiest = layer_flags(rows, ref.batch_size)
    return PredictResult(
        task=job.task.name,
        config=job.config,
        reference=ref,
        rows=tuple(rows),
        headline=headline(rows),
        layer_flags=flags,
        noisiest_layer=noisiest,
        snr_edges=edges_,
        snr_counts=counts,
        node_ids=tuple(gather.node_ids().values()),
        norm_headline=headline(rows, scope=NORM) if any(r.scope == NORM for r in rows) else None,
        precond_headline=headline(rows, preconditioned=True) if gather.had_precond else None,
        out=job.out,
    )
