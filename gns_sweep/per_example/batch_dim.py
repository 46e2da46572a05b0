"""Which layers' inputs carry the examples on dim 0: probes at two other batch sizes.

The rules read dim 0 of a layer's input as the examples. Its size alone cannot
tell a batch from a table that happens to have as many rows as the micro-batch
has examples -- a position table `wpe(arange(T))` with T == B, a buffer slice,
a parameter expression, a sequence-first layer -- and such a call would be
taken for per-example terms and give wrong statistics. So before its first
call on a model the engine runs the model on m1 and on m2 examples (two sizes
other than the micro-batch's) and records each layer's inputs: only a layer
whose every input had m rows at both is batch-first for this model (a table's
row count can match one of the sizes, never both). The others take the
fallback, and so does a layer the probes never called, as a layer that only
some examples reach (a projector of special tokens) is called on a data-
dependent number of rows.

The probes run without gradients, before the engine's own forward; the random
number state and the model's buffers (running averages, power iterations, a
lazy table) are put back afterwards. If the model cannot run so (bound to one
batch size, or differentiating inside its forward), they find nothing and the
shape check stays.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def probe_sizes(n: int) -> tuple[int, int]:
    """Two batch sizes >= 2 other than n."""
    m1, m2, *_ = (m for m in (2, 3, 4) if m != n)
    return m1, m2


def batch_first_modules(model: nn.Module, inputs: torch.Tensor, modules: list[nn.Module]) -> set[int] | None:
    """Ids of the modules, among `modules`, whose every input's dim 0 followed the batch when the model
    ran on examples of `inputs` at two other batch sizes; None if it could not run so."""
    n = inputs.shape[0]
    rows: dict[int, set[bool]] = {}  # id(module) -> whether each of its inputs had the probe's batch size
    size = 0  # the running probe's batch size

    def record(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            rows.setdefault(id(module), set()).add(x.shape[0] == size)

    handles = [mod.register_forward_hook(record, with_kwargs=True) for mod in modules]
    devices = [inputs.device] if inputs.device.type != "cpu" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=inputs.device.type):
            for size in probe_sizes(n):
                with _buffers_kept(model):
                    model(inputs[torch.arange(size, device=inputs.device) % n])  # (size, ...): rows repeat
    except Exception:  # any failure (a model bound to one batch size): keep the shape check alone
        return None
    finally:
        for h in handles:
            h.remove()
    return {key for key, follows in rows.items() if follows == {True}}


@contextmanager
def _buffers_kept(model: nn.Module):
    """Undo what a forward does to the model's buffers: in-place updates, re-assignments, new ones."""
    saved = [
        (mod, name, buf, None if buf is None else (buf._version, buf.detach().clone()))
        for mod in model.modules()
        for name, buf in mod._buffers.items()
    ]
    names = {id(mod): set(mod._buffers) for mod in model.modules()}
    try:
        yield
    finally:
        for mod, name, buf, old in saved:
            if old is not None and buf._version != old[0]:  # changed in place
                buf.copy_(old[1])
            mod._buffers[name] = buf
        for mod in model.modules():
            if id(mod) not in names:
                continue  # a submodule the probe's forward made: the model keeps it, as it would its own
            for name in [k for k in mod._buffers if k not in names[id(mod)]]:
                del mod._buffers[name]  # made by the probe's forward: the engine's own forward makes it again
                mod._non_persistent_buffers_set.discard(name)
