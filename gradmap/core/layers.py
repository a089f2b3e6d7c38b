"""Decoder-layer surgery: find the layer list, remove layers for good, or hide them for a while.

Removal must leave a model that stock transformers code handles: generation with a KV cache indexes caches by
``self_attn.layer_idx`` and sizes them from ``config.num_hidden_layers``/``config.layer_types``, and
``save_pretrained`` → ``from_pretrained`` must rebuild the same architecture. So removal renumbers every
``layer_idx`` and rewrites the config; nothing custom is left behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

# Families whose decoder layers live at ``model.model.layers`` with the Llama block layout
# (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms) that every method here relies on.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The model has no decoder-layer list this suite knows how to prune."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, or a one-line error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if model_type not in SUPPORTED_FAMILIES or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) has no decoder-layer list this suite supports; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)} (decoder-only causal LMs with model.model.layers)."
        )
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _set_layer_list(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Install ``layers`` as the decoder list and make indices and config agree with it."""
    config = model.config
    old_types = list(getattr(config, "layer_types", None) or [])
    new_types = []
    for new_idx, layer in enumerate(layers):
        old_idx = _layer_index(layer)
        if old_types and old_idx is not None and old_idx < len(old_types):
            new_types.append(old_types[old_idx])
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    model.model.layers = nn.ModuleList(layers)
    config.num_hidden_layers = len(layers)
    if old_types:
        config.layer_types = new_types


def _layer_index(layer: nn.Module) -> int | None:
    attn = getattr(layer, "self_attn", None)
    idx = getattr(attn, "layer_idx", None)
    return idx if isinstance(idx, int) else None


def remove_layers(model: nn.Module, removed: Iterable[int]) -> nn.Module:
    """Delete the decoder layers at the given (current) indices in place and return the model.

    Parameters of removed layers are dropped with the layers, so the parameter count is exactly that of the
    same model built with fewer layers.
    """
    layers = decoder_layers(model)
    drop = set(removed)
    bad = sorted(i for i in drop if not 0 <= i < len(layers))
    if bad:
        raise ValueError(f"layer indices {bad} out of range; the model has layers 0..{len(layers) - 1}")
    if len(drop) >= len(layers):
        raise ValueError(f"cannot remove all {len(layers)} layers")
    keep = [layer for i, layer in enumerate(layers) if i not in drop]
    _set_layer_list(model, keep)
    return model


@contextmanager
def active_layers(model: nn.Module, alive: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the layers ``alive`` (original indices, in order).

    Used by iterative selectors and repairs to evaluate a pruned model without copying weights. Indices and the
    config are restored on exit, also on error.
    """
    layers = decoder_layers(model)
    config = model.config
    saved_types = getattr(config, "layer_types", None)
    saved_n = config.num_hidden_layers
    saved_idx = {m: m.layer_idx for m in model.model.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    try:
        _set_layer_list(model, [layers[i] for i in alive])
        yield
    finally:
        model.model.layers = layers
        config.num_hidden_layers = saved_n
        if saved_types is not None:
            config.layer_types = saved_types
        for module, idx in saved_idx.items():
            module.layer_idx = idx


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
