"""Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", arXiv 2403.17887).

    d(ℓ, n) = arccos(cos(h_ℓ, h_{ℓ+n})) / π           on the last token of each window, mean over windows

and the contiguous block ℓ*…ℓ*+n−1 with ℓ* = argmin d over unprotected blocks is removed, one-shot, from one
forward pass. ``tokens=all`` averages over every token instead. The paper heals with QLoRA, which is not used
here. Also the selector of the ``replaceme`` preset (angular → least-squares ``linear`` repair, arXiv 2505.02819).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines._common import WindowSelector, angular_distance
from gradmap.core.components import SELECTORS, register_method


@dataclass
class AngularSelector(WindowSelector):
    """Contiguous block whose input and output states are closest in angle."""

    name: ClassVar[str] = "angular"
    order: ClassVar[str] = "min"
    score_name: ClassVar[str] = "angular distance"
    tokens: str = "last"  # last (paper) | all

    def __post_init__(self) -> None:
        self.check_choice("tokens", ["last", "all"])

    def span(self, n_remove: int) -> int:
        return n_remove

    def cut(self, start: int, n_remove: int) -> list[int]:
        return list(range(start, start + n_remove))

    def statistic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Calibration windows are unpadded, so the last position is every window's last token.
        return angular_distance(a[:, -1], b[:, -1]) if self.tokens == "last" else angular_distance(a, b)


SELECTORS.add("angular", AngularSelector)
register_method(
    "angular",
    "angular",
    "none",
    "Angular distance (Gromov et al.): remove the contiguous block of smallest last-token angular "
    "distance, one forward pass.",
)
register_method(
    "replaceme",
    "angular",
    "linear",
    "ReplaceMe (lstsq): angular block selection + least-squares linear transform merged before the cut.",
)
