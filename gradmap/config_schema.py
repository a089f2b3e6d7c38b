"""The typed config schema: every key of every group, its type and its range, and the walk that checks them.
Why a validation pass of our own instead of Hydra structured configs bound to each YAML: Hydra's errors for a
wrong type are several lines that never say what is allowed, `+key=value` bypasses a schema, and option blocks
(``method.options``, ``repair.options``) differ per component. Here each group is a dataclass whose annotations are
the types and whose field metadata are the ranges; :func:`check_section` walks a config section against them and
raises :class:`ConfigError` with one line naming the key, the bad value and what is allowed. This module knows
nothing of registries or files, so it stays importable without torch; the cross-key checks that need them are in
:mod:`gradmap.config`, whose :func:`~gradmap.config.validate` runs this walk first.
Adding a config key: add a field to the group's schema below (and a line to docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from gradmap import paths

MAX_SEED = 2**32 - 1
# Decoder-layer counts known without loading the model (the tiny model's comes from its config block).
KNOWN_LAYERS = {"gguf_smollm2": 30, "smollm2_135m": 30, "gemma3_270m": 18}

REQUIRED = {"required": True}


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key, the value and what is allowed."""


def rule(
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    name: bool = False,
    required: bool = False,
) -> Any:
    """Field metadata for a range (``ge``/``gt``/``le``/``lt``), a folder-safe name, or a required key."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "name": name, "required": required}
    return field(default=None, metadata={k: v for k, v in meta.items() if v is not None and v is not False})


@dataclass
class PruneSchema:
    ratio: float | None = rule(gt=0, lt=1)
    n_remove: int | None = rule(ge=1)
    default_ratio: float | None = rule(gt=0, lt=1)
    protect_first: int | None = rule(ge=0)
    protect_last: int | None = rule(ge=0)
    micro_batch_size: int = rule(ge=1, le=65536)


@dataclass
class SpeedSchema:
    enabled: bool = rule(required=True)
    prompt_len: int = rule(ge=1, le=1_048_576)
    gen_len: int = rule(ge=1, le=1_048_576)
    repeats: int = rule(ge=1, le=10_000)
    warmup: int = rule(ge=0, le=10_000)
    min_time_s: float = rule(ge=0, le=600)
    batch_size: int = rule(ge=1, le=65536)


@dataclass
class ModelSchema:
    name: str = rule(name=True, required=True)
    source: Literal["gguf", "gguf_smollm2", "tiny", "hub"] = rule(required=True)
    gguf: str | None = None
    family: str | None = None
    bos: bool = None  # true: every window starts with BOS (Gemma breaks without it); gradmap.models.with_model_bos
    seed: int | None = rule(ge=0, le=MAX_SEED)
    config: dict | None = None
    hub_id: str | None = None
    trust_remote_code: bool = None
    use_safetensors: bool | None = None
    attn: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    device_map: Any = None  # placement: checked by gradmap.models.placement_kwargs
    max_memory: Any = None
    offload_folder: str | None = None


@dataclass
class TinyModelSchema:
    """``model.config`` of ``source: tiny``: the LlamaConfig sizes that may be changed."""

    num_hidden_layers: int = rule(ge=1, le=512)
    hidden_size: int = rule(ge=1, le=65536)
    intermediate_size: int = rule(ge=1, le=262144)
    num_attention_heads: int = rule(ge=1, le=1024)
    num_key_value_heads: int = rule(ge=1, le=1024)
    max_position_embeddings: int = rule(ge=2, le=1_048_576)
    rms_norm_eps: float = rule(gt=0, lt=1)
    rope_theta: float = rule(gt=0)


@dataclass
class ComponentSchema:
    """``method`` and ``repair``: a registered name and that component's options (checked against it)."""

    name: str | None = None
    options: dict | None = None


@dataclass
class CalibSchema:
    name: str = rule(required=True)
    source: Literal["file", "hf_dataset"] = rule(required=True)
    path: str | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str | None = None
    n_samples: int = rule(ge=1, le=1_000_000, required=True)
    seq_len: int = rule(ge=2, le=1_048_576, required=True)
    seed: int = rule(ge=0, le=MAX_SEED)
    add_bos: bool = None
    # Which speed protocol the run belongs to (docs/reports.md): matched = the sweep's shared calibration, the
    # default when absent; native = the method's own calibration size and budget (`+calib.protocol=native`).
    protocol: Literal["matched", "native"] | None = None
    # rows: SLEB's native sampler, n_samples = rows cut into consecutive windows (conf/calib/sleb_native*.yaml)
    sampling: Literal["windows", "rows"] | None = None
    dev: dict | None = None  # held-out dev windows {path, n_samples, seq_len}: checked by gradmap.splits.dev_split


@dataclass
class PplSchema:
    dataset: Literal["wikitext2"] = None
    window: int = rule(ge=2, le=1_048_576)
    stride: int | None = rule(ge=1)
    max_windows: int | None = rule(ge=1)
    add_bos: bool = None


@dataclass
class EvalSchema:
    name: str = rule(required=True)
    tasks: list | None = None
    limit: Any = None  # null | int | {task: int}: checked by gradmap.eval.harness.resolve_limits
    subset_seed: int = rule(ge=0, le=MAX_SEED)
    batch_size: int = rule(ge=1, le=4096)
    source: Literal["local", "online"] = None
    metric_map: Any = None  # checked by gradmap.eval.harness.check_eval_config
    num_fewshot: Any = None  # null | int >= 0 | {task: int}
    loop: Literal["lm_eval", "lean"] | None = None  # gradmap.eval.loops
    ppl: PplSchema | None = None


@dataclass
class TrackerSchema:
    name: Literal["none", "wandb"] = rule(required=True)
    project: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    log_samples: bool | None = None
    log_model: bool | None = None


@dataclass
class ConfigSchema:
    model: ModelSchema = field(default=None, metadata=REQUIRED)
    method: ComponentSchema = field(default=None, metadata=REQUIRED)
    repair: ComponentSchema = field(default=None, metadata=REQUIRED)
    calib: CalibSchema = field(default=None, metadata=REQUIRED)
    eval: EvalSchema = field(default=None, metadata=REQUIRED)
    tracker: TrackerSchema = field(default=None, metadata=REQUIRED)
    prune: PruneSchema = field(default=None, metadata=REQUIRED)
    speed: SpeedSchema | None = None
    timing: dict | None = None  # {repeats: int >= 1}, checked by gradmap.core.prune
    label: str | None = None  # report row label (conf/variant/*)
    sweep: str = rule(name=True, required=True)
    runs_dir: str = rule(required=True)
    device: str = rule(required=True)
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = rule(required=True)
    seed: int = rule(ge=0, le=MAX_SEED, required=True)
    save_model: bool = None
    save_path: str | None = None
    push_to_hub: str | None = None
    save_items: bool = None
    force: bool = None
    reuse_dense: bool = None


# ---------------------------------------------------------------------------------------------------------------
# The generic walk: types from annotations, ranges from metadata


def _type_name(tp: Any) -> str:
    names = {bool: "a boolean (true/false)", int: "a whole number", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if tp in (dict, list) or dataclasses.is_dataclass(tp):
        return "a mapping" if tp is not list else "a list"
    return str(tp)


def _range_text(meta: Mapping[str, Any], key: str) -> str:
    parts = [f"{meta['gt']} <" if "gt" in meta else "", f"{meta['ge']} <=" if "ge" in meta else "", key]
    parts += [f"< {meta['lt']}" if "lt" in meta else "", f"<= {meta['le']}" if "le" in meta else ""]
    return " ".join(p for p in parts if p)


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if get_origin(tp) is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if tp is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    if tp is list:
        return isinstance(value, list)
    raise TypeError(f"schema type {tp!r} is not supported")


def check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any] | None = None) -> None:
    """One value against its annotation (``X | None`` allows null) and range; raises ConfigError."""
    meta = meta or {}
    options = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    nullable = len(options) < len(get_args(tp)) if get_origin(tp) in (Union, types.UnionType) else False
    if value is None:
        if nullable or tp is Any:
            return
        raise ConfigError(f"{key}=null is not allowed; give {_type_name(options[0])}")
    inner = options[0]
    if not _matches(value, inner):
        if get_origin(inner) is Literal:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {_type_name(inner)}")
        ranged = f"; allowed: {_range_text(meta, key)}" if {"ge", "gt", "le", "lt"} & set(meta) else ""
        raise ConfigError(f"{key}={value!r} is not {_type_name(inner)}{ranged}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not finite; give a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bad = (
            ("ge" in meta and value < meta["ge"])
            or ("gt" in meta and value <= meta["gt"])
            or ("le" in meta and value > meta["le"])
            or ("lt" in meta and value >= meta["lt"])
        )
        if bad:
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {_range_text(meta, key)}")
    if meta.get("name"):
        wrap_check(paths.check_name, key, value)
    if dataclasses.is_dataclass(inner):
        check_section(value, inner, key)


def unknown_key(key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?)" if close else ""
    return ConfigError(f"unknown key {key}{hint}; allowed: {', '.join(allowed)}")


def check_section(section: Any, schema: type, prefix: str) -> None:
    """Every key of ``section`` is declared by ``schema``, required keys are there, and values type-check."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{prefix}={section!r} is not a mapping")
    hints = get_type_hints(schema)
    declared = {f.name: f for f in dataclasses.fields(schema)}
    for key in section:
        if key not in declared:
            raise unknown_key(f"{prefix}.{key}" if prefix else str(key), list(declared))
    for name, spec in declared.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in section:
            if spec.metadata.get("required"):
                raise ConfigError(f"missing key {key}; give {_type_name(hints[name])}")
            continue
        check_value(key, section[name], hints[name], spec.metadata)


def wrap_check(check: Any, *args: Any) -> None:
    """Run a check of gradmap.paths (plain ValueError there, so that overrides.py can use it without torch)."""
    try:
        check(*args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
