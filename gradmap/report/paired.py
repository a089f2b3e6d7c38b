"""paired.{csv,md,tex}: every method vs each GradMAP preset and vs dense, item by item, with bootstrap CIs.

Reads each run's ``items.jsonl.gz`` (gradmap.eval.items). A method's value on an item is its primary metric there
(the run's metric map: acc or acc_norm), averaged over the method's runs (seeds) when there are several; the CI then
covers the sampling of items, at the seeds' mean. Items are matched by (task, doc_id) and must carry the same
``doc_hash`` in both runs (else the runs saw different items and the comparison is refused). Accuracy differences are
in points (×100); the average is the unweighted mean over the tasks both runs scored; PPL differences are in PPL.
Runs without an items file give no rows: the report says "no per-item data, CIs unavailable" instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradmap.eval.items import ITEMS_FILE, read_items
from gradmap.eval.tasks import TASK_NAMES
from gradmap.report.common import DENSE, GRADMAP
from gradmap.report.stats import (
    LEVEL,
    RESAMPLES,
    SEED,
    paired_bootstrap,
    ppl_paired_bootstrap,
    stratified_paired_bootstrap,
)

NO_ITEMS = "no per-item data, CIs unavailable"
COLUMNS = [
    "model",
    "eval",
    "n_remove",
    "n_layers",
    "ratio",
    "a",
    "b",
    "metric",
    "unit",
    "a_value",
    "b_value",
    "diff",
    "ci_low",
    "ci_high",
    "significant",
    "n_items",
    "runs_a",
    "runs_b",
    "level",
    "resamples",
]


def _items_path(row: pd.Series) -> Path | None:
    """The run's items file, or the one beside the dense result it reused."""
    for folder in (row.get("job_dir"), row.get("reused_from")):
        if isinstance(folder, str) and (Path(folder) / ITEMS_FILE).is_file():
            return Path(folder) / ITEMS_FILE
    return None


def _primary(metric_map: Any) -> dict[str, str]:
    pairs = (p.split("=", 1) for p in str(metric_map or "").split(";") if "=" in p)
    return dict(pairs)


def item_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Long table of every run's per-item values: model, eval, variant, n_remove, task, doc_id, doc_hash, value,
    tokens (PPL windows: value = summed NLL), run (job folder). Empty when no run kept items."""
    frames = []
    for _, row in rows.iterrows():
        path = _items_path(row)
        if path is None:
            continue
        metric = _primary(row.get("metric_map"))
        recs = []
        for item in read_items(path):
            task = item["task"]
            if task.endswith("_ppl"):
                value, tokens = item.get("nll"), item.get("tokens")
            else:
                value, tokens = item.get(metric.get(task, "acc")), np.nan
            if value is not None:
                recs.append((task, int(item["doc_id"]), item.get("doc_hash"), float(value), tokens))
        frame = pd.DataFrame(recs, columns=["task", "doc_id", "doc_hash", "value", "tokens"])
        for key in ("model", "eval", "variant", "n_remove", "job_dir"):
            frame[key] = row[key]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["model", "eval", "variant", "n_remove", "task", "doc_id", "value", "tokens"])
    items = pd.concat(frames, ignore_index=True)
    hashes = items.dropna(subset=["doc_hash"]).groupby(["model", "eval", "task", "doc_id"])["doc_hash"].nunique()
    if (hashes > 1).any():
        bad = hashes[hashes > 1].index[0]
        raise ValueError(
            f"runs of {bad[0]} (eval={bad[1]}) scored different documents as {bad[2]} item {bad[3]}; "
            "paired comparisons need the same items (same eval preset and data files)"
        )
    return items


def _per_item_means(items: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """(model, eval, variant, n_remove) -> per (task, doc_id) value averaged over runs, and the run count."""
    keys = ["model", "eval", "variant", "n_remove"]
    out = {}
    for key, group in items.groupby(keys, sort=False, dropna=False):
        means = group.groupby(["task", "doc_id"]).agg(value=("value", "mean"), tokens=("tokens", "first"))
        means.attrs["runs"] = group["job_dir"].nunique()
        out[key] = means
    return out


def compare(
    a: pd.DataFrame, b: pd.DataFrame, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> list[dict[str, Any]]:
    """Rows of (metric, a_value, b_value, diff, ci, n) for two per-item tables of the same cell."""
    joined = a.join(b, how="inner", lsuffix="_a", rsuffix="_b")
    out = []
    pairs = []
    for task in [t for t in TASK_NAMES if t in joined.index.get_level_values("task")]:
        sub = joined.loc[task]
        pairs.append((100 * sub["value_a"].to_numpy(), 100 * sub["value_b"].to_numpy()))
        iv = paired_bootstrap(*pairs[-1], resamples=resamples, level=level, seed=seed)
        out.append(_row(task, "pts", pairs[-1][0].mean(), pairs[-1][1].mean(), iv))
    if pairs:
        iv = stratified_paired_bootstrap(pairs, resamples=resamples, level=level, seed=seed)
        a_avg, b_avg = np.mean([p[0].mean() for p in pairs]), np.mean([p[1].mean() for p in pairs])
        out.append(_row("avg", "pts", a_avg, b_avg, iv))
    ppl_tasks = [t for t in joined.index.get_level_values("task").unique() if str(t).endswith("_ppl")]
    for task in ppl_tasks:
        sub = joined.loc[task]
        tokens = sub["tokens_a"].to_numpy(dtype=float)
        iv = ppl_paired_bootstrap(sub["value_a"], sub["value_b"], tokens, resamples=resamples, level=level, seed=seed)
        total = tokens.sum()
        ppl_a, ppl_b = np.exp(sub["value_a"].sum() / total), np.exp(sub["value_b"].sum() / total)
        out.append(_row("ppl" if task == "wikitext2_ppl" else task, "PPL", ppl_a, ppl_b, iv))
    return out


def _row(metric: str, unit: str, a_value: float, b_value: float, iv) -> dict[str, Any]:
    return {
        "metric": metric,
        "unit": unit,
        "a_value": float(a_value),
        "b_value": float(b_value),
        "diff": iv.estimate,
        "ci_low": iv.low,
        "ci_high": iv.high,
        "significant": iv.significant,
        "n_items": iv.n,
        "level": iv.level,
        "resamples": iv.resamples,
    }


def paired_table(main: pd.DataFrame, items: pd.DataFrame, resamples: int = RESAMPLES) -> pd.DataFrame:
    """Per model × eval × ratio: (GradMAP preset, method) for every other pruned method, and (method, dense) for
    every pruned method; diff = a - b with its paired-bootstrap CI. Empty (with the columns) without items."""
    if items.empty:
        return pd.DataFrame(columns=COLUMNS)
    per_item = _per_item_means(items)
    rows = []
    for (model, ev, n_remove), cell in main.groupby(["model", "eval", "n_remove"], sort=False, dropna=False):
        if (cell["method"] == DENSE).all():
            continue
        variants = list(cell["variant"])
        dense_key = next((k for k in per_item if k[:2] == (model, ev) and k[2] == DENSE), None)
        pairs = [(g, v) for g in variants if g.startswith(GRADMAP) for v in variants if v != g]
        pairs += [(v, DENSE) for v in variants if v != DENSE]
        for a, b in pairs:
            key_a = (model, ev, a, n_remove)
            key_b = dense_key if b == DENSE else (model, ev, b, n_remove)
            if key_a not in per_item or key_b not in per_item:
                continue
            base = {
                "model": model,
                "eval": ev,
                "n_remove": n_remove,
                "n_layers": cell["n_layers"].iloc[0],
                "ratio": cell["ratio"].iloc[0],
                "a": a,
                "b": b,
                "runs_a": per_item[key_a].attrs["runs"],
                "runs_b": per_item[key_b].attrs["runs"],
            }
            rows += [{**base, **r} for r in compare(per_item[key_a], per_item[key_b], resamples)]
    return pd.DataFrame(rows, columns=COLUMNS)


def lookup(paired: pd.DataFrame, model: str, ev: Any, n_remove: int, a: str, b: str, metric: str) -> pd.Series | None:
    """The paired row for (a - b) on ``metric`` in one cell, or None."""
    if paired.empty:
        return None
    key = (paired["model"] == model) & (paired["n_remove"] == n_remove) & (paired["a"] == a) & (paired["b"] == b)
    key &= (paired["eval"] == ev) if pd.notna(ev) else paired["eval"].isna()
    hit = paired[key & (paired["metric"] == metric)]
    return hit.iloc[0] if len(hit) else None


def ci_text(row: pd.Series | None, digits: int = 2) -> str:
    """ "+1.20 [+0.30, +2.10]" (diff and its CI), or the no-items sentence."""
    if row is None:
        return NO_ITEMS
    if not np.isfinite(row["ci_low"]):
        return f"{row['diff']:+.{digits}f} [CI undefined: {int(row['n_items'])} item]"
    return f"{row['diff']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"
