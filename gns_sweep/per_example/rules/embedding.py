"""nn.Embedding: example i's gradient of row v is the sum of d_t over its tokens t with id v.

Tokens repeated within one example add up before squaring, so the rows are
first summed per (example, token id) pair: for a small vocabulary by scattering
into the dense per-example gradients (B, V, D), which fit in a reused buffer;
otherwise over the distinct pairs only (a sort). The padding_idx row gets no
gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from gns_sweep.per_example.rules.base import Call, ParamStats, Rule
from gns_sweep.per_example.rules.outer import CHUNK_BYTES


class EmbeddingRule(Rule):
    param_names = ("weight",)

    def accepts(self, module: nn.Module, x: torch.Tensor, n: int) -> bool:
        # scale_grad_by_freq divides by token counts over the whole batch: not a sum of per-example terms
        return x.dim() >= 1 and x.shape[0] == n and not module.scale_grad_by_freq

    def stats(self, module, call: Call, names, *, param_moments: bool) -> dict[str, ParamStats]:
        n, vocab = call.x.shape[0], module.num_embeddings
        keys, d = _keys_and_grads(module, call)  # (B*T,), (B*T, D)
        small = n * vocab * d.shape[1] * d.element_size() <= CHUNK_BYTES
        if small and vocab <= 4 * keys.shape[0] // max(n, 1):  # not many more rows than tokens
            return {"weight": _dense(call, keys, d, n, vocab, param_moments=param_moments)}
        return {"weight": _by_pairs(keys, d, n, vocab, param_moments=param_moments)}

    def grads(self, module, call: Call, names) -> dict[str, torch.Tensor]:
        n, vocab = call.x.shape[0], module.num_embeddings
        keys, d = _keys_and_grads(module, call)
        g = d.new_zeros(n * vocab, d.shape[1]).index_add_(0, keys, d)
        return {"weight": g.view(n, vocab, d.shape[1])}  # (B, V, D)


def _dense(call: Call, keys, d, n: int, vocab: int, *, param_moments: bool) -> ParamStats:
    """Per-example gradients (B, V, D) scattered into the reused buffer: a zero fill and a scatter."""
    g = call.empty((n * vocab, d.shape[1]), d).zero_().index_add_(0, keys, d).view(n, vocab, -1)
    total = g.sum(0)
    if not param_moments:
        return ParamStats(total, torch.linalg.vector_norm(g.view(n, -1), dim=1).square_(), None)
    g2 = g.square_()
    return ParamStats(total, g2.view(n, -1).sum(1), g2.sum(0))


def _by_pairs(keys, d, n: int, vocab: int, *, param_moments: bool) -> ParamStats:
    """Only the rows that occur: one per distinct (example, id) pair (a sort)."""
    pairs, inverse = torch.unique(keys, return_inverse=True)  # (U,)
    rows = d.new_zeros(pairs.shape[0], d.shape[1]).index_add_(0, inverse, d)  # (U, D) per-pair gradient rows
    ids = pairs % vocab  # (U,)
    total = d.new_zeros(vocab, d.shape[1]).index_add_(0, ids, rows)  # (V, D)
    rows2 = rows.square_()
    sq_norms = d.new_zeros(n).index_add_(0, pairs // vocab, rows2.sum(1))  # (B,)
    sq_sum = d.new_zeros(vocab, d.shape[1]).index_add_(0, ids, rows2) if param_moments else None  # (V, D)
    return ParamStats(total, sq_norms, sq_sum)


def _keys_and_grads(module: nn.Embedding, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Key example*V + id per token (B*T,), and the output gradients (B*T, D), zero at padding tokens."""
    ids = call.x.reshape(call.x.shape[0], -1)  # (B, T)
    d = call.grad.reshape(-1, call.grad.shape[-1])  # (B*T, D)
    if module.padding_idx is not None:
        d = d * (ids.reshape(-1, 1) != module.padding_idx)
    offsets = torch.arange(ids.shape[0], device=ids.device)[:, None] * module.num_embeddings  # (B, 1)
    return (ids + offsets).reshape(-1), d
