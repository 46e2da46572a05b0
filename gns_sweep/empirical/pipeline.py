"""The sweep as two calls: `prepare_empirical` (checks and the plan, no Ray, writes nothing) and
`run_empirical` (one Ray task per trial).

Every finished trial is written at once to DIR/trials/<trial_id>.parquet; the
consolidated trials.parquet and curves.parquet are rewritten as the sweep goes.
A trial whose worker process or node dies is run again by Ray; one whose own
code raises is recorded as failed (with its error) while the others go on.
--resume runs the trials of the plan whose file is missing or says failed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from gns_sweep.empirical.config import EmpiricalConfig, Plan, TrialSpec, settings
from gns_sweep.empirical.planning import make_plan
from gns_sweep.empirical.trial import TrialRecord, failed_record, run_trial
from gns_sweep.empirical.validate import validate
from gns_sweep.errors import GnsError, RunError, UsageError
from gns_sweep.progress import ProgressEvent, ProgressFn, no_progress
from gns_sweep.runtime import Cluster, Resources, WorkerInfo
from gns_sweep.storage import PLAN_SCHEMA, SweepDir, read_settings, settings_diff, write_table
from gns_sweep.tasks import Task, load_task
from gns_sweep.train import FAILED

CONSOLIDATE_SECONDS = 5.0  # rewrite trials.parquet / curves.parquet at most this often


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
    records: tuple[dict, ...]  # every trial of the plan on disk, as trials.parquet rows (+ curves)
    resumed: int  # trials found on disk and not run again
    wall_seconds: float  # of this invocation's trials
    out: SweepDir | None


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
    task_ref = cluster.put(job.task)
    calls = [
        dict(task=task_ref, trial=t, target_loss=job.plan.target_loss, budget_examples=job.plan.budget_examples)
        for t in todo
    ]
    failed: list[TrialRecord] = []

    def on_error(i: int, error: GnsError, worker: WorkerInfo | None) -> None:
        record = failed_record(
            task=job.task.name,
            trial=todo[i],
            target_loss=job.plan.target_loss,
            budget_examples=job.plan.budget_examples,
            error=str(error),
            worker=worker,
        )
        failed.append(record)
        sink.add(record)

    start = time.perf_counter()
    if job.done:
        progress(ProgressEvent("trials (resumed: already on disk)", len(job.done), len(job.done)))
    try:
        cluster.run(
            run_trial,
            calls,
            resources=resources,
            stage="trials",
            progress=progress,
            on_result=lambda i, record, worker: sink.add(record),
            on_error=on_error,
        )
    finally:
        sink.consolidate(force=True)
    if failed:
        raise RunError(_failures(failed, len(todo), job.out))
    wall = time.perf_counter() - start
    return EmpiricalResult(job.plan, tuple(sink.rows.values()), len(job.done), wall, job.out)


def _failures(failed: list[TrialRecord], ran: int, out: SweepDir | None) -> str:
    """One line: how many failed, which, the first error, and what to do."""
    names = ", ".join(r.trial_id for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
    where = f"recorded in {out.trials} (status failed, column error)" if out else "not written (no --out)"
    return (
        f"{len(failed)} of {ran} trials failed ({names}); first error: {failed[0].error}; they are {where}, "
        "the other trials are kept; fix the cause and rerun with --resume to run the failed ones again"
    )


class _TrialSink:
    """Where trials go: their own file at once, the consolidated tables now and then; one row per trial id,
    so a trial written again (a failed one run anew) replaces its row."""

    def __init__(self, job: EmpiricalJob) -> None:
        self.out = job.out
        self.settings = settings(job.config, job.plan)
        self.rows: dict[str, dict[str, Any]] = {}
        self.last_write = time.monotonic()
        if self.out is not None:
            if job.overwrite:
                self.out.remove_sweep()
            write_table(self.out.plan, [_plan_row(t) for t in job.plan.trials], PLAN_SCHEMA, self.settings)
            planned = {t.trial_id for t in job.plan.trials}
            on_disk = self.out.read_trials(self.out.finished_trial_ids() & planned)  # failed ones too, until rerun
            self.rows = {row["trial_id"]: row for row in on_disk}

    def add(self, record: TrialRecord) -> None:
        row = asdict(record)
        if self.out is not None:
            self.out.write_trial(row, self.settings)
        self.rows[record.trial_id] = row
        self.consolidate()

    def consolidate(self, force: bool = False) -> None:
        if self.out is None or not (force or time.monotonic() - self.last_write > CONSOLIDATE_SECONDS):
            return
        self.out.write_sweep_tables(list(self.rows.values()), self.settings)
        self.last_write = time.monotonic()


def _plan_row(t: TrialSpec) -> dict[str, Any]:
    return {"trial_id": t.trial_id, "batch_size": t.batch_size, "lr": t.lr, "seed": t.seed}
