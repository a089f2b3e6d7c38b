"""Validation of a resolved job config before any model work: the schema walk, then the cross-key checks.
The per-key types and ranges live in :mod:`gradmap.config_schema` (one dataclass per config group); this module adds
what one key cannot say alone: the device string, the model's layer count against ``prune``, component names and
options against what each selector and repair declares (their dataclass fields and ``__post_init__`` checks,
:mod:`gradmap.core.components`), and the shipped data files against the sha256 listed in ``data/SOURCES.md`` (a
cut-down WikiText file would otherwise give a perplexity with status ok). :func:`validate` runs first in
``gradmap.pipeline.execute``, so a bad override costs milliseconds, not a model load and a pruning run.
The schema names are re-exported here so that ``from gradmap.config import ConfigError`` keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, get_type_hints

from gradmap import paths
from gradmap.config_schema import (
    KNOWN_LAYERS,
    MAX_SEED,
    CalibSchema,
    ComponentSchema,
    ConfigError,
    ConfigSchema,
    EvalSchema,
    ModelSchema,
    PplSchema,
    PruneSchema,
    SpeedSchema,
    TinyModelSchema,
    TrackerSchema,
    check_section,
    check_value,
    rule,
    unknown_key,
    wrap_check,
)

__all__ = [
    "KNOWN_LAYERS",
    "MAX_SEED",
    "CalibSchema",
    "ComponentSchema",
    "ConfigError",
    "ConfigSchema",
    "EvalSchema",
    "ModelSchema",
    "PplSchema",
    "PruneSchema",
    "SpeedSchema",
    "TinyModelSchema",
    "TrackerSchema",
    "check_section",
    "check_value",
    "n_layers_of",
    "rule",
    "unknown_key",
    "validate",
    "wrap_check",
]

# ---------------------------------------------------------------------------------------------------------------
# Cross-key checks that need the registries, the file system or several keys at once


def validate(cfg: Mapping[str, Any]) -> None:
    """Check the whole resolved job config; raises ConfigError (one line) on the first problem."""
    check_section(cfg, ConfigSchema, "")
    check_device(cfg["device"])
    check_model(cfg["model"])
    check_prune(cfg)
    check_components(cfg)
    check_calib(cfg["calib"])
    check_eval(cfg["eval"])
    wrap_check(paths.check_runs_dir, cfg["runs_dir"])


def check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps")


def check_model(model: Mapping[str, Any]) -> None:
    source = model["source"]
    if source == "hub" and not model.get("hub_id"):
        raise ConfigError("model.hub_id is missing; a hub model needs hub_id (e.g. meta-llama/Llama-2-7b-hf)")
    if source == "tiny":
        sizes = model.get("config") or {}
        check_section(sizes, TinyModelSchema, "model.config")
        heads, kv = sizes.get("num_attention_heads", 4), sizes.get("num_key_value_heads", 2)
        if sizes.get("hidden_size", 64) % heads or heads % kv:
            raise ConfigError(
                f"model.config: hidden_size={sizes.get('hidden_size', 64)}, num_attention_heads={heads}, "
                f"num_key_value_heads={kv}; allowed: hidden_size divisible by heads, heads divisible by kv heads"
            )


def n_layers_of(model: Mapping[str, Any]) -> int | None:
    """The model's decoder-layer count when it is known without loading it."""
    if model["source"] == "tiny":
        return int((model.get("config") or {}).get("num_hidden_layers", 8))
    return KNOWN_LAYERS.get(model.get("gguf") if model["source"] == "gguf" else model["source"])


def check_prune(cfg: Mapping[str, Any]) -> None:
    from gradmap.core.prune import resolve_n_remove

    p = cfg["prune"]
    if cfg["method"].get("name") == "none":
        return
    if p.get("ratio") is not None and p.get("n_remove") is not None:
        raise ConfigError(
            f"give prune.ratio or prune.n_remove, not both (got ratio={p['ratio']}, n_remove={p['n_remove']})"
        )
    ratio = p.get("ratio") if p.get("ratio") is not None else p.get("default_ratio")
    if p.get("n_remove") is None and ratio is None:
        raise ConfigError("prune.ratio, prune.n_remove and prune.default_ratio are all null; give one of them")
    n_layers = n_layers_of(cfg["model"])
    if n_layers is not None:
        protected = (p.get("protect_first") or 0) + (p.get("protect_last") or 0)
        try:
            resolve_n_remove(n_layers, None if p.get("n_remove") is not None else ratio, p.get("n_remove"), protected)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def check_components(cfg: Mapping[str, Any]) -> None:
    """method and repair names are registered and their options are what the components declare."""
    from gradmap.core.components import METHODS, REPAIRS, SELECTORS

    method, repair = cfg["method"], cfg["repair"]
    if method.get("name") is None:
        raise ConfigError("method.name=null is not allowed; give a method (python run.py method=<name>)")
    try:
        preset = METHODS.get(method["name"])
        repair_name = repair.get("name") or preset.repair
        repair_cls = REPAIRS.get(repair_name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if preset.selector is None:
        if repair.get("name") not in (None, "none"):
            raise ConfigError(f"method 'none' removes nothing, so repair={repair['name']!r} has nothing to repair")
        return
    selector_options = dict(method.get("options") or {})
    for key in ("protect_first", "protect_last", "micro_batch_size"):
        if cfg["prune"].get(key) is not None:
            selector_options.setdefault(key, cfg["prune"][key])
    selector_options.setdefault("seed", cfg["seed"])
    selector_cls = SELECTORS.get(preset.selector)
    _build(selector_cls, {**preset.selector_options, **selector_options}, "method.options")
    shared = (
        {"micro_batch_size": selector_options["micro_batch_size"]} if "micro_batch_size" in selector_options else {}
    )
    _build(repair_cls, {**preset.options_for(repair_name), **shared, **(repair.get("options") or {})}, "repair.options")


NON_NEGATIVE = {"protect_first", "protect_last", "seed", "skip_first_tokens", "eval_steps"}


def _build(cls: type, options: Mapping[str, Any], prefix: str) -> None:
    """Type-check each option against the component's dataclass field, then construct it (its own checks)."""
    hints = get_type_hints(cls)
    names = cls.option_names()
    for key, value in options.items():
        if key not in names:
            raise unknown_key(f"{prefix}.{key}", names)
        meta = {"ge": 0} if key in NON_NEGATIVE else {"ge": 1} if key == "micro_batch_size" else {}
        check_value(f"{prefix}.{key}", value, hints[key], meta)
    try:
        cls.from_options(**options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix}: {str(err).splitlines()[0]}") from None


def check_calib(calib: Mapping[str, Any]) -> None:
    if calib["source"] == "hf_dataset":
        for key in ("dataset", "split"):
            if not calib.get(key):
                raise ConfigError(f"calib.{key} is missing; source hf_dataset needs dataset and split")
        return
    if not calib.get("path"):
        raise ConfigError("calib.path is missing; source file needs a text file path")
    path = paths.resolve_data_path(calib["path"])
    if not path.is_file():
        raise ConfigError(f"calib.path={calib['path']!r}: file {str(path)!r} does not exist")
    wrap_check(paths.check_shipped_file, path, "calib.path")
    size = path.stat().st_size
    tokens = calib["n_samples"] * calib["seq_len"]
    if calib["seq_len"] >= size or tokens > size:
        raise ConfigError(
            f"calib.n_samples x calib.seq_len = {calib['n_samples']} x {calib['seq_len']} = {tokens} tokens is more "
            f"than {path.name} holds ({size} bytes, at least one byte per token); "
            f"allowed: n_samples x seq_len <= {size}"
        )


def check_eval(ev: Mapping[str, Any]) -> None:
    from gradmap.eval.harness import check_eval_config

    try:
        tasks, source = check_eval_config(ev)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    shots = ev.get("num_fewshot")
    for task, k in shots.items() if isinstance(shots, Mapping) else [(None, shots)]:
        where = "eval.num_fewshot" + (f"[{task!r}]" if task is not None else "")
        check_value(where, k, int | None, {"ge": 0, "le": 1000})
    ppl = ev.get("ppl")
    if ppl and ppl.get("stride") is not None and ppl["stride"] > ppl.get("window", 2048):
        raise ConfigError(f"eval.ppl.stride={ppl['stride']} is out of range; allowed: 1 <= stride <= eval.ppl.window")
    if source == "local":
        from gradmap.eval.tasks import load_task_config

        for task in tasks:
            try:
                files = load_task_config(task)["dataset_kwargs"]["data_files"].values()
            except FileNotFoundError as err:
                raise ConfigError(f"eval.tasks: {err}") from None
            for data_file in files:
                wrap_check(paths.check_shipped_file, data_file, f"eval.tasks ({task})")
    if ppl:
        from gradmap.eval.perplexity import WIKITEXT2_TEST

        wrap_check(paths.check_shipped_file, WIKITEXT2_TEST, "eval.ppl")
