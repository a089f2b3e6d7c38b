"""Decoder-layer surgery: find the layer list, remove layers for good, or hide them for a while.

Removal must leave a model that stock transformers code handles: generation with a KV cache indexes caches by each
attention module's ``layer_idx`` and sizes them from the config's layer count and ``layer_types``, and
``save_pretrained`` → ``from_pretrained`` must rebuild the same architecture. So removal renumbers every
``layer_idx``, shortens every per-layer config list and sets the layer count; nothing custom is left behind. Where
the stack lives and which config fields are per layer comes from :mod:`gradmap.core.adapters`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from gradmap.core.adapters import UnsupportedModelError, adapter, text_config

__all__ = ["UnsupportedModelError", "active_layers", "decoder_layers", "num_layers", "parameter_count", "remove_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, or a one-line error naming the model type and why it is refused."""
    return adapter(model).layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _set_layer_list(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep the layers at current indices ``keep`` (in order); make indices and config agree with the new list."""
    adapt = adapter(model)
    layers = adapt.layers
    fields = adapt.per_layer_fields()
    chosen = [layers[i] for i in keep]
    for new_idx, layer in enumerate(chosen):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    adapt.set_layers(nn.ModuleList(chosen))
    config = text_config(model)
    config.num_hidden_layers = len(chosen)
    for key, values in fields.items():
        setattr(config, key, [values[i] for i in keep])


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
    _set_layer_list(model, [i for i in range(len(layers)) if i not in drop])
    return model


@contextmanager
def active_layers(model: nn.Module, alive: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the layers ``alive`` (current indices, in order).

    Used by iterative selectors and repairs to evaluate a pruned model without copying weights. Indices and the
    config are restored on exit, also on error.
    """
    adapt = adapter(model)
    layers = adapt.layers
    config = text_config(model)
    saved_fields = adapt.per_layer_fields()
    saved_n = config.num_hidden_layers
    saved_idx = {m: m.layer_idx for m in layers.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    try:
        _set_layer_list(model, list(alive))
        yield
    finally:
        adapt.set_layers(layers)
        config.num_hidden_layers = saved_n
        for key, values in saved_fields.items():
            setattr(config, key, values)
        for module, idx in saved_idx.items():
            module.layer_idx = idx


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
