"""Per-example sums of outer products: the shared core of Linear (3-D+ input) and Conv.

For example b and weight group c (conv groups; 1 for Linear) the weight gradient is
G_b = d^T a = sum_t d_t a_t^T, with a (T, K) the inputs at T positions and d (T, M)
the output gradients. A rule must return sum_b G_b and ||G_b||^2. Per example:
  Gram form     ||G_b||^2 = sum_{t,s} (a_t . a_s)(d_t . d_s), plus the usual
                weight-gradient matmul for sum_b G_b:     T^2 (2(K+M)+1) + 2 T M K FLOPs
  materialised  G_b itself, then its square and its sum:  2 T M K + 3 M K FLOPs
so Gram pays off only when T^2 (K+M) is small next to M K (few positions, wide
layers); each call takes the cheaper. The per-parameter second moment sum_b G_b^2
has no Gram form, so it always materialises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Examples are processed in chunks whose materialised gradients take at most about this many bytes: a
# bound on the extra memory. Fewer, larger chunks were faster on CPU once the buffer is reused.
CHUNK_BYTES = 1 << 23

Empty = Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]  # (shape, like) -> a temporary


def gram_flops(t: int, k: int, m: int) -> int:
    return t * t * (2 * (k + m) + 1) + 2 * t * m * k


def full_flops(t: int, k: int, m: int) -> int:
    return 2 * t * m * k + 3 * m * k


def chunks(n: int, per_example_bytes: int):
    """(start, stop) ranges of examples, each with about CHUNK_BYTES of intermediates."""
    step = max(1, CHUNK_BYTES // max(per_example_bytes, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def outer_stats(
    a: torch.Tensor, d: torch.Tensor, *, param_moments: bool, empty: Empty | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """a (B, C, T, K), d (B, C, T, M) -> sum_b G_b (C, M, K), ||G_b||^2 (B,), and sum_b G_b^2 (C, M, K) if asked.

    `empty` makes the materialised chunk (e.g. Call.empty, a reused buffer); default: a fresh tensor."""
    t, k, m = a.shape[2], a.shape[3], d.shape[3]
    if t == 1:  # rank one: ||d a^T||^2 = ||a||^2 ||d||^2, and sum_b G_b^2 = (d^2)^T (a^2)
        a1, d1 = a[:, :, 0], d[:, :, 0]  # (B, C, K), (B, C, M)
        a2, d2 = a1.square(), d1.square()
        sq_sum = torch.einsum("bcm,bck->cmk", d2, a2) if param_moments else None
        return torch.einsum("bcm,bck->cmk", d1, a1), (a2.sum(-1) * d2.sum(-1)).sum(1), sq_sum
    if not param_moments and gram_flops(t, k, m) < full_flops(t, k, m):
        return torch.einsum("bctm,bctk->cmk", d, a), _gram_sq_norms(a, d), None
    return _materialised_stats(a, d, param_moments=param_moments, empty=empty or _fresh)


def _fresh(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape)


def _gram_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    b, c, t, _ = a.shape
    out = []
    for s, e in chunks(b, 2 * c * t * t * a.element_size()):
        gram = a[s:e] @ a[s:e].transpose(-1, -2)  # (b, C, T, T)
        gram.mul_(d[s:e] @ d[s:e].transpose(-1, -2))
        out.append(gram.sum((1, 2, 3)))
    return torch.cat(out)


def _materialised_stats(a: torch.Tensor, d: torch.Tensor, *, param_moments: bool, empty: Empty):
    b, c, t, k = a.shape
    m = d.shape[-1]
    a3, d3 = a.reshape(b * c, t, k), d.reshape(b * c, t, m).transpose(1, 2)  # (B*C, T, K), (B*C, M, T)
    if 0 < b * c * m * k * a.element_size() <= CHUNK_BYTES and not param_moments:
        # one chunk: the loop's bookkeeping is a dozen small torch calls, a sizeable part of a narrow layer's time
        g = torch.bmm(d3, a3, out=empty((b * c, m, k), a))  # (B*C, M, K)
        return g.view(b, c, m, k).sum(0), torch.linalg.vector_norm(g.view(b, -1), dim=1).square_(), None
    total = sq_sum = None
    norms = a.new_empty(b)
    for s, e in chunks(b, c * m * k * a.element_size()):
        g = torch.bmm(d3[s * c : e * c], a3[s * c : e * c], out=empty(((e - s) * c, m, k), a))
        g = g.view(e - s, c, m, k)
        part = g.sum(0)
        total = part if total is None else total.add_(part)
        if param_moments:
            g2 = g.square_()
            torch.sum(g2.view(e - s, -1), 1, out=norms[s:e])
            part = g2.sum(0)
            sq_sum = part if sq_sum is None else sq_sum.add_(part)
        else:  # the norm kernel reads g once, with no squared copy
            norms[s:e] = torch.linalg.vector_norm(g.view(e - s, -1), dim=1).square_()
    if total is None:  # no examples
        total = a.new_zeros(c, m, k)
        sq_sum = total.clone() if param_moments else None
    return total, norms, sq_sum


def outer_grads(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Materialised per-example weight gradients (B, C, M, K)."""
    return d.transpose(-1, -2) @ a
