"""GradMAP stage 1: rank decoder layers by gradient magnitude, one backward pass per pruning decision.

Formula (METHODS.md §2, our reconstruction of arXiv 2602.14649): with L(θ) the mean next-token cross-entropy of
the *current* pruned model over the calibration set D and θ_ℓ the seven linear weights of layer ℓ,

    G_ℓ = Σ_{W∈θ_ℓ} Σ_ij |∂L/∂W_ij| / Σ_{W∈θ_ℓ} numel(W)        (grad_norm=l1, grad_reduce=mean)

and the alive, unprotected layer with the smallest G_ℓ is removed; then the loss of the smaller model is
back-propagated again for the next decision. One loss scores every layer on one scale (the paper's "global"
assessment). The gradient is reduced as soon as backward produces it (post-accumulate-grad hooks) and dropped,
so memory stays at weights + activations; several micro-batches accumulate into an fp32 buffer first, because
|·| is taken after summing over D (``grad_aggregate=batch``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.base import (
    SELECTORS,
    NonFiniteError,
    Selection,
    Selector,
    check_finite,
    model_device,
    pick_lowest,
    register_method,
    warn_if_edge,
)
from gradmap.calib import microbatches
from gradmap.layers import active_layers, decoder_layers

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scored_parameters(layer: nn.Module, include_norms: bool = False) -> list[nn.Parameter]:
    """The weights GradMAP scores in one decoder layer: the seven linears, optionally the two norms."""
    params = []
    for module_name, module in layer.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf in LINEAR_NAMES or (include_norms and leaf.endswith("layernorm")):
            params.extend(p for p in module.parameters(recurse=False))
    if not params:
        raise ValueError(f"no scorable weights found in {type(layer).__name__}")
    return params


@contextmanager
def gradients_only_for(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Enable grads on ``params`` alone (embeddings, lm_head and norms frozen) and restore the flags after."""
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


class _WeightGradScorer:
    """Reduces each layer's weight gradients to one number as backward produces them.

    With one micro-batch the gradient is reduced and freed inside its hook, so no gradient copy of the model
    ever exists. With several, ``batch`` aggregation keeps a buffer (fp32, or bf16 when asked) that the last
    micro-batch completes; ``microbatch_abs`` reduces every micro-batch at once (Σ_b |g_b|, no buffer).
    """

    def __init__(self, layers: dict[int, nn.Module], include_norms: bool, norm: str, reduce: str,
                 aggregate: str, accum_dtype: torch.dtype) -> None:
        self.norm, self.reduce, self.aggregate, self.accum_dtype = norm, reduce, aggregate, accum_dtype
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

    def _reduce(self, g: torch.Tensor) -> torch.Tensor:
        if self.norm == "l1":
            return torch.linalg.vector_norm(g, 1, dtype=torch.float32)
        return torch.linalg.vector_norm(g, 2, dtype=torch.float32).square()  # Σ g², rooted per layer later

    def _add(self, idx: int, value: torch.Tensor) -> None:
        self.totals[idx] = self.totals[idx] + value if idx in self.totals else value

    def _hook(self, p: nn.Parameter) -> None:
        g, p.grad = p.grad, None
        idx = self.owner[p]
        if self.aggregate == "microbatch_abs":
            self._add(idx, self._reduce(g))
        elif self.last_microbatch:
            buf = self.buffers.pop(p, None)
            self._add(idx, self._reduce(g if buf is None else buf.add_(g)))
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


class _ActivationGradScorer:
    """Scores from gradients w.r.t. layer outputs: ``layer_output`` (mean ‖∂L/∂h_out‖₂ over tokens) or
    ``layer_gate`` (|Σ⟨∂L/∂h_out, h_out − h_in⟩|, the first-order effect of removing the layer's branch)."""

    def __init__(self, layers: dict[int, nn.Module], target: str) -> None:
        self.target = target
        self.sums: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.handles = [
            layer.register_forward_hook(self._make_hook(idx), with_kwargs=True) for idx, layer in layers.items()
        ]

    def _make_hook(self, idx: int):
        def forward_hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            branch = (h_out - h_in).detach() if self.target == "layer_gate" else None

            def grad_hook(grad: torch.Tensor) -> None:
                if self.target == "layer_output":
                    value = torch.linalg.vector_norm(grad.float(), 2, dim=-1).sum()
                else:
                    value = (grad.float() * branch.float()).sum()
                self.sums[idx] = self.sums[idx] + value if idx in self.sums else value

            if h_out.requires_grad:
                h_out.register_hook(grad_hook)

        return forward_hook

    def scores(self) -> dict[int, float]:
        if self.target == "layer_output":
            return {idx: float(v) / max(self.tokens, 1) for idx, v in self.sums.items()}
        return {idx: abs(float(v)) for idx, v in self.sums.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class GradMAPSelector(Selector):
    """Iterative gradient-magnitude selector (GradMAP stage 1). Options mirror METHODS.md §7."""

    name: ClassVar[str] = "gradmap"
    grad_target: str = "weights"  # weights | layer_output | layer_gate
    grad_norm: str = "l1"  # l1 | l2
    grad_reduce: str = "mean"  # mean | sum
    include_norms: bool = False
    grad_aggregate: str = "batch"  # batch | microbatch_abs
    layers_per_step: int = 1  # n = one-shot
    one_shot: bool = False  # shorthand for layers_per_step = n_remove
    select_order: str = "min"  # min | max (sanity ablation)
    score_accum: str = "fp32"  # fp32 | bf16 buffer for several micro-batches
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.check_choice("grad_target", ["weights", "layer_output", "layer_gate"])
        self.check_choice("grad_norm", ["l1", "l2"])
        self.check_choice("grad_reduce", ["mean", "sum"])
        self.check_choice("grad_aggregate", ["batch", "microbatch_abs"])
        self.check_choice("select_order", ["min", "max"])
        self.check_choice("score_accum", ["fp32", "bf16"])
        if self.layers_per_step < 1:
            raise ValueError(f"selector 'gradmap': layers_per_step must be >= 1, got {self.layers_per_step}")

    def _score_step(self, model: nn.Module, alive: list[int], batches: list[torch.Tensor]) -> tuple[dict, float]:
        """One decision's worth of work: a forward+backward over D of the current model, reduced to scores."""
        layers = decoder_layers(model)
        alive_layers = {idx: layers[idx] for idx in alive}
        device = model_device(model)
        rows = sum(mb.shape[0] for mb in batches)
        if self.grad_target == "weights":
            scorer = _WeightGradScorer(alive_layers, self.include_norms, self.grad_norm, self.grad_reduce,
                                       self.grad_aggregate,
                                       torch.bfloat16 if self.score_accum == "bf16" else torch.float32)
            params = scorer.params
        else:
            scorer = _ActivationGradScorer(alive_layers, self.grad_target)
            params = []
        loss_total = 0.0
        try:
            with active_layers(model, alive), gradients_only_for(model, params):
                for i, mb in enumerate(batches):
                    mb = mb.to(device)
                    if isinstance(scorer, _WeightGradScorer):
                        scorer.last_microbatch = i == len(batches) - 1
                        out = model(input_ids=mb, labels=mb, use_cache=False)
                    else:
                        scorer.tokens += mb.numel()
                        embeds = model.get_input_embeddings()(mb).detach().requires_grad_(True)
                        out = model(inputs_embeds=embeds, labels=mb, use_cache=False)
                    loss = out.loss * (mb.shape[0] / rows)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(
                            f"calibration loss is {float(loss.detach())} at micro-batch {i} with layers {alive} alive "
                            f"(dtype {str(next(model.parameters()).dtype).removeprefix('torch.')}; "
                            "try dtype=float32 or bfloat16)"
                        )
                    loss.backward()
                    loss_total += float(loss.detach())
            scores = scorer.scores()
        finally:
            scorer.close()
        return scores, loss_total

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        step_size = n_remove if self.one_shot else min(self.layers_per_step, n_remove)
        batches = microbatches(calib_ids, self.micro_batch_size)
        alive, removed = list(range(n_layers)), []
        all_scores: list[dict[int, float]] = []
        losses: list[float] = []
        backward_passes = 0
        with training_mode(model, self.grad_checkpointing), tqdm(
            total=n_remove, desc="gradmap stage 1", unit="layer", leave=False
        ) as bar:
            while len(removed) < n_remove:
                k = min(step_size, n_remove - len(removed))
                scores, loss = self._score_step(model, alive, batches)
                backward_passes += len(batches)
                candidates = {i: scores[i] for i in self.candidates(alive, n_layers)}
                check_finite(candidates, "GradMAP score", next(model.parameters()).dtype)
                drop = pick_lowest(candidates, k, self.select_order)
                all_scores.append(dict(sorted(scores.items())))
                losses.append(loss)
                removed.extend(drop)
                alive = [i for i in alive if i not in drop]
                bar.update(len(drop))
        warn_if_edge(removed, n_layers, "gradmap")
        return Selection(
            removed=removed,
            scores=all_scores,
            info={"calib_loss": losses, "backward_passes": backward_passes, "decisions": len(all_scores)},
        )


SELECTORS.add("gradmap", GradMAPSelector)
register_method("gradmap", "gradmap", "projection", "GradMAP: gradient-magnitude selection + projection compensation.")
register_method("gradmap_s1", "gradmap", "none", "GradMAP stage 1 only (no compensation).")
