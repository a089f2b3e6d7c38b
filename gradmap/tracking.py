"""Experiment tracking at the edge: W&B or nothing. Tracking never fails a job.

A tracker problem (no credentials, no network, wandb missing) degrades to offline mode or to no tracking with a
one-line warning: the measured result in runs/ is what matters, and losing a finished job to a dashboard would
be the wrong trade.

What one W&B run holds (one run per job; the report gets one more run in the same group):

* id: a stable hash of (sweep, job id), so a rerun of a job resumes its own run and the same job in two sweeps
  never shares one (syncing would merge them); name: the job name; group: the sweep; job_type: prune or dense;
  tags: model, method, repair, ratio.
* mode: ``tracker.mode`` when set (an explicit value wins); otherwise ``WANDB_MODE`` and wandb's own settings
  decide, and without either and without credentials the run is written offline under
  ``<job folder>/wandb/offline-run-*`` (``wandb sync`` uploads it later).
* summary: status, removed layers, parameter counts, pruning phases (``timing/*``), metrics, inference speed.
* tables: ``results`` (per task and metric, with stderr and item count), ``layer_scores`` (each selector decision,
  every candidate layer's score) and a bar chart of the first decision's scores; lm-eval's own ``WandbLogger``
  adds its results table, results artifact and per-task sample tables.
* artifacts: ``<job>-results`` (type ``eval_results``: result.json, lm-eval's records, per-item files) and, with
  ``tracker.log_model=true``, ``<job>-model`` (type ``model``: the saved pruned model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradmap.results import stable_hash

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
# Files of a job folder that go into its eval_results artifact (besides result.json), as glob patterns.
RESULT_GLOBS = ("result.json", "error.log", "items*", "lm_eval/**/*.json", "lm_eval/**/*.jsonl")


def wandb_run_id(sweep: str, job_id: str) -> str:
    """The W&B run id of job ``job_id`` in sweep ``sweep``: stable across reruns, distinct across sweeps."""
    return stable_hash({"sweep": str(sweep), "job_id": str(job_id)}, length=16)


def resolve_mode(mode: str | None) -> str | None:
    """The mode to pass to ``wandb.init``: the explicit config value, else None (``WANDB_MODE``/settings decide),
    else "offline" when nothing is set and there are no credentials (an online start would only fail)."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"tracker.mode={mode!r}; allowed: null (WANDB_MODE decides), {', '.join(MODES)}")
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:  # passed on explicitly: wandb's settings of an earlier run in this process must not override it
        return env if env in MODES else None
    return None if _has_credentials() else "offline"


class Tracker:
    """No-op tracker; also the interface."""

    name = "none"
    run_id: str | None = None

    def log_summary(self, values: Mapping[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_job(self, record: Mapping[str, Any], job_dir: Path) -> None:
        """Everything a finished job adds: summary, tables, chart and the results artifact."""

    def log_lm_eval(self, output: Mapping[str, Any]) -> None:
        """lm-eval's raw ``simple_evaluate`` output, logged by lm-eval's own WandbLogger."""

    def log_model(self, folder: Path, name: str) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """One W&B run per job (see the module docstring for what it holds)."""

    name = "wandb"

    def __init__(self, cfg: Mapping[str, Any], init: Mapping[str, Any]) -> None:
        import wandb

        mode = resolve_mode(cfg.get("mode"))
        if mode == "online" and not _has_credentials():
            log.warning("tracker.mode=online but no W&B credentials (WANDB_API_KEY or ~/.netrc); logging offline")
            mode = "offline"
        kwargs = dict(init, resume="allow", reinit="finish_previous")
        try:
            self.run = wandb.init(**kwargs, **({"mode": mode} if mode else {}))
        except Exception as err:  # network, auth or "run ID in use": keep the job, log offline
            if mode == "offline":
                raise
            log.warning("W&B online start failed (%s); logging offline instead", _first_line(err))
            mode = "offline"
            self.run = wandb.init(**kwargs, mode="offline")
        self.run_id = str(init["id"])
        self.mode = "disabled" if getattr(self.run, "disabled", False) else (mode or self.run.settings.mode)
        self.log_samples = bool(cfg.get("log_samples", True))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_job(self, record: Mapping[str, Any], job_dir: Path) -> None:
        import wandb

        self.log_summary(job_summary(record))
        results = result_rows(record)
        if results:
            self.log_table("results", RESULT_COLUMNS, results)
        scores = score_rows(record)
        if scores:
            table = wandb.Table(columns=SCORE_COLUMNS, data=scores)
            first = wandb.Table(columns=SCORE_COLUMNS, data=[row for row in scores if row[0] == 0])
            chart = wandb.plot.bar(first, "layer", "score", title=f"layer scores ({record.get('method')})")
            self.run.log({"layer_scores": table, "layer_score_chart": chart})
        artifact = wandb.Artifact(artifact_name(record, "results"), type="eval_results")
        for pattern in RESULT_GLOBS:
            for path in sorted(job_dir.glob(pattern)):
                if path.is_file():
                    artifact.add_file(str(path), name=str(path.relative_to(job_dir)))
        self.run.log_artifact(artifact)

    def log_lm_eval(self, output: Mapping[str, Any]) -> None:
        from lm_eval.loggers import WandbLogger

        logger = WandbLogger()  # attaches to this run (wandb.run), so nothing is initialised twice
        logger.run = self.run
        logger.post_init(dict(output))
        logger.log_eval_result()
        if self.log_samples and output.get("samples"):
            logger.log_eval_samples(output["samples"])

    def log_model(self, folder: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(name, type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


RESULT_COLUMNS = ["task", "metric", "value", "stderr", "n", "primary"]
SCORE_COLUMNS = ["decision", "layer", "score", "removed"]


def job_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary of a job record: flat facts, ``timing/*``, ``metrics/*``, ``speed/*``, parameter counts."""
    out = {k: record[k] for k in ("status", "n_layers", "n_remove", "ratio", "removed_layers") if k in record}
    if record.get("params_before"):
        out["params/before"] = record["params_before"]
        out["params/after"] = record.get("params_after")
        out["params/kept_fraction"] = (record.get("params_after") or 0) / record["params_before"]
    out.update({f"timing/{k}": v for k, v in (record.get("timing") or {}).items()})
    out.update({f"metrics/{k}": v for k, v in (record.get("metrics") or {}).items()})
    out.update({f"speed/{k}": v for k, v in (record.get("speed") or {}).items()})
    if record.get("error"):
        out["error"] = record["error"]
    return out


def result_rows(record: Mapping[str, Any]) -> list[list[Any]]:
    """One row per (task, metric) of a record's metrics, with its stderr, item count and whether it is primary.

    Task names come from the flat ``<task>/<metric>`` keys, so any lm-eval task (local or online) is covered;
    perplexity is one more row (``n`` = windows).
    """
    metrics = record.get("metrics") or {}
    chosen = metrics.get("metric_map") if isinstance(metrics.get("metric_map"), Mapping) else {}
    rows = []
    for key, value in metrics.items():
        task, _, metric = key.partition("/")
        if not metric or metric == "n" or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = metrics.get(f"{task}/{metric}_stderr")
        # records from before the metric map was recorded: the primary value is the one equal to <task>
        primary = chosen.get(task) == metric if task in chosen else metrics.get(task) == value
        rows.append([task, metric, float(value), stderr, metrics.get(f"{task}/n"), bool(primary)])
    for key, value in metrics.items():
        if key.endswith("_ppl") and isinstance(value, int | float):
            rows.append([key.removesuffix("_ppl"), "ppl", float(value), None, metrics.get("ppl_windows"), True])
    return rows


def score_rows(record: Mapping[str, Any]) -> list[list[Any]]:
    """One row per (selector decision, candidate layer) with its score and whether that decision removed it."""
    removed = [int(i) for i in record.get("removed_layers") or []]
    steps = record.get("scores") or []
    rows = []
    for k, step in enumerate(steps):
        chosen = {removed[k]} if len(steps) > 1 and k < len(removed) else set(removed)
        for layer, score in step.items():
            if isinstance(score, int | float):
                rows.append([k, int(layer), float(score), int(layer) in chosen])
    return rows


def artifact_name(record: Mapping[str, Any], kind: str) -> str:
    """Artifact names allow letters, digits, ``-``, ``_`` and ``.``; the job id keeps two jobs apart."""
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(record.get("job_name", "job")))
    return f"{base}-{record.get('job_id', 'x')}-{kind}"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def job_init(cfg: Mapping[str, Any], job_id: str, job_name: str, out_dir: Path) -> dict[str, Any]:
    """``wandb.init`` arguments of one job: id, name, group = sweep, job_type, tags, project/entity, folder."""
    tracker = cfg.get("tracker") or {}
    method = cfg["method"]["name"]
    prune = cfg.get("prune") or {}
    ratio = prune.get("ratio") if prune.get("ratio") is not None else prune.get("default_ratio")
    amount = f"n{prune['n_remove']}" if prune.get("n_remove") is not None else f"r{ratio}"
    tags = [cfg["model"]["name"], method] if method == "none" else [cfg["model"]["name"], method, amount]
    repair = (cfg.get("repair") or {}).get("name")
    if repair and method != "none":
        tags.append(f"repair:{repair}")
    return {
        "project": tracker.get("project") or "gradmap-bench",
        "entity": tracker.get("entity"),
        "config": dict(cfg),
        "id": wandb_run_id(str(cfg["sweep"]), job_id),
        "name": job_name,
        "group": str(cfg["sweep"]),
        "job_type": "dense" if method == "none" else "prune",
        "tags": [str(t)[:64] for t in tags],
        "dir": str(out_dir),
    }


def make_tracker(cfg: Mapping[str, Any], job_id: str, job_name: str, out_dir: Path) -> Tracker:
    """Build the tracker ``cfg['tracker']`` names; any failure to start it leaves the job running untracked."""
    tracker = cfg.get("tracker") or {}
    name = tracker.get("name", "none")
    if name == "none":
        return Tracker()
    if name != "wandb":
        raise ValueError(f"unknown tracker {name!r}; allowed: wandb, none")
    try:
        return WandbTracker(tracker, job_init(cfg, job_id, job_name, out_dir))
    except Exception as err:
        log.warning("W&B tracking disabled for this job: %s", _first_line(err))
        return Tracker()
