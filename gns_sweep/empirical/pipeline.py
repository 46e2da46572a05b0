"""The sweep as two calls: `prepare_empirical` (checks and the plan, no Ray, writes nothing) and
`run_empirical` (the trials, as Ray tasks).

Every finished trial is written at once, atomically, to DIR/trials/<trial_id>.parquet
(the worker encodes the file, the driver only writes its bytes); that folder is the
resume index. trials.parquet and curves.parquet are made from it when the sweep
ends, also after a failure, Ctrl-C or SIGTERM, by streaming through the trial files
in plan order: nothing is rewritten while the sweep runs, and the driver holds no
curves. Short trials run several to a Ray task (Cluster.stream), each still handed
back, written and counted on its own. A trial whose worker process or node dies is
run again by Ray; one whose own code raises is recorded as failed (with its error)
while the others go on. --resume runs the trials of the plan whose file is missing
or says failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

import pyarrow as pa

from gns_sweep.empirical.config import NONE, EmpiricalConfig, Plan, TrialSpec, settings
from gns_sweep.empirical.planning import make_plan
from gns_sweep.empirical.trial import failed_record, run_trial_file
from gns_sweep.empirical.validate import validate
from gns_sweep.errors import GnsError, RunError, UsageError
from gns_sweep.optim import OptimizerSpec
from gns_sweep.progress import ProgressEvent, ProgressFn, no_progress
from gns_sweep.runtime import Cluster, Resources, WorkerInfo
from gns_sweep.storage import PLAN_SCHEMA, TRIALS_SCHEMA, SweepDir, read_settings, settings_diff, write_table
from gns_sweep.storage.sweep_dir import light_row, trial_metadata
from gns_sweep.tasks import Task, load_task
from gns_sweep.train import FAILED

ROWS_PER_BATCH = 1024  # trial rows the driver gathers before packing them into an Arrow batch


@dataclass(frozen=True)
class EmpiricalJob:
    """A checked sweep: what prepare_empirical resolved, ready for run_empirical."""

    task: Task
    config: EmpiricalConfig
    plan: Plan
    out: SweepDir | None  # where the trials go (None: nowhere)
    done: frozenset[str]  # trial ids of the plan already on disk and not failed (--resume)
    overwrite: bool  # delete a previous sweep in `out` before the first write


@dataclass(frozen=True)
class EmpiricalResult:
    plan: Plan
    records: TrialRows  # every trial of the plan on disk (or run, without --out), as trials.parquet rows
    resumed: int  # trials found on disk and not run again
    wall_seconds: float  # of this invocation's trials
    out: SweepDir | None


class TrialRows(Sequence[dict]):
    """Trial rows (trials.parquet's columns, no curves), in plan order, kept as one Arrow table: dicts are
    made as they are read, so a sweep of any size costs the driver a few hundred bytes per trial."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, i: int) -> dict: ...
    @overload
    def __getitem__(self, i: slice) -> TrialRows: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return TrialRows(self.table.take(pa.array(range(len(self))[i], pa.int64())))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self.table.slice(i % n, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches(max_chunksize=ROWS_PER_BATCH):
            yield from batch.to_pylist()


def prepare_empirical(
    config: EmpiricalConfig,
    *,
    task: Task | None = None,
    out: SweepDir | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> EmpiricalJob:
    """Check the config, plan the sweep (a stability probe and maybe a pilot run, in this process),
    and check the output folder against the plan. Nothing is written."""
    if resume and overwrite:
        raise UsageError("--resume keeps the trials on disk and --overwrite deletes them; pass only one")
    task = task or load_task(config.task)
    validate(config, task)
    plan = make_plan(config, task)
    done = _done(out, plan, resume=resume, overwrite=overwrite) if out is not None else set()
    return EmpiricalJob(task, config, plan, out, frozenset(done), overwrite)


def _done(out: SweepDir, plan: Plan, *, resume: bool, overwrite: bool) -> set[str]:
    """The ids already on disk, once the folder is known to hold this plan's sweep (or none)."""
    if not out.has_sweep() or overwrite:
        return set()
    if not resume:
        raise UsageError(
            f"{out.path} already holds a sweep ({len(out.finished_trial_ids())} trials done); pass --resume to "
            "finish it, --overwrite to replace it, or choose another --out"
        )
    old = (read_settings(out.plan) or {}) if out.plan.exists() else {}
    if old and "optimizer" not in old:  # planned before the optimizer was recorded: plain SGD
        old = {**old, "optimizer": OptimizerSpec().name, "optimizer_settings": OptimizerSpec().key()}
    if old and "schedule" not in old:  # planned before schedule trials existed: fixed trials only
        old = {**old, "schedule": NONE, "schedule_k": None}
    changed = [k for k in settings_diff(old, plan.key()) if k in plan.key()]
    if changed:
        raise UsageError(
            f"--resume: the sweep in {out.path} was planned with different {', '.join(changed)}; "
            "repeat its options, or pass --overwrite to start again"
        )
    on_disk = out.trial_statuses(out.finished_trial_ids() & {t.trial_id for t in plan.trials})
    return {tid for tid, status in on_disk.items() if status != FAILED}  # failed ones run again


def run_empirical(job: EmpiricalJob, cluster: Cluster, *, progress: ProgressFn = no_progress) -> EmpiricalResult:
    """Run the trials not yet on disk. Raises RunError, after writing every trial, if any failed."""
    config = job.config
    resources = Resources(config.cpus_per_trial, config.gpus_per_trial, max_retries=config.max_retries)
    cluster.check_resources(resources)  # before any file: a missing GPU is bad input
    sink = _TrialSink(job)
    todo = [t for t in job.plan.trials if t.trial_id not in job.done]
    shared = dict(
        task=cluster.put(job.task),
        target_loss=job.plan.target_loss,
        budget_examples=job.plan.budget_examples,
        metadata=sink.metadata,
        optimizer=job.plan.optimizer,
    )
    failed: list[tuple[int, str, str]] = []  # (position in todo, trial id, error)

    def on_result(i: int, value: tuple[dict, bytes | None], worker: WorkerInfo) -> None:
        sink.add(*value)

    def on_error(i: int, error: GnsError, worker: WorkerInfo | None) -> None:
        record = failed_record(
            task=job.task.name,
            trial=todo[i],
            target_loss=job.plan.target_loss,
            budget_examples=job.plan.budget_examples,
            error=str(error),
            worker=worker,
            optimizer=job.plan.optimizer,
        )
        failed.append((i, record.trial_id, str(error)))
        sink.add(asdict(record))

    start = time.perf_counter()
    if job.done:
        progress(ProgressEvent("trials (resumed: already on disk)", len(job.done), len(job.done)))
    try:
        cluster.stream(
            run_trial_file,
            [{"trial": t} for t in todo],
            shared=shared,
            resources=resources,
            stage="trials",
            progress=progress,
            on_result=on_result,
            on_error=on_error,
        )
    finally:
        records = sink.finish()
    if failed:
        raise RunError(_failures(sorted(failed), len(todo), job.out))
    wall = time.perf_counter() - start
    return EmpiricalResult(job.plan, records, len(job.done), wall, job.out)


def _failures(failed: list[tuple[int, str, str]], ran: int, out: SweepDir | None) -> str:
    """One line: how many failed, which (in plan order), the first one's error, and what to do."""
    names = ", ".join(tid for _, tid, _ in failed[:5]) + (", ..." if len(failed) > 5 else "")
    where = f"recorded in {out.trials} (status failed, column error)" if out else "not written (no --out)"
    return (
        f"{len(failed)} of {ran} trials failed ({names}); first error: {failed[0][2]}; they are {where}, "
        "the other trials are kept; fix the cause and rerun with --resume to run the failed ones again"
    )


class _TrialSink:
    """Where trials go: their own file at once; trials.parquet and curves.parquet at the end (`finish`).

    The driver keeps each trial's row without its curve, packed into Arrow batches; a trial
    written again (a failed one run anew) replaces its file, and its latest row counts."""

    def __init__(self, job: EmpiricalJob) -> None:
        self.out = job.out
        self.settings = settings(job.config, job.plan)
        self.metadata = None if self.out is None else trial_metadata(self.settings)  # for the workers' files
        # the tables' row order: fixed trials by (batch size, lr, seed), then the schedule trials by seed
        self.order = sorted(job.plan.trials, key=lambda t: (t.schedule is not None, t.batch_size, t.lr, t.seed))
        self.pending: list[dict[str, Any]] = []
        self.batches: list[pa.RecordBatch] = []
        if self.out is not None:
            if job.overwrite:
                self.out.remove_sweep()
            self.out.remove_temporaries()
            write_table(self.out.plan, [_plan_row(t) for t in job.plan.trials], PLAN_SCHEMA, self.settings)

    def add(self, row: Mapping[str, Any], data: bytes | None = None) -> None:
        """A finished trial: its row (with its curve, unless `data` is its file encoded by the worker)."""
        if self.out is not None:
            if data is None:
                self.out.write_trial(row, self.settings)
            else:
                self.out.write_trial_file(row["trial_id"], data)
        self.pending.append(light_row(row))
        if len(self.pending) >= ROWS_PER_BATCH:
            self._pack()

    def _pack(self) -> None:
        if self.pending:
            self.batches.append(pa.RecordBatch.from_pylist(self.pending, schema=TRIALS_SCHEMA))
            self.pending = []

    def finish(self) -> TrialRows:
        """Write trials.parquet and curves.parquet (every planned trial on disk, in plan order) and return
        the rows; without an output folder, the rows of the trials run."""
        self._pack()
        known = pa.Table.from_batches(self.batches, schema=TRIALS_SCHEMA)
        if self.out is None:
            latest = {tid: i for i, tid in enumerate(known.column("trial_id").to_pylist())}
            take = [latest[t.trial_id] for t in self.order if t.trial_id in latest]
            return TrialRows(known.take(pa.array(take, pa.int64())))
        on_disk = self.out.finished_trial_ids()
        ids = [t.trial_id for t in self.order if t.trial_id in on_disk]
        return TrialRows(self.out.consolidate(ids, self.settings, known))


def _plan_row(t: TrialSpec) -> dict[str, Any]:
    return {"trial_id": t.trial_id, "batch_size": t.batch_size, "lr": t.lr, "seed": t.seed, "schedule": t.kind}
