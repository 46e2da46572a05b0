"""`charmlp`: the makemore MLP (Bengio et al. 2003, as in Karpathy's makemore part 3) on real names.

Next-character prediction on the 29,910 distinct US baby names of 2017
(`gns_sweep.data.names()`). Each name is padded with '.' at both ends ('.'
is token 0, 'a'..'z' are 1..26); an example is (the 3 preceding characters,
the next one), so a name of length L gives L + 1 examples. Names are split by
name: a name whose CRC-32 is 0 mod 20 is held out for eval, and every
example of it goes there (deterministic, no random state).

Model: a 10-dim character embedding, the 3 embeddings concatenated (30),
Linear(30, 200, no bias) -> BatchNorm1d(200) -> tanh -> Linear(200, 27), with
the output layer scaled by 0.1 so the initial loss is near ln 27 = 3.30. The
BatchNorm in train mode mixes the examples of a batch, so per-example
gradients do not exist: predict needs its micro-batch estimator here; the sweep
trains the model as it is (eval uses the running statistics).

The defaults (lr, target, grid, budget) and their measured costs are in docs/data.md.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from gns_sweep import data
from gns_sweep.tasks.base import Task

CONTEXT = 3  # characters of context
VOCAB = 27  # '.' and a-z
EMBED = 10  # embedding width
HIDDEN = 200  # hidden units
EVAL_MOD = 20  # a name goes to eval when crc32(name) % EVAL_MOD == 0 (about 5% of names)

# Counts of the split (tests/test_workload_tasks.py checks them).
N_TRAIN_NAMES, N_EVAL_NAMES = 28_414, 1_496
N_TRAIN, N_EVAL = 203_969, 10_795  # (context, next) examples


class CharMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.hidden = nn.Linear(CONTEXT * EMBED, HIDDEN, bias=False)  # the BatchNorm's shift is the bias
        self.norm = nn.BatchNorm1d(HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)
        with torch.no_grad():
            self.out.weight.mul_(0.1)  # a near-uniform first prediction (makemore's "less confident" init)
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 3) token ids -> logits (N, 27)
        h = self.embed(x).flatten(1)  # (N, 30)
        return self.out(torch.tanh(self.norm(self.hidden(h))))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")  # (N,)


def is_eval_name(name: str) -> bool:
    return zlib.crc32(name.encode("ascii")) % EVAL_MOD == 0


def examples(names: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts (N, 3) int64, next characters (N,) int64): every position of every name padded with '.'.

    'emma' gives ... -> e, ..e -> m, .em -> m, emm -> a, mma -> . (its length + 1 examples)."""
    lengths = torch.tensor([len(n) for n in names], dtype=torch.long)
    text = "".join("." * CONTEXT + n + "." for n in names).encode("ascii")
    codes = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    seq = torch.where(codes == ord("."), 0, codes - 96)  # '.' -> 0, 'a'..'z' -> 1..26
    per_name = lengths + 1  # windows per name
    first = torch.cumsum(lengths + CONTEXT + 1, 0) - (lengths + CONTEXT + 1)  # where each padded name starts
    within = torch.arange(int(per_name.sum())) - torch.repeat_interleave(torch.cumsum(per_name, 0) - per_name, per_name)
    windows = seq.unfold(0, CONTEXT + 1, 1)[torch.repeat_interleave(first, per_name) + within]  # (N, 4)
    return windows[:, :CONTEXT].contiguous(), windows[:, CONTEXT].contiguous()


def make() -> Task:
    names = data.names()
    train_names = [n for n in names if not is_eval_name(n)]
    eval_names = [n for n in names if is_eval_name(n)]
    x, y = examples(train_names)
    xe, ye = examples(eval_names)
    return Task(
        name="charmlp",
        build_model=CharMLP,
        train_inputs=x,
        train_targets=y,
        eval_inputs=xe,
        eval_targets=ye,
        loss=cross_entropy,
        lr=0.1,  # best at batch 32 (docs/data.md)
        batch_size=32,
        target_loss=2.4,
        batch_sizes=(32, 64, 128, 256, 512, 1024, 2048, 4096),
        budget_examples=524_288,
        description="makemore MLP (embed 10, 3-char context, Linear-BatchNorm-tanh 200) on 2017 US names",
    )
