"""GradMAP stage 1: rank decoder layers by gradient magnitude, one backward pass per pruning decision.

Formula (METHODS.md §2, our reconstruction of arXiv 2602.14649): with L(θ) the mean next-token cross-entropy of
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
        return _reduce_gradient(g, self.norm)

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


class _LinearIntoBuffer(torch.autograd.Function):
    """``F.linear`` whose backward adds the weight (and bias) gradient into caller-owned buffers.

    The weight's gradient is returned as None, so autograd never materialises it in ``.grad``; the input gradient
    is the usual one. Saved tensors are the same as for ``F.linear`` (input and weight), so activation memory and
    gradient checkpointing (which re-runs this forward) behave as for a plain linear layer.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                w_buf: torch.Tensor, b_buf: torch.Tensor | None) -> torch.Tensor:
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


class _FusedWeightGradScorer:
    """The ``grad_aggregate=batch`` sum over several micro-batches, accumulated inside the weight-gradient GEMMs.

    Each scored ``nn.Linear`` runs through :class:`_LinearIntoBuffer` while the scorer is open (its ``forward`` is
    replaced on the instance and restored on ``close``). Buffers are allocated once per selection and zeroed per
    decision (``reset``); those of removed layers are freed (``drop``). Scores equal :class:`_WeightGradScorer`'s
    up to rounding: here each micro-batch's product is added in fp32 before any bf16 rounding.
    """

    def __init__(self, layers: dict[int, nn.Module], norm: str, reduce: str, accum_dtype: torch.dtype) -> None:
        self.norm, self.reduce = norm, reduce
        self.modules: dict[int, list[nn.Linear]] = {}
        self.buffers: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.numel: dict[int, int] = {}
        for idx, layer in layers.items():
            linears = [m for name, m in layer.named_modules() if name.rsplit(".", 1)[-1] in LINEAR_NAMES]
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
            return _LinearIntoBuffer.apply(x, module.weight, module.bias, w_buf, b_buf)

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
                        total = total + _reduce_gradient(buf, self.norm)
            totals[idx] = total
        values = torch.stack([totals[idx] for idx in alive]).double().cpu()  # one device sync per decision
        out = {}
        for idx, value in zip(alive, values.tolist()):
            value = value if self.norm == "l1" else value ** 0.5
            out[idx] = value / self.numel[idx] if self.reduce == "mean" else value
        return out

    def close(self) -> None:
        self.drop(list(self.modules))


def _reduce_gradient(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Σ|g| (l1) or Σg² (l2, rooted per layer later), accumulated in fp32 whatever g's dtype."""
    if norm == "l1":
        return torch.linalg.vector_norm(g, 1, dtype=torch.float32)
    return torch.linalg.vector_norm(g, 2, dtype=torch.float32).square()


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
    wgrad_accum: str = "auto"  # auto | fused | hook: how the batch sum of several micro-batches is accumulated

    def __post_init__(self) -> None:
        self.check_choice("grad_target", ["weights", "layer_output", "layer_gate"])
        self.check_choice("grad_norm", ["l1", "l2"])
        self.check_choice("grad_reduce", ["mean", "sum"])
        self.check_choice("grad_aggregate", ["batch", "microbatch_abs"])
        self.check_choice("select_order", ["min", "max"])
        self.check_choice("score_accum", ["fp32", "bf16"])
        self.check_choice("wgrad_accum", ["auto", "fused", "hook"])
        if self.layers_per_step < 1:
            raise ValueError(f"selector 'gradmap': layers_per_step must be >= 1, got {self.layers_per_step}")
        if self.wgrad_accum == "fused" and (self.grad_target != "weights" or self.grad_aggregate != "batch"
                                            or self.include_norms):
            raise ValueError("selector 'gradmap': wgrad_accum=fused needs grad_target=weights, "
                             "grad_aggregate=batch and include_norms=false")

    def uses_fused(self, n_microbatches: int) -> bool:
        """Fused accumulation where a buffer is needed anyway (``auto``), or where asked for (``fused``)."""
        if self.wgrad_accum == "fused":
            return True
        return (self.wgrad_accum == "auto" and n_microbatches > 1 and self.grad_target == "weights"
                and self.grad_aggregate == "batch" and not self.include_norms)

    @property
    def accum_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.score_accum == "bf16" else torch.float32

    def _forward_backward(self, model: nn.Module, batches: list[torch.Tensor], alive: list[int],
                          scorer: Any) -> float:
        """Backward of the mean loss over D, one micro-batch at a time; returns the mean loss.

        Losses stay on the device and are checked once at the end, so the loop never waits for the GPU.
        """
        device = model_device(model)
        rows = sum(mb.shape[0] for mb in batches)
        losses = []
        for i, mb in enumerate(batches):
            mb = mb.to(device, non_blocking=True)
            if isinstance(scorer, _WeightGradScorer):
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

    def _score_step(self, model: nn.Module, alive: list[int], batches: list[torch.Tensor],
                    fused: _FusedWeightGradScorer | None = None) -> tuple[dict[int, float], float]:
        """One decision's worth of work: a forward+backward over D of the current model, reduced to scores."""
        layers = decoder_layers(model)
        alive_layers = {idx: layers[idx] for idx in alive}
        if fused is not None:
            fused.reset()
            with active_layers(model, alive), gradients_only_for(model, fused.params):
                loss = self._forward_backward(model, batches, alive, fused)
            return fused.scores(alive), loss
        if self.grad_target == "weights":
            scorer: _WeightGradScorer | _ActivationGradScorer = _WeightGradScorer(
                alive_layers, self.include_norms, self.grad_norm, self.grad_reduce, self.grad_aggregate,
                self.accum_dtype)
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
        use_fused = self.uses_fused(len(batches))
        fused = (_FusedWeightGradScorer(dict(enumerate(decoder_layers(model))), self.grad_norm, self.grad_reduce,
                                        self.accum_dtype) if use_fused else None)
        try:
            with training_mode(model, self.grad_checkpointing), tqdm(
                total=n_remove, desc="gradmap stage 1", unit="layer", leave=False
            ) as bar:
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
            info={"calib_loss": losses, "backward_passes": backward_passes, "decisions": len(all_scores),
                  "step_s": step_seconds, "wgrad_accum": "fused" if use_fused else "hook"},
        )


SELECTORS.add("gradmap", GradMAPSelector)
register_method("gradmap", "gradmap", "projection", "GradMAP: gradient-magnitude selection + projection compensation.")
register_method("gradmap_s1", "gradmap", "none", "GradMAP stage 1 only (no compensation).")
