"""The fast engine: per-layer rules on one backward pass, torch.func for the rest.

One forward records each rule layer's input and the gradient edge of its output
(forward hooks), and puts a hook on the output that runs the layer's rule as soon
as the backward reaches it, while d(sum of losses)/d(output) is still in cache.
The backward is one torch.autograd.grad of the summed losses w.r.t. the lowest
of those edges (the nodes above them run on the way, firing their hooks): it
skips the parameter-gradient matmuls of an ordinary backward (the rules' sums
replace them). An edge, like a hook registered at forward time, still names the
layer's own output after a later op such as ReLU(inplace=True) overwrote it; a
reshaped output (Linear on 3-D input) is hooked at its base, where an in-place
op on the view sends the gradient. The rules (rules/) turn (input, output
gradient) into sum_i g_i, per-example squared norms and, if asked,
per-parameter second moments.

Which path a parameter takes is read off the autograd graph after the forward:
every edge into the parameter's AccumulateGrad node must come from a call of a
layer with a rule (each such call uses each of its parameters once). Then one
call -> the rule's statistics; several calls (tied weights, a layer used twice)
-> the calls' per-example gradients are materialised and summed, as norms of the
parts do not add. Otherwise -- no rule, a call the rule cannot take, or a use
outside the layer's forward such as F.linear(h, self.embed.weight), or in the
loss itself (an L2 term model.fc.weight.square().sum() written into each
example's loss) -- the parameter goes to the torch.func fallback, which runs the
loss inside functional_call too -- or, where torch.func cannot vmap the model (an
RNN, control flow on the data) or the parameter is held through a reference it
cannot swap (general.DirectRead), to one backward per example, with a warning
once per model.

Rules assume dim 0 of a layer's input indexes the examples (batch first); a call
whose dim 0 is not the micro-batch size, whose input is one of the model's
parameters or buffers or was changed in place after the call, or of a layer
whose input did not follow the batch when the model ran at two other batch sizes,
or that those runs did not see at both (batch_dim: a position table with as many
rows as examples), goes to the fallback. A rule computes in the wider dtype of its
input and output gradient (autocast inside the forward) and in float32 for
float16, whose squares overflow. Sums over the examples of one
micro-batch are taken in the model's dtype (they replace the weight-gradient
matmul, ~1e-7 relative in float32) and returned as `BatchSums`; the caller
folds them into float64 (sums.SumAccumulator). So when the examples' gradients
are nearly alike (B_simple << 1), tr(Sigma), a small difference of float32 sums,
keeps few digits. A tensor hook registered on a layer's output after the
forward runs after the engine's, so the rule does not see what it changes. Global
forward hooks (register_module_forward_hook) run before a module's own, so while
there are any, the engine records the calls with one of its own put first.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.module import (
    _global_forward_hooks,
    _global_forward_hooks_with_kwargs,
    register_module_forward_hook,
)

from gns_sweep.errors import UsageError
from gns_sweep.per_example.base import LossFn, check_losses, coupling_candidates, refuse_coupled
from gns_sweep.per_example.batch_dim import MAX_RUNS, Probes, probe
from gns_sweep.per_example.general import first_line, per_example_grads, warn_loop
from gns_sweep.per_example.layout import TOTAL, ParamLayout
from gns_sweep.per_example.loop import loop_grads
from gns_sweep.per_example.rules import Call, ParamStats, Rule, find_rule
from gns_sweep.per_example.rules.base import Scratch, stats_of
from gns_sweep.per_example.rules.outer import CHUNK_BYTES
from gns_sweep.per_example.sums import BatchSums


@dataclass(frozen=True, eq=False)
class _Site:
    """A module with a rule and some trainable parameters it understands."""

    module: nn.Module
    rule: Rule
    groups: dict[str, int]  # local parameter name -> layout group index


@dataclass(frozen=True, eq=False)
class _Static:
    """What the engine reads off a model and layout once; kept while they stay the same objects."""

    model: weakref.ref  # the model these were read from
    layout: ParamLayout
    params: list[torch.Tensor]  # layout order
    group_of: dict[int, int]  # id(parameter) -> layout group
    sites: list[_Site]  # the modules with a rule
    param_ids: set[int]  # ids of every parameter of the model
    owned: frozenset[int]  # groups of some site's parameters
    coupling: list[tuple[str, nn.Module]]  # BatchNorm layers, re-checked every call (their mode can change)
    modules: list[nn.Module]  # all of them, whose train/eval modes key the probes


@dataclass(eq=False, slots=True)
class _Use:
    """One forward call of a rule layer. The plan sets what its output hook does; the backward fills in the rest."""

    site: _Site
    x: torch.Tensor | None  # the call's input (None: not a tensor, so no rule applies)
    x_node: object  # autograd node of x at call time (where the call's subgraph ends), or None
    edge: GradientEdge  # where the gradient of the call's output arrives
    shape: torch.Size  # the output's shape (the hooked tensor may be its base, see _recording)
    scratch: Scratch  # the engine's reusable buffer for the rule's largest intermediate
    version: int  # x's version counter at call time: an in-place change after the call means the rule would
    # read another input than the layer's (None-input calls and inference tensors: 0)
    readable: bool  # what the call's forward saved for backward may be read by the rule too (_saved_readable)
    names: tuple[str, ...] = ()  # parameters whose statistics the hook computes (single-use ones)
    param_moments: bool = False
    keep_grad: bool = False  # keep the output gradient for the multi-use path
    stats: dict[str, ParamStats] | None = None  # set by the hook; None: no gradient reached the output
    grad: torch.Tensor | None = None  # d(sum of losses)/d(output), when kept

    def on_grad(self, grad: torch.Tensor) -> None:
        if not (self.names or self.keep_grad):
            return  # not planned, or fired before the plan (a backward inside the forward)
        if grad.shape != self.shape:  # hooked at the base of a reshaped output
            grad = grad.reshape(self.shape)
        if self.x.dtype != grad.dtype or grad.dtype == torch.float16:
            self.x, grad = _common_dtype(self.x, grad)
        if self.names:
            call = Call(self.x, grad, self.scratch, self.edge.node if self.readable else None)
            self.stats = self.site.rule.stats(self.site.module, call, self.names, param_moments=self.param_moments)
        if self.keep_grad:
            self.grad = grad
        else:  # the planned rule has run: let autograd free the input once the layer below used it
            self.x = None


def _common_dtype(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input and output gradient in one dtype for its rule: the wider of the two (autocast inside
    the forward computes a layer in another dtype than its input's), and float32 for float16, whose squares
    overflow from 256 on. Token ids stay integers."""
    if not x.is_floating_point():
        return x, grad.float() if grad.dtype == torch.float16 else grad
    dtype = torch.promote_types(x.dtype, grad.dtype)
    dtype = torch.float32 if dtype == torch.float16 else dtype
    return x.to(dtype), grad.to(dtype)


@dataclass(frozen=True)
class _Plan:
    """How each layout group is computed; groups in none of these have zero gradient."""

    single: dict[int, tuple[_Use, str]]  # one call of one rule layer, and the local parameter name
    multi: dict[int, list[tuple[_Use, str]]]  # several calls: materialise and sum
    fallback: list[int]  # torch.func
    edges: list[GradientEdge]  # what to ask autograd for: the output edges of the lowest planned calls


class FastEngine:
    """Rules on one backward pass (see the module docstring).

    The model's structure -- its layers with rules and its parameters -- is read on the
    first call and kept while the same model and layout objects come back (buffers are
    read in the call that needs them: a forward may make them); after replacing layers
    or parameters of a model, use a new engine."""

    name = "fast"

    def __init__(self) -> None:
        self._scratch = Scratch()  # kept between calls: see rules.base.Scratch
        self._static: _Static | None = None
        self._probes: tuple[_Static, dict[tuple[bool, ...], Probes]] | None = None  # batch_dim's, per modes
        self._by_loop = False  # torch.func failed on this model: its fallback takes the loop

    def batch_sums(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss: LossFn,
        layout: ParamLayout,
        *,
        param_moments: bool,
    ) -> BatchSums:
        static = self._read(model, layout)
        refuse_coupled(static.coupling)
        n = inputs.shape[0]
        if self._probes is None or self._probes[0] is not static:
            self._probes = (static, {})
        probes = None  # n = 0: nothing to probe with, the shape check alone
        if n:
            by_mode, mode = self._probes[1], tuple(m.training for m in static.modules)
            probes = by_mode.get(mode) or by_mode.setdefault(mode, Probes())
        if probes is not None and probes.wanted:  # see batch_dim
            probe(model, inputs, [site.module for site in static.sites], probes)
        calls: list[_Use] = []  # filled by the forward hooks
        with torch.enable_grad(), _recording(static.sites, calls, self._scratch):
            losses = loss(model(inputs), targets)
            check_losses(losses, n)
            total = losses.sum()
            plan = _make_plan(static, calls, total.grad_fn, inputs, model, probes, param_moments=param_moments)
            if plan.edges:  # the rules run in the output hooks; the returned gradients are not needed
                torch.autograd.grad(total, plan.edges, allow_unused=True)
        stats: list[ParamStats | None] = [None] * len(static.params)  # None: no gradient reached the parameter
        with torch.no_grad():
            for g, (use, local) in plan.single.items():
                stats[g] = None if use.stats is None else use.stats.get(local)
            for g, multi in plan.multi.items():
                stats[g] = _multi_stats(multi, static.params[g], n, param_moments=param_moments)
            if plan.fallback:
                args = (stats, model, inputs, targets, loss, layout, plan.fallback)
                failed = _fallback(*args, param_moments=param_moments, by_loop=self._by_loop)
                if failed is not None:  # vmap fails on the model's forward, whichever its parameters: once
                    self._by_loop = True
                    warn_loop(self.name, [layout.names[g] for g in plan.fallback], failed)
            return BatchSums(
                n=n,
                loss_sum=total.detach(),
                grad_sum=[None if st is None else st.sum for st in stats],
                sq_norm_sum=_sq_norm_sums(stats, total),
                param_sq_sum=[None if st is None else st.sq_sum for st in stats] if param_moments else None,
            )

    def _read(self, model: nn.Module, layout: ParamLayout) -> _Static:
        s = self._static
        if s is not None and s.model() is model and s.layout is layout:
            return s
        named = dict(model.named_parameters())
        params = [named[k] for k in layout.names]
        group_of = {id(p): g for g, p in enumerate(params)}
        param_ids = {id(p) for p in model.parameters()}
        sites = _find_sites(model, group_of)
        self._by_loop = False
        self._static = _Static(
            weakref.ref(model),
            layout,
            params,
            group_of,
            sites,
            param_ids,
            frozenset(g for site in sites for g in site.groups.values()),
            coupling_candidates(model),
            list(model.modules()),
        )
        return self._static


def _sq_norm_sums(stats: list[ParamStats | None], like: torch.Tensor) -> torch.Tensor:
    """(G,) float64 sum over examples of each group's squared norms, in one reduction when they share a dtype."""
    norms = [st.sq_norms for st in stats if st is not None]
    if not norms:
        return torch.zeros(len(stats), dtype=torch.float64, device=like.device)
    dtype = norms[0].dtype
    if all(t.dtype == dtype for t in norms):
        sums = torch.stack(norms).sum(1, dtype=torch.float64)  # (G_present,)
    else:
        sums = torch.stack([t.sum(dtype=torch.float64) for t in norms])
    if len(norms) == len(stats):
        return sums
    present = [g for g, st in enumerate(stats) if st is not None]
    out = torch.zeros(len(stats), dtype=torch.float64, device=like.device)
    return out.index_copy_(0, torch.tensor(present, device=like.device), sums)


def _find_sites(model: nn.Module, group_of: dict[int, int]) -> list[_Site]:
    sites = []
    for module in model.modules():
        rule = find_rule(module)
        if rule is None:
            continue
        groups = {
            k: group_of[id(p)]
            for k, p in module._parameters.items()
            if k in rule.param_names and p is not None and id(p) in group_of
        }
        if groups:
            sites.append(_Site(module, rule, groups))
    return sites


@contextmanager
def _recording(sites: list[_Site], calls: list[_Use], scratch: Scratch):
    """Forward hooks that record each call of a site into `calls` and hook its output; all removed on exit
    (which also breaks the output node -> hook -> call cycle, so each call's graph is freed at once)."""
    handles = []

    def recorder(site: _Site):
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or output.grad_fn is None:
                return  # nothing trainable reached this output: no contribution
            x = args[0] if args else next(iter(kwargs.values()), None)
            x = x if isinstance(x, torch.Tensor) else None
            # Linear on 3-D+ input returns a reshaped view of its 2-D result. An in-place op on a view moves
            # the view's history onto its base, so hook the base: all of the output's gradient arrives there.
            base = output._base
            target = (
                base if base is not None and base.grad_fn is not None and base.numel() == output.numel() else output
            )
            node, version = (None, 0) if x is None else (x.grad_fn, 0 if x.is_inference() else x._version)
            use = _Use(site, x, node, get_gradient_edge(target), output.shape, scratch, version, _saved_readable())
            calls.append(use)
            # registered now, before any in-place op on the output, so it sees the output's own gradient
            handles.append(target.register_hook(use.on_grad))

        return hook

    if _global_forward_hooks:  # these run before a module's own hooks and may replace its output: go first
        hooks = {id(s.module): recorder(s) for s in sites}

        def first(module, args, kwargs, output):
            hook = hooks.get(id(module))
            if hook is not None:
                hook(module, args, kwargs, output)

        handle = register_module_forward_hook(first, with_kwargs=True)
        _global_forward_hooks.move_to_end(handle.id, last=False)
        handles.append(handle)
        kwargs_key = handle.id
    else:  # prepend: run before any hook of the user's that might replace the output, so it is the layer's own
        handles.extend(s.module.register_forward_hook(recorder(s), with_kwargs=True, prepend=True) for s in sites)
        kwargs_key = None
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if kwargs_key is not None:  # torch's handle leaves this entry behind
            _global_forward_hooks_with_kwargs.pop(kwargs_key, None)


_ACCUMULATE = torch._C._functions.AccumulateGrad  # the node type that puts a gradient into a leaf's .grad
_TOP_SAVED_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_readable() -> bool:
    """Whether tensors saved for backward at this point of the forward can be read by a rule as well as by
    their node: no saved-tensor hooks are active (activation checkpointing's unpack each tensor once and then
    raise). Unknown, where torch has no way to ask: no."""
    return _TOP_SAVED_HOOKS is not None and _TOP_SAVED_HOOKS(False) is None


def _walk(root) -> tuple[dict[int, int], set]:
    """One pass over the graph below `root`: the number of edges into each leaf's AccumulateGrad node
    (by id of the leaf), and every other node reached."""
    counts: dict[int, int] = {}
    seen = {root}
    stack = [root]
    while stack:  # runs once per micro-batch, after the big matmuls have evicted the interpreter: keep it lean
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            if type(child) is _ACCUMULATE:
                key = id(child.variable)
                counts[key] = counts.get(key, 0) + 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return counts, seen


def _reaches(start, targets: set, memo: dict) -> bool:
    """Whether a node in `targets` is `start` or below it; `memo` (node -> answer) is shared between
    searches, so each node is looked at once however many calls sit above it. A node's search ends at
    the first target found, as calls usually sit right below one another."""
    if start is None:
        return False
    if start in targets:
        return True
    if start in memo:
        return memo[start]
    frames = [[start, iter(start.next_functions), False]]  # node, its children still to look at, found
    while frames:
        frame = frames[-1]
        if not frame[2]:
            for child, _ in frame[1]:
                if child is None or type(child) is _ACCUMULATE:
                    continue
                if child in targets or memo.get(child, False):
                    frame[2] = True
                    break
                if child not in memo:  # a DAG: an unfinished node is never met again below itself
                    frames.append([child, iter(child.next_functions), False])
                    break
            else:
                frame[1] = None  # every child looked at
            if frame[1] is not None and not frame[2]:
                continue  # a child was pushed: look at it first
        frames.pop()
        memo[frame[0]] = frame[2]
        if frame[2] and frames:
            frames[-1][2] = True
    return memo[start]


def _make_plan(
    static: _Static,
    calls: list[_Use],
    root,
    inputs: torch.Tensor,
    model: nn.Module,
    probes: Probes | None,
    *,
    param_moments: bool,
) -> _Plan:
    """Route each group (see the module docstring); `probes`: which layers are batch-first (None: the shape
    check alone). A call of a layer they have not settled asks for another probe.

    A call of a layer with a rule that reaches the loss uses each of the layer's parameters exactly
    once (true of every registered layer's own forward), so counting reaching calls per parameter
    and comparing with the edges into its AccumulateGrad node finds any use outside them."""
    edges_into, reached = _walk(root) if root is not None else ({}, set())
    uses, bad = _rule_uses(static, calls, reached, inputs, model, probes)
    single, multi, fallback, planned = _route(static, uses, bad, edges_into, param_moments=param_moments)
    return _Plan(single, multi, fallback, _lowest_edges(planned))


def _rule_uses(
    static: _Static, calls: list[_Use], reached: set, inputs: torch.Tensor, model: nn.Module, probes: Probes | None
) -> tuple[dict[int, list[tuple[_Use, str]]], set[int]]:
    """The calls a rule can take, per group (with the local parameter name), and the groups of layers with
    some call no rule can take: not batch-first, no tensor input, a parameter or buffer as input, an input
    changed in place after the call, or one the rule does not accept. Calls that do not reach the loss count
    for neither."""
    n = inputs.shape[0]
    uses: dict[int, list[tuple[_Use, str]]] = {}
    bad: set[int] = set()
    held = None  # ids of the model's parameters and buffers, read only if a call's input is a leaf
    for use in calls:
        site, x = use.site, use.x
        if use.edge.node not in reached:
            continue  # this call's output does not reach the loss
        if x is not None and x.grad_fn is None and x is not inputs and held is None:
            # buffers may be made or replaced by the forward itself (lazy position tables, masks)
            held = static.param_ids | {id(b) for b in model.buffers()}  # submodules made by the forward too
        if probes is not None and not probes.batch_first(id(site.module)):
            if not probes.settled(id(site.module)):
                probes.wanted = probes.runs < MAX_RUNS  # probe again on the next call
            bad.update(site.groups.values())
            continue
        # a parameter or buffer as input has no example dimension, whatever its size
        if (
            x is None
            or (held is not None and id(x) in held)
            or use.version != (0 if x.is_inference() else x._version)
            or not site.rule.accepts(site.module, x, n)
        ):
            bad.update(site.groups.values())
            continue
        for local, g in site.groups.items():
            uses.setdefault(g, []).append((use, local))
    return uses, bad


def _route(
    static: _Static,
    uses: dict[int, list[tuple[_Use, str]]],
    bad: set[int],
    edges_into: dict[int, int],
    *,
    param_moments: bool,
) -> tuple[dict[int, tuple[_Use, str]], dict[int, list[tuple[_Use, str]]], list[int], list[_Use]]:
    """Send each group with a gradient to one call's rule (single), to the sum of several calls' materialised
    gradients (multi) or to the fallback: a rule path needs the rule calls to account for every edge into the
    parameter. Sets what each planned call's output hook computes; returns the planned calls, each once, in
    group order."""
    single, multi, fallback = {}, {}, []
    planned: dict[int, _Use] = {}  # id -> call, each call once
    for g, p in enumerate(static.params):
        count = edges_into.get(id(p), 0)
        if count == 0:
            continue
        found = uses.get(g, ())
        if g not in static.owned or g in bad or len(found) != count:
            fallback.append(g)
        elif count == 1:
            use, local = single[g] = found[0]
            use.names, use.param_moments = (*use.names, local), param_moments
            planned[id(use)] = use
        else:
            multi[g] = found
            for use, _ in found:
                use.keep_grad = True
                planned[id(use)] = use
    return single, multi, fallback, list(planned.values())


def _lowest_edges(planned: list[_Use]) -> list[GradientEdge]:
    """The output edges of the planned calls with no other planned call below them.

    Autograd runs every node between the loss and the edges it is asked for, so a call with another
    planned call below it runs anyway, and its output hook fires then. Asking for the lowest edges only
    keeps autograd from holding each layer's output gradient until the end of the backward."""
    nodes, memo = {u.edge.node for u in planned}, {}
    return [u.edge for u in planned if not _reaches(u.x_node, nodes, memo)]


def _multi_stats(uses: list[tuple[_Use, str]], param: torch.Tensor, n: int, *, param_moments: bool):
    """Sum the per-example gradients of all calls, in chunks of examples, then square."""
    total, norms, sq_sum = None, [], None
    step = max(1, CHUNK_BYTES // (2 * param.numel() * param.element_size()))
    for s in range(0, n, step):
        g = None
        for use, local in uses:
            if use.grad is not None:
                part = use.site.rule.grads(use.site.module, Call(use.x, use.grad).rows(s, s + step), (local,))[local]
                g = part if g is None else g.add_(part)
        if g is None:
            return None
        st = stats_of(g, param_moments=param_moments)
        total = st.sum if total is None else total.add_(st.sum)
        norms.append(st.sq_norms)
        sq_sum = st.sq_sum if sq_sum is None or st.sq_sum is None else sq_sum.add_(st.sq_sum)
    return ParamStats(total, torch.cat(norms), sq_sum)


def _fallback(
    stats, model, inputs, targets, loss, layout: ParamLayout, groups: list[int], *, param_moments: bool, by_loop: bool
) -> str | None:
    """Per-example gradients of just these groups into `stats`; other parameters are held constant.

    torch.func first, unless `by_loop`; where it cannot vmap the model (an RNN, control flow on the data,
    an autograd.Function without setup_context) or a parameter is used through a reference it cannot swap
    (general.DirectRead), one backward per example. Returns torch.func's error, if any."""
    sizes = tuple(layout.sizes[g] for g in groups)
    sub = ParamLayout(
        names=tuple(layout.names[g] for g in groups),
        owners=tuple(layout.owners[g] for g in groups),
        sizes=sizes,
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        scopes={TOTAL: tuple(range(len(groups)))},
    )
    failed = None
    if not by_loop:
        try:
            flat, _ = per_example_grads(model, inputs, targets, loss, sub)  # (B, P_sub)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 -- the loop below raises whatever is the model's own fault
            failed = first_line(e)  # not the exception: its traceback would keep torch.func's frames alive
    if by_loop or failed is not None:
        with torch.enable_grad():  # called under no_grad, which torch.func ignores and a loop does not
            flat, _ = loop_grads(model, inputs, targets, loss, sub)
    for g, part in zip(groups, flat.split(sizes, dim=1), strict=True):
        # float64 before reducing, one tensor at a time: these gradients are explicit, so their sums need
        # not round to the model's dtype
        stats[g] = stats_of(part.double(), param_moments=param_moments)
    return failed
