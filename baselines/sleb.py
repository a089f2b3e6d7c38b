"""SLEB (Song et al., arXiv 2402.09025; ``jiwonsong-dev/SLEB``): iterative greedy block elimination.

At each step every candidate block is switched off in turn, the calibration NLL of the remaining model is
measured, and the block whose removal gives the lowest NLL goes; the next step starts from the smaller model.
The reference's barriers (``early_barrier=1``, ``latter_barrier=1``) index the *alive* list; since the first and
last alive blocks are never candidates they are always the original first and last, so barriers k/k are exactly
``protect_first=k``/``protect_last=k`` here (defaults 1/1). Cost: Σ over steps of the candidates tried, each one
forward over D of a model with one layer fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from baselines._common import info_counts, leave_one_out_nll
from gradmap.core.components import SELECTORS, Selection, Selector, pick_lowest, register_method, warn_if_edge
from gradmap.core.layers import decoder_layers


@dataclass
class SLEBSelector(Selector):
    """Greedy: remove, one at a time, the block whose removal leaves the lowest calibration NLL."""

    name: ClassVar[str] = "sleb"
    needs_whole_model: ClassVar[str | None] = "the calibration loss of the whole model with blocks left out"
    protect_first: int = 1  # SLEB's early_barrier
    protect_last: int = 1  # SLEB's latter_barrier

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        alive, removed = list(range(n_layers)), []
        all_scores: list[dict[int, float]] = []
        calls = tried = 0
        for step in tqdm(range(n_remove), desc="sleb", unit="layer", leave=False):
            candidates = self.candidates(alive, n_layers)
            nll, step_calls = leave_one_out_nll(
                model, calib_ids, self.micro_batch_size, alive, candidates, f"sleb step {step + 1}/{n_remove}"
            )
            calls += step_calls
            tried += len(candidates)
            drop = pick_lowest(nll, 1)[0]  # ties: lower index, like the reference's strict '<'
            all_scores.append(nll)
            removed.append(drop)
            alive.remove(drop)
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed,
            scores=all_scores,
            info=info_counts(
                calls,
                calib_passes=tried,
                decisions=n_remove,
                calib_nll=[s[r] for s, r in zip(all_scores, removed)],
                score="calibration NLL without the layer",
                select="min",
            ),
        )


SELECTORS.add("sleb", SLEBSelector)
register_method(
    "sleb",
    "sleb",
    "none",
    "SLEB: iterative greedy removal of the block whose removal leaves the lowest calibration NLL.",
    selector_options={"protect_first": 1, "protect_last": 1},
)
