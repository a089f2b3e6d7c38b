"""Every plot of the report (PNG + PDF, matplotlib only)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from gradmap.report.common import DENSE, GRADMAP, METHOD_ORDER
from gradmap.report.rows import variant_of


def _colors(variants: Sequence[str]) -> dict[str, Any]:
    """One stable color per method across all plots; GradMAP always red, dense black."""
    dark, light = plt.get_cmap("tab10").colors, plt.get_cmap("tab20").colors[1::2]
    palette = [c for i, c in enumerate(dark) if i != 3] + [c for i, c in enumerate(light) if i != 3]  # no reds
    others = [v for v in sorted(set(variants), key=_order_key) if v not in (GRADMAP, DENSE)]
    colors = {v: palette[i % len(palette)] for i, v in enumerate(others)}
    colors.update({GRADMAP: "tab:red", DENSE: "black"})
    return colors


def _order_key(variant: str) -> tuple[int, str]:
    method = variant.split("+")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), variant)


def _panels(main: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    multi_eval = main["eval"].nunique() > 1
    out = []
    for (model, ev), group in main.groupby(["model", "eval"], sort=False, dropna=False):
        out.append((f"{model} (eval={ev})" if multi_eval else str(model), group))
    return out


def _plain_log_axis(axis: Any, values: Iterable[float]) -> None:
    """Label a log axis 0.5, 2, 30 instead of 5×10⁻¹, 2×10⁰, 3×10¹; within less than ~1.5 decades, put a
    few evenly spaced labelled ticks (a log axis there would show no label at all)."""
    finite = [v for v in values if np.isfinite(v) and v > 0]
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if finite and max(finite) / min(finite) < 30:
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=6))
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_major_formatter(plain)
        return
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))


def _save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _legend(fig: plt.Figure, axes: Sequence[plt.Axes]) -> None:
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels.setdefault(lab, lab)
    if handles:
        fig.legend(
            list(handles.values()),
            list(labels.values()),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            title="method",
        )


def plot_metric_vs_ratio(main: pd.DataFrame, out: Path, metric: str, stem: str, ylabel: str, log: bool) -> list[Path]:
    """One panel per model: metric vs % of layers removed, a line per method, dense as a dashed line."""
    panels = _panels(main)
    colors = _colors(main["variant"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        pruned = group[group["method"] != DENSE]
        for variant, g in sorted(pruned.groupby("variant"), key=lambda kv: _order_key(kv[0])):
            g = g.sort_values("ratio")
            if g[metric].notna().any():
                ax.plot(
                    100 * g["ratio"],
                    g[metric],
                    marker="o",
                    color=colors[variant],
                    label=variant,
                    lw=2.5 if variant == GRADMAP else 1.3,
                    zorder=3 if variant == GRADMAP else 2,
                )
        dense = group[group["method"] == DENSE][metric].dropna()
        if not dense.empty:
            ax.axhline(dense.iloc[0], color="black", ls="--", lw=1, label="dense (none)")
        if log:
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis, group[metric])
        ax.set_title(title)
        ax.set_xlabel("layers removed (%)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted(set(100 * pruned["ratio"].round(4))))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes[0])
    fig.tight_layout()
    return _save(fig, out, stem)


def plot_pruning_time(main: pd.DataFrame, out: Path) -> list[Path]:
    """Pruning time per method (log bars), a bar per ratio, one panel per model."""
    pruned = main[main["method"] != DENSE]
    panels = _panels(pruned)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 0.9 * pruned["variant"].nunique() + 3), 3.8 * len(panels)), squeeze=False
    )
    for ax, (title, group) in zip(axes[:, 0], panels):
        variants = sorted(group["variant"].unique(), key=_order_key)
        ratios = sorted(group["ratio"].unique())
        width = 0.8 / max(len(ratios), 1)
        cmap = plt.get_cmap("viridis")
        for j, ratio in enumerate(ratios):
            times = group[group["ratio"] == ratio].set_index("variant")["prune_s"].reindex(variants)
            xs = np.arange(len(variants)) + (j - (len(ratios) - 1) / 2) * width
            ax.bar(
                xs,
                times.to_numpy(dtype=float),
                width,
                color=cmap(j / max(len(ratios) - 1, 1) * 0.85),
                label=f"{100 * ratio:.1f}% removed",
            )
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis, group["prune_s"])
        ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
        for tick in ax.get_xticklabels():
            if tick.get_text() == GRADMAP:
                tick.set_fontweight("bold")
        ax.set_ylabel("pruning time (s, log scale)\nselection + repair")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return _save(fig, out, "pruning_time")


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
    colors = _colors(main["variant"])
    panels = [
        (f"{title}, {100 * r:.1f}% removed", group[group["ratio"] == r])
        for title, group in _panels(pruned)
        for r in sorted(group["ratio"].unique())
    ]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (title, g) in zip(axes.flat, panels):
        times, accs = g["prune_s"].to_numpy(float), g["avg"].to_numpy(float)
        front = pareto_front(times, accs)
        ax.step(times[front], accs[front], where="post", color="0.6", lw=1, ls=":", label="Pareto front", zorder=1)
        for (_, r), t, a in zip(g.iterrows(), times, accs):
            ax.scatter(
                t,
                a,
                color=colors[r["variant"]],
                s=70 if r["variant"] == GRADMAP else 40,
                edgecolor="black" if r["variant"] == GRADMAP else "none",
                label=r["variant"],
                zorder=3,
            )
            ax.annotate(r["variant"], (t, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
        dense = main[(main["method"] == DENSE) & (main["model"] == g["model"].iloc[0])]["avg"].dropna()
        if not dense.empty:
            ax.axhline(dense.iloc[0], color="black", ls="--", lw=1, label="dense (none)")
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis, times)
        ax.set_xlabel("pruning time (s, log scale)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    _legend(fig, list(axes.flat)[: len(panels)])
    fig.tight_layout()
    return _save(fig, out, "pareto")


def plot_removed_layers(main: pd.DataFrame, out: Path) -> list[Path]:
    """Methods × layer index: which layers each method removed, one panel per model × ratio."""
    pruned = main[main["method"] != DENSE]
    if pruned.empty:
        return []
    cells = [
        (title, r, group[group["ratio"] == r])
        for title, group in _panels(pruned)
        for r in sorted(group["ratio"].unique())
    ]
    ncols = min(3, len(cells))
    nrows = math.ceil(len(cells) / ncols)
    n_variants = pruned["variant"].nunique()
    fig, axes = plt.subplots(
        nrows,
        ncols,
        squeeze=False,
        figsize=(max(4.5, 0.22 * pruned["n_layers"].max() + 2.5) * ncols, (0.32 * n_variants + 1.4) * nrows),
    )
    for ax, (title, ratio, g) in zip(axes.flat, cells):
        g = g.sort_values("variant", key=lambda s: s.map(_order_key))
        n_layers = int(g["n_layers"].max())
        grid = np.zeros((len(g), n_layers))
        for i, layers in enumerate(g["removed_layers"]):
            grid[i, list(layers)] = 1
        ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
        ax.set_yticks(range(len(g)), g["variant"])
        step = max(1, n_layers // 16)
        ax.set_xticks(range(0, n_layers, step))
        ax.set_xticks(np.arange(-0.5, n_layers), minor=True)
        ax.set_yticks(np.arange(-0.5, len(g)), minor=True)
        ax.grid(which="minor", color="white", lw=0.8)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("layer index (0 = first decoder layer)")
        ax.set_title(
            f"{title}: {int(g['n_remove'].iloc[0])}/{n_layers} removed ({100 * ratio:.1f}%)", fontsize="medium"
        )
    for ax in list(axes.flat)[len(cells) :]:
        ax.set_visible(False)
    fig.suptitle("Removed layers (dark = removed)", y=1.0)
    fig.tight_layout()
    return _save(fig, out, "removed_layers")


def plot_gradmap_stages(records: list[dict[str, Any]], main: pd.DataFrame, out: Path) -> list[Path]:
    """Per model: stage-1 scores per layer (first decision, all layers alive) and the stage-2 mean-shift curves."""
    runs = [r for r in records if variant_of(r) == GRADMAP and r.get("scores")]
    if not runs:
        return []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r.get("n_remove", 0)):
        by_model.setdefault(str(r["model"]), []).append(r)
    fig, axes = plt.subplots(len(by_model), 2, figsize=(12, 3.8 * len(by_model)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for (model, model_runs), (ax1, ax2) in zip(by_model.items(), axes):
        first = {int(k): v for k, v in model_runs[0]["scores"][0].items()}
        layers = sorted(first)
        removed_at: dict[int, float] = {}
        for r in reversed(model_runs):  # smallest ratio last, so it wins
            for layer in r.get("removed_layers") or ():
                removed_at[int(layer)] = r["n_remove"] / r["n_layers"]
        ratios = sorted(set(removed_at.values()))
        shade = {ratio: cmap(i / max(len(ratios) - 1, 1) * 0.85) for i, ratio in enumerate(ratios)}
        colors = [shade[removed_at[i]] if i in removed_at else "0.75" for i in layers]
        ax1.bar(layers, [first[i] for i in layers], color=colors)
        handles = [Patch(color=shade[ratio], label=f"removed at {100 * ratio:.1f}%") for ratio in ratios]
        handles.append(Patch(color="0.75", label="kept at every ratio"))
        values = [v for v in first.values() if v > 0]
        if values and max(values) / min(values) > 100:
            ax1.set_yscale("log")
        ax1.set_xlabel("layer index")
        ax1.set_ylabel("stage-1 score (gradient magnitude)")
        ax1.set_title(f"{model}: GradMAP stage 1, first decision (all layers)", fontsize="medium")
        ax1.legend(handles=handles, frameon=False, fontsize="small")
        ax1.grid(alpha=0.3, axis="y")
        plotted = False
        for i, r in enumerate(model_runs):
            info = r.get("repair_info") or {}
            shifts = {int(k): v for k, v in (info.get("shifts") or {}).items()}
            if not shifts:
                continue
            xs = sorted(shifts)
            color = cmap(i / max(len(model_runs) - 1, 1) * 0.85)
            label = f"{100 * r['n_remove'] / r['n_layers']:.1f}% removed"
            ax2.plot(xs, [shifts[x] for x in xs], marker=".", color=color, label=label)
            site = info.get("site")
            if site is not None and int(site) in shifts:
                ax2.plot([int(site)], [shifts[int(site)]], marker="*", ms=14, color=color, mec="black", ls="none")
            plotted = True
        ax2.set_xlabel("surviving layer (original index)")
        ax2.set_ylabel("stage-2 mean shift (relative)")
        ax2.set_title(f"{model}: stage 2 mean shift; ★ = compensation site", fontsize="medium")
        ax2.grid(alpha=0.3)
        if plotted:
            ax2.legend(frameon=False, fontsize="small")
        else:
            ax2.text(
                0.5,
                0.5,
                "no shift curve recorded\n(repair site not chosen by max shift)",
                ha="center",
                va="center",
                transform=ax2.transAxes,
            )
    fig.tight_layout()
    return _save(fig, out, "gradmap_stages")
