"""Which layers' inputs carry the examples on dim 0: probes at other batch sizes.

The rules read dim 0 of a layer's input as the examples. Its size alone cannot
tell a batch from a table that happens to have as many rows as the micro-batch
has examples -- a position table `wpe(arange(T))` with T == B, a buffer slice,
a parameter expression, a sequence-first layer -- and such a call would be
taken for per-example terms and give wrong statistics. So before its first
call on a model the engine runs the model on m1 and on m2 examples (two sizes
other than the micro-batch's n) and records each layer's inputs. A layer with
an input that did not have m rows is not batch-first for this model, for good.
A layer whose inputs had m rows at two sizes is: no fixed table has both (one
size is not enough, as later micro-batches may have as many examples as a
table has rows). A layer not yet seen at two sizes is unsettled and takes the
fallback: a layer only some examples reach (a projector of special tokens) has
a data-dependent row count. So the first probe runs again, on other examples
and with new random numbers, while some layer was called at one size only (a
LayerDrop skipped it at the other), up to FIRST_RUNS runs, and a later call of
an unsettled layer makes the engine probe again on its next call, up to
MAX_RUNS runs in all. The engine keeps one record per set of train/eval modes
of the model's modules: a mode may call layers on other inputs. A row count
that depends on the data and happens to follow the probes' batch sizes, or a
forward that branches on the batch size itself, still gets through.

The probes run without gradients, before the engine's own forward (between the
forward and its backward, putting the buffers back would bump the versions of
tensors the graph saved); the random number state and the model's buffers
(running averages, power iterations, a lazy table) are put back afterwards. If
the model cannot run so (bound to one batch size, or differentiating inside its
forward), the first probe finds nothing and the shape check stays.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


def probe_sizes(n: int) -> tuple[int, int]:
    """Two batch sizes >= 2 other than n."""
    m1, m2, *_ = (m for m in (2, 3, 4) if m != n)
    return m1, m2


FIRST_RUNS, MAX_RUNS = 4, 8  # probe runs per engine, model and mode, each at two batch sizes: at first, in all


@dataclass(eq=False)
class Probes:
    """What the probes of one model saw, by id of module; grows with each run."""

    sizes: dict[int, set[int]] = field(default_factory=dict)  # the probe sizes a module's inputs followed
    off: set[int] = field(default_factory=set)  # modules with an input whose rows did not follow the batch
    runs: int = 0
    failed: bool = False  # the first run could not run the model: the shape check alone
    wanted: bool = True  # run on the next call

    def batch_first(self, key: int) -> bool:
        return self.failed or (key not in self.off and len(self.sizes.get(key, ())) >= 2)

    def settled(self, key: int) -> bool:
        return self.failed or key in self.off or len(self.sizes.get(key, ())) >= 2

    def partly_seen(self, key: int) -> bool:
        """Called at one size only: skipped at the other (a LayerDrop), so another run may settle it."""
        return not self.settled(key) and key in self.sizes


def probe(model: nn.Module, inputs: torch.Tensor, modules: list[nn.Module], probes: Probes) -> None:
    """Record into `probes` how each of `modules` sees its inputs' dim 0 when the model runs on examples
    of `inputs` at two batch sizes other than its own; the first time, again on other examples while
    some module was called at one size only. (A module no run called is most often never called, such as
    MultiheadAttention's out_proj: a call of it probes again on the next call.)"""
    stop = min(MAX_RUNS, probes.runs + (FIRST_RUNS if probes.runs == 0 else 1))
    probes.wanted = False
    devices = [inputs.device] if inputs.device.type != "cpu" else []
    # one fork for all runs: a model that draws random numbers (dropout, LayerDrop) draws new ones each run
    with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=inputs.device.type):
        while probes.runs < stop and not probes.failed:
            _run(model, inputs, modules, probes)
            if not any(probes.partly_seen(id(m)) for m in modules):
                return


def _run(model: nn.Module, inputs: torch.Tensor, modules: list[nn.Module], probes: Probes) -> None:
    n = inputs.shape[0]
    sizes: dict[int, set[int]] = {}
    off: set[int] = set()
    size = 0  # the running probe's batch size

    def record(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            if x.shape[0] == size:
                sizes.setdefault(id(module), set()).add(size)
            else:
                off.add(id(module))

    handles = [mod.register_forward_hook(record, with_kwargs=True) for mod in modules]
    start = probes.runs * (max(probe_sizes(n)) + 1)  # each run starts on other examples, also for n = 2
    probes.runs += 1
    try:
        for size in probe_sizes(n):
            with buffers_kept(model):
                rows = (torch.arange(size, device=inputs.device) + start) % n  # rows repeat when n is small
                model(inputs[rows])
    except Exception:  # any failure (a model bound to one batch size): keep what earlier runs saw
        probes.failed = probes.runs == 1
        probes.runs = MAX_RUNS
        return
    finally:
        for h in handles:
            h.remove()
    for key, seen in sizes.items():
        probes.sizes.setdefault(key, set()).update(seen)
    probes.off |= off


@contextmanager
def buffers_kept(model: nn.Module, *, every: bool = False):
    """Undo what a forward does to the model's buffers: in-place updates, re-assignments, new ones.

    A buffer is copied back where its version counter moved, or always with `every`: BatchNorm's kernel
    updates its running statistics in train mode without moving it (the probes never run one so, as the
    engine refuses BatchNorm in train mode first)."""
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
            if old is not None and (every or buf._version != old[0]):  # changed in place
                buf.copy_(old[1])
            mod._buffers[name] = buf
        for mod in model.modules():
            if id(mod) not in names:
                continue  # a submodule the probe's forward made: the model keeps it, as it would its own
            for name in [k for k in mod._buffers if k not in names[id(mod)]]:
                del mod._buffers[name]  # made by the probe's forward: the engine's own forward makes it again
                mod._non_persistent_buffers_set.discard(name)
