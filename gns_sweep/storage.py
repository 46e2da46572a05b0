"""The only Parquet code: schemas, atomic writes, the settings a file was made with.

Every file carries the settings of the run that made it as JSON in the Parquet
key-value metadata (key `gns_sweep.settings`), so a result can be traced to its
command. Writes go to a temporary file in the same folder and are renamed into
place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gns_sweep.errors import UsageError

SETTINGS_KEY = b"gns_sweep.settings"

PREDICT_FILE = "predict.parquet"
PREDICT_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("checkpoint", pa.int64()),  # 0-based index along the reference run
        ("step", pa.int64()),  # SGD steps of the reference run at this checkpoint
        ("examples_seen", pa.int64()),  # step * reference batch size
        ("train_loss", pa.float64()),  # mean loss over the probe examples
        ("eval_loss", pa.float64()),  # mean loss over the task's eval set
        ("scope", pa.string()),  # "total" or a layer name as in named_modules()
        ("n_params", pa.int64()),  # trainable parameters in the scope
        ("n_examples", pa.int64()),  # probe examples measured
        ("estimator", pa.string()),  # "per-example"
        ("engine", pa.string()),  # per-example engine used
        ("grad_sq_norm", pa.float64()),  # unbiased |G|^2 (may be <= 0: unresolved)
        ("grad_sq_norm_biased", pa.float64()),  # ||gbar||^2
        ("trace_sigma", pa.float64()),  # unbiased tr(Sigma)
        ("b_simple", pa.float64()),  # tr(Sigma)/|G|^2; NaN when unresolved
        ("b_simple_lo", pa.float64()),  # 95% jackknife interval; NaN if not available
        ("b_simple_hi", pa.float64()),  # +inf if a leave-one-block-out estimate is unresolved
        ("b_simple_lower_bound", pa.float64()),  # min(n, tr(Sigma)/||gbar||^2): finite even when unresolved
        ("resolved", pa.bool_()),  # |G|^2 > 0 at this probe size
        ("snr_mean", pa.float64()),  # mean per-parameter |gbar_k| / std_k over the scope
    ]
)


def _file_mode() -> int:
    """0666 less the process umask: the mode open() would give a new file."""
    try:
        with open("/proc/self/status") as f:  # Linux: read it without setting it (other threads may be making files)
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_table(path: Path, rows: Sequence[Mapping[str, Any]], schema: pa.Schema, settings: Mapping[str, Any]) -> None:
    """Write rows atomically with the run's settings in the file metadata."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings, sort_keys=True).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; results are as readable as any file the user makes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings stored in a file, or None if it has none."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(SETTINGS_KEY)
    return json.loads(raw) if raw else None


def check_output(path: Path, settings: Mapping[str, Any], *, overwrite: bool) -> None:
    """Refuse to replace a file made by a different run unless overwrite is set."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    try:
        old = read_settings(path)
    except Exception:
        old = None
    if old != json.loads(json.dumps(settings, sort_keys=True)):
        raise UsageError(
            f"{path} already holds a different run; choose another --out folder or pass --overwrite to replace it"
        )


# --- the empirical sweep -------------------------------------------------------

TRIALS_DIR = "trials"  # one file per finished trial: the resume index is this folder's listing
PLAN_FILE = "plan.parquet"  # every planned trial; its settings decide whether --resume may continue
TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"
COMPARISON_FILE = "comparison.parquet"
FRONTIER_FILE = "frontier.parquet"
COMPARISON_PLOT = "comparison.png"

PLAN_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),  # stable: b<batch>-lr<lr>-s<seed>
        ("batch_size", pa.int64()),
        ("lr", pa.float64()),
        ("seed", pa.int64()),
    ]
)

TRIALS_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),  # b<batch>-lr<lr>-s<seed>, the same in every run of this plan
        ("task", pa.string()),
        ("batch_size", pa.int64()),  # examples per SGD step
        ("lr", pa.float64()),  # constant SGD learning rate
        ("seed", pa.int64()),  # initial weights (shared by all batch sizes) and data order
        ("status", pa.string()),  # reached, budget or diverged
        ("steps", pa.int64()),  # SGD steps taken
        ("steps_to_target", pa.int64()),  # first evaluated step with eval loss <= target; null if never
        ("examples_to_target", pa.int64()),  # steps_to_target * batch_size; null if never
        ("target_loss", pa.float64()),
        ("initial_eval_loss", pa.float64()),
        ("final_eval_loss", pa.float64()),  # at the last evaluation (inf when diverged)
        ("best_eval_loss", pa.float64()),  # lowest eval loss seen
        ("budget_examples", pa.int64()),  # training examples allowed
        ("wall_seconds", pa.float64()),  # time inside the trial
        ("cpu_seconds", pa.float64()),  # CPU time of the worker process during the trial
        ("node_id", pa.string()),  # Ray node that ran it
        ("device", pa.string()),  # cpu or cuda
        ("update_ratio_max", pa.float64()),  # largest per-parameter ||lr*grad||/||w|| at the last step
        ("update_ratios", pa.string()),  # JSON {parameter name: ratio} at the last step
    ]
)

# A trial's own file: its row plus its eval curve, so one atomic write holds both.
TRIAL_FILE_SCHEMA = TRIALS_SCHEMA.append(pa.field("curve_steps", pa.list_(pa.int64()))).append(
    pa.field("curve_losses", pa.list_(pa.float64()))
)

CURVES_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("batch_size", pa.int64()),
        ("lr", pa.float64()),
        ("seed", pa.int64()),
        ("step", pa.int64()),  # SGD steps done when the eval loss was measured
        ("examples", pa.int64()),  # step * batch_size
        ("eval_loss", pa.float64()),
    ]
)

FRONTIER_SCHEMA = pa.schema(
    [
        ("batch_size", pa.int64()),
        ("best_lr", pa.float64()),  # NaN when no lr reached the target
        ("lr_edge", pa.string()),  # "low"/"high": best lr is the smallest/largest tried; widen the grid
        ("steps", pa.float64()),  # median steps-to-target over seeds at best_lr; inf when censored
        ("examples", pa.float64()),  # steps * batch_size
        ("seeds_reached", pa.int64()),
        ("seeds", pa.int64()),
        ("censored", pa.bool_()),  # not reached by most seeds at any lr: left out of the fit
        ("fitted_steps", pa.float64()),  # S_min (1 + B_crit/B)
        ("predicted_steps", pa.float64()),  # S_min (1 + B_simple/B), B_simple near the target
    ]
)

COMPARISON_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("target_loss", pa.float64()),  # the sweep's eval-loss target
        ("b_crit", pa.float64()),  # E_min / S_min from the log-space fit
        ("b_crit_lo", pa.float64()),  # 95% bootstrap interval over seeds
        ("b_crit_hi", pa.float64()),
        ("s_min", pa.float64()),  # fitted steps with an infinite batch
        ("e_min", pa.float64()),  # fitted examples with a tiny batch
        ("fit_points", pa.int64()),  # batch sizes in the fit
        ("fit_rms_log", pa.float64()),  # rms residual of ln S
        ("b_crit_at_bound", pa.bool_()),  # the curve does not bend inside the grid: B_crit is a bound
        ("censored_batch_sizes", pa.string()),  # comma list of batch sizes that never reached the target
        ("lr_edge_batch_sizes", pa.string()),  # comma list of batch sizes whose best lr is on the grid edge
        ("b_simple_start", pa.float64()),  # at the first checkpoint of predict's reference run
        ("b_simple_avg", pa.float64()),  # tr and |G|^2 averaged over every checkpoint, then divided
        ("b_simple_target", pa.float64()),  # the same over the last quarter (near the target): the headline
        ("ratio", pa.float64()),  # b_simple_target / b_crit
        ("log10_ratio", pa.float64()),
        ("ratio_avg", pa.float64()),  # b_simple_avg / b_crit
        ("ratio_start", pa.float64()),  # b_simple_start / b_crit
        ("reference_batch_size", pa.int64()),  # batch size of predict's reference run
        ("reference_eval_loss", pa.float64()),  # eval loss at predict's last checkpoint
    ]
)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a Parquet file as a dict."""
    return pq.read_table(path).to_pylist()


def read_result(path: Path, schema: pa.Schema, remedy: str) -> list[dict[str, Any]]:
    """Rows of a result file that must have `schema`'s columns; a damaged or foreign file is bad input."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{path} is not a readable Parquet file ({exc}); {remedy}") from None
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise UsageError(f"{path} lacks the column(s) {', '.join(missing)}; {remedy}")
    return table.select(schema.names).to_pylist()


def trial_path(out_dir: Path, trial_id: str) -> Path:
    return Path(out_dir) / TRIALS_DIR / f"{trial_id}.parquet"


def write_trial(out_dir: Path, row: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
    """One finished trial, atomically: a killed run never leaves half a trial."""
    path = trial_path(out_dir, row["trial_id"])
    write_table(path, [row], TRIAL_FILE_SCHEMA, settings)
    return path


def finished_trial_ids(out_dir: Path) -> set[str]:
    """The resume index: trials whose file is on disk (temporary files are skipped)."""
    folder = Path(out_dir) / TRIALS_DIR
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.parquet") if not p.name.startswith(".")}


def read_trials(out_dir: Path, trial_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Rows (with curves) of the finished trials, optionally only these ids."""
    ids = finished_trial_ids(out_dir) if trial_ids is None else trial_ids
    return [row for tid in sorted(ids) for row in read_rows(trial_path(out_dir, tid))]


def write_sweep_tables(out_dir: Path, rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
    """Rewrite trials.parquet and curves.parquet from trial rows that carry their curves."""
    rows = sorted(rows, key=lambda r: (r["batch_size"], r["lr"], r["seed"]))
    trial_cols = TRIALS_SCHEMA.names
    write_table(Path(out_dir) / TRIALS_FILE, [{k: r[k] for k in trial_cols} for r in rows], TRIALS_SCHEMA, settings)
    curves = [
        {
            "trial_id": r["trial_id"],
            "batch_size": r["batch_size"],
            "lr": r["lr"],
            "seed": r["seed"],
            "step": s,
            "examples": s * r["batch_size"],
            "eval_loss": loss,
        }
        for r in rows
        for s, loss in zip(r["curve_steps"], r["curve_losses"], strict=True)
    ]
    write_table(Path(out_dir) / CURVES_FILE, curves, CURVES_SCHEMA, settings)


def remove_sweep(out_dir: Path) -> None:
    """Delete a previous sweep's files (for --overwrite); predict.parquet stays."""
    out_dir = Path(out_dir)
    folder = out_dir / TRIALS_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    for name in (PLAN_FILE, TRIALS_FILE, CURVES_FILE, COMPARISON_FILE, FRONTIER_FILE, COMPARISON_PLOT):
        (out_dir / name).unlink(missing_ok=True)
