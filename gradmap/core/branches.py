"""Sub-layer surgery: remove one residual branch (attention or MLP) of a decoder layer, exactly.

A pre-norm block computes h + attn(norm1(h)) and then h + mlp(norm2(h)); replacing a branch by a module that
returns zeros leaves exactly the residual, so removing a branch is exact. The branch's weights and its norm are
dropped (the parameter count is that of the smaller model) and what is left costs one elementwise add.

Stock transformers configs have no per-layer "this layer has no attention/MLP", so a model with half-removed
layers cannot be written by ``save_pretrained`` and rebuilt by ``from_pretrained`` without custom code:
:func:`refuse_save` makes ``save_pretrained`` raise one line saying so instead of writing a checkpoint that would
reload as a different model (a layer whose two branches are both removed is deleted outright and saves fine).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from gradmap.core.layers import decoder_layers

BRANCHES = ("attn", "mlp")
# (branch module, the norm that feeds it) in a Llama-layout decoder layer
_PARTS = {"attn": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}


class RemovedAttention(nn.Module):
    """Stands in for a removed attention branch: adds nothing to the residual, touches no KV cache."""

    removed_branch = "attn"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """Stands in for a removed MLP branch."""

    removed_branch = "mlp"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def removed_branches(layer: nn.Module) -> set[str]:
    """Which branches of ``layer`` are already removed."""
    return {b for b in BRANCHES if isinstance(getattr(layer, _PARTS[b][0]), (RemovedAttention, RemovedMLP))}


def _swap(layer: nn.Module, branch: str) -> tuple[nn.Module, nn.Module]:
    """Install the zero module for ``branch`` and return the (branch, norm) modules it replaced."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; allowed: {', '.join(BRANCHES)}")
    name, norm = _PARTS[branch]
    old = getattr(layer, name), getattr(layer, norm)
    setattr(layer, name, RemovedAttention() if branch == "attn" else RemovedMLP())
    setattr(layer, norm, nn.Identity())
    return old


@contextmanager
def branches_off(model: nn.Module, units: Mapping[int, set[str]]) -> Iterator[None]:
    """Temporarily remove branches (``{layer index: {"attn", "mlp"}}``, current indices); restored on exit."""
    layers = decoder_layers(model)
    saved: list[tuple[nn.Module, str, tuple[nn.Module, nn.Module]]] = []
    try:
        for index, branches in units.items():
            for branch in sorted(branches):
                saved.append((layers[index], branch, _swap(layers[index], branch)))
        yield
    finally:
        for layer, branch, (module, norm) in reversed(saved):
            name, norm_name = _PARTS[branch]
            setattr(layer, name, module)
            setattr(layer, norm_name, norm)


def remove_branches(model: nn.Module, partial: Mapping[int, str]) -> None:
    """Remove one branch for good in each given layer (current indices) and make the model refuse to be saved."""
    layers = decoder_layers(model)
    for index, branch in partial.items():
        if branch in removed_branches(layers[index]):
            raise ValueError(f"layer {index}: its {branch} branch is already removed")
        _swap(layers[index], branch)
    if partial:
        refuse_save(
            model,
            f"this model has layers with one branch removed ({dict(sorted(partial.items()))}); stock transformers "
            "configs cannot describe that, so save_pretrained would not reload it; keep it in memory or prune whole "
            "layers",
        )


def renumber_attention(model: nn.Module) -> None:
    """Give the surviving attention modules consecutive cache indices 0..k-1.

    Generation sizes positions from the cache of index 0; if the first layer's attention is gone, index 0 must be
    the first attention that still writes to the cache. Models whose layers have different attention types
    (``config.layer_types``) would then read the wrong type, so they are refused with one line.
    """
    types = set(getattr(model.config, "layer_types", None) or [])
    attention = [layer.self_attn for layer in decoder_layers(model) if "attn" not in removed_branches(layer)]
    if len(types) > 1 and len(attention) < len(decoder_layers(model)):
        raise ValueError(
            f"removing attention branches from a model with mixed layer_types {sorted(types)} is not supported"
        )
    for new_idx, attn in enumerate(attention):
        if isinstance(getattr(attn, "layer_idx", None), int):
            attn.layer_idx = new_idx


def refuse_save(model: nn.Module, reason: str) -> None:
    """Make ``model.save_pretrained`` raise ``ValueError(reason)`` (one line) instead of writing a checkpoint."""

    def save_pretrained(*args, **kwargs):
        raise ValueError(f"save_pretrained refused: {reason}")

    model.save_pretrained = save_pretrained  # instance attribute shadows the class method
