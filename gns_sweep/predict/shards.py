"""How the probe is cut: jackknife blocks, a fixed micro-batch grid, and contiguous shards.

The grid does not depend on the shard count, so every micro-batch is computed
identically however the work is split, and the float64 merge gives the same
result (to rounding) for any number of shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

PROBE_SEED_OFFSET = 104729  # the probe draws use their own stream, apart from the data order
CHECKPOINT_STRIDE = 1_000_003  # a prime above any checkpoint count: (seed, checkpoint) pairs never collide

Unit = tuple[int, int, int]  # (block index, first example, end example): one micro-batch


def probe_indices(n_train: int, probe_size: int, seed: int, checkpoint: int) -> torch.Tensor:
    """Which training examples a checkpoint's probe measures: a seeded draw without replacement.

    Each checkpoint draws afresh: the probe's sampling error in |G|^2 then averages out over
    the checkpoints, where one probe reused everywhere would bias every checkpoint alike."""
    gen = torch.Generator().manual_seed((seed + PROBE_SEED_OFFSET) * CHECKPOINT_STRIDE + checkpoint)
    return torch.randperm(n_train, generator=gen)[:probe_size]


def edges(n: int, parts: int) -> list[int]:
    """Cut n examples into `parts` contiguous pieces of near-equal size."""
    return [int(round(x)) for x in np.linspace(0, n, parts + 1)]


def largest_block(probe_size: int, blocks: int) -> int:
    e = edges(probe_size, min(blocks, probe_size))
    return max(b - a for a, b in pairwise(e))


def micro_batches(n: int, block_edges: Sequence[int], max_batch: int, shards: int) -> list[Unit]:
    """A fixed grid of micro-batches: blocks cut at multiples of max_batch.

    Only when there are more shards than micro-batches are the micro-batches
    halved until every shard gets one.
    """
    cuts = sorted(set(block_edges) | set(range(0, n, max_batch)) | {n})
    units = [(int(np.searchsorted(block_edges, lo, side="right") - 1), lo, hi) for lo, hi in pairwise(cuts)]
    while len(units) < shards:
        units = [piece for b, lo, hi in units for piece in _halve(b, lo, hi)]
    return units


def _halve(b: int, lo: int, hi: int) -> list[Unit]:
    if hi - lo < 2:
        return [(b, lo, hi)]
    mid = (lo + hi) // 2
    return [(b, lo, mid), (b, mid, hi)]


def assign(units: Sequence[Unit], shards: int) -> list[list[Unit]]:
    """Contiguous runs of micro-batches, about equal in examples, none empty."""
    starts = [lo for _, lo, _ in units]
    n = units[-1][2]
    bounds = [0]
    for k in range(1, shards):
        i = int(np.searchsorted(starts, k * n / shards))
        bounds.append(min(max(i, bounds[-1] + 1), len(units) - (shards - k)))
    bounds.append(len(units))
    return [list(units[a:b]) for a, b in pairwise(bounds)]
