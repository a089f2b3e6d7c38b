"""GradMAP stage 2: projection compensation at the layer whose output mean drifts most, merged into weights.

For a removed set S, let nxt(j) be the next surviving layer after survivor j (L if none) and r_j the dense
model's input to nxt(j), i.e. the dense output of layer nxt(j)−1. The drift of survivor j is

    Δ_j = ‖mean(h'_j) − mean(r_j)‖₂ / ‖mean(r_j)‖₂                 (means over all calibration tokens, fp64)

and the compensation site is ℓ† = argmax Δ_j. On the *uncompensated* pruned model, each token gives a row of
X = m'_ℓ† (the output of ℓ†'s MLP-branch last linear, ``down_proj`` in Llama) and Y = (r_ℓ† − h'_ℓ†)/c + m'_ℓ† (the
branch output that would make the layer output match the dense reference; c is the measured gain of m in the block
output, 1 for pre-norm blocks, Granite's residual multiplier; a block that normalises m after the branch, as Gemma 2/3
and OLMo 2 do, is refused). In one step, closed form:

    B = (XᵀX + λI)⁻¹ (XᵀY + λI),   λ = lambda_rel · tr(XᵀX)/d,   P = Bᵀ,   W_down ← P · W_down

so the pruned model keeps its architecture and parameter count (docs/protocol.md §3). ``form=mean_rank1`` uses the
mean-only P; with dev windows P is chosen or refused on dev NLL (gradmap/core/projection.py). ``lambda_rel=0`` with
``site=last_before_cut`` is ReplaceMe's least-squares transform (repair ``linear``).

Cost. Both passes run the pruned model *in lockstep* with one dense forward (:func:`_lockstep`): each surviving
layer is applied to the pruned stream right after the dense model has run it, with the same mask and rotary
arguments, and the layers before the first cut run once for both. The shift pass therefore costs one dense forward
without logits plus the survivors after the first cut; it also keeps the stream entering the layer just before the
first cut (one hidden state per calibration token, e.g. 2 GiB for 128×2048 tokens at d=4096 in bf16), so the fit
pass starts there and stops at the reference layer nxt(ℓ†)−1. The solve is one d×d Cholesky; the condition number
(an eigensolve) is computed in the untimed diagnostics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core.adapters import MergeTarget, adapter, mlp_merge_target
from gradmap.core.calib import microbatches
from gradmap.core.capture import StopForward, first_tensor, forward_quietly
from gradmap.core.components import REPAIRS, Repair, calibration_nll, model_device
from gradmap.core.layers import active_layers, decoder_layers
from gradmap.core.projection import (
    LAMBDA_GRID,
    candidate_matrices,
    condition_number,
    merge_checked,
    solve_projection,
)

__all__ = ["LinearRepair", "ProjectionRepair", "next_survivor_map", "solve_projection"]


def next_survivor_map(n_layers: int, removed: Sequence[int]) -> dict[int, int]:
    """nxt(j) for every survivor j: the next surviving layer, or ``n_layers`` after the last one."""
    alive = [i for i in range(n_layers) if i not in set(removed)]
    return {j: (alive[k + 1] if k + 1 < len(alive) else n_layers) for k, j in enumerate(alive)}


def merge_target(model: nn.Module, site: int, probe_ids: torch.Tensor, who: str) -> MergeTarget:
    """Where the site's MLP-branch transform merges exactly (measured), or a one-line refusal of the layout."""
    adapt = adapter(model)
    target = mlp_merge_target(adapt, site, probe_ids)
    if target is None:
        raise ValueError(
            f"repair {who!r}: in model type {adapt.model_type!r} the block output is not linear in the MLP output "
            f"({adapt.layout.mlp_out}) nor in a norm after it, so no projection can be merged exactly; "
            "use repair=none or another repair"
        )
    return target


def solve_diagonal(
    xtx: torch.Tensor, xty: torch.Tensor, lambda_rel: float, reg_target: str
) -> tuple[torch.Tensor, dict]:
    """Per-channel ridge fit s_i = (Σx_i y_i + λ·t)/(Σx_i² + λ), t = 1 (identity) or 0; P = diag(s).

    The form a post-branch norm's weight can absorb exactly; λ is scaled as in :func:`solve_projection`.
    """
    d = xtx.shape[0]
    lam = lambda_rel * float(torch.trace(xtx)) / d
    s = (torch.diagonal(xty) + (lam if reg_target == "identity" else 0.0)) / (torch.diagonal(xtx) + lam).clamp_min(
        1e-300
    )
    p = torch.diag(s)
    eye = torch.eye(d, dtype=p.dtype, device=p.device)
    return p, {"lambda": lam, "p_minus_i_fro": float(torch.linalg.matrix_norm(p - eye)), "solver": "diagonal"}


Visit = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


@contextmanager
def _lockstep(
    layers: nn.ModuleList, removed: Sequence[int], stop_after: int, visit: Visit, state: dict[str, bool] | None = None
) -> Iterator[None]:
    """Run the pruned model in lockstep with the dense forward, inside the dense layers' forward hooks.

    After dense layer i has run, the pruned stream advances through layer i too if i survives, with the very
    keyword arguments (mask, rotary embeddings) that the dense call got. Before the first cut the two streams
    are the same tensor, so the shared prefix runs once. ``visit(i, dense input, dense output, pruned output or
    None)`` sees every layer the dense forward reaches; the forward stops after ``stop_after`` (no final norm, no
    logits). ``state['pruned_call']`` is True while a pruned layer runs, for hooks inside the layers.
    """
    removed_set = set(removed)
    first_cut = min(removed_set)
    state = {} if state is None else state
    state["pruned_call"] = False
    stream: dict[str, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_dense = first_tensor(output)
            if i == first_cut:
                stream["pruned"] = h_in
            if i < first_cut:
                stream["pruned"] = h_dense
            elif i not in removed_set:
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                state["pruned_call"] = True
                try:
                    stream["pruned"] = first_tensor(module.forward(stream["pruned"], *args[1:], **kw))
                finally:
                    state["pruned_call"] = False
            visit(i, h_in, h_dense, None if i in removed_set else stream["pruned"])
            if i == stop_after:
                raise StopForward

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ProjectionRepair(Repair):
    """One projection compensation matrix, fitted in closed form and merged into ``mlp.down_proj``."""

    name: ClassVar[str] = "projection"
    site: str = "max_shift"  # max_shift | last_before_cut | first_after_cut
    shift_ref: str = "next_input"  # next_input | same_layer
    shift_stat: str = "relative"  # relative | absolute | rms
    skip_first_tokens: int = 0
    form: str = "full"  # full (ridge-fitted d×d P) | mean_rank1 (P μ_X = μ_Y, identity elsewhere)
    lambda_rel: Any = 1.0  # λ = lambda_rel · tr(XᵀX)/d (>= 0), or "auto": the grid value with the lowest dev NLL
    lambda_grid: list = field(default_factory=lambda: list(LAMBDA_GRID))  # candidates of lambda_rel=auto
    reg_target: str = "identity"  # identity | zero
    refuse_worse: bool = True  # keep P = I when the fitted P raises dev NLL (needs dev windows)
    merge: str = "down_proj"  # down_proj (only: merged into the MLP branch's last linear, whatever its name)
    dev_ids: torch.Tensor | None = field(default=None, init=False, repr=False)  # set by prune(dev_ids=...)
    _original_down: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_choice("site", ["max_shift", "last_before_cut", "first_after_cut"])
        self.check_choice("shift_ref", ["next_input", "same_layer"])
        self.check_choice("shift_stat", ["relative", "absolute", "rms"])
        self.check_choice("reg_target", ["identity", "zero"])
        self.check_choice("merge", ["down_proj"])
        self.check_choice("form", ["full", "mean_rank1"])
        if isinstance(self.lambda_rel, str):
            if self.lambda_rel != "auto":
                raise ValueError(f"repair {self.name!r}: lambda_rel={self.lambda_rel!r}; allowed: a number >= 0, auto")
        elif self.lambda_rel < 0:
            raise ValueError(f"repair {self.name!r}: lambda_rel must be >= 0 or auto, got {self.lambda_rel}")
        self.lambda_grid = [float(v) for v in self.lambda_grid]
        if not self.lambda_grid or min(self.lambda_grid) < 0:
            raise ValueError(f"repair {self.name!r}: lambda_grid={list(self.lambda_grid)} must be non-empty, >= 0")

    # -- pass 1: where does the pruned model drift most? ------------------------------------------------------
    def _token_sum(self, h: torch.Tensor) -> torch.Tensor:
        """Σ over tokens of one hidden state in fp64 (squared for ``shift_stat=rms``), without an fp64 copy."""
        h = h[:, self.skip_first_tokens :]
        if self.shift_stat == "rms":
            return h.double().square().sum(dim=(0, 1))
        return h.sum(dim=(0, 1), dtype=torch.float64)

    def shift_pass(
        self, model: nn.Module, batches: list[torch.Tensor], removed: Sequence[int], cache_from: int
    ) -> tuple[dict[int, float], list[torch.Tensor]]:
        """Δ_j for every survivor j, from ONE dense forward with the pruned model run in lockstep.

        Also returns, per micro-batch, the stream entering layer ``cache_from`` (the same in the dense and the
        pruned model when no layer before it is removed), so that the fit pass can start there; nothing is kept
        when ``cache_from`` is 0 (the embeddings are cheaper to recompute than to keep).
        """
        layers = decoder_layers(model)
        nxt = next_survivor_map(len(layers), removed)
        refs = {j: (nxt[j] - 1 if self.shift_ref == "next_input" else j) for j in nxt}
        dense: dict[int, torch.Tensor] = {}
        pruned: dict[int, torch.Tensor] = {}
        cache: list[torch.Tensor] = []
        wanted = set(refs.values())

        def add(sums: dict[int, torch.Tensor], i: int, value: torch.Tensor) -> None:
            sums[i] = sums[i] + value if i in sums else value

        def visit(i: int, h_in: torch.Tensor, h_dense: torch.Tensor, h_pruned: torch.Tensor | None) -> None:
            if i == cache_from and cache_from > 0:
                cache.append(h_in)
            dense_sum = self._token_sum(h_dense) if i in wanted or h_pruned is h_dense else None
            if i in wanted:
                add(dense, i, dense_sum)
            if h_pruned is not None:  # the same tensor before the first cut: Δ is then exactly 0
                add(pruned, i, dense_sum if h_pruned is h_dense else self._token_sum(h_pruned))

        device = model_device(model)
        body = adapter(model).body
        with torch.inference_mode(), _lockstep(layers, removed, stop_after=max(wanted | set(nxt)), visit=visit):
            for mb in batches:
                forward_quietly(body, mb.to(device))
        out = {}
        for j in nxt:
            ref = dense[refs[j]].to(device)  # a dispatched model keeps each layer's sums on its own device
            diff = float(torch.linalg.vector_norm(pruned[j].to(device) - ref))
            if self.shift_stat == "relative":
                diff /= max(float(torch.linalg.vector_norm(ref)), 1e-30)
            out[j] = diff
        return out, cache

    def choose_site(self, shifts: dict[int, float], nxt: dict[int, int], removed: Sequence[int]) -> int:
        if self.site == "max_shift":
            return max(shifts, key=lambda j: (shifts[j], -j))
        cut_starts = sorted(j for j in nxt if nxt[j] != j + 1 and nxt[j] - 1 in set(removed))
        n_layers = len(nxt) + len(removed)
        if not cut_starts:
            raise ValueError(f"repair {self.name!r}: no layer was removed after a survivor; no site to compensate")
        if self.site == "last_before_cut":
            return cut_starts[0]
        after = nxt[cut_starts[0]]
        if after >= n_layers:
            raise ValueError(f"repair {self.name!r}: site=first_after_cut but the cut reaches the last layer")
        return after

    # -- pass 2: fit P at the site --------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        removed: Sequence[int],
        site: int,
        cache: Sequence[torch.Tensor] = (),
        cache_from: int = 0,
        gain: float = 1.0,
        target: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Accumulate XᵀX and XᵀY (fp64) over the calibration set in one lockstep pass, stopped at the reference.

        The dense model runs up to layer ``ref = nxt(site) − 1`` and the pruned one up to the site; with a
        ``cache`` (the stream entering ``cache_from`` per micro-batch, from :meth:`shift_pass`) both start there
        instead of at the embeddings (a pre-hook swaps the cached stream in, so embedding scales and position
        embeddings added before the first layer stay right). ``gain`` is c in Y = (r − h')/c + m; ``target`` is the
        module whose output is m (default: the MLP branch's last linear).
        """
        adapt = adapter(model)
        layers = adapt.layers
        nxt = next_survivor_map(len(layers), removed)
        ref = nxt[site] - 1
        first_cut = min(removed)
        device = model_device(model)
        d = model.config.hidden_size
        xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
        xty = torch.zeros(d, d, dtype=torch.float64, device=device)
        yty = xtx.new_zeros(())
        sum_x = xtx.new_zeros(d)
        sum_y = xtx.new_zeros(d)
        sq_err_identity = xtx.new_zeros(())
        rows = 0
        skip = self.skip_first_tokens
        got: dict[str, torch.Tensor] = {}
        state = {"pruned_call": False}

        def visit(i: int, h_in: torch.Tensor, h_dense: torch.Tensor, h_pruned: torch.Tensor | None) -> None:
            if i == ref:
                got["r"] = h_dense
            if i == site:
                got["h"] = h_pruned

        def down_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if state["pruned_call"] or site < first_cut:  # before the cut the dense call is the pruned one
                got["m"] = output

        start = cache_from if cache else 0
        path = list(range(start, ref + 1))
        cached = {"k": 0}

        def swap_in(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            h = cache[cached["k"]]
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handles = [(target or adapt.mlp_out(layers[site])).register_forward_hook(down_hook)]
        if cache:
            handles.append(layers[start].register_forward_pre_hook(swap_in, with_kwargs=True))
        try:
            with (
                torch.inference_mode(),
                active_layers(model, path),
                _lockstep(layers, removed, stop_after=ref, visit=visit, state=state),
            ):
                for k, mb in enumerate(batches):
                    got.clear()
                    cached["k"] = k
                    forward_quietly(adapt.body, mb.to(device))
                    x = got["m"][:, skip:].reshape(-1, d).double().to(device)
                    r = got["r"][:, skip:].reshape(-1, d).double().to(device)
                    y = (r - got["h"][:, skip:].reshape(-1, d).double().to(device)) / gain + x
                    xtx.addmm_(x.T, x)
                    xty.addmm_(x.T, y)
                    yty += (y * y).sum()
                    sum_x += x.sum(0)
                    sum_y += y.sum(0)
                    sq_err_identity += ((x - y) ** 2).sum()
                    rows += x.shape[0]
        finally:
            for handle in handles:
                handle.remove()
        return (
            xtx,
            xty,
            {
                "rows": rows,
                "yty": float(yty),
                "mse_before": float(sq_err_identity) / (rows * d),
                "mu_x": sum_x / rows,
                "mu_y": sum_y / rows,
            },
        )

    def layer_forwards(self, n_layers: int, removed: Sequence[int], site: int, cache_from: int) -> dict[str, int]:
        """Decoder-layer forwards per micro-batch of each pass (dense + pruned), the unit of its cost.

        One dense forward of the model is ``n_layers`` of them plus embeddings, final norm and logits.
        """
        nxt = next_survivor_map(n_layers, removed)
        first_cut = min(removed)
        shift = 0
        start = 0
        if self.site == "max_shift":
            shift = n_layers + sum(1 for j in nxt if j >= first_cut)
            start = cache_from
        fit = (nxt[site] - 1 - start + 1) + sum(1 for j in nxt if first_cut <= j <= site)
        return {"shift": shift, "fit": fit}

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        layers = decoder_layers(model)
        n_layers = len(layers)
        nxt = next_survivor_map(n_layers, removed)
        batches = microbatches(calib_ids, self.micro_batch_size)
        # Every survivor before the first cut has Δ = 0 and none of them can be a site except the one just before
        # it, so both passes may start at that layer (the stream entering it is the same in both models).
        cache_from = max(min(removed) - 1, 0)
        # Each pass ends by reading its result on the host (a device sync), so these clocks need no extra sync.
        clock = [time.perf_counter()]
        with tqdm(total=2, desc=f"{self.name} repair", unit="pass", leave=False) as bar:
            shifts, cache = (
                self.shift_pass(model, batches, removed, cache_from) if self.site == "max_shift" else ({}, [])
            )
            clock.append(time.perf_counter())
            bar.update(1)
            site = self.choose_site(shifts, nxt, removed)
            target = merge_target(model, site, batches[0][:1, :16].to(model_device(model)), self.name)
            xtx, xty, stats = self.fit(model, batches, removed, site, cache, cache_from, target.gain, target.module)
            clock.append(time.perf_counter())
            del cache
            bar.update(1)
        d = xtx.shape[0]
        down = target.module
        if target.form == "diagonal" and self.form == "mean_rank1":
            raise ValueError(f"repair {self.name!r}: form=mean_rank1 cannot merge into a post-MLP norm; use form=full")
        if target.form == "diagonal":
            grid = self.lambda_grid if self.lambda_rel == "auto" else (float(self.lambda_rel),)
            fits = {repr(float(lam)): solve_diagonal(xtx, xty, lam, self.reg_target) for lam in grid}
            candidates, infos = {k: v[0] for k, v in fits.items()}, {k: v[1] for k, v in fits.items()}
        else:
            candidates, infos = candidate_matrices(self, xtx, xty, stats)
        self._original_down = {"module": down, "weight": down.weight.detach().clone(), "xtx": xtx, "lambda": None}
        chosen, check = merge_checked(self, model, target, removed, candidates)
        clock.append(time.perf_counter())
        solve_info = infos.get(chosen, {"lambda": None, "p_minus_i_fro": 0.0, "solver": "none (refused)"})
        self._original_down["lambda"] = solve_info.get("lambda")
        b = candidates[chosen].T if chosen in candidates else torch.eye(d, dtype=torch.float64, device=xtx.device)
        resid = stats["yty"] - 2 * float((b * xty).sum()) + float((b * (xtx @ b)).sum())
        return {
            "pass_s": {"shift": clock[1] - clock[0], "fit": clock[2] - clock[1]},
            "dev_check_s": clock[3] - clock[2],
            "layer_forwards": self.layer_forwards(len(layers), removed, site, cache_from),
            "site": site,
            "shifts": shifts,
            "form": self.form,
            "lambda_rel_used": None if chosen in ("none", "mean_rank1") else float(chosen),
            "mse_before": stats["mse_before"],
            "mse_after": resid / (stats["rows"] * d),
            "fit_rows": stats["rows"],
            "branch_gain": target.gain,
            "merge_form": target.form,  # full: P·W_down; diagonal: diag(s) merged into the post-MLP norm
            "merged_into": type(down).__name__,
            **solve_info,
            **check,
        }

    def diagnostics(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        """In-sample calibration NLL with and without the merged matrix (outside the timed span).

        This is *not* the health check: in-sample NLL falls whenever the fit overfits. ``nll_rose`` is the dev-NLL
        comparison made in ``apply`` (null when no dev windows were given).
        """
        if not self._original_down or (self._original_down["lambda"] is None and self.form == "full"):  # refused
            return {}
        down = self._original_down["module"]
        after = calibration_nll(model, calib_ids, self.micro_batch_size)
        merged = down.weight.detach().clone()
        with torch.no_grad():
            down.weight.copy_(self._original_down["weight"])
            before = calibration_nll(model, calib_ids, self.micro_batch_size)
            down.weight.copy_(merged)
        xtx, lam = self._original_down["xtx"], self._original_down["lambda"]
        out: dict[str, Any] = {"calib_nll_uncompensated": before, "calib_nll_compensated": after}
        if lam is not None:
            out["cond"] = condition_number(xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device))
        self._original_down = {}
        return out


REPAIRS.add("projection", ProjectionRepair)


@dataclass
class LinearRepair(ProjectionRepair):
    """ReplaceMe-style least squares: the projection fit at the last layer before the cut, with no ridge."""

    name: ClassVar[str] = "linear"
    site: str = "last_before_cut"
    lambda_rel: Any = 0.0
    refuse_worse: bool = False  # ReplaceMe merges its fit unconditionally; the dev NLLs are still recorded


REPAIRS.add("linear", LinearRepair)
