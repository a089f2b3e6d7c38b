"""``prune()``: the one entry point that notebooks, the Hydra runner and the benchmark all call.

It resolves the method preset, turns a ratio into a layer count, times selection and repair apart (the timed
span is exactly select + repair, with surgery counted in repair), deletes the layers, and returns everything a
results table needs. Loading, calibration and evaluation are outside, by design.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from gradmap.core.branches import remove_branches, renumber_attention
from gradmap.core.components import METHODS, REPAIRS, SELECTORS, Repair, Selection, model_device
from gradmap.core.layers import decoder_layers, parameter_count, remove_layers
from gradmap.core.timing import device_name, peak_memory_kind, timed


@dataclass
class PruneResult:
    """The pruned model and the facts about how it was pruned (original layer indices throughout)."""

    model: nn.Module
    method: str
    selector: str | None
    repair: str
    n_layers: int
    n_remove: int
    removed_layers: list[int]
    scores: list[dict[int, float]]
    timings: dict[str, Any]
    selector_options: dict[str, Any] = field(default_factory=dict)
    repair_options: dict[str, Any] = field(default_factory=dict)
    selector_info: dict[str, Any] = field(default_factory=dict)
    repair_info: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    partial_layers: dict[int, str] = field(default_factory=dict)  # layers that lost one branch (BlockPruner)
    removed_units: int = 0  # branches removed: 2 per removed layer + 1 per partial layer (= 2 * n_remove)


def resolve_n_remove(n_layers: int, ratio: float | None = None, n_remove: int | None = None, protected: int = 0) -> int:
    """Layers to remove: ``n_remove`` if given, else ⌊ratio·L + ½⌋ (half-up, exact via Fraction).

    Python's round() sends 0.375·28 = 10.5 to 10 (banker's rounding); papers round half up, to 11.
    """
    if ratio is not None and n_remove is not None:
        raise ValueError(f"give prune.ratio or prune.n_remove, not both (got ratio={ratio}, n_remove={n_remove})")
    if n_remove is None:
        if ratio is None:
            raise ValueError("give prune.ratio (0 < ratio < 1) or prune.n_remove (a layer count)")
        if not 0 < float(ratio) < 1:
            raise ValueError(f"prune.ratio={ratio} is out of range; allowed: 0 < ratio < 1")
        n_remove = int(Fraction(str(ratio)) * n_layers + Fraction(1, 2))
        if n_remove < 1:
            raise ValueError(
                f"prune.ratio={ratio} of {n_layers} layers rounds to 0 layers; "
                f"use ratio >= {float(Fraction(1, 2) / n_layers):.4g} or prune.n_remove"
            )
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) or n_remove < 1:
        raise ValueError(f"prune.n_remove={n_remove!r} must be a whole number >= 1")
    removable = n_layers - protected
    if n_remove >= n_layers or n_remove > removable:
        raise ValueError(
            f"prune.n_remove={n_remove} is too large: the model has {n_layers} layers, {protected} protected; "
            f"allowed: 1..{min(removable, n_layers - 1)}"
        )
    return n_remove


@torch.inference_mode()
def _warm_up(model: nn.Module, calib_ids: torch.Tensor) -> None:
    """One untimed forward so CUDA kernels, allocator and caches are ready before the clock starts."""
    model(input_ids=calib_ids[:1].to(model_device(model)), use_cache=False)


def _select_and_repair(
    model: nn.Module,
    calib_ids: torch.Tensor,
    n_remove: int,
    selector: Any,
    repair_obj: Any,
    selector_name: str,
    repair_cls: Any,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """One timed pruning span (selection, then repair + surgery) on ``model``, in place: (select span, repair
    span, selection, repair info). Both spans are timed on the selector's compute device (the onload device when
    it scores layer by layer)."""
    device = selector.compute_device(model)
    with timed(device) as select_span:
        selection = selector.select(model, calib_ids, n_remove)
    check_selection(selector_name, selection, n_remove, repair_cls)
    with timed(device) as repair_span:
        remove_branches(model, selection.partial)  # exact; the repair sees the model without those branches
        repair_obj.prepare(selection)
        repair_info = repair_obj.apply(model, calib_ids, selection.removed)
        remove_layers(model, selection.removed)
        if selection.partial:
            renumber_attention(model)
    return select_span, repair_span, selection, repair_info


def prune(
    model: nn.Module,
    calib_ids: torch.Tensor,
    method: str = "gradmap",
    n_remove: int | None = None,
    ratio: float | None = None,
    repair: str | None = None,
    *,
    repair_options: dict[str, Any] | None = None,
    warm_up: bool | None = None,
    diagnostics: bool = True,
    repeats: int = 1,
    dev_ids: torch.Tensor | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` and return a :class:`PruneResult`.

    ``options`` go to the selector (e.g. ``protect_first=1``, ``grad_target="layer_output"``), overriding the
    method preset; ``repair`` overrides the method's default repair and ``repair_options`` its options;
    ``micro_batch_size`` is shared by both. ``method="none"`` returns the dense model untouched.

    ``repeats > 1`` times the pruning span that many times: the first ``repeats - 1`` runs prune a deep copy of the
    model (copied outside the clock, so the device needs room for a second copy) and are discarded; the last prunes
    ``model`` itself and gives the result. ``timings`` then holds every repeat's seconds (``*_repeats``, in run
    order), ``prune_s_min``/``prune_s_median`` and whether every repeat removed the same layers; ``prune_s`` stays
    the last run's time. Why: one timing cannot tell a method's cost from a noisy machine.
    ``micro_batch_size`` is shared by both. ``method="none"`` returns the dense model untouched. ``dev_ids``
    (held-out windows, never the calibration ones) go to repairs that choose or check on dev (``projection``).
    """
    preset = METHODS.get(method)
    repair_name = repair or preset.repair
    n_layers = len(decoder_layers(model))
    device = model_device(model)
    params_before = parameter_count(model)
    shared = {k: options[k] for k in ("micro_batch_size",) if k in options}
    repair_cls = REPAIRS.get(repair_name)
    repair_obj = repair_cls.from_options(**{**preset.options_for(repair_name), **shared, **(repair_options or {})})
    if dev_ids is not None and hasattr(repair_obj, "dev_ids"):
        repair_obj.dev_ids = dev_ids

    if preset.selector is None:
        if repair_name != "none":
            raise ValueError(f"method 'none' removes nothing, so repair={repair_name!r} has nothing to repair")
        if n_remove not in (None, 0):
            raise ValueError(f"method 'none' removes nothing; got n_remove={n_remove}")
        return PruneResult(
            model,
            method,
            None,
            "none",
            n_layers,
            0,
            [],
            [],
            {
                "select_s": 0.0,
                "repair_s": 0.0,
                "prune_s": 0.0,
                "peak_mem_bytes": 0,
                "peak_mem_kind": peak_memory_kind(device),
                "device": device_name(device),
            },
            params_before=params_before,
            params_after=params_before,
        )

    selector = SELECTORS.get(preset.selector).from_options(**{**preset.selector_options, **options})
    n_remove = resolve_n_remove(n_layers, ratio, n_remove, protected=len(selector.protected(n_layers)))
    device = selector.compute_device(model)  # onload=layerwise: the onload device, where selection runs
    if warm_up if warm_up is not None else device.type == "cuda":
        if selector.onload == "layerwise":  # a full forward is what onloading avoids: embeddings + first layer
            from gradmap.core.onload import warm_up as warm_up_layerwise

            warm_up_layerwise(model, calib_ids, device)
        else:
            _warm_up(model, calib_ids)

    check_pairing(preset.selector, repair_cls)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"timing.repeats={repeats!r} must be a whole number >= 1")
    spans = []
    extra_removed = []
    for _ in range(repeats - 1):  # extra repeats first, each on a fresh copy made outside the timed span
        work = copy.deepcopy(model)
        sel_span, rep_span, sel, _ = _select_and_repair(
            work, calib_ids, n_remove, selector, repair_obj, preset.selector, repair_cls
        )
        spans.append((sel_span, rep_span))
        extra_removed.append(sorted(sel.removed))
        del work
    select_span, repair_span, selection, repair_info = _select_and_repair(
        model, calib_ids, n_remove, selector, repair_obj, preset.selector, repair_cls
    )
    spans.append((select_span, repair_span))
    if diagnostics:
        repair_info.update(repair_obj.diagnostics(model, calib_ids))

    timings = {
        "select_s": select_span.seconds,
        "repair_s": repair_span.seconds,
        "prune_s": select_span.seconds + repair_span.seconds,
        "peak_mem_bytes": max(select_span.peak_mem_bytes, repair_span.peak_mem_bytes),
        "select_peak_mem_bytes": select_span.peak_mem_bytes,
        "repair_peak_mem_bytes": repair_span.peak_mem_bytes,
        "peak_mem_kind": peak_memory_kind(device),
        "device": device_name(device),
    }
    if repeats > 1:
        totals = [a.seconds + b.seconds for a, b in spans]
        timings.update(
            {
                "repeats": repeats,
                "select_s_repeats": [a.seconds for a, _ in spans],
                "repair_s_repeats": [b.seconds for _, b in spans],
                "prune_s_repeats": totals,
                "prune_s_min": min(totals),
                "prune_s_median": statistics.median(totals),
                "repeats_same_layers": all(r == sorted(selection.removed) for r in extra_removed),
            }
        )
    return PruneResult(
        model=model,
        method=method,
        selector=preset.selector,
        repair=repair_name,
        n_layers=n_layers,
        n_remove=n_remove,
        removed_layers=list(selection.removed),
        scores=selection.scores,
        timings=timings,
        selector_options=selector.options(),
        repair_options=repair_obj.options(),
        selector_info=selection.info,
        repair_info=repair_info,
        params_before=params_before,
        params_after=parameter_count(model),
        partial_layers=dict(selection.partial),
        removed_units=2 * len(selection.removed) + len(selection.partial),
    )


def check_pairing(selector: str, repair_cls: type[Repair]) -> None:
    """A repair that carries out one selector's plan (MKA, LaCo merges) refuses every other selector, in one line."""
    wanted = repair_cls.requires_selector
    if wanted is not None and wanted != selector:
        raise ValueError(
            f"repair {repair_cls.name!r} merges the layers that selector {wanted!r} planned; it cannot follow "
            f"selector {selector!r} (use method={wanted}, or another repair)"
        )


def check_selection(name: str, selection: Selection, n_remove: int, repair_cls: type[Repair]) -> None:
    """The selector removed exactly n_remove layers' worth: whole layers, plus half a layer per partial layer."""
    units = 2 * len(selection.removed) + len(selection.partial)
    overlap = set(selection.removed) & set(selection.partial)
    if len(set(selection.removed)) != len(selection.removed) or overlap or units != 2 * n_remove:
        raise RuntimeError(
            f"selector {name!r} returned layers {selection.removed} and branches {selection.partial}, "
            f"expected {n_remove} layers' worth"
        )
    if selection.partial and not repair_cls.handles_partial:
        raise ValueError(
            f"repair {repair_cls.name!r} cannot act on layers with one branch removed (selector {name!r} removed "
            f"branches {dict(sorted(selection.partial.items()))}); use repair=none"
        )
