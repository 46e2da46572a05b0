"""The models of the per-example tests, each built to reach one path of the fast engine.

Grouped by what they probe: layer rules and their code paths, the routing of parameters
(tied, reused, rule-less, hooked), and inputs whose dim 0 is not the examples (batch_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# --- layers and rule paths ---------------------------------------------------


class MaskedConv2d(nn.Conv2d):
    """PixelCNN-style: keeps Conv2d.forward, masks the weight in _conv_forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        mask[:, :, 1, 2:] = mask[:, :, 2:] = 0
        self.register_buffer("mask", mask)

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * self.mask, bias)


class TwiceNorm(nn.Module):
    """One LayerNorm applied twice: its per-example gradients are materialised, x_hat recomputed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(torch.tanh(self.norm(self.proj(x))))


class CharModel(nn.Module):
    """A small character LM: Embedding, LayerNorm, MLP with a residual, RMSNorm, Linear head."""

    def __init__(self, vocab=11, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.final = nn.RMSNorm(width) if hasattr(nn, "RMSNorm") else nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.mlp(self.norm(h))
        return self.out(self.final(h))


class OtherPaths(nn.Module):
    """The rules and paths CharModel misses: Embedding by distinct pairs (vocab > 4x tokens), Linear in
    Gram form (2 wide positions), Conv1d, BatchNorm in eval mode."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(60, 64)
        self.wide = nn.Linear(64, 64)
        self.conv = nn.Conv1d(64, 6, 2)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        h = torch.tanh(self.wide(self.embed(ids)))  # (B, 2, 64)
        h = self.bn(self.conv(h.transpose(1, 2)))  # (B, 6, 1)
        return self.out(h.flatten(1))


class Checkpointed(nn.Module):
    """A LayerNorm inside activation checkpointing, whose saved tensors can be unpacked once."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln, self.out = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        h = checkpoint(lambda h: torch.tanh(self.ln(h)), self.inp(x), use_reentrant=False)
        return self.out(h)


class Autocast(nn.Module):
    """A forward that runs one layer under autocast: its output gradient is bfloat16, its input float32."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.hidden(x))
        return self.out(h.float())


# --- routing: tied, reused, rule-less, hooked ---------------------------------


class ViewThenInPlace(nn.Module):
    """A Linear on 3-D input returns a view; using it, then changing it in place, moves its history."""

    def __init__(self, keep_copy: bool):
        super().__init__()
        self.keep_copy = keep_copy
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        res = h.clone() if self.keep_copy else 0.0
        h = F.relu(h, inplace=True)
        return self.b(h + res)


class TiedLM(nn.Module):
    """Embedding and output layer share one Parameter; the block is applied twice."""

    def __init__(self, vocab=7, width=5, functional=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.block = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.functional = functional
        if not functional:
            self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return F.linear(h, self.embed.weight) if self.functional else self.out(h)


class Scale(nn.Module):
    """A layer without a rule, with its own Parameter."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.gain


class FirstLayerOnly(nn.Module):
    """Calls only the first layer of a Sequential: the others' parameters get no gradient."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.m = layers

    def forward(self, x):
        return self.m[0](x)


class Attention(nn.Module):
    """MultiheadAttention, whose out_proj is a Linear it never calls (it uses its weight directly)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.out(self.ln(x + h))


class ReLULinear(nn.Linear):
    """A Linear subclass with its own forward: must not use the Linear rule."""

    def forward(self, x):
        return super().forward(torch.relu(x)) * 2


class MixedNet(nn.Module):
    """Conv2d, GroupNorm, a rule-less Scale on a transposed view, BatchNorm in eval mode, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.scale = Scale(4)
        self.bn = nn.BatchNorm1d(8).eval()
        self.head = nn.Linear(4 * 16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))  # (B, 4, 4, 4)
        h = self.scale(h.transpose(1, 3)).transpose(1, 3)
        return self.out(torch.tanh(self.bn(self.head(h.flatten(1)))))


class Recurrent(nn.Module):
    """A GRU or LSTM, which torch.func cannot vmap, with a Linear head on its last step."""

    def __init__(self, cell):
        super().__init__()
        self.rnn, self.out = cell(3, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):  # (B, T, 3)
        return self.out(self.rnn(x)[0][:, -1])


class ChangedInput(nn.Module):
    """Changes a norm layer's input in place after the call; RMSNorm's backward does not need it, but its
    rule would read the changed values."""

    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.RMSNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = x.detach().clone()  # needs no gradient, so autograd never checks its version
        y = self.norm(h)
        h.add_(1.0)  # not a scaling, which RMSNorm would not see
        return self.out(y + 0.1 * h)


class InnerGradient(nn.Module):
    """A forward that differentiates through a rule layer itself: output hooks fire before the plan."""

    def __init__(self):
        super().__init__()
        self.p, self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(6, 3)

    def forward(self, x):
        h0 = torch.tanh(self.p(x))
        h = torch.tanh(self.a(h0))
        (g,) = torch.autograd.grad(self.b(h).sum(), h0, retain_graph=True)  # a feature with no graph
        return self.c(h) + g.sum(1, keepdim=True)


class Branches(nn.Module):
    """Two Linear layers on one input: with `trunk`, a shared Linear below both."""

    def __init__(self, trunk: bool):
        super().__init__()
        self.trunk = nn.Linear(4, 4) if trunk else nn.Identity()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.a(h) + self.b(torch.sin(h))


# --- inputs with as many rows as examples, but no examples on dim 0 -----------


class LazyTable(nn.Module):
    """A Linear applied to a (T, D) buffer the first forward builds: no example dimension, though T == B."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", None, persistent=False)
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if self.table is None:
            self.table = torch.sin(torch.arange(x.shape[1] * 4, dtype=x.dtype).view(-1, 4))
        return self.out(torch.tanh(x + self.proj(self.table)))


class Positions(nn.Module):
    """Holds a (T, D) position table as a buffer."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table, persistent=False)


class LazySubmodule(LazyTable):
    """As LazyTable, but the first forward adds a whole submodule holding the buffer."""

    def forward(self, x):
        if not hasattr(self, "positions"):
            self.positions = Positions(torch.sin(torch.arange(x.shape[1] * 4, dtype=x.dtype).view(-1, 4)))
        return self.out(torch.tanh(x + self.proj(self.positions.table)))


class LearnedPositions(nn.Module):
    """GPT-style: token and position embeddings, the positions from arange(T)."""

    def __init__(self, vocab=7, length=4, width=5):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))))


class TableInput(nn.Module):
    """A Linear on a (T, D) table: a buffer slice, a parameter expression, or a buffer the forward remakes
    from a parameter (so it is no leaf)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.src = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("table", torch.randn(8, 4))
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):  # (B, T, 4)
        if self.kind == "slice":
            t = self.table[: x.shape[1]]
        elif self.kind == "expr":
            t = self.src * 1.0
        else:
            self.table = self.src * 1.0
            t = self.table
        return self.out(torch.tanh(x + self.proj(t)))


class PositionTable(nn.Module):
    """A Linear applied to a parameter table (T, D): its rows are positions, not examples."""

    def __init__(self, t=3, width=4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(t, width))
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):  # (B, T, D)
        return self.out(torch.tanh(x + self.proj(self.table)))


class SequenceFirst(nn.Module):
    """Layers that see (T, B, D): with T == B, dim 0 looks like the examples but is not."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):  # (B, T, 4)
        h = torch.tanh(self.norm(self.a(x.transpose(0, 1))))  # (T, B, 6)
        return self.b(h).transpose(0, 1)  # (B, T, 2)


class FixedBatch(nn.Module):
    """Runs only on one example (the loop) or n, so the probe at another size fails and finds nothing."""

    def __init__(self, n):
        super().__init__()
        self.n, self.a, self.b = n, nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] not in (1, self.n):
            raise ValueError(f"this model takes 1 or {self.n} examples, not {x.shape[0]}")
        return self.b(torch.tanh(self.a(x)))


class RunningScale(nn.Module):
    """Updates buffers in place in its forward, after the lowest layer: a running scale and a counter."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("scale", torch.ones(6))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            self.scale.mul_(0.9).add_(0.1 * h.abs().mean(0))
            self.calls += 1
        return self.b(torch.tanh(h / self.scale))


class SpecialTokens(nn.Module):
    """A projector applied only to the special tokens (id >= 7), skipped when a batch has none: the probe's
    first examples have none, so it never sees the layer, whose input then has a data-dependent row count."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.out = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10)

    def forward(self, ids):
        h = self.embed(ids)
        special = ids >= 7
        if special.any():  # control flow on the data: torch.func cannot vmap it either
            h = h.masked_scatter(special.unsqueeze(-1), self.proj(h[special]))
        return self.out(torch.tanh(h))


class SkipsAtFirst(nn.Module):
    """Skips a layer in its first forward, as a LayerDrop might, and draws a random number in each."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out, self.unused = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(3, 3)
        self.draws = []

    def forward(self, x):
        self.draws.append(float(torch.rand(())))
        h = torch.tanh(self.a(x))
        return self.out(h if len(self.draws) == 1 else torch.tanh(self.b(h)))


class FlaggedTable(nn.Module):
    """Adds a projection of a 2-row table when every example of the batch is flagged."""

    def __init__(self):
        super().__init__()
        self.a, self.table, self.out = nn.Linear(4, 6), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if (x[:, 0] > 0).all():
            rows = torch.arange(2, dtype=x.dtype)[:, None] * torch.arange(1, 6, dtype=x.dtype)
            h = h + self.table(torch.sin(rows)).sum(0)  # (2, 5) rows of a table, not examples
        return self.out(h)


class TrainOnlyCodebook(nn.Module):
    """In train mode the head also runs on a 4-row codebook, which eval-mode probes never see."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.code = nn.Linear(4, 8), nn.Linear(8, 3), nn.Embedding(4, 8)

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x)))
        return out + 0.3 * self.head(torch.tanh(self.code.weight)).mean(0) if self.training else out


class AuxHead(nn.Module):
    """An auxiliary head only train mode calls (Inception-style)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + 0.3 * self.aux(h) if self.training else self.head(h)


class OnlySomeExamplesReach(nn.Module):
    """A layer only flagged examples reach: unsettled until a probe runs on flagged examples."""

    def __init__(self):
        super().__init__()
        self.a, self.flagged, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mask = x[:, 0] > 0
        if mask.all():
            h = torch.tanh(self.flagged(h))
        return self.out(h)
