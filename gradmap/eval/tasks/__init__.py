"""Local, offline copies of lm-eval's built-in zero-shot tasks, and the loader that points them at data/.

Why: lm-eval's built-in tasks download their data from the HF hub, which this project cannot rely on. The
YAMLs next to this file mirror lm-eval 0.4.13's built-in definitions (same ``doc_to_text``/``doc_to_target``/
``doc_to_choice``/``process_docs``, the functions being lm-eval's own) but read the jsonl files committed
under ``data/`` (produced by ``scripts/convert_data.py``). Their ``data_files`` are relative to the data
directory; :func:`load_task_config` makes them absolute, so the tasks work from any working directory. The
resulting config dicts are handed to lm-eval as inline task configs, never through ``--include_path`` (whose
relative paths would resolve against the CWD).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from gradmap.paths import DATA_DIR

TASK_DIR = Path(__file__).resolve().parent

# The 7-task zero-shot suite of docs/protocol.md §6, in table order.
TASK_NAMES: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

# LLM-Pruner / Shortened-LLaMA metric map (docs/protocol.md §6): the metric each paper table reports per task.
PRIMARY_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

RESTORE_HINT = "restore it with `git checkout -- data/` or `python scripts/convert_data.py --shared ../shared`"


class _TaskYamlLoader(yaml.SafeLoader):
    """SafeLoader plus lm-eval's ``!function`` tag, limited to importable dotted paths (``pkg.module.func``).

    Our YAMLs only reference lm-eval's own helper functions, so resolving them by import keeps the rendering
    identical to the built-in task and avoids depending on lm-eval's private YAML loader.
    """


def _construct_function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    qualname = loader.construct_scalar(node)  # type: ignore[arg-type]
    module_name, _, attr = str(qualname).rpartition(".")
    if not module_name:
        raise ValueError(f"!function {qualname!r}: expected an importable dotted path (pkg.module.func)")
    return getattr(importlib.import_module(module_name), attr)


_TaskYamlLoader.add_constructor("!function", _construct_function)


def check_task_names(names: Iterable[str]) -> list[str]:
    """``names`` as a list; a one-line ValueError names an unknown task and lists the allowed ones."""
    names = list(names)
    for name in names:
        if name not in TASK_NAMES:
            raise ValueError(f"unknown eval task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"eval tasks listed twice: {names}")
    return names


def task_yaml_path(name: str) -> Path:
    """Path of the local YAML of task ``name`` (validated)."""
    check_task_names([name])
    return TASK_DIR / f"{name}.yaml"


def load_task_config(name: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Load the local YAML of ``name`` with its ``data_files`` made absolute under ``data_dir`` (default:
    data/).

    Raises FileNotFoundError (one line, with the restore command) when a data file is missing, so a broken
    checkout fails before any model work starts.
    """
    base = Path(data_dir) if data_dir is not None else DATA_DIR
    with task_yaml_path(name).open(encoding="utf-8") as fh:
        cfg = yaml.load(fh, Loader=_TaskYamlLoader)  # SafeLoader subclass: safe
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = {}
    for split, rel in dict(kwargs.get("data_files") or {}).items():
        path = (base / rel).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"eval data file {str(path)!r} (task {name}) is missing; {RESTORE_HINT}")
        files[split] = str(path)
    kwargs["data_files"] = files
    cfg["dataset_kwargs"] = kwargs
    return cfg


def local_task_configs(names: Iterable[str], data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Inline lm-eval task configs for ``names`` (order kept), ready for ``TaskManager.load``."""
    return [load_task_config(name, data_dir) for name in check_task_names(names)]
