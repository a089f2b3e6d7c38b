"""Timing and peak memory of the pruning span, measured the same way for every method.

On CUDA the clock is read only after ``torch.cuda.synchronize()`` (otherwise asynchronous kernels make any method
look free) and peak memory is the allocator's peak since the span began. On CPU peak memory is the process's peak
resident set size (``ru_maxrss``), which cannot be reset and therefore includes everything before the span.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Span:
    """One timed span: wall seconds and peak memory in bytes."""

    seconds: float = 0.0
    peak_mem_bytes: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_kind(device: torch.device) -> str:
    return "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"


@contextmanager
def timed(device: torch.device | str) -> Iterator[Span]:
    """Time the body: synchronise, reset the peak, run, synchronise, read the clock and the peak."""
    device = torch.device(device)
    span = Span()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield span
    finally:
        _sync(device)
        span.seconds = time.perf_counter() - start
        if device.type == "cuda":
            span.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        else:
            span.peak_mem_bytes = process_peak_rss_bytes()


def device_name(device: torch.device | str) -> str:
    """Human-readable device name recorded with every timing (timings only compare on the same device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
