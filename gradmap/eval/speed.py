"""Inference speed of a dense or pruned model: what removing layers buys at generation time.

Layer pruning is sold on inference speed as much as on accuracy, so every job records, measured identically for
the dense reference and for each pruned model:

* ``params`` (distinct parameters) and ``n_layers``;
* prefill: one forward over a fixed ``prompt_len``-token prompt that fills the KV cache; seconds and tokens/s;
* decode: ``gen_len`` greedy one-token steps with the KV cache; seconds, tokens/s and ms per token;
* ``latency_s``: prefill + decode, the wall time to answer a ``prompt_len`` prompt with ``gen_len`` tokens.

Why a hand-written loop instead of ``generate()``: ``generate`` stops at EOS, may pick other cache classes or
kernels by heuristics, and adds logits processing; a fixed number of plain ``forward`` calls is the same work for
every model, so the dense/pruned ratio reflects the layers alone. The prompt is seeded random token ids (content
does not change the cost of a dense transformer). Only the logits of the last position are computed, as
``generate`` does. Untimed warm-up runs precede the timed ones and the median of the timed runs is kept; on
CUDA the clock is read after ``synchronize``.

Why a time floor (``min_time_s``) on top of run counts: a toy model answers in milliseconds, and three such runs
after one warm-up measure timer and scheduling jitter. Warm-up and timed runs each continue until both their count
and ``min_time_s`` seconds are reached; one run of a real model on a CPU already takes longer, so nothing changes
there. What the floor does not fix: at batch 1 a small model on a GPU is bound by the host's kernel launches
(SmolLM2-135M on an H200: ~0.6 ms per layer per decoded token), and from job to job that varied by ±50% in the
offline_main sweep (decode speedups 0.73–1.56x for the same 8 of 30 layers removed). The report prints that spread
next to each inference speedup.

This module imports only torch and tqdm, so the core stays usable without the suite's extras.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

SPEED_KEYS = ("enabled", "prompt_len", "gen_len", "repeats", "batch_size", "warmup", "min_time_s")


@dataclass
class SpeedResult:
    """Median timings of ``timed_runs`` runs (at least ``repeats``); throughputs count tokens of the whole batch."""

    params: int
    n_layers: int
    prompt_len: int
    gen_len: int
    batch_size: int
    repeats: int
    timed_runs: int
    prefill_s: float
    prefill_tok_s: float
    decode_s: float
    decode_tok_s: float
    decode_ms_per_token: float
    latency_s: float
    device: str
    dtype: str
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"speed.{name}={value!r} is invalid; allowed: a whole number >= {minimum}")
    return value


@torch.inference_mode()
def _one_run(
    model: nn.Module, prompt: torch.Tensor, gen_len: int, last_only: dict[str, int], cache_arg: str
) -> tuple[float, float]:
    """Seconds for the prefill and for ``gen_len`` cached decode steps (greedy)."""
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **last_only)
    past = getattr(out, cache_arg)
    token = out.logits[:, -1:].argmax(dim=-1)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen_len):
        out = model(input_ids=token, use_cache=True, **{cache_arg: past}, **last_only)
        past = getattr(out, cache_arg)
        token = out.logits[:, -1:].argmax(dim=-1)
    _sync(device)
    return prefill, time.perf_counter() - start


def _runs_until(
    count: int, min_time_s: float, run: Callable[[], tuple[float, float]], bar: Any = None
) -> list[tuple[float, float]]:
    """At least ``count`` runs, and more until they took ``min_time_s`` seconds of wall time together."""
    runs: list[tuple[float, float]] = []
    start = time.perf_counter()
    while len(runs) < count or time.perf_counter() - start < min_time_s:
        runs.append(run())
        if bar is not None:
            if bar.n + 1 > bar.total:  # the time floor added runs beyond the count
                bar.total = bar.n + 1
            bar.update(1)
    return runs


def measure_speed(
    model: nn.Module,
    prompt_len: int = 128,
    gen_len: int = 32,
    repeats: int = 3,
    batch_size: int = 1,
    warmup: int = 1,
    min_time_s: float = 1.0,
    seed: int = 0,
) -> SpeedResult:
    """Time prefill and cached decoding of ``model`` where it lies (its device and dtype), eval mode."""
    prompt_len = _check_int("prompt_len", prompt_len, 1)
    gen_len = _check_int("gen_len", gen_len, 1)
    repeats = _check_int("repeats", repeats, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    warmup = _check_int("warmup", warmup, 0)
    if isinstance(min_time_s, bool) or not isinstance(min_time_s, int | float) or not 0 <= min_time_s <= 600:
        raise ValueError(f"speed.min_time_s={min_time_s!r} is invalid; allowed: seconds from 0 to 600")
    config = model.config
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and prompt_len + gen_len > max_pos:
        raise ValueError(
            f"speed.prompt_len + speed.gen_len = {prompt_len + gen_len} exceeds the model's "
            f"max_position_embeddings={max_pos}; allowed: a sum <= {max_pos}"
        )
    param = next(model.parameters())
    device = param.device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, int(config.vocab_size), (batch_size, prompt_len), generator=generator).to(device)
    accepts = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    cache_arg = "cache" if "cache" in accepts else "past_key_values"  # transformers >= 5.2x renamed it

    was_training = model.training
    model.eval()

    def run() -> tuple[float, float]:
        return _one_run(model, prompt, gen_len, last_only, cache_arg)

    # A real model on a CPU spends minutes here (prefill + decode, each run): the bar shows that it progresses.
    bar = tqdm(total=warmup + repeats, desc="speed (warm-up + timed runs)", unit="run", leave=False)
    try:
        if warmup:
            _runs_until(warmup, min_time_s, run, bar)
        runs = _runs_until(repeats, min_time_s, run, bar)
    finally:
        bar.close()
        model.train(was_training)
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    layers = getattr(getattr(model, "model", None), "layers", None)
    return SpeedResult(
        params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        n_layers=len(layers) if layers is not None else int(getattr(config, "num_hidden_layers", 0)),
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch_size=batch_size,
        repeats=repeats,
        timed_runs=len(runs),
        prefill_s=prefill,
        prefill_tok_s=batch_size * prompt_len / prefill,
        decode_s=decode,
        decode_tok_s=batch_size * gen_len / decode,
        decode_ms_per_token=1000.0 * decode / gen_len,
        latency_s=prefill + decode,
        device=_device_label(device),
        dtype=str(param.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
    )


def measure_from_config(model: nn.Module, cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``speed:`` config block → the record's ``speed`` section, or None when disabled/absent."""
    if not cfg or not cfg.get("enabled", False):
        return None
    unknown = sorted(set(cfg) - set(SPEED_KEYS))
    if unknown:
        raise ValueError(f"unknown key speed.{unknown[0]}; allowed: {', '.join(SPEED_KEYS)}")
    options = {k: cfg[k] for k in SPEED_KEYS if k != "enabled" and cfg.get(k) is not None}
    return measure_speed(model, **options).as_dict()


def same_setup(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two speed records were measured with the same workload on the same kind of device and dtype,
    i.e. whether their ratio means anything."""
    if not a or not b:
        return False
    return all(a.get(k) == b.get(k) for k in ("prompt_len", "gen_len", "batch_size", "device", "dtype", "threads"))
