"""build(): every table, plot, the verdict and the index of one sweep folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradmap.report.common import CLAIM, DEFAULT_AVERAGING, log
from gradmap.report.figures import plot_claim, plot_equal_compute, plot_layer_scores, plot_per_task, speedups
from gradmap.report.latex import main_latex, paired_latex, paired_markdown, short_caption
from gradmap.report.paired import NO_ITEMS, item_table, paired_table
from gradmap.report.plots import (
    plot_gradmap_stages,
    plot_metric_vs_ratio,
    plot_pareto,
    plot_pruning_time,
    plot_removed_layers,
)
from gradmap.report.rows import aggregate, load
from gradmap.report.stability import plot_stability, stability_table
from gradmap.report.table import (
    Averaging,
    display,
    display_columns,
    main_caption,
    main_table,
    speedup_table,
    speedup_view,
    write_table,
)
from gradmap.report.verdicts import verdict


@dataclass
class ReportFiles:
    """What :func:`build` wrote, for the caller and the tests."""

    out: Path
    tables: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    verdict: Path | None = None
    index: Path | None = None
    main: pd.DataFrame | None = None
    speedup: pd.DataFrame | None = None
    paired: pd.DataFrame | None = None


def parse_averaging(value: str | None) -> Averaging:
    if value is None:
        return Averaging(DEFAULT_AVERAGING)
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if names == ("all",):
        return Averaging((), all_present=True)
    if not names:
        raise ValueError(f"--speedup-baselines {value!r} is empty; allowed: comma-separated methods or 'all'")
    return Averaging(names)


@dataclass
class Sweep:
    """Everything read from one sweep folder: per-run rows, the tables derived from them, jobs, records."""

    rows: pd.DataFrame
    main: pd.DataFrame
    speedup: pd.DataFrame
    jobs: pd.DataFrame
    records: list[dict[str, Any]]
    items: pd.DataFrame
    paired: pd.DataFrame


def read_sweep(sweep_dir: Path, averaging: Averaging) -> Sweep:
    """Read and tabulate one sweep folder (nothing written)."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {str(sweep_dir)!r} does not exist; give runs/<sweep>")
    rows, jobs, records = load(sweep_dir)
    if rows.empty:
        raise ValueError(
            f"no ok result.json under {sweep_dir} ({len(jobs)} job folders); nothing to report" + unusable_note(jobs)
        )
    matched = rows[rows["protocol"] == "matched"]  # native-setting runs feed the claim figure, not the tables
    if matched.empty:
        raise ValueError(f"every run under {sweep_dir} is a native-setting run; the tables need matched runs")
    main = main_table(aggregate(matched), averaging)
    items = item_table(matched)
    return Sweep(rows, main, speedup_table(main, averaging), jobs, records, items, paired_table(main, items))


def tables(
    sweep_dir: Path, averaging: Averaging
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """(main table, speedup table, job states, ok records) of one sweep folder, nothing written."""
    sweep = read_sweep(sweep_dir, averaging)
    return sweep.main, sweep.speedup, sweep.jobs, sweep.records


def build(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    averaging: Averaging | None = None,
    claim: float = CLAIM,
    plots: bool = True,
) -> ReportFiles:
    """Write every table, plot and the verdict for one sweep folder (``plots=False``: tables and verdict only,
    seconds instead of a minute on a busy CPU, where embedding TrueType fonts in each PDF dominates)."""
    sweep_dir = Path(sweep_dir)
    averaging = averaging or Averaging(DEFAULT_AVERAGING)
    sweep = read_sweep(sweep_dir, averaging)
    main, speed, jobs = sweep.main, sweep.speedup, sweep.jobs
    files = ReportFiles(Path(out) if out else sweep_dir / "report")
    files.out.mkdir(parents=True, exist_ok=True)
    files.main, files.speedup, files.paired = main, speed, sweep.paired
    raw_cols = [c for c in main.columns if c not in ("removed_layers",)] + ["removed_layers"]
    raw = main[raw_cols].assign(removed_layers=main["removed_layers"].map(lambda t: " ".join(map(str, t))))
    files.tables += write_table(
        display(main, display_columns(main, averaging)), raw, files.out, "main", main_caption(main, averaging)
    )
    (files.out / "main.tex").write_text(main_latex(main, short_caption(main)), encoding="utf-8")  # booktabs blocks
    if not speed.empty:
        files.tables += write_table(
            speedup_view(speed),
            speed,
            files.out,
            "speedup",
            f"GradMAP speedup = t_method / t_GradMAP per model × ratio; mean and geometric "
            f"mean over [{averaging.label}].",
        )
    files.tables += write_paired(sweep.paired, files.out)
    jobs.to_csv(files.out / "jobs.csv", index=False)
    files.tables.append(files.out / "jobs.csv")

    stab = stability_table(sweep.rows)
    stab.to_csv(files.out / "stability.csv", index=False, float_format="%.4g")
    files.tables.append(files.out / "stability.csv")
    claim_rows = pd.concat([speedups(sweep.rows, p, averaging) for p in ("matched", "native")], ignore_index=True)
    claim_rows.to_csv(files.out / "claim.csv", index=False, float_format="%.6g")
    files.tables.append(files.out / "claim.csv")
    if plots:
        files.plots += _plots(sweep, stab, claim_rows, claim, files.out)

    files.verdict = files.out / "verdict.md"
    note = unusable_note(jobs)
    text = verdict(main, speed, averaging, claim, sweep.paired, claim_rows)
    files.verdict.write_text((f"**Not used:**{note.removeprefix(';')}\n\n" if note else "") + text, encoding="utf-8")
    files.index = files.out / "README.md"
    files.index.write_text(index_md(sweep_dir, files, jobs), encoding="utf-8")
    return files


def unusable_note(jobs: pd.DataFrame) -> str:
    """``; not used: ...`` naming every job folder whose result could not be used (never dropped silently)."""
    bad = jobs[jobs["status"] != "ok"]
    if bad.empty:
        return ""
    for row in bad[bad["status"] == "corrupt"].itertuples():
        log.warning("not used: %s", row.error)
    listed = "; ".join(
        f"{r.error} (corrupt)" if r.status == "corrupt" else f"{r.folder} ({r.status})" for r in bad.itertuples()
    )
    return f"; not used ({len(bad)} job folders, rerun the sweep to redo them): {listed}"


def index_md(sweep_dir: Path, files: ReportFiles, jobs: pd.DataFrame) -> str:
    counts = jobs["status"].value_counts().to_dict()
    lines = [
        f"# Report: {sweep_dir.name}",
        "",
        f"{len(jobs)} job folders: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".",
        "",
    ]
    bad = jobs[jobs["status"] != "ok"]
    if not bad.empty:
        lines += [
            "Not in the tables (rerun the sweep to retry them):",
            "",
            bad[["job", "status", "error"]].fillna("").to_markdown(index=False),
            "",
        ]
    main_md = (files.out / "main.md").read_text(encoding="utf-8")
    lines += [
        "## Main table",
        "",
        main_md,
        "## Verdict",
        "",
        "See [verdict.md](verdict.md).",
        "",
        "## Files",
        "",
        "Tables: " + ", ".join(f"`{p.name}`" for p in files.tables),
        "",
        "Plots: " + ", ".join(f"`{p.name}`" for p in files.plots if p.suffix == ".png") + " (each also as PDF)",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in files.plots if p.suffix == ".png"]
    return "\n".join(lines) + "\n"


def write_paired(paired: pd.DataFrame, out: Path) -> list[Path]:
    """paired.csv (every comparison, raw), paired.md and paired.tex (the average and PPL rows, display form)."""
    paths = [out / "paired.csv", out / "paired.md", out / "paired.tex"]
    paired.to_csv(paths[0], index=False, float_format="%.6g")
    if paired.empty:
        paths[1].write_text(f"Paired comparisons: {NO_ITEMS} (no run of this sweep kept items.jsonl.gz).\n")
        paths[2].write_text(f"% Paired comparisons: {NO_ITEMS}.\n")
        return paths
    paths[1].write_text(paired_markdown(paired), encoding="utf-8")
    paths[2].write_text(paired_latex(paired), encoding="utf-8")
    return paths


def _plots(sweep: Sweep, stab: pd.DataFrame, claim_rows: pd.DataFrame, claim: float, out: Path) -> list[Path]:
    """Every figure of the report (PNG + PDF each)."""
    main = sweep.main
    paths = plot_metric_vs_ratio(main, out, "avg", "accuracy_vs_ratio", "average accuracy (%)", False)
    if main["ppl"].notna().any():
        windows = main["ppl_window"].dropna().unique()
        window = f"window {int(windows[0])}, " if len(windows) == 1 else ""
        paths += plot_metric_vs_ratio(main, out, "ppl", "ppl_vs_ratio", f"WikiText-2 PPL ({window}log)", True)
    paths += plot_pruning_time(main, out)
    paths += plot_pareto(main, out)
    paths += plot_removed_layers(main, out)
    paths += plot_gradmap_stages(sweep.records, main, out)
    paths += plot_per_task(main, out)
    paths += plot_equal_compute(sweep.rows, out)
    paths += plot_layer_scores(sweep.records, out)
    paths += plot_stability(sweep.rows, stab, out)
    if not claim_rows.empty:
        by_protocol = {p: claim_rows[claim_rows["protocol"] == p] for p in ("matched", "native")}
        paths += plot_claim(by_protocol["matched"], by_protocol["native"], claim, out)
    return paths
