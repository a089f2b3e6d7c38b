"""Experiment tracking at the edge: W&B (offline by default) or nothing. Tracking never fails a job.

A tracker problem (no credentials, no network, wandb missing) degrades to offline mode or to no tracking with a
one-line warning: the measured result in runs/ is what matters, and losing a finished job to a dashboard would
be the wrong trade.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker; also the interface."""

    name = "none"
    run_id: str | None = None

    def log_summary(self, values: Mapping[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """One W&B run per job; its id derives from the job id so a rerun resumes the same run."""

    name = "wandb"

    def __init__(
        self, cfg: Mapping[str, Any], config: Mapping[str, Any], run_id: str, run_name: str, group: str, out_dir: Path
    ) -> None:
        import wandb

        mode = cfg.get("mode", "offline")
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            log.warning("tracker.mode=online but no W&B credentials (WANDB_API_KEY or ~/.netrc); logging offline")
            mode = "offline"
        kwargs = dict(
            project=cfg.get("project", "gradmap-bench"),
            entity=cfg.get("entity"),
            config=dict(config),
            id=run_id,
            name=run_name,
            group=group,
            dir=str(out_dir),
            resume="allow",
            reinit="finish_previous",
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # network or auth trouble: keep the job, log offline
            if mode == "offline":
                raise
            log.warning("W&B online init failed (%s); logging offline instead", str(err).splitlines()[0][:200])
            self.run = wandb.init(mode="offline", **kwargs)
        self.run_id = run_id
        self.mode = mode

    def log_summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_tracker(
    cfg: Mapping[str, Any], config: Mapping[str, Any], run_id: str, run_name: str, group: str, out_dir: Path
) -> Tracker:
    """Build the configured tracker; any failure to start it leaves the job running untracked, with a warning."""
    name = cfg.get("name", "none")
    if name == "none":
        return Tracker()
    if name != "wandb":
        raise ValueError(f"unknown tracker {name!r}; allowed: wandb, none")
    try:
        return WandbTracker(cfg, config, run_id, run_name, group, out_dir)
    except Exception as err:
        log.warning("W&B tracking disabled for this job: %s", str(err).splitlines()[0][:200] if str(err) else err)
        return Tracker()
