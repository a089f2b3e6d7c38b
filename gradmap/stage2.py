"""GradMAP stage 2: projection compensation at the layer whose output mean drifts most, merged into weights.

For a removed set S, let nxt(j) be the next surviving layer after survivor j (L if none) and r_j the dense
model's input to nxt(j), i.e. the dense output of layer nxt(j)−1. The drift of survivor j is

    Δ_j = ‖mean(h'_j) − mean(r_j)‖₂ / ‖mean(r_j)‖₂                 (means over all calibration tokens, fp64)

and the compensation site is ℓ† = argmax Δ_j. On the *uncompensated* pruned model, each token gives a row of
X = m'_ℓ† (the ``mlp.down_proj`` output of ℓ†) and Y = r_ℓ† − h'_ℓ† + m'_ℓ† (the branch output that would make the
layer output match the dense reference). In one step, closed form:

    B = (XᵀX + λI)⁻¹ (XᵀY + λI),   λ = lambda_rel · tr(XᵀX)/d,   P = Bᵀ,   W_down ← P · W_down

so the pruned model keeps its architecture and parameter count (METHODS.md §3). ``lambda_rel=0`` with
``site=last_before_cut`` is ReplaceMe's least-squares transform (repair ``linear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.base import REPAIRS, Repair, calibration_nll, model_device
from gradmap.calib import microbatches
from gradmap.capture import capture, forward_quietly
from gradmap.layers import active_layers, decoder_layers


def next_survivor_map(n_layers: int, removed: Sequence[int]) -> dict[int, int]:
    """nxt(j) for every survivor j: the next surviving layer, or ``n_layers`` after the last one."""
    alive = [i for i in range(n_layers) if i not in set(removed)]
    return {j: (alive[k + 1] if k + 1 < len(alive) else n_layers) for k, j in enumerate(alive)}


def solve_projection(xtx: torch.Tensor, xty: torch.Tensor, lambda_rel: float, reg_target: str = "identity"
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Closed-form ridge fit of B in min ‖XB − Y‖² + λ‖B − B₀‖² (B₀ = I or 0); returns P = Bᵀ and diagnostics.

    Solved by Cholesky in float64. With λ = 0 and a singular XᵀX the Cholesky step fails and the
    minimum-norm least-squares solution is used instead; ``solver`` in the diagnostics says which one ran.
    """
    d = xtx.shape[0]
    xtx, xty = xtx.double(), xty.double()
    lam = lambda_rel * float(torch.trace(xtx)) / d
    eye = torch.eye(d, dtype=torch.float64, device=xtx.device)
    lhs = xtx + lam * eye
    rhs = xty + lam * eye if reg_target == "identity" else xty
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        b = torch.cholesky_solve(rhs, chol)
        solver = "cholesky"
    else:
        b = torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(lhs.device)
        solver = "lstsq_min_norm"
    eigs = torch.linalg.eigvalsh(lhs)
    cond = float(eigs[-1] / eigs[0]) if float(eigs[0]) > 0 else math.inf
    p = b.T.contiguous()
    return p, {"lambda": lam, "cond": cond, "p_minus_i_fro": float(torch.linalg.matrix_norm(p - eye)),
               "solver": solver}


def merge_into_down_proj(layer: nn.Module, p: torch.Tensor) -> None:
    """W_down ← P·W_down (and b ← P·b): the layer's branch output m becomes P·m with no new module."""
    down = layer.mlp.down_proj
    with torch.no_grad():
        p = p.to(down.weight.device)
        down.weight.copy_((p @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((p @ down.bias.double()).to(down.bias.dtype))


@dataclass
class ProjectionRepair(Repair):
    """One projection compensation matrix, fitted in closed form and merged into ``mlp.down_proj``."""

    name: ClassVar[str] = "projection"
    site: str = "max_shift"  # max_shift | last_before_cut | first_after_cut
    shift_ref: str = "next_input"  # next_input | same_layer
    shift_stat: str = "relative"  # relative | absolute | rms
    skip_first_tokens: int = 0
    lambda_rel: float = 1e-2
    reg_target: str = "identity"  # identity | zero
    merge: str = "down_proj"  # down_proj (only: merged into existing weights)
    _original_down: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_choice("site", ["max_shift", "last_before_cut", "first_after_cut"])
        self.check_choice("shift_ref", ["next_input", "same_layer"])
        self.check_choice("shift_stat", ["relative", "absolute", "rms"])
        self.check_choice("reg_target", ["identity", "zero"])
        self.check_choice("merge", ["down_proj"])
        if self.lambda_rel < 0:
            raise ValueError(f"repair 'projection': lambda_rel must be >= 0, got {self.lambda_rel}")

    # -- pass 1: where does the pruned model drift most? ------------------------------------------------------
    def _token_sums(self, model: nn.Module, batches: list[torch.Tensor], alive: list[int]) -> dict[int, torch.Tensor]:
        """Σ over tokens of each alive layer's output (fp64), from one forward of the model with ``alive``."""
        layers = decoder_layers(model)
        device = model_device(model)
        sums: dict[int, torch.Tensor] = {}
        with active_layers(model, alive), torch.inference_mode():
            named = {str(i): layers[i] for i in alive}
            for mb in batches:
                with capture(named, "output", stop_at=layers[alive[-1]]) as outs:
                    forward_quietly(model.model, mb.to(device))
                for i in alive:
                    h = outs[str(i)][:, self.skip_first_tokens:].double()
                    if self.shift_stat == "rms":
                        h = h.square()
                    s = h.sum(dim=(0, 1))
                    sums[i] = sums[i] + s if i in sums else s
        return sums

    def shifts(self, model: nn.Module, batches: list[torch.Tensor], removed: Sequence[int]) -> dict[int, float]:
        """Δ_j for every survivor j (original indices), from one dense and one pruned forward."""
        n_layers = len(decoder_layers(model))
        nxt = next_survivor_map(n_layers, removed)
        alive = list(nxt)
        dense = self._token_sums(model, batches, list(range(n_layers)))
        pruned = self._token_sums(model, batches, alive)
        out = {}
        for j in alive:
            ref = dense[nxt[j] - 1] if self.shift_ref == "next_input" else dense[j]
            diff = float(torch.linalg.vector_norm(pruned[j] - ref))
            if self.shift_stat == "relative":
                diff /= max(float(torch.linalg.vector_norm(ref)), 1e-30)
            out[j] = diff
        return out

    def choose_site(self, shifts: dict[int, float], nxt: dict[int, int], removed: Sequence[int]) -> int:
        if self.site == "max_shift":
            return max(shifts, key=lambda j: (shifts[j], -j))
        cut_starts = sorted(j for j in nxt if nxt[j] != j + 1 and nxt[j] - 1 in set(removed))
        n_layers = len(nxt) + len(removed)
        if not cut_starts:
            raise ValueError("repair 'projection': nothing was removed before a survivor; no site to compensate")
        if self.site == "last_before_cut":
            return cut_starts[0]
        after = nxt[cut_starts[0]]
        if after >= n_layers:
            raise ValueError("repair 'projection': site=first_after_cut but the cut reaches the last layer")
        return after

    # -- pass 2: fit P at the site --------------------------------------------------------------------------
    def fit(self, model: nn.Module, batches: list[torch.Tensor], removed: Sequence[int], site: int
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Accumulate XᵀX and XᵀY (fp64) over the calibration set, both forwards stopped as early as possible."""
        layers = decoder_layers(model)
        n_layers = len(layers)
        nxt = next_survivor_map(n_layers, removed)
        ref_layer = layers[nxt[site] - 1]
        alive = list(nxt)
        device = model_device(model)
        d = model.config.hidden_size
        xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
        xty = torch.zeros(d, d, dtype=torch.float64, device=device)
        yty = xtx.new_zeros(())
        sq_err_identity = xtx.new_zeros(())
        rows = 0
        skip = self.skip_first_tokens
        with torch.inference_mode():
            for mb in batches:
                mb = mb.to(device)
                with capture({"r": ref_layer}, "output", stop_at=ref_layer) as dense_out:
                    forward_quietly(model.model, mb)
                with active_layers(model, alive), capture({"h": layers[site]}, "output", stop_at=layers[site]) as po, \
                        capture({"m": layers[site].mlp.down_proj}, "output") as mo:
                    forward_quietly(model.model, mb)
                x = mo["m"][:, skip:].reshape(-1, d).double()
                y = (dense_out["r"][:, skip:].reshape(-1, d).double() - po["h"][:, skip:].reshape(-1, d).double()) + x
                xtx += x.T @ x
                xty += x.T @ y
                yty += (y * y).sum()
                sq_err_identity += ((x - y) ** 2).sum()
                rows += x.shape[0]
        return xtx, xty, {"rows": rows, "yty": float(yty), "mse_before": float(sq_err_identity) / (rows * d)}

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        layers = decoder_layers(model)
        n_layers = len(layers)
        nxt = next_survivor_map(n_layers, removed)
        batches = microbatches(calib_ids, self.micro_batch_size)
        with tqdm(total=2, desc="projection repair", unit="pass", leave=False) as bar:
            shifts = self.shifts(model, batches, removed) if self.site == "max_shift" else {}
            bar.update(1)
            site = self.choose_site(shifts, nxt, removed)
            xtx, xty, stats = self.fit(model, batches, removed, site)
            bar.update(1)
        p, solve_info = solve_projection(xtx, xty, self.lambda_rel, self.reg_target)
        b = p.T
        d = xtx.shape[0]
        resid = stats["yty"] - 2 * float((b * xty).sum()) + float((b * (xtx @ b)).sum())
        down = layers[site].mlp.down_proj
        self._original_down = {"module": down, "weight": down.weight.detach().clone()}
        merge_into_down_proj(layers[site], p)
        return {
            "site": site,
            "shifts": shifts,
            "mse_before": stats["mse_before"],
            "mse_after": resid / (stats["rows"] * d),
            "fit_rows": stats["rows"],
            **solve_info,
        }

    def diagnostics(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        """Calibration NLL with and without the merged matrix (outside the timed span); flags a rise."""
        if not self._original_down:
            return {}
        down = self._original_down["module"]
        after = calibration_nll(model, calib_ids, self.micro_batch_size)
        merged = down.weight.detach().clone()
        with torch.no_grad():
            down.weight.copy_(self._original_down["weight"])
            before = calibration_nll(model, calib_ids, self.micro_batch_size)
            down.weight.copy_(merged)
        self._original_down = {}
        return {"calib_nll_uncompensated": before, "calib_nll_compensated": after, "nll_rose": after > before}


REPAIRS.add("projection", ProjectionRepair)


@dataclass
class LinearRepair(ProjectionRepair):
    """ReplaceMe-style least squares: the projection fit at the last layer before the cut, with no ridge."""

    name: ClassVar[str] = "linear"
    site: str = "last_before_cut"
    lambda_rel: float = 0.0


REPAIRS.add("linear", LinearRepair)
