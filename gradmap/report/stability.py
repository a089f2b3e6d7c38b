"""stability.{csv,png,pdf}: do the removed layers depend on the calibration sample (seed) or its size?

Per model × eval × method × ratio, the Jaccard overlap |A ∩ B| / |A ∪ B| of the removed-layer sets of every pair of
runs that differ only in the seed (same calibration size), and of every pair that differ in calibration size. 1 =
the same layers every time; a low value means the method's choice is mostly the calibration sample's noise, and a
single-seed table says little about it. The figure adds the removed-layer frequency map (fraction of runs that
removed each layer).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from gradmap.report.common import DENSE, display_name
from gradmap.report.plots import removed_grid
from gradmap.report.style import TEXT_WIDTH, figure, grid, order_key, save, styles

COLUMNS = ["model", "eval", "variant", "n_remove", "n_layers", "axis", "runs", "pairs", "mean_jaccard", "min_jaccard"]


def jaccard(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """|a ∩ b| / |a ∪ b| of two layer sets (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _pairs(group: pd.DataFrame, same: str | None, differ: str) -> list[float]:
    values = []
    for (_, r1), (_, r2) in combinations(group.iterrows(), 2):
        if r1[differ] == r2[differ] or (same is not None and r1[same] != r2[same]):
            continue
        values.append(jaccard(r1["removed_layers"], r2["removed_layers"]))
    return values


def stability_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per model × eval × method × ratio × axis (seed, calib_size): runs, pairs, mean/min Jaccard."""
    pruned = rows[rows["method"] != DENSE]
    out = []
    for (model, ev, variant, n_remove), group in pruned.groupby(
        ["model", "eval", "variant", "n_remove"], sort=False, dropna=False
    ):
        # seed axis: runs that drew different calibration windows (calib_seed) at the same calibration size
        seed_col = "calib_seed" if "calib_seed" in group and group["calib_seed"].notna().all() else "seed"
        for axis, same, differ in (("seed", "calib_tokens", seed_col), ("calib_size", None, "calib_tokens")):
            values = _pairs(group, same, differ)
            out.append(
                {
                    "model": model,
                    "eval": ev,
                    "variant": variant,
                    "n_remove": n_remove,
                    "n_layers": group["n_layers"].iloc[0],
                    "axis": axis,
                    "runs": len(group),
                    "pairs": len(values),
                    "mean_jaccard": float(np.mean(values)) if values else np.nan,
                    "min_jaccard": float(np.min(values)) if values else np.nan,
                }
            )
    frame = pd.DataFrame(out, columns=COLUMNS)
    return frame.sort_values(["model", "eval", "n_remove", "variant"], key=_sort_key, kind="stable")


def _sort_key(col: pd.Series) -> pd.Series:
    return col.map(order_key) if col.name == "variant" else col


def plot_stability(rows: pd.DataFrame, table: pd.DataFrame, out: Path) -> list[Path]:
    """Left: Jaccard across seeds per method and ratio; right: removed-layer frequency maps (per model × ratio)."""
    pruned = rows[rows["method"] != DENSE]
    if pruned.empty:
        return []
    cells = [
        ((model, n_remove), g)
        for (model, n_remove), g in pruned.groupby(["model", "n_remove"], sort=False)
        if len(g) > 0
    ]
    nrows, ncols = grid(len(cells) + 1)
    n_variants = pruned["variant"].nunique()
    fig, axes = figure(TEXT_WIDTH, max(2.2, 0.14 * n_variants + 1.0) * nrows, nrows, ncols)
    ax0 = axes.flat[0]
    seeds = table[(table["axis"] == "seed") & table["mean_jaccard"].notna()]
    if seeds.empty:
        ax0.text(0.5, 0.5, "one run per method:\nno seed overlap to measure", ha="center", va="center")
        ax0.set_axis_off()
    else:
        style = styles(seeds["variant"])
        variants = sorted(seeds["variant"].unique(), key=order_key)
        ratios = sorted(seeds["n_remove"].unique())
        width = 0.8 / len(ratios)
        for j, n_remove in enumerate(ratios):
            at = seeds[seeds["n_remove"] == n_remove].groupby("variant")["mean_jaccard"].mean().reindex(variants)
            lo = seeds[seeds["n_remove"] == n_remove].groupby("variant")["min_jaccard"].min().reindex(variants)
            xs = np.arange(len(variants)) + (j - (len(ratios) - 1) / 2) * width
            ax0.bar(
                xs,
                at.to_numpy(float),
                width,
                yerr=[np.nan_to_num(at.to_numpy(float) - lo.to_numpy(float)), np.zeros(len(xs))],
                capsize=1.5,
                color=[style[v]["color"] for v in variants],
                alpha=0.5 + 0.5 * j / max(len(ratios) - 1, 1),
                label=f"{int(n_remove)} removed",
            )
        ax0.set_xticks(np.arange(len(variants)), [display_name(v) for v in variants], rotation=30, ha="right")
        ax0.set_ylim(0, 1.05)
        ax0.set_ylabel("Jaccard across seeds (bar: mean, whisker: min)")
        ax0.set_title("Removed-layer overlap across calibration seeds")
        ax0.legend(frameon=False, fontsize=5)
    for ax, ((model, n_remove), g) in zip(list(axes.flat)[1:], cells):
        n_layers = int(g["n_layers"].max())
        variants = sorted(g["variant"].unique(), key=order_key)
        freq = np.zeros((len(variants), n_layers))
        for i, v in enumerate(variants):
            runs = g[g["variant"] == v]["removed_layers"]
            for layers in runs:
                freq[i, list(layers)] += 1 / len(runs)
        removed_grid(ax, [display_name(v) for v in variants], freq, n_layers)
        ax.set_title(f"{model}, {int(n_remove)}/{n_layers} removed: fraction of {g['seed'].nunique()} seeds")
    for ax in list(axes.flat)[len(cells) + 1 :]:
        ax.set_visible(False)
    return save(fig, out, "stability")
