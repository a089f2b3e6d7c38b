"""The projection matrix of GradMAP stage 2: its closed-form fits, its merge into ``down_proj``, and the choice
among candidate matrices on *dev* windows (held out from calibration), never on the data it was fitted on.

Why dev: the in-sample calibration NLL always falls as the ridge λ → 0 while held-out NLL can rise by almost a nat
(1024 rows in a 576-wide stream; docs/protocol.md §6 "Splits"), so any check or choice made on the fitted rows rewards
overfitting. Two forms:

- ``full``: B = (XᵀX + λI)⁻¹(XᵀY + λI), P = Bᵀ (ridge shrinkage toward I);
- ``mean_rank1``: P = I + (μ_Y − μ_X) μ_Xᵀ / ‖μ_X‖², so P μ_X = μ_Y and P differs from I only along μ_X: the
  mean-shift correction in one step, with no bias term (it merges exactly into ``down_proj``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradmap.core.adapters import merge_diagonal, merge_output_transform
from gradmap.core.components import calibration_nll
from gradmap.core.layers import active_layers, decoder_layers

LAMBDA_GRID = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


def condition_number(lhs: torch.Tensor) -> float:
    """cond(XᵀX + λI) of a symmetric matrix from its eigenvalues (a d×d eigensolve: a diagnostic, not the fit)."""
    eigs = torch.linalg.eigvalsh(lhs)
    return float(eigs[-1] / eigs[0]) if float(eigs[0]) > 0 else math.inf


def solve_projection(
    xtx: torch.Tensor, xty: torch.Tensor, lambda_rel: float, reg_target: str = "identity", with_cond: bool = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Closed-form ridge fit of B in min ‖XB − Y‖² + λ‖B − B₀‖² (B₀ = I or 0); returns P = Bᵀ and diagnostics.

    λ = lambda_rel · tr(XᵀX)/d. Solved by Cholesky in float64. With λ = 0 and a singular XᵀX the Cholesky step
    fails and the minimum-norm least-squares solution is used instead; ``solver`` in the diagnostics says which
    one ran. ``with_cond=False`` skips the condition number (an eigensolve as costly as the fit itself).
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
    p = b.T.contiguous()
    out: dict[str, Any] = {"lambda": lam, "p_minus_i_fro": float(torch.linalg.matrix_norm(p - eye)), "solver": solver}
    if with_cond:
        out["cond"] = condition_number(lhs)
    return p, out


def mean_rank1_projection(mu_x: torch.Tensor, mu_y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """P = I + (μ_Y − μ_X) μ_Xᵀ / ‖μ_X‖² (float64): maps μ_X exactly to μ_Y, identity on μ_X's complement."""
    mu_x, mu_y = mu_x.double(), mu_y.double()
    norm2 = float(mu_x @ mu_x)
    if norm2 <= 0:
        raise ValueError("repair 'projection': form=mean_rank1 needs a non-zero mean branch output at the site")
    eye = torch.eye(mu_x.shape[0], dtype=torch.float64, device=mu_x.device)
    p = eye + torch.outer(mu_y - mu_x, mu_x) / norm2
    return p, {"p_minus_i_fro": float(torch.linalg.matrix_norm(p - eye)), "solver": "mean_rank1"}


def candidate_matrices(
    repair: Any, xtx: torch.Tensor, xty: torch.Tensor, stats: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The matrices a projection repair chooses from, keyed by λ_rel (``form=full``: one, or the whole
    ``lambda_grid`` for ``lambda_rel=auto``) or ``mean_rank1``, with each fit's diagnostics."""
    if repair.form == "mean_rank1":
        p, info = mean_rank1_projection(stats["mu_x"], stats["mu_y"])
        return {"mean_rank1": p}, {"mean_rank1": {"lambda": None, **info}}
    grid = repair.lambda_grid if repair.lambda_rel == "auto" else (float(repair.lambda_rel),)
    fits = {repr(float(lam)): solve_projection(xtx, xty, lam, repair.reg_target, with_cond=False) for lam in grid}
    return {k: v[0] for k, v in fits.items()}, {k: v[1] for k, v in fits.items()}


def choose_on_dev(
    down: nn.Module,
    candidates: Mapping[str, torch.Tensor],
    dev_nll: Callable[[], float],
    refuse_worse: bool,
    merge: Callable[[torch.Tensor], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Merge each candidate P into ``down`` (the MLP branch's last linear) in turn, score it by ``dev_nll()``, and
    leave the best merged (or none: P = I).

    The dev NLL without any matrix is always measured first (``dev_nll_uncompensated``). The winner is the
    candidate with the lowest dev NLL; when even it is worse than no matrix and ``refuse_worse`` is set, the
    weights are left as they were and the record says so (``refused``). Returns (chosen key or "none", info).
    """
    merge = merge or (lambda p: merge_output_transform(down, p))
    bias = getattr(down, "bias", None)  # a post-branch norm (Gemma's diagonal target) has none
    original = (down.weight.detach().clone(), None if bias is None else bias.detach().clone())

    def restore() -> None:
        with torch.no_grad():
            down.weight.copy_(original[0])
            if original[1] is not None:
                down.bias.copy_(original[1])

    before = dev_nll()
    grid: dict[str, float] = {}
    for key, p in candidates.items():
        merge(p)
        grid[key] = dev_nll()
        restore()
    best = min(grid, key=lambda k: (grid[k], k))
    refused = refuse_worse and grid[best] > before
    chosen = "none" if refused else best
    if not refused:
        merge(candidates[best])
    info: dict[str, Any] = {
        "dev_nll_uncompensated": before,
        "dev_nll_compensated": before if refused else grid[best],
        "dev_grid": grid,
        "dev_choice": chosen,
        "refused": refused,
        "nll_rose": grid[best] > before,  # the health flag: did the fitted matrix raise dev NLL?
    }
    if refused:
        info["refusal"] = (
            f"every candidate raised dev NLL (best {best}: {grid[best]:.4f} > {before:.4f} without the repair); "
            "kept P = I"
        )
    return chosen, info


def merge_into_target(target: Any, p: torch.Tensor) -> None:
    """P into a merge target (gradmap.core.adapters.MergeTarget): P·W_down, or diag(P) into a post-MLP norm."""
    if target.form == "diagonal":
        merge_diagonal(target, torch.diagonal(p))
    else:
        merge_output_transform(target.module, p)


def merge_checked(
    repair: Any, model: nn.Module, target: Any, removed: Sequence[int], candidates: dict[str, torch.Tensor]
) -> tuple[str, dict[str, Any]]:
    """Merge the candidate with the lowest dev NLL (``repair.dev_ids``), or none if all raise it; without dev windows,
    merge the single candidate unchecked (``lambda_rel=auto`` then fails: it has nothing to choose on)."""
    if repair.dev_ids is None:
        if len(candidates) > 1:
            raise ValueError(
                f"repair {repair.name!r}: lambda_rel=auto chooses on dev windows, but none were given "
                "(calib.dev in the run config, or prune(..., dev_ids=...))"
            )
        ((key, p),) = candidates.items()
        merge_into_target(target, p)
        return key, {"dev_check": "not run: no dev windows given", "refused": False, "nll_rose": None}
    alive = [i for i in range(len(decoder_layers(model))) if i not in set(removed)]

    def dev_nll() -> float:
        with active_layers(model, alive):
            return calibration_nll(model, repair.dev_ids, repair.micro_batch_size)

    merge = lambda p: merge_into_target(target, p)  # noqa: E731
    chosen, info = choose_on_dev(target.module, candidates, dev_nll, repair.refuse_worse, merge)
    return chosen, {"dev_check": f"{repair.dev_ids.shape[0]}x{repair.dev_ids.shape[1]} dev windows", **info}
