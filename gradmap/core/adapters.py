"""Where a decoder-only causal LM keeps what layer pruning touches, found by structure rather than by family name.

Every selector, repair, capture and surgery path asks a :class:`DecoderAdapter` for: the decoder stack (wherever it
lives: ``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers``...), each block's two
residual branches (attention and MLP), the last linear of each branch (where merged repairs act), the norms around
the branches, and the config fields that must follow a removal (the layer count and every per-layer list such as
``layer_types`` or ``no_rope_layers``). Known layouts are small data tables (:data:`LAYOUTS`); any other family is
detected generically (a branch is a child named like attention / MLP, its output linear the last linear in it that
writes the hidden width). What cannot be pruned by deleting blocks fails with one line naming the model type and
why: encoder-decoders, models without a residual stack of repeated blocks, mixture-of-experts and hybrid
state-space blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only residual stack this suite can prune by deleting blocks."""


@dataclass(frozen=True)
class Layout:
    """One family's block layout: attribute paths relative to a decoder block.

    ``mlp`` is None where the MLP linears sit on the block itself (OPT). ``parallel`` names the config flag that
    makes attention and MLP read the same input and add to the residual together (or True/False when fixed).
    ``mlp_post_norm`` is the norm applied to the MLP output before the residual add (Gemma 2/3, OLMo 2), if any.
    """

    attn: str
    mlp: str | None
    attn_out: str
    mlp_out: str
    parallel: str | bool = False
    mlp_post_norm: str | None = None


_LLAMA_LIKE = (
    *("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "granite", "olmo"),
    *("helium", "smollm3", "phi3", "arcee", "ernie4_5", "seed_oss", "hunyuan_v1_dense"),
    *("apertus", "nemotron", "glm", "glm4", "persimmon"),
)
_LLAMA = Layout("self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj")
_POST_NORMED = Layout(
    "self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", mlp_post_norm="post_feedforward_layernorm"
)
LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(_LLAMA_LIKE, _LLAMA),
    **dict.fromkeys(("gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4"), _POST_NORMED),
    "cohere": Layout("self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", parallel=True),
    "cohere2": Layout("self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", parallel=True),
    "stablelm": Layout("self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", parallel="use_parallel_residual"),
    "starcoder2": Layout("self_attn", "mlp", "self_attn.o_proj", "mlp.c_proj"),
    "phi": Layout("self_attn", "mlp", "self_attn.dense", "mlp.fc2", parallel=True),
    "gpt_neox": Layout("attention", "mlp", "attention.dense", "mlp.dense_4h_to_h", parallel="use_parallel_residual"),
    "gpt2": Layout("attn", "mlp", "attn.c_proj", "mlp.c_proj"),
    "gpt_bigcode": Layout("attn", "mlp", "attn.c_proj", "mlp.c_proj"),
    "gptj": Layout("attn", "mlp", "attn.out_proj", "mlp.fc_out", parallel=True),
    "codegen": Layout("attn", "mlp", "attn.out_proj", "mlp.fc_out", parallel=True),
    "falcon": Layout("self_attention", "mlp", "self_attention.dense", "mlp.dense_4h_to_h", parallel="parallel_attn"),
    "bloom": Layout("self_attention", "mlp", "self_attention.dense", "mlp.dense_4h_to_h"),
    **dict.fromkeys(("opt", "xglm", "biogpt"), Layout("self_attn", None, "self_attn.out_proj", "fc2")),
}
# Config keys whose values count experts: > 0 means a mixture-of-experts MLP, which this suite does not prune.
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
_STACK_PATHS = ("layers", "h", "decoder.layers", "blocks")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_HYBRID_HINTS = ("mamba", "mixer", "shortconv", "ssm", "rwkv", "linear_attn")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    node: Any = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D`` (a linear stored transposed)."""
    return isinstance(module, (nn.Linear, Conv1D))


def out_width(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class DecoderAdapter:
    """A decoder-only causal LM's prunable structure (see the module docstring). Build with :func:`adapter`."""

    model_type: str
    body: nn.Module  # the base model: embeddings -> stack -> final norm, no LM head
    parent: nn.Module  # the module holding the stack
    attr: str  # the stack's attribute name on ``parent``
    layout: Layout
    generic: bool  # True when the layout was detected, not read from LAYOUTS

    # -- the stack ----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def set_layers(self, layers: nn.ModuleList) -> None:
        setattr(self.parent, self.attr, layers)

    # -- one block ----------------------------------------------------------------------------------------------
    def attn(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.layout.attn)

    def mlp(self, layer: nn.Module) -> nn.Module | None:
        """The MLP branch as one module, or None where its linears sit on the block itself (OPT)."""
        return None if self.layout.mlp is None else _get(layer, self.layout.mlp)

    def attn_out(self, layer: nn.Module) -> nn.Module:
        """The attention branch's last linear (its output is what the branch adds to the residual stream)."""
        return _get(layer, self.layout.attn_out)

    def mlp_out(self, layer: nn.Module) -> nn.Module:
        """The MLP branch's last linear: where merged repairs (projection, linear) act."""
        return _get(layer, self.layout.mlp_out)

    def linears(self, layer: nn.Module) -> list[nn.Module]:
        """Every linear of the block (attention and MLP projections), in registration order."""
        return [m for m in layer.modules() if is_linear(m)]

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        """The norms around the branches (not those inside attention, e.g. Qwen3's q_norm/k_norm)."""
        branches = [b for b in (self.attn(layer), self.mlp(layer)) if b is not None]
        inner = {id(m) for branch in branches for m in branch.modules()}
        return [m for m in layer.modules() if "norm" in type(m).__name__.lower() and id(m) not in inner]

    def parallel(self) -> bool:
        """Whether attention and MLP read the same input and add to the residual together."""
        flag = self.layout.parallel
        if isinstance(flag, bool):
            return flag
        config = text_config(self.body)
        return bool(getattr(config, flag, False) or getattr(config, "new_decoder_architecture", False))

    # -- config fields that follow a removal --------------------------------------------------------------------
    def per_layer_fields(self) -> dict[str, list]:
        """Config lists with one entry per layer (``layer_types``, ``no_rope_layers``, ...), read fresh."""
        config = text_config(self.body)
        n = len(self.layers)
        out = {}
        for key, value in vars(config).items():
            if isinstance(value, (list, tuple)) and len(value) == n and key not in ("architectures",):
                out[key] = list(value)
        return out


def _refuse(model_type: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"model type {model_type!r} cannot be layer-pruned here: {why}")


def _find_stack(body: nn.Module, n_layers: int | None) -> tuple[nn.Module, str] | None:
    for path in _STACK_PATHS:
        parent_path, _, attr = path.rpartition(".")
        parent = _get(body, parent_path) if parent_path else body
        stack = getattr(parent, attr, None) if parent is not None else None
        if isinstance(stack, nn.ModuleList) and len(stack) and (n_layers is None or len(stack) == n_layers):
            return parent, attr
    for name, module in body.named_modules():  # generic: the first list of repeated blocks of the right length
        right_length = (
            isinstance(module, nn.ModuleList) and len(module) and (n_layers is None or len(module) == n_layers)
        )
        if right_length and name and len({type(m) for m in module}) == 1:
            parent_path, _, attr = name.rpartition(".")
            return (_get(body, parent_path) if parent_path else body), attr
    return None


def _last_linear(branch: nn.Module, hidden: int) -> str | None:
    names = [name for name, m in branch.named_modules() if is_linear(m) and out_width(m) == hidden]
    return names[-1] if names else None


def _detect_layout(layer: nn.Module, hidden: int, model_type: str) -> Layout:
    children = dict(layer.named_children())
    attn = next((n for n in _ATTN_NAMES if n in children), None)
    if attn is None:
        raise _refuse(model_type, f"no attention branch among the block's children {sorted(children)}")
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    mlp = mlp or next((n for n, c in children.items() if type(c).__name__.lower().endswith("mlp")), None)
    attn_out = _last_linear(children[attn], hidden)
    if mlp is not None:
        mlp_last = _last_linear(children[mlp], hidden)
        mlp_out = f"{mlp}.{mlp_last}" if mlp_last else None
    else:  # MLP linears on the block itself: the last direct linear child writing the hidden width
        direct = [n for n, c in children.items() if is_linear(c) and out_width(c) == hidden]
        mlp_out = direct[-1] if direct else None
    if attn_out is None or mlp_out is None:
        raise _refuse(model_type, "cannot find the linear that ends the attention or the MLP branch")
    return Layout(attn, mlp, f"{attn}.{attn_out}", mlp_out)


def adapter(model: nn.Module) -> DecoderAdapter:
    """The :class:`DecoderAdapter` of a decoder-only causal LM, or a one-line :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    if config is None:
        raise _refuse(model_type, f"{type(model).__name__} has no transformers config")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model_type, "it is an encoder-decoder; only decoder-only causal LMs are supported")
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise _refuse(model_type, f"{type(model).__name__} has no language-model head (load it as a causal LM)")
    tconf = text_config(model)
    experts = [k for k in _EXPERT_KEYS if (getattr(tconf, k, 0) or 0) > 0]
    if experts:
        raise _refuse(model_type, f"mixture-of-experts ({experts[0]}={getattr(tconf, experts[0])}) is not supported")
    body = getattr(model, "base_model", model)
    found = _find_stack(body, getattr(tconf, "num_hidden_layers", None))
    if found is None:
        raise _refuse(model_type, "no residual stack of repeated decoder blocks was found")
    parent, attr = found
    layers = getattr(parent, attr)
    kinds = {tuple(n for n, _ in layer.named_children()) for layer in layers}
    if len(kinds) > 1:
        raise _refuse(model_type, "its blocks differ in kind (a hybrid stack); removal needs one block kind")
    names = [n.lower() for n, _ in layers[0].named_modules()] + [type(m).__name__.lower() for m in layers[0].modules()]
    hybrid = next((h for h in _HYBRID_HINTS if any(h in n for n in names)), None)
    if hybrid is not None:
        raise _refuse(model_type, f"its blocks hold a {hybrid!r} mixer (hybrid state-space/convolution) module")
    if any("expert" in n or "moe" in n for n in names):
        raise _refuse(model_type, "its blocks hold mixture-of-experts modules, which are not supported")
    hidden = int(tconf.hidden_size)
    layout = LAYOUTS.get(model_type)
    generic = layout is None
    if layout is None:
        layout = _detect_layout(layers[0], hidden, model_type)
    for path in (layout.attn, layout.attn_out, layout.mlp_out) + ((layout.mlp,) if layout.mlp else ()):
        if _get(layers[0], path) is None:
            raise _refuse(model_type, f"its layout table names {path!r}, which this block does not have")
    return DecoderAdapter(model_type, body, parent, attr, layout, generic)


def residual_gain(adapt: DecoderAdapter, index: int, linear: nn.Module, input_ids: torch.Tensor) -> float | None:
    """c with Δ(block output) = c·Δm when the branch linear's output m moves, or None if the block is not linear in m.

    Measured, not assumed: one short forward to block ``index`` with m as is and one with m scaled by k. Pre-norm
    blocks give c = 1, Granite its ``residual_multiplier``; a norm after the branch (Gemma 2/3, OLMo 2) makes the
    output independent of m's scale, so no merged projection on that linear is the branch output (None).
    k is the power of two at or above 1 + 16x the block output's size over m's: in bf16 the residual add rounds to
    about 2^-8 of the stream, so a plain doubling of an m 17x smaller than the stream (Gemma 3 270M's layers 9-14)
    drowned in rounding and refused a merge that is exact (tests/test_families.py); a power of two keeps k·m exact.
    On Gemma 3 270M in bf16 the gain then reads 1 ± 0.002 at every layer (doubling: 0.94-1.014).
    """
    from gradmap.core.capture import capture, forward_quietly

    block = adapt.layers[index]
    seen: dict[str, torch.Tensor] = {}
    scale = {"k": 1.0}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        seen.setdefault("m", output.detach())
        return output * scale["k"]

    def block_output(k: float) -> torch.Tensor:
        scale["k"] = k
        with torch.inference_mode(), capture({"out": block}, "output", stop_at=block) as got:
            forward_quietly(adapt.body, input_ids)
        return got["out"].double()

    handle = linear.register_forward_hook(hook)
    try:
        base = block_output(1.0)
        m = seen["m"].double().to(base.device)
        ratio = float(torch.linalg.vector_norm(base) / torch.linalg.vector_norm(m).clamp_min(1e-30))
        k = 2.0 ** math.ceil(math.log2(1.0 + 16.0 * max(1.0, ratio)))  # a power of two: k·m is exact in any dtype
        delta = block_output(k) - base
    finally:
        handle.remove()
    step = (k - 1.0) * m
    c = float((delta * step).sum() / (step * step).sum().clamp_min(1e-300))
    err = float(torch.linalg.vector_norm(delta - c * step) / torch.linalg.vector_norm(delta).clamp_min(1e-300))
    tol = 1e-4 if linear.weight.dtype == torch.float32 else 3e-2
    return c if abs(c) > 1e-6 and math.isfinite(err) and err <= tol else None


def merge_output_transform(linear: nn.Module, p: torch.Tensor) -> None:
    """Make the linear's output P·y instead of y (weight and bias), in place: W ← P·W (``Conv1D``: W ← W·Pᵀ)."""
    _check_resident(linear)
    with torch.no_grad():
        w = linear.weight
        p = p.to(w.device)
        new = w.double() @ p.T if isinstance(linear, Conv1D) else p @ w.double()
        w.copy_(new.to(w.dtype))
        if linear.bias is not None:
            linear.bias.copy_((p @ linear.bias.double()).to(linear.bias.dtype))


@dataclass
class MergeTarget:
    """Where a repair's output transform of the MLP branch is merged, exactly, and in which form.

    ``full``: a linear (P·W, any P); ``diagonal``: a post-branch norm's weight (P = diag(s) only, since a norm after
    the branch makes a full P unmergeable), whose weight enters as ``offset + w`` (Gemma: 1 + w; OLMo 2: w).
    """

    module: nn.Module
    gain: float
    form: str
    offset: float = 0.0


def mlp_merge_target(adapt: DecoderAdapter, index: int, probe_ids: torch.Tensor) -> MergeTarget | None:
    """The exact merge target of block ``index``'s MLP branch: its last linear when the block output is linear in
    it, else the norm after the branch (diagonal form) when that is, else None (the caller refuses)."""
    block = adapt.layers[index]
    linear = adapt.mlp_out(block)
    gain = residual_gain(adapt, index, linear, probe_ids)
    if gain is not None:
        return MergeTarget(linear, gain, "full")
    norm = _get(block, adapt.layout.mlp_post_norm) if adapt.layout.mlp_post_norm else None
    if norm is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        return None
    gain = residual_gain(adapt, index, norm, probe_ids)
    return None if gain is None else MergeTarget(norm, gain, "diagonal", _weight_offset(norm))


def _weight_offset(norm: nn.Module) -> float:
    """1.0 when the norm scales by (1 + w) (Gemma), 0.0 when by w: measured with the weight zeroed."""
    w = norm.weight
    x = torch.randn(2, 3, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    saved = w.detach().clone()
    with torch.no_grad():
        w.zero_()
        zero_out = norm(x)
        w.copy_(saved)
    return 0.0 if float(zero_out.abs().max()) == 0.0 else 1.0


def merge_diagonal(target: MergeTarget, s: torch.Tensor) -> None:
    """Make the norm's output s ⊙ y instead of y: its effective weight (offset + w) ← s ⊙ (offset + w)."""
    _check_resident(target.module)
    with torch.no_grad():
        w = target.module.weight
        eff = target.offset + w.double()
        w.copy_((s.to(w.device).double() * eff - target.offset).to(w.dtype))


def _check_resident(module: nn.Module) -> None:
    if module.weight.device.type == "meta":
        raise ValueError(
            f"cannot merge into {type(module).__name__}: its weight is offloaded (device_map with cpu/disk offload); "
            "merged repairs need the site's weights resident, so raise max_memory or use repair=none"
        )
