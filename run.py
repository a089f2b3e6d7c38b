"""Hydra entry point: ``python run.py [overrides]`` runs one job, ``python run.py -m ...`` a sweep.

Everything here is plumbing: the config is resolved to a plain dict and handed to ``gradmap.pipeline.execute``,
which records success or failure in runs/ and never lets one job's failure stop a sweep. torch and the pipeline
are imported inside ``main`` so that ``--help`` and ``--cfg job`` answer without loading them.
"""

from __future__ import annotations

import logging
import sys
import warnings

from gradmap.console import configure_console

configure_console()  # before anything imports tqdm: non-TTY output gets no progress-bar escape codes

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gradmap.overrides import check_overrides  # noqa: E402

# conf/hydra/launcher/ray.yaml shares its name with the Ray plugin's schema, which Hydra then merges it onto (as
# intended: the schema checks our fields) while warning that this matching is deprecated. Nothing to act on.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against ConfigStore schema")

log = logging.getLogger("gradmap")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from gradmap.console import final_line
    from gradmap.devices import job_placement
    from gradmap.pipeline import Job, execute
    from gradmap.results import RESULT_FILE

    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    with job_placement(plain) as placed:  # the launcher's name; under joblib, a GPU of this job's own
        record = execute(placed)
    if record["status"] == "ok":
        if not record.get("skipped"):  # execute() already logged the one-line skip
            log.info(final_line(record, Job.from_config(plain).dir / RESULT_FILE))
        return (record.get("metrics") or {}).get("avg")
    if record["status"] == "busy":  # another process holds this job's claim; execute() logged who
        return None
    # execute() has logged the error once (with the traceback's path); here only the exit status remains
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
