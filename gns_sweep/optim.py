"""The optimizer a run trains with: its settings (`OptimizerSpec`), the torch optimizer for them (`build`),
and the diagonal preconditioner an adaptive one holds (`preconditioner`).

torch's own optimizers do SGD, heavy-ball momentum, Adam and AdamW; LARS (You et al. 2017), which torch
lacks, is `Lars` below. Plain SGD never gets here during training: `gns_sweep.train` applies it with a
bare in-place update, which is the same step without torch's per-step bookkeeping (see docs/optimizers.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from gns_sweep.errors import UsageError

SGD, MOMENTUM, ADAM, ADAMW, LARS = "sgd", "momentum", "adam", "adamw", "lars"
OPTIMIZERS = (SGD, MOMENTUM, ADAM, ADAMW, LARS)
ADAPTIVE = frozenset({ADAM, ADAMW})  # a per-parameter preconditioner 1/(sqrt(v_hat) + eps)
LINEAR, SQRT = "linear", "sqrt"  # how the lr grid's centre grows with the batch size

# The settings each optimizer reads (besides its name); the others must stay at their defaults.
USES = {
    SGD: ("weight_decay",),
    MOMENTUM: ("momentum", "weight_decay"),
    ADAM: ("betas", "eps", "weight_decay"),
    ADAMW: ("betas", "eps", "weight_decay"),
    LARS: ("momentum", "weight_decay", "trust"),
}
# The command-line option of each setting, for messages.
OPTION = {
    "momentum": "--momentum",
    "betas": "--betas",
    "weight_decay": "--weight-decay",
    "trust": "--trust-coefficient",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer a run trains with, and its settings (docs/optimizers.md)."""

    name: str = SGD  # one of OPTIMIZERS
    momentum: float = 0.9  # heavy-ball coefficient (momentum, lars)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's decay rates of the first and second moments (adam, adamw)
    eps: float = 1e-8  # Adam's denominator guard (adam, adamw)
    weight_decay: float = 0.0  # L2 added to the gradient; decoupled from it for adamw
    trust: float = 0.001  # LARS trust coefficient: the layer-wise rate is trust * ||w|| / (||g|| + wd ||w||)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{self.name}'; choose one of: {', '.join(OPTIMIZERS)} (--optimizer)")
        betas = self.betas
        if isinstance(betas, str) or not isinstance(betas, Iterable) or len(tuple(betas)) != 2:
            raise UsageError(f"betas {betas!r}: give two numbers, e.g. 0.9,0.999 (--betas)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        for name in ("momentum", "eps", "weight_decay", "trust"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if not 0 <= self.momentum < 1:
            raise UsageError(f"momentum {self.momentum:g} must be >= 0 and < 1, e.g. 0.9 (--momentum)")
        for k, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise UsageError(f"betas {_pair(self.betas)}: beta{k + 1} {b:g} must be >= 0 and < 1 (--betas)")
        if not self.eps > 0:
            raise UsageError(f"eps {self.eps:g} must be > 0, e.g. 1e-8")
        if not self.weight_decay >= 0:
            raise UsageError(f"weight decay {self.weight_decay:g} must be >= 0 (--weight-decay; 0: none)")
        if not self.trust > 0:
            raise UsageError(f"trust coefficient {self.trust:g} must be > 0, e.g. 0.001 (--trust-coefficient)")
        for f in fields(self):
            if f.name != "name" and f.name not in USES[self.name] and getattr(self, f.name) != f.default:
                raise UsageError(
                    f"{f.name} {getattr(self, f.name)} does not apply to optimizer '{self.name}' ({_users(f.name)} "
                    f"use it); leave it at its default{_drop(f.name)} or choose one of those optimizers"
                )

    def key(self) -> dict:
        """The name and the settings this optimizer reads: what result files record and --resume compares."""
        return {"name": self.name, **{k: _plain(getattr(self, k)) for k in USES[self.name]}}

    @property
    def adaptive(self) -> bool:
        """Keeps a per-parameter preconditioner (Adam, AdamW)."""
        return self.name in ADAPTIVE

    @property
    def lr_scaling(self) -> str:
        """How the lr grid's centre grows with the batch size B: "linear" (lr x B/b) or "sqrt" (lr x sqrt(B/b))."""
        return SQRT if self.adaptive else LINEAR

    @property
    def plain(self) -> bool:
        """Plain SGD: w -= lr * g, nothing else (the fast path in gns_sweep.train)."""
        return self.name == SGD and self.weight_decay == 0

    def describe(self) -> str:
        """One line for the user: the name and its settings."""
        settings = ", ".join(f"{k} {_show(v)}" for k, v in self.key().items() if k != "name")
        return f"{self.name} ({settings})" if settings else self.name


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{name} {value!r} is not a number ({OPTION.get(name, name)})")
    if not math.isfinite(value):
        raise UsageError(f"{name} {value} must be a finite number ({OPTION.get(name, name)})")
    return float(value)


def _pair(betas: tuple[float, ...]) -> str:
    return ",".join(f"{b:g}" for b in betas)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _show(value) -> str:
    return _pair(value) if isinstance(value, tuple | list) else f"{value:g}"


def _users(setting: str) -> str:
    names = [n for n in OPTIMIZERS if setting in USES[n]]
    return " and ".join(names)


def _drop(setting: str) -> str:
    option = OPTION.get(setting)
    return f" (drop {option})" if option else ""


def choose(
    default: OptimizerSpec | None,
    *,
    name: str | None = None,
    momentum: float | None = None,
    betas: tuple[float, float] | None = None,
    weight_decay: float | None = None,
    trust: float | None = None,
) -> OptimizerSpec | None:
    """The optimizer a command asks for: a task's default (None: plain SGD) changed by the options given (None:
    not given). None when no option is given, so the run takes the task's default. Options that do not apply
    to the chosen optimizer are refused, naming the fix; a different name starts from that optimizer's defaults."""
    given = {"momentum": momentum, "betas": betas, "weight_decay": weight_decay, "trust": trust}
    given = {k: v for k, v in given.items() if v is not None}
    if name is None and not given:
        return None
    base = default or OptimizerSpec()
    if name is not None and name != base.name:
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown --optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")
        base = OptimizerSpec(name=name)
    for setting in given:
        if setting not in USES[base.name]:
            option = OPTION[setting]
            which = "--optimizer " + " or ".join(n for n in OPTIMIZERS if setting in USES[n])
            raise UsageError(f"{option} does not apply to optimizer '{base.name}'; drop {option}, or choose {which}")
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    return OptimizerSpec(**{**values, **given})


def parse_betas(text: str | None) -> tuple[float, float] | None:
    """--betas 0.9,0.999 as a pair (None: not given)."""
    if text is None:
        return None
    try:
        values = tuple(float(s) for s in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise UsageError(f"--betas {text!r}: give two numbers separated by a comma, e.g. --betas 0.9,0.999")
    return values  # type: ignore[return-value]


def build(spec: OptimizerSpec, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """torch's optimizer for spec (LARS: `Lars`), over params at learning rate lr."""
    params = list(params)
    if spec.name in (SGD, MOMENTUM):
        momentum = spec.momentum if spec.name == MOMENTUM else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=spec.weight_decay)
    if spec.name == ADAM:
        return torch.optim.Adam(params, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == ADAMW:
        return torch.optim.AdamW(params, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    return Lars(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay, trust=spec.trust)


class Lars(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling, You, Gitman & Ginsburg (2017), "Large Batch Training of Convolutional
    Networks", Algorithm 1, with a constant global lr. Each parameter tensor is a layer; for each one

        local = trust * ||w|| / (||g|| + wd * ||w||)
        v <- momentum * v + lr * local * (g + wd * w)
        w <- w - v

    Every tensor takes this rule, biases and normalization gains and shifts included (no exclusions); a
    tensor whose ||w|| or ||g|| + wd ||w|| is 0 (a zero-initialised bias, a parameter with no gradient
    signal) takes local = 1 that step, a plain heavy-ball step, since the ratio says nothing there.
    """

    def __init__(
        self, params, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd, trust = group["lr"], group["momentum"], group["weight_decay"], group["trust"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                denom = g_norm + wd * w_norm
                local = torch.where((w_norm > 0) & (denom > 0), trust * w_norm / denom, torch.ones_like(w_norm))
                d = g.add(p, alpha=wd) if wd else g.clone()
                d.mul_(local * lr)
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = d  # v_0 = 0: the first velocity is the first scaled step
                else:
                    state["velocity"].mul_(m).add_(d)
                p.sub_(state["velocity"])
        return loss


@torch.no_grad()
def preconditioner(
    optimizer: torch.optim.Optimizer | None, spec: OptimizerSpec, params_by_name: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor] | None:
    """The diagonal preconditioner an adaptive optimizer applies now: {name: P}, P shaped like the parameter.

    For Adam and AdamW, P = 1 / (sqrt(v_hat) + eps) with v_hat = exp_avg_sq / (1 - beta2^t), torch's own bias
    correction, so that the step is lr * P * m_hat. A parameter the optimizer has not updated yet (no gradient
    so far) has v_hat = 0 there: P = 1/eps. None for a non-adaptive optimizer, and before the first step
    (t = 0: Adam holds no second moments yet)."""
    if not spec.adaptive or optimizer is None:
        return None
    states = [optimizer.state.get(p, {}) for p in params_by_name.values()]
    if not any("exp_avg_sq" in s for s in states):
        return None
    _, beta2 = spec.betas
    out = {}
    for (name, p), state in zip(params_by_name.items(), states, strict=True):
        if "exp_avg_sq" not in state:
            out[name] = torch.full_like(p, 1.0 / spec.eps)
            continue
        t = float(state["step"])
        # torch's own arithmetic: sqrt(exp_avg_sq) / sqrt(1 - beta2^t) + eps
        out[name] = 1.0 / (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t) + spec.eps)
    return out
