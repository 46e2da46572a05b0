"""The adaptive batch-size schedule: its batch follows the monitored noise scale, within its floor and
ceiling, with the lr scaled by its rule, inside its budget, in the seed's data order."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from example_tasks import batchnorm_blobs

from gns_sweep.errors import UsageError
from gns_sweep.monitor import MICRO_BATCH, PER_EXAMPLE
from gns_sweep.optim import OptimizerSpec
from gns_sweep.schedule import (
    ScheduleConfig,
    choose_batch,
    estimator_for,
    lr_for,
    nearest_power_of_two,
    run_schedule,
)
from gns_sweep.tasks import load_task
from gns_sweep.train import REACHED, TrainConfig, batches, eval_loss, init_model, train


@pytest.fixture(scope="module")
def linreg():
    return load_task("linreg")


def growing(task, **changes) -> ScheduleConfig:
    """Linear regression run past its target towards the noise floor, where B_noise grows as the loss falls."""
    base = dict(floor=4, ceiling=1024, every=2, target_loss=None, budget_examples=12000, lr_max=0.5)
    return ScheduleConfig.from_task(task, **{**base, **changes})


def check_decisions(result, config):
    """Every decision is the rule applied to the value the monitor read then, and every evaluated step ran at
    the batch size (and its lr) of the decision before it."""
    batch = config.floor
    for d in result.decisions:
        assert d.batch_size == choose_batch(d.b_noise, batch, config)
        if not math.isnan(d.b_noise):
            want = max(config.floor, min(config.ceiling, nearest_power_of_two(config.k * d.b_noise)))
            assert d.batch_size == want
        assert d.lr == lr_for(d.batch_size, config)
        batch = d.batch_size
    for step, b, lr in zip(result.curve_steps[1:], result.curve_batch_sizes[1:], result.curve_lrs[1:], strict=True):
        before = [d for d in result.decisions if d.step < step]
        assert b == (before[-1].batch_size if before else config.floor)
        assert lr == lr_for(b, config)
        assert result.step_batch_sizes[step - 1] == b
    # every step's batch size and reading: the examples add up, and each decision read the value of its step
    assert len(result.step_batch_sizes) == len(result.step_b_noise) == result.steps
    assert sum(result.step_batch_sizes) == result.examples
    for d in result.decisions:
        read = result.step_b_noise[d.step - 1]
        assert read == d.b_noise or (math.isnan(read) and math.isnan(d.b_noise))


@pytest.mark.parametrize("estimator", ["per-example", MICRO_BATCH])
def test_the_batch_follows_the_monitored_noise_scale_and_grows_towards_the_noise_floor(linreg, estimator):
    config = growing(linreg, estimator=estimator)
    result = run_schedule(linreg, config)
    check_decisions(result, config)
    resolved = [d for d in result.decisions if not math.isnan(d.b_noise)]
    assert len(resolved) >= 0.9 * len(result.decisions) >= 10
    quarter = len(resolved) // 4
    first = sorted(d.b_noise for d in resolved[:quarter])[quarter // 2]
    last = sorted(d.b_noise for d in resolved[-quarter:])[quarter // 2]
    assert last > 4 * first  # B_noise grows as the loss nears the noise floor ...
    assert result.decisions[-1].batch_size >= 8 * result.decisions[0].batch_size  # ... and the batch with it
    assert len(result.curve_steps) == len(result.curve_batch_sizes) == len(result.curve_examples)
    assert len(result.curve_lrs) == len(result.curve_b_noise) == len(result.curve_losses)
    assert result.curve_examples[-1] == result.examples and result.curve_steps[-1] == result.steps


def test_the_batch_is_clamped_to_floor_and_ceiling(linreg):
    config = growing(linreg, k=1000.0, floor=4, ceiling=16, budget_examples=2000)
    high = run_schedule(linreg, config)
    assert {d.batch_size for d in high.decisions} == {16}
    unclamped = replace(config, ceiling=2**40)
    assert all(choose_batch(d.b_noise, 16, unclamped) >= 2**10 for d in high.decisions)  # the rule wanted more
    config = growing(linreg, k=1e-3, floor=8, ceiling=1024, budget_examples=2000)
    low = run_schedule(linreg, config)
    assert {d.batch_size for d in low.decisions} == {8} and set(low.curve_batch_sizes) == {8}
    unclamped = replace(config, floor=1)
    assert all(choose_batch(d.b_noise, 8, unclamped) <= 2 for d in low.decisions)  # ... or less


def test_the_lr_follows_the_rule(linreg):
    linear = run_schedule(linreg, growing(linreg, lr_max=None, budget_examples=6000))
    ratios = [lr / b for lr, b in zip(linear.curve_lrs, linear.curve_batch_sizes, strict=True)]
    assert ratios == pytest.approx([linreg.lr / linreg.batch_size] * len(ratios))
    assert len(set(linear.curve_batch_sizes)) >= 3
    capped = run_schedule(linreg, growing(linreg, lr_max=0.2, budget_examples=6000))
    assert max(capped.curve_lrs) == 0.2
    for lr, b in zip(capped.curve_lrs, capped.curve_batch_sizes, strict=True):
        assert lr == min(0.2, linreg.lr * b / linreg.batch_size)
    constant = run_schedule(linreg, growing(linreg, lr_rule="constant", budget_examples=3000))
    assert set(constant.curve_lrs) == {linreg.lr} and len(set(constant.curve_batch_sizes)) >= 2


def test_the_budget_is_never_passed(linreg):
    for budget in (1000, 4321):
        r = run_schedule(linreg, growing(linreg, budget_examples=budget))
        assert r.status == "budget" and r.examples <= budget
        last = r.decisions[-1].batch_size if r.decisions and r.decisions[-1].step == r.steps else None
        assert r.examples + (last or r.curve_batch_sizes[-1]) > budget  # it stopped only when the next step would pass
        assert r.curve_steps[-1] == r.steps  # the last step is evaluated


def test_at_one_batch_size_it_is_the_fixed_batch_run(linreg):
    """floor = ceiling: the same steps, data order and eval curve as train() at that batch size."""
    config = ScheduleConfig.from_task(linreg, floor=16, ceiling=16, budget_examples=4000, seed=3)
    adaptive = run_schedule(linreg, config)
    fixed = train(linreg, TrainConfig(16, config.lr * 16 / config.base_batch, 4000, linreg.target_loss, seed=3))
    assert adaptive.status == fixed.status == REACHED
    assert adaptive.steps_to_target == fixed.steps_to_target and adaptive.curve_steps == fixed.curve_steps
    assert adaptive.curve_losses == pytest.approx(fixed.curve_losses, rel=1e-5)
    assert adaptive.examples_to_target == 16 * fixed.steps_to_target


def test_another_optimizer_takes_its_own_lr_rule(linreg):
    """Adam: the lr grows with the square root of the batch; at one batch size the run is train()'s with Adam."""
    adam = OptimizerSpec(name="adam")
    r = run_schedule(linreg, growing(linreg, optimizer=adam, lr=0.01, lr_max=None, budget_examples=3000))
    assert len(set(r.curve_batch_sizes)) >= 2
    for lr, b in zip(r.curve_lrs, r.curve_batch_sizes, strict=True):
        assert lr == pytest.approx(0.01 * math.sqrt(b / linreg.batch_size))
    one = ScheduleConfig.from_task(linreg, optimizer=adam, lr=0.01, floor=16, ceiling=16, budget_examples=1600)
    adaptive = run_schedule(linreg, replace(one, target_loss=None))
    fixed = train(linreg, TrainConfig(16, 0.01 * math.sqrt(2), 1600, None, seed=0, optimizer=adam))
    assert adaptive.curve_steps == fixed.curve_steps and adaptive.steps == fixed.steps == 100
    assert adaptive.curve_losses == pytest.approx(fixed.curve_losses, rel=1e-5)


def test_it_stops_at_the_target(linreg):
    r = run_schedule(linreg, ScheduleConfig.from_task(linreg, every=5))
    assert r.status == REACHED and r.final_eval_loss <= linreg.target_loss
    assert r.steps == r.steps_to_target == r.curve_steps[-1]
    assert r.examples_to_target == r.examples == r.curve_examples[-1]
    assert all(loss > linreg.target_loss for loss in r.curve_losses[:-1])
    assert r.wall_seconds > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(floor=1), "floor >= 2"),
        (dict(estimator=MICRO_BATCH, micro_batches=4, floor=2), "floor >= 4"),
        (dict(floor=64, ceiling=32), "ceiling >= floor"),
        (dict(lr_rule="cubic"), "linear, sqrt, constant"),
        (dict(k=0.0), "k must be"),
        (dict(every=0), "every must be a positive integer"),
        (dict(budget_examples=1), "less than one step"),
        (dict(estimator="both"), "per-example, micro-batch"),
        (dict(lr_max=-1.0), "lr_max"),
    ],
)
def test_bad_settings_are_refused_in_one_line(linreg, changes, message):
    with pytest.raises(UsageError, match=message) as e:
        run_schedule(linreg, ScheduleConfig.from_task(linreg, **changes))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def batchnorm():
    return batchnorm_blobs()


def test_a_batchnorm_model_is_measured_with_micro_batches(batchnorm):
    """BatchNorm in train mode leaves no per-example gradients: a sweep measures it with micro-batches, and the
    batch follows what they measure."""
    assert estimator_for(init_model(batchnorm, 0)) == MICRO_BATCH
    assert estimator_for(init_model(load_task("blobs-noisy"), 0)) == PER_EXAMPLE
    config = ScheduleConfig.from_task(
        batchnorm, estimator=MICRO_BATCH, floor=8, ceiling=512, target_loss=None, budget_examples=3000
    )
    result = run_schedule(batchnorm, config)
    check_decisions(result, config)
    resolved = [d for d in result.decisions if not math.isnan(d.b_noise)]
    assert len(resolved) >= 0.5 * len(result.decisions) >= 10
    assert len({d.batch_size for d in result.decisions}) >= 3
    assert result.final_eval_loss < 0.9 * result.initial_eval_loss
    with pytest.raises(UsageError, match=r"'1' \(BatchNorm1d\)"):
        run_schedule(batchnorm, replace(config, estimator=PER_EXAMPLE))
    with pytest.raises(UsageError, match="floor >= 8") as e:  # 4 micro-batches of 1 example
        run_schedule(batchnorm, replace(config, floor=4))
    assert "BatchNorm1d" in str(e.value) and "\n" not in str(e.value)


def test_with_micro_batches_batchnorm_normalises_each_micro_batch(batchnorm):
    """At one batch size, the schedule's steps are a hand-written loop of 4-way gradient accumulation with plain
    SGD, whose BatchNorm sees each micro-batch on its own -- not the whole batch's step."""
    config = ScheduleConfig.from_task(
        batchnorm, estimator=MICRO_BATCH, floor=16, ceiling=16, budget_examples=16 * 6, target_loss=None, seed=2
    )
    result = run_schedule(batchnorm, config)
    assert result.steps == 6 and result.step_batch_sizes == (16,) * 6

    def by_hand(micro: int) -> float:
        model = init_model(batchnorm, 2)
        order = batches(batchnorm.n_train, 16, 2)
        lr = lr_for(16, config)
        for _ in range(6):
            idx = next(order)
            model.zero_grad()
            for part in idx.tensor_split(micro):  # micro-batches of 16 / micro examples
                x, y = batchnorm.train_inputs[part], batchnorm.train_targets[part]
                (batchnorm.loss(model(x), y).mean() / micro).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
        return eval_loss(model, batchnorm)

    assert result.final_eval_loss == pytest.approx(by_hand(4), rel=1e-5)
    assert result.final_eval_loss != pytest.approx(by_hand(1), rel=1e-3)  # the whole batch normalised at once
