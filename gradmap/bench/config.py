"""What defines a bench run: the config, the decoder shapes and presets, the model factory and the calibration ids."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

GIB = 2**30
SCHEMA = 1

# Decoder shapes for random-init models (Hugging Face config field names).
ARCHS: dict[str, dict[str, int]] = {
    "llama2_7b": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "llama2_13b": {
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
    },
    "llama3_8b": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "tiny": {
        "num_hidden_layers": 6,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    },
}

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {
        "model": "random",
        "arch": "llama2_7b",
        "device": "cuda",
        "dtype": "bfloat16",
        "n_samples": 128,
        "seq_len": 2048,
        "streamline_train_samples": 1024,
        "streamline_batch_size": 8,
    },
    "cpu": {
        "model": "smollm2",
        "arch": None,
        "device": "cpu",
        "dtype": "float32",
        "n_samples": 8,
        "seq_len": 64,
        "streamline_train_samples": 16,
        "streamline_batch_size": 4,
    },
}

DEFAULT_SPEEDUP_SET = ("shortgpt", "taylor_plus", "sleb", "streamline")  # docs/protocol.md §5


@dataclass
class BenchConfig:
    """Everything that defines a bench run; results only merge when these agree (except ``methods``)."""

    preset: str = "gpu"
    model: str = "random"  # random (seeded init of ``arch``) | smollm2
    arch: str | None = "llama2_7b"
    arch_overrides: dict[str, int] = field(default_factory=dict)
    device: str = "cuda"
    dtype: str = "bfloat16"
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    ratio: float = 0.25
    micro_batch_size: int = 1
    grad_checkpointing: bool = False
    repeats: int = 3
    extrapolate_candidates: int = 2
    streamline_train_samples: int = 1024
    streamline_batch_size: int = 8
    streamline_seed: int = 1
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: torch's default
    speedup_baselines: tuple[str, ...] = DEFAULT_SPEEDUP_SET
    methods: tuple[str, ...] = ()

    def setup(self) -> dict[str, Any]:
        """The fields that must match for two parts to be merged into one table."""
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "speedup_baselines", "repeats")}


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelFactory:
    """Hands out a fresh dense model for every timed run (``prune()`` edits the model in place).

    Random models are rebuilt on the device from the seed (well under a second for the 7B shape on a GPU);
    SmolLM2 is loaded once and deep-copied.
    """

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self._pristine: nn.Module | None = None
        if cfg.model == "smollm2":
            from gradmap.models import load_smollm2

            self._pristine = load_smollm2()[0].to(device=self.device, dtype=self.dtype).eval()
            self.config = self._pristine.config
        elif cfg.model == "random":
            if cfg.arch not in ARCHS:
                raise ValueError(f"unknown --arch {cfg.arch!r}; allowed: {', '.join(ARCHS)}")
            from transformers import LlamaConfig

            shape = {**ARCHS[cfg.arch], **cfg.arch_overrides}
            self.config = LlamaConfig(
                **shape,
                max_position_embeddings=max(4096, cfg.seq_len),
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            )
        else:
            raise ValueError(f"unknown model {cfg.model!r}; allowed: random, smollm2")

    def __call__(self) -> nn.Module:
        if self._pristine is not None:
            return copy.deepcopy(self._pristine)
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            with self.device:
                # A copy: layer removal rewrites the config of the model it prunes.
                model = AutoModelForCausalLM.from_config(copy.deepcopy(self.config), dtype=self.dtype)
        return model.eval()


def calibration_ids(vocab_size: int, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random token windows (timing does not depend on the tokens)."""
    return torch.randint(0, vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
