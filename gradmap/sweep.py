"""Sweeps that survive: job status on disk, dense-reference reuse, and the end-of-multirun summary.

Hydra has no resume. Ours rests on one fact: a job's folder ``runs/<sweep>/<name>-<job_id>/`` holds a
``result.json`` exactly when the job finished (written atomically, last). So

* ``ok`` → the rerun skips the job (``gradmap.pipeline.execute``), with no model work;
* ``failed`` → the rerun tries it again (the old ``error.log`` is overwritten);
* no ``result.json`` (killed, pre-empted, still running) → the rerun redoes it;
* a ``result.json`` that is not a valid record (:func:`gradmap.results.check_record`: truncated, not an object,
  an ok status without metrics, removed layers or timing, non-finite values) → ``corrupt``, listed with its path,
  redone by the rerun.

:func:`scan` reads those states for ``python -m gradmap.sweep runs/<sweep>`` and for the report.

The dense reference (``method=none``) depends only on model, evaluation preset and dtype, so its job id is
shared by every sweep that evaluates the same model the same way. :func:`reuse_dense` copies a finished one from
any sweep under ``runs_dir`` instead of re-evaluating (minutes to hours on a 7B model), and records where it
came from in ``reused_from``. It is not reused when its inference-speed numbers would not be comparable with
the pruned models of this run (speed measurement on, but different settings or another device).

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in conf/config.yaml). It observes each job's
``result.json`` before and after the job (so it works the same in-process, under joblib and under submitit,
whose jobs run in other processes), writes one outcome file per job into the Hydra sweep folder, and at the end
of the multirun logs one line: how many jobs ran ok, were reused, were skipped and failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from gradmap.eval.items import ITEMS_FILE
from gradmap.results import RESULT_FILE, atomic_write_json, check_record, read_result

log = logging.getLogger("gradmap.sweep")

OUTCOMES_DIR = "outcomes"
SUMMARY_FILE = "summary.json"
# Outcome of one job in one multirun, in summary order.
OUTCOMES = ("ok", "reused", "skipped", "failed", "missing")


# ---------------------------------------------------------------------------------------------------------------
# Job states on disk


@dataclass
class JobState:
    """One job folder of a sweep and what its ``result.json`` says (``incomplete``: no result.json)."""

    name: str
    dir: Path
    status: str
    error: str | None = None
    reused_from: str | None = None


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job folders of a sweep: its direct subfolders, except Hydra's bookkeeping and report outputs."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "report")


def scan(sweep_dir: str | Path) -> list[JobState]:
    """The state of every job folder under ``sweep_dir``: ok, failed, corrupt (a result.json that cannot be used,
    with the reason and path in ``error``) or incomplete (no result.json but a job.log)."""
    states = []
    for folder in job_dirs(sweep_dir):
        found = check_record(folder)
        if found.status == "missing":
            if not (folder / "job.log").exists():  # not a job folder (e.g. a user's notes)
                continue
            states.append(JobState(folder.name, folder, "incomplete"))
        elif found.status == "corrupt":
            states.append(JobState(folder.name, folder, "corrupt", f"{found.path}: {found.problem}"))
        else:
            record = found.record or {}
            states.append(
                JobState(record["job_name"], folder, record["status"], record.get("error"), record.get("reused_from"))
            )
    return states


# ---------------------------------------------------------------------------------------------------------------
# Dense-reference reuse


def _speed_compatible(found: Mapping[str, Any], cfg: Mapping[str, Any], device_label: str) -> bool:
    """A reused dense result must carry speed numbers measured like this run would measure them."""
    speed_cfg = cfg.get("speed") or {}
    if not speed_cfg.get("enabled", False):
        return True
    speed = found.get("speed")
    if not speed or found.get("timing", {}).get("device") != device_label:
        return False
    return all(
        speed.get(k) == speed_cfg.get(k)
        for k in ("prompt_len", "gen_len", "batch_size", "repeats")
        if speed_cfg.get(k) is not None
    )


def find_dense(
    runs_dir: str | Path, job_id: str, exclude: Path, cfg: Mapping[str, Any], device_label: str
) -> tuple[Path, dict[str, Any]] | None:
    """The newest ok result with this job id in any sweep under ``runs_dir`` (other than ``exclude``)."""
    candidates = []
    for path in Path(runs_dir).glob(f"*/*-{job_id}/{RESULT_FILE}"):
        if path.parent.resolve() == exclude.resolve():
            continue
        record = read_result(path)
        if (
            record
            and record.get("status") == "ok"
            and record.get("job_id") == job_id
            and not record.get("reused_from")
            and _speed_compatible(record, cfg, device_label)
        ):
            candidates.append((str(record.get("finished_at", "")), path.parent, record))
    if not candidates:
        return None
    _, folder, record = max(candidates, key=lambda c: c[0])
    return folder, record


def reuse_dense(cfg: Mapping[str, Any], job_id: str, job_name: str, job_dir: Path) -> dict[str, Any] | None:
    """For ``method=none``: copy a finished dense reference of the same identity into ``job_dir`` and return
    the new record, or None when there is none to reuse (or reuse is off: ``reuse_dense=false``/``force``)."""
    if cfg["method"]["name"] != "none" or not cfg.get("reuse_dense", True) or cfg.get("force", False):
        return None
    from gradmap.core.timing import device_name
    from gradmap.models import resolve_device

    try:
        device_label = device_name(resolve_device(cfg["device"]))
    except ValueError:  # a bad device fails the job itself, with its own message
        return None
    found = find_dense(cfg["runs_dir"], job_id, job_dir, cfg, device_label)
    if found is None:
        return None
    source, record = found
    out = {
        **record,
        "sweep": str(cfg["sweep"]),
        "job_name": job_name,
        "reused_from": str(source),
        "reused_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if (Path(source) / ITEMS_FILE).is_file():  # the per-item records travel with the result they belong to
        shutil.copyfile(Path(source) / ITEMS_FILE, job_dir / ITEMS_FILE)
    atomic_write_json(job_dir / RESULT_FILE, out)
    log.info("reuse %s: dense reference from %s", job_name, source)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hydra callback: per-job outcomes and the end-of-multirun summary


@dataclass
class Outcome:
    """What one job of this multirun did."""

    num: int
    job_name: str
    outcome: str
    error: str | None = None
    dir: str | None = None


def _task_config(config: DictConfig) -> dict[str, Any]:
    """The job's config as ``run.py`` sees it (no ``hydra`` node), resolved to plain containers."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    return OmegaConf.to_container(task, resolve=True, throw_on_missing=True)


def _job_of(config: DictConfig) -> tuple[str, Path]:
    from gradmap.pipeline import Job, validate_config  # the pipeline imports torch; load it only inside a job

    task = _task_config(config)
    validate_config(task)  # an invalid config has no job folder: the job counts as failed with this line
    job = Job.from_config(task)
    return job.name, job.dir


def _fingerprint(record: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    return None if record is None else (record.get("status"), record.get("finished_at"), record.get("reused_at"))


def classify(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, raised: str | None) -> str:
    """The outcome from the job's result.json before and after it ran (and whether Hydra saw it raise)."""
    if raised is not None:
        return "failed"
    if after is None:
        return "missing"
    if after.get("status") != "ok":
        return "failed"
    if before is not None and _fingerprint(before) == _fingerprint(after):
        return "skipped"
    return "reused" if after.get("reused_from") else "ok"


def summarize(outcomes: list[Outcome], sweep: str) -> str:
    """One line: ``sweep smoke: 9 jobs: 6 ok, 1 reused, 2 skipped, 0 failed``."""
    counts = Counter(o.outcome for o in outcomes)
    parts = [f"{counts.get(k, 0)} {k}" for k in OUTCOMES if k != "missing" or counts.get(k)]
    return f"sweep {sweep}: {len(outcomes)} job{'s' if len(outcomes) != 1 else ''}: {', '.join(parts)}"


class SweepSummary(Callback):
    """Hydra callback: record each job's outcome; log the sweep summary when the multirun ends."""

    def __init__(self) -> None:
        self._before: dict[str, Any] | None = None

    @staticmethod
    def _multirun(config: DictConfig) -> bool:
        mode = OmegaConf.select(config, "hydra.mode")
        return getattr(mode, "name", str(mode).rpartition(".")[2]) == "MULTIRUN"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._before = None
        if self._multirun(config):
            try:
                self._before = read_result(_job_of(config)[1])
            except Exception:  # an invalid config: on_job_end records the failure
                self._before = None

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not self._multirun(config):
            return
        from hydra.core.utils import JobStatus

        raised = None
        if job_return is not None and job_return.status == JobStatus.FAILED:
            raised = f"{type(job_return._return_value).__name__}: {job_return._return_value}".splitlines()[0]
        try:
            name, folder = _job_of(config)
        except Exception as err:  # the config itself is broken: still count the job
            name, folder, raised = "?", None, raised or f"{type(err).__name__}: {err}".splitlines()[0]
        after = read_result(folder) if folder is not None else None
        outcome = classify(self._before, after, raised)
        error = (raised or (after or {}).get("error")) if outcome == "failed" else None
        num = int(OmegaConf.select(config, "hydra.job.num", default=0))
        record = Outcome(num, name, outcome, error, str(folder) if folder else None)
        atomic_write_json(Path(str(config.hydra.sweep.dir)) / OUTCOMES_DIR / f"{num:05d}.json", asdict(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcomes = [Outcome(**json.loads(p.read_text())) for p in sorted((sweep_dir / OUTCOMES_DIR).glob("*.json"))]
        sweep = str(OmegaConf.select(config, "sweep", default="?"))
        line = summarize(outcomes, sweep)
        runs = Path(str(OmegaConf.select(config, "runs_dir", default="runs"))) / sweep
        log.info("%s -> %s (report: python -m gradmap.report %s)", line, runs, runs)
        for o in outcomes:
            if o.outcome == "failed":
                log.warning(
                    "  failed %s: %s (traceback: %s)", o.job_name, o.error, Path(o.dir) / "error.log" if o.dir else "-"
                )
        atomic_write_json(
            sweep_dir / SUMMARY_FILE,
            {
                "summary": line,
                "counts": dict(Counter(o.outcome for o in outcomes)),
                "jobs": [asdict(o) for o in outcomes],
            },
        )


# ---------------------------------------------------------------------------------------------------------------
# CLI: what a rerun would do


def main(argv: list[str] | None = None) -> int:
    """``python -m gradmap.sweep runs/<sweep>``: list job states; the rerun redoes all but the ok ones."""
    parser = argparse.ArgumentParser(prog="python -m gradmap.sweep", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep folder {str(args.sweep_dir)!r} does not exist; give runs/<sweep>")
    states = scan(args.sweep_dir)
    for s in states:
        detail = s.error or (f"reused from {s.reused_from}" if s.reused_from else "")
        print(f"{s.status:10s} {s.name}" + (f"  ({detail})" if detail else ""))
    counts = Counter(s.status for s in states)
    print(
        f"{len(states)} jobs: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        + "; a rerun of the sweep redoes every job that is not ok (corrupt and incomplete ones included)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
