"""Forward hooks that read hidden states out of a model run, and stop the run early when nothing later is needed.

HF's ``output_hidden_states[-1]`` is taken *after* the final norm, which is not what layer-similarity methods
compare; hooks on the decoder layers give the residual stream itself (pre-final-norm), at no extra cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every wanted tensor is captured."""


def first_tensor(value) -> torch.Tensor:
    """The hidden states in a decoder layer's output, whether it returns a tensor or a tuple (transformers 4.x)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a hidden-state tensor in {type(value).__name__}")


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture(
    modules: Mapping[str, nn.Module], what: str = "output", stop_at: nn.Module | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the input or output hidden state of each named module; raise StopForward after ``stop_at``.

    Use with :func:`forward_quietly`, which swallows StopForward. The dict is filled as the forward runs.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args, kwargs, output):
            captured[name] = _hidden_input(args, kwargs) if what == "input" else first_tensor(output)
            if mod is stop_at and all(k in captured for k in modules):
                raise StopForward

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make_hook(name, module), with_kwargs=True))
    if stop_at is not None and all(m is not stop_at for m in modules.values()):

        def stop_hook(mod, args, kwargs, output):
            raise StopForward

        handles.append(stop_at.register_forward_hook(stop_hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_quietly(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> object | None:
    """Run ``model(input_ids)`` without a cache; return None if a hook stopped it early."""
    try:
        return model(input_ids=input_ids, use_cache=False, **kwargs)
    except StopForward:
        return None


def layer_inputs_and_final(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream h_0..h_L of one forward: the input of each decoder layer plus the last layer's output.

    ``result[l]`` is the input of layer ``l`` and ``result[L]`` the pre-final-norm output; no logits are computed.
    """
    from gradmap.core.adapters import adapter

    adapt = adapter(model)
    layers = adapt.layers
    named = {str(i): layer for i, layer in enumerate(layers)}
    with capture(named, "input") as inputs, capture({"last": layers[-1]}, "output", stop_at=layers[-1]) as last:
        forward_quietly(adapt.body, input_ids)
    return [inputs[str(i)] for i in range(len(layers))] + [last["last"]]
