"""MKA (Liu et al., arXiv 2406.16330, "Pruning via Merging"): merge the most similar adjacent layers.

Per step: the output of every alive layer on up to ``max_tokens`` sampled calibration tokens is embedded with a
diffusion map (kernel K = exp(−(D/σ)^½) on pairwise distances D, α=½ density normalisation, symmetric
normalisation, the top ``dim`` non-trivial eigenvectors), each coordinate is rank-normalised, and the similarity
of two layers is the normalised mutual information NMI = I(Y_i;Y_j)/√(H(Y_i)H(Y_j)) of their embeddings
(histogram estimate, ``bins`` per coordinate; 1 for identical layers). The adjacent pair (i, j) of highest NMI is
merged into i, θ_i ← α·θ_i + (1−α)·θ_j with α = NMI (``alpha=similarity``, the paper's α = S_lm) and j is removed;
the next step recomputes the activations of the merged model. The merge itself is the ``mka_merge`` repair (the
method's default), which carries out the recorded plan; ``repair=none`` keeps the choice and skips the merge.

The public pipeline differs (docs/methods.md): it always fuses the last two layers and writes the fused weights
into a fresh ``model.state_dict()`` dict, so the weights never change and it deletes the last n layers. That
behaviour is the ``mka_refcode`` ablation (``pairs=last``, no merge), which equals ``last_n``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from baselines._common import info_counts
from baselines._merge import PlannedMergeRepair, merged
from gradmap.core.calib import microbatches
from gradmap.core.capture import layer_inputs_and_final
from gradmap.core.components import REPAIRS, SELECTORS, Selection, Selector, model_device, register_method
from gradmap.core.layers import active_layers, decoder_layers


def diffusion_embedding(x: torch.Tensor, dim: int, sigma: float | None, alpha: float = 0.5) -> torch.Tensor:
    """Diffusion-map coordinates (N × dim) of the rows of ``x``; σ defaults to the median pairwise distance."""
    x = x.double()
    d = torch.cdist(x, x)
    scale = float(d[d > 0].median()) if sigma is None and (d > 0).any() else (sigma or 1.0)
    k = torch.exp(-((d / scale) ** 0.5))
    p = k.sum(0)
    k1 = k / torch.outer(p, p) ** alpha
    v = k1.sum(0).sqrt()
    a = k1 / torch.outer(v, v)
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)
    order = torch.argsort(vals, descending=True)
    u = vecs[:, order[: dim + 1]]
    u = u / torch.where(u[:, :1] == 0, torch.full_like(u[:, :1], 1e-12), u[:, :1])
    return u[:, 1 : dim + 1]


def rank_normalise(y: torch.Tensor) -> torch.Tensor:
    """Each column replaced by its ranks / N (ties by position), as the reference does."""
    return torch.argsort(torch.argsort(y, dim=0), dim=0).double() / y.shape[0]


def cells(y: torch.Tensor, bins: int) -> torch.Tensor:
    """One histogram cell id per row of a rank-normalised embedding (``bins`` per coordinate)."""
    idx = (y * bins).long().clamp(0, bins - 1)
    out = torch.zeros(y.shape[0], dtype=torch.long)
    for col in range(y.shape[1]):
        out = out * bins + idx[:, col]
    return out


def entropy(c: torch.Tensor) -> float:
    p = torch.bincount(c).double()
    p = p[p > 0] / c.numel()
    return float(-(p * p.log()).sum())


def nmi(a: torch.Tensor, b: torch.Tensor) -> float:
    """I(A;B)/√(H(A)H(B)) of two cell-id vectors; 0 if either is constant."""
    ha, hb = entropy(a), entropy(b)
    if ha == 0 or hb == 0:
        return 0.0
    joint = a * (int(b.max()) + 1) + b
    return (ha + hb - entropy(joint)) / math.sqrt(ha * hb)


@dataclass
class MKASelector(Selector):
    """Iteratively merge the adjacent alive pair of highest NMI similarity; records the merge plan."""

    name: ClassVar[str] = "mka"
    needs_whole_model: ClassVar[str | None] = "forwards of the whole model with layers merged, one merge at a time"
    max_tokens: int = 512  # calibration tokens sampled (seeded) for the embeddings: cost is O(max_tokens^2)
    dim: int = 2  # diffusion-map dimensions (reference: 2)
    sigma: float | None = None  # kernel scale; null: median pairwise distance (reference: fixed 8 on raw states)
    bins: int = 8  # histogram bins per embedding coordinate for the NMI estimate
    alpha: str = "similarity"  # similarity: α = NMI | reference: the code's sigmoid ratio | fixed: alpha_fixed
    alpha_fixed: float = 0.5
    pairs: str = "best"  # best: most similar adjacent pair | last: always the last two (the public code)
    recompute: bool = True  # recompute activations after each merge (false: one similarity matrix, like the code)

    def __post_init__(self) -> None:
        self.check_choice("alpha", ["similarity", "reference", "fixed"])
        self.check_choice("pairs", ["best", "last"])
        if self.max_tokens < 8 or self.dim < 1 or self.bins < 2:
            raise ValueError(f"selector 'mka': need max_tokens >= 8, dim >= 1, bins >= 2, got {self.options()}")

    def embeddings(self, model: nn.Module, calib_ids: torch.Tensor, alive: list[int]) -> tuple[dict, int]:
        """Rank-normalised embedding cells of each alive layer's output on the sampled tokens; forward calls."""
        n_tokens = calib_ids.numel()
        pick = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(self.seed))[: self.max_tokens]
        pick = pick.sort().values
        batches = microbatches(calib_ids, self.micro_batch_size)
        outs: dict[int, list[torch.Tensor]] = {i: [] for i in alive}
        start = 0
        with active_layers(model, alive), torch.inference_mode():
            for mb in batches:
                local = pick[(pick >= start) & (pick < start + mb.numel())] - start  # keep only sampled tokens
                start += mb.numel()
                states = layer_inputs_and_final(model, mb.to(model_device(model)))
                for pos, layer in enumerate(alive):
                    flat = states[pos + 1].reshape(-1, states[pos + 1].shape[-1])
                    outs[layer].append(flat[local.to(flat.device)].float().cpu())
        result = {}
        for layer in alive:
            x = torch.cat(outs[layer])
            result[layer] = cells(rank_normalise(diffusion_embedding(x, self.dim, self.sigma)), self.bins)
        return result, len(batches)

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        protected = self.protected(n_layers)
        alive, plan, removed = list(range(n_layers)), [], []
        all_scores: list[dict[int, float]] = []
        calls = passes = 0
        emb = None
        for _ in tqdm(range(n_remove), desc="mka", unit="merge", leave=False):
            if emb is None or self.recompute:
                with merged(model, plan):
                    emb, c = self.embeddings(model, calib_ids, alive)
                calls, passes = calls + c, passes + 1
            pairs = [(i, j) for i, j in itertools.pairwise(alive) if j not in protected]
            if not pairs:
                raise ValueError(f"selector 'mka': no adjacent pair left to merge (protected {sorted(protected)})")
            sim = {j: nmi(emb[i], emb[j]) for i, j in pairs}  # keyed by the layer that would be removed
            all_scores.append(sim)
            i, j = pairs[-1] if self.pairs == "last" else max(pairs, key=lambda ij: (sim[ij[1]], -ij[1]))
            a = self.merge_ratio(emb, alive, i, j, sim[j])
            plan.append({"keep": i, "layers": [i, j], "coeffs": [a, 1.0 - a], "similarity": sim[j]})
            removed.append(j)
            alive.remove(j)
            emb.pop(j)
        return Selection(
            removed=removed,
            scores=all_scores,
            info=info_counts(
                calls,
                calib_passes=passes,
                merges=plan,
                score="NMI similarity with the previous alive layer",
                scores_keyed_by="the later layer of each adjacent pair",
                select="max",
            ),
        )

    def merge_ratio(self, emb: dict, alive: list[int], i: int, j: int, similarity: float) -> float:
        """α, the kept layer's share."""
        if self.alpha == "fixed":
            return float(self.alpha_fixed)
        if self.alpha == "similarity":
            return min(1.0, max(0.0, similarity))
        # reference: mean similarity of each layer to all alive layers, ratio, then e^r / (1 + e^r)
        s_i = sum(nmi(emb[i], emb[k]) for k in alive) / len(alive)
        s_j = sum(nmi(emb[j], emb[k]) for k in alive) / len(alive)
        r = s_i / (s_i + s_j) if s_i + s_j > 0 else 0.5
        return math.exp(r) / (1.0 + math.exp(r))


@dataclass
class MKAMergeRepair(PlannedMergeRepair):
    """MKA's merge θ_i ← α·θ_i + (1−α)·θ_j, as planned by the mka selector."""

    name: ClassVar[str] = "mka_merge"
    requires_selector: ClassVar[str | None] = "mka"


SELECTORS.add("mka", MKASelector)
REPAIRS.add("mka_merge", MKAMergeRepair)
register_method(
    "mka",
    "mka",
    "mka_merge",
    "MKA: iteratively merge the adjacent layer pair of highest manifold NMI similarity (alpha = similarity).",
)
register_method(
    "mka_refcode",
    "mka",
    "none",
    "Ablation: what the public MKA pipeline does (last two layers, fused weights discarded) = delete the last n.",
    selector_options={"pairs": "last", "recompute": False},
)
