"""Hydra entry point: ``python run.py [overrides]`` runs one job, ``python run.py -m ...`` a sweep.

Everything here is plumbing: the config is resolved to a plain dict and handed to ``gradmap.pipeline.execute``,
which records success or failure in runs/ and never lets one job's failure stop a sweep.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from gradmap.overrides import check_overrides
from gradmap.pipeline import execute

log = logging.getLogger("gradmap")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    record = execute(plain)
    status = record["status"]
    if status == "ok":
        metrics = record.get("metrics", {})
        if record.get("skipped"):  # execute() already logged the one-line skip
            return metrics.get("avg")
        log.info(
            "%s: ok (prune %.1f s, avg %s, ppl %s) -> %s",
            record["job_name"],
            record["timing"]["prune_s"],
            metrics.get("avg"),
            metrics.get("wikitext2_ppl"),
            record.get("job_name"),
        )
        return metrics.get("avg")
    log.error("%s: %s", record["job_name"], record.get("error"))
    if not HydraMultirun.active():
        sys.exit(1)
    return None


class HydraMultirun:
    """Whether this process runs a Hydra sweep (then a failed job must not stop the others)."""

    @staticmethod
    def active() -> bool:
        from hydra.core.hydra_config import HydraConfig

        try:
            return HydraConfig.get().mode.name == "MULTIRUN"
        except ValueError:
            return False


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ValueError as err:
        sys.exit(f"error: {err}")
    main()
