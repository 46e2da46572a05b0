"""A tiny real predict -> empirical -> compare on a loopback Ray cluster, and compare's input errors."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest
from gns_sweep_cli.compare import summary
from gns_sweep_cli.main import app
from typer.testing import CliRunner

from gns_sweep import ladder as ld
from gns_sweep.compare import at_target, compare, comparison_rows
from gns_sweep.errors import UsageError
from gns_sweep.results import Headline

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def swept(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    pred = invoke(
        "predict", "--task", "blobs-noisy", "--probe-size", "256", "--checkpoints", "2", "--shards", "2",
        "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert pred.exit_code == 0, pred.output
    emp = invoke(
        "empirical", "--task", "blobs-noisy", "--batch-sizes", "64,256,1024", "--lrs", "x0.5,x1", "--seeds", "2",
        "--budget-examples", "131072", "--out", str(out), "--address", ray_address,
    )  # fmt: skip
    assert emp.exit_code == 0, emp.output
    return out


def test_tiny_sweep_writes_every_file(swept):
    result = invoke("compare", str(swept))
    assert result.exit_code == 0, result.output
    assert "B_crit" in result.output and "B_simple" in result.output
    for name in ("predict.parquet", "trials.parquet", "curves.parquet", "comparison.parquet", "comparison.png"):
        assert (swept / name).exists(), name
    assert (swept / "comparison.png").stat().st_size > 10_000
    trials = pd.read_parquet(swept / "trials.parquet")
    assert len(trials) == 3 * 2 * 2
    required = {
        "trial_id", "task", "batch_size", "lr", "seed", "status", "steps_to_target", "examples_to_target",
        "target_loss", "final_eval_loss", "budget_examples", "wall_seconds", "node_id", "device",
    }  # fmt: skip
    assert required <= set(trials.columns)
    assert set(trials.status) <= {"reached", "budget", "diverged"}
    assert (trials.device == "cpu").all()
    comp = pd.read_parquet(swept / "comparison.parquet")
    assert comp.sweep_target.sum() == 1 and comp.target_loss.is_monotonic_decreasing  # easiest first
    row = comp[comp.sweep_target].iloc[0]
    assert row.task == "blobs-noisy" and row.b_crit > 0 and row.s_min > 0
    assert row.target_loss == trials.target_loss.iloc[0]
    assert (comp.ratio == comp.b_simple / comp.b_crit).all()
    assert (comp.b_simple_lo <= comp.b_simple).all() and (comp.b_simple <= comp.b_simple_hi).all()
    frontier = pd.read_parquet(swept / "frontier.parquet")
    at_own = frontier[frontier.target_loss == row.target_loss]
    assert list(at_own.batch_size) == [64, 256, 1024]
    # at the sweep's own target the steps read off the curves are the trials' own steps_to_target
    best = trials[trials.steps_to_target.notna()].groupby(["batch_size", "lr"]).steps_to_target.median()
    for b, steps in zip(at_own.batch_size, at_own.steps, strict=True):
        assert steps == best[b].min()
    assert (swept / "targets.png").stat().st_size > 10_000


def test_compare_json(swept):
    import json

    result = invoke("compare", str(swept), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    own = [t for t in doc["targets"] if t["comparison"]["sweep_target"]]
    assert len(own) == 1 and own[0]["comparison"]["task"] == "blobs-noisy"
    assert len(own[0]["batch_sizes"]) == 3


def test_targets_harder_than_the_sweep_are_refused(swept):
    target = pd.read_parquet(swept / "trials.parquet").target_loss.iloc[0]
    before = (swept / "comparison.parquet").read_bytes() if (swept / "comparison.parquet").exists() else None
    result = invoke("compare", str(swept), "--targets", f"{target + 0.05},{target - 0.01}")
    assert result.exit_code == 2 and "below the sweep's target" in result.output, result.output
    after = (swept / "comparison.parquet").read_bytes() if (swept / "comparison.parquet").exists() else None
    assert before == after  # nothing written
    chosen = invoke("compare", str(swept), "--targets", f"{target + 0.05}")
    assert chosen.exit_code == 0, chosen.output
    comp = pd.read_parquet(swept / "comparison.parquet")
    assert sorted(comp.target_loss) == pytest.approx(sorted([target, target + 0.05]))


def test_compare_input_errors(tmp_path, swept):
    missing = invoke("compare", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "not a folder" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    only_trials = tmp_path / "only-trials"
    only_trials.mkdir()
    (only_trials / "trials.parquet").write_bytes((swept / "trials.parquet").read_bytes())
    result = invoke("compare", str(only_trials))
    assert result.exit_code == 2 and "gns-sweep predict" in result.output
    assert sorted(p.name for p in only_trials.iterdir()) == ["trials.parquet"]  # nothing written
    only_predict = tmp_path / "only-predict"
    only_predict.mkdir()
    (only_predict / "predict.parquet").write_bytes((swept / "predict.parquet").read_bytes())
    result = invoke("compare", str(only_predict))
    assert result.exit_code == 2 and "gns-sweep empirical" in result.output
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "trials.parquet").write_bytes((swept / "trials.parquet").read_bytes())
    (damaged / "predict.parquet").write_bytes(b"not parquet at all")
    result = invoke("compare", str(damaged))
    assert result.exit_code == 2 and "is not a readable Parquet file" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    (damaged / "predict.parquet").write_bytes((swept / "trials.parquet").read_bytes())  # the wrong table
    result = invoke("compare", str(damaged))
    assert result.exit_code == 2 and "lacks the column(s)" in result.output, result.output


def test_result_files_follow_the_umask(swept):
    for name in ("predict.parquet", "trials.parquet", "plan.parquet"):
        mode = (swept / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask(), (name, oct(mode))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sweep_rows(steps_of):
    """trials.parquet and curves.parquet rows of a synthetic sweep whose loss is 1 - step/1000 until the step
    steps_of(b, lr, seed) returns (None: never reaches 0.5, the sweep's target)."""
    trials, curves = [], []
    for b in (8, 32, 128, 512):
        for seed in (0, 1):
            s = steps_of(b, 0.1, seed)
            tid = f"b{b}-s{seed}"
            trials.append(
                {
                    "trial_id": tid, "task": "t", "batch_size": b, "lr": 0.1, "seed": seed, "status": "reached" if s
                    else "budget", "steps_to_target": s, "target_loss": 0.5, "budget_examples": 10_000,
                    "initial_eval_loss": 1.0,
                }
            )  # fmt: skip
            last = s if s else 10_000 // b
            for step in range(last + 1):
                loss = 1.0 - 0.5 * step / s if s else 1.0 - 0.4 * step / last  # reaches 0.5 at step s exactly
                curves.append({"trial_id": tid, "step": step, "eval_loss": loss})
    return trials, curves


HEADLINE = Headline(40.0, 30.0, 50.0, 60.0, 10.0, 8, True)


def test_censored_and_unfittable_sweeps():
    trials, curves = sweep_rows(lambda b, lr, seed: None if b == 512 else 30 + 2000 // b)
    t = at_target(ld.trials_from_rows(trials, curves), 0.5, HEADLINE, own=True, resamples=50)
    assert t.censored == (512,)
    assert any("censored" in note for note in t.notes)
    assert t.b_crit == pytest.approx(2000 / 30, rel=0.05)
    assert t.ratio(40.0) == pytest.approx(40.0 / t.b_crit)
    one = [r for r in trials if r["batch_size"] in (8, 512) and r["seed"] == 0]
    only_one = at_target(ld.trials_from_rows(one, curves), 0.5, HEADLINE, own=True, resamples=10)
    assert only_one.frontier is None and math.isnan(only_one.b_crit)


def test_the_ladder_recovers_a_known_frontier_at_every_target():
    """Loss 1 - s/(tau (1 + Bc/B)) reaches T at s = tau (1 - T)(1 + Bc/B): B_crit = Bc at every target,
    S_min = tau (1 - T)."""
    tau, bc = 400.0, 50.0
    rows, curves = [], []
    for b in (4, 16, 64, 256, 1024):
        for seed in (0, 1, 2):
            tid = f"b{b}-s{seed}"
            rate = 1.0 / (tau * (1 + bc / b))
            end = math.ceil(0.5 / rate)
            rows.append(
                {
                    "trial_id": tid, "task": "t", "batch_size": b, "lr": 0.1, "seed": seed, "status": "reached",
                    "steps_to_target": end, "target_loss": 0.5, "budget_examples": 10**7, "initial_eval_loss": 1.0,
                }
            )  # fmt: skip
            curves += [{"trial_id": tid, "step": s, "eval_loss": 1.0 - s * rate} for s in range(end + 1)]
    trials = ld.trials_from_rows(rows, curves)
    ladder = ld.default_ladder(trials, 0.5)
    assert len(ladder.targets) == ld.LADDER_SIZE and ladder.targets[-1] == pytest.approx(0.5, abs=0.02)
    assert list(ladder.targets) == sorted(ladder.targets, reverse=True)
    for target in ladder.targets:
        points, fit = ld.fit_at(trials, target)
        s_min = tau * (1 - target)
        rounding = 1 / s_min  # steps to a target are whole numbers
        assert fit.b_crit == pytest.approx(bc, rel=0.05 + rounding), target
        assert fit.s_min == pytest.approx(s_min, rel=0.02 + rounding), target
        assert fit.s_min >= ld.EASY_END_S_MIN * 0.9  # the easy end has two ends
    spacing = (1.0 - 0.5) / ld.CANDIDATES
    assert ladder.targets[0] >= 1 - ld.EASY_END_S_MIN / tau - 2 * spacing  # the easiest such target


def predict_rows(optimizer: str, *, precond: bool) -> list[dict]:
    """predict.parquet rows of a 4-checkpoint reference run: B_simple 40 throughout, and (for an adaptive
    optimizer) a preconditioned noise scale of 10."""
    out = []
    for c, loss in enumerate((1.0, 0.8, 0.6, 0.45)):
        g2, tr = 0.1 + 0.05 * c, 4.0 + 2.0 * c
        out.append(
            dict(
                task="t", checkpoint=c, step=10 * c, examples_seen=80 * c, train_loss=loss, eval_loss=loss,
                n_checkpoints=4, scope="total", n_params=3, n_examples=64, estimator="per-example", micro_batch=1,
                engine="fast", grad_sq_norm=g2, grad_sq_norm_biased=g2, trace_sigma=tr, b_simple=tr / g2,
                b_simple_lo=1.0, b_simple_hi=100.0, b_simple_lower_bound=1.0, resolved=True, snr_mean=0.1,
                update_ratio=0.01, optimizer=optimizer,
                trace_sigma_precond=tr / 4 if precond else None, grad_sq_norm_precond=g2 if precond else None,
                b_simple_precond=tr / 4 / g2 if precond else None, b_simple_precond_lo=None, b_simple_precond_hi=None,
            )
        )  # fmt: skip
    return out


def sgd_like_sweep(optimizer: str | None):
    trials, curves = sweep_rows(lambda b, lr, seed: 30 + 2000 // b)
    for r in trials:
        if optimizer is not None:
            r["optimizer"] = optimizer
    return trials, curves


def test_an_adaptive_sweep_is_judged_by_the_preconditioned_noise_scale():
    trials, curves = sgd_like_sweep("adam")
    c = compare(trials, curves, predict_rows("adam", precond=True), resamples=20)
    assert (c.optimizer, c.predict_optimizer, c.prediction, c.warnings) == ("adam", "adam", "b_simple_precond", ())
    for row, t in zip(comparison_rows(c), c.targets, strict=True):
        assert row["b_simple_precond"] == pytest.approx(10.0) and row["b_simple"] == pytest.approx(40.0)
        assert row["ratio"] == pytest.approx(10.0 / t.b_crit)
        assert (row["prediction"], row["optimizer"], row["predict_optimizer"]) == ("b_simple_precond", "adam", "adam")
    # an SGD sweep of the same folder keeps B_simple, with a warning that predict ran another optimizer
    trials, curves = sgd_like_sweep("sgd")
    sgd = compare(trials, curves, predict_rows("adam", precond=True), resamples=20)
    assert sgd.prediction == "b_simple" and "sweep trained with sgd" in sgd.warnings[0]
    row = comparison_rows(sgd)[-1]
    assert row["ratio"] == pytest.approx(40.0 / sgd.targets[-1].b_crit)
    assert row["b_simple_precond"] == pytest.approx(10.0)  # still reported


def test_optimizers_that_differ_are_warned_about_and_a_missing_column_is_sgd():
    trials, curves = sgd_like_sweep(None)  # a trials file from before the optimizer column
    plain = compare(trials, curves, predict_rows("sgd", precond=False), resamples=20)
    assert (plain.optimizer, plain.prediction, plain.warnings) == ("sgd", "b_simple", ())
    assert math.isnan(comparison_rows(plain)[0]["b_simple_precond"])
    old = [{k: v for k, v in r.items() if "precond" not in k} for r in predict_rows("sgd", precond=False)]
    before = compare(trials, curves, [{**r, "optimizer": None} for r in old], resamples=20)  # a file without them
    assert comparison_rows(before) == comparison_rows(plain)
    trials, curves = sgd_like_sweep("adamw")
    c = compare(trials, curves, predict_rows("sgd", precond=False), resamples=20)
    assert c.prediction == "b_simple" and "adamw" in c.warnings[0] and "--optimizer adamw" in c.warnings[0]
    c = compare(trials, curves, predict_rows("adam", precond=True), resamples=20)
    assert c.prediction == "b_simple_precond" and "predict's reference run with adam" in c.warnings[0]
    mixed = [{**r, "optimizer": "adam" if r["seed"] else "sgd"} for r in trials]
    with pytest.raises(UsageError, match="mix optimizers adam, sgd"):
        compare(mixed, curves, predict_rows("adam", precond=True), resamples=20)


def test_several_folders_side_by_side(swept, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("predict.parquet", "trials.parquet", "curves.parquet"):
        (other / name).write_bytes((swept / name).read_bytes())
    target = pd.read_parquet(swept / "trials.parquet").target_loss.iloc[0]
    chosen = ("--targets", f"{target + 0.05}")  # two targets (with the sweep's own): a fraction of the ladder's cost
    own = invoke("compare", str(swept), *chosen)
    assert own.exit_code == 0, own.output
    alone = pd.read_parquet(swept / "comparison.parquet")
    before = {p.name: p.read_bytes() for p in swept.iterdir() if p.is_file()}
    out = tmp_path / "side"
    result = invoke("compare", str(swept), str(other), "--out", str(out), *chosen)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in swept.iterdir() if p.is_file()} == before  # the folders are only read
    assert sorted(p.name for p in other.iterdir()) == ["curves.parquet", "predict.parquet", "trials.parquet"]
    both = pd.read_parquet(out / "comparison.parquet")
    assert list(both.folder.unique()) == [str(swept), str(other)]
    for folder in (swept, other):
        part = both[both.folder == str(folder)].drop(columns="folder").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone)
    assert set(both.optimizer) == {"sgd"} and set(both.prediction) == {"b_simple"}
    assert (out / "targets.png").stat().st_size > 10_000
    assert "│ other" in result.output and "sgd" in result.output  # folders by their names
    doc = invoke("compare", str(swept), str(other), "--out", str(out), "--json", *chosen)
    assert doc.exit_code == 0, doc.output
    import json

    assert [f["folder"] for f in json.loads(doc.output)["folders"]] == [str(swept), str(other)]


def test_several_folders_input_errors(swept, tmp_path):
    for args, message in (
        ([str(swept), str(swept)], "need --out"),
        ([str(swept), str(swept), "--out", str(tmp_path / "x")], "given twice"),
        ([str(swept), str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")], "not a folder"),
        ([str(swept), "--out", str(swept)], "one of the folders compared"),
    ):
        result = invoke("compare", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written


def test_momentum_and_lars_sweeps_say_how_to_read_the_ratio():
    """B_simple is a lower estimate for momentum and no prediction for LARS (docs/optimizers.md): compare says so
    for those sweeps (in the --json summary too), and for no other."""
    for name, phrase in (("momentum", "lower estimate"), ("lars", "no matching prediction")):
        trials, curves = sgd_like_sweep(name)
        c = compare(trials, curves, predict_rows(name, precond=False), resamples=20)
        assert c.warnings == () and phrase in c.reading
        assert summary(c)["reading"] == c.reading
    for name in ("sgd", "adam"):
        trials, curves = sgd_like_sweep(name)
        assert compare(trials, curves, predict_rows(name, precond=name == "adam"), resamples=20).reading is None


def test_compare_knows_the_adaptive_optimizers_without_importing_torch():
    """compare reads results without torch, so it keeps its own list of adaptive optimizers: the optimizers'."""
    from gns_sweep import compare as compare_module
    from gns_sweep import optim

    assert compare_module.ADAPTIVE == optim.ADAPTIVE
