"""The evidence figures: the claim itself, per-task accuracy, equal compute, and every selector's layer scores.

* ``claim``: GradMAP's speedup t_b / t_GradMAP per baseline (log bars; whiskers = 95 % bootstrap CI of the ratio
  of median times where runs were timed more than once), the arithmetic and geometric means over the averaging set,
  and the claimed 4× line, under both protocols: (a) matched calibration tokens (every method on the sweep's own
  calibration) and (b) each method's native setting (runs made with ``+calib.protocol=native``). A protocol without
  runs is drawn as an empty panel that says so; nothing is filled in.
* ``per_task``: accuracy per task and method (markers; whiskers = std across seeds, else the standard error).
* ``equal_compute``: average accuracy against pruning time for each method at every calibration size the sweep ran
  (its cost knob), with GradMAP's time marked: "at GradMAP's cost, who is best?".
* ``layer_scores``: every selector's first-decision layer scores on the dense model (min-max scaled per method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradmap.eval.tasks import TASK_NAMES
from gradmap.report.common import CONTROLS, DENSE, GRADMAP, TASK_LABELS, display_name
from gradmap.report.rows import variant_of
from gradmap.report.stats import ratio_bootstrap
from gradmap.report.style import (
    ONE_COLUMN,
    TEXT_WIDTH,
    figure,
    grid,
    legend_below,
    order_key,
    plain_log_axis,
    save,
    whisker_note,
)
from gradmap.report.style import styles as method_styles
from gradmap.report.table import Averaging, is_baseline

NATIVE_MISSING = "no runs at native settings in this sweep\n(run them with +calib.protocol=native);\nnot estimated"


def _spans(rows: pd.DataFrame, model: str, ev: Any, n_remove: int, variant: str) -> list[float]:
    key = (rows["model"] == model) & (rows["n_remove"] == n_remove) & (rows["variant"] == variant)
    key &= (rows["eval"] == ev) if pd.notna(ev) else rows["eval"].isna()
    return [t for spans in rows[key]["prune_s_repeats"] for t in spans]


def speedups(rows: pd.DataFrame, protocol: str, averaging: Averaging) -> pd.DataFrame:
    """Per model × eval × ratio × baseline under one protocol: the speedup, its CI, timed spans, set membership.

    Native: the baseline's native runs against GradMAP's native runs, or GradMAP's matched runs where it has no
    native ones (``gradmap_protocol`` says which)."""
    out = []
    own = rows[rows["protocol"] == protocol]
    for (model, ev, n_remove), cell in own.groupby(["model", "eval", "n_remove"], sort=False, dropna=False):
        g_proto = protocol if (cell["variant"] == GRADMAP).any() else "matched"
        g_rows = rows[rows["protocol"] == g_proto]
        t_g = _spans(g_rows, model, ev, n_remove, GRADMAP)
        if not t_g:
            continue
        members = set(averaging.members(cell["variant"].unique()))
        for variant in sorted(set(cell["variant"]), key=order_key):
            if not is_baseline(variant):
                continue
            t_b = _spans(own, model, ev, n_remove, variant)
            iv = ratio_bootstrap(t_b, t_g)
            out.append(
                {
                    "model": model,
                    "eval": ev,
                    "n_remove": n_remove,
                    "ratio": float(cell["nominal_ratio"].iloc[0]),
                    "protocol": protocol,
                    "variant": variant,
                    "speedup": iv.estimate,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "spans_b": len(t_b),
                    "spans_gradmap": len(t_g),
                    "gradmap_protocol": g_proto,
                    "in_set": variant in members,
                }
            )
    cols = ["model", "eval", "n_remove", "ratio", "protocol", "variant", "speedup", "ci_low", "ci_high"]
    return pd.DataFrame(out) if out else pd.DataFrame(columns=[*cols, "in_set", "gradmap_protocol"])


def _claim_panel(ax: Any, cell: pd.DataFrame, claim: float, title: str) -> None:
    cell = cell.sort_values("variant", key=lambda s: s.map(order_key))
    members = cell[cell["in_set"]]
    labels = [display_name(v) + ("" if s else " (not in set)") for v, s in zip(cell["variant"], cell["in_set"])]
    values = list(cell["speedup"])
    low, high = list(cell["ci_low"]), list(cell["ci_high"])
    colors = ["#4292c6" if s else "#b0b0b0" for s in cell["in_set"]]
    if not members.empty:
        vals = members["speedup"].to_numpy(float)
        labels += ["arithmetic mean", "geometric mean"]
        values += [float(np.mean(vals)), float(np.exp(np.mean(np.log(vals))))]
        low, high = [*low, np.nan, np.nan], [*high, np.nan, np.nan]
        colors += ["#c0392b", "#e67e22"]
    y = np.arange(len(values))[::-1]
    err = np.array(
        [[v - lo if np.isfinite(lo) else 0 for v, lo in zip(values, low)],
         [hi - v if np.isfinite(hi) else 0 for v, hi in zip(values, high)]]
    )  # fmt: skip
    ax.barh(y, values, xerr=err if err.any() else None, color=colors, capsize=1.5)
    ax.axvline(claim, color="black", ls="--", lw=0.8, label=f"claimed {claim:g}×")
    ax.axvline(1.0, color="0.5", lw=0.6)
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis, [*values, claim, 1.0])
    ax.set_yticks(y, labels)
    for v, yy in zip(values, y):
        ax.annotate(f"{v:.2g}×", (v, yy), xytext=(2, -2), textcoords="offset points", fontsize=5)
    ax.set_xlabel("GradMAP speedup t_method / t_GradMAP (log; > 1: GradMAP faster)")
    ax.set_title(title)


def plot_claim(matched: pd.DataFrame, native: pd.DataFrame, claim: float, out: Path) -> list[Path]:
    """claim.{png,pdf}: one row per model × ratio, matched tokens left, native settings right."""
    cells = list(matched.groupby(["model", "eval", "n_remove"], sort=False, dropna=False)) if len(matched) else []
    if not cells:
        cells = list(native.groupby(["model", "eval", "n_remove"], sort=False, dropna=False)) if len(native) else []
    if not cells:
        return []
    fig, axes = figure(TEXT_WIDTH, 0.16 * max(len(c) for _, c in cells) * len(cells) + 1.3 * len(cells), len(cells), 2)
    for (key, cell), (ax_m, ax_n) in zip(cells, axes):
        model, _ev, n_remove = key
        where = f"{model}, {100 * cell['ratio'].iloc[0]:.3g}% removed"
        _claim_panel(ax_m, cell, claim, f"{where}: (a) matched tokens")
        nat = native[(native["model"] == model) & (native["n_remove"] == n_remove)] if len(native) else native
        if len(nat):
            proto = nat["gradmap_protocol"].iloc[0]
            _claim_panel(ax_n, nat, claim, f"(b) native settings (GradMAP {proto})")
        else:
            ax_n.text(0.5, 0.5, NATIVE_MISSING, ha="center", va="center", transform=ax_n.transAxes)
            ax_n.set_title("(b) native settings")
            ax_n.set_axis_off()
    axes[0, 0].legend(frameon=False, loc="lower right")
    return save(fig, out, "claim")


def plot_per_task(main: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy per task, a marker per method, one panel per model × ratio (dense as a black bar)."""
    tasks = [t for t in TASK_NAMES if t in main and main[t].notna().any()]
    pruned = main[main["method"] != DENSE]
    if not tasks or pruned.empty:
        return []
    cells = [(k, g) for k, g in pruned.groupby(["model", "eval", "n_remove"], sort=False, dropna=False)]
    nrows, ncols = grid(len(cells))
    fig, axes = figure(TEXT_WIDTH, 2.0 * nrows + 0.8, nrows, ncols)
    style = method_styles(main["variant"])
    for ax, ((model, _ev, _n_remove), g) in zip(axes.flat, cells):
        variants = sorted(g["variant"].unique(), key=order_key)
        offsets = np.linspace(-0.35, 0.35, len(variants)) if len(variants) > 1 else [0.0]
        for off, v in zip(offsets, variants):
            r = g[g["variant"] == v].iloc[0]
            ys = np.array([100 * r[t] for t in tasks])
            sd = np.array([r.get(f"{t}_std") if r["runs"] > 1 else r.get(f"{t}_se") for t in tasks], dtype=float)
            s = style[v]
            ax.errorbar(np.arange(len(tasks)) + off, ys, yerr=100 * np.nan_to_num(sd), ls="none", capsize=1,
                        color=s["color"], marker=s["marker"], ms=3, label=s["label"])  # fmt: skip
        dense = main[(main["method"] == DENSE) & (main["model"] == model)]
        if not dense.empty:
            d = dense.iloc[0]
            ax.hlines([100 * d[t] for t in tasks], np.arange(len(tasks)) - 0.45, np.arange(len(tasks)) + 0.45,
                      color="black", lw=0.9, label="Dense")  # fmt: skip
        ax.set_xticks(np.arange(len(tasks)), [TASK_LABELS[t] for t in tasks], rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{model}, {100 * g['nominal_ratio'].iloc[0]:.3g}% removed")
    for ax in list(axes.flat)[len(cells) :]:
        ax.set_visible(False)
    legend_below(fig, list(axes.flat), ncols=6, title=whisker_note(main))
    return save(fig, out, "per_task")


def plot_equal_compute(rows: pd.DataFrame, out: Path) -> list[Path]:
    """Average accuracy vs pruning time per method across the calibration sizes it ran; GradMAP's time marked."""
    pruned = rows[(rows["method"] != DENSE) & rows["avg"].notna() & rows["prune_s"].notna()]
    if pruned.empty:
        return []
    by = pruned.groupby(["model", "eval", "n_remove", "variant", "calib_tokens"], sort=False, dropna=False)
    pts = by.agg(avg=("avg", "mean"), prune_s=("prune_s", "median"), nominal_ratio=("nominal_ratio", "first"))
    pts = pts.reset_index()
    cells = list(pts.groupby(["model", "eval", "n_remove"], sort=False, dropna=False))
    nrows, ncols = grid(len(cells), 3)
    fig, axes = figure(TEXT_WIDTH if ncols > 1 else ONE_COLUMN, 2.2 * nrows + 0.8, nrows, ncols)
    style = method_styles(pts["variant"])
    swept = False
    for ax, ((model, _ev, _n_remove), g) in zip(axes.flat, cells):
        for v, line in sorted(g.groupby("variant"), key=lambda kv: order_key(kv[0])):
            line = line.sort_values("prune_s")
            swept |= len(line) > 1
            s = style[v]
            ax.plot(line["prune_s"], line["avg"], color=s["color"], marker=s["marker"], label=s["label"],
                    lw=1.6 if v == GRADMAP else 0.9, ls="-" if v.split("+")[0] not in CONTROLS else ":")  # fmt: skip
        gm = g[g["variant"] == GRADMAP]["prune_s"]
        if not gm.empty:
            ax.axvline(float(gm.median()), color="#c0392b", ls=":", lw=0.8, label="GradMAP's time")
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis, g["prune_s"])
        ax.set_xlabel("pruning time (s, log)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"{model}, {100 * g['nominal_ratio'].iloc[0]:.3g}% removed")
    for ax in list(axes.flat)[len(cells) :]:
        ax.set_visible(False)
    if not swept:
        fig.suptitle("one calibration size per method in this sweep: points, not cost curves (sweep calib.n_samples)")
    legend_below(fig, list(axes.flat), ncols=6)
    return save(fig, out, "equal_compute")


def plot_layer_scores(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every selector's first-decision score per layer (all layers alive), min-max scaled, one panel per model."""
    first: dict[str, dict[str, dict[int, float]]] = {}
    for r in sorted(records, key=lambda r: r.get("n_remove", 0), reverse=True):  # smallest ratio wins
        scores = r.get("scores") or []
        if scores and r.get("method") != DENSE:
            first.setdefault(str(r["model"]), {})[variant_of(r)] = {int(k): float(v) for k, v in scores[0].items()}
    if not first:
        return []
    nrows, ncols = grid(len(first), 1)
    fig, axes = figure(TEXT_WIDTH, 2.4 * nrows + 0.8, nrows, ncols)
    style = method_styles([v for per in first.values() for v in per])
    for ax, (model, per) in zip(axes.flat, first.items()):
        for v in sorted(per, key=order_key):
            layers = sorted(per[v])
            vals = np.array([per[v][i] for i in layers])
            finite = vals[np.isfinite(vals)]
            if finite.size == 0 or np.ptp(finite) == 0:
                continue
            s = style[v]
            ax.plot(layers, (vals - finite.min()) / np.ptp(finite), color=s["color"], marker=s["marker"], ms=2.5,
                    label=s["label"], lw=1.4 if v.startswith(GRADMAP) else 0.8)  # fmt: skip
        ax.set_xlabel("layer index")
        ax.set_ylabel("score, min-max scaled per method")
        ax.set_title(f"{model}: first-decision layer scores of every selector")
    legend_below(fig, list(axes.flat), ncols=6)
    return save(fig, out, "layer_scores")
