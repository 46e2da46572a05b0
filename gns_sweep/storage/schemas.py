"""The columns of every result file (see docs/schemas.md)."""

from __future__ import annotations

import pyarrow as pa

PREDICT_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("checkpoint", pa.int64()),  # 0-based index along the reference run
        ("step", pa.int64()),  # SGD steps of the reference run at this checkpoint
        ("examples_seen", pa.int64()),  # step * reference batch size
        ("train_loss", pa.float64()),  # mean loss over the probe examples
        ("eval_loss", pa.float64()),  # mean loss over the task's eval set
        ("n_checkpoints", pa.int64()),  # checkpoints along the reference run
        ("scope", pa.string()),  # "total", "norm-layers" or a layer name as in named_modules()
        ("n_params", pa.int64()),  # trainable parameters in the scope
        ("n_examples", pa.int64()),  # probe examples measured
        ("estimator", pa.string()),  # "per-example" or "micro-batch"
        ("micro_batch", pa.int64()),  # examples per sample: 1 (per-example) or b
        ("engine", pa.string()),  # engine used: fast, general, loop or micro-batch
        ("grad_sq_norm", pa.float64()),  # unbiased |G|^2 (may be <= 0: unresolved)
        ("grad_sq_norm_biased", pa.float64()),  # ||gbar||^2
        ("trace_sigma", pa.float64()),  # unbiased tr(Sigma)
        ("b_simple", pa.float64()),  # tr(Sigma)/|G|^2; NaN when unresolved
        ("b_simple_lo", pa.float64()),  # 95% jackknife interval; NaN if not available
        ("b_simple_hi", pa.float64()),  # +inf if a leave-one-block-out estimate is unresolved
        ("b_simple_lower_bound", pa.float64()),  # min(n, tr(Sigma)/||gbar||^2): finite even when unresolved
        ("resolved", pa.bool_()),  # |G|^2 > 0 at this probe size
        ("snr_mean", pa.float64()),  # mean per-parameter |gbar_k| / std_k over the scope
        ("update_ratio", pa.float64()),  # ||step|| / ||w|| of the step that led here; NaN at step 0
        ("optimizer", pa.string()),  # the reference run's optimizer (sgd, momentum, adam, adamw, lars)
        # In the optimizer's geometry, g~ = P^(1/2) g with P = 1/(sqrt(v_hat) + eps) at this checkpoint;
        # NaN unless the optimizer is adaptive (adam, adamw)
        ("trace_sigma_precond", pa.float64()),  # unbiased tr(P Sigma)
        ("grad_sq_norm_precond", pa.float64()),  # unbiased G' P G (may be <= 0: unresolved)
        ("b_simple_precond", pa.float64()),  # tr(P Sigma) / G' P G; NaN when unresolved
        ("b_simple_precond_lo", pa.float64()),  # 95% jackknife interval, as for b_simple
        ("b_simple_precond_hi", pa.float64()),
    ]
)

# predict.parquet as written: the measurement (PREDICT_SCHEMA, what compare reads) and where it ran.
PREDICT_FILE_SCHEMA = PREDICT_SCHEMA.append(
    pa.field("node_ids", pa.list_(pa.string()))  # Ray nodes that ran this checkpoint's shards, sorted
)


PLAN_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),  # stable: b<batch>-lr<lr>-s<seed> (gns-s<seed> for a schedule trial)
        ("batch_size", pa.int64()),  # a schedule trial's first batch size
        ("lr", pa.float64()),  # a schedule trial's lr at the task's batch size
        ("seed", pa.int64()),
        ("schedule", pa.string()),  # "fixed", or "gns" (the batch follows the noise scale)
    ]
)

TRIALS_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),  # b<batch>-lr<lr>-s<seed> (gns-s<seed>), the same in every run of this plan
        ("task", pa.string()),
        ("schedule", pa.string()),  # "fixed", or "gns": the batch follows the noise scale (null in a file from before)
        # a schedule trial's noise-scale estimator: per-example, or micro-batch (a model whose layers couple
        # examples); null for a fixed trial and in a file from before the column
        ("schedule_estimator", pa.string()),
        ("batch_size", pa.int64()),  # examples per step; a schedule trial's: that of its last step
        ("lr", pa.float64()),  # constant learning rate; a schedule trial's: that of its last step
        ("optimizer", pa.string()),  # sgd, momentum, adam, adamw or lars (null in a file from before: sgd)
        ("optimizer_settings", pa.string()),  # JSON: the name and the settings it reads, e.g. {"name": "sgd", ...}
        ("seed", pa.int64()),  # initial weights (shared by all batch sizes) and data order
        ("status", pa.string()),  # reached, budget, diverged, or failed (its own code raised)
        ("steps", pa.int64()),  # optimizer steps taken
        ("steps_to_target", pa.int64()),  # first evaluated step with eval loss <= target; null if never
        ("examples_to_target", pa.int64()),  # examples used up to steps_to_target (fixed: * batch_size); null if never
        ("target_loss", pa.float64()),
        ("initial_eval_loss", pa.float64()),
        ("final_eval_loss", pa.float64()),  # at the last evaluation (inf when diverged)
        ("best_eval_loss", pa.float64()),  # lowest eval loss seen
        ("budget_examples", pa.int64()),  # training examples allowed
        ("wall_seconds", pa.float64()),  # time inside the trial
        ("cpu_seconds", pa.float64()),  # CPU time of the worker process during the trial
        ("node_id", pa.string()),  # Ray node that ran it (null if a failed trial never started)
        ("device", pa.string()),  # cpu or cuda
        ("update_ratio_max", pa.float64()),  # largest per-parameter ||update||/||w|| at the last step
        ("update_ratios", pa.string()),  # JSON {parameter name: ratio} at the last step
        ("error", pa.string()),  # a failed trial's error, one line; null otherwise
    ]
)

# trials.parquet's optimizer columns, also read from a file from before them (as nulls: plain SGD).
TRIAL_OPTIMIZER_COLUMNS = frozenset({"optimizer", "optimizer_settings"})

# predict.parquet's columns for the optimizer's geometry: a file from before them has SGD's rows.
PREDICT_OPTIMIZER_COLUMNS = frozenset(
    {
        "optimizer",
        "trace_sigma_precond",
        "grad_sq_norm_precond",
        "b_simple_precond",
        "b_simple_precond_lo",
        "b_simple_precond_hi",
    }
)

# Columns added after files were first written: a file without one reads as nulls there (schedule: "fixed").
LATER_COLUMNS = (
    frozenset({"error", "node_ids", "schedule", "schedule_estimator"})
    | PREDICT_OPTIMIZER_COLUMNS
    | TRIAL_OPTIMIZER_COLUMNS
)

# A trial's own file: its row plus its eval curve, so one atomic write holds both; one entry per evaluation.
TRIAL_CURVE_FIELDS = (
    pa.field("curve_steps", pa.list_(pa.int64())),  # evaluated steps (0: the initial weights)
    pa.field("curve_losses", pa.list_(pa.float64())),  # their eval losses
    pa.field("curve_batch_sizes", pa.list_(pa.int64())),  # batch size of each evaluated step (absent before: fixed)
    pa.field("curve_examples", pa.list_(pa.int64())),  # examples used up to it
    pa.field("curve_lrs", pa.list_(pa.float64())),  # lr of each evaluated step
)
TRIAL_FILE_SCHEMA = pa.schema(list(TRIALS_SCHEMA) + list(TRIAL_CURVE_FIELDS))

CURVES_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("batch_size", pa.int64()),  # batch size of the step evaluated (a schedule trial's changes along its curve)
        ("lr", pa.float64()),  # lr of that step
        ("seed", pa.int64()),
        ("step", pa.int64()),  # optimizer steps done when the eval loss was measured
        ("examples", pa.int64()),  # training examples used by then (fixed trials: step * batch_size)
        ("eval_loss", pa.float64()),
    ]
)

FRONTIER_SCHEMA = pa.schema(
    [
        ("target_loss", pa.float64()),  # the target these steps are to
        ("batch_size", pa.int64()),
        ("best_lr", pa.float64()),  # NaN when no lr reached the target
        ("lr_edge", pa.string()),  # "low"/"high": best lr is the smallest/largest tried; widen the grid
        ("steps", pa.float64()),  # median steps-to-target over seeds at best_lr; inf when censored
        ("examples", pa.float64()),  # steps * batch_size
        ("seeds_reached", pa.int64()),
        ("seeds", pa.int64()),
        ("censored", pa.bool_()),  # not reached by most seeds at any lr: left out of the fit
        ("fitted_steps", pa.float64()),  # S_min (1 + B_crit/B)
        ("predicted_steps", pa.float64()),  # S_min (1 + B_simple/B)
    ]
)

COMPARISON_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("target_loss", pa.float64()),  # the eval-loss target of this row
        ("sweep_target", pa.bool_()),  # the sweep's own target (its trials stopped there)
        ("b_crit", pa.float64()),  # E_min / S_min from the log-space fit
        ("b_crit_lo", pa.float64()),  # 95% bootstrap interval over seeds
        ("b_crit_hi", pa.float64()),
        ("b_crit_measured", pa.bool_()),  # the frontier has two ends (S_min >= 5, a bend in the grid)
        ("s_min", pa.float64()),  # fitted steps with an infinite batch
        ("e_min", pa.float64()),  # fitted examples with a tiny batch
        ("fit_points", pa.int64()),  # batch sizes in the fit
        ("fit_rms_log", pa.float64()),  # rms residual of ln S
        ("b_crit_at_bound", pa.bool_()),  # the curve does not bend inside the grid: B_crit is a bound
        ("censored_batch_sizes", pa.string()),  # comma list of batch sizes that never reached the target
        ("lr_edge_batch_sizes", pa.string()),  # comma list of batch sizes whose best lr is on the grid edge
        ("b_simple", pa.float64()),  # mean tr / mean |G|^2 from the reference run's start to this loss: the headline
        ("b_simple_lo", pa.float64()),  # 95% bootstrap over checkpoints
        ("b_simple_hi", pa.float64()),
        ("b_simple_late", pa.float64()),  # the same over the last quarter of those checkpoints
        ("b_simple_start", pa.float64()),  # at the first checkpoint
        ("b_simple_checkpoints", pa.int64()),  # checkpoints averaged
        ("reference_reached", pa.bool_()),  # predict's reference run reached this loss
        ("b_simple_precond", pa.float64()),  # mean tr(P Sigma) / mean G'PG, likewise; NaN unless predict's optimizer
        ("b_simple_precond_lo", pa.float64()),  # is adaptive. 95% bootstrap over checkpoints
        ("b_simple_precond_hi", pa.float64()),
        ("b_simple_precond_late", pa.float64()),  # over the last quarter of those checkpoints
        ("b_simple_precond_start", pa.float64()),  # at the first checkpoint
        ("optimizer", pa.string()),  # the sweep's optimizer (trials.parquet; sgd for a file without the column)
        ("predict_optimizer", pa.string()),  # the optimizer of predict's reference run
        ("prediction", pa.string()),  # what the ratios use: "b_simple_precond" for an adaptive sweep, else "b_simple"
        ("ratio", pa.float64()),  # the prediction / b_crit
        ("log10_ratio", pa.float64()),
        ("ratio_late", pa.float64()),  # the prediction's late value / b_crit
        ("ratio_start", pa.float64()),  # the prediction's start value / b_crit
        ("reference_batch_size", pa.int64()),  # batch size of predict's reference run
        ("reference_eval_loss", pa.float64()),  # eval loss at predict's last checkpoint
    ]
)

# comparison.parquet of several results folders side by side: one row per (folder, target).
FOLDERS_COMPARISON_SCHEMA = pa.schema(
    [pa.field("folder", pa.string())]  # the results folder as given on the command line
    + list(COMPARISON_SCHEMA)
)

# schedule.parquet: each schedule trial beside the best fixed batch size that uses no more examples, one row per
# (target, seed); "fixed" is, among the batch sizes at their best lr (frontier.parquet), this seed's trial with the
# fewest steps to the target whose examples to it are <= the schedule's.
SCHEDULE_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("target_loss", pa.float64()),
        ("sweep_target", pa.bool_()),  # the sweep's own target (its trials stopped there)
        ("seed", pa.int64()),
        ("trial_id", pa.string()),  # the schedule trial
        ("reached", pa.bool_()),  # the schedule reached this target
        ("steps", pa.float64()),  # the schedule's steps to the target; NaN if not reached
        ("examples", pa.float64()),  # its examples to the target
        ("wall_seconds", pa.float64()),  # its wall time to the target (see docs/schemas.md)
        ("batch_size_at_target", pa.int64()),  # its batch size at the step that reached it; null if not reached
        ("fixed_batch_size", pa.int64()),  # the best fixed batch size using no more examples; null: none did
        ("fixed_lr", pa.float64()),  # its best lr
        ("fixed_steps", pa.float64()),  # its steps to the target, this seed
        ("fixed_examples", pa.float64()),  # fixed_steps * fixed_batch_size
        ("fixed_wall_seconds", pa.float64()),  # its wall time to the target
        ("steps_ratio", pa.float64()),  # steps / fixed_steps (< 1: the schedule needs fewer steps)
        ("examples_ratio", pa.float64()),  # examples / fixed_examples (>= 1: the fixed one uses no more)
        ("wall_ratio", pa.float64()),  # wall_seconds / fixed_wall_seconds
    ]
)
