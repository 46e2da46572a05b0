"""`gns-sweep run`: predict, empirical and compare in turn, into one folder."""

from __future__ import annotations

import json

from gns_sweep_cli import compare as compare_cmd
from gns_sweep_cli import empirical as empirical_cmd
from gns_sweep_cli import options as o
from gns_sweep_cli import predict as predict_cmd
from gns_sweep_cli.common import Bars, cluster, err, handle_errors, out, results_dir

from gns_sweep.compare import Comparison, run_compare
from gns_sweep.empirical import EmpiricalResult, prepare_empirical, run_empirical
from gns_sweep.errors import UsageError
from gns_sweep.predict import PredictResult, prepare_predict, run_predict
from gns_sweep.storage import SweepDir
from gns_sweep.tasks import load_task


@handle_errors
def run(
    task: o.TaskName = o.DEFAULT_TASK,
    batch_sizes: o.BatchSizes = None,
    lrs: o.Lrs = None,
    seeds: o.Seeds = o.E.seeds,
    budget_examples: o.BudgetExamples = o.E.budget_examples,
    target_loss: o.TargetLoss = None,
    cpus_per_trial: o.CpusPerTrial = o.E.cpus_per_trial,
    gpus_per_trial: o.GpusPerTrial = o.E.gpus_per_trial,
    probe_size: o.ProbeSize = o.P.probe_size,
    shards: o.Shards = o.P.shards,
    blocks: o.Blocks = o.P.blocks,
    layer: o.Layer = o.P.layer,
    warmup_steps: o.WarmupSteps = o.P.warmup_steps,
    checkpoints: o.Checkpoints = o.P.checkpoints,
    seed: o.Seed = o.P.seed,
    estimator: o.Estimator = o.P.estimator,
    micro_batch: o.MicroBatch = o.P.micro_batch,
    engine: o.Engine = o.P.engine,
    max_batch: o.MaxBatch = o.P.max_batch,
    cpus_per_shard: o.CpusPerShard = o.P.cpus_per_shard,
    gpus_per_shard: o.GpusPerShard = o.P.gpus_per_shard,
    optimizer: o.Optimizer = None,
    momentum: o.Momentum = None,
    betas: o.Betas = None,
    weight_decay: o.WeightDecay = None,
    trust_coefficient: o.TrustCoefficient = None,
    schedule: o.Schedule = o.E.schedule,
    schedule_k: o.ScheduleK = o.E.schedule_k,
    targets: o.Targets = None,
    out_dir: o.OutDir = None,
    resume: o.Resume = False,
    overwrite: o.Overwrite = False,
    address: o.Address = None,
    num_cpus: o.NumCpus = None,
    max_retries: o.MaxRetries = o.E.max_retries,
    as_json: o.AsJson = False,
) -> None:
    """predict + empirical + compare on one task: is B_simple a good guess of the measured B_crit?"""
    values = locals()
    o.parse_targets(targets)  # bad input is refused before any work
    if target_loss is not None:
        # predict's reference run stops at the task's target; a different sweep target would compare
        # B_simple measured at one loss with B_crit at another.
        raise UsageError(
            "--target-loss applies to the sweep only; run predict, empirical and compare separately, "
            "or define a task whose target_loss is the one you want"
        )
    loaded = load_task(task)
    folder = results_dir(out_dir, "run", loaded.name)
    keep = dict(task=loaded, out=folder, resume=resume, overwrite=overwrite)
    pjob = prepare_predict(o.predict_config(values, loaded), **keep)
    ejob = prepare_empirical(o.empirical_config(values, loaded), **keep)
    if pjob.note:
        err.print(f"predict: {pjob.note}; computing it again")
    if not as_json:
        empirical_cmd.describe_plan(ejob.plan)
    with cluster(address, num_cpus) as c, Bars(enabled=not as_json) as bars:
        predicted = None if pjob.kept else run_predict(pjob, c, progress=bars)
        swept = run_empirical(ejob, c, progress=bars)
    compared = run_compare(folder.path, targets=o.parse_targets(targets))
    show(folder, predicted, swept, compared, as_json)


def show(
    folder: SweepDir, predicted: PredictResult | None, swept: EmpiricalResult, compared: Comparison, as_json: bool
) -> None:
    if as_json:
        doc = {
            "out": str(folder.path),
            "predict": predict_cmd.summary(predicted) if predicted else None,
            "empirical": empirical_cmd.summary(swept),
            "compare": compare_cmd.summary(compared),
        }
        out.print_json(json.dumps(doc))
    else:
        if predicted:
            predict_cmd.render(predicted)
        else:
            out.print(f"predict: kept {folder.predict} (same settings, --resume)")
        empirical_cmd.render(swept)
        compare_cmd.render(compared)
    compare_cmd.check(compared)
