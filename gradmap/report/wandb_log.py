"""Optional W&B logging of a built report (wandb is imported only when called)."""

from __future__ import annotations

from pathlib import Path

from gradmap.report.driver import ReportFiles


def log_to_wandb(sweep_dir: Path, files: ReportFiles) -> None:
    """Optional: the tables and plots as one W&B run (id ``report-<sweep>``, offline unless WANDB_MODE says)."""
    import os

    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "gradmap-bench"),
        id=f"report-{sweep_dir.name}",
        name=f"report {sweep_dir.name}",
        job_type="report",
        resume="allow",
        mode=os.environ.get("WANDB_MODE", "offline"),
        dir=str(files.out),
    )
    for name, frame in (("main", files.main), ("speedup", files.speedup)):
        if frame is not None and not frame.empty:
            run.log(
                {name: wandb.Table(dataframe=frame.astype({c: str for c in frame.columns if frame[c].dtype == object}))}
            )
    run.log({p.stem: wandb.Image(str(p)) for p in files.plots if p.suffix == ".png"})
    if files.verdict is not None:
        run.summary["verdict"] = files.verdict.read_text(encoding="utf-8")
    run.finish()
