"""The typed config schema: every key of every group, its type and its range, checked before any model work.
Why a validation pass of our own instead of Hydra structured configs bound to each YAML: Hydra's errors for a
wrong type are several lines that never say what is allowed, `+key=value` bypasses a schema, and option blocks
(``method.options``, ``repair.options``) differ per component. Here each group is a dataclass whose annotations are
the types and whose field metadata are the ranges; :func:`validate` walks the resolved config against them and
raises :class:`ConfigError` with one line naming the key, the bad value and what is allowed. It runs first in
``gradmap.pipeline.execute``, so a bad override costs milliseconds, not a model load and a pruning run.
Component options are checked against what each selector and repair declares (their dataclass fields and
``__post_init__`` checks, :mod:`gradmap.core.components`), and the shipped data files against the sha256 listed in
``data/SOURCES.md`` (a cut-down WikiText file would otherwise give a perplexity with status ok).
Adding a config key: add a field to the group's schema below (and a line to docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
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
        _wrap(paths.check_name, key, value)
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
    _wrap(paths.check_runs_dir, cfg["runs_dir"])


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
    _wrap(paths.check_shipped_file, path, "calib.path")
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
                _wrap(paths.check_shipped_file, data_file, f"eval.tasks ({task})")
    if ppl:
        from gradmap.eval.perplexity import WIKITEXT2_TEST

        _wrap(paths.check_shipped_file, WIKITEXT2_TEST, "eval.ppl")


def _wrap(check: Any, *args: Any) -> None:
    """Run a check of gradmap.paths (plain ValueError there, so that overrides.py can use it without torch)."""
    try:
        check(*args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
