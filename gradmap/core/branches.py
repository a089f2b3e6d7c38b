"""Sub-layer surgery: remove one residual branch (attention or MLP) of a decoder layer, exactly.

A pre-norm block computes h + attn(norm1(h)) and then h + mlp(norm2(h)); replacing a branch (found through the
decoder adapter) by a module that returns zeros leaves exactly the residual, so removing a branch is exact. The
branch's weights are dropped and what is left costs its norm and one elementwise add; the norm stays because
its place differs between layouts (before, after or around the branch), and a norm of zeros is zero. Parallel
blocks (attention and MLP reading one input) and blocks without an MLP module are refused with one line.

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

from gradmap.core.adapters import DecoderAdapter, adapter

BRANCHES = ("attn", "mlp")


class RemovedAttention(nn.Module):
    """Stands in for a removed attention branch: adds nothing to the residual, touches no KV cache.

    It holds an empty placeholder where the branch's output linear was (e.g. ``o_proj``), so that the block still
    has the layout the decoder adapter checks; the placeholder has no parameters and is never called.
    """

    removed_branch = "attn"

    def __init__(self, out_name: str = "") -> None:
        super().__init__()
        if out_name:
            self.add_module(out_name, nn.Identity())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """Stands in for a removed MLP branch (with an empty placeholder named like its output linear)."""

    removed_branch = "mlp"

    def __init__(self, out_name: str = "") -> None:
        super().__init__()
        if out_name:
            self.add_module(out_name, nn.Identity())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def branch_adapter(model: nn.Module) -> DecoderAdapter:
    """The model's adapter, or a one-line error if its blocks have no two sequential, separable branches."""
    adapt = adapter(model)
    if adapt.parallel() or adapt.layout.mlp is None:
        raise ValueError(
            f"model type {adapt.model_type!r}: removing single branches needs sequential attention and MLP modules "
            "(this layout is parallel or has no MLP module); remove whole layers instead"
        )
    return adapt


def _path(adapt: DecoderAdapter, branch: str) -> tuple[str, str]:
    """(parent path, attribute) of a branch module inside a block."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; allowed: {', '.join(BRANCHES)}")
    full = adapt.layout.attn if branch == "attn" else adapt.layout.mlp
    parent, _, attr = full.rpartition(".")
    return parent, attr


def _holder(layer: nn.Module, parent: str) -> nn.Module:
    return layer.get_submodule(parent) if parent else layer


def removed_branches(adapt: DecoderAdapter, layer: nn.Module) -> set[str]:
    """Which branches of ``layer`` are already removed."""
    out = set()
    for branch in BRANCHES:
        parent, attr = _path(adapt, branch)
        if isinstance(getattr(_holder(layer, parent), attr), (RemovedAttention, RemovedMLP)):
            out.add(branch)
    return out


def _swap(adapt: DecoderAdapter, layer: nn.Module, branch: str) -> nn.Module:
    """Install the zero module for ``branch`` and return the module it replaced."""
    parent, attr = _path(adapt, branch)
    holder = _holder(layer, parent)
    old = getattr(holder, attr)
    branch_path = adapt.layout.attn if branch == "attn" else adapt.layout.mlp
    out_path = adapt.layout.attn_out if branch == "attn" else adapt.layout.mlp_out
    out_name = out_path.removeprefix(branch_path + ".")
    stand_in = RemovedAttention if branch == "attn" else RemovedMLP
    setattr(holder, attr, stand_in(out_name if "." not in out_name else ""))
    return old


@contextmanager
def branches_off(model: nn.Module, units: Mapping[int, set[str]]) -> Iterator[None]:
    """Temporarily remove branches (``{layer index: {"attn", "mlp"}}``, current indices); restored on exit."""
    adapt = branch_adapter(model) if units else adapter(model)
    layers = adapt.layers
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for index, branches in units.items():
            for branch in sorted(branches):
                saved.append((layers[index], branch, _swap(adapt, layers[index], branch)))
        yield
    finally:
        for layer, branch, module in reversed(saved):
            parent, attr = _path(adapt, branch)
            setattr(_holder(layer, parent), attr, module)


def remove_branches(model: nn.Module, partial: Mapping[int, str]) -> None:
    """Remove one branch for good in each given layer (current indices) and make the model refuse to be saved."""
    if not partial:
        return
    adapt = branch_adapter(model)
    for index, branch in partial.items():
        if branch in removed_branches(adapt, adapt.layers[index]):
            raise ValueError(f"layer {index}: its {branch} branch is already removed")
        _swap(adapt, adapt.layers[index], branch)
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
    adapt = adapter(model)
    types = set(getattr(model.config, "layer_types", None) or [])
    layers = adapt.layers
    attention = [adapt.attn(layer) for layer in layers if "attn" not in removed_branches(adapt, layer)]
    if len(types) > 1 and len(attention) < len(layers):
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
