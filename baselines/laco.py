"""LaCo (Yang et al., arXiv 2402.11187, Layer Collapse): merge following layers into one, from the top down.

RDSC (Reserving-Differences-while-Seeking-Common) collapses layers l+1…l+m into layer l:
θ_l ← θ_l + Σ_k (θ_{l+k} − θ_l). Starting at position l = L − C and walking down to ``min_layer_frac``·L, a
collapse of C layers (C−1 removed) is accepted while the mean per-token cosine similarity between the merged and
the dense model's last hidden state (after the final norm, as HF's ``hidden_states[-1]``) on the calibration
windows stays above ``threshold``; after an acceptance l moves down by ``interval``, after a rejection by 1.
The paper fixes T and gets whatever count follows; here n is given, so the last collapse takes only the layers
still needed, and a sweep that ends short of n restarts from the top with T lowered by ``threshold_step`` (the
thresholds used are recorded). Cost: one forward over D for the dense reference plus one per candidate tried.
The merge is the ``laco_merge`` repair (the method's default), which carries out the recorded plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines._common import info_counts
from baselines._merge import PlannedMergeRepair, merged
from gradmap.core.adapters import adapter
from gradmap.core.calib import microbatches
from gradmap.core.components import REPAIRS, SELECTORS, Selection, Selector, model_device, register_method
from gradmap.core.layers import active_layers, decoder_layers


def last_hidden(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The final-norm output of the (current) model for each micro-batch."""
    device = model_device(model)
    with torch.inference_mode():
        body = adapter(model).body
        return [body(input_ids=mb.to(device), use_cache=False).last_hidden_state.float() for mb in batches]


def mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over all tokens of cos(a, b) along the hidden dimension."""
    total = sum(float(F.cosine_similarity(x, y, dim=-1).double().sum()) for x, y in zip(a, b))
    return total / sum(x.shape[0] * x.shape[1] for x in a)


@dataclass
class LaCoSelector(Selector):
    """Top-down layer collapse accepted while the last hidden state stays similar to the dense model's."""

    name: ClassVar[str] = "laco"
    needs_whole_model: ClassVar[str | None] = "forwards of the whole model with layers merged"
    merge_layers: int = 4  # C: layers l..l+C-1 collapse into l (paper, Llama-2-7B: 4)
    min_layer_frac: float = 0.5  # lowest position a collapse may start at, as a fraction of L (paper: 16/32)
    interval: int = 2  # I: positions to move down after an accepted collapse (paper: 2)
    threshold: float = 0.65  # T: minimum mean cosine similarity to accept (paper: 0.65)
    threshold_step: float = 0.05  # lower T by this much when a sweep ends short of n

    def __post_init__(self) -> None:
        if self.merge_layers < 2 or self.interval < 1 or not 0 <= self.min_layer_frac < 1 or self.threshold_step <= 0:
            raise ValueError(
                "selector 'laco': need merge_layers >= 2, interval >= 1, 0 <= min_layer_frac < 1, "
                f"threshold_step > 0; got {self.options()}"
            )

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        protected = self.protected(n_layers)
        low = max(round(self.min_layer_frac * n_layers), 0)
        if n_layers - low - 1 < n_remove:
            raise ValueError(
                f"selector 'laco': only {n_layers - low} layers lie above min_layer_frac={self.min_layer_frac} "
                f"of {n_layers}; cannot collapse {n_remove}; lower min_layer_frac"
            )
        batches = microbatches(calib_ids, self.micro_batch_size)
        dense = last_hidden(model, batches)
        calls, tried = len(batches), 1
        alive, plan, removed = list(range(n_layers)), [], []
        scores: dict[int, float] = {}
        history: list[dict[str, float]] = []
        threshold = self.threshold
        pos = len(alive) - min(self.merge_layers, n_remove + 1)
        while len(removed) < n_remove:
            take = min(self.merge_layers, n_remove - len(removed) + 1)  # the last collapse takes what is still needed
            pos = min(pos, len(alive) - take)
            if pos < low:  # sweep ended short of n: restart from the top with a lower threshold
                threshold -= self.threshold_step
                if threshold < -1.0:
                    raise ValueError(
                        f"selector 'laco': no collapse of {n_remove} layers fits above min_layer_frac="
                        f"{self.min_layer_frac} outside the protected layers {sorted(protected)}"
                    )
                pos = len(alive) - take
                continue
            group = alive[pos : pos + take]
            if len(group) < 2 or protected & set(group[1:]):
                pos -= 1
                continue
            m = len(group) - 1
            merge = {"keep": group[0], "layers": group, "coeffs": [1.0 - m] + [1.0] * m}
            with merged(model, [*plan, merge]), active_layers(model, [i for i in alive if i not in group[1:]]):
                sim = mean_cosine(dense, last_hidden(model, batches))
            calls, tried = calls + len(batches), tried + 1
            history.append({"keep": group[0], "removed": m, "similarity": sim, "threshold": threshold})
            scores[group[0]] = sim
            if sim > threshold:
                merge["similarity"] = sim
                plan.append(merge)
                removed.extend(group[1:])
                alive = [i for i in alive if i not in group[1:]]
                pos -= self.interval
            else:
                pos -= 1
        return Selection(
            removed=removed,
            scores=[scores],
            info=info_counts(
                calls,
                calib_passes=tried,
                merges=plan,
                tried=history,
                final_threshold=threshold,
                score="cosine similarity of the last hidden state to the dense model's",
                scores_keyed_by="the kept layer of each tried collapse (last try)",
                select="above threshold",
            ),
        )


@dataclass
class LaCoMergeRepair(PlannedMergeRepair):
    """LaCo's RDSC merge θ_l ← θ_l + Σ_k (θ_{l+k} − θ_l), as planned by the laco selector."""

    name: ClassVar[str] = "laco_merge"
    requires_selector: ClassVar[str | None] = "laco"


SELECTORS.add("laco", LaCoSelector)
REPAIRS.add("laco_merge", LaCoMergeRepair)
register_method(
    "laco",
    "laco",
    "laco_merge",
    "LaCo: top-down RDSC layer collapse accepted while the last hidden state's cosine stays above a threshold.",
)
