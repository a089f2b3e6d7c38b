"""Repair ``linearpatch`` (Chen et al., arXiv 2505.24680; ``chenxinrui-tsinghua/LinearPatch``), training-free.

At each pruning interface (a maximal run a…b of removed layers) the next surviving module (layer b+1, or the final
norm after the last layer) receives h_a instead of h_{b+1}. LinearPatch rescales it channel-wise in a Hadamard
basis: with H the orthonormal Hadamard matrix, s_c = mean_t |(h_{b+1} H)_c| / mean_t |(h_a H)_c| over the
calibration tokens, and the patch maps h ↦ h·H·diag(s)·Hᵀ. The rotation spreads outlier channels before the scale
is fitted (``rotation=none`` scales the raw channels). Runs are handled in ascending order, each measured on the
model with the earlier runs already removed and patched (one partial forward over D per run).

The patch acts on the whole stream, skip path included, in front of an RMSNorm, so it is *not* mergeable into any
weight: the pruned model carries it as a small explicit module (``LinearPatch`` in ``body.linear_patches``: d
scales plus a fixed, non-persistent rotation; d extra parameters per interface, recorded) that a forward pre-hook
on the module it feeds calls, and
``save_pretrained`` refuses with one line (a stock checkpoint would silently drop it). Results say "merged": false.
The paper's optional distillation of the patch is not implemented (its training-free setting is the default).
The reference pools per-batch ratios (mean over batches of the ratio); we take the ratio of pooled means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gradmap.core.adapters import adapter, text_config
from gradmap.core.branches import refuse_save
from gradmap.core.calib import microbatches
from gradmap.core.capture import capture, forward_quietly
from gradmap.core.components import REPAIRS, Repair, calibration_nll, model_device
from gradmap.core.layers import active_layers, decoder_layers


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % k for k in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j − i) mod q."""
    chi = torch.tensor([0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley I (m = q+1, q ≡ 3 mod 4) or II (m = 2(q+1), q ≡ 1 mod 4)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


def hadamard(d: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix of order d = 2^k·m (Sylvester ⊗ Paley), or a one-line error naming d."""
    m = d
    while m % 2 == 0 and _paley(m) is None:
        m //= 2
    base = _paley(m)
    if base is None:
        raise ValueError(
            f"repair 'linearpatch': no Hadamard construction for hidden size {d} (2^k times a Paley order); "
            "use rotation=none"
        )
    h = base
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(sylvester, h)
    return h / math.sqrt(d)


class LinearPatch(nn.Module):
    """h ↦ h·R·diag(scale)·Rᵀ in fp32; ``scale`` is the parameter, the rotation R a fixed non-persistent buffer."""

    def __init__(self, scale: torch.Tensor, rotation: torch.Tensor | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.float(), requires_grad=False)
        self.register_buffer("rotation", None if rotation is None else rotation.float(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        if self.rotation is None:
            return (x * self.scale).to(h.dtype)
        return (((x @ self.rotation) * self.scale) @ self.rotation.T).to(h.dtype)


def _install(model: nn.Module, target: nn.Module, patch: LinearPatch) -> None:
    """Keep the patch in ``body.linear_patches`` (so blocks keep their layout) and call it before ``target``."""
    body = adapter(model).body
    if not isinstance(getattr(body, "linear_patches", None), nn.ModuleList):
        body.add_module("linear_patches", nn.ModuleList())
    body.linear_patches.append(patch)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (patch(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": patch(kwargs["hidden_states"])}

    target.register_forward_pre_hook(hook, with_kwargs=True)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the decoder stack and the LM head, or a one-line error."""
    body = adapter(model).body
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        if isinstance(getattr(body, name, None), nn.Module):
            return getattr(body, name)
    raise ValueError(f"repair 'linearpatch': no final norm found on {type(body).__name__} (after the last layer)")


def runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs (a, b) of consecutive removed indices, ascending."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(removed)):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


@dataclass
class LinearPatchRepair(Repair):
    """A Hadamard-rotated channel scaling in front of the first survivor of every removed run (not merged)."""

    name: ClassVar[str] = "linearpatch"
    rotation: str = "hadamard"  # hadamard (the paper) | none (plain channel scaling)

    def __post_init__(self) -> None:
        self.check_choice("rotation", ["hadamard", "none"])

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        layers = decoder_layers(model)
        d = text_config(model).hidden_size
        rot = hadamard(d).to(model_device(model), torch.float32) if self.rotation == "hadamard" else None
        alive = list(range(len(layers)))
        patches = []
        for a, b in runs(removed):
            target = layers[b + 1] if b + 1 < len(layers) else final_norm(model)
            with active_layers(model, alive):
                scale = self._scale(model, calib_ids, layers[a], target, rot)
            _install(model, target, LinearPatch(scale, rot))
            alive = [i for i in alive if not a <= i <= b]
            patches.append(
                {"run": [a, b], "at": b + 1 if b + 1 < len(layers) else "final_norm", "scale_mean": float(scale.mean())}
            )
        refuse_save(
            model,
            "the LinearPatch repair adds explicit modules on the residual stream that a stock checkpoint cannot "
            "hold (it is not mergeable); evaluate the model in memory",
        )
        return {
            "merged": False,
            "rotation": self.rotation,
            "patches": patches,
            "extra_params": d * len(patches),
            "forward_passes": len(patches) * len(microbatches(calib_ids, self.micro_batch_size)),
        }

    def _scale(self, model, calib_ids, first: nn.Module, target: nn.Module, rot) -> torch.Tensor:
        """s_c = Σ_t |(h_target R)_c| / Σ_t |(h_first R)_c| on the current model (with the run still present)."""
        num = den = None
        with torch.inference_mode():
            for mb in microbatches(calib_ids, self.micro_batch_size):
                with capture({"i": first, "j": target}, "input", stop_at=target) as got:
                    forward_quietly(adapter(model).body, mb.to(model_device(model)))
                xi, xj = (got[k].float().reshape(-1, got[k].shape[-1]) for k in ("i", "j"))
                if rot is not None:
                    xi, xj = xi @ rot, xj @ rot
                si, sj = xi.abs().double().sum(0), xj.abs().double().sum(0)
                num, den = (sj, si) if num is None else (num + sj, den + si)
        return (num / den.clamp_min(1e-12)).float()

    def diagnostics(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        return {"calib_nll_after": calibration_nll(model, calib_ids, self.micro_batch_size)}


REPAIRS.add("linearpatch", LinearPatchRepair)
