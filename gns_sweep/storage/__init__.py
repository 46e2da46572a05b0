"""The only Parquet code: result schemas, atomic writes with their settings, the results folder."""

from gns_sweep.storage.schemas import (
    COMPARISON_SCHEMA,
    CURVES_SCHEMA,
    FRONTIER_SCHEMA,
    PLAN_SCHEMA,
    PREDICT_FILE_SCHEMA,
    PREDICT_SCHEMA,
    SCHEDULE_SCHEMA,
    TRIAL_FILE_SCHEMA,
    TRIALS_SCHEMA,
)
from gns_sweep.storage.sweep_dir import SweepDir
from gns_sweep.storage.tables import (
    check_output,
    read_result,
    read_rows,
    read_settings,
    settings_diff,
    stored_settings,
    write_table,
)

__all__ = [
    "COMPARISON_SCHEMA",
    "CURVES_SCHEMA",
    "FRONTIER_SCHEMA",
    "PLAN_SCHEMA",
    "PREDICT_FILE_SCHEMA",
    "PREDICT_SCHEMA",
    "SCHEDULE_SCHEMA",
    "TRIALS_SCHEMA",
    "TRIAL_FILE_SCHEMA",
    "SweepDir",
    "check_output",
    "read_result",
    "read_rows",
    "read_settings",
    "settings_diff",
    "stored_settings",
    "write_table",
]
