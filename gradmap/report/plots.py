"""The report's core plots (PNG + PDF, matplotlib, paper style of :mod:`gradmap.report.style`).

Error bars: across seeds (std) where a cell has several runs, else the evaluation's standard error (accuracy) or
none (PPL, time). Log axes keep the range of the non-control methods; controls beyond it are drawn at the clipped
edge with an upward triangle and their value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from gradmap.report.common import CONTROLS, DENSE, GRADMAP, display_name
from gradmap.report.rows import variant_of
from gradmap.report.style import (
    ONE_COLUMN,
    TEXT_WIDTH,
    figure,
    grid,
    legend_below,
    order_key,
    plain_log_axis,
    ratio_ticks,
    save,
    styles,
    whisker_note,
)

CLIP_FACTOR = 4.0  # log axes end at this × the largest non-control value


def panels(main: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    multi_eval = main["eval"].nunique() > 1
    out = []
    for (model, ev), group in main.groupby(["model", "eval"], sort=False, dropna=False):
        out.append((f"{model} (eval={ev})" if multi_eval else str(model), group))
    return out


def _spread(g: pd.DataFrame, metric: str) -> np.ndarray | None:
    """Error bar half-widths: std across seeds where there are several runs, else the standard error if known."""
    std = g.get(f"{metric}_std")
    se = g.get(f"{metric}_se")
    out = np.full(len(g), np.nan)
    if std is not None:
        out = np.where(g["runs"].to_numpy() > 1, std.to_numpy(float), out)
    if se is not None:
        out = np.where(np.isnan(out), se.to_numpy(float), out)
    return None if np.all(np.isnan(out)) else np.nan_to_num(out)


def plot_metric_vs_ratio(main: pd.DataFrame, out: Path, metric: str, stem: str, ylabel: str, log: bool) -> list[Path]:
    """One panel per model: metric vs nominal % removed, a line per method, dense dashed; bands/bars = spread."""
    cells = panels(main)
    nrows, ncols = grid(len(cells))
    width = ONE_COLUMN if len(cells) == 1 else TEXT_WIDTH
    fig, axes = figure(width, 2.3 * nrows + 0.7, nrows, ncols)
    style = styles(main["variant"])
    for ax, (title, group) in zip(axes.flat, cells):
        pruned = group[group["method"] != DENSE]
        top = None
        if log:
            core = pruned[~pruned["method"].isin(CONTROLS)][metric].dropna()
            top = CLIP_FACTOR * core.max() if not core.empty else None
        for variant, g in sorted(pruned.groupby("variant"), key=lambda kv: order_key(kv[0])):
            g = g.sort_values("nominal_ratio")
            if not g[metric].notna().any():
                continue
            s = style[variant]
            x, y = 100 * g["nominal_ratio"].to_numpy(), g[metric].to_numpy(float)
            shown = np.minimum(y, top) if top is not None else y
            ax.errorbar(
                x,
                shown,
                yerr=_spread(g, metric),
                color=s["color"],
                marker=s["marker"],
                label=s["label"],
                lw=1.8 if variant == GRADMAP else 1.0,
                capsize=2,
                zorder=3 if variant.startswith(GRADMAP) else 2,
            )
            for xi, yi in zip(x, y):
                if top is not None and yi > top:
                    ax.plot([xi], [top], marker="^", color=s["color"], ms=5, ls="none", clip_on=False)
                    ax.annotate(f"{yi:.3g}", (xi, top), xytext=(2, -8), textcoords="offset points", fontsize=5)
        dense = group[group["method"] == DENSE][metric].dropna()
        if not dense.empty:
            ax.axhline(dense.iloc[0], color="black", ls="--", lw=0.8, label="Dense")
        if log:
            ax.set_yscale("log")
            values = [*group[metric].dropna()]
            if top is not None:
                ax.set_ylim(top=top * 1.05)
                values = [v for v in values if v <= top]
            plain_log_axis(ax.yaxis, values)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ratio_ticks(ax, pruned["nominal_ratio"])
    for ax in list(axes.flat)[len(cells) :]:
        ax.set_visible(False)
    note = whisker_note(main) if _spread(main, metric) is not None else None
    legend_below(fig, list(axes.flat), ncols=4 if width > ONE_COLUMN else 2, title=note)
    return save(fig, out, stem)


def plot_pruning_time(main: pd.DataFrame, out: Path) -> list[Path]:
    """Pruning time per method (log bars, one bar per ratio, one panel per model); error bars = spread of runs."""
    pruned = main[main["method"] != DENSE]
    cells = panels(pruned)
    fig, axes = figure(TEXT_WIDTH, 2.4 * len(cells) + 0.5, len(cells), 1)
    for ax, (title, group) in zip(axes[:, 0], cells):
        variants = sorted(group["variant"].unique(), key=order_key)
        ratios = sorted(group["ratio"].unique())
        width = 0.8 / max(len(ratios), 1)
        shades = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
        for j, ratio in enumerate(ratios):
            at = group[group["ratio"] == ratio].set_index("variant").reindex(variants)
            xs = np.arange(len(variants)) + (j - (len(ratios) - 1) / 2) * width
            err = at["prune_s_std"].to_numpy(float) if "prune_s_std" in at else None
            ax.bar(
                xs,
                at["prune_s"].to_numpy(float),
                width,
                yerr=None if err is None or np.all(np.isnan(err)) else np.nan_to_num(err),
                capsize=1.5,
                color=shades[j % len(shades)],
                label=f"{100 * ratio:.3g}% removed",
            )
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis, group["prune_s"])
        ax.set_xticks(np.arange(len(variants)), [display_name(v) for v in variants], rotation=30, ha="right")
        for tick in ax.get_xticklabels():
            if tick.get_text() == display_name(GRADMAP):
                tick.set_fontweight("bold")
        ax.set_ylabel("pruning time (s, log)\nselection + repair")
        ax.set_title(title)
        ax.legend(frameon=False, ncols=len(ratios))
    return save(fig, out, "pruning_time")


def pareto_front(times: np.ndarray, accs: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both pruning time (lower) and accuracy (higher)."""
    keep = []
    for i in range(len(times)):
        dominated = any(
            (times[j] <= times[i] and accs[j] >= accs[i]) and (times[j] < times[i] or accs[j] > accs[i])
            for j in range(len(times))
        )
        if not dominated:
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: times[i]), dtype=int)


def plot_pareto(main: pd.DataFrame, out: Path) -> list[Path]:
    """Pruning time vs average accuracy, one panel per model × ratio; the Pareto front is drawn."""
    pruned = main[(main["method"] != DENSE) & main["avg"].notna() & main["prune_s"].notna()]
    if pruned.empty:
        return []
    style = styles(main["variant"])
    cells = [  # titles give the nominal ratio (12.5 %, not 4/30 = 13.3 %), as every other figure does
        (f"{title}, {100 * g['nominal_ratio'].iloc[0]:.3g}% removed", g)
        for title, group in panels(pruned)
        for r in sorted(group["ratio"].unique())
        if not (g := group[group["ratio"] == r]).empty
    ]
    nrows, ncols = grid(len(cells), 3)
    fig, axes = figure(TEXT_WIDTH if ncols > 1 else ONE_COLUMN, 2.2 * nrows + 0.8, nrows, ncols)
    for ax, (title, g) in zip(axes.flat, cells):
        times, accs = g["prune_s"].to_numpy(float), g["avg"].to_numpy(float)
        front = pareto_front(times, accs)
        ax.step(times[front], accs[front], where="post", color="0.6", lw=0.8, ls=":", label="Pareto front")
        err = _spread(g, "avg")
        for k, ((_, r), t, a) in enumerate(zip(g.iterrows(), times, accs)):
            s = style[r["variant"]]
            ax.errorbar(
                t,
                a,
                yerr=None if err is None else err[k],
                color=s["color"],
                marker=s["marker"],
                ms=6 if r["variant"] == GRADMAP else 4,
                label=s["label"],
                ls="none",
                capsize=1.5,
                zorder=3,
            )
        dense = main[(main["method"] == DENSE) & (main["model"] == g["model"].iloc[0])]["avg"].dropna()
        if not dense.empty:
            ax.axhline(dense.iloc[0], color="black", ls="--", lw=0.8, label="Dense")
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis, times)
        ax.set_xlabel("pruning time (s, log)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(title)
    for ax in list(axes.flat)[len(cells) :]:
        ax.set_visible(False)
    legend_below(fig, list(axes.flat)[: len(cells)], ncols=5, title=whisker_note(main))
    return save(fig, out, "pareto")


def removed_grid(ax: Any, names: list[str], sets: list[tuple[int, ...]] | np.ndarray, n_layers: int) -> None:
    """Methods × layer index heat map: 1 (dark) = removed; a row may hold frequencies in [0, 1] instead."""
    if isinstance(sets, np.ndarray) and sets.ndim == 2 and sets.shape[1] == n_layers:
        values = sets.astype(float)  # frequencies per layer (stability)
    else:  # index sets, which may differ in length (BlockPruner removes half layers, so fewer whole ones)
        values = np.zeros((len(sets), n_layers))
        for i, layers in enumerate(sets):
            values[i, [int(x) for x in layers]] = 1
    ax.imshow(values, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    step = max(1, n_layers // 12)
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xticks(np.arange(-0.5, n_layers), minor=True)
    ax.set_yticks(np.arange(-0.5, len(names)), minor=True)
    ax.grid(which="minor", color="white", lw=0.6)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("layer index (0 = first decoder layer)")


def plot_removed_layers(main: pd.DataFrame, out: Path) -> list[Path]:
    """Methods × layer index: which layers each method removed, one panel per model × ratio."""
    pruned = main[main["method"] != DENSE]
    if pruned.empty:
        return []
    cells = [(t, r, g[g["ratio"] == r]) for t, g in panels(pruned) for r in sorted(g["ratio"].unique())]
    nrows, ncols = grid(len(cells))
    n_variants = pruned["variant"].nunique()
    fig, axes = figure(TEXT_WIDTH, (0.13 * n_variants + 0.9) * nrows, nrows, ncols)
    for ax, (title, ratio, g) in zip(axes.flat, cells):
        g = g.sort_values("variant", key=lambda s: s.map(order_key))
        n_layers = int(g["n_layers"].max())
        removed_grid(ax, [display_name(v) for v in g["variant"]], list(g["removed_layers"]), n_layers)
        ax.set_title(f"{title}: {int(g['n_remove'].iloc[0])}/{n_layers} removed ({100 * ratio:.3g}%)")
    for ax in list(axes.flat)[len(cells) :]:
        ax.set_visible(False)
    return save(fig, out, "removed_layers")


def plot_gradmap_stages(records: list[dict[str, Any]], main: pd.DataFrame, out: Path) -> list[Path]:
    """Per model: stage-1 scores per layer (first decision, all layers alive) and the stage-2 mean-shift curves."""
    runs = [r for r in records if variant_of(r) == GRADMAP and r.get("scores")]
    if not runs:
        return []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r.get("n_remove", 0)):
        by_model.setdefault(str(r["model"]), []).append(r)
    fig, axes = figure(TEXT_WIDTH, 2.4 * len(by_model) + 0.3, len(by_model), 2)
    shades = ["#fcbba1", "#fb6a4a", "#cb181d", "#67000d"]
    for (model, model_runs), (ax1, ax2) in zip(by_model.items(), axes):
        first = {int(k): v for k, v in model_runs[0]["scores"][0].items()}
        layers = sorted(first)
        removed_at: dict[int, float] = {}
        for r in reversed(model_runs):  # smallest ratio last, so it wins
            for layer in r.get("removed_layers") or ():
                removed_at[int(layer)] = r["n_remove"] / r["n_layers"]
        ratios = sorted(set(removed_at.values()))
        shade = {ratio: shades[i % len(shades)] for i, ratio in enumerate(ratios)}
        ax1.bar(layers, [first[i] for i in layers], color=[shade.get(removed_at.get(i), "0.75") for i in layers])
        handles = [Patch(color=shade[ratio], label=f"removed at {100 * ratio:.3g}%") for ratio in ratios]
        handles.append(Patch(color="0.75", label="kept at every ratio"))
        values = [v for v in first.values() if v > 0]
        if values and max(values) / min(values) > 100:
            ax1.set_yscale("log")
        ax1.set_xlabel("layer index")
        ax1.set_ylabel("stage-1 score")
        ax1.set_title(f"{model}: GradMAP stage 1, first decision")
        ax1.legend(handles=handles, frameon=False)
        plotted = False
        for i, r in enumerate(model_runs):
            info = r.get("repair_info") or {}
            shifts = {int(k): v for k, v in (info.get("shifts") or {}).items()}
            if not shifts:
                continue
            xs = sorted(shifts)
            color = shades[i % len(shades)]
            ax2.plot(xs, [shifts[x] for x in xs], marker=".", color=color, label=f"{100 * r['ratio']:.3g}% removed")
            site = info.get("site")
            if site is not None and int(site) in shifts:
                ax2.plot([int(site)], [shifts[int(site)]], marker="D", ms=5, color=color, mec="black", ls="none")
            plotted = True
        ax2.set_xlabel("surviving layer (original index)")
        ax2.set_ylabel("stage-2 mean shift (relative)")
        ax2.set_title(f"{model}: stage-2 mean shift; diamond = compensation site")
        if plotted:
            ax2.legend(frameon=False)
        else:
            ax2.text(0.5, 0.5, "no shift curve recorded", ha="center", va="center", transform=ax2.transAxes)
    return save(fig, out, "gradmap_stages")
