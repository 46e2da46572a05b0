"""Which layers' inputs carry the examples on dim 0: a probe at another batch size.

The rules read dim 0 of a layer's input as the examples. Its size alone cannot
tell a batch from a table that happens to have as many rows as the micro-batch
has examples -- a position table `wpe(arange(T))` with T == B, a buffer slice,
a parameter expression -- and such a call would be taken for per-example terms
and give wrong statistics. So once per model the engine runs the model again
on m examples, with m unlike the micro-batch size and every dim 0 of the call
it probes, and records each layer's inputs: a layer whose input does not then
have m rows is no batch-first layer for this model, and its parameters take
the fallback. The probe has no gradient and keeps the random number state; if
the model cannot run so (bound to one batch size, or differentiating inside its
forward), it finds nothing and the shape check stays.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn


def probe_size(n: int, seen: Iterable[int]) -> int:
    """The smallest m >= 2 that is neither n nor any dim 0 seen."""
    taken = {n, *seen}
    return next(m for m in itertools.count(2) if m not in taken)


def off_batch_modules(model: nn.Module, inputs: torch.Tensor, modules: list[nn.Module], seen: Iterable[int]) -> set:
    """Ids of the modules, among `modules`, that were called on an input whose dim 0 does not follow the
    batch when the model runs on m examples; `seen` are the dim 0 sizes of the call being probed."""
    n = inputs.shape[0]
    if n == 0:
        return set()
    m = probe_size(n, seen)
    rows: dict[int, set[int]] = {}  # id(module) -> dim 0 sizes of its inputs

    def record(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            rows.setdefault(id(module), set()).add(x.shape[0])

    handles = [mod.register_forward_hook(record, with_kwargs=True) for mod in modules]
    devices = [inputs.device] if inputs.device.type != "cpu" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=inputs.device.type):
            model(inputs[torch.arange(m, device=inputs.device) % n])  # (m, ...): rows repeat if n < m
    except Exception:  # any failure (a model bound to one batch size): keep the shape check alone
        return set()
    finally:
        for h in handles:
            h.remove()
    return {key for key, sizes in rows.items() if sizes != {m}}
