"""The physical floor: pass-count floors, forward FLOPs, and the timed C_F / C_FB passes."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradmap.bench.config import BenchConfig
from gradmap.core.calib import microbatches
from gradmap.core.grads import gradients_only_for, scored_parameters, training_mode
from gradmap.core.layers import decoder_layers
from gradmap.core.timing import timed


def forward_flops(config: Any, n_layers: int, seq_len: int) -> float:
    """FLOPs per token of one forward of a model with ``n_layers`` decoder layers (matmuls and causal attention).

    Used only as a ratio, to scale timed candidate forwards of SLEB and PPL to their full pass count, where
    candidates have different numbers of layers but the lm_head does not shrink.
    """
    d, ff = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    layer_params = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ff
    attention = 2 * seq_len * heads * head_dim  # QKᵀ and AV, 4·s·d per token, halved by the causal mask
    return 2.0 * (n_layers * layer_params + d * config.vocab_size) + n_layers * attention


def stage1_floor_passes(n_layers: int, n_remove: int) -> float:
    """Σ_{i<n} (L−i)/L: dense forward+backward passes that iterative GradMAP needs at least (docs/protocol.md §5)."""
    return sum((n_layers - i) / n_layers for i in range(n_remove))


def sleb_candidate_layers(n_layers: int, n_remove: int, protect: int) -> list[int]:
    """Layers in each candidate forward of SLEB: step i tries L−i−protect candidates of L−i−1 layers."""
    return [n_layers - i - 1 for i in range(n_remove) for _ in range(n_layers - i - protect)]


# ---- timing helpers ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def measure_floor(model: nn.Module, calib: torch.Tensor, cfg: BenchConfig, backward: bool) -> dict[str, Any]:
    """C_F (and C_FB when ``backward``): median of ``cfg.repeats`` passes over D after an untimed warm-up.

    The forward+backward computes the gradients of exactly the weights GradMAP scores (the seven linears of every
    layer, embeddings, norms and lm_head frozen), in the same mode and micro-batches as GradMAP, and drops each
    gradient as soon as it is accumulated: the least work that yields them.
    """
    device = next(model.parameters()).device
    batches = microbatches(calib, cfg.micro_batch_size)
    rows = calib.shape[0]

    def forward(parts: Sequence[torch.Tensor]) -> None:
        with torch.inference_mode():
            losses = []
            for mb in parts:
                mb = mb.to(device)
                losses.append(model(input_ids=mb, labels=mb, use_cache=False).loss)
            float(torch.stack(losses).sum())

    params = [p for layer in decoder_layers(model) for p in scored_parameters(layer)]

    def forward_backward(parts: Sequence[torch.Tensor]) -> None:
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params]
        try:
            with training_mode(model, cfg.grad_checkpointing), gradients_only_for(model, params):
                total = torch.zeros((), device=device)
                for mb in parts:
                    mb = mb.to(device)
                    loss = model(input_ids=mb, labels=mb, use_cache=False).loss * (mb.shape[0] / rows)
                    loss.backward()
                    total = total + loss.detach()
                float(total)
        finally:
            for hook in hooks:
                hook.remove()

    out: dict[str, Any] = {"weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    kinds = [("forward", forward)] + ([("forward_backward", forward_backward)] if backward else [])
    for name, fn in kinds:
        fn(batches[:1])  # warm-up: kernels, cuBLAS handles, allocator
        spans = []
        for _ in range(max(1, cfg.repeats)):
            with timed(device) as span:
                fn(batches)
            spans.append(span)
        out[name] = {
            "seconds": statistics.median(s.seconds for s in spans),
            "all_s": [s.seconds for s in spans],
            "peak_mem_bytes": max(s.peak_mem_bytes for s in spans),
            "repeats": len(spans),
        }
    return out
