"""Gradient plumbing shared by gradient-based selectors (GradMAP stage 1, Taylor): which weights are scored, how
gradients are enabled for them alone, and how each layer's weight gradient is reduced to one number as backward
produces it, without ever holding a gradient copy of the model.

``WeightGradScorer`` takes a ``reduction`` hook (param, grad) -> fp32 scalar tensor; GradMAP uses the l1/l2 norm
of the gradient, Taylor the l1 norm of weight * gradient, with the same buffering and memory behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradmap.core.adapters import is_linear


def block_linears(layer: nn.Module) -> list[nn.Module]:
    """Every linear of a decoder block (Llama: the seven projections; GPT-2: its Conv1D layers), any family."""
    return [m for m in layer.modules() if is_linear(m)]


def scored_parameters(layer: nn.Module, include_norms: bool = False) -> list[nn.Parameter]:
    """The weights GradMAP scores in one decoder layer: its linears, optionally the norms around its branches
    (the block's own norm children such as ``input_layernorm``/``ln_1``, not Qwen3's q_norm inside attention)."""
    modules = block_linears(layer)
    if include_norms:
        modules += [m for m in layer.children() if "norm" in type(m).__name__.lower()]
    params = [p for module in modules for p in module.parameters(recurse=False)]
    if not params:
        raise ValueError(f"no scorable weights found in {type(layer).__name__}")
    return params


@contextmanager
def gradients_only_for(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Enable grads on ``params`` alone (embeddings, lm_head and norms frozen) and restore the flags after."""
    offloaded = [p for p in params if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"gradient scores need every scored weight resident on a device, but {len(offloaded)} are offloaded "
            "(device_map with cpu/disk offload); give the model more GPU memory (max_memory) or use a forward-only "
            "selector such as shortgpt"
        )
    saved = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def training_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """Backward-ready mode. transformers checkpoints only when ``model.training``, so checkpointing needs
    train(); every dropout must then be 0 or the scores would be random."""
    was_training = model.training
    if checkpointing:
        live = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        live_cfg = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
        if live or live_cfg > 0:
            raise ValueError("gradient checkpointing needs train mode, but the model has dropout > 0")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    else:
        model.eval()
    try:
        yield
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)


class WeightGradScorer:
    """Reduces each layer's weight gradients to one number as backward produces them.

    With one micro-batch the gradient is reduced and freed inside its hook, so no gradient copy of the model
    ever exists. With several, ``batch`` aggregation keeps a buffer (fp32, or bf16 when asked) that the last
    micro-batch completes; ``microbatch_abs`` reduces every micro-batch at once (Σ_b |g_b|, no buffer).

    ``reduction(param, grad)`` turns one (summed) gradient into a non-negative fp32 scalar; the default is
    :func:`reduce_gradient` with ``norm``. Other scores (Taylor's Σ|W ⊙ g|) pass their own and keep the buffering.
    """

    def __init__(
        self,
        layers: dict[int, nn.Module],
        include_norms: bool,
        norm: str,
        reduce: str,
        aggregate: str,
        accum_dtype: torch.dtype,
        reduction: Callable[[nn.Parameter, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.norm, self.reduce, self.aggregate, self.accum_dtype = norm, reduce, aggregate, accum_dtype
        self.reduction = reduction or (lambda _param, g: reduce_gradient(g, norm))
        self.owner: dict[nn.Parameter, int] = {}
        self.numel: dict[int, int] = {}
        for idx, layer in layers.items():
            params = scored_parameters(layer, include_norms)
            self.numel[idx] = sum(p.numel() for p in params)
            for p in params:
                self.owner[p] = idx
        self.buffers: dict[nn.Parameter, torch.Tensor] = {}
        self.totals: dict[int, torch.Tensor] = {}
        self.last_microbatch = True
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.owner]

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.owner)

    def _add(self, idx: int, value: torch.Tensor) -> None:
        self.totals[idx] = self.totals[idx] + value if idx in self.totals else value

    def _hook(self, p: nn.Parameter) -> None:
        g, p.grad = p.grad, None
        idx = self.owner[p]
        if self.aggregate == "microbatch_abs":
            self._add(idx, self.reduction(p, g))
        elif self.last_microbatch:
            buf = self.buffers.pop(p, None)
            self._add(idx, self.reduction(p, g if buf is None else buf.add_(g)))
        elif p in self.buffers:
            self.buffers[p].add_(g)
        else:
            self.buffers[p] = g.to(self.accum_dtype)

    def scores(self) -> dict[int, float]:
        out = {}
        for idx, total in self.totals.items():
            value = float(total) if self.norm == "l1" else float(total.sqrt())
            out[idx] = value / self.numel[idx] if self.reduce == "mean" else value
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.buffers.clear()


def accumulate_matmul(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``buf += a @ b`` with the product accumulated in ``buf``'s dtype (fp32 for bf16 inputs on CUDA).

    On CUDA, ``addmm(..., out_dtype=float32, out=buf)`` runs one bf16 GEMM whose fp32 epilogue adds into ``buf``
    (beta = 1): the bf16-rounded gradient never exists. Elsewhere the inputs are cast to ``buf``'s dtype first.
    """
    if a.dtype == buf.dtype:
        buf.addmm_(a, b)
    elif buf.is_cuda:
        torch.addmm(buf, a, b, out_dtype=buf.dtype, out=buf)
    else:
        buf.addmm_(a.to(buf.dtype), b.to(buf.dtype))


class LinearIntoBuffer(torch.autograd.Function):
    """``F.linear`` whose backward adds the weight (and bias) gradient into caller-owned buffers.

    The weight's gradient is returned as None, so autograd never materialises it in ``.grad``; the input gradient
    is the usual one. Saved tensors are the same as for ``F.linear`` (input and weight), so activation memory and
    gradient checkpointing (which re-runs this forward) behave as for a plain linear layer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        w_buf: torch.Tensor,
        b_buf: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bufs = (w_buf, b_buf)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        w_buf, b_buf = ctx.bufs
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        accumulate_matmul(w_buf, g2.t(), x.reshape(-1, x.shape[-1]))
        if b_buf is not None:
            b_buf.add_(g2.sum(0, dtype=b_buf.dtype))
        return grad_x, None, None, None, None


class FusedWeightGradScorer:
    """The ``grad_aggregate=batch`` sum over several micro-batches, accumulated inside the weight-gradient GEMMs.

    Each scored ``nn.Linear`` runs through :class:`LinearIntoBuffer` while the scorer is open (its ``forward`` is
    replaced on the instance and restored on ``close``). Buffers are allocated once per selection and zeroed per
    decision (``reset``); those of removed layers are freed (``drop``). Scores equal :class:`WeightGradScorer`'s
    up to rounding: here each micro-batch's product is added in fp32 before any bf16 rounding.
    """

    def __init__(self, layers: dict[int, nn.Module], norm: str, reduce: str, accum_dtype: torch.dtype) -> None:
        self.norm, self.reduce = norm, reduce
        self.modules: dict[int, list[nn.Linear]] = {}
        self.buffers: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.numel: dict[int, int] = {}
        for idx, layer in layers.items():
            linears = block_linears(layer)
            if not linears or not all(isinstance(m, nn.Linear) for m in linears):
                raise ValueError(f"wgrad_accum=fused needs nn.Linear projections in {type(layer).__name__}")
            self.modules[idx] = linears
            self.numel[idx] = sum(p.numel() for m in linears for p in m.parameters(recurse=False))
            for m in linears:
                w_buf = torch.zeros(m.weight.shape, dtype=accum_dtype, device=m.weight.device)
                b_buf = None if m.bias is None else torch.zeros(m.bias.shape, dtype=accum_dtype, device=m.bias.device)
                self.buffers[m] = (w_buf, b_buf)
                m.forward = self._make_forward(m)  # instance attribute shadows nn.Linear.forward

    def _make_forward(self, module: nn.Linear):
        w_buf, b_buf = self.buffers[module]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return LinearIntoBuffer.apply(x, module.weight, module.bias, w_buf, b_buf)

        return forward

    @property
    def params(self) -> list[nn.Parameter]:
        """Parameters that must require grad so that autograd runs the backward of every scored linear."""
        return [p for mods in self.modules.values() for m in mods for p in m.parameters(recurse=False)]

    def reset(self) -> None:
        for w_buf, b_buf in self.buffers.values():
            w_buf.zero_()
            if b_buf is not None:
                b_buf.zero_()

    def drop(self, layer_indices: Sequence[int]) -> None:
        """Free the buffers of removed layers and give their linears their own forward back."""
        for idx in layer_indices:
            for m in self.modules.pop(idx, []):
                self.buffers.pop(m, None)
                m.__dict__.pop("forward", None)
            self.numel.pop(idx, None)

    def scores(self, alive: Sequence[int]) -> dict[int, float]:
        totals = {}
        for idx in alive:
            total = torch.zeros((), dtype=torch.float32, device=next(iter(self.buffers.values()))[0].device)
            for m in self.modules[idx]:
                for buf in self.buffers[m]:
                    if buf is not None:
                        total = total + reduce_gradient(buf, self.norm).to(total.device)  # layers may be split
            totals[idx] = total
        values = torch.stack([totals[idx] for idx in alive]).double().cpu()  # one device sync per decision
        out = {}
        for idx, value in zip(alive, values.tolist()):
            value = value if self.norm == "l1" else value**0.5
            out[idx] = value / self.numel[idx] if self.reduce == "mean" else value
        return out

    def close(self) -> None:
        self.drop(list(self.modules))


def reduce_gradient(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Σ|g| (l1) or Σg² (l2, rooted per layer later), accumulated in fp32 whatever g's dtype."""
    if norm == "l1":
        return torch.linalg.vector_norm(g, 1, dtype=torch.float32)
    return torch.linalg.vector_norm(g, 2, dtype=torch.float32).square()
