"""Repair ``layer_replace`` (LLM-Streamline, arXiv 2403.19135): one trained layer stands in for a removed block.

For a contiguous removed set a…b, the window is the cut plus one surviving neighbour: layer a−1 before the cut
(the LLM-Streamline case: the n+1 layers a−1…b become one layer initialised from layer a−1), or, when the cut
starts at layer 0, layer b+1 after it. With lo…hi that window, the replacement is trained so that

    replacement(h_lo) ≈ h_{hi+1}          (MSE; h_lo = input of layer lo, h_{hi+1} = output of layer hi)

with AdamW, linear warm-up and a cosine decay to ``min_lr``, gradient clipping, and the best validation
checkpoint. Inputs and targets come from hooks on the *dense* model, in one partial forward per training batch
(stopped after layer hi, no logits). The model itself is not touched while it serves as teacher: an fp32
training copy of the replacement layer is trained and its weights are copied back at the end, so no module or
hook stays on the model. ``module=ffn`` trains only the layer's MLP (attention and norms kept as they were): the
paper's FFN variant swaps in a new module type, which this suite avoids.

Defaults are small enough for CPU; the reference setting (SlimPajama, 30k–100k windows, batch 8 × 16 accumulation)
is in conf/repair/layer_replace.yaml. The training cost is inside the timed repair span.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from baselines._common import contiguous_cut
from gradmap.core.adapters import adapter
from gradmap.core.calib import microbatches
from gradmap.core.capture import capture, first_tensor, forward_quietly
from gradmap.core.components import REPAIRS, NonFiniteError, Repair, calibration_nll, model_device
from gradmap.core.layers import decoder_layers

MIN_TRAIN_WINDOWS = 64  # below this a replacement layer is fitted, not trained: say so


def replacement_window(removed: Sequence[int], n_layers: int) -> tuple[int, int, int]:
    """(lo, hi, keep): the window the replacement spans and the surviving layer that becomes the replacement."""
    first, last = contiguous_cut(removed, n_layers, "repair 'layer_replace'")
    if first > 0:
        return first - 1, last, first - 1
    return 0, last + 1, last + 1  # cut starts at layer 0: the first layer after it stands in


def _as_float32(value: Any) -> Any:
    """Cast floating tensors (also inside tuples, e.g. rotary cos/sin) to fp32 for the fp32 training copy."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_as_float32(v) for v in value)
    return value


@contextmanager
def _capture_call(layer: nn.Module) -> Iterator[dict[str, Any]]:
    """Record the hidden-state input and the other keyword arguments (masks, rotary embeddings) of a layer call."""
    record: dict[str, Any] = {}

    def pre_hook(module, args, kwargs):
        kw = dict(kwargs)
        record["hidden"] = args[0] if args else kw.pop("hidden_states")
        record["kwargs"] = kw

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


def cosine_lr_factor(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warm-up to lr, cosine decay to min_lr.

    Warm-up counts from 1/warmup (HF starts at 0, which wastes a step when there are only a few).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))) / lr


@dataclass
class LayerReplaceRepair(Repair):
    """Train one surviving layer to map the stream entering a removed block to the stream leaving it."""

    name: ClassVar[str] = "layer_replace"
    module: str = "decoder_layer"  # decoder_layer | ffn (only the MLP of the replacement layer is trained)
    loss: str = "mse"  # mse (the reference's default; its LM-loss mode is not implemented)
    lr: float = 2e-4
    weight_decay: float = 1e-3
    min_lr: float = 5e-5
    warmup_ratio: float = 0.005
    clip: float = 5.0  # max gradient norm; 0 disables clipping
    batch_size: int = 1  # calibration windows per training forward/backward
    grad_accum: int = 1  # batches per optimizer step (reference: 16)
    epochs: int = 1
    train_samples: int | None = None  # windows used (train + validation); None: the whole calibration tensor
    val_fraction: float = 0.1  # held-out windows for the best-checkpoint choice (at least 1 if > 0)
    eval_steps: int = 0  # also validate every k optimizer steps; 0: after each epoch only
    seed: int = 0  # window split and shuffling
    _original: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _replaced: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_choice("module", ["decoder_layer", "ffn"])
        self.check_choice("loss", ["mse"])
        for option in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, option) < 1:
                raise ValueError(f"repair 'layer_replace': {option} must be >= 1, got {getattr(self, option)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"repair 'layer_replace': val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"repair 'layer_replace': need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"repair 'layer_replace': train_samples must be >= 1 or null, got {self.train_samples}")

    def part(self, model: nn.Module, layer: nn.Module) -> nn.Module:
        """What is trained: the whole block, or its MLP branch (``module=ffn``) as the model's adapter finds it."""
        if self.module == "decoder_layer":
            return layer
        adapt = adapter(model)
        mlp = adapt.mlp(layer)
        if mlp is None:
            raise ValueError(
                f"repair 'layer_replace': module=ffn needs the MLP as one submodule, but model type "
                f"{adapt.model_type!r} keeps its MLP linears on the block; use module=decoder_layer"
            )
        return mlp

    # -- data -----------------------------------------------------------------------------------------------------
    def split(self, calib_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded (train, validation) windows out of the first ``train_samples`` of a seeded permutation."""
        rows = calib_ids.shape[0]
        used = rows if self.train_samples is None else self.train_samples
        if used > rows:
            raise ValueError(
                f"repair 'layer_replace': train_samples={used} but the calibration set has {rows} "
                "windows; lower it or raise calib.n_samples"
            )
        if used < MIN_TRAIN_WINDOWS:
            warnings.warn(
                f"repair 'layer_replace' trains on {used} calibration window(s), the same windows the selector "
                f"scored (fewer than {MIN_TRAIN_WINDOWS}); LLM-Streamline trains on 30k-100k SlimPajama windows, "
                "so this accuracy and time are not LLM-Streamline's (docs/protocol.md §4)",
                stacklevel=2,
            )
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(self.seed))[:used]
        n_val = max(1, round(self.val_fraction * used)) if self.val_fraction > 0 else 0
        if n_val >= used:
            raise ValueError(
                f"repair 'layer_replace': {used} window(s) leave none for training after "
                f"val_fraction={self.val_fraction}; use more windows or val_fraction=0"
            )
        return calib_ids[order[n_val:]], calib_ids[order[:n_val]]

    @staticmethod
    def teacher(model: nn.Module, lo: int, hi: int, ids: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(h_lo, layer kwargs, h_{hi+1}) from the dense model, stopped after layer hi."""
        layers = decoder_layers(model)
        with (
            torch.no_grad(),
            _capture_call(layers[lo]) as call,
            capture({"target": layers[hi]}, "output", stop_at=layers[hi]) as out,
        ):
            forward_quietly(adapter(model).body, ids.to(model_device(model)))
        return call["hidden"], call["kwargs"], out["target"]

    # -- training -------------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        layers = decoder_layers(model)
        lo, hi, keep = replacement_window(removed, len(layers))
        train_ids, val_ids = self.split(calib_ids)
        target_layer = layers[keep]
        student = copy.deepcopy(target_layer).float()  # fp32 master copy; the model stays the dense teacher
        trained = self.part(model, student)
        params = list(trained.parameters())
        wanted = {id(p) for p in params}
        for p in student.parameters():
            p.requires_grad_(id(p) in wanted)

        batches_per_epoch = math.ceil(train_ids.shape[0] / self.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / self.grad_accum)
        total_steps = steps_per_epoch * self.epochs
        warmup = math.ceil(self.warmup_ratio * total_steps)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_lr_factor(s, total_steps, warmup, self.lr, self.min_lr)
        )
        generator = torch.Generator().manual_seed(self.seed + 1)
        counters = {"forward_passes": 0, "backward_passes": 0}

        def mse(ids: torch.Tensor, grad: bool) -> torch.Tensor:
            h_in, kwargs, target = self.teacher(model, lo, hi, ids)
            counters["forward_passes"] += 1
            with torch.set_grad_enabled(grad):
                pred = first_tensor(student(_as_float32(h_in), **_as_float32(kwargs)))
                return F.mse_loss(pred, target.float())

        def validate() -> float:
            student.eval()
            batches = microbatches(val_ids, self.micro_batch_size)
            total = sum(float(mse(mb, grad=False)) * mb.shape[0] for mb in batches)
            student.train()
            return total / val_ids.shape[0]

        history: list[dict[str, float]] = []
        val_init = validate() if val_ids.shape[0] else None
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        train_losses: list[float] = []
        step = 0
        student.train()
        with tqdm(total=total_steps, desc="layer_replace", unit="step", leave=False) as bar:
            for _ in range(self.epochs):
                order = torch.randperm(train_ids.shape[0], generator=generator)
                batches = list(torch.split(train_ids[order], self.batch_size))
                for start in range(0, len(batches), self.grad_accum):
                    group = batches[start : start + self.grad_accum]
                    rows = sum(b.shape[0] for b in group)
                    step_loss = 0.0
                    for b in group:
                        loss = mse(b, grad=True) * (b.shape[0] / rows)
                        if not torch.isfinite(loss):
                            raise NonFiniteError(f"layer_replace: training loss is {float(loss)} at step {step}")
                        loss.backward()
                        counters["backward_passes"] += 1
                        step_loss += float(loss.detach())
                    if self.clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, self.clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    schedule.step()
                    step += 1
                    train_losses.append(step_loss)
                    bar.update(1)
                    end_of_epoch = start + self.grad_accum >= len(batches)
                    if val_ids.shape[0] and (end_of_epoch or (self.eval_steps and step % self.eval_steps == 0)):
                        value = validate()
                        history.append({"step": step, "val_mse": value})
                        if best is None or value < best[0]:
                            best = (value, step, {k: v.detach().clone() for k, v in trained.state_dict().items()})
        if best is not None:
            trained.load_state_dict(best[2])

        # Copy the trained weights into the model's layer (in its dtype) and keep the originals for diagnostics.
        target_part = self.part(model, target_layer)
        with torch.no_grad():
            self._original = {k: v.detach().clone() for k, v in target_part.state_dict().items()}
            target_part.load_state_dict(trained.state_dict())  # copies, casting fp32 to the model's dtype
        self._replaced = target_part
        return {
            "replaced_by": keep,
            "window": [lo, hi],
            "module": self.module,
            "train_windows": int(train_ids.shape[0]),
            "val_windows": int(val_ids.shape[0]),
            "train_steps": step,
            "warmup_steps": warmup,
            "forward_passes": counters["forward_passes"],
            "backward_passes": counters["backward_passes"],
            "train_mse_first": train_losses[0],
            "train_mse_last": train_losses[-1],
            "val_mse_init": val_init,
            "val_history": history,
            "best_step": best[1] if best else step,
            "best_val_mse": best[0] if best else None,
        }

    def diagnostics(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        """Calibration NLL of the pruned model with the trained vs the untrained replacement (untimed)."""
        if self._replaced is None:
            return {}
        part, trained = self._replaced, {k: v.detach().clone() for k, v in self._replaced.state_dict().items()}
        after = calibration_nll(model, calib_ids, self.micro_batch_size)
        with torch.no_grad():
            part.load_state_dict(self._original)
            before = calibration_nll(model, calib_ids, self.micro_batch_size)
            part.load_state_dict(trained)
        self._original, self._replaced = {}, None
        return {"calib_nll_untrained": before, "calib_nll_trained": after, "nll_rose": after > before}


REPAIRS.add("layer_replace", LayerReplaceRepair)
