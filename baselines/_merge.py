"""Layer merging shared by MKA and LaCo: a kept layer's weights become a linear combination of several layers'.

MKA merges two layers, θ_keep ← α·θ_keep + (1−α)·θ_other; LaCo's RDSC collapses m following layers into one,
θ_l ← θ_l + Σ_k (θ_{l+k} − θ_l) = (1−m)·θ_l + Σ_k θ_{l+k}. Both are ``θ_keep ← Σ c_k θ_k`` over the non-norm
parameters (the projections and any biases; the kept layer's norms stay, as in both references). The merged
layers are then removed; no module is added, so the result saves and reloads like any smaller model.

The selector plans merges while trying them on the model (:func:`merged`, which restores the weights on exit) and
records the plan in ``Selection.info["merges"]``; :class:`PlannedMergeRepair` carries the same plan out for good.
A plan entry is ``{"keep": i, "layers": [i, j, ...], "coeffs": [c_i, c_j, ...]}`` in original layer indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gradmap.core.components import Repair, Selection
from gradmap.core.layers import decoder_layers

Merge = dict[str, Any]


def merge_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a merge combines: everything but the norms."""
    return {name: p for name, p in layer.named_parameters() if "norm" not in name}


def apply_merge(layers: Sequence[nn.Module], merge: Merge) -> None:
    """θ_keep ← Σ c_k θ_k, computed in fp32 and written back in the kept layer's dtype."""
    keep = merge_params(layers[merge["keep"]])
    sources = [merge_params(layers[i]) for i in merge["layers"]]
    with torch.no_grad():
        for name, target in keep.items():
            total = sum(float(c) * src[name].detach().float() for c, src in zip(merge["coeffs"], sources))
            target.copy_(total)


def check_plan(plan: Sequence[Merge], removed: Sequence[int], who: str) -> None:
    """The plan removes exactly the selected layers and keeps every kept layer."""
    planned = sorted(j for m in plan for j in m["layers"] if j != m["keep"])
    if planned != sorted(removed):
        raise ValueError(f"{who}: merge plan removes {planned}, but the removed layers are {sorted(removed)}")


@contextmanager
def merged(model: nn.Module, plan: Sequence[Merge]) -> Iterator[None]:
    """Apply ``plan`` in order and restore every touched kept layer's weights on exit."""
    layers = decoder_layers(model)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for merge in plan:
            if merge["keep"] not in saved:
                saved[merge["keep"]] = {k: p.detach().clone() for k, p in merge_params(layers[merge["keep"]]).items()}
            apply_merge(layers, merge)
        yield
    finally:
        with torch.no_grad():
            for index, params in saved.items():
                for name, p in merge_params(layers[index]).items():
                    p.copy_(params[name])


@dataclass
class PlannedMergeRepair(Repair):
    """Carry out the merge plan its selector recorded, then let ``prune()`` delete the merged layers."""

    name: ClassVar[str] = ""
    _plan: list[Merge] = field(default_factory=list, init=False, repr=False)

    def prepare(self, selection: Selection) -> None:
        plan = selection.info.get("merges")
        if plan is None:
            raise ValueError(f"repair {self.name!r}: the selection carries no merge plan")
        check_plan(plan, selection.removed, f"repair {self.name!r}")
        self._plan = list(plan)

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        layers = decoder_layers(model)
        for merge in self._plan:
            apply_merge(layers, merge)
        return {"merges": len(self._plan), "merged": True}
