"""Which lm-eval tasks a preset may name, which metric of each is primary, and lm-eval's own results record.

Why this is separate from :mod:`gradmap.eval.harness`: the harness runs the evaluation; this module decides what
a task name means before any model work (so a bad name fails in milliseconds) and reads lm-eval's generic
result layout, in which any task or group (MMLU, LAMBADA, GSM8K, ...) reports ``"<metric>,<filter>"`` keys.

* ``source: local`` (offline): only the 7 task copies in :mod:`gradmap.eval.tasks`; any other name fails with
  one line saying it needs ``eval=online`` and internet.
* ``source: online``: any lm-eval task, group or tag name; lm-eval itself rejects names it does not know. The
  primary metric per task is the preset's ``metric_map`` entry, else :data:`ONLINE_PRIMARY_METRIC`, else the first
  metric the task reports (recorded, so the report knows which one it was).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradmap.eval.tasks import PRIMARY_METRIC, TASK_NAMES

log = logging.getLogger(__name__)

# Metric keys as lm-eval writes them, "<metric>,<filter>" with the filter dropped when it is "none".
ONLINE_PRIMARY_METRIC: dict[str, str] = {
    **PRIMARY_METRIC,
    "mmlu": "acc",
    "lambada": "acc",
    "lambada_openai": "acc",
    "lambada_standard": "acc",
    "gsm8k": "exact_match,strict-match",
    "gsm8k_cot": "exact_match,strict-match",
    "triviaqa": "exact_match,remove_whitespace",
    "truthfulqa_mc2": "acc",
}
HUB_HOST = ("huggingface.co", 443)
LOCAL_METRICS = ("acc", "acc_norm")  # what the local task copies compute


def check_tasks(tasks: Sequence[str], source: str) -> list[str]:
    """The task list, validated for ``source`` without touching lm-eval (one-line ValueError)."""
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"eval tasks listed twice: {tasks}")
    if source == "local":
        for name in tasks:
            if name not in TASK_NAMES:
                raise ValueError(
                    f"eval task {name!r} needs eval=online and internet; offline, the tasks are {', '.join(TASK_NAMES)}"
                )
    for name in tasks:
        if not isinstance(name, str) or not name:
            raise ValueError(f"eval task {name!r} must be a non-empty lm-eval task or group name")
    return tasks


def check_online_reachable(what: str, advice: str = "", timeout_s: float = 3.0) -> None:
    """Fail before model work when the HF hub (online task data, model uploads) cannot be reached.

    ``what`` is the subject of the one-line message ("eval task 'mmlu' needs ..."), ``advice`` its tail.
    """
    flags = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(k, "0") not in ("", "0")]
    if flags:
        raise ValueError(f"{what} needs internet, but {'/'.join(flags)} is set{advice}")
    try:
        socket.create_connection(HUB_HOST, timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(f"{what} needs internet: {HUB_HOST[0]} is unreachable ({type(err).__name__}){advice}") from err


def metric_key(metric: str) -> str:
    """lm-eval's result key of a metric name: ``acc`` -> ``acc,none``; ``exact_match,strict-match`` stays."""
    return metric if "," in metric else f"{metric},none"


def flat_name(key: str) -> str:
    """Our flat name of an lm-eval result key: ``acc,none`` -> ``acc``; a real filter is kept."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def default_metric_map(tasks: Sequence[str], source: str, metric_map: str | Mapping[str, str] | None) -> dict:
    """The primary metric per task as far as it is known before evaluating (online names may stay open)."""
    table = PRIMARY_METRIC if source == "local" else ONLINE_PRIMARY_METRIC
    if metric_map in (None, "default"):
        chosen = {t: table[t] for t in tasks if t in table}
    elif isinstance(metric_map, str):
        chosen = dict.fromkeys(tasks, metric_map)
    elif isinstance(metric_map, Mapping):
        extra = sorted(set(metric_map) - set(tasks))
        if extra:
            raise ValueError(f"eval.metric_map names {extra}, which are not in eval.tasks {list(tasks)}")
        chosen = {t: metric_map.get(t, table.get(t)) for t in tasks if metric_map.get(t, table.get(t))}
    else:
        raise ValueError(f"eval.metric_map must be null, default, a metric name or a task->metric map: {metric_map!r}")
    for task, metric in chosen.items():
        allowed = LOCAL_METRICS if source == "local" else None
        if not isinstance(metric, str) or (allowed and metric not in allowed):
            raise ValueError(
                f"eval.metric_map[{task!r}] = {metric!r}; allowed: "
                + (", ".join(LOCAL_METRICS) if allowed else "an lm-eval metric name such as exact_match,strict-match")
            )
    return chosen


def task_metrics(out: Mapping[str, Any], name: str) -> dict[str, float]:
    """Every numeric metric lm-eval reports for task or group ``name`` (flat names, with ``_stderr`` and ``n``)."""
    res = (out.get("results") or {}).get(name) or (out.get("groups") or {}).get(name)
    if res is None:
        raise ValueError(f"lm-eval returned no results for task {name!r}")
    row: dict[str, float] = {}
    for key, value in res.items():
        if key == "alias" or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        row[flat_name(key)] = float(value)
    row["n"] = int(items_scored(out, name))
    return row


def items_scored(out: Mapping[str, Any], name: str) -> int:
    """Items behind a task's numbers; a group's is the sum over its subtasks."""
    n_samples = out.get("n-samples") or {}
    if name in n_samples:
        return int(n_samples[name]["effective"])
    children = (out.get("group_subtasks") or {}).get(name) or []
    return sum(items_scored(out, child) for child in children)


def pick_primary(out: Mapping[str, Any], name: str, row: Mapping[str, float], wanted: str | None) -> str:
    """The primary metric of ``name``: the wanted one (must be reported) or the first metric lm-eval reports."""
    if wanted is not None:
        if flat_name(metric_key(wanted)) not in row:
            reported = sorted(k for k in row if not k.endswith("_stderr") and k != "n")
            raise ValueError(
                f"task {name!r} reports no {wanted!r}; reported: {', '.join(reported)}; set eval.metric_map"
            )
        return flat_name(metric_key(wanted))
    first = next(k for k in row if not k.endswith("_stderr") and k != "n")
    log.info("task %s: no metric map entry, using its first metric %r (recorded in metric_map)", name, first)
    return first


def higher_is_better(out: Mapping[str, Any], name: str, metric: str) -> bool:
    """lm-eval's direction of ``metric`` for ``name`` (True when it does not say)."""
    table = (out.get("higher_is_better") or {}).get(name) or {}
    return table.get(metric.partition(",")[0], True) is not False


def save_results_json(out: Mapping[str, Any], folder: Path) -> Path | None:
    """lm-eval's own results record (versions, configs, n-shot, higher_is_better) through its EvaluationTracker:
    ``folder/results_<time>.json``. Samples are not written here (the per-item records hold them)."""
    from lm_eval.loggers import EvaluationTracker

    before = set(folder.glob("results_*.json")) if folder.is_dir() else set()
    results = {k: copy.copy(v) for k, v in out.items() if k != "samples"}
    EvaluationTracker(output_path=str(folder / "results.json")).save_results_aggregated(
        results=results, samples=out.get("samples")
    )
    written = sorted(set(folder.glob("results_*.json")) - before)
    if not written:  # lm-eval logs the reason and carries on; the job does too, but says so
        log.warning("lm-eval did not write its results record into %s", folder)
        return None
    return written[-1]
