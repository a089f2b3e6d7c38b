"""BlockPruner (Zhong et al., arXiv 2406.10594; ``MrGGLS/BlockPruner``): greedy removal of attention/MLP sub-blocks.

The unit is a residual branch: each of the L layers has an attention and an MLP unit (2L in all). At each step
every remaining unit is switched off in turn, the calibration perplexity of what is left is measured, and the
unit whose removal gives the lowest perplexity goes; the next step starts from the smaller model. Switching a
branch off is exact in a pre-norm block (the residual passes; ``gradmap.core.branches``). ``n_remove`` counts
layers' worth: 2·n_remove units go. A layer that loses both branches is deleted outright; one that loses a single
branch keeps a zero-cost stand-in, and such a model refuses ``save_pretrained`` (one line) because no stock config
can describe it. Ties go to the first unit in the reference's order (every attention unit by layer, then every
MLP unit), as its strict ``<`` does.

Cost: Σ over the 2n steps of the units tried, each one calibration pass. ``prefix_cache=true`` (default) keeps
each step's layer inputs and runs a candidate from its own layer onwards, which is exact (checked once against
a full pass) and about halves the work; ``false`` runs every candidate from the embeddings, as the reference.
``search_pool=k`` narrows the search to the k units of lowest influence (1 − cos across the branch, one extra
forward), the reference's own suggestion for large models; the default searches all 2L units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from baselines._common import info_counts
from gradmap.core.adapters import adapter, text_config
from gradmap.core.branches import BRANCHES, branches_off
from gradmap.core.calib import microbatches
from gradmap.core.capture import capture, layer_inputs_and_final
from gradmap.core.components import (
    SELECTORS,
    Selection,
    Selector,
    calibration_nll,
    check_finite,
    model_device,
    register_method,
    warn_if_edge,
)
from gradmap.core.layers import active_layers, decoder_layers

Unit = tuple[int, str]


def unit_key(unit: Unit) -> int:
    """Scores are keyed by 2·layer + (0 for attention, 1 for MLP)."""
    return 2 * unit[0] + BRANCHES.index(unit[1])


class _Model:
    """The model with a set of units switched off: which layers run, and which of them lack a branch."""

    def __init__(self, model: nn.Module, off: dict[int, set[str]]) -> None:
        self.model, self.off = model, off
        self.n_layers = len(decoder_layers(model))

    def alive(self, start: int = 0) -> list[int]:
        return [i for i in range(start, self.n_layers) if len(self.off.get(i, ())) < 2]

    def half(self) -> dict[int, set[str]]:
        return {i: b for i, b in self.off.items() if len(b) == 1}

    def with_unit(self, unit: Unit) -> _Model:
        off = {i: set(b) for i, b in self.off.items()}
        off.setdefault(unit[0], set()).add(unit[1])
        return _Model(self.model, off)


def unit_influence(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[dict[int, float], int]:
    """1 − mean cos between a branch's input stream and the stream after it, per unit (one forward over D).

    The reference's suggestion for narrowing the search ("use BI to reduce the search space"): the attention unit of
    layer l compares h_l with the mid-layer stream h_l + attn(·), the MLP unit that stream with h_{l+1}.
    """
    adapt = adapter(model)
    layers = adapt.layers
    attn = {str(i): adapt.attn(layer) for i, layer in enumerate(layers)}
    sums = dict.fromkeys(range(2 * len(layers)), 0.0)
    count = 0
    device = model_device(model)
    with torch.inference_mode():
        for mb in batches:
            with capture(attn, "output") as out:
                states = layer_inputs_and_final(model, mb.to(device))
            for i in range(len(layers)):
                m = states[i].float() + out[str(i)].float()  # the stream between the two branches (pre-norm)
                for key, (a, b) in ((2 * i, (states[i].float(), m)), (2 * i + 1, (m, states[i + 1].float()))):
                    sums[key] += float((1 - F.cosine_similarity(a, b, dim=-1)).double().sum())
            count += mb.numel()
    return {k: v / count for k, v in sums.items()}, len(batches)


@dataclass
class BlockPrunerSelector(Selector):
    """Greedy over 2L attention/MLP units by calibration perplexity; n_remove layers' worth = 2·n_remove units."""

    name: ClassVar[str] = "blockpruner"
    needs_whole_model: ClassVar[str | None] = "the calibration perplexity of the whole model with branches left out"
    prefix_cache: bool = True  # run each candidate from its own layer on cached inputs (exact, ~2x cheaper)
    max_cache_gib: float = 8.0  # refuse prefix_cache above this much cached activation memory
    search_pool: int | None = None  # null: all 2L units (reference) | k: only the k units of lowest influence

    def __post_init__(self) -> None:
        if self.search_pool is not None and self.search_pool < 1:
            raise ValueError(f"selector 'blockpruner': search_pool must be >= 1 or null, got {self.search_pool}")

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        protected = self.protected(n_layers)
        batches = microbatches(calib_ids, self.micro_batch_size)
        if self.prefix_cache:
            self._check_cache_size(model, calib_ids, n_layers)
        state = _Model(model, {})
        pool: set[Unit] | None = None
        influence: dict[int, float] = {}
        calls = tried = 0
        if self.search_pool is not None:
            if self.search_pool < 2 * n_remove:
                raise ValueError(
                    f"selector 'blockpruner': search_pool={self.search_pool} is smaller than the {2 * n_remove} "
                    f"units to remove; allowed: >= {2 * n_remove} or null"
                )
            influence, c = unit_influence(model, batches)
            calls += c
            ranked = sorted(
                ((layer, b) for layer in range(n_layers) for b in BRANCHES if layer not in protected),
                key=lambda u: (influence[unit_key(u)], unit_key(u)),
            )
            pool = set(ranked[: self.search_pool])
        order: list[Unit] = []
        all_scores: list[dict[int, float]] = []
        nll_path: list[float] = []
        for step in tqdm(range(2 * n_remove), desc="blockpruner", unit="unit", leave=False):
            candidates = [
                (layer, branch)
                for branch in BRANCHES
                for layer in state.alive()
                if layer not in protected
                and branch not in state.off.get(layer, set())
                and (pool is None or (layer, branch) in pool)
            ]
            if not candidates:
                raise ValueError(f"blockpruner: no removable unit left at step {step + 1} (protected {protected})")
            cache = self._layer_inputs(state, batches) if self.prefix_cache else None
            if cache is not None:
                calls += len(batches)
                if step == 0:
                    self._check_exact(state, calib_ids, batches, cache)
                    calls += 2 * len(batches)
            scores: dict[int, float] = {}
            for unit in candidates:
                scores[unit_key(unit)] = self._nll(state.with_unit(unit), unit[0], calib_ids, batches, cache)
            calls += len(candidates) * len(batches)
            tried += len(candidates)
            check_finite(scores, f"blockpruner step {step + 1}: calibration NLL without unit", model.dtype)
            best = candidates[0]
            for unit in candidates[1:]:  # strict '<' in the reference's order: first minimum wins
                if scores[unit_key(unit)] < scores[unit_key(best)]:
                    best = unit
            all_scores.append(scores)
            nll_path.append(scores[unit_key(best)])
            order.append(best)
            state = state.with_unit(best)
        removed = [layer for layer, _ in order if len(state.off[layer]) == 2]
        removed = list(dict.fromkeys(removed))  # in the order their second branch went
        partial = {layer: next(iter(b)) for layer, b in sorted(state.half().items())}
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed,
            partial=partial,
            scores=all_scores,
            info=info_counts(
                calls,
                calib_passes=tried,
                decisions=2 * n_remove,
                units_removed=[f"{layer}.{branch}" for layer, branch in order],
                calib_nll=nll_path,
                prefix_cache=self.prefix_cache,
                search_pool=None if pool is None else sorted(unit_key(u) for u in pool),
                unit_influence=influence,
                score="calibration NLL without the unit",
                scores_keyed_by="unit 2*layer + (0 attn | 1 mlp)",
                select="min",
            ),
        )

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _nll(
        self,
        state: _Model,
        layer: int,
        calib_ids: torch.Tensor,
        batches: Sequence[torch.Tensor],
        cache: list[dict[int, torch.Tensor]] | None,
    ) -> float:
        model = state.model
        with branches_off(model, state.half()):
            if cache is None:
                with active_layers(model, state.alive()):
                    return calibration_nll(model, calib_ids, self.micro_batch_size)
            with active_layers(model, state.alive(layer)), torch.inference_mode():
                device = model_device(model)
                total = 0.0
                for i, mb in enumerate(batches):
                    mb = mb.to(device)
                    loss = model(inputs_embeds=cache[i][layer], labels=mb, use_cache=False).loss
                    total += float(loss) * mb.shape[0]
                return total / calib_ids.shape[0]

    @staticmethod
    def _layer_inputs(state: _Model, batches: Sequence[torch.Tensor]) -> list[dict[int, torch.Tensor]]:
        """Input of every layer (original index, also of removed ones) of the current model, per micro-batch."""
        model, alive = state.model, state.alive()
        device = model_device(model)
        out = []
        with branches_off(model, state.half()), active_layers(model, alive), torch.inference_mode():
            for mb in batches:
                states = layer_inputs_and_final(model, mb.to(device))
                by_layer = {layer: states[pos] for pos, layer in enumerate(alive)}
                nxt = states[-1]  # a removed layer's input is the input of the next alive layer
                for layer in range(state.n_layers - 1, -1, -1):
                    nxt = by_layer.get(layer, nxt)
                    by_layer[layer] = nxt
                out.append(by_layer)
        return out

    def _check_exact(self, state: _Model, calib_ids, batches, cache) -> None:
        """Running from the cached input of the first layer must equal a normal forward (e.g. no embedding scale)."""
        first = state.alive()[0]
        cached = self._nll(state, first, calib_ids, batches, cache)
        full = self._nll(state, first, calib_ids, batches, None)
        if abs(cached - full) > 1e-3 * max(1.0, abs(full)):
            raise ValueError(
                f"blockpruner: a forward from cached layer inputs gives NLL {cached:.6g}, a normal forward "
                f"{full:.6g}; this model transforms its embeddings before layer 0, set prefix_cache=false"
            )

    def _check_cache_size(self, model: nn.Module, calib_ids: torch.Tensor, n_layers: int) -> None:
        itemsize = torch.empty((), dtype=model.dtype).element_size()
        gib = n_layers * calib_ids.numel() * text_config(model).hidden_size * itemsize / 2**30
        if gib > self.max_cache_gib:
            raise ValueError(
                f"blockpruner: prefix_cache needs {gib:.1f} GiB of cached layer inputs (> max_cache_gib="
                f"{self.max_cache_gib}); set prefix_cache=false or raise max_cache_gib"
            )


SELECTORS.add("blockpruner", BlockPrunerSelector)
register_method(
    "blockpruner",
    "blockpruner",
    "none",
    "BlockPruner: greedy removal of attention/MLP sub-blocks by calibration perplexity (2 units = 1 layer).",
)
