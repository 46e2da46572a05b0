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
        ("b_simple_lower_bound", pa.float64()),  # tr(Sigma)/||gbar||^2, finite even when unresolved
        ("resolved", pa.bool_()),  # |G|^2 > 0 at this probe size
        ("snr_mean", pa.float64()),  # mean per-parameter |gbar_k| / std_k over the scope
    ]
)


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
