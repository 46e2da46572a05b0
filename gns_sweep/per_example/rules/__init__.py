"""The registry of per-layer rules, keyed by module type.

A subclass of a registered type uses its parent's rule only if it keeps the
parent's forward (and for convolutions `_conv_forward`, where a masked conv
changes the weight); anything else goes to the general fallback. `register_rule`
adds a rule for a layer type of the user's own (docs/register-rule.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gns_sweep.errors import UsageError
from gns_sweep.per_example.rules.base import Call, ParamStats, Rule, stats_of
from gns_sweep.per_example.rules.conv import ConvRule
from gns_sweep.per_example.rules.embedding import EmbeddingRule
from gns_sweep.per_example.rules.linear import LinearRule
from gns_sweep.per_example.rules.norm import BatchNormEvalRule, GroupNormRule, LayerNormRule, RMSNormRule

RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.modules.batchnorm._BatchNorm: BatchNormEvalRule(),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    RULES[nn.RMSNorm] = RMSNormRule()

__all__ = ["RULES", "Call", "ParamStats", "RegisteredRule", "Rule", "find_rule", "register_rule", "stats_of"]


def find_rule(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            kept = all(getattr(type(module), name) is getattr(cls, name) for name in rule.methods)
            return rule if kept else None
    return None


@dataclass(frozen=True, eq=False)
class RegisteredRule:
    """What `register_rule` returns: `remove()` puts back the rule the layer type had before (or none).

    Also a context manager that removes the rule on exit."""

    layer: type[nn.Module]
    rule: Rule
    previous: Rule | None  # the layer type's rule before this registration

    def remove(self) -> None:
        if RULES.get(self.layer) is not self.rule:
            return  # already removed, or replaced by a later registration, which keeps its own
        if self.previous is None:
            del RULES[self.layer]
        else:
            RULES[self.layer] = self.previous

    def __enter__(self) -> RegisteredRule:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_rule(layer: type[nn.Module], rule: Rule) -> RegisteredRule:
    """Have the fast engine compute the per-example statistics of `layer`'s parameters with `rule`.

    `layer` is a module class (its subclasses share the rule while they keep its forward); `rule` an
    instance of a `Rule` subclass that gives `grads`. A rule the type had (a built-in one) is replaced
    until the returned handle's `remove()`. An engine keeps the rules it found on a model when it first
    saw it: register before that."""
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)) or layer is nn.Module:
        hint = (
            f"pass the class, {type(layer).__name__}, not an instance of it"
            if isinstance(layer, nn.Module)
            else "pass a subclass of torch.nn.Module, such as the class of your layer"
        )
        raise UsageError(f"register_rule's first argument must be a layer class; got {layer!r}: {hint}")
    if not isinstance(rule, Rule):
        hint = (
            f"pass an instance, {rule.__name__}(), not the class"
            if isinstance(rule, type) and issubclass(rule, Rule)
            else "subclass gns_sweep.per_example.Rule, give it grads(module, call, names), and pass an instance"
        )
        raise UsageError(f"register_rule's rule for {layer.__name__} must be a Rule; got {rule!r}: {hint}")
    if type(rule).grads is Rule.grads:
        raise UsageError(
            f"the rule {type(rule).__name__} for {layer.__name__} does not define grads(module, call, names), "
            "which every rule needs (a layer called twice sums its materialised per-example gradients); "
            "define it, even if stats takes a cheaper route"
        )
    handle = RegisteredRule(layer, rule, RULES.get(layer))
    RULES[layer] = rule
    return handle
