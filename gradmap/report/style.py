"""Paper style for every figure: fixed widths, TrueType fonts, a colour and marker per method family.

Why: ACM/IEEE checks reject PDFs with Type 3 fonts (matplotlib's default), and a figure wider than the text (7 in)
is shrunk until its labels are unreadable. So every figure is made at one-column (3.3 in) or text width (7 in),
laid out by constrained layout *inside* that size (never ``bbox_inches="tight"``, which grows the page to fit
outside legends), and saved with ``pdf.fonttype = 42``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from gradmap.report.common import DENSE, METHOD_ORDER, display_name, family
from gradmap.report.paired import NO_ITEMS

ONE_COLUMN = 3.3
TEXT_WIDTH = 7.0
RC = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "font.family": "DejaVu Sans",
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "legend.fontsize": 6,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "lines.linewidth": 1.1,
    "lines.markersize": 4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.constrained_layout.use": True,
    "savefig.dpi": 200,
}
matplotlib.rcParams.update(RC)

PALETTES = {
    "gradmap": ["#c0392b", "#e67e22", "#8e2323", "#f1948a"],
    "selector": ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#bcbd22", "#e377c2", "#393b79", "#637939"],
    "control": ["#7f7f7f", "#b0b0b0"],
    "dense": ["#000000"],
}
MARKERS = {"gradmap": "o*Ph", "selector": "s^vD<>pXd", "control": "x+", "dense": "_"}


def order_key(variant: str) -> tuple[int, str]:
    method = variant.split("+")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), variant)


def styles(variants: Iterable[str]) -> dict[str, dict[str, Any]]:
    """variant -> {color, marker, label}: colour and marker from the method's family, label its display name."""
    out: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for v in sorted(set(variants), key=order_key):
        fam = family(v)
        i = counts.get(fam, 0)
        counts[fam] = i + 1
        out[v] = {
            "color": PALETTES[fam][i % len(PALETTES[fam])],
            "marker": MARKERS[fam][i % len(MARKERS[fam])],
            "label": display_name(v),
        }
    return out


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[plt.Figure, np.ndarray]:
    """A figure of exactly ``width`` × ``height`` inches (width <= 7 in) with an array of axes."""
    if width > TEXT_WIDTH:
        raise ValueError(f"figure width {width} in exceeds the text width; allowed: <= {TEXT_WIDTH} in")
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    return fig, axes


def grid(n_panels: int, max_cols: int = 2) -> tuple[int, int]:
    cols = min(max_cols, max(n_panels, 1))
    return -(-max(n_panels, 1) // cols), cols


def legend_below(fig: plt.Figure, axes: Sequence[plt.Axes], ncols: int = 4, title: str | None = None) -> None:
    """One legend for all panels, under them, inside the figure (constrained layout makes room)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if title:  # wrapped to the figure: constrained layout makes room for lines, not for a title wider than the page
        title = "\n".join(textwrap.fill(line, width=int(15 * fig.get_figwidth())) for line in title.split("\n"))
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncols=ncols, frameon=False, title=title
        )


def whisker_note(rows: Any) -> str:
    """What a figure's whiskers are, for its legend title: a reader must not take a standard error for a paired CI,
    and a sweep without per-item records has no CIs at all (the figure says so rather than implying them)."""
    has_items = "items_file" in rows and rows["items_file"].notna().any()
    where = "paired 95 % CIs: paired.csv" if has_items else NO_ITEMS
    return f"whiskers: std across seeds where a point has several runs, else ±1 standard error;\n{where}"


def plain_log_axis(axis: Any, values: Iterable[float]) -> None:
    """Label a log axis 0.5, 2, 30 (not 5×10⁻¹); within ~1.5 decades put a few linear-spaced labelled ticks."""
    finite = [v for v in values if np.isfinite(v) and v > 0]
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if finite and max(finite) / min(finite) < 30:
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5))
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_major_formatter(plain)
        return
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def ratio_ticks(ax: plt.Axes, ratios: Iterable[float]) -> None:
    """Nominal ratios on the x axis: 12.5, 25, 37.5 (%), exactly the ratios that ran."""
    ticks = sorted({round(100 * r, 1) for r in ratios if np.isfinite(r)})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("layers removed (%)")


def save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    """PNG + PDF at the figure's own size (no tight bbox: the page width is the width asked for)."""
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0])
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def is_dense(variant: str) -> bool:
    return variant == DENSE
