"""A results folder: the files `predict`, `empirical` and `compare` write into one --out.

A sweep's trials go to disk one file each, as they finish (`write_trial_file`,
with bytes a worker encoded by `encode_trial`): that folder is the crash-safe
record and the resume index. `consolidate` makes trials.parquet and
curves.parquet from it once, reading the trials' files in order and writing
curves batch by batch, so neither its time per trial nor its memory grows with
the sweep.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gns_sweep.storage.schemas import CURVES_SCHEMA, TRIAL_CURVE_FIELDS, TRIAL_FILE_SCHEMA, TRIALS_SCHEMA
from gns_sweep.storage.tables import (
    encode_table,
    is_temporary,
    parquet_stream,
    read_rows,
    settings_metadata,
    write_arrow,
    write_bytes,
)

CURVE_COLUMNS = tuple(f.name for f in TRIAL_CURVE_FIELDS)  # a trial file's columns beyond trials.parquet's
_CURVE_TYPES = pa.schema(list(TRIAL_CURVE_FIELDS))
_FILL_FROM = ("batch_size", "lr")  # what fills the per-point columns of a file from before them (a fixed trial)
CONSOLIDATE_TRIALS = 256  # trial files read per step of `consolidate`
CURVE_ROW_GROUP = 1 << 17  # curves.parquet rows per row group (at most; the last one less)


@dataclass(frozen=True)
class SweepDir:
    """Where each result of one --out folder lives; the resume index is the trials/ listing."""

    path: Path  # the --out folder

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def predict(self) -> Path:  # one row per (checkpoint, scope)
        return self.path / "predict.parquet"

    @property
    def plan(self) -> Path:  # every planned trial; its settings decide whether --resume may continue
        return self.path / "plan.parquet"

    @property
    def trials_dir(self) -> Path:  # one file per finished trial, its row and its curve
        return self.path / "trials"

    @property
    def trials(self) -> Path:  # all finished trials, made from trials/ when a sweep ends
        return self.path / "trials.parquet"

    @property
    def curves(self) -> Path:  # every evaluation of every finished trial
        return self.path / "curves.parquet"

    @property
    def comparison(self) -> Path:
        return self.path / "comparison.parquet"

    @property
    def frontier(self) -> Path:
        return self.path / "frontier.parquet"

    @property
    def schedule(self) -> Path:  # the schedule trials beside the best fixed batch size, per target and seed
        return self.path / "schedule.parquet"

    @property
    def plot(self) -> Path:  # the frontier at the sweep's own target
        return self.path / "comparison.png"

    @property
    def ladder_plot(self) -> Path:  # B_crit and B_simple against the target loss
        return self.path / "targets.png"

    def trial(self, trial_id: str) -> Path:
        return self.trials_dir / f"{trial_id}.parquet"

    def has_sweep(self) -> bool:
        return self.plan.exists() or self.trials_dir.is_dir()

    def write_trial(self, row: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
        """One finished trial (its row with its curve), atomically: a killed run never leaves half a trial."""
        return self.write_trial_file(row["trial_id"], encode_trial(row, trial_metadata(settings)))

    def write_trial_file(self, trial_id: str, data: bytes) -> Path:
        """One finished trial's file as `encode_trial` made it (on a worker), atomically."""
        path = self.trial(trial_id)
        write_bytes(path, data)
        return path

    def finished_trial_ids(self) -> set[str]:
        """The resume index: trials whose file is on disk (temporary files are skipped)."""
        try:
            entries = os.scandir(self.trials_dir)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        with entries:
            return {e.name[: -len(".parquet")] for e in entries if e.name.endswith(".parquet") and e.name[0] != "."}

    def trial_statuses(self, trial_ids: set[str] | None = None) -> dict[str, str]:
        """{trial id: status} of the trials on disk (optionally only these ids), reading one column each."""
        ids = self.finished_trial_ids() if trial_ids is None else trial_ids
        return {tid: _status(self.trial(tid)) for tid in sorted(ids)}

    def read_trials(self, trial_ids: set[str] | None = None) -> list[dict[str, Any]]:
        """Rows (with curves) of the finished trials, optionally only these ids."""
        ids = self.finished_trial_ids() if trial_ids is None else trial_ids
        return [row for tid in sorted(ids) for row in read_rows(self.trial(tid))]

    def remove_temporaries(self) -> None:
        """Delete what a killed run left half-written: temporary files of trials/, trials.parquet and
        curves.parquet (never a finished file)."""
        names = (self.trials.name, self.curves.name)
        leftovers = [p for p in self.path.glob(".*.tmp") if p.name[1:].startswith(names)]
        if self.trials_dir.is_dir():
            leftovers += [p for p in self.trials_dir.iterdir() if is_temporary(p.name)]
        for p in leftovers:
            p.unlink(missing_ok=True)

    def consolidate(
        self, trial_ids: Sequence[str], settings: Mapping[str, Any], known: pa.Table | None = None
    ) -> pa.Table:
        """Write trials.parquet and curves.parquet for these trials, in this order, from their files; return
        the trials table (trials.parquet's columns).

        `known` holds trials.parquet rows already at hand (e.g. sent by the workers): of those trials
        only the curve is read from the file. Files are read CONSOLIDATE_TRIALS at a time and curves
        written a row group at a time, so memory holds one such step plus the trial rows (no curves).
        """
        index = {} if known is None else {tid: i for i, tid in enumerate(known.column("trial_id").to_pylist())}
        parts: list[pa.Table] = []
        held: list[pa.Table] = []  # curve rows not yet written
        with parquet_stream(self.curves, CURVES_SCHEMA, settings) as writer:
            for start in range(0, len(trial_ids), CONSOLIDATE_TRIALS):
                ids = trial_ids[start : start + CONSOLIDATE_TRIALS]
                # one thread per small file: a thread pool per read costs more than the read
                files = [_read_trial(self.trial(tid), whole=tid not in index) for tid in ids]
                if not files:
                    continue
                curves = pa.concat_tables([_curves(f) for f in files])
                if all(tid in index for tid in ids):
                    step = known.take(pa.array([index[tid] for tid in ids], pa.int64()))
                else:  # trials of an earlier run: their rows from their files too
                    earlier = [_light(f) for tid, f in zip(ids, files, strict=True) if tid not in index]
                    read = _conform(pa.concat_tables(earlier, promote_options="default"), TRIALS_SCHEMA)
                    at = iter(range(read.num_rows))
                    pieces = [known.slice(index[tid], 1) if tid in index else read.slice(next(at), 1) for tid in ids]
                    step = pa.concat_tables(pieces).combine_chunks()
                parts.append(step)
                held.append(_curve_table(step, curves))
                if sum(t.num_rows for t in held) >= CURVE_ROW_GROUP:
                    writer.write_table(pa.concat_tables(held), row_group_size=CURVE_ROW_GROUP)
                    held = []
            if held:
                writer.write_table(pa.concat_tables(held), row_group_size=CURVE_ROW_GROUP)
        trials = pa.concat_tables(parts) if parts else TRIALS_SCHEMA.empty_table()
        write_arrow(self.trials, trials, settings)
        return trials

    def remove_sweep(self) -> None:
        """Delete a previous sweep's files (for --overwrite); predict.parquet stays."""
        if self.trials_dir.is_dir():
            for p in self.trials_dir.iterdir():
                p.unlink()
            self.trials_dir.rmdir()
        made = (self.plan, self.trials, self.curves, self.comparison, self.frontier, self.schedule)
        for path in (*made, self.plot, self.ladder_plot):
            path.unlink(missing_ok=True)


def encode_trial(row: Mapping[str, Any], metadata: Mapping[bytes, bytes]) -> bytes:
    """A trial's file (its row with its curve; metadata from `trial_metadata`) as bytes, for
    SweepDir.write_trial_file: made where the trial ran, so the driver only copies bytes to disk."""
    return encode_table([row], TRIAL_FILE_SCHEMA, metadata, compact=True)  # read back by the thousand


def trial_metadata(settings: Mapping[str, Any]) -> dict[bytes, bytes]:
    """What every trial file of a run records (its settings); computed once per run."""
    return settings_metadata(settings)


def light_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's row as trials.parquet holds it: without its curve (a trial file from before a column
    was added has none there: null)."""
    return {k: row.get(k) for k in TRIALS_SCHEMA.names}


def _read(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A small Parquet file (or some of its columns), read in this thread."""
    return pq.ParquetFile(path).read(columns=None if columns is None else list(columns), use_threads=False)


def _read_trial(path: Path, *, whole: bool) -> pa.Table:
    """A trial file, or only what its curve needs (a file from before the per-point columns lacks them)."""
    f = pq.ParquetFile(path)
    if whole:
        return f.read(use_threads=False)
    names = set(f.schema_arrow.names)
    return f.read(columns=[c for c in (*CURVE_COLUMNS, *_FILL_FROM) if c in names], use_threads=False)


def _curves(table: pa.Table) -> pa.Table:
    """A trial file's CURVE_COLUMNS, the per-point ones filled from its row where the file predates them."""
    if all(c in table.column_names for c in CURVE_COLUMNS):
        return table.select(list(CURVE_COLUMNS)).cast(_CURVE_TYPES)
    return pa.Table.from_pylist([curve_points(r) for r in table.to_pylist()], schema=_CURVE_TYPES)


def curve_points(row: Mapping[str, Any]) -> dict[str, list]:
    """A trial's CURVE_COLUMNS; a row without per-point batch sizes is a fixed trial's: its batch and lr
    at every point, examples = step * batch."""
    steps, b = list(row["curve_steps"]), row["batch_size"]
    sizes = row.get("curve_batch_sizes")
    if sizes is None:
        sizes, examples, lrs = [b] * len(steps), [s * b for s in steps], [row["lr"]] * len(steps)
    else:
        examples, lrs = row["curve_examples"], row["curve_lrs"]
    return {
        "curve_steps": steps,
        "curve_losses": list(row["curve_losses"]),
        "curve_batch_sizes": list(sizes),
        "curve_examples": list(examples),
        "curve_lrs": list(lrs),
    }


def _status(path: Path) -> str:
    return _read(path, ["status"]).column("status")[0].as_py()


def _light(table: pa.Table) -> pa.Table:
    """A trial file's trials.parquet columns (files of older versions may lack later ones)."""
    return table.select([name for name in table.column_names if name in TRIALS_SCHEMA.names])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """table's columns in schema's order and types; a later column it lacks reads as nulls."""
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


def _curve_table(trials: pa.Table, curves: pa.Table) -> pa.Table:
    """curves.parquet rows of these trials (one row each in both tables, in the same order)."""
    steps = curves.column("curve_steps").combine_chunks()
    owner = pc.list_parent_indices(steps)

    def flat(name: str) -> pa.Array:
        return pc.list_flatten(curves.column(name).combine_chunks())

    return pa.table(
        {
            "trial_id": trials.column("trial_id").take(owner),
            "batch_size": flat("curve_batch_sizes"),
            "lr": flat("curve_lrs"),
            "seed": trials.column("seed").take(owner),
            "step": pc.list_flatten(steps),
            "examples": flat("curve_examples"),
            "eval_loss": flat("curve_losses"),
        },
        schema=CURVES_SCHEMA,
    )


def curve_rows(trial: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A trial's eval curve as curves.parquet rows."""
    c = curve_points(trial)
    points = zip(*(c[name] for name in CURVE_COLUMNS), strict=True)
    return [
        {
            "trial_id": trial["trial_id"],
            "batch_size": b,
            "lr": lr,
            "seed": trial["seed"],
            "step": s,
            "examples": e,
            "eval_loss": loss,
        }
        for s, loss, b, e, lr in points  # CURVE_COLUMNS' order
    ]
