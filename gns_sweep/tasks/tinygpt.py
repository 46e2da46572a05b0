"""`tinygpt`: a small pre-norm decoder-only transformer, next-character prediction on Shakespeare.

Data: six tragedies (`gns_sweep.data.shakespeare()`, 841,779 characters,
73 distinct ones). Each play is split at 90 % of its length: the first part
trains, the rest evaluates (the same characters and style, unseen lines). Each
part is cut into non-overlapping windows of CONTEXT + 1 characters (a window
never crosses a play or the split); an example is a window's first CONTEXT
characters, and its targets are the same window shifted by one. The eval set
is EVAL_WINDOWS windows spread evenly over the eval parts.

Model: token and position embeddings, LAYERS pre-norm blocks (LayerNorm ->
causal self-attention -> residual, LayerNorm -> MLP 4x with GELU -> residual),
a final LayerNorm and a linear head (not tied to the embedding, so every
weight is one layer's: the fast per-example engine has a rule for each).
Per-example loss: the mean cross-entropy over one window's CONTEXT tokens.

The defaults (lr, target, grid, budget) and their measured costs are in docs/data.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep import data
from gns_sweep.tasks.base import Task

CONTEXT = 64  # characters seen per example (and predicted: one loss per position)
WIDTH = 64  # model width
HEADS = 4  # attention heads
LAYERS = 4  # transformer blocks
TRAIN_FRACTION = 0.9  # of each play, the first part trains
EVAL_WINDOWS = 32  # eval examples, spread evenly over the eval parts

VOCAB = "\n !\"&'(),-./123:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"  # the 73 characters of the text
N_TRAIN = 11_835  # training windows (tests/test_workload_tasks.py checks the counts)
N_EVAL_AVAILABLE = 1_312  # eval windows before EVAL_WINDOWS are picked from them


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, d/H)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, H, T, d/H)
        h = h + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(len(VOCAB), WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(*(Block() for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, len(VOCAB))
        # torch's default initialisation (embeddings N(0, 1), Linear U(+-1/sqrt(fan_in))), not GPT-2's N(0, 0.02):
        # the first LayerNorm scales tiny embeddings up 50x, and their gradients with them. With plain SGD,
        # GPT-2's diverged at lr 1 at batch 8 (its best lr there was 0.3), torch's trains at lr 1, and at
        # batch 64 reached loss 2.7 in 72 steps against 95.

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, T) token ids -> logits (N, T, V)
        n, t = x.shape
        positions = torch.arange(t, device=x.device).expand(n, t)  # (N, T): dim 0 follows the batch
        h = self.tokens(x) + self.positions(positions)
        return self.head(self.norm(self.blocks(h)))


def sequence_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, T, V) logits, (N, T) targets -> (N,): each window's mean token loss."""
    return F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").mean(1)


def encode(text: str) -> torch.Tensor:
    table = torch.full((128,), -1, dtype=torch.long)
    table[torch.tensor([ord(c) for c in VOCAB])] = torch.arange(len(VOCAB))
    ids = table[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
    if (ids < 0).any():
        raise ValueError("text has characters outside VOCAB")
    return ids


def windows(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of CONTEXT + 1 characters: (inputs (N, T), targets (N, T)) int64."""
    ids = encode(text)
    n = (ids.shape[0] - 1) // CONTEXT
    w = ids[: n * CONTEXT + 1].unfold(0, CONTEXT + 1, CONTEXT)  # (n, T + 1), consecutive windows share one char
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train inputs, targets), (all eval inputs, targets)): the first TRAIN_FRACTION of each play trains."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"train": [], "eval": []}
    for text in data.shakespeare().values():
        cut = int(TRAIN_FRACTION * len(text))
        parts["train"].append(windows(text[:cut]))
        parts["eval"].append(windows(text[cut:]))
    train, evals = ((torch.cat([x for x, _ in p]), torch.cat([y for _, y in p])) for p in parts.values())
    return train, evals


def make() -> Task:
    (x, y), (xe, ye) = split()
    pick = torch.linspace(0, xe.shape[0] - 1, EVAL_WINDOWS).round().long()  # evenly spread, deterministic
    return Task(
        name="tinygpt",
        build_model=TinyGPT,
        train_inputs=x,
        train_targets=y,
        eval_inputs=xe[pick].contiguous(),
        eval_targets=ye[pick].contiguous(),
        loss=sequence_cross_entropy,
        lr=1.0,  # best at batch 2; 2.0 diverges at every batch size (docs/data.md)
        batch_size=2,
        target_loss=2.7,
        batch_sizes=(2, 4, 8, 16, 32),
        budget_examples=8192,
        description="pre-norm transformer (4 layers, width 64, context 64), next character on six Shakespeare plays",
    )
