"""Shared fixtures: tiny seeded Llamas built in code (no files), calibration ids, a planted identity layer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gradmap.models import tiny_llama

VOCAB = 256


def make_tiny(n_layers: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """A deterministic tiny Llama. Its random init makes all layers alike, so tests plant structure."""
    return tiny_llama(seed=seed, vocab_size=VOCAB, num_hidden_layers=n_layers, **kw).to(dtype)


def plant_identity(model, layer: int) -> None:
    """Zero both RMSNorm weights of ``layer``: its attention and MLP branches then output exactly 0, so the
    layer is an identity and every one of its seven weight gradients is exactly 0 (docs/protocol.md §2)."""
    with torch.no_grad():
        model.model.layers[layer].input_layernorm.weight.zero_()
        model.model.layers[layer].post_attention_layernorm.weight.zero_()


def make_calib(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture
def calib():
    return make_calib()
