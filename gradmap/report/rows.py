"""Reading a sweep: one flat row per ok result.json, job states, and rows aggregated per cell."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradmap.eval.tasks import PRIMARY_METRIC, TASK_NAMES
from gradmap.report.common import DENSE, GIB, METHOD_ORDER
from gradmap.results import read_result
from gradmap.sweep import scan


def variant_of(record: dict[str, Any]) -> str:
    """The row label: the run's ``label`` (conf/variant/*) if set, else the method, plus ``+repair`` when the sweep
    overrode its default repair, plus `` (not merged)`` when the repair left explicit modules on the model
    (LinearPatch; ``repair_info.merged``)."""
    method = str(record.get("method"))
    if (record.get("config") or {}).get("label") and method != DENSE:
        return str(record["config"]["label"])
    override = ((record.get("config") or {}).get("repair") or {}).get("name")
    label = method if method == DENSE or not override else f"{method}+{override}"
    return f"{label} (not merged)" if (record.get("repair_info") or {}).get("merged") is False else label


def _primary_metric(metrics: dict[str, Any], task: str) -> str:
    """Which metric the record's ``<task>`` value is (an eval preset may override the metric map).

    Records since the online-task change name it (``metrics.metric_map``); older ones are matched by value.
    """
    recorded = metrics.get("metric_map")
    if isinstance(recorded, dict) and isinstance(recorded.get(task), str):
        return recorded[task]
    value = metrics.get(task)
    matches = [m for m in ("acc", "acc_norm") if metrics.get(f"{task}/{m}") == value]
    return matches[0] if len(matches) == 1 else PRIMARY_METRIC.get(task, "acc")


def row_of(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row per ok result (fractions stay fractions; scaling is for display)."""
    metrics = record.get("metrics") or {}
    timing = record.get("timing") or {}
    speed = record.get("speed") or {}
    config = record.get("config") or {}
    calib = config.get("calib") or {}
    tasks = [t for t in TASK_NAMES if t in metrics]
    stderrs = [metrics.get(f"{t}/{_primary_metric(metrics, t)}_stderr") for t in tasks]
    avg_se = (
        100 * math.sqrt(sum(s * s for s in stderrs)) / len(tasks)
        if tasks and all(isinstance(s, (int, float)) and math.isfinite(s) for s in stderrs)
        else np.nan
    )
    n_layers, n_remove = record.get("n_layers"), record.get("n_remove", 0)
    row = {
        "model": record.get("model"),
        "eval": metrics.get("eval_preset") or (config.get("eval") or {}).get("name"),
        "method": record.get("method"),
        "variant": variant_of(record),
        "repair": record.get("repair"),
        "n_layers": n_layers,
        "n_remove": n_remove,
        "ratio": n_remove / n_layers if n_layers else np.nan,
        "nominal_ratio": _nominal(config, n_remove, n_layers),
        **{t: metrics.get(t, np.nan) for t in TASK_NAMES},
        **{f"{t}_se": _number(metrics.get(f"{t}/{_primary_metric(metrics, t)}_stderr")) for t in tasks},
        "items_per_task": min((metrics.get(f"{t}/n") or 0 for t in tasks), default=np.nan),
        "metric_map": ";".join(f"{t}={_primary_metric(metrics, t)}" for t in tasks),
        "avg": metrics.get("avg", np.nan),
        "avg_se": avg_se,
        "dev_nll": record.get("dev_nll", np.nan),
        "ppl": metrics.get("wikitext2_ppl", np.nan),
        "ppl_window": metrics.get("ppl_window", np.nan),
        "select_s": timing.get("select_s", np.nan),
        "repair_s": timing.get("repair_s", np.nan),
        "prune_s": timing.get("prune_s", np.nan),
        "peak_mem_gib": timing.get("peak_mem_bytes", np.nan) / GIB if timing.get("peak_mem_bytes") else np.nan,
        "peak_mem_kind": timing.get("peak_mem_kind"),
        "device": timing.get("device"),
        "params_before": record.get("params_before", np.nan),
        "params_after": record.get("params_after", np.nan),
        "prefill_tok_s": speed.get("prefill_tok_s", np.nan),
        "decode_tok_s": speed.get("decode_tok_s", np.nan),
        "latency_s": speed.get("latency_s", np.nan),
        "eval_req_s": _number(((record.get("lm_eval") or {}).get("throughput") or {}).get("requests_per_s")),
        "speed_setup": (
            f"{speed.get('prompt_len')}+{speed.get('gen_len')} tok, batch {speed.get('batch_size')}, "
            f"{speed.get('device')}, {speed.get('dtype')}, {speed.get('threads')} threads"
            if speed
            else None
        ),
        "removed_layers": tuple(sorted(record.get("removed_layers") or ())),
        "job_name": record.get("job_name"),
        "reused_from": record.get("reused_from"),
        "seed": record.get("seed"),
        "calib_seed": calib.get("seed"),  # the calibration draw (follows seed unless pinned)
        "calib_tokens": _calib_tokens(calib),
        "protocol": str(calib.get("protocol") or "matched"),
        "prune_s_repeats": _timed_spans(timing),
        "items_file": metrics.get("items_file"),
        "shared_device": _shared_device(record),
    }
    return row


def _shared_device(record: dict[str, Any]) -> float:
    """Other gradmap jobs that ran on this run's device during its timed span (``placement``, gradmap/core/sharing.py);
    NaN for records written before placement was recorded."""
    placement = record.get("placement")
    if not isinstance(placement, dict) or not isinstance(placement.get("same_device_jobs"), list):
        return np.nan
    return float(len(placement["same_device_jobs"]))


def _nominal(config: dict[str, Any], n_remove: Any, n_layers: Any) -> float:
    """The ratio the run asked for (prune.ratio, e.g. 0.125), which plots and titles show; else n_remove / L."""
    asked = (config.get("prune") or {}).get("ratio") or (config.get("prune") or {}).get("default_ratio")
    if isinstance(asked, (int, float)) and not isinstance(asked, bool) and n_remove:
        return float(asked)
    return n_remove / n_layers if n_layers else np.nan


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _timed_spans(timing: dict[str, Any]) -> tuple[float, ...]:
    """Every timed pruning span of a run: its repeats (timing.repeats > 1), else its one prune_s."""
    if timing.get("prune_s_repeats"):
        return tuple(float(t) for t in timing["prune_s_repeats"])
    single = timing.get("prune_s")
    return (float(single),) if isinstance(single, (int, float)) and not isinstance(single, bool) else ()


def _calib_tokens(calib: dict[str, Any]) -> int:
    """Calibration tokens of a run (windows × length; 0 when the record does not say), the matched-tokens key."""
    n, seq = calib.get("n_samples"), calib.get("seq_len")
    return int(n) * int(seq) if isinstance(n, int) and isinstance(seq, int) else 0


def load(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """(ok rows, every job's status, the ok records) of one sweep folder."""
    states = scan(sweep_dir)
    jobs = pd.DataFrame(
        [
            {"job": s.name, "status": s.status, "error": s.error, "folder": str(s.dir), "reused_from": s.reused_from}
            for s in states
        ],
        columns=["job", "status", "error", "folder", "reused_from"],
    )
    found = [(s, r) for s in states if s.status == "ok" and (r := read_result(s.dir)) is not None]
    records = [r for _, r in found]
    rows = pd.DataFrame([{**row_of(r), "job_dir": str(s.dir)} for s, r in found])
    return rows, jobs, records


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per model × eval × variant × layer count: metrics averaged, times as medians, runs counted."""
    keys = ["model", "eval", "variant", "n_remove"]
    medians = {"select_s", "repair_s", "prune_s", "peak_mem_gib", "prefill_tok_s", "decode_tok_s", "latency_s"}
    medians.add("eval_req_s")
    spec: dict[str, Any] = {}
    for col in rows.columns:
        if col in keys or col in ("seed", "calib_seed", "job_dir", "prune_s_repeats", "calib_tokens"):
            continue
        if col in medians:
            spec[col] = "median"
        elif pd.api.types.is_numeric_dtype(rows[col]):
            spec[col] = "mean"
        else:
            spec[col] = "first"
    groups = rows.groupby(keys, sort=False, dropna=False)
    out = groups.agg(spec)
    out["runs"] = groups.size()
    out["seeds"] = groups["seed"].nunique() if "seed" in rows else 1
    out["calib_seeds"] = groups["calib_seed"].nunique() if "calib_seed" in rows else 1
    out["calib_tokens"] = groups["calib_tokens"].agg(lambda s: int(s.iloc[0]) if s.nunique() == 1 else -1)
    for col in ("avg", "ppl", "prune_s", *TASK_NAMES):  # spread across runs (seeds): NaN for a single run
        if col in rows:
            out[f"{col}_std"] = groups[col].std(ddof=1)
    if "prune_s_repeats" in rows:  # every timed span of every run of the cell (timing.repeats and seeds together)
        spans = groups["prune_s_repeats"].agg(lambda s: [t for run in s for t in run])
        out["prune_s_min"] = spans.map(lambda t: min(t) if t else np.nan)
        out["prune_s_spread"] = spans.map(lambda t: (max(t) - min(t)) / float(np.median(t)) if len(t) > 1 else np.nan)
        out["timed_spans"] = spans.map(len)
    out = out.reset_index()
    out["order"] = out["method"].map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    return out.sort_values(["model", "eval", "n_remove", "order", "variant"], kind="stable").drop(columns="order")
