"""The registry of per-layer rules, keyed by module type.

A subclass of a registered type uses its parent's rule only if it keeps the
parent's forward (and for convolutions `_conv_forward`, where a masked conv
changes the weight); anything else goes to the general fallback.
"""

from __future__ import annotations

from torch import nn

from gns_sweep.per_example.rules.base import Call, ParamStats, Rule
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

__all__ = ["RULES", "Call", "ParamStats", "Rule", "find_rule"]


def find_rule(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            kept = all(getattr(type(module), name) is getattr(cls, name) for name in rule.methods)
            return rule if kept else None
    return None
