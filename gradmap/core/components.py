"""The two kinds of pruning component: a *selector* picks layers, a *repair* fixes the model after the cut.

A method is a selector plus an optional repair (``gradmap`` = gradient selector + projection repair), and any
selector combines with any repair. Components are dataclasses whose fields are their options, so the option
names, defaults and types are written once, checked on construction, and listed in error messages.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gradmap.core.registry import Registry


class NonFiniteError(FloatingPointError):
    """A score or loss became NaN/inf: stop the job and name where it happened."""


def _load_plugins() -> None:
    """Import every module that registers components (GradMAP's own, then the baselines package)."""
    import gradmap.core.stage1
    import gradmap.core.stage2  # noqa: F401

    try:
        import baselines  # noqa: F401
    except ModuleNotFoundError as err:  # a user who vendored only gradmap/ still gets GradMAP
        if err.name != "baselines":
            raise


SELECTORS: Registry[type[Selector]] = Registry("selector", _load_plugins)
REPAIRS: Registry[type[Repair]] = Registry("repair", _load_plugins)


@dataclass
class Selection:
    """What a selector decided: layers in removal order (original indices) and the scores behind each decision.

    ``scores[k]`` maps each candidate layer (original index) to its score at decision ``k``; one-shot selectors
    have a single entry. ``info`` holds counters (forward/backward passes) and diagnostics such as the
    calibration loss at each step.
    """

    removed: list[int]
    scores: list[dict[int, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # Sub-layer selectors (BlockPruner): layers that lose one branch only, {original index: "attn" | "mlp"}.
    # A layer that loses both branches is in ``removed``; n_remove counts layers' worth (2 branches = 1 layer).
    partial: dict[int, str] = field(default_factory=dict)


class Component:
    """Shared option handling for selectors and repairs."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, **options: Any):
        """Build from user options; an unknown option is a one-line error listing the allowed ones."""
        allowed = cls.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.kind} {cls.name!r}; allowed: {', '.join(allowed)}")
        return cls(**options)

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names()}

    def check_choice(self, option: str, allowed: Sequence[Any]) -> None:
        value = getattr(self, option)
        if value not in allowed:
            raise ValueError(
                f"{self.kind} {self.name!r}: {option}={value!r} is not allowed; choose one of {list(allowed)}"
            )


@dataclass
class Selector(Component):
    """Base of every layer selector. Subclasses are dataclasses adding their own options.

    ``onload="layerwise"`` scores one decoder layer at a time, that layer's weights alone on ``onload_device``
    (:mod:`gradmap.core.onload`), for models that do not fit it. Only selectors whose score needs nothing but each
    layer's input and output hidden states can (``needs_whole_model = None``); the others say what they need.
    """

    kind: ClassVar[str] = "selector"
    # What the score needs all at once, for the one-line refusal of onload=layerwise; None: layer by layer works.
    needs_whole_model: ClassVar[str | None] = "forward passes of the whole model"
    protect_first: int = 0
    protect_last: int = 0
    micro_batch_size: int = 1
    seed: int = 0
    onload: str = "none"  # none | layerwise (forward-only selectors: one layer's weights on the device at a time)
    onload_device: str | None = None  # where layerwise scoring computes; null: auto (gradmap.core.onload)

    @classmethod
    def from_options(cls, **options: Any):
        """As :meth:`Component.from_options`, plus the onload check (a selector that needs the whole model refuses)."""
        selector = super().from_options(**options)
        selector.check_choice("onload", ["none", "layerwise"])
        if selector.onload_device not in (None, "auto"):
            try:
                torch.device(selector.onload_device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"selector {cls.name!r}: onload_device={selector.onload_device!r} is not a device; "
                    "allowed: null (auto), cpu, cuda, cuda:N"
                ) from None
        if selector.onload != "none" and cls.needs_whole_model is not None:
            able = [n for n in SELECTORS.names() if SELECTORS.get(n).needs_whole_model is None]
            raise ValueError(
                f"selector {cls.name!r} cannot use onload={selector.onload!r}: it needs {cls.needs_whole_model}; "
                f"layer-by-layer onloading supports {', '.join(able)}"
            )
        return selector

    def onload_to(self, model: nn.Module) -> torch.device | None:
        """The device layerwise scoring computes on, or None when the selector runs the normal full forward."""
        if self.onload == "none":
            return None
        from gradmap.core.onload import onload_device

        return onload_device(model, self.onload_device)

    def compute_device(self, model: nn.Module) -> torch.device:
        """Where selection computes (timed, peak memory read): the onload device, or where input ids go."""
        return self.onload_to(model) or model_device(model)

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        raise NotImplementedError

    def protected(self, n_layers: int) -> set[int]:
        """Original indices that may never be removed."""
        return set(range(min(self.protect_first, n_layers))) | set(
            range(max(n_layers - self.protect_last, 0), n_layers)
        )

    def candidates(self, alive: Sequence[int], n_layers: int) -> list[int]:
        protected = self.protected(n_layers)
        return [layer for layer in alive if layer not in protected]


def pick_lowest(scores: dict[int, float], k: int, order: str = "min") -> list[int]:
    """The ``k`` layers with the lowest (``order='min'``) or highest score; ties go to the lower index."""
    sign = 1.0 if order == "min" else -1.0
    return [layer for layer, _ in sorted(scores.items(), key=lambda kv: (sign * kv[1], kv[0]))[:k]]


def check_finite(scores: dict[int, float], what: str, dtype: torch.dtype | None = None) -> None:
    """Raise NonFiniteError naming the first layer whose score is NaN/inf, with a dtype hint."""
    for layer, value in scores.items():
        if not torch.isfinite(torch.tensor(value)):
            hint = f" (model dtype {str(dtype).removeprefix('torch.')}; try dtype=float32 or bfloat16)" if dtype else ""
            raise NonFiniteError(f"{what} of layer {layer} is {value}{hint}")


def warn_if_edge(removed: Sequence[int], n_layers: int, method: str) -> None:
    """Removing the first or last layer is usually catastrophic on Llama; say so, do not silently protect."""
    edges = sorted({0, n_layers - 1} & set(removed))
    if edges:
        warnings.warn(
            f"{method} removed edge layer(s) {edges}; this is often catastrophic on Llama-family models "
            "(set protect_first/protect_last to forbid it)",
            stacklevel=2,
        )


@dataclass
class Repair(Component):
    """Base of every repair. ``apply`` sees the dense model (all layers present) and the set to remove.

    It may change weights of surviving layers (merged, no new modules); the caller deletes the removed layers
    afterwards. ``diagnostics`` runs outside the timed span. A repair that carries out its selector's own plan
    (MKA's and LaCo's merges) names that selector in ``requires_selector`` and reads the plan in ``prepare``;
    ``prune()`` refuses any other pairing with one line. ``handles_partial``: it can follow a selector that
    removes single branches (BlockPruner).
    """

    kind: ClassVar[str] = "repair"
    requires_selector: ClassVar[str | None] = None
    handles_partial: ClassVar[bool] = False
    micro_batch_size: int = 1

    def prepare(self, selection: Selection) -> None:
        """Called by ``prune()`` before ``apply`` with what the selector decided; most repairs need only ``removed``."""

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        raise NotImplementedError

    def diagnostics(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        return {}


@dataclass
class NoRepair(Repair):
    """Remove the layers and leave every remaining weight as it is."""

    name: ClassVar[str] = "none"
    handles_partial: ClassVar[bool] = True

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        return {}


REPAIRS.add("none", NoRepair)


def model_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device, or its execution device under accelerate hooks (a
    ``device_map``, or ``cpu_offload``, which sets no map and leaves every weight on meta)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    if embed is None or getattr(model, "hf_device_map", None) is None:
        return next(model.parameters()).device
    return embed.weight.device


@torch.inference_mode()
def calibration_nll(model: nn.Module, calib_ids: torch.Tensor, micro_batch_size: int = 1) -> float:
    """Mean next-token NLL of the model over the calibration windows (a cheap, shared diagnostic)."""
    device = model_device(model)
    total, rows = 0.0, calib_ids.shape[0]
    for mb in torch.split(calib_ids, micro_batch_size):
        mb = mb.to(device)
        total += float(model(input_ids=mb, labels=mb, use_cache=False).loss) * mb.shape[0]
    return total / rows


@dataclass(frozen=True)
class MethodPreset:
    """A named method: which selector, which default repair, and option presets for each.

    ``method=<name>`` in a run picks a preset; ``repair=`` and user options override its defaults.
    """

    name: str
    selector: str | None  # None: the dense reference, nothing is removed
    repair: str = "none"
    selector_options: dict[str, Any] = field(default_factory=dict)
    repair_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def options_for(self, repair_name: str) -> dict[str, Any]:
        """The preset's repair options apply to its own repair only: with ``repair=`` swapped for another one, they
        would be unknown keys there (gradmap_tok's ``lambda_rel`` under ``repair=none``)."""
        return dict(self.repair_options) if repair_name == self.repair else {}


METHODS: Registry[MethodPreset] = Registry("method", _load_plugins)


def register_method(name: str, selector: str | None, repair: str = "none", description: str = "", **kw) -> None:
    """Register a method preset (``selector_options=``/``repair_options=`` may be passed as keywords)."""
    METHODS.add(name, MethodPreset(name, selector, repair, description=description, **kw))


register_method("none", None, "none", "Dense reference: nothing removed, nothing repaired.")
