"""The Task type: the plugin contract between a user's problem and gns-sweep."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.optim import OptimizerSpec


@dataclass(frozen=True)
class Task:
    """A training problem: a model factory, data, a per-example loss, and defaults."""

    name: str  # short identifier, recorded in every result file
    build_model: Callable[[], nn.Module]  # zero-argument factory; the caller seeds torch first
    train_inputs: torch.Tensor  # (N_train, ...) training examples
    train_targets: torch.Tensor  # (N_train, ...) their targets
    eval_inputs: torch.Tensor  # (N_eval, ...) held-out examples for the eval loss
    eval_targets: torch.Tensor  # (N_eval, ...)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> per-example losses (N,)
    lr: float = 0.1  # default learning rate of `optimizer` at batch size `batch_size`
    batch_size: int = 8  # small batch of predict's reference run
    target_loss: float | None = None  # default eval-loss target; None: chosen by a pilot run
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # default sweep grid
    budget_examples: int = 200_000  # default per-run compute budget, in examples
    description: str = ""  # one line for `gns-sweep tasks`
    optimizer: OptimizerSpec | None = None  # default optimizer of predict and the sweep (None: plain SGD)

    def __post_init__(self) -> None:
        for split in ("train", "eval"):
            x, y = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_targets")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise UsageError(f"task '{self.name}': {split}_inputs and {split}_targets must be torch tensors")
            if x.shape[0] != y.shape[0]:
                raise UsageError(
                    f"task '{self.name}': {split}_inputs has {x.shape[0]} examples but {split}_targets has "
                    f"{y.shape[0]}; the first dimension must count examples in both"
                )
            if x.shape[0] < 1:
                raise UsageError(f"task '{self.name}': {split} split is empty")
            for field, values in ((f"{split}_inputs", x), (f"{split}_targets", y)):
                _check_finite(self.name, field, values)
        if not callable(self.build_model) or not callable(self.loss):
            raise UsageError(f"task '{self.name}': build_model and loss must be callables")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"task '{self.name}': lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"task '{self.name}': batch_size must be >= 1, got {self.batch_size}")
        if self.budget_examples < 1:
            raise UsageError(f"task '{self.name}': budget_examples must be >= 1, got {self.budget_examples}")
        if self.optimizer is not None and not isinstance(self.optimizer, OptimizerSpec):
            raise UsageError(
                f"task '{self.name}': optimizer must be a gns_sweep.optim.OptimizerSpec or None (plain SGD), "
                f"got {type(self.optimizer).__name__}"
            )
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise UsageError(
                f"task '{self.name}': target_loss must be a finite number, got {self.target_loss}; "
                "use None to let a pilot run choose it"
            )

    @property
    def n_train(self) -> int:
        return int(self.train_inputs.shape[0])


def _check_finite(task: str, field: str, values: torch.Tensor) -> None:
    """NaN or inf in the data would only surface deep inside training, as a diverged run or worse."""
    if not (values.is_floating_point() or values.is_complex()):
        return
    bad = ~torch.isfinite(values).reshape(values.shape[0], -1).all(dim=1)
    if bad.any():
        raise UsageError(
            f"task '{task}': {field} holds NaN or infinite values in {int(bad.sum())} example(s) (the first is "
            f"example {int(bad.nonzero()[0])}); drop or repair those examples before making the Task"
        )


def check_trainable(task: Task, model: nn.Module) -> None:
    """Training needs something to move: refuse a model whose parameters all have requires_grad off."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(
            f"task '{task.name}': the model from build_model() has no trainable parameters (none requires grad); "
            "leave requires_grad on for the parameters gns-sweep should train"
        )
