"""Control: remove n unprotected layers uniformly at random, seeded by ``seed`` (no data, no passes).

Any method worth its cost should beat this; the scores are the uniform draws themselves (the n lowest go).
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
class RandomSelector(Selector):
    """n layers drawn uniformly without replacement among the unprotected ones."""

    name: ClassVar[str] = "random"
    needs_whole_model: ClassVar[str | None] = None  # runs no forward: nothing to onload

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        candidates = self.candidates(range(n_layers), n_layers)
        draws = torch.rand(len(candidates), generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        scores = dict(zip(candidates, draws.tolist()))
        removed = pick_lowest(scores, n_remove)
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed, scores=[scores], info=info_counts(0, score="uniform draw", select="min", seed=self.seed)
        )


SELECTORS.add("random", RandomSelector)
register_method("random", "random", "none", "Control: n unprotected layers removed at random (seeded).")
