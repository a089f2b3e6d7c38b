"""A saved pruned model that says what it is: weights + model card (README.md) + ``pruning.json``.

Why: a folder of safetensors named ``model/`` is useless a month later (which base model, which layers went,
which repair, measured how?). ``save_model=true`` writes, beside the weights and tokenizer, a model card for
people and the Hugging Face hub and a machine-readable pruning record for scripts; ``push_to_hub=<repo id>``
uploads the folder through ``huggingface_hub`` (offline it fails with one line and the job keeps its result).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradmap.results import atomic_write_json, atomic_write_text, current_umask

log = logging.getLogger("gradmap")

CARD_FILE = "README.md"
PRUNING_FILE = "pruning.json"
CARD_METRICS = ("avg", "wikitext2_ppl")


def model_folder(cfg: Mapping[str, Any], job_dir: Path) -> Path:
    """Where the model goes: ``save_path`` when set (``{job}`` expands to the job folder name), else job/model."""
    save_path = cfg.get("save_path")
    if not save_path:
        return job_dir / "model"
    return Path(str(save_path).replace("{job}", job_dir.name))


def reproduce_command(overrides: Sequence[str] | None = None) -> str:
    """The command that reruns this job: Hydra's task overrides when known, else this process's arguments."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ImportError, ValueError):
            overrides = sys.argv[1:]
    return "python run.py " + " ".join(shlex.quote(o) for o in overrides)


def pruning_record(record: Mapping[str, Any], cfg: Mapping[str, Any], command: str) -> dict[str, Any]:
    """The machine-readable record: base model, method, what was removed and how the kept layers map back."""
    n_layers = int(record.get("n_layers") or 0)
    removed = [int(i) for i in record.get("removed_layers") or []]
    kept = [i for i in range(n_layers) if i not in set(removed)]
    return {
        "format": "gradmap-bench pruning record v1",
        "base_model": dict(cfg["model"]),
        "method": record.get("method"),
        "selector": record.get("selector"),
        "repair": record.get("repair"),
        "selector_options": record.get("selector_options"),
        "repair_options": record.get("repair_options"),
        "n_layers_before": n_layers,
        "n_removed": len(removed),
        "removed_layers": removed,
        "kept_layers": kept,  # new layer i is original layer kept[i]
        "params_before": record.get("params_before"),
        "params_after": record.get("params_after"),
        "calibration": dict(cfg["calib"]),
        "seed": cfg.get("seed"),
        "dtype": (record.get("timing") or {}).get("dtype") or cfg.get("dtype"),
        "metrics": dict(record.get("metrics") or {}),
        "eval": dict(cfg.get("eval") or {}),
        "timing": dict(record.get("timing") or {}),
        "job_id": record.get("job_id"),
        "versions": dict(record.get("versions") or {}),
        "reproduce": command,
    }


def model_card(info: Mapping[str, Any]) -> str:
    """README.md of the saved model (hub front matter + what, how, measured how, how to reproduce)."""
    base = info["base_model"]
    base_name = base.get("hub_id") or base.get("name")
    metrics = info["metrics"]
    metric_lines = [f"| {k} | {_fmt(metrics[k])} |" for k in CARD_METRICS if k in metrics]
    metric_lines += [
        f"| {k} | {_fmt(v)} |"
        for k, v in metrics.items()
        if "/" not in k and k not in CARD_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    calib = info["calibration"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [layer-pruning, gradmap-bench]",
        *([f"base_model: {base_name}"] if base.get("hub_id") else []),
        "---",
        "",
        f"# {base.get('name')} with {info['n_removed']} of {info['n_layers_before']} decoder layers removed",
        "",
        f"- **Base model:** {base_name} (source: {base.get('source')})",
        f"- **Method:** {info['method']} (selector `{info['selector']}`, options {info['selector_options']})",
        f"- **Removed layers (original indices):** {info['removed_layers']}",
        f"- **Kept layers:** new layer i is original layer `kept_layers[i]` in `{PRUNING_FILE}`",
        f"- **Repair:** {info['repair']} (options {info['repair_options']})",
        f"- **Calibration:** {calib.get('name')}: {calib.get('n_samples')} windows of {calib.get('seq_len')} "
        f"tokens, seed {calib.get('seed')}",
        f"- **Parameters:** {info['params_before']} -> {info['params_after']}",
        f"- **Suite version:** gradmap-bench {info['versions'].get('gradmap_bench')}, "
        f"torch {info['versions'].get('torch')}, transformers {info['versions'].get('transformers')}, "
        f"lm_eval {info['versions'].get('lm_eval')}",
        "",
        f"## Metrics (eval preset `{info['eval'].get('name')}`)",
        "",
        "| metric | value |",
        "|---|---|",
        *(metric_lines or ["| (none: eval=none) | |"]),
        "",
        "Task values are fractions (avg is x100); see the job's result.json for standard errors and item counts.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo id>")',
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        info["reproduce"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_pruned_model(
    model: Any, tokenizer: Any, folder: Path, record: Mapping[str, Any], cfg: Mapping[str, Any]
) -> Path:
    """Weights, tokenizer, model card and pruning record into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    follow_umask(folder)
    info = pruning_record(record, cfg, reproduce_command())
    atomic_write_json(folder / PRUNING_FILE, info)
    atomic_write_text(folder / CARD_FILE, model_card(info))
    log.info("saved the pruned model with its card and pruning record to %s", folder)
    return folder


def follow_umask(folder: Path) -> None:
    """Give the files in ``folder`` the mode a plain ``open()`` gives (safetensors writes its shards 0600 through a
    temporary file), so colleagues can load a model saved on a shared cluster."""
    wanted = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(wanted)


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the hub model repo ``repo_id`` (created private if missing); returns its URL.

    Raises RuntimeError with one line (no network, no token, bad repo id); the caller records it.
    """
    import os

    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise RuntimeError(f"push_to_hub={repo_id!r} needs internet, but HF_HUB_OFFLINE is set")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except Exception as err:  # network, auth, name: one line, the job keeps its result
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"push_to_hub={repo_id!r} failed ({type(err).__name__}): {first}") from err
    url = f"https://huggingface.co/{repo_id}"
    log.info("uploaded %s to %s", folder, url)
    return url


def read_pruning_record(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / PRUNING_FILE).read_text(encoding="utf-8"))
