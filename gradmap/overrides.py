"""Check config-group overrides before Hydra sees them, so a typo gets one line with a did-you-mean.

Hydra's own message for ``method=shortgp`` is a multi-line MissingConfigException with no suggestion; in a
sweep launched for days, the researcher should see ``unknown method 'shortgp'. Did you mean 'shortgpt'?``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from gradmap.core.registry import unknown_name_message
from gradmap.paths import check_name, check_runs_dir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHECKED_GROUPS = ("model", "method", "repair", "calib", "eval", "tracker", "experiment", "hydra/launcher")
# Launchers that Hydra and its installed plugins provide without a YAML in conf/.
BUILTIN = {"hydra/launcher": ["basic", "joblib", "submitit_local", "submitit_slurm"]}
_PLAIN = re.compile(r"^[+]{0,2}(?P<group>[A-Za-z_/]+)=(?P<values>[A-Za-z0-9_.,\-]+)$")
# Keys whose values become folder names or the runs folder: checked here, before Hydra creates its run folder.
_PATHS = re.compile(r"^[+]{0,2}(?P<key>sweep|model\.name|runs_dir)=(?P<value>.*)$")


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted({p.stem for p in (conf_dir / group).glob("*.yaml")} | set(BUILTIN.get(group, [])))


def check_overrides(args: Iterable[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ValueError for the first ``group=value`` whose value has no YAML in that group, or a path override
    that would leave runs_dir.

    Only plain values and comma lists are checked; Hydra's sweep functions (``choice(...)``, globs) pass through.
    """
    for arg in args:
        check_path_override(arg)
        match = _PLAIN.match(arg)
        if not match or match["group"] not in CHECKED_GROUPS:
            continue
        known = group_options(match["group"], conf_dir)
        for value in match["values"].split(","):
            if value and value != "null" and value not in known:
                raise ValueError(unknown_name_message(match["group"].replace("hydra/", ""), value, known))


def check_path_override(arg: str) -> None:
    """``sweep=../x``, ``model.name=/abs`` or a ``runs_dir`` that is a file fail here, before Hydra writes anything.

    Interpolations and Hydra sweep functions pass through; the config check in the pipeline sees their values.
    """
    match = _PATHS.match(arg)
    if not match or "${" in match["value"] or "(" in match["value"]:
        return
    key, value = match["key"], match["value"]
    values = [value] if key == "runs_dir" else value.split(",")
    for one in (v.strip().strip("'\"") for v in values):
        if key == "runs_dir":
            check_runs_dir(one)
        else:
            check_name(key, one)
