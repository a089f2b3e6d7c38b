"""Optional W&B logging of a built report (wandb is imported only when called).

The report's run sits with its jobs: group = the sweep, project/entity/mode from the ``tracker`` block the jobs
recorded in their result.json (so ``tracker.project=...`` on the sweep's command line is honoured here too), and a
stable id per sweep, so rebuilding the report resumes the same run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradmap.report.driver import ReportFiles
from gradmap.results import read_result, stable_hash
from gradmap.sweep import job_dirs


def sweep_tracker_config(sweep_dir: Path) -> dict[str, Any]:
    """The ``tracker`` block of the sweep's jobs (the first job that used W&B; else the first one recorded)."""
    blocks = []
    for folder in job_dirs(sweep_dir):
        record = read_result(folder)
        tracker = ((record or {}).get("config") or {}).get("tracker") if isinstance(record, Mapping) else None
        if isinstance(tracker, Mapping):
            blocks.append(dict(tracker))
    return next((b for b in blocks if b.get("name") == "wandb"), blocks[0] if blocks else {})


def report_init(sweep_dir: Path, out: Path) -> dict[str, Any]:
    """``wandb.init`` arguments of the report run of ``sweep_dir``."""
    from gradmap.tracking import resolve_mode

    tracker = sweep_tracker_config(sweep_dir)
    mode = resolve_mode(tracker.get("mode"))
    return {
        "project": tracker.get("project") or "gradmap-bench",
        "entity": tracker.get("entity"),
        "id": "report-" + stable_hash({"report": sweep_dir.name}, length=12),
        "name": f"report {sweep_dir.name}",
        "group": sweep_dir.name,
        "job_type": "report",
        "tags": ["report"],
        "resume": "allow",
        "dir": str(out),
        **({"mode": mode} if mode else {}),
    }


def log_to_wandb(sweep_dir: Path, files: ReportFiles) -> None:
    """Optional: the tables and plots as one W&B run in the sweep's group."""
    import wandb

    run = wandb.init(**report_init(sweep_dir, files.out))
    for name, frame in (("main", files.main), ("speedup", files.speedup)):
        if frame is not None and not frame.empty:
            run.log(
                {name: wandb.Table(dataframe=frame.astype({c: str for c in frame.columns if frame[c].dtype == object}))}
            )
    run.log({p.stem: wandb.Image(str(p)) for p in files.plots if p.suffix == ".png"})
    if files.verdict is not None:
        run.summary["verdict"] = files.verdict.read_text(encoding="utf-8")
    run.finish()
