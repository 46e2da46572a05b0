"""The real-data workload tasks: charmlp, tinygpt, digits-cnn (docs/data.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep import data
from gns_sweep.per_example import get_engine, param_layout, shard_moments
from gns_sweep.tasks import Task, charmlp, digits_cnn, tinygpt
from gns_sweep.train import TrainConfig, eval_loss, init_model, train

MODULES = {"charmlp": charmlp, "tinygpt": tinygpt, "digits-cnn": digits_cnn}
# name: (train inputs shape, train targets shape, eval inputs shape, eval targets shape, parameters)
SHAPES = {
    "charmlp": ((203_969, 3), (203_969,), (10_795, 3), (10_795,), 12_097),
    "tinygpt": ((11_835, 64), (11_835, 64), (32, 64), (32, 64), 213_577),
    "digits-cnn": ((4_000, 1, 14, 14), (4_000,), (1_000, 1, 14, 14), (1_000,), 24_170),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is faster, and two fight the other processes of a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(MODULES))
def task(request) -> Task:
    return MODULES[request.param].make()


def test_builds_with_the_documented_shapes(task):
    x, y, xe, ye, n_params = SHAPES[task.name]
    assert task.train_inputs.shape == x and task.train_targets.shape == y
    assert task.eval_inputs.shape == xe and task.eval_targets.shape == ye
    assert sum(p.numel() for p in task.build_model().parameters()) == n_params
    assert task.batch_sizes == tuple(sorted(task.batch_sizes)) and task.batch_size in task.batch_sizes
    assert task.target_loss is not None and task.budget_examples >= max(task.batch_sizes)
    assert max(task.batch_sizes) <= task.n_train


def test_loss_is_per_example(task):
    model = init_model(task, seed=0)
    out = task.loss(model(task.train_inputs[:5]), task.train_targets[:5])
    assert out.shape == (5,) and torch.isfinite(out).all()


def test_a_few_sgd_steps_at_its_lr_lower_the_eval_loss(task):
    steps = 15
    cfg = TrainConfig(task.batch_size, task.lr, steps * task.batch_size, None, seed=0)
    r = train(task, cfg, stop_after=steps)
    assert r.status == "budget" and r.steps == steps
    assert r.final_eval_loss < r.initial_eval_loss - 0.1, (r.initial_eval_loss, r.final_eval_loss)


def test_initial_eval_loss_is_near_uniform(task):
    n_classes = {"charmlp": 27, "tinygpt": len(tinygpt.VOCAB), "digits-cnn": 10}[task.name]
    loss = eval_loss(init_model(task, seed=0), task)
    assert abs(loss - np.log(n_classes)) < 0.2, loss


def test_picklable_for_ray_workers(task):
    import pickle

    assert pickle.loads(pickle.dumps(task.build_model)) is task.build_model
    assert pickle.loads(pickle.dumps(task.loss)) is task.loss


# --- charmlp -------------------------------------------------------------------


def test_charmlp_examples_pad_each_name():
    x, y = charmlp.examples(["emma", "al"])
    assert x.tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 13], [5, 13, 13], [13, 13, 1], [0, 0, 0], [0, 0, 1], [0, 1, 12]]
    assert y.tolist() == [5, 13, 13, 1, 0, 1, 12, 0]


def test_charmlp_split_by_name():
    names = data.names()
    held = [n for n in names if charmlp.is_eval_name(n)]
    assert len(names) - len(held) == charmlp.N_TRAIN_NAMES and len(held) == charmlp.N_EVAL_NAMES
    assert charmlp.N_TRAIN == sum(len(n) + 1 for n in names if not charmlp.is_eval_name(n))
    assert charmlp.N_EVAL == sum(len(n) + 1 for n in held)


def test_charmlp_uses_batchnorm():
    model = charmlp.CharMLP()
    assert isinstance(model.norm, nn.BatchNorm1d) and model.hidden.bias is None


# --- tinygpt -------------------------------------------------------------------


def test_tinygpt_windows_are_the_text_shifted_by_one():
    (x, y), (xe, ye) = tinygpt.split()
    assert x.shape[0] == tinygpt.N_TRAIN and xe.shape[0] == tinygpt.N_EVAL_AVAILABLE
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(xe[:, 1:], ye[:, :-1])
    decoded = "".join(tinygpt.VOCAB[i] for i in x[0].tolist())
    assert decoded == data.shakespeare()["hamlet"][: tinygpt.CONTEXT]
    assert tinygpt.VOCAB == "".join(sorted(set("".join(data.shakespeare().values()))))


def test_tinygpt_is_causal():
    torch.manual_seed(0)
    model = tinygpt.TinyGPT().eval()
    x = torch.randint(0, len(tinygpt.VOCAB), (2, tinygpt.CONTEXT))
    x2 = x.clone()
    x2[:, 40:] = (x2[:, 40:] + 1) % len(tinygpt.VOCAB)
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :40], model(x2)[:, :40], atol=1e-5)
        assert not torch.allclose(model(x)[:, 40:], model(x2)[:, 40:])


def test_tinygpt_loss_is_the_mean_token_loss():
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    expected = torch.stack([nn.functional.cross_entropy(logits[i], targets[i]) for i in range(3)])
    assert torch.allclose(tinygpt.sequence_cross_entropy(logits, targets), expected)


# --- digits-cnn ----------------------------------------------------------------


def test_digits_split_is_balanced():
    (x, y), (xe, ye) = digits_cnn.split()
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(ye).tolist() == [100] * 10
    assert abs(float(x.mean())) < 0.1  # standardised


# --- per-example gradients ----------------------------------------------------


@pytest.mark.parametrize("name", ["tinygpt", "digits-cnn"])
def test_fast_engine_matches_the_loop(name):
    """The two models predict can take: the fast engine's rules agree with one backward per example."""
    task = MODULES[name].make()
    model = init_model(task, seed=0)
    x, y = task.train_inputs[:4], task.train_targets[:4]
    layout = param_layout(model)
    fast, loop = (
        shard_moments(get_engine(e), model, x, y, task.loss, layout, max_batch=4, param_moments=False).moments
        for e in ("fast", "loop")
    )
    np.testing.assert_allclose(fast.mean, loop.mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast.m2_group, loop.m2_group, rtol=1e-3, atol=1e-9)
