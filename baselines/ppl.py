"""PPL block importance (Kim et al., Shortened LLaMA, arXiv 2402.02834; ``Nota-NetsPresso/shortened-llm``).

Remove each unprotected layer alone, measure the calibration perplexity of what is left, and drop the n layers
whose removal hurts least, one-shot: exactly one forward pass over D per candidate (L with no protection). The
paper then retrains with LoRA; ours is training-free. Scores are perplexities (lower = less important).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from baselines._common import info_counts, leave_one_out_nll
from gradmap.core.components import SELECTORS, Selection, Selector, pick_lowest, register_method, warn_if_edge
from gradmap.core.layers import decoder_layers


def perplexity(nll: float) -> float:
    """exp(NLL), inf past float range (only a broken model gets there; the ranking is unchanged)."""
    return math.exp(nll) if nll < 700 else math.inf


@dataclass
class PPLSelector(Selector):
    """Leave-one-layer-out calibration perplexity, one-shot."""

    name: ClassVar[str] = "ppl"
    needs_whole_model: ClassVar[str | None] = "the calibration loss of the whole model with each layer left out"

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        alive = list(range(n_layers))
        candidates = self.candidates(alive, n_layers)
        nll, calls = leave_one_out_nll(model, calib_ids, self.micro_batch_size, alive, candidates, "ppl")
        scores = {layer: perplexity(value) for layer, value in nll.items()}
        removed = pick_lowest(nll, n_remove)
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed,
            scores=[scores],
            info=info_counts(
                calls,
                calib_passes=len(candidates),
                calib_nll=[nll],
                score="calibration perplexity without the layer",
                select="min",
            ),
        )


SELECTORS.add("ppl", PPLSelector)
register_method(
    "ppl",
    "ppl",
    "none",
    "PPL (Shortened LLaMA): remove the n layers whose single removal raises calibration PPL least.",
)
register_method(
    "ppl_plus",
    "ppl",
    "none",
    "PPL+ (the reference default): PPL block importance with the first 4 and last 2 blocks kept.",
    selector_options={"protect_first": 4, "protect_last": 2},
)
