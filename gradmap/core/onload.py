"""Layer-sequential forward: score a model that does not fit the device, one decoder layer's weights at a time.

A normal forward needs every layer's weights at once on the compute device (or, under accelerate's offload, brings
every offloaded layer in again for each micro-batch). A selector whose score needs only the hidden states going into
and out of each layer (ShortGPT, angular distance, LLM-Streamline) can instead run the calibration set through the
stack *layer by layer*, the idea of llm-compressor's sequential onloading:

1. one pass of the body with every decoder layer replaced by a recorder (no layer weights touched) gives the input
   of layer 0 (embeddings, scaled as the model does) and, for every layer and micro-batch, the exact arguments the
   normal forward passes it: attention mask (per layer type where masks differ, e.g. sliding windows), rotary
   position embeddings, position ids;
2. then, for each layer in turn, its weights are brought to the compute device once (a CPU-resident layer is
   copied in and its CPU tensors put back afterwards, no copy out; an accelerate cpu/disk-offloaded layer is
   materialised from its offload map once instead of once per micro-batch), every micro-batch's hidden states go
   through it with the recorded arguments, and the weights leave again.

Peak device memory is one layer's weights + two copies of the calibration hidden states (a layer's inputs and
outputs) + one micro-batch of activations, instead of the whole model. The arithmetic per micro-batch is the
normal forward's, so scores match it to floating-point tolerance (bit for bit on the CPU). Models whose forward
changes the hidden states *between* decoder layers are refused, since replaying layers alone would skip that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmap.core.adapters import DecoderAdapter, adapter
from gradmap.core.calib import microbatches
from gradmap.core.capture import StopForward, first_tensor, forward_quietly
from gradmap.core.components import model_device

ONLOAD_MODES = ("none", "layerwise")


@dataclass
class LayerCall:
    """What the body passed a decoder layer besides its hidden states (positional rest and keywords)."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_as_keyword: bool

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_keyword:
            return first_tensor(layer(*self.args, hidden_states=hidden, **self.kwargs))
        return first_tensor(layer(hidden, *self.args, **self.kwargs))


@dataclass
class OnloadLog:
    """What a layerwise pass did, for the selection's info: where it computed and how many bytes it brought in."""

    device: str = ""
    layers: int = 0
    onloaded_bytes: int = 0
    micro_batches: int = 0

    def info(self) -> dict[str, Any]:
        return {"onload": "layerwise", "onload_device": self.device, "onloaded_bytes": self.onloaded_bytes}


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate hooks place the model's modules (a ``device_map``), so they decide where layers run."""
    return getattr(model, "hf_device_map", None) is not None or any(
        getattr(m, "_hf_hook", None) is not None for m in model.modules()
    )


def onload_device(model: nn.Module, name: str | None = None) -> torch.device:
    """Where layerwise scoring computes. ``None``/``auto``: a dispatched model's execution device (its map decides);
    otherwise the model's device if it is a GPU, else ``cuda`` when one is visible, else the CPU."""
    here = model_device(model)
    if is_dispatched(model):
        if name not in (None, "auto") and _indexed(torch.device(name)) != here:
            raise ValueError(
                f"onload_device={name!r}, but the model's device_map executes on {here}; a dispatched model computes "
                "where its map says, so leave onload_device unset (or null)"
            )
        return here
    if name in (None, "auto"):
        if here.type == "cuda":
            return here
        return _indexed(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"onload_device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"onload_device={name!r} requested but CUDA is not available; use cpu or auto")
    return _indexed(device)


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current GPU), so it compares equal to the device tensors report."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _offload_hooks(modules: list[nn.Module]) -> list[tuple[nn.Module, Any]]:
    """(module, accelerate hook) for every hook on these modules that offloads its weights (cpu/disk map)."""
    found = []
    for sub in modules:
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ((hook,) if hook is not None else ()):
            if getattr(h, "offload", False):
                found.append((sub, h))
    return found


def _tensors(modules: list[nn.Module]) -> list[tuple[dict, str, torch.Tensor]]:
    """(the owner's _parameters or _buffers dict, name, tensor) for each distinct tensor the modules own directly."""
    out, seen = [], set()
    for owner in modules:
        for store in (owner._parameters, owner._buffers):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    out.append((store, name, tensor))
    return out


@torch.no_grad()
def _copy_in(modules: list[nn.Module], device: torch.device, log: OnloadLog | None) -> list[tuple]:
    """Copy every tensor not on ``device`` there; return what to put back. Parameters keep their identity (their
    ``.data`` changes), so weights tied to a module outside the moved set stay tied."""
    saved = []
    try:
        for store, name, tensor in _tensors(modules):
            if tensor.device.type == "meta":
                raise ValueError(f"weight {name!r} is on meta (no values) and no offload map can load it")
            if tensor.device == device:
                continue
            if isinstance(tensor, nn.Parameter):
                saved.append((tensor, None, tensor.data))
                tensor.data = tensor.data.to(device)
            else:
                saved.append((store, name, tensor))
                store[name] = tensor.to(device)
            if log is not None:
                log.onloaded_bytes += tensor.numel() * tensor.element_size()
    except BaseException:
        _put_back(saved)
        raise
    return saved


@torch.no_grad()
def _put_back(saved: list[tuple]) -> None:
    for owner, name, original in reversed(saved):
        if name is None:
            owner.data = original
        else:
            owner[name] = original


@contextmanager
def resident(
    module: nn.Module | list[nn.Module], device: torch.device, log: OnloadLog | None = None, plain: bool = True
) -> Iterator[None]:
    """Hold the weights of ``module`` (or of a list of modules, their own tensors only) on ``device`` for the block.

    Weights under an accelerate offload hook (cpu/disk map) are materialised once from the offload map at the hook's
    execution device (its hooks are told not to reload or drop them around each call) and go back to ``meta`` on
    exit. With ``plain``, any other tensor not on ``device`` is copied in and the original put back on exit (no copy
    out: scoring never writes weights); a dispatched model passes ``plain=False``, since its map places the rest.
    """
    modules = list(module.modules()) if isinstance(module, nn.Module) else list(module)
    hooks = _offload_hooks(modules)
    loaded = []
    saved: list[tuple] = []
    try:
        for sub, hook in hooks:
            hook.pre_forward(sub)
            loaded.append((sub, hook))
            hook.offload = False
            if log is not None:
                owned = sub.parameters(recurse=bool(getattr(hook, "place_submodules", False)))
                log.onloaded_bytes += sum(p.numel() * p.element_size() for p in owned)
        if plain:
            hooked = {id(sub) for sub, _ in hooks}
            saved = _copy_in([m for m in modules if id(m) not in hooked], device, log)
        yield
    finally:
        _put_back(saved)
        for sub, hook in reversed(loaded):
            hook.offload = True
            hook.post_forward(sub, None)


def _outside_stack(adapt: DecoderAdapter) -> list[nn.Module]:
    """The body's modules that are not inside the decoder stack (embeddings, rotary embedding, final norm...)."""
    inside = {id(m) for m in adapt.layers.modules()}
    return [m for m in adapt.body.modules() if id(m) not in inside]


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs), False)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), LayerCall((), rest, True)


def record_calls(adapt: DecoderAdapter, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """One body forward with every decoder layer replaced by a recorder: (input of layer 0, each layer's call).

    The recorders return their input, so no layer weight is read; the forward stops after the last layer. Raises a
    one-line ValueError when the body changes the hidden states between two layers (replay would miss that).
    """
    layers = list(adapt.layers)
    calls: list[LayerCall | None] = [None] * len(layers)
    state: dict[str, Any] = {}

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden, call = _split_hidden(args, kwargs)
            if index == 0:
                state["h0"] = hidden
            else:
                before = state["out"]
                same = hidden is before or (
                    hidden.data_ptr() == before.data_ptr() and tuple(hidden.shape) == tuple(before.shape[1:])
                )
                if not same:
                    raise ValueError(
                        f"model type {adapt.model_type!r}: its forward changes the hidden states between decoder "
                        f"layers {index - 1} and {index}, so they cannot be replayed one at a time; use onload=none"
                    )
            calls[index] = call
            if index == len(layers) - 1:
                raise StopForward
            state["out"] = hidden
            return hidden

        return forward

    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)
        forward_quietly(adapt.body, input_ids)
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    if any(call is None for call in calls):
        missing = [i for i, call in enumerate(calls) if call is None]
        raise ValueError(f"model type {adapt.model_type!r}: its forward did not call decoder layers {missing}")
    return state["h0"], calls  # type: ignore[return-value]


def layerwise_states(
    model: nn.Module,
    calib_ids: torch.Tensor,
    micro_batch_size: int,
    device: torch.device,
    log: OnloadLog | None = None,
) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
    """Yield ``(l, h_l, h_{l+1})`` for each decoder layer l, each a list over micro-batches, computing layer by layer.

    ``h_l`` is layer l's input and ``h_{l+1}`` its output (for the last layer the pre-final-norm stream), exactly
    what hooks read in a normal forward. Layer l's weights are on ``device`` only while its outputs are computed;
    nothing is onloaded while the caller holds a yielded pair, and ``h_l`` is dropped once the caller moves on.
    """
    adapt = adapter(model)
    log = log if log is not None else OnloadLog()
    log.device = str(device)
    hooked = is_dispatched(model)
    batches = microbatches(calib_ids, micro_batch_size)
    log.micro_batches = len(batches)
    states: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = []
    with resident(_outside_stack(adapt), device, plain=not hooked), torch.inference_mode():
        for mb in batches:
            h0, per_layer = record_calls(adapt, mb.to(device))
            states.append(h0)
            calls.append(per_layer)
    for index, layer in enumerate(adapt.layers):
        with resident(layer, device, log, plain=not hooked), torch.inference_mode():
            outputs = [calls[m][index].run(layer, h) for m, h in enumerate(states)]
        log.layers += 1
        yield index, states, outputs
        states = outputs
        for per_layer in calls:  # the recorded arguments of this layer are not needed again
            per_layer[index] = None  # type: ignore[call-overload]


def warm_up(model: nn.Module, calib_ids: torch.Tensor, device: torch.device) -> None:
    """Run one window through the embeddings and the first layer, so kernels are ready before a timed span."""
    for _ in layerwise_states(model, calib_ids[:1], 1, device):
        break
