"""The work of one checkpoint: shards measure their micro-batches, the driver merges them into rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from gns_sweep import stats as st
from gns_sweep.per_example import ParamLayout, SumAccumulator, get_engine, param_layout
from gns_sweep.per_example.base import refuse_coupled_layers
from gns_sweep.predict.config import ESTIMATOR
from gns_sweep.predict.shards import Unit
from gns_sweep.results import ScopeRow
from gns_sweep.runtime import WorkerInfo

Piece = tuple[int, st.Moments, float]  # (block index, moments, loss sum) of one shard's part of a block


def probe_shard(
    *,
    model: nn.Module,
    data: tuple,
    probe: torch.Tensor,
    units: Sequence[Unit],
    engine: str,
    param_moments: bool,
    worker: WorkerInfo,
) -> list[Piece]:
    """Runs on a worker: the moments of its pieces of each block of one checkpoint's probe.

    `data` is (inputs, targets, loss) of the whole training set, shared by every task through the
    object store; `probe` the checkpoint's example indices, which `units` cut into micro-batches.
    Consecutive micro-batches of one block are folded into one float64 accumulator, so a block
    costs one conversion to Moments, however many micro-batches it holds.
    """
    all_inputs, all_targets, loss = data
    inputs, targets = all_inputs[probe], all_targets[probe]  # (probe_size, ...): this checkpoint's draw
    model = model.to(worker.device).train()
    refuse_coupled_layers(model)
    layout = param_layout(model)
    eng = get_engine(engine)
    out: list[Piece] = []
    acc, block = None, None
    for b, lo, hi in units:
        if b != block:
            if acc is not None:
                out.append((block, acc.moments(), acc.loss_sum))
            acc, block = SumAccumulator(layout, param_moments=param_moments), b
        x = inputs[lo:hi].to(worker.device)
        y = targets[lo:hi].to(worker.device)
        acc.add(eng.batch_sums(model, x, y, loss, layout, param_moments=param_moments))
    if acc is not None:
        out.append((block, acc.moments(), acc.loss_sum))
    return out


def measure(pieces: Sequence[Piece], n_blocks: int) -> tuple[st.Moments, list[st.Moments], float]:
    """Merge shard pieces into blocks, and blocks into the total."""
    by_block: list[list[st.Moments]] = [[] for _ in range(n_blocks)]
    loss_sum = 0.0
    for b, m, ls in pieces:  # in example order: the merge tree is the same for any sharding
        by_block[b].append(m)
        loss_sum += ls
    blocks = [st.merge_all(parts) for parts in by_block]
    return st.merge_all(blocks), blocks, loss_sum


@dataclass(frozen=True)
class Checkpoint:
    """Where a measurement was taken: the columns shared by its rows."""

    task: str
    checkpoint: int  # index along the reference run
    step: int  # SGD steps taken
    examples_seen: int  # step * reference batch size
    eval_loss: float  # eval loss of the weights measured
    engine: str  # per-example engine used
    n_checkpoints: int  # checkpoints along the reference run (a finished file has them all)


def scope_rows(
    where: Checkpoint, total: st.Moments, blocks: Sequence[st.Moments], loss_sum: float, layout: ParamLayout
) -> list[ScopeRow]:
    """One row per scope: the estimate, its jackknife interval, mean SNR."""
    snr = st.snr(total)
    rows = []
    for scope, groups in layout.scopes.items():
        est = st.estimate_scope(total, groups)
        ci = st.jackknife_interval(total, blocks, groups)
        mask = np.concatenate([np.arange(layout.offsets[g], layout.offsets[g + 1]) for g in groups])
        rows.append(
            ScopeRow(
                **asdict(where),
                train_loss=loss_sum / total.n,
                scope=scope,
                n_params=int(mask.size),
                n_examples=total.n,
                estimator=ESTIMATOR,
                grad_sq_norm=est.grad_sq_norm,
                grad_sq_norm_biased=est.grad_sq_norm_biased,
                trace_sigma=est.trace_sigma,
                b_simple=est.b_simple,
                b_simple_lo=ci.lo,
                b_simple_hi=ci.hi,
                b_simple_lower_bound=est.b_simple_lower,
                resolved=est.resolved,
                snr_mean=float(snr[mask].mean()),
            )
        )
    return rows
