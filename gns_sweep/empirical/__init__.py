"""`empirical`: measure steps-to-target over a (batch size, lr, seed) grid, trials as Ray tasks.

One module per job: config (settings and the plan's types), validate (checks
before any work), planning (lr grid, stability probe, pilot target), trial
(what a Ray task runs), pipeline (the two entry points and the files).
"""

from gns_sweep.empirical.config import (
    FIXED,
    GNS,
    SCHEDULES,
    EmpiricalConfig,
    Plan,
    ScheduleSpec,
    TrialSpec,
    settings,
    trial_id,
)
from gns_sweep.empirical.pipeline import EmpiricalJob, EmpiricalResult, TrialRows, prepare_empirical, run_empirical
from gns_sweep.empirical.planning import lr_grid, make_plan, pilot_target, stable_lr
from gns_sweep.empirical.trial import TrialRecord, run_trial, run_trial_file

__all__ = [
    "FIXED",
    "GNS",
    "SCHEDULES",
    "ScheduleSpec",
    "EmpiricalConfig",
    "EmpiricalJob",
    "EmpiricalResult",
    "Plan",
    "TrialRecord",
    "TrialRows",
    "TrialSpec",
    "lr_grid",
    "make_plan",
    "pilot_target",
    "prepare_empirical",
    "run_empirical",
    "run_trial",
    "run_trial_file",
    "settings",
    "stable_lr",
    "trial_id",
]
