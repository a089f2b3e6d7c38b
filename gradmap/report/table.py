"""The main and speedup tables: derived columns, the averaging set, display formatting, CSV/Markdown/LaTeX files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gradmap.eval.tasks import TASK_NAMES
from gradmap.report.common import CONTROLS, DENSE, GRADMAP, TASK_LABELS


def is_baseline(variant: str) -> bool:
    """Methods the claim compares against: everything except the dense model, GradMAP variants and controls."""
    method = variant.split("+")[0]
    return method not in (DENSE, *CONTROLS) and not method.startswith(GRADMAP)


@dataclass
class Averaging:
    """The averaging set of the mean speedup, as asked and as found."""

    requested: tuple[str, ...]
    all_present: bool = False
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = "every baseline present" if self.all_present else ", ".join(self.requested)

    def members(self, present: Iterable[str]) -> list[str]:
        present = list(present)
        if self.all_present:
            return [v for v in present if is_baseline(v)]
        return [v for v in self.requested if v in present]

    def missing(self, present: Iterable[str]) -> list[str]:
        return [] if self.all_present else [v for v in self.requested if v not in set(present)]


def main_table(agg: pd.DataFrame, averaging: Averaging) -> pd.DataFrame:
    """The per model × ratio × method table with every derived column (machine names, raw units)."""
    cell = ["model", "eval"]
    dense = (
        agg[agg["method"] == DENSE]
        .set_index(cell)[["avg", "ppl", "prefill_tok_s", "decode_tok_s", "latency_s", "speed_setup"]]
        .add_prefix("dense_")
    )
    out = agg.join(dense, on=cell)
    out["d_avg"] = out["avg"] - out["dense_avg"]
    out["retention_pct"] = 100 * out["avg"] / out["dense_avg"]
    out["ppl_x_dense"] = out["ppl"] / out["dense_ppl"]
    comparable = out["speed_setup"].notna() & (out["speed_setup"] == out["dense_speed_setup"])
    out["prefill_speedup"] = (out["prefill_tok_s"] / out["dense_prefill_tok_s"]).where(comparable)
    out["decode_speedup"] = (out["decode_tok_s"] / out["dense_decode_tok_s"]).where(comparable)
    out["latency_speedup"] = (out["dense_latency_s"] / out["latency_s"]).where(comparable)
    out["params_pct"] = 100 * out["params_after"] / out["params_before"]

    gm = agg[agg["variant"] == GRADMAP].set_index([*cell, "n_remove"])["prune_s"].rename("gradmap_prune_s")
    out = out.join(gm, on=[*cell, "n_remove"])
    out["gradmap_speedup"] = (out["prune_s"] / out["gradmap_prune_s"]).where(out["method"] != DENSE)
    means = speedup_table(out, averaging).set_index([*cell, "n_remove"])[["mean_speedup", "geomean_speedup"]]
    out = out.join(means, on=[*cell, "n_remove"])
    out.loc[out["variant"] != GRADMAP, ["mean_speedup", "geomean_speedup"]] = np.nan
    return out.drop(columns=[c for c in out.columns if c.startswith("dense_") and c not in ("dense_avg", "dense_ppl")])


def speedup_table(main: pd.DataFrame, averaging: Averaging) -> pd.DataFrame:
    """Per model × ratio: t_b / t_GradMAP for every method present, and the means over the averaging set."""
    rows = []
    pruned = main[(main["method"] != DENSE) & main["gradmap_prune_s"].notna()]
    for (model, ev, n_remove), group in pruned.groupby(["model", "eval", "n_remove"], sort=False, dropna=False):
        ratios = dict(zip(group["variant"], group["gradmap_speedup"]))
        members = averaging.members(ratios)
        values = [ratios[m] for m in members if np.isfinite(ratios[m]) and ratios[m] > 0]
        mean = float(np.mean(values)) if values else np.nan
        row = {
            "model": model,
            "eval": ev,
            "n_remove": n_remove,
            "n_layers": group["n_layers"].iloc[0],
            "ratio": group["ratio"].iloc[0],
            "device": group["device"].iloc[0],
            "gradmap_prune_s": group["gradmap_prune_s"].iloc[0],
            **{f"x_{v}": r for v, r in ratios.items() if v != GRADMAP},
            "mean_speedup": mean,
            "geomean_speedup": float(np.exp(np.mean(np.log(values)))) if values else np.nan,
            "averaging_set": averaging.label,
            "averaged_over": ", ".join(members),
            "missing_from_set": ", ".join(averaging.missing(ratios)),
            "devices": group["device"].nunique(),
        }
        rows.append(row)
    base = [
        "model",
        "eval",
        "n_remove",
        "n_layers",
        "ratio",
        "device",
        "gradmap_prune_s",
        "mean_speedup",
        "geomean_speedup",
        "averaging_set",
        "averaged_over",
        "missing_from_set",
        "devices",
    ]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=base)  # no GradMAP run: no speedups


def times(value: float) -> str:
    """A speed ratio: two decimals, or two significant digits below 0.1 (so 0.0004× does not read as 0)."""
    if pd.isna(value):
        return "–"
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.1 else f"{value:.2g}"


@dataclass
class Column:
    """How one machine column is shown in Markdown/LaTeX: its label (with unit), scale and number format."""

    label: str
    fmt: str
    scale: float = 1.0


def display_columns(main: pd.DataFrame, averaging: Averaging) -> dict[str, Column]:
    tasks = [t for t in TASK_NAMES if main[t].notna().any()]
    window = main["ppl_window"].dropna()
    ppl_label = f"PPL (w={int(window.iloc[0])})" if window.nunique() == 1 else "PPL"
    cols = {
        "model": Column("model", "s"),
        "eval": Column("eval", "s"),
        "ratio": Column("removed (%)", ".1f", 100),
        "layers": Column("layers", "s"),
        "variant": Column("method", "s"),
        **{t: Column(TASK_LABELS[t], ".1f", 100) for t in tasks},
        "avg": Column("avg (%)", ".2f"),
        "d_avg": Column("Δavg (pts)", "+.2f"),
        "retention_pct": Column("retention (%)", ".1f"),
        "dev_nll": Column("dev NLL", ".3f"),
        "ppl": Column(ppl_label, ".2f"),
        "ppl_x_dense": Column("PPL ×dense", ".2f"),
        "select_s": Column("select (s)", ".3g"),
        "repair_s": Column("repair (s)", ".3g"),
        "prune_s": Column("total (s)", ".3g"),
        "peak_mem_gib": Column("peak mem (GiB)", ".2f"),
        "gradmap_speedup": Column("GradMAP speedup (×)", "x"),
        "mean_speedup": Column(f"GradMAP mean speedup over [{averaging.label}] (×)", "x"),
        "params_pct": Column("params kept (%)", ".1f"),
        "prefill_speedup": Column("prefill speedup (×)", "x"),
        "decode_speedup": Column("decode speedup (×)", "x"),
        "eval_req_s": Column("lm-eval (req/s)", ".3g"),
    }
    if main["eval"].nunique() <= 1:
        cols.pop("eval")
    for key in ("dev_nll", "eval_req_s"):  # records from before calib.dev / the request count: no column of dashes
        if key not in main or not main[key].notna().any():
            cols.pop(key)
    return cols


def layers_label(frame: pd.DataFrame) -> pd.Series:
    """ "removed/total" layer counts, e.g. "8/32"."""
    return frame["n_remove"].astype(int).astype(str) + "/" + frame["n_layers"].astype(int).astype(str)


def display(main: pd.DataFrame, cols: dict[str, Column]) -> pd.DataFrame:
    """A copy with human labels, scaled units and formatted numbers ("–" where there is no value)."""
    view = main.assign(layers=layers_label(main))
    out = pd.DataFrame(index=view.index)
    for key, col in cols.items():
        series = view[key]
        if col.fmt == "s":
            out[col.label] = series.astype(str)
        else:
            out[col.label] = (series.astype(float) * col.scale).map(
                lambda v, f=col.fmt: "–" if pd.isna(v) else (times(v) if f == "x" else format(v, f))
            )
    return out.reset_index(drop=True)


def write_table(view: pd.DataFrame, raw: pd.DataFrame, out: Path, stem: str, caption: str) -> list[Path]:
    """``stem.csv`` (raw numbers, machine names), ``stem.md`` and ``stem.tex`` (display view + caption)."""
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.tex"]
    raw.to_csv(paths[0], index=False, float_format="%.6g")
    paths[1].write_text(f"{caption}\n\n{view.to_markdown(index=False, disable_numparse=True)}\n", encoding="utf-8")
    latex = (
        view.style.hide(axis="index")
        .format(escape="latex")
        .format_index(escape="latex", axis=1)
        .to_latex(caption=_latex_escape(caption), label=f"tab:{stem}", hrules=True, position="t")
    )
    latex = latex.replace("Δ", r"$\Delta$").replace("×", r"$\times$").replace("–", "--")
    latex = latex.replace("\\begin{tabular}", "\\resizebox{\\textwidth}{!}{%\n\\begin{tabular}").replace(
        "\\end{tabular}", "\\end{tabular}}"
    )  # wide tables: scale to the text width (needs graphicx)
    paths[2].write_text(latex, encoding="utf-8")
    return paths


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(char, repl)
    return text


def main_caption(main: pd.DataFrame, averaging: Averaging) -> str:
    pairs = sorted({tuple(p.split("=", 1)) for m in main["metric_map"].dropna() for p in m.split(";") if "=" in p})
    by_metric: dict[str, list[str]] = {}
    for task, metric in pairs:
        by_metric.setdefault(metric, []).append(task)
    metric_map = (
        "; ".join(
            f"{metric}: {', '.join(sorted(tasks, key=TASK_NAMES.index))}" for metric, tasks in sorted(by_metric.items())
        )
        or "no tasks"
    )
    devices = ", ".join(sorted(set(main["device"].dropna())))
    kinds = ", ".join(sorted(set(main["peak_mem_kind"].dropna())))
    setups = ", ".join(sorted(set(main["speed_setup"].dropna())))
    return (
        f"Per model × ratio × method. Zero-shot tasks ×100, metric map: {metric_map}. avg = unweighted mean "
        f"of the task metrics (%); Δavg and retention vs the dense model (method none); PPL = WikiText-2 test "
        f"perplexity (window in the header). Pruning time = selection + repair on {devices or '?'} "
        f"(loading, calibration, evaluation excluded); peak memory = {kinds or '?'}. GradMAP speedup = "
        f"t_method / t_GradMAP (> 1: GradMAP faster); mean speedup = arithmetic mean over [{averaging.label}]. "
        f"Inference speedup = pruned / dense tokens per second ({setups or 'not measured'})."
        + (
            " lm-eval req/s = lm-eval requests (one per answer choice) / seconds of the lm-eval run."
            if "eval_req_s" in main and main["eval_req_s"].notna().any()
            else ""
        )
    )


def speedup_view(speed: pd.DataFrame) -> pd.DataFrame:
    view = speed.copy()
    view["ratio"] = (100 * view["ratio"]).map("{:.1f}".format)
    view["layers"] = layers_label(view)
    xcols = [c for c in view.columns if c.startswith("x_")]
    for col in [*xcols, "mean_speedup", "geomean_speedup"]:
        view[col] = view[col].map(times)
    view["gradmap_prune_s"] = view["gradmap_prune_s"].map("{:.3g}".format)
    keep = [
        "model",
        "eval",
        "ratio",
        "layers",
        "gradmap_prune_s",
        *xcols,
        "mean_speedup",
        "geomean_speedup",
        "averaged_over",
        "missing_from_set",
    ]
    if view["eval"].nunique() <= 1:
        keep.remove("eval")
    labels = {
        "ratio": "removed (%)",
        "gradmap_prune_s": "GradMAP time (s)",
        "mean_speedup": "mean (×)",
        "geomean_speedup": "geo-mean (×)",
        "averaged_over": "averaged over",
        "missing_from_set": "set members missing",
        **{c: f"vs {c[2:]} (×)" for c in xcols},
    }
    return view[keep].rename(columns=labels).reset_index(drop=True)
