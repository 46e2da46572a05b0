"""A results folder: the files `predict`, `empirical` and `compare` write into one --out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from gns_sweep.storage.schemas import CURVES_SCHEMA, TRIAL_FILE_SCHEMA, TRIALS_SCHEMA
from gns_sweep.storage.tables import read_rows, write_table


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
    def trials(self) -> Path:  # all finished trials, rewritten from trials/
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
        """One finished trial, atomically: a killed run never leaves half a trial."""
        path = self.trial(row["trial_id"])
        write_table(path, [row], TRIAL_FILE_SCHEMA, settings)
        return path

    def finished_trial_ids(self) -> set[str]:
        """The resume index: trials whose file is on disk (temporary files are skipped)."""
        if not self.trials_dir.is_dir():
            return set()
        return {p.stem for p in self.trials_dir.glob("*.parquet") if not p.name.startswith(".")}

    def trial_statuses(self, trial_ids: set[str] | None = None) -> dict[str, str]:
        """{trial id: status} of the trials on disk (optionally only these ids), reading one column each."""
        ids = self.finished_trial_ids() if trial_ids is None else trial_ids
        return {tid: pq.read_table(self.trial(tid), columns=["status"])["status"][0].as_py() for tid in sorted(ids)}

    def read_trials(self, trial_ids: set[str] | None = None) -> list[dict[str, Any]]:
        """Rows (with curves) of the finished trials, optionally only these ids."""
        ids = self.finished_trial_ids() if trial_ids is None else trial_ids
        return [row for tid in sorted(ids) for row in read_rows(self.trial(tid))]

    def write_sweep_tables(self, rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
        """Rewrite trials.parquet and curves.parquet from trial rows that carry their curves."""
        rows = sorted(rows, key=lambda r: (r["batch_size"], r["lr"], r["seed"]))
        cols = TRIALS_SCHEMA.names
        # r.get: a trial file from before a column was added has none (null)
        write_table(self.trials, [{k: r.get(k) for k in cols} for r in rows], TRIALS_SCHEMA, settings)
        write_table(self.curves, [point for r in rows for point in curve_rows(r)], CURVES_SCHEMA, settings)

    def remove_sweep(self) -> None:
        """Delete a previous sweep's files (for --overwrite); predict.parquet stays."""
        if self.trials_dir.is_dir():
            for p in self.trials_dir.iterdir():
                p.unlink()
            self.trials_dir.rmdir()
        for path in (self.plan, self.trials, self.curves, self.comparison, self.frontier, self.plot, self.ladder_plot):
            path.unlink(missing_ok=True)


def curve_rows(trial: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A trial's eval curve as curves.parquet rows."""
    b = trial["batch_size"]
    return [
        {
            "trial_id": trial["trial_id"],
            "batch_size": b,
            "lr": trial["lr"],
            "seed": trial["seed"],
            "step": s,
            "examples": s * b,
            "eval_loss": loss,
        }
        for s, loss in zip(trial["curve_steps"], trial["curve_losses"], strict=True)
    ]
