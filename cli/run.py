"""`gns-sweep run`: predict, empirical and compare in turn, into one folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from gns_sweep_cli import compare as compare_cmd
from gns_sweep_cli import empirical as empirical_cmd
from gns_sweep_cli import predict as predict_cmd
from gns_sweep_cli.common import (
    AddressOpt,
    Bars,
    JsonOpt,
    NumCpusOpt,
    OverwriteOpt,
    check_out_dir,
    cluster,
    default_out,
    err,
    handle_errors,
    out,
)

from gns_sweep import empirical as emp
from gns_sweep.compare import run_compare
from gns_sweep.errors import RunError, UsageError
from gns_sweep.predict import PredictConfig, run_predict
from gns_sweep.predict import settings as predict_settings
from gns_sweep.predict import validate as validate_predict
from gns_sweep.storage import PREDICT_FILE, check_output, read_rows, read_settings
from gns_sweep.tasks import DEFAULT_TASK


@handle_errors
def run(
    task: str = typer.Option(DEFAULT_TASK, "--task", help="Built-in task or package.module:attr."),
    batch_sizes: str | None = empirical_cmd.BatchSizesOpt,
    lrs: str | None = empirical_cmd.LrsOpt,
    seeds: int = empirical_cmd.SeedsOpt,
    budget_examples: int | None = empirical_cmd.BudgetOpt,
    target_loss: float | None = empirical_cmd.TargetOpt,
    cpus_per_trial: float = empirical_cmd.CpusOpt,
    gpus_per_trial: float = empirical_cmd.GpusOpt,
    probe_size: int | None = typer.Option(None, "--probe-size", help="predict: probe examples (default 4096)."),
    checkpoints: int = typer.Option(8, "--checkpoints", help="predict: measurements along the reference run."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default: a new one under results/)."),
    resume: bool = typer.Option(False, "--resume", help="Keep a finished predict and the trials on disk."),
    overwrite: bool = OverwriteOpt,
    address: str | None = AddressOpt,
    num_cpus: int | None = NumCpusOpt,
    as_json: bool = JsonOpt,
) -> None:
    """predict + empirical + compare on one task: is B_simple a good guess of the measured B_crit?"""
    if target_loss is not None:
        # predict's reference run stops at the task's target; a different sweep target would compare
        # B_simple measured at one loss with B_crit at another.
        raise UsageError(
            "--target-loss applies to the sweep only; run predict, empirical and compare separately, "
            "or define a task whose target_loss is the one you want"
        )
    pconfig = PredictConfig(task=task, probe_size=probe_size, checkpoints=checkpoints)
    loaded, pconfig = validate_predict(pconfig)
    econfig = empirical_cmd.make_config(
        task, batch_sizes, lrs, seeds, budget_examples, None, cpus_per_trial, gpus_per_trial
    )
    emp.validate(econfig)
    folder = check_out_dir(out_dir or default_out("run", loaded.name))
    if resume and overwrite:
        raise UsageError("--resume keeps what is on disk and --overwrite replaces it; pass only one")
    predict_path = folder / PREDICT_FILE
    kept = _resumed(predict_path, predict_settings(pconfig), pconfig.checkpoints) if resume else None
    skip_predict = kept == "keep"
    if not skip_predict:
        check_output(predict_path, predict_settings(pconfig), overwrite=overwrite or kept == "redo")
    the_plan = emp.plan(econfig, loaded)
    emp.prepare_out(folder, the_plan, resume=resume, overwrite=overwrite)
    if not as_json:
        empirical_cmd.describe_plan(the_plan)
    with cluster(address, num_cpus) as c, Bars(enabled=not as_json) as bars:
        predicted = None if skip_predict else run_predict(pconfig, c, out_dir=folder, progress=bars)
        swept = emp.run_empirical(
            econfig, c, out_dir=folder, the_plan=the_plan, resume=resume, overwrite=overwrite, progress=bars
        )
    compared = run_compare(folder)
    if as_json:
        doc = {
            "out": str(folder),
            "predict": predict_cmd.summary(predicted) if predicted else None,
            "empirical": empirical_cmd.summary(swept),
            "compare": compare_cmd.summary(compared),
        }
        out.print_json(json.dumps(doc))
    else:
        if predicted:
            predict_cmd.render(predicted)
        else:
            out.print(f"predict: kept {predict_path} (same settings, --resume)")
        empirical_cmd.render(swept)
        compare_cmd.render(compared)
    if compared.frontier is None:
        raise RunError(f"no B_crit for {folder}: {compared.notes[0]}")


def _resumed(path: Path, settings: dict, checkpoints: int) -> str | None:
    """Under --resume, what to do with predict.parquet: "keep" it (this run's, finished), "redo" it
    (unreadable, or interrupted before its last checkpoint), or None (absent). Another run's file is
    refused, as --overwrite is the way to replace it."""
    if not path.exists():
        return None
    want = json.loads(json.dumps(settings, sort_keys=True))
    try:
        have = read_settings(path)
        done = {r["checkpoint"] for r in read_rows(path)}
    except Exception as exc:
        err.print(f"predict: cannot read {path} ({type(exc).__name__}); computing it again")
        return "redo"
    if have != want:
        changed = sorted(k for k in want if have is None or have.get(k) != want[k])
        raise UsageError(
            f"{path} holds a different predict run (differs in: {', '.join(changed) or 'format'}); with --resume "
            "repeat the first run's options, or pass --overwrite instead of --resume to start again"
        )
    if len(done) < checkpoints:
        err.print(f"predict: {path} has {len(done)} of {checkpoints} checkpoints (interrupted); computing it again")
        return "redo"
    return "keep"
