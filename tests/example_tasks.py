"""User-style task modules for the `--task package.module:attr` tests."""

import os

import torch
from torch import nn

import gns_sweep


def _mse(out, y):
    return 0.5 * (out.squeeze(-1) - y) ** 2  # (N,)


def identical():
    """Every example is the same: no gradient noise, so tr(Sigma) = 0 and B_simple = 0."""
    x = torch.ones(64, 3)
    y = torch.full((64,), 2.0)
    return gns_sweep.Task(
        name="identical",
        build_model=lambda: nn.Linear(3, 1),
        train_inputs=x,
        train_targets=y,
        eval_inputs=x[:8],
        eval_targets=y[:8],
        loss=_mse,
    )


def not_a_task():
    return {"name": "a dict, not a Task"}


NOT_CALLABLE = 42


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        raise RuntimeError("the user's model is broken")


def broken():
    """A task whose model fails at run time: a runtime failure (exit 1), not bad input."""
    task = identical()
    return gns_sweep.Task(**{**task.__dict__, "name": "broken", "build_model": _Broken})


def nan_target():
    """A task whose default target is NaN: bad input, refused before any work."""
    return gns_sweep.Task(**{**identical().__dict__, "name": "nan-target", "target_loss": float("nan")})


def mean_loss():
    """A loss that averages the batch: refused up front, as per-example gradients need one loss per example."""
    return gns_sweep.Task(**{**identical().__dict__, "name": "mean-loss", "loss": lambda out, y: _mse(out, y).mean()})


def batchnorm():
    """BatchNorm in train mode couples the examples of a batch: the per-example estimator refuses it."""
    model = lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))  # noqa: E731
    return gns_sweep.Task(**{**identical().__dict__, "name": "batchnorm", "build_model": model})


def separable_without_target():
    """A user's task with no target, which large batches learn in a few steps at a loose target."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return gns_sweep.Task(
        name="separable",
        build_model=lambda: nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 2)),
        train_inputs=x[:5000],
        train_targets=y[:5000],
        eval_inputs=x[5000:],
        eval_targets=y[5000:],
        loss=lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"),
        batch_sizes=(8, 16, 32, 64, 128, 256, 512),
    )


def frozen():
    """A model whose parameters all have requires_grad off: nothing to train, refused up front."""

    def build():
        model = nn.Linear(3, 1)
        model.requires_grad_(False)
        return model

    return gns_sweep.Task(**{**identical().__dict__, "name": "frozen", "build_model": build})


def nan_inputs():
    """A NaN in one training example: refused when the Task is made, not found deep inside training."""
    x = identical().train_inputs.clone()
    x[5, 1] = float("nan")
    return gns_sweep.Task(**{**identical().__dict__, "name": "nan-inputs", "train_inputs": x})


def fails_at_batch_16():
    """A user's loss that raises on training batches of 16 while the file named by GNS_TEST_FAIL_FLAG
    exists: those trials fail in their own code, the others run; deleting the file fixes the cause."""
    flag = os.environ.get("GNS_TEST_FAIL_FLAG", "")

    def loss(out, y):
        if out.shape[0] == 16 and flag and os.path.exists(flag):
            raise ValueError("the user's loss refuses batches of 16")
        return _mse(out, y)

    return gns_sweep.Task(**{**identical().__dict__, "name": "fails-at-16", "loss": loss})


def _blobs_with(norm) -> "gns_sweep.Task":
    from gns_sweep.tasks import load_task

    blobs = load_task("blobs-noisy")
    model = lambda: nn.Sequential(nn.Linear(2, 16), norm(16), nn.Tanh(), nn.Linear(16, 3))  # noqa: E731
    return gns_sweep.Task(**{**blobs.__dict__, "name": f"blobs-{norm.__name__}", "build_model": model})


def batchnorm_blobs():
    """blobs-noisy with a BatchNorm MLP: only micro-batches can measure it."""
    return _blobs_with(nn.BatchNorm1d)


def layernorm_blobs():
    """blobs-noisy with two LayerNorms (layers 1 and 3), for the norm-layers scope."""
    blobs = _blobs_with(nn.LayerNorm)
    model = lambda: nn.Sequential(nn.Linear(2, 16), nn.LayerNorm(16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))  # noqa: E731
    return gns_sweep.Task(**{**blobs.__dict__, "name": "blobs-layernorm", "build_model": model})
