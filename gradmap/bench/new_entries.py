"""Bench entries for MKA, BlockPruner, LaCo and the Prune&Comp / LinearPatch repairs (issue 14).

Each is timed through ``prune()`` at matched tokens (the bench's calibration D, 128 × 2048 at the GPU preset) and,
where the reference uses different data, at its native setting: MKA's pipeline embeds one ≤512-token prompt per
MMLU task (57 × 512); LaCo compares "a few sentences" (5 × 512). BlockPruner's native setting is the matched one
(128 × 2048), but its 2n·2L candidate forwards (904 at the 7B shape) are too long to run, so, like SLEB, a few
are timed through ``prune()`` and scaled by their count. The repairs follow ShortGPT's cut.

``gradmap.bench.runner`` builds these with its own helpers (:func:`new_entries`), so this module does not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gradmap.bench.config import calibration_ids

Entry = Callable[[Any], list[dict[str, Any]]]

MKA_NATIVE = (57, 512)  # one prompt per MMLU task, padded/truncated to 512 tokens in the reference
LACO_NATIVE = (5, 512)  # the paper's "few sentences"


def new_entries(run_prune: Callable[..., dict], row: Callable[..., dict], scale: Callable[..., None]) -> dict:
    """The entries, given the runner's ``run_prune``, ``_row`` and ``scale_selection``."""

    def with_calib(ctx: Any, n_samples: int, seq_len: int) -> Any:
        ids = calibration_ids(ctx.fresh.config.vocab_size, n_samples, seq_len, ctx.cfg.seed)
        return dataclasses.replace(ctx, calib=ids)

    def method_entry(method: str, native: tuple[int, int] | None, note: str) -> Entry:
        def entry(ctx: Any) -> list[dict[str, Any]]:
            if native is not None:
                ctx = with_calib(ctx, *native)
            data = run_prune(ctx, method, ratio=ctx.cfg.ratio)
            calls = data["info"]["selector"].get("calib_passes")
            setting = f"native D {native[0]}×{native[1]}" if native else "matched D"
            return [row(f"{method} ({setting})", data, {"f": float(calls)} if calls else None, note)]

        return entry

    def repair_entry(repair: str) -> Entry:
        def entry(ctx: Any) -> list[dict[str, Any]]:
            data = run_prune(ctx, "shortgpt", ratio=ctx.cfg.ratio, repair=repair)
            merged = "not merged (explicit patch module)" if repair == "linearpatch" else "merged into the weights"
            return [row(f"shortgpt + {repair}", data, {"f": 1.0}, f"repair {merged}; native D = matched D")]

        return entry

    def blockpruner(ctx: Any) -> list[dict[str, Any]]:
        """Time 3 candidate forwards + the influence forward (search_pool=2, n_remove=1), scale to 2n·2L."""
        data = run_prune(ctx, "blockpruner", n_remove=1, search_pool=2, prefix_cache=False)
        full = sum(2 * ctx.n_layers - k for k in range(2 * ctx.n_remove))
        timed = 4
        scale(data, timed, full, full / timed, ctx.n_remove)
        note = (
            f"extrapolated: {timed} of {full} forwards over D timed (prefix_cache=false, the reference's "
            "computation), scaled by count; native D = matched D"
        )
        return [row("blockpruner (2n·2L unit candidates)", data, {"f": float(full)}, note)]

    return {
        "mka": method_entry("mka", None, "selection + merge plan; repair = mka_merge (weight averaging)"),
        "mka_native": method_entry("mka", MKA_NATIVE, "the reference's data size"),
        "blockpruner": blockpruner,
        "laco": method_entry("laco", None, "selection = RDSC collapses tried; repair = laco_merge"),
        "laco_native": method_entry("laco", LACO_NATIVE, "the paper's few sentences"),
        "prunecomp": repair_entry("prunecomp"),
        "linearpatch": repair_entry("linearpatch"),
    }
