"""`empirical`: measure steps-to-target over a (batch size, lr, seed) grid, one Ray task per trial.

Every finished trial is written at once to DIR/trials/<trial_id>.parquet; the
consolidated trials.parquet and curves.parquet are rewritten as the sweep goes.
--resume runs only the trials of the plan whose file is missing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gns_sweep import __version__
from gns_sweep.errors import RunError, UsageError
from gns_sweep.progress import ProgressEvent, ProgressFn, no_progress
from gns_sweep.runtime import Cluster, Resources, WorkerInfo
from gns_sweep.storage import (
    PLAN_FILE,
    PLAN_SCHEMA,
    TRIALS_DIR,
    finished_trial_ids,
    read_settings,
    read_trials,
    remove_sweep,
    write_sweep_tables,
    write_table,
    write_trial,
)
from gns_sweep.tasks import Task, load_task
from gns_sweep.train import TrainConfig, train

LR_POINTS = 5  # default lr grid: this many points ...
LR_FACTOR = 2.0  # ... a factor this apart
STABILITY_STEPS = 30  # steps of the stability probe at the largest batch size
PILOT_FRACTION = 0.9  # a pilot-chosen target is this far from the initial to the pilot's best loss
CONSOLIDATE_SECONDS = 5.0  # rewrite trials.parquet / curves.parquet at most this often


@dataclass(frozen=True)
class EmpiricalConfig:
    """What the user asked for; `plan` resolves the defaults."""

    task: str  # built-in name or package.module:attr
    batch_sizes: tuple[int, ...] | None = None  # None: the task's grid
    lrs: tuple[float, ...] | None = None  # explicit lrs, the same at every batch size
    lr_multipliers: tuple[float, ...] | None = None  # multiples of each batch size's centre lr
    seeds: int = 3  # seeds 0..seeds-1
    budget_examples: int | None = None  # None: the task's budget
    target_loss: float | None = None  # None: the task's target, or a pilot's
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class TrialSpec:
    """One (batch size, lr, seed) of the plan."""

    trial_id: str  # stable name, also the file name
    batch_size: int
    lr: float
    seed: int


@dataclass(frozen=True)
class Plan:
    """The resolved sweep: identical plans may resume each other."""

    task: str  # the task's name
    batch_sizes: tuple[int, ...]
    lrs: tuple[tuple[float, ...], ...]  # lr grid of each batch size, same order as batch_sizes
    seeds: tuple[int, ...]
    budget_examples: int  # training examples allowed per trial
    target_loss: float
    target_source: str  # "task", "--target-loss" or "pilot"
    lr_cap: float | None  # centre lrs were capped here (half the largest stable lr); None: explicit lrs
    trials: tuple[TrialSpec, ...] = field(repr=False)

    def key(self) -> dict:
        """What must match for --resume to continue a sweep."""
        return {
            "task": self.task,
            "batch_sizes": list(self.batch_sizes),
            "lrs": [list(g) for g in self.lrs],
            "seeds": list(self.seeds),
            "budget_examples": self.budget_examples,
            "target_loss": self.target_loss,
        }


@dataclass(frozen=True)
class TrialRecord:
    """What one trial did: a row of trials.parquet plus its eval curve."""

    trial_id: str
    task: str
    batch_size: int
    lr: float
    seed: int
    status: str  # reached, budget or diverged
    steps: int
    steps_to_target: int | None
    examples_to_target: int | None
    target_loss: float
    initial_eval_loss: float
    final_eval_loss: float
    best_eval_loss: float
    budget_examples: int
    wall_seconds: float
    cpu_seconds: float
    node_id: str
    device: str
    update_ratio_max: float
    update_ratios: str  # JSON {parameter: ||lr*grad||/||w||}
    curve_steps: tuple[int, ...]
    curve_losses: tuple[float, ...]


@dataclass(frozen=True)
class EmpiricalResult:
    plan: Plan
    records: tuple[dict, ...]  # every trial of the plan on disk, as trials.parquet rows (+ curves)
    resumed: int  # trials found on disk and not run again
    failed: tuple[tuple[str, str], ...]  # (trial_id, error) of trials that crashed
    wall_seconds: float  # of this invocation's trials
    out_dir: Path | None


def trial_id(batch_size: int, lr: float, seed: int) -> str:
    return f"b{batch_size}-lr{lr:.6g}-s{seed}"


def settings(config: EmpiricalConfig, plan: Plan) -> dict:
    return {
        "command": "empirical",
        "version": __version__,
        **plan.key(),
        "target_source": plan.target_source,
        "lr_cap": plan.lr_cap,
        "cpus_per_trial": config.cpus_per_trial,
        "gpus_per_trial": config.gpus_per_trial,
    }


def validate(config: EmpiricalConfig) -> Task:
    """Every check that needs no training, before any file is made."""
    task = load_task(config.task)
    sizes = task.batch_sizes if config.batch_sizes is None else config.batch_sizes
    if not sizes:
        raise UsageError("--batch-sizes is empty; give at least one, e.g. --batch-sizes 8,64,512")
    bad = [b for b in sizes if b < 1]
    if bad:
        raise UsageError(f"--batch-sizes contains {bad[0]}; batch sizes must be positive integers")
    if max(sizes) > task.n_train:
        raise UsageError(
            f"--batch-sizes contains {max(sizes)}, more than the {task.n_train} training examples of task "
            f"'{task.name}'; use batch sizes up to {task.n_train}"
        )
    for name, values in (("--lrs", config.lrs), ("--lrs multiplier", config.lr_multipliers)):
        if values is not None:
            if not values:
                raise UsageError(f"{name} is empty; give at least one learning rate, e.g. --lrs 0.05,0.1,0.2")
            bad_lr = [x for x in values if not (x > 0 and math.isfinite(x))]
            if bad_lr:
                raise UsageError(f"{name} contains {bad_lr[0]:g}; learning rates must be finite and > 0")
    if config.lrs is not None and config.lr_multipliers is not None:
        raise UsageError("give --lrs as values or as multipliers (x0.5,x1,x2), not both")
    if config.seeds < 1:
        raise UsageError(f"--seeds {config.seeds}: need at least 1 seed")
    budget = task.budget_examples if config.budget_examples is None else config.budget_examples
    if budget < max(sizes):
        raise UsageError(
            f"--budget-examples {budget} is smaller than the largest batch size {max(sizes)}, so those trials "
            f"could not take one step; raise --budget-examples to at least {max(sizes)} or drop the large batch sizes"
        )
    if config.target_loss is not None and not math.isfinite(config.target_loss):
        raise UsageError(f"--target-loss {config.target_loss}: give a finite eval loss")
    if not (math.isfinite(config.cpus_per_trial) and config.cpus_per_trial > 0):
        raise UsageError(f"--cpus-per-trial {config.cpus_per_trial:g} must be a number > 0")
    if not (math.isfinite(config.gpus_per_trial) and config.gpus_per_trial >= 0):
        raise UsageError(f"--gpus-per-trial {config.gpus_per_trial:g} must be a number >= 0 (0: CPU only)")
    return task


def stable_lr(task: Task, batch_size: int, *, start: float, steps: int = STABILITY_STEPS) -> float:
    """Largest lr on a factor-2 ladder from `start` whose short run at batch_size ends below its initial loss.

    Linear lr scaling stops working past the curvature's stability limit; the
    default grid is capped below this so large batch sizes are not all diverged.
    """

    def stable(lr: float) -> bool:
        r = train(task, TrainConfig(batch_size, lr, steps * batch_size, None, seed=0), stop_after=steps)
        return r.status != "diverged" and r.final_eval_loss < r.initial_eval_loss

    lr = start
    if stable(lr):
        while lr < start * 2**20 and stable(lr * 2):
            lr *= 2
        return lr
    while lr > start * 2**-20:
        lr /= 2
        if stable(lr):
            return lr
    return lr


def lr_grid(task: Task, batch_size: int, config: EmpiricalConfig, cap: float | None) -> tuple[float, ...]:
    """The task's lr scaled linearly with batch size (capped), times factor-2 multipliers."""
    if config.lrs is not None:
        return tuple(sorted(set(config.lrs)))
    centre = task.lr * batch_size / task.batch_size
    if cap is not None:
        centre = min(centre, cap)
    mults = config.lr_multipliers or tuple(LR_FACTOR**k for k in range(-(LR_POINTS // 2), LR_POINTS - LR_POINTS // 2))
    return tuple(sorted({float(f"{centre * m:.6g}") for m in mults}))


def pilot_target(task: Task, batch_size: int, lr: float, budget: int) -> float:
    """A target most batch sizes can reach: PILOT_FRACTION of the way to the pilot's best loss."""
    r = train(task, TrainConfig(batch_size, lr, budget, None, seed=0))
    finite = [x for x in r.curve_losses if math.isfinite(x)]
    best = min(finite)
    return float(f"{r.initial_eval_loss - PILOT_FRACTION * (r.initial_eval_loss - best):.6g}")


def plan(config: EmpiricalConfig, task: Task | None = None) -> Plan:
    """Resolve defaults (a stability probe for the lr cap, a pilot for a missing target)."""
    task = task or validate(config)
    sizes = tuple(sorted(set(task.batch_sizes if config.batch_sizes is None else config.batch_sizes)))
    budget = task.budget_examples if config.budget_examples is None else config.budget_examples
    cap = None
    if config.lrs is None:
        # Half the largest stable lr: the grid then reaches one step past it.
        cap = stable_lr(task, max(sizes), start=task.lr) / 2
    grids = tuple(lr_grid(task, b, config, cap) for b in sizes)
    if config.target_loss is not None:
        target, source = float(config.target_loss), "--target-loss"
    elif task.target_loss is not None:
        target, source = float(task.target_loss), "task"
    else:
        mid = sizes[len(sizes) // 2]
        grid = grids[len(sizes) // 2]
        target, source = pilot_target(task, mid, grid[len(grid) // 2], budget), "pilot"
    seeds = tuple(range(config.seeds))
    trials = tuple(
        TrialSpec(trial_id(b, lr, s), b, lr, s)
        for b, grid in zip(sizes, grids, strict=True)
        for lr in grid
        for s in seeds
    )
    return Plan(task.name, sizes, grids, seeds, budget, target, source, cap, trials)


def run_trial(
    *, task: Task, trial: TrialSpec, target_loss: float, budget_examples: int, worker: WorkerInfo
) -> TrialRecord:
    """Runs on a worker: one training run, from the seed's initial weights."""
    wall, cpu = time.perf_counter(), time.process_time()
    cfg = TrainConfig(trial.batch_size, trial.lr, budget_examples, target_loss, seed=trial.seed)
    r = train(task, cfg, device=worker.device)
    finite = [x for x in r.curve_losses if math.isfinite(x)]
    return TrialRecord(
        trial_id=trial.trial_id,
        task=task.name,
        batch_size=trial.batch_size,
        lr=trial.lr,
        seed=trial.seed,
        status=r.status,
        steps=r.steps,
        steps_to_target=r.steps_to_target,
        examples_to_target=None if r.steps_to_target is None else r.steps_to_target * trial.batch_size,
        target_loss=target_loss,
        initial_eval_loss=r.initial_eval_loss,
        final_eval_loss=r.final_eval_loss,
        best_eval_loss=min(finite) if finite else math.inf,
        budget_examples=budget_examples,
        wall_seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
        node_id=worker.node_id,
        device=worker.device,
        update_ratio_max=max(r.update_ratios.values(), default=math.nan),
        update_ratios=json.dumps(r.update_ratios),
        curve_steps=r.curve_steps,
        curve_losses=r.curve_losses,
    )


def prepare_out(out_dir: Path, the_plan: Plan, *, resume: bool, overwrite: bool) -> set[str]:
    """Check DIR against the plan; returns the ids already done. Writes nothing."""
    if resume and overwrite:
        raise UsageError("--resume keeps the trials on disk and --overwrite deletes them; pass only one")
    plan_path = Path(out_dir) / PLAN_FILE
    has_sweep = plan_path.exists() or (Path(out_dir) / TRIALS_DIR).is_dir()
    if not has_sweep or overwrite:
        return set()
    if not resume:
        done = len(finished_trial_ids(out_dir))
        raise UsageError(
            f"{out_dir} already holds a sweep ({done} trials done); pass --resume to finish it, "
            "--overwrite to replace it, or choose another --out"
        )
    old = (read_settings(plan_path) or {}) if plan_path.exists() else {}
    new = json.loads(json.dumps(the_plan.key()))
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
        raise UsageError(
            f"--resume: the sweep in {out_dir} was planned with different {', '.join(diff)}; "
            "repeat its options, or pass --overwrite to start again"
        )
    wanted = {t.trial_id for t in the_plan.trials}
    return finished_trial_ids(out_dir) & wanted


def run_empirical(
    config: EmpiricalConfig,
    cluster: Cluster,
    *,
    out_dir: Path | None = None,
    the_plan: Plan | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> EmpiricalResult:
    """The whole sweep. Raises RunError after writing every finished trial if any trial crashed."""
    task = validate(config)
    the_plan = the_plan or plan(config, task)
    done: set[str] = set()
    sets = settings(config, the_plan)
    resources = Resources(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial)
    cluster.check_resources(resources)  # before any file: a missing GPU is bad input
    if out_dir is not None:
        out_dir = Path(out_dir)
        done = prepare_out(out_dir, the_plan, resume=resume, overwrite=overwrite)
        if overwrite:
            remove_sweep(out_dir)
        rows = [
            {"trial_id": t.trial_id, "batch_size": t.batch_size, "lr": t.lr, "seed": t.seed} for t in the_plan.trials
        ]
        write_table(out_dir / PLAN_FILE, rows, PLAN_SCHEMA, {**sets, **the_plan.key()})
    old_rows = read_trials(out_dir, done) if out_dir is not None else []
    todo = [t for t in the_plan.trials if t.trial_id not in done]
    task_ref = cluster.put(task)
    calls = [
        dict(task=task_ref, trial=t, target_loss=the_plan.target_loss, budget_examples=the_plan.budget_examples)
        for t in todo
    ]
    new_rows: list[dict] = []
    failed: list[tuple[str, str]] = []
    last_write = [time.monotonic()]

    def consolidate(force: bool = False) -> None:
        if out_dir is None or not (force or time.monotonic() - last_write[0] > CONSOLIDATE_SECONDS):
            return
        write_sweep_tables(out_dir, old_rows + new_rows, sets)
        last_write[0] = time.monotonic()

    def on_result(i: int, record: TrialRecord, worker: WorkerInfo) -> None:
        row = asdict(record)
        if out_dir is not None:
            write_trial(out_dir, row, sets)
        new_rows.append(row)
        consolidate()

    def on_error(i: int, exc: BaseException) -> None:
        failed.append((todo[i].trial_id, str(exc)))

    start = time.perf_counter()
    if len(done):
        progress(ProgressEvent("trials (resumed: already on disk)", len(done), len(done)))
    try:
        cluster.run(
            run_trial,
            calls,
            resources=resources,
            stage="trials",
            progress=progress,
            on_result=on_result,
            on_error=on_error,
        )
    finally:
        consolidate(force=True)
    wall = time.perf_counter() - start
    if failed:
        tid, msg = failed[0]
        raise RunError(
            f"{len(failed)} of {len(todo)} trials failed (first: {tid}: {msg}); the {len(new_rows) + len(done)} "
            f"finished trials are in {out_dir}; fix the cause and rerun with --resume"
        )
    return EmpiricalResult(
        plan=the_plan,
        records=tuple(old_rows + new_rows),
        resumed=len(done),
        failed=tuple(failed),
        wall_seconds=wall,
        out_dir=out_dir,
    )


def status_counts(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts
