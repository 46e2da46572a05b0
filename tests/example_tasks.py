"""User-style task modules for the `--task package.module:attr` tests."""

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
