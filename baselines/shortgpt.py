"""ShortGPT (Men et al., arXiv 2403.03853): drop the layers that change the residual stream least.

    BI_ℓ = 1 − mean over all calibration tokens of cos(h_ℓ, h_{ℓ+1})

with h_ℓ the input of layer ℓ and h_L the pre-final-norm output of the last layer; the n lowest go, one-shot,
from a single forward pass (no gradients, no repair). The unofficial reference compares the last layer with the
*post*-norm state and maps NaN to 0.5; we use the pre-norm stream and stop on NaN (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from baselines._common import info_counts, stream_statistic, token_cosine
from gradmap.core.components import (
    SELECTORS,
    Selection,
    Selector,
    check_finite,
    pick_lowest,
    register_method,
    warn_if_edge,
)
from gradmap.core.layers import decoder_layers


def _one_minus_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - token_cosine(a, b)


@dataclass
class ShortGPTSelector(Selector):
    """Block influence, one forward pass, the n least influential unprotected layers removed at once."""

    name: ClassVar[str] = "shortgpt"
    needs_whole_model: ClassVar[str | None] = None  # h_l in, h_l+1 out: onload=layerwise works

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        scores, calls, onloaded = stream_statistic(
            model,
            calib_ids,
            self.micro_batch_size,
            {layer: (layer, layer + 1) for layer in range(n_layers)},
            _one_minus_cosine,
            "shortgpt",
            self.onload_to(model),
        )
        check_finite(scores, "ShortGPT block influence", model.dtype)
        removed = pick_lowest({i: scores[i] for i in self.candidates(range(n_layers), n_layers)}, n_remove)
        warn_if_edge(removed, n_layers, "shortgpt")
        return Selection(
            removed=removed,
            scores=[scores],
            info=info_counts(calls, calib_passes=1, score="block influence 1-cos", select="min", **onloaded),
        )


SELECTORS.add("shortgpt", ShortGPTSelector)
register_method(
    "shortgpt",
    "shortgpt",
    "none",
    "ShortGPT: remove the n layers of lowest block influence 1 - cos(h_l, h_l+1), one forward pass.",
)
