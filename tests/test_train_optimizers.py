"""Training with an optimizer: the update:data ratio is the real step, predict's reference run keeps Adam's
preconditioner at its checkpoints, and the lr an optimizer of another family starts from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gns_sweep.optim import OptimizerSpec, build
from gns_sweep.predict.reference import reference_run
from gns_sweep.progress import no_progress
from gns_sweep.tasks import load_task
from gns_sweep.train import TrainConfig, batches, init_model, reference_lr, train


@pytest.fixture(scope="module")
def blobs():
    return load_task("blobs-noisy")


def _by_hand(task, spec, lr, steps, *, batch_size=None, seed=0):
    """The same run as train(), written out: init, batches, torch's optimizer. Returns (model, optimizer,
    weights before the last step)."""
    batch_size = batch_size or task.batch_size
    model = init_model(task, seed)
    opt = build(spec, model.parameters(), lr)
    data = batches(task.n_train, batch_size, seed)
    before = None
    for _ in range(steps):
        idx = next(data)
        opt.zero_grad(set_to_none=True)
        task.loss(model(task.train_inputs[idx]), task.train_targets[idx]).mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    return model, opt, before


@pytest.mark.parametrize("name", ["momentum", "adam", "lars"])
def test_update_ratios_are_the_real_step_of_the_last_step(blobs, name):
    spec = OptimizerSpec(name)
    lr, steps = {"momentum": 0.01, "adam": 0.01, "lars": 1.0}[name], 101  # step 101: the budget's end, no eval due
    r = train(blobs, TrainConfig(8, lr, steps * 8, None, seed=3, optimizer=spec))
    assert r.steps == steps
    model, opt, before = _by_hand(blobs, spec, lr, steps, batch_size=8, seed=3)
    naive_differs = []
    for n, p in model.named_parameters():
        real = float((p.detach() - before[n]).norm()) / float(p.detach().norm())
        assert r.update_ratios[n] == pytest.approx(real, rel=1e-5), n
        naive = lr * float(p.grad.norm()) / float(p.detach().norm())
        naive_differs.append(abs(naive / real - 1) > 0.05)
    assert sum(naive_differs) >= 3  # the step is not lr * grad for these optimizers (of 4 parameters)


def test_plain_sgd_keeps_lr_times_grad(blobs):
    r = train(blobs, TrainConfig(8, 0.1, 5 * 8, None, seed=0))
    model, _, _ = _by_hand(blobs, OptimizerSpec(), 0.1, 5, batch_size=8)
    for n, p in model.named_parameters():
        assert r.update_ratios[n] == pytest.approx(0.1 * float(p.grad.norm()) / float(p.detach().norm()), rel=1e-5)


def test_the_reference_run_keeps_adam_s_preconditioner_and_real_steps(blobs):
    spec = OptimizerSpec("adam", betas=(0.9, 0.99), eps=1e-6)
    task = dataclasses.replace(blobs, optimizer=spec, lr=0.02)  # Adam's own lr: no matching to do
    ref, snaps = reference_run(task, seed=1, warmup_steps=0, checkpoints=1, progress=no_progress)
    assert ref.checkpoint_steps == (0,) and snaps[0].preconditioner is None  # before the first step: no v_hat
    ref, snaps = reference_run(task, seed=1, warmup_steps=6, checkpoints=1, progress=no_progress)
    assert ref.checkpoint_steps == (6,) and ref.optimizer == spec and ref.lr == 0.02
    model, opt, before = _by_hand(task, spec, ref.lr, 6, seed=1)
    snap = snaps[6]
    for n, p in model.named_parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.99**6)
        assert torch.allclose(snap.preconditioner[n], 1 / (v_hat.sqrt() + 1e-6), rtol=1e-5), n
        assert torch.equal(snap.state[n], p.detach())
        step_sq, w_sq = snap.updates[n]
        assert step_sq == pytest.approx(float((p.detach() - before[n]).square().sum()), rel=1e-5)
        assert w_sq == pytest.approx(float(p.detach().square().sum()), rel=1e-6)
    _, sgd = reference_run(blobs, seed=1, warmup_steps=6, checkpoints=1, progress=no_progress)
    assert sgd[6].preconditioner is None
    model, _, _ = _by_hand(blobs, OptimizerSpec(), blobs.lr, 6, seed=1)
    for n, p in model.named_parameters():  # plain SGD: (lr * grad)^2, as before optimizers were added
        assert sgd[6].updates[n][0] == pytest.approx(float((blobs.lr * p.grad).square().sum()), rel=1e-6)


def test_the_lr_of_another_family_is_matched_by_the_update_ratio(blobs):
    """The task's lr is for SGD. Momentum keeps SGD's effective lr, lr/(1 - m); Adam's lr is the one whose
    steps are as large against the weights as SGD's at the task's lr (in the same 100 first steps)."""
    from gns_sweep.train import MATCH_STEPS, update_ratio

    assert reference_lr(blobs, OptimizerSpec()).lr == blobs.lr
    assert reference_lr(blobs, OptimizerSpec("momentum", momentum=0.75)).lr == pytest.approx(blobs.lr / 4)
    adam = OptimizerSpec("adam")
    matched = reference_lr(blobs, adam)
    assert "update:data ratio" in matched.reason
    sgd_ratio = update_ratio(blobs, OptimizerSpec(), blobs.lr, steps=MATCH_STEPS)
    adam_ratio = update_ratio(blobs, adam, matched.lr, steps=MATCH_STEPS)
    assert adam_ratio == pytest.approx(sgd_ratio, rel=0.5)  # one rescaling of a sub-linear ratio: near, not exact
    task_adam = dataclasses.replace(blobs, optimizer=OptimizerSpec("adamw"), lr=0.02)
    assert reference_lr(task_adam, adam).lr == 0.02  # the same family: the task's lr as it is
