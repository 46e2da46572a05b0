"""Which parameters are measured, how they are flattened, and the scopes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from gns_sweep.results import NORM, SUMMARY_SCOPES, TOTAL

ROOT = "<root>"  # scope name for parameters registered on the model itself
# Normalization layers: their parameters' noise scale alone tracks the whole model's in transformers
# (Gray et al. 2024), at a fraction of the cost, so they get a scope of their own.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


@dataclass(frozen=True)
class ParamLayout:
    """Trainable parameters in a fixed order, one group per parameter tensor."""

    names: tuple[str, ...]  # parameter names as in named_parameters(), in flattening order
    owners: tuple[str, ...]  # owning module name per parameter (named_modules() naming)
    sizes: tuple[int, ...]  # numel per parameter
    offsets: np.ndarray  # (G+1,) int64 start of each group in the flat vector
    scopes: dict[str, tuple[int, ...]]  # scope name -> group indices; TOTAL, NORM (if any), then layers

    @property
    def n_params(self) -> int:
        return int(self.offsets[-1])

    def layers(self) -> list[str]:
        return [s for s in self.scopes if s not in SUMMARY_SCOPES]

    def restrict(self, scope: str) -> ParamLayout:
        """The same layout with only `scope` (and the summary scopes) reported."""
        keep = [s for s in SUMMARY_SCOPES if s in self.scopes] + [scope]
        return ParamLayout(self.names, self.owners, self.sizes, self.offsets, {s: self.scopes[s] for s in keep})


def param_layout(model: nn.Module) -> ParamLayout:
    """Group trainable parameters by the module that registers them directly."""
    owner_of: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner_of.setdefault(id(p), mod_name or ROOT)  # tied weights: first owner
    norm_owners = {name or ROOT for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)}
    names, owners, sizes = [], [], []
    for name, p in model.named_parameters():  # deduplicates tied weights
        if p.requires_grad:
            names.append(name)
            owners.append(owner_of[id(p)])
            sizes.append(p.numel())
    if not names:
        raise ValueError("the model has no trainable parameters")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scopes: dict[str, tuple[int, ...]] = {TOTAL: tuple(range(len(names)))}
    norm = tuple(g for g, owner in enumerate(owners) if owner in norm_owners)
    if norm:
        scopes[NORM] = norm
    for g, owner in enumerate(owners):
        scopes[owner] = scopes.get(owner, ()) + (g,)
    return ParamLayout(tuple(names), tuple(owners), tuple(sizes), offsets, scopes)
