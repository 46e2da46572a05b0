"""`predict`: B_simple from per-example gradient statistics along a reference run.

One module per job: config (the settings), validate (checks before any work),
reference (the small-batch run and its checkpoints), shards (how the probe is
cut), worker (what a Ray task computes and how the driver merges it), report
(per-layer verdicts, the SNR histogram, the cost table), pipeline (the two
entry points).
"""

from gns_sweep.predict.config import DEFAULT_PROBE, PredictConfig, settings
from gns_sweep.predict.pipeline import PredictJob, PredictResult, prepare_predict, run_predict
from gns_sweep.predict.reference import ReferenceRun, checkpoint_steps
from gns_sweep.predict.report import LayerFlag, NoiseRow, noise_table
from gns_sweep.predict.shards import assign, edges, micro_batches, probe_indices
from gns_sweep.predict.worker import Checkpoint, measure, probe_checkpoints, probe_shard, scope_rows

__all__ = [
    "DEFAULT_PROBE",
    "Checkpoint",
    "LayerFlag",
    "NoiseRow",
    "PredictConfig",
    "PredictJob",
    "PredictResult",
    "ReferenceRun",
    "assign",
    "checkpoint_steps",
    "edges",
    "measure",
    "micro_batches",
    "noise_table",
    "prepare_predict",
    "probe_checkpoints",
    "probe_indices",
    "probe_shard",
    "run_predict",
    "scope_rows",
    "settings",
]
