"""verdict.md: per model and ratio, GradMAP's measured speedups and its accuracy/PPL comparison, in plain words."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradmap.report.common import CONTROLS, DENSE, GRADMAP, SHORT_PRUNE_S
from gradmap.report.paired import NO_ITEMS, ci_text, lookup
from gradmap.report.table import Averaging, layers_label, times


def _fmt_delta(delta: float, noise: float, unit: str, higher_better: bool = True) -> str:
    if not np.isfinite(delta):
        return "n/a"
    if delta == 0:
        return "tied"
    word = "ahead" if (delta > 0) == higher_better else "behind"
    noisy = " (within noise)" if np.isfinite(noise) and abs(delta) < noise else ""
    return f"{word} by {abs(delta):.2f} {unit}{noisy}"


def _ci_word(row: pd.Series, unit: str, higher_better: bool) -> str:
    """GradMAP vs a method from its paired row (diff = GradMAP - method): counted only when the CI excludes 0."""
    counted = f"{int(row['n_items'])} {'windows' if unit == 'PPL' else 'items'}"
    if not row["significant"]:
        return f"no detectable difference ({counted})"
    ahead = (row["diff"] > 0) == higher_better
    word = ("ahead" if ahead else "behind") if higher_better else ("lower (better)" if ahead else "higher (worse)")
    return f"{word} by {abs(row['diff']):.2f} {unit} (CI excludes 0, {counted})"


def _ci_cell(row: pd.Series | None) -> str:
    return "–" if row is None else f"{ci_text(row)} ({int(row['n_items'])})"


def _paired_accuracy_lines(variants, acc_ci: dict) -> list[str]:
    """The accuracy sentence when every comparison has a paired CI (a difference counts only if it excludes 0)."""
    ahead = [v for v in variants if acc_ci[v]["significant"] and acc_ci[v]["diff"] > 0]
    behind = [v for v in variants if acc_ci[v]["significant"] and acc_ci[v]["diff"] < 0]
    tied = [v for v in variants if v not in ahead and v not in behind]
    n_items = sorted({int(acc_ci[v]["n_items"]) for v in variants})
    items = f"{n_items[0]}" if len(n_items) == 1 else f"{n_items[0]}-{n_items[-1]}"
    gaps = {v: abs(float(acc_ci[v]["diff"])) for v in variants}
    lines = [
        f"Accuracy (paired bootstrap, 95 % CI over {items} items per comparison): GradMAP is ahead of "
        f"{len(ahead)} of {len(variants)} methods"
        + (" (" + ", ".join(f"{v} by {gaps[v]:.2f} pts" for v in ahead) + ")" if ahead else "")
        + f", behind {len(behind)}"
        + (" (" + ", ".join(f"{v} by {gaps[v]:.2f} pts" for v in behind) + ")" if behind else "")
        + (f"; no detectable difference from {', '.join(tied)}" if tied else "")
        + "."
    ]
    if behind:
        lines.append("**It does not lose less accuracy than every method here.**")
    elif len(ahead) == len(variants):
        lines.append("GradMAP loses less accuracy than every method here (every CI excludes 0).")
    else:
        lines.append("GradMAP is not shown to lose less accuracy than every method: some CIs include 0.")
    return lines


def _ppl_word(gradmap_ppl: float, other_ppl: float) -> str:
    """GradMAP's perplexity relative to another method's (lower is better)."""
    if not (np.isfinite(gradmap_ppl) and np.isfinite(other_ppl)):
        return "n/a"
    delta = gradmap_ppl - other_ppl
    return "tied" if delta == 0 else f"{'lower (better)' if delta < 0 else 'higher (worse)'} by {abs(delta):.2f}"


def verdict(
    main: pd.DataFrame,
    speed: pd.DataFrame,
    averaging: Averaging,
    claim: float,
    paired: pd.DataFrame | None = None,
    protocols: pd.DataFrame | None = None,
) -> str:
    """verdict.md: per model and ratio, the measured speedups and accuracy/PPL comparison, stated plainly.

    ``protocols`` (claim.csv: speedups per protocol, with CIs from repeated timings) adds the native-settings
    speedups, or says that the sweep has none."""
    paired = paired if paired is not None else pd.DataFrame()
    protocols = protocols if protocols is not None else pd.DataFrame()
    lines = [
        f"# Verdict: is GradMAP about {claim:g}× faster at pruning, and does it lose less accuracy?",
        "",
        f"Speedup vs a method = its pruning time / GradMAP's (selection + repair; > 1 means GradMAP is "
        f"faster). The claim is read as: the arithmetic mean over [{averaging.label}] is at least {claim:g}× "
        f"(docs/protocol.md §5; geometric mean and per-method ratios are shown too). Accuracy = avg of the "
        f"zero-shot tasks (%). A difference counts only when its 95 % paired-bootstrap CI over the items both "
        f"methods scored excludes 0 (paired.csv; the number of items is given with each claim). Runs without "
        f"per-item records say '{NO_ITEMS}'; their gaps are judged by the cruder independent-samples rule "
        f"(a gap under 2 standard errors of the difference is called noise) and labelled so.",
        "",
    ]
    if speed.empty:
        lines += ["**No verdict**: the sweep has no finished `gradmap` run to compare with.", ""]
        return "\n".join(lines)
    overview = speed[["model", "eval", "n_remove", "n_layers", "mean_speedup", "geomean_speedup"]].copy()
    overview["holds"] = overview["mean_speedup"].map(lambda v: "n/a" if pd.isna(v) else ("yes" if v >= claim else "no"))
    overview["layers"] = layers_label(overview)
    overview = overview[["model", "eval", "layers", "mean_speedup", "geomean_speedup", "holds"]].rename(
        columns={"mean_speedup": "mean speedup (×)", "geomean_speedup": "geo-mean (×)", "holds": f"mean ≥ {claim:g}×"}
    )
    n_hold = int((speed["mean_speedup"] >= claim).sum())
    n_cells = int(speed["mean_speedup"].notna().sum())
    lines += [
        "## Summary",
        "",
        f"The claim holds in {n_hold} of {n_cells} model × ratio cells that could be judged."
        + (" **It does not hold in this sweep.**" if n_cells and n_hold == 0 else ""),
        "",
        overview.to_markdown(index=False, floatfmt=".2f"),
        "",
    ]

    for _, cell in speed.iterrows():
        lines += _verdict_cell(main, cell, averaging, claim, paired)
        lines[-1:-1] = _protocol_lines(protocols, cell, claim)
    return "\n".join(lines)


def _protocol_lines(protocols: pd.DataFrame, cell: pd.Series, claim: float) -> list[str]:
    """The speedups under both protocols (matched tokens; native settings), with timing CIs where repeated."""
    if protocols.empty:
        return []
    here = protocols[(protocols["model"] == cell["model"]) & (protocols["n_remove"] == cell["n_remove"])]
    out = []
    for protocol, label in (("matched", "matched calibration tokens"), ("native", "native settings")):
        rows = here[here["protocol"] == protocol]
        if rows.empty:
            if protocol == "native":
                out.append(
                    "Speed at native settings: no runs at native settings in this sweep "
                    "(`+calib.protocol=native`), so that protocol is not judged."
                )
            continue
        parts = []
        for _, r in rows.iterrows():
            ci = f" [{r['ci_low']:.2g}, {r['ci_high']:.2g}]" if np.isfinite(r["ci_low"]) else ""
            parts.append(f"{r['variant']} {times(r['speedup'])}×{ci}")
        members = rows[rows["in_set"]]["speedup"].to_numpy(float)
        means = (
            f"; mean {np.mean(members):.2f}×, geometric {np.exp(np.mean(np.log(members))):.2f}× over the set"
            if len(members)
            else ""
        )
        driver = rows.loc[rows["speedup"].idxmax(), "variant"] if len(rows) else None
        out.append(
            f"Speedups, {label} (95 % CI from repeated timings where there are several): {', '.join(parts)}{means}"
            + (f"; the largest ratio ({driver}) drives the arithmetic mean" if len(members) > 1 else "")
            + f" (claim: {claim:g}×)."
        )
    return out


def _runs_line(rows: pd.DataFrame) -> list[str]:
    """How many runs (and calibration draws) each row averages, so an unequal footing is stated, not hidden."""
    if "runs" not in rows or "calib_seeds" not in rows:
        return []
    groups: dict[tuple[int, int], list[str]] = {}
    for variant, row in rows.iterrows():
        if row["method"] != DENSE and pd.notna(row["runs"]):
            draws = int(row["calib_seeds"]) if pd.notna(row["calib_seeds"]) else 1
            groups.setdefault((int(row["runs"]), draws), []).append(str(variant))
    parts = [
        f"{', '.join(names)}: {runs} run(s), {draws} calibration draw(s)" for (runs, draws), names in groups.items()
    ]
    note = " Each row averages its runs; a paired CI covers the items at the runs' mean." if len(groups) > 1 else ""
    return [f"Runs behind each row ({'; '.join(parts)}).{note}"] if parts else []


def _shared_lines(rows: pd.DataFrame) -> list[str]:
    """One flag line when a method of the cell was timed while other jobs ran on its GPU (or its CPU cores)."""
    if "shared_device" not in rows:
        return []
    shared = [v for v in rows.index if rows.loc[v, "shared_device"] > 0]  # NaN (not recorded) is not > 0
    if not shared:
        return []
    return [
        f"**Timing flag:** {', '.join(shared)} {'was' if len(shared) == 1 else 'were'} timed while other jobs ran on "
        "the same device (result.json `placement.same_device_jobs`); those times, and the speedups built on them, "
        "are not comparable: rerun them one job per device (docs/reports.md, Launchers)."
    ]


def _inference_lines(rows: pd.DataFrame, g: pd.Series) -> list[str]:
    """GradMAP's pruned-model decode speedup, next to the spread over every method with the same layer count.

    All of them leave the same architecture (repairs are merged into existing weights), so that spread is what the
    speed measurement itself varies by; a difference between methods smaller than it means nothing.
    """
    pruned = rows[rows["method"] != DENSE]["decode_speedup"].dropna()
    if pd.isna(g.get("decode_speedup")) or pruned.empty:
        return []
    spread = (
        (
            f"; over the {len(pruned)} methods with this layer count {pruned.min():.2f}–{pruned.max():.2f}× "
            "(the same architecture, so the spread is measurement noise)"
        )
        if len(pruned) > 1
        else ""
    )
    return [f"Inference: the GradMAP-pruned model decodes {g['decode_speedup']:.2f}× as fast as dense{spread}."]


def _equal_time_lines(others: pd.DataFrame, g: pd.Series, acc_ci: dict) -> list[str]:
    """Who is best at equal pruning time: the most accurate method that prunes no slower than GradMAP, and the
    fastest one not behind GradMAP by a paired CI (controls excluded: they cost nothing and prune blindly)."""
    pool = others[others["avg"].notna() & others["prune_s"].notna() & ~others["method"].isin(CONTROLS)]
    if pool.empty or pd.isna(g["prune_s"]) or pd.isna(g["avg"]):
        return []
    within = pool[pool["prune_s"] <= g["prune_s"]]
    if within.empty or within["avg"].max() <= g["avg"]:
        lines = [
            f"At equal pruning time: GradMAP ({g['avg']:.2f}%, {g['prune_s']:.3g} s) is the most accurate of the "
            f"{len(within) + 1} methods that prune in {g['prune_s']:.3g} s or less."
        ]
    else:
        best = within["avg"].idxmax()
        ci = acc_ci.get(best)
        lines = [
            f"At equal pruning time: of the {len(within)} methods that prune in {g['prune_s']:.3g} s (GradMAP's time) "
            f"or less, {best} is the most accurate ({within.loc[best, 'avg']:.2f}% in {within.loc[best, 'prune_s']:.3g}"
            f" s; GradMAP {g['avg']:.2f}%" + (f", Δ GradMAP − {best} {_ci_cell(ci)}" if ci is not None else "") + ")."
        ]
    if all(acc_ci.get(v) is not None for v in pool.index):
        not_behind = [v for v in pool.index if not (acc_ci[v]["significant"] and acc_ci[v]["diff"] > 0)]
        if not_behind:
            fastest = min(not_behind, key=lambda v: pool.loc[v, "prune_s"])
            lines.append(
                f"The fastest method not behind GradMAP in accuracy (paired CI) is {fastest}: "
                f"{pool.loc[fastest, 'prune_s']:.3g} s against GradMAP's {g['prune_s']:.3g} s."
            )
    return lines


def _verdict_cell(
    main: pd.DataFrame, cell: pd.Series, averaging: Averaging, claim: float, paired: pd.DataFrame
) -> list[str]:
    key = (main["model"] == cell["model"]) & (main["eval"] == cell["eval"]) & (main["n_remove"] == cell["n_remove"])
    rows = main[key].set_index("variant")
    g = rows.loc[GRADMAP]
    dense_row = main[(main["model"] == cell["model"]) & (main["eval"] == cell["eval"]) & (main["method"] == DENSE)]
    title = f"## {cell['model']}, {100 * cell['ratio']:.1f}% ({int(cell['n_remove'])}/{int(cell['n_layers'])} layers)"
    lines = [title + (f", eval={cell['eval']}" if pd.notna(cell["eval"]) else ""), ""]
    lines.append(
        f"Device: {g['device']}. GradMAP pruning time {g['prune_s']:.3g} s "
        f"(selection {g['select_s']:.3g} s + repair {g['repair_s']:.3g} s)."
    )
    if cell["devices"] > 1:
        lines.append("**Warning:** these methods ran on different devices; their times are not comparable.")
    lines += _runs_line(rows) + _shared_lines(rows)
    others = rows.drop(index=[GRADMAP] + [v for v in rows.index if rows.loc[v, "method"] == DENSE])
    members = set(averaging.members(rows.index))
    where = (cell["model"], cell["eval"], cell["n_remove"], GRADMAP)
    acc_ci = {v: lookup(paired, *where, v, "avg") for v in others.index}
    ppl_ci = {v: lookup(paired, *where, v, "ppl") for v in others.index}
    table = pd.DataFrame(
        {
            "method": others.index,
            "time (s)": others["prune_s"].map("{:.3g}".format),
            "GradMAP speedup (×)": others["gradmap_speedup"].map(times),
            "in mean": [
                "yes" if v in members else ("control" if v.split("+")[0] in CONTROLS else "no") for v in others.index
            ],
            "avg (%)": others["avg"].map("{:.2f}".format),
            "GradMAP accuracy": [
                _ci_word(acc_ci[v], "pts", True)
                if acc_ci[v] is not None
                else _fmt_delta(g["avg"] - r["avg"], 2 * math.hypot(g["avg_se"], r["avg_se"]), "pts")
                for v, r in others.iterrows()
            ],
            "Δavg [95 % CI] (items)": [_ci_cell(acc_ci[v]) for v in others.index],
            "PPL": others["ppl"].map("{:.2f}".format),
            "GradMAP PPL": [
                _ci_word(ppl_ci[v], "PPL", False) if ppl_ci[v] is not None else _ppl_word(g["ppl"], r["ppl"])
                for v, r in others.iterrows()
            ],
            "ΔPPL [95 % CI] (windows)": [_ci_cell(ppl_ci[v]) for v in others.index],
        }
    )
    if not table.empty:
        lines += ["", table.to_markdown(index=False), ""]

    mean, geo = cell["mean_speedup"], cell["geomean_speedup"]
    missing = cell["missing_from_set"]
    if pd.isna(mean):
        lines.append(f"**Speed claim: cannot be judged here**: none of [{averaging.label}] ran at this ratio.")
    else:
        verdict_word = "holds" if mean >= claim else "does not hold"
        lines.append(
            f"**Speed claim {verdict_word}**: mean speedup {mean:.2f}× (geometric {geo:.2f}×) over "
            f"[{cell['averaged_over']}] is {'at least' if mean >= claim else 'below'} {claim:g}×."
            + (f" Not in the sweep, so not averaged: {missing}." if missing else "")
        )
        slower = others[(others["gradmap_speedup"] < 1) & ~others["method"].isin(CONTROLS)]  # controls cost ~0
        if not slower.empty:
            names = ", ".join(f"{v} ({times(x)}×)" for v, x in slower["gradmap_speedup"].items())
            lines.append(f"GradMAP is slower than: {names}.")
    if dense_row.empty or pd.isna(g["avg"]):
        lines.append(
            "Accuracy: no dense reference or no zero-shot tasks in this sweep."
            if pd.isna(g["avg"])
            else "Accuracy: no dense reference in this sweep."
        )
    if pd.notna(g["avg"]):
        if not dense_row.empty:
            lines.append(
                f"GradMAP avg {g['avg']:.2f}% vs dense {dense_row['avg'].iloc[0]:.2f}% "
                f"({g['d_avg']:+.2f} pts, retention {g['retention_pct']:.1f}%)."
            )
        comp = others[others["avg"].notna()]
        if comp.index.map(lambda v: acc_ci[v] is not None).all() and len(comp):
            lines += _paired_accuracy_lines(comp.index, acc_ci)
            comp = comp.iloc[0:0]  # judged by the paired CIs above; the independent-samples rule is not needed
        deltas = g["avg"] - comp["avg"]
        noise = 2 * np.hypot(g["avg_se"], comp["avg_se"])
        ahead, behind = comp.index[deltas > 0].tolist(), comp.index[deltas < 0].tolist()
        noisy = comp.index[np.isfinite(noise) & (deltas.abs() < noise)].tolist()
        all_noisy = len(noisy) == len(comp)
        if len(comp):
            lines.append(
                f"Accuracy ({NO_ITEMS}; independent-samples rule): GradMAP is ahead of {len(ahead)} of "
                f"{len(comp)} methods and behind {len(behind)}"
                + (f" ({', '.join(f'{v} by {-deltas[v]:.2f} pts' for v in behind)})" if behind else "")
                + (f"; within noise of {', '.join(noisy)}" if noisy else "")
                + "."
            )
        if behind:
            lines.append(
                "**It does not lose less accuracy than every method here**"
                + (" — though every gap is within noise at this evaluation size." if all_noisy else ".")
            )
        elif len(ahead) == len(comp) and len(comp):
            lines.append(
                "GradMAP loses less accuracy than every method here"
                + (
                    " — but every gap is within noise."
                    if all_noisy
                    else f" ({len(noisy)} of the gaps within noise)."
                    if noisy
                    else "."
                )
            )
    if pd.notna(g["ppl"]):
        comp = others[others["ppl"].notna()]
        worse = comp.index[comp["ppl"] < g["ppl"]].tolist()
        worse_text = ", ".join(f"{v} ({comp.loc[v, 'ppl']:.2f})" for v in worse)
        lines.append(
            f"PPL: GradMAP {g['ppl']:.2f}"
            + (f" vs dense {dense_row['ppl'].iloc[0]:.2f}" if not dense_row.empty else "")
            + f"; lower than {len(comp) - len(worse)} of {len(comp)} methods"
            + (f", higher than {worse_text}" if worse else "")
            + "."
        )
        with_ci = [v for v in comp.index if ppl_ci.get(v) is not None]
        if with_ci:
            better = [v for v in with_ci if ppl_ci[v]["significant"] and ppl_ci[v]["diff"] < 0]
            worse_ci = [v for v in with_ci if ppl_ci[v]["significant"] and ppl_ci[v]["diff"] > 0]
            windows = int(max(ppl_ci[v]["n_items"] for v in with_ci))
            lines.append(
                f"PPL, paired over {windows} windows (95 % CI excludes 0): lower than {len(better)}, higher than "
                f"{len(worse_ci)}"
                + (f" ({', '.join(worse_ci)})" if worse_ci else "")
                + f", no detectable difference from {len(with_ci) - len(better) - len(worse_ci)} of {len(with_ci)}."
            )
        else:
            lines.append(f"PPL: {NO_ITEMS}.")
    lines += _equal_time_lines(others, g, acc_ci) + _inference_lines(rows, g)
    caveats = []
    if pd.notna(g["prune_s"]) and g["prune_s"] < SHORT_PRUNE_S:
        caveats.append(
            f"GradMAP prunes in {g['prune_s']:.3g} s here, where fixed per-call overheads weigh as much "
            "as the passes the claim counts; judge the claim on a 7B model or with `make bench`"
        )
    if str(g["device"]).startswith("cpu"):
        caveats.append("timings are from a CPU; the claim concerns GPUs (docs/protocol.md §5)")
    items = g.get("items_per_task")
    if pd.notna(items) and items and items < 500:
        caveats.append(f"only {int(items)} items per task, so accuracy gaps of a few points are noise")
    if caveats:
        lines.append("Caveats: " + "; ".join(caveats) + ".")
    lines.append("")
    return lines
