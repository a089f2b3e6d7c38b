"""Helpers shared by several baseline selectors and missing from the core.

- :func:`stream_statistic` runs one forward pass over the calibration set and averages a per-token statistic of
  pairs of residual-stream states (ShortGPT, angular distance, LLM-Streamline all need exactly this).
- :class:`WindowSelector` turns such a statistic into a contiguous-block selector (angular, Streamline).
- :func:`leave_one_out_nll` scores each candidate by the calibration NLL with that layer switched off (PPL, SLEB).
- :func:`accumulate_loss_gradients` is the forward+backward loop over micro-batches whose accumulated gradient is
  the gradient of the mean loss over D (Taylor).
- :func:`contiguous_cut` validates and describes a contiguous removed set (``layer_replace``).

Counters: ``forward_passes``/``backward_passes`` in a selection's ``info`` count model calls (one per
micro-batch), as GradMAP stage 1 does; ``calib_passes`` counts full passes over the calibration set D, the unit
(C_F) of the cost formulas in docs/protocol.md and docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradmap.core.calib import microbatches
from gradmap.core.capture import layer_inputs_and_final
from gradmap.core.components import (
    NonFiniteError,
    Selection,
    Selector,
    calibration_nll,
    check_finite,
    model_device,
    pick_lowest,
    warn_if_edge,
)
from gradmap.core.layers import active_layers, decoder_layers
from gradmap.core.onload import OnloadLog, layerwise_states

PairStatistic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) along the hidden dimension for every token, computed in fp32 (bf16 dot products drift)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b))/π per token, in [0, 1]; the cosine is clamped so rounding cannot produce NaN."""
    return torch.arccos(token_cosine(a, b).clamp(-1.0, 1.0)) / math.pi


def stream_statistic(
    model: nn.Module,
    calib_ids: torch.Tensor,
    micro_batch_size: int,
    pairs: dict[int, tuple[int, int]],
    statistic: PairStatistic,
    desc: str,
    onload: torch.device | None = None,
) -> tuple[dict[int, float], int, dict[str, Any]]:
    """Mean of ``statistic(h_a, h_b)`` over all values it returns, for each ``key: (a, b)``, over D.

    h_0..h_L is the pre-final-norm residual stream (``h_l`` = input of layer l, ``h_L`` = output of the last
    layer), read with hooks in one forward per micro-batch that stops before the final norm and lm_head; with
    ``onload`` (a device) it is computed layer by layer instead (:mod:`gradmap.core.onload`), each layer's weights
    on that device only while it runs. Sums are kept in fp64 and added per key in micro-batch order either way, so
    the mean depends neither on the micro-batch size nor on the path. Returns the means, the number of forward
    calls (micro-batches) and what onloading did (empty without it).
    """
    if onload is not None:
        return _layerwise_statistic(model, calib_ids, micro_batch_size, pairs, statistic, onload)
    batches = microbatches(calib_ids, micro_batch_size)
    device = model_device(model)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = dict.fromkeys(pairs, 0)
    with torch.inference_mode():
        for mb in tqdm(batches, desc=desc, unit="batch", leave=False):
            states = layer_inputs_and_final(model, mb.to(device))
            for key, (a, b) in pairs.items():
                values = statistic(states[a], states[b].to(states[a].device)).double()
                sums[key] = sums[key] + values.sum() if key in sums else values.sum()
                counts[key] += values.numel()
    return {key: float(sums[key]) / counts[key] for key in pairs}, len(batches), {}


def _layerwise_statistic(
    model: nn.Module,
    calib_ids: torch.Tensor,
    micro_batch_size: int,
    pairs: dict[int, tuple[int, int]],
    statistic: PairStatistic,
    device: torch.device,
) -> tuple[dict[int, float], int, dict[str, Any]]:
    """:func:`stream_statistic` from :func:`layerwise_states`: each key is reduced when h_b appears; an h_a needed
    after its layer has passed (windows wider than one layer) waits on the CPU, not on the device."""
    if any(not 0 <= a < b for a, b in pairs.values()):
        raise ValueError(f"layerwise statistics need pairs (a, b) with 0 <= a < b, got {sorted(pairs.values())}")
    log = OnloadLog()
    last_use: dict[int, int] = {}
    for a, b in pairs.values():
        last_use[a] = max(last_use.get(a, 0), b)
    stash: dict[int, list[torch.Tensor]] = {}
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = dict.fromkeys(pairs, 0)
    stream = layerwise_states(model, calib_ids, micro_batch_size, device, log)
    for index, inputs, outputs in tqdm(stream, desc="layerwise", unit="layer", leave=False):
        if last_use.get(index, 0) > index + 1:
            stash[index] = [h.to("cpu") for h in inputs]
        for key, (a, b) in pairs.items():
            if b != index + 1:
                continue
            before = inputs if a == index else stash[a]
            with torch.inference_mode():
                for h_a, h_b in zip(before, outputs):
                    h_a = h_a.to(h_b.device)
                    values = statistic(h_a, h_b.to(h_a.device)).double()
                    sums[key] = sums[key] + values.sum() if key in sums else values.sum()
                    counts[key] += values.numel()
        for a in [a for a in stash if last_use[a] <= index + 1]:
            del stash[a]
    return {key: float(sums[key]) / counts[key] for key in pairs}, log.micro_batches, log.info()


@dataclass
class WindowSelector(Selector):
    """Removes one contiguous block, chosen by comparing the stream before and after each candidate window.

    A window starting at ``s`` compares h_s with h_{s+span(n)} and removes ``cut(s, n)``; only windows whose
    removed layers are all unprotected compete. Scores are recorded for every window start (the report plots
    them) and the best valid one (``order``: min or max) wins, ties to the lower start. One forward over D.
    """

    order: ClassVar[str] = "min"
    score_name: ClassVar[str] = ""
    needs_whole_model: ClassVar[str | None] = None  # h_s in, h_s+span out: onload=layerwise works

    def span(self, n_remove: int) -> int:
        raise NotImplementedError

    def cut(self, start: int, n_remove: int) -> list[int]:
        raise NotImplementedError

    def statistic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        width = self.span(n_remove)
        starts = list(range(n_layers - width + 1))
        protected = self.protected(n_layers)
        valid = [s for s in starts if not protected.intersection(self.cut(s, n_remove))]
        if not valid:
            raise ValueError(
                f"selector {self.name!r}: no contiguous block of {n_remove} layers avoids the protected layers "
                f"{sorted(protected)} in a {n_layers}-layer model"
            )
        scores, calls, onloaded = stream_statistic(
            model,
            calib_ids,
            self.micro_batch_size,
            {s: (s, s + width) for s in starts},
            self.statistic,
            self.name,
            self.onload_to(model),
        )
        check_finite(scores, f"{self.name} {self.score_name} of the window starting at", model.dtype)
        best = pick_lowest({s: scores[s] for s in valid}, 1, self.order)[0]
        removed = self.cut(best, n_remove)
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed,
            scores=[scores],
            info=info_counts(
                calls,
                calib_passes=1,
                block_start=best,
                span=width,
                score=self.score_name,
                scores_keyed_by="window start",
                select=self.order,
                **onloaded,
            ),
        )


def leave_one_out_nll(
    model: nn.Module,
    calib_ids: torch.Tensor,
    micro_batch_size: int,
    alive: Sequence[int],
    candidates: Sequence[int],
    desc: str,
) -> tuple[dict[int, float], int]:
    """Calibration NLL of the model with layers ``alive`` minus one candidate, for each candidate.

    Uses :func:`active_layers`, so no weights are copied. Returns the NLLs and the number of forward calls
    (candidates × micro-batches).
    """
    calls_per_pass = len(microbatches(calib_ids, micro_batch_size))
    nll: dict[int, float] = {}
    for layer in tqdm(candidates, desc=desc, unit="layer", leave=False):
        with active_layers(model, [i for i in alive if i != layer]):
            nll[layer] = calibration_nll(model, calib_ids, micro_batch_size)
    check_finite(nll, f"{desc}: calibration NLL without layer", model.dtype)
    return nll, calls_per_pass * len(candidates)


def accumulate_loss_gradients(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    before_backward: Callable[[int], None] | None = None,
    desc: str = "backward",
) -> float:
    """Forward+backward every micro-batch; the accumulated gradient is that of the mean loss over D.

    Each micro-batch loss is weighted by its share of the windows (all windows have the same length, so this is
    the token mean). ``before_backward(i)`` runs before micro-batch i's backward (e.g. to tell a gradient
    scorer which micro-batch is the last). Raises NonFiniteError on a NaN/inf loss. Returns the mean loss.
    """
    device = model_device(model)
    rows = sum(mb.shape[0] for mb in batches)
    total = 0.0
    for i, mb in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        mb = mb.to(device)
        loss = model(input_ids=mb, labels=mb, use_cache=False).loss * (mb.shape[0] / rows)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"calibration loss is {float(loss)} at micro-batch {i} "
                f"(dtype {str(model.dtype).removeprefix('torch.')}; try dtype=float32 or bfloat16)"
            )
        if before_backward is not None:
            before_backward(i)
        loss.backward()
        total += float(loss.detach())
    return total


def contiguous_cut(removed: Sequence[int], n_layers: int, who: str) -> tuple[int, int]:
    """(first, last) of a contiguous removed set, or a one-line ValueError saying why it is not one."""
    cut = sorted(set(removed))
    if not cut:
        raise ValueError(f"{who}: nothing was removed")
    if cut != list(range(cut[0], cut[-1] + 1)):
        raise ValueError(
            f"{who} needs a contiguous removed set, got {cut}; use a block selector "
            "(streamline, angular, last_n) or another repair"
        )
    if cut[0] < 0 or cut[-1] >= n_layers:
        raise ValueError(f"{who}: removed layers {cut} out of range 0..{n_layers - 1}")
    return cut[0], cut[-1]


def info_counts(forward: int, backward: int = 0, calib_passes: float = 0, **extra: Any) -> dict[str, Any]:
    """The counters every selection reports (see the module docstring for their units)."""
    return {"forward_passes": forward, "backward_passes": backward, "calib_passes": calib_passes, **extra}
