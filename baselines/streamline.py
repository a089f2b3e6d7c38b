"""LLM-Streamline (Chen et al., arXiv 2403.19135): replace the most redundant contiguous layers by one trained layer.

Selection: the window start j maximising the mean per-token cos(h_j, h_{j+w}). With the default ``window=n_plus_1``
(w = n+1) the n+1 layers j…j+n become ONE layer initialised from layer j and trained by the ``layer_replace``
repair, so layers j+1…j+n are removed (net removal n), as the reference passes ``layer_intervals+1``. With
``window=n`` (preset ``streamline_noheal``) the block j…j+n−1 is removed and nothing is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._common import WindowSelector, token_cosine
from gradmap.core.components import SELECTORS, register_method


@dataclass
class StreamlineSelector(WindowSelector):
    """Contiguous window of highest input/output cosine similarity (scores: cosine, the highest is removed)."""

    name: ClassVar[str] = "streamline"
    order: ClassVar[str] = "max"
    score_name: ClassVar[str] = "cosine similarity"
    window: str = "n_plus_1"  # n_plus_1: layers j..j+n become one trained layer | n: block j..j+n-1 removed

    def __post_init__(self) -> None:
        self.check_choice("window", ["n_plus_1", "n"])

    def span(self, n_remove: int) -> int:
        return n_remove + 1 if self.window == "n_plus_1" else n_remove

    def cut(self, start: int, n_remove: int) -> list[int]:
        first = start + 1 if self.window == "n_plus_1" else start
        return list(range(first, first + n_remove))

    def statistic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return token_cosine(a, b)


SELECTORS.add("streamline", StreamlineSelector)
register_method(
    "streamline",
    "streamline",
    "layer_replace",
    "LLM-Streamline: n+1 most similar contiguous layers replaced by one layer trained on MSE.",
    selector_options={"window": "n_plus_1"},
)
register_method(
    "streamline_noheal",
    "streamline",
    "none",
    "LLM-Streamline selection only: remove the n-layer block of highest cosine, no training.",
    selector_options={"window": "n"},
)
