"""GradMAP stage 1: rank decoder layers by gradient magnitude, one backward pass per pruning decision.

Formula (docs/protocol.md §2, our reconstruction of arXiv 2602.14649): with L(θ) the mean next-token cross-entropy of
the *current* pruned model over the calibration set D and θ_ℓ the seven linear weights of layer ℓ,

    G_ℓ = Σ_{W∈θ_ℓ} Σ_ij |∂L/∂W_ij| / Σ_{W∈θ_ℓ} numel(W)        (grad_norm=l1, grad_reduce=mean)

and the alive, unprotected layer with the smallest G_ℓ is removed; then the loss of the smaller model is
back-propagated again for the next decision. One loss scores every layer on one scale (the paper's "global"
assessment). The gradient is reduced as soon as backward produces it (post-accumulate-grad hooks) and dropped,
so memory stays at weights + activations; several micro-batches accumulate into an fp32 buffer first, because
|·| is taken after summing over D (``grad_aggregate=batch``).

Memory (bf16 model, P scored weights, A = activations of one micro-batch's forward+backward):
- one micro-batch, or ``grad_aggregate=microbatch_abs``: weights + A (each gradient is reduced and freed in its hook);
- several micro-batches with ``grad_aggregate=batch``: weights + A + 4·P bytes (fp32 running sum; 2·P with
  ``score_accum=bf16``). That buffer is the sum the score needs, so it cannot be avoided.
Speed: with a buffer, ``wgrad_accum=fused`` (the default there) makes each scored linear's weight-gradient matrix
product add straight into the buffer (``buf += gᵀx`` with an fp32 output), so no bf16 gradient is written, read
back and added: the only extra traffic is the buffer's read and write inside that product. ``hook`` is the
post-accumulate-grad path.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core.calib import microbatches
from gradmap.core.components import (
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
from gradmap.core.grads import (
    FusedWeightGradScorer,
    WeightGradScorer,
    block_linears,
    gradients_only_for,
    training_mode,
)
from gradmap.core.layers import active_layers, decoder_layers

ACTIVATION_TARGETS = ("layer_output", "layer_gate", "layer_gate_signed", "layer_gate_tok")


class _ActivationGradScorer:
    """Scores from gradients w.r.t. layer outputs, with g_t = ∂L/∂h_out at token t and f_t = h_out − h_in (the
    layer's own branch output, so removing the layer changes its output by −f_t):

    - ``layer_output``: mean_t ‖g_t‖₂ (encodes depth, not removal cost; kept as a documented reading);
    - ``layer_gate``: |Σ_t ⟨g_t, f_t⟩| (signed terms cancel across tokens; can pick layer 0);
    - ``layer_gate_signed``: −Σ_t ⟨g_t, f_t⟩, the first-order loss change of removing the layer;
    - ``layer_gate_tok``: Σ_t |⟨g_t, f_t⟩|, the per-token removal estimate (abs before the sum over tokens).

    Only activations carry gradients here: no weight requires grad, so no weight gradient is computed or stored.
    """

    def __init__(self, layers: dict[int, nn.Module], target: str) -> None:
        self.target = target
        self.sums: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.handles = [
            layer.register_forward_hook(self._make_hook(idx), with_kwargs=True) for idx, layer in layers.items()
        ]

    def _reduce(self, grad: torch.Tensor, branch: torch.Tensor | None) -> torch.Tensor:
        if self.target == "layer_output":
            return torch.linalg.vector_norm(grad.float(), 2, dim=-1).sum()
        per_token = (grad.float() * branch.float()).sum(dim=-1)
        return per_token.abs().sum() if self.target == "layer_gate_tok" else per_token.sum()

    def _make_hook(self, idx: int):
        def forward_hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            branch = (h_out - h_in).detach() if self.target != "layer_output" else None

            def grad_hook(grad: torch.Tensor) -> None:
                value = self._reduce(grad, branch)
                self.sums[idx] = self.sums[idx] + value if idx in self.sums else value

            if h_out.requires_grad:
                h_out.register_hook(grad_hook)

        return forward_hook

    def scores(self) -> dict[int, float]:
        if self.target == "layer_output":
            return {idx: float(v) / max(self.tokens, 1) for idx, v in self.sums.items()}
        if self.target == "layer_gate_signed":
            return {idx: -float(v) for idx, v in self.sums.items()}
        return {idx: abs(float(v)) for idx, v in self.sums.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class GradMAPSelector(Selector):
    """Iterative gradient-magnitude selector (GradMAP stage 1). Options mirror docs/protocol.md §7."""

    name: ClassVar[str] = "gradmap"
    needs_whole_model: ClassVar[str | None] = "gradients of the loss through the whole model (backward passes)"
    grad_target: str = "weights"  # weights | layer_output | layer_gate | layer_gate_signed | layer_gate_tok
    grad_norm: str = "l1"  # l1 | l2
    grad_reduce: str = "mean"  # mean | sum
    include_norms: bool = False
    grad_aggregate: str = "batch"  # batch | microbatch_abs
    layers_per_step: int = 1  # n = one-shot
    one_shot: bool = False  # shorthand for layers_per_step = n_remove
    select_order: str = "min"  # min | max (sanity ablation)
    score_accum: str = "fp32"  # fp32 | bf16 buffer for several micro-batches
    grad_checkpointing: bool = False
    wgrad_accum: str = "auto"  # auto | fused | hook: how the batch sum of several micro-batches is accumulated

    def __post_init__(self) -> None:
        self.check_choice("grad_target", ["weights", *ACTIVATION_TARGETS])
        self.check_choice("grad_norm", ["l1", "l2"])
        self.check_choice("grad_reduce", ["mean", "sum"])
        self.check_choice("grad_aggregate", ["batch", "microbatch_abs"])
        self.check_choice("select_order", ["min", "max"])
        self.check_choice("score_accum", ["fp32", "bf16"])
        self.check_choice("wgrad_accum", ["auto", "fused", "hook"])
        if self.layers_per_step < 1:
            raise ValueError(f"selector 'gradmap': layers_per_step must be >= 1, got {self.layers_per_step}")
        if self.wgrad_accum == "fused" and (
            self.grad_target != "weights" or self.grad_aggregate != "batch" or self.include_norms
        ):
            raise ValueError(
                "selector 'gradmap': wgrad_accum=fused needs grad_target=weights, "
                "grad_aggregate=batch and include_norms=false"
            )
        if self.grad_target == "layer_gate" and self.protect_first < 1:
            warnings.warn(
                "selector 'gradmap': grad_target=layer_gate sums signed terms that cancel across tokens and tends "
                "to pick layer 0; set protect_first >= 1 or use grad_target=layer_gate_tok",
                stacklevel=2,
            )

    def uses_fused(self, n_microbatches: int) -> bool:
        """Fused accumulation where a buffer is needed anyway (``auto``), or where asked for (``fused``)."""
        if self.wgrad_accum == "fused":
            return True
        return (
            self.wgrad_accum == "auto"
            and n_microbatches > 1
            and self.grad_target == "weights"
            and self.grad_aggregate == "batch"
            and not self.include_norms
        )

    @property
    def accum_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.score_accum == "bf16" else torch.float32

    def _forward_backward(self, model: nn.Module, batches: list[torch.Tensor], alive: list[int], scorer: Any) -> float:
        """Backward of the mean loss over D, one micro-batch at a time; returns the mean loss.

        Losses stay on the device and are checked once at the end, so the loop never waits for the GPU.
        """
        device = model_device(model)
        rows = sum(mb.shape[0] for mb in batches)
        losses = []
        for i, mb in enumerate(batches):
            mb = mb.to(device, non_blocking=True)
            if isinstance(scorer, WeightGradScorer):
                scorer.last_microbatch = i == len(batches) - 1
            if isinstance(scorer, _ActivationGradScorer):
                scorer.tokens += mb.numel()
                embeds = model.get_input_embeddings()(mb).detach().requires_grad_(True)
                out = model(inputs_embeds=embeds, labels=mb, use_cache=False)
            else:
                out = model(input_ids=mb, labels=mb, use_cache=False)
            loss = out.loss * (mb.shape[0] / rows)
            loss.backward()
            losses.append(loss.detach())
        values = torch.stack(losses).float().cpu()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            raise NonFiniteError(
                f"calibration loss is {float(values[i])} at micro-batch {i} with layers {alive} alive "
                f"(dtype {str(next(model.parameters()).dtype).removeprefix('torch.')}; "
                "try dtype=float32 or bfloat16)"
            )
        return float(values.double().sum())

    def _score_step(
        self,
        model: nn.Module,
        alive: list[int],
        batches: list[torch.Tensor],
        fused: FusedWeightGradScorer | None = None,
    ) -> tuple[dict[int, float], float]:
        """One decision's worth of work: a forward+backward over D of the current model, reduced to scores."""
        layers = decoder_layers(model)
        alive_layers = {idx: layers[idx] for idx in alive}
        if fused is not None:
            fused.reset()
            with active_layers(model, alive), gradients_only_for(model, fused.params):
                loss = self._forward_backward(model, batches, alive, fused)
            return fused.scores(alive), loss
        if self.grad_target == "weights":
            scorer: WeightGradScorer | _ActivationGradScorer = WeightGradScorer(
                alive_layers,
                self.include_norms,
                self.grad_norm,
                self.grad_reduce,
                self.grad_aggregate,
                self.accum_dtype,
            )
            params = scorer.params
        else:
            scorer = _ActivationGradScorer(alive_layers, self.grad_target)
            params = []
        try:
            with active_layers(model, alive), gradients_only_for(model, params):
                loss = self._forward_backward(model, batches, alive, scorer)
            scores = scorer.scores()
        finally:
            scorer.close()
        return scores, loss

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        n_layers = len(decoder_layers(model))
        step_size = n_remove if self.one_shot else min(self.layers_per_step, n_remove)
        batches = microbatches(calib_ids, self.micro_batch_size)
        alive, removed = list(range(n_layers)), []
        all_scores: list[dict[int, float]] = []
        losses: list[float] = []
        step_seconds: list[float] = []
        backward_passes = 0
        # GPT-2's Conv1D has no fused path; ``auto`` then accumulates in hooks (recorded as info["wgrad_accum"]).
        plain = all(isinstance(m, nn.Linear) for layer in decoder_layers(model) for m in block_linears(layer))
        use_fused = self.uses_fused(len(batches)) and (plain or self.wgrad_accum == "fused")
        fused = (
            FusedWeightGradScorer(
                dict(enumerate(decoder_layers(model))), self.grad_norm, self.grad_reduce, self.accum_dtype
            )
            if use_fused
            else None
        )
        try:
            with (
                training_mode(model, self.grad_checkpointing),
                tqdm(total=n_remove, desc="gradmap stage 1", unit="layer", leave=False) as bar,
            ):
                while len(removed) < n_remove:
                    k = min(step_size, n_remove - len(removed))
                    start = time.perf_counter()
                    scores, loss = self._score_step(model, alive, batches, fused)  # ends with a device sync
                    step_seconds.append(time.perf_counter() - start)
                    backward_passes += len(batches)
                    candidates = {i: scores[i] for i in self.candidates(alive, n_layers)}
                    check_finite(candidates, "GradMAP score", next(model.parameters()).dtype)
                    drop = pick_lowest(candidates, k, self.select_order)
                    all_scores.append(dict(sorted(scores.items())))
                    losses.append(loss)
                    removed.extend(drop)
                    alive = [i for i in alive if i not in drop]
                    if fused is not None:
                        fused.drop(drop)
                    bar.update(len(drop))
        finally:
            if fused is not None:
                fused.close()
        warn_if_edge(removed, n_layers, "gradmap")
        return Selection(
            removed=removed,
            scores=all_scores,
            info={
                "calib_loss": losses,
                "backward_passes": backward_passes,
                "decisions": len(all_scores),
                "step_s": step_seconds,
                "wgrad_accum": "fused" if use_fused else "hook",
            },
        )


SELECTORS.add("gradmap", GradMAPSelector)
register_method("gradmap", "gradmap", "projection", "GradMAP: gradient-magnitude selection + projection compensation.")
register_method("gradmap_s1", "gradmap", "none", "GradMAP stage 1 only (no compensation).")
# The best-supported readings (docs/gradmap.md): the per-token removal estimate Σ_t |⟨∂L/∂h_out, f_t⟩| from one
# backward, iterative or one-shot, with the projection's λ chosen on dev windows (refused if it hurts dev NLL).
register_method(
    "gradmap_tok",
    "gradmap",
    "projection",
    "GradMAP, per-token removal-estimate reading: iterative layer_gate_tok + projection (λ chosen on dev).",
    selector_options={"grad_target": "layer_gate_tok"},
    repair_options={"lambda_rel": "auto"},
)
register_method(
    "gradmap_tok_oneshot",
    "gradmap",
    "projection",
    "GradMAP, per-token removal-estimate reading, one backward: one-shot layer_gate_tok + projection (λ on dev).",
    selector_options={"grad_target": "layer_gate_tok", "one_shot": True},
    repair_options={"lambda_rel": "auto"},
)
