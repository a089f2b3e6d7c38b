"""LaTeX and Markdown that drop into a paper: booktabs, one block per model × ratio, right-aligned numbers.

Why not pandas' Styler for these: it gives one long table of config keys with every column repeated per row, and
cannot put one block per model × ratio under a spanning header, mark the best value per block, or print ± spreads.
Every table here is a plain ``tabular`` in a ``table`` float; the preamble it needs is :data:`PREAMBLE` (booktabs
only), and :func:`standalone` wraps any of them in a minimal document that compiles with pdflatex.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradmap.eval.tasks import TASK_NAMES
from gradmap.report.common import DENSE, TASK_LABELS, display_name

PREAMBLE = "\\usepackage{booktabs}\n"


def escape(text: str) -> str:
    """Escape LaTeX's special characters in a plain label."""
    for char, repl in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("{", r"\{"),
        ("}", r"\}"),
    ):
        text = text.replace(char, repl)
    return text.replace("×", r"$\times$").replace("Δ", r"$\Delta$").replace("±", r"$\pm$").replace("–", "--")


def standalone(body: str) -> str:
    """A minimal compilable document around a table (the test of main.tex uses it)."""
    return f"\\documentclass{{article}}\n{PREAMBLE}\\begin{{document}}\n{body}\n\\end{{document}}\n"


def _num(value: float, spread: float, fmt: str, bold: bool) -> str:
    if pd.isna(value):
        return "--"
    text = format(value, fmt)
    if pd.notna(spread) and spread > 0:
        text += f"$\\pm${format(spread, fmt)}"
    return f"\\textbf{{{text}}}" if bold else text


def _best(values: pd.Series, higher: bool) -> float:
    finite = values.dropna()
    if finite.empty:
        return np.nan
    return finite.max() if higher else finite.min()


Column = tuple[str, str, str | None, str, bool, float]  # key, label, spread key, format, higher is better, scale


def main_columns(main: pd.DataFrame) -> list[Column]:
    """Tasks present, avg (± std across seeds), PPL (± std), pruning time, GradMAP speedup."""
    tasks = [t for t in TASK_NAMES if t in main and main[t].notna().any()]
    cols: list[Column] = [(t, TASK_LABELS[t], f"{t}_std", ".1f", True, 100.0) for t in tasks]
    cols.append(("avg", "Avg", "avg_std", ".1f", True, 1.0))
    if main["ppl"].notna().any():
        cols.append(("ppl", "PPL", "ppl_std", ".2f", False, 1.0))
    cols.append(("prune_s", "Time (s)", None, ".3g", False, 1.0))
    if main["gradmap_speedup"].notna().any():
        cols.append(("gradmap_speedup", "GradMAP ×", None, ".2f", True, 1.0))
    return cols


def _blocks(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    multi_eval = frame["eval"].nunique() > 1
    out = []
    for (model, ev, n_remove), block in frame.groupby(["model", "eval", "n_remove"], sort=False, dropna=False):
        n_layers = int(block["n_layers"].iloc[0])
        title = f"{model}, dense" if n_remove == 0 else f"{model}, {100 * n_remove / n_layers:.1f}% removed"
        title += f" ({int(n_remove)}/{n_layers} layers)" if n_remove else ""
        out.append((title + (f", eval={ev}" if multi_eval else ""), block))
    return out


def main_latex(main: pd.DataFrame, caption: str) -> str:
    """The main table: a block per model × ratio, methods as rows, best per column bold (dense not ranked)."""
    cols = main_columns(main)
    header = " & ".join(["Method", *(escape(c[1]) for c in cols)])
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        "\\setlength{\\tabcolsep}{3.5pt}",
        f"\\begin{{tabular}}{{l{'r' * len(cols)}}}",
        "\\toprule",
        header + " \\\\",
    ]
    for title, block in _blocks(main):
        lines += ["\\midrule", f"\\multicolumn{{{len(cols) + 1}}}{{l}}{{\\emph{{{escape(title)}}}}} \\\\"]
        ranked = block[block["method"] != DENSE]
        best = {key: _best(ranked[key] * scale, higher) for key, _, _, _, higher, scale in cols}
        for _, row in block.iterrows():
            cells = [escape(display_name(row["variant"]))]
            for key, _, spread, fmt, _, scale in cols:
                value = row[key] * scale
                sd = row.get(spread, np.nan) * scale if spread else np.nan
                is_best = row["method"] != DENSE and pd.notna(value) and value == best[key] and len(ranked) > 1
                cells.append(_num(value, sd, fmt, is_best))
            lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{escape(caption)}}}", "\\label{tab:main}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def short_caption(main: pd.DataFrame) -> str:
    """What every number of the main table is, in two sentences."""
    seeds = int(main["seeds"].max()) if "seeds" in main and main["seeds"].notna().any() else 1
    draws = int(main["calib_seeds"].max()) if "calib_seeds" in main and main["calib_seeds"].notna().any() else seeds
    if draws > 1:
        spread = f" Mean ± std over {draws} calibration seeds."
    elif seeds > 1:
        spread = f" Mean ± std over {seeds} run seeds on one calibration draw."
    else:
        spread = ""
    return (
        "Zero-shot accuracy (%) per task and its unweighted average, WikiText-2 perplexity, pruning time "
        "(selection + repair) and GradMAP's speedup t_method / t_GradMAP; best value per block in bold." + spread
    )


def _paired_view(paired: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return _blocks(paired[paired["metric"].isin(["avg", "ppl"])])


def paired_markdown(paired: pd.DataFrame) -> str:
    """The avg and PPL comparisons of paired.csv as Markdown, one section per model × ratio."""
    lines = [
        "Paired differences a - b over the items (accuracy, points) or windows (PPL) both runs scored; 95 % "
        "percentile-bootstrap CI; **bold** = the CI excludes 0. Every task's row is in paired.csv.",
        "",
    ]
    for title, block in _paired_view(paired):
        table = pd.DataFrame(
            {
                "a": block["a"].map(display_name),
                "b": block["b"].map(display_name),
                "metric": block["metric"],
                "a - b": [_md_diff(r) for _, r in block.iterrows()],
                "95 % CI": [_ci(r) for _, r in block.iterrows()],
                "n": block["n_items"].astype(int).astype(str),
            }
        )
        lines += [f"### {title}", "", table.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def _md_diff(row: pd.Series) -> str:
    text = f"{row['diff']:+.2f}"
    return f"**{text}**" if row["significant"] else text


def _ci(row: pd.Series) -> str:
    if not np.isfinite(row["ci_low"]):
        return "undefined (n < 2)"
    return f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"


def paired_latex(paired: pd.DataFrame) -> str:
    """The avg and PPL comparisons as a booktabs table: a - b [CI] per pair, bold where the CI excludes 0."""
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        "\\begin{tabular}{llrrr}",
        "\\toprule",
        "$a$ & $b$ & $\\Delta$Avg (pts) & $\\Delta$PPL & $n$ \\\\",
    ]
    for title, block in _paired_view(paired):
        lines += ["\\midrule", f"\\multicolumn{{5}}{{l}}{{\\emph{{{escape(title)}}}}} \\\\"]
        for (a, b), pair in block.groupby(["a", "b"], sort=False):
            cells = [escape(display_name(a)), escape(display_name(b))]
            for metric in ("avg", "ppl"):
                hit = pair[pair["metric"] == metric]
                cells.append(_tex_ci(hit.iloc[0]) if len(hit) else "--")
            avg = pair[pair["metric"] == "avg"]
            cells.append(str(int(avg["n_items"].iloc[0])) if len(avg) else "--")
            lines.append(" & ".join(cells) + " \\\\")
    caption = (
        "Paired differences $a-b$ with 95\\,\\% paired-bootstrap CIs over the items (accuracy) or windows (PPL) "
        "both methods scored; bold: the CI excludes 0; $n$: items behind the average."
    )
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\label{tab:paired}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def _tex_ci(row: pd.Series) -> str:
    if not np.isfinite(row["ci_low"]):
        return f"{row['diff']:+.2f}"
    text = f"{row['diff']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    return f"\\textbf{{{text}}}" if row["significant"] else text
