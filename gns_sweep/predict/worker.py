"""The work of one checkpoint: shards measure their micro-batches, the driver merges them into rows."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from gns_sweep import stats as st
from gns_sweep.per_example import MicroBatchEngine, ParamLayout, SumAccumulator, get_engine, param_layout
from gns_sweep.per_example.base import refuse_coupled_layers
from gns_sweep.predict.shards import Unit
from gns_sweep.results import SGD, ScopeRow
from gns_sweep.runtime import WorkerInfo

Piece = tuple[int, st.Moments, float]  # (block index, moments, loss sum) of one shard's part of a block


def probe_shard(
    *,
    model: nn.Module,
    data: tuple,
    probe: torch.Tensor,
    units: Sequence[Unit],
    engine: str,
    micro_batch: int,
    param_moments: bool,
    worker: WorkerInfo,
) -> list[Piece]:
    """Runs on a worker: the moments of its pieces of each block of one checkpoint's probe.

    `data` is (inputs, targets, loss) of the whole training set, shared by every task through the
    object store; `probe` the checkpoint's example indices, which `units` cut into micro-batches.
    Consecutive micro-batches of one block are folded into one float64 accumulator, so a block
    costs one conversion to Moments, however many micro-batches it holds. With `micro_batch` b > 1
    the samples are the mean gradients of b examples at a time (the micro-batch estimator), and the
    model may couple examples.
    """
    model = model.to(worker.device).train()
    eng = _engine(model, engine, micro_batch)
    return _pieces(eng, model, param_layout(model), data, probe, units, param_moments, worker.device)


def probe_checkpoints(
    *,
    model: nn.Module,
    states: Sequence[dict],
    data: tuple,
    probes: Sequence[torch.Tensor],
    units: Sequence[Unit],
    engine: str,
    micro_batch: int,
    param_moments: bool,
    worker: WorkerInfo,
) -> list[list[Piece]]:
    """probe_shard for several checkpoints in one task: `model` takes each of `states` in turn, and one
    engine serves them all (it keeps what it learnt of the model's structure), so a short probe does not
    pay a Ray task and an engine's set-up per checkpoint. One list of pieces per state."""
    model = model.to(worker.device).train()
    eng, layout = _engine(model, engine, micro_batch), param_layout(model)
    out = []
    for state, probe in zip(states, probes, strict=True):
        model.load_state_dict(state)  # in place: the engine's view of the model stays valid
        out.append(_pieces(eng, model, layout, data, probe, units, param_moments, worker.device))
    return out


def _engine(model: nn.Module, engine: str, micro_batch: int):
    if micro_batch > 1:
        return MicroBatchEngine(micro_batch)
    refuse_coupled_layers(model)
    return get_engine(engine)


def _pieces(eng, model, layout, data, probe, units, param_moments: bool, device: str) -> list[Piece]:
    all_inputs, all_targets, loss = data
    inputs, targets = all_inputs[probe], all_targets[probe]  # (probe_size, ...): this checkpoint's draw
    out: list[Piece] = []
    acc, block = None, None
    for b, lo, hi in units:
        if b != block:
            if acc is not None:
                out.append((block, acc.moments(), acc.loss_sum))
            acc, block = SumAccumulator(layout, param_moments=param_moments), b
        x, y = inputs[lo:hi].to(device), targets[lo:hi].to(device)
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
    engine: str  # per-example engine used (with the micro-batch estimator: "micro-batch")
    n_checkpoints: int  # checkpoints along the reference run (a finished file has them all)
    estimator: str  # "per-example" or "micro-batch"
    micro_batch: int  # examples per sample: 1, or the micro-batch size b


def scope_rows(
    where: Checkpoint,
    total: st.Moments,
    blocks: Sequence[st.Moments],
    loss_sum: float,
    layout: ParamLayout,
    updates: Mapping[str, tuple[float, float]],
    *,
    optimizer: str = SGD,
    preconditioner: np.ndarray | None = None,
) -> list[ScopeRow]:
    """One row per scope: the estimate, its jackknife interval, mean SNR, the update:data ratio.

    `updates` maps a parameter name to (||lr * grad||^2, ||w||^2) of the reference run's step that
    made these weights (empty at step 0). `preconditioner` (P,) in layout order is the diagonal P of
    an adaptive optimizer at this checkpoint: the rows then also hold the noise scale of P^(1/2) g."""
    b = where.micro_batch
    snr = st.snr(total, micro_batch=b)
    if preconditioner is not None:  # the moments of P^(1/2) g: a rescaling, exact for merged and leave-out sets
        total_p = st.precondition(total, preconditioner)
        blocks_p = [st.precondition(m, preconditioner) for m in blocks]
    rows = []
    for scope, groups in layout.scopes.items():
        est = st.estimate_scope(total, groups, micro_batch=b)
        ci = st.jackknife_interval(total, blocks, groups, micro_batch=b)
        precond = {}
        if preconditioner is not None:
            est_p = st.estimate_scope(total_p, groups, micro_batch=b)
            ci_p = st.jackknife_interval(total_p, blocks_p, groups, micro_batch=b)
            precond = dict(
                trace_sigma_precond=est_p.trace_sigma,
                grad_sq_norm_precond=est_p.grad_sq_norm,
                b_simple_precond=est_p.b_simple,
                b_simple_precond_lo=ci_p.lo,
                b_simple_precond_hi=ci_p.hi,
            )
        mask = np.concatenate([np.arange(layout.offsets[g], layout.offsets[g + 1]) for g in groups])
        rows.append(
            ScopeRow(
                **asdict(where),
                train_loss=loss_sum / total.n,
                scope=scope,
                n_params=int(mask.size),
                n_examples=est.n,
                grad_sq_norm=est.grad_sq_norm,
                grad_sq_norm_biased=est.grad_sq_norm_biased,
                trace_sigma=est.trace_sigma,
                b_simple=est.b_simple,
                b_simple_lo=ci.lo,
                b_simple_hi=ci.hi,
                b_simple_lower_bound=est.b_simple_lower,
                resolved=est.resolved,
                snr_mean=float(snr[mask].mean()),
                update_ratio=update_ratio(updates, [layout.names[g] for g in groups]),
                optimizer=optimizer,
                **precond,
            )
        )
    return rows


def flat_preconditioner(preconditioner: Mapping[str, torch.Tensor], layout: ParamLayout) -> np.ndarray:
    """A per-parameter preconditioner {name: tensor shaped like the parameter} as one (P,) vector in layout
    order, in the tensors' own dtype (predict holds one per checkpoint until its rows are made)."""
    missing = [n for n in layout.names if n not in preconditioner]
    if missing:
        raise ValueError(f"the preconditioner has no entry for parameter(s) {', '.join(missing)}")
    parts = []
    for name, size in zip(layout.names, layout.sizes, strict=True):
        p = preconditioner[name].detach().reshape(-1).cpu()
        if p.numel() != size:
            raise ValueError(f"the preconditioner of {name} has {p.numel()} entries, the parameter {size}")
        parts.append(p.numpy())
    return np.concatenate(parts)


def update_ratio(updates: Mapping[str, tuple[float, float]], names: Sequence[str]) -> float:
    """||lr * grad|| / ||w|| over these parameters together (makemore's update:data ratio); NaN without a step."""
    if not updates:
        return math.nan
    step = sum(updates[n][0] for n in names)
    weight = sum(updates[n][1] for n in names)
    return math.sqrt(step / weight) if weight > 0 else math.inf
