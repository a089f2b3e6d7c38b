"""Control: remove the deepest n layers except the final one (arXiv 2403.17887, 2411.15558).

Deep layers are known to be the most removable on Llama-family models, so this data-free rule is the baseline a
scored method must beat. The final layer is kept through ``protect_last=1`` (the default here); scores are the
distance from the end (0 for the deepest candidate), and the removed block is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from baselines._common import info_counts
from gradmap.core.components import SELECTORS, Selection, Selector, pick_lowest, register_method, warn_if_edge
from gradmap.core.layers import decoder_layers


@dataclass
class LastNSelector(Selector):
    """The n deepest unprotected layers (the last layer is protected by default)."""

    name: ClassVar[str] = "last_n"
    needs_whole_model: ClassVar[str | None] = None  # runs no forward: nothing to onload
    protect_last: int = 1

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        candidates = self.candidates(range(n_layers), n_layers)
        deepest = max(candidates)
        scores = {layer: float(deepest - layer) for layer in candidates}
        removed = pick_lowest(scores, n_remove)
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed,
            scores=[scores],
            info=info_counts(0, score="depth from the deepest candidate", select="min"),
        )


SELECTORS.add("last_n", LastNSelector)
register_method(
    "last_n",
    "last_n",
    "none",
    "Control: the deepest n layers except the final one.",
    selector_options={"protect_last": 1},
)
