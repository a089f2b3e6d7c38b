"""Calibration data: one tensor of token windows shared by every method of a run.

Following SLEB/Wanda: join the text, tokenise it once, cut ``n_samples`` windows of ``seq_len`` tokens at seeded
random offsets, and add no BOS per window (``add_bos`` turns it on). The tensor depends only on the tokenizer, the
text, and these settings, so every method in a sweep prunes with exactly the same tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """Calibration text missing or too short for the requested windows."""


def sample_windows(
    token_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int, bos_id: int | None = None
) -> torch.Tensor:
    """Cut ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets from a 1-D token stream."""
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"calib needs n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    body = seq_len - (1 if bos_id is not None else 0)
    if token_ids.numel() <= body:
        raise CalibrationError(
            f"calibration text has {token_ids.numel()} tokens, too short for windows of {seq_len} tokens; "
            "use a shorter calib.seq_len or a longer text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - body, (n_samples,), generator=generator)
    windows = torch.stack([token_ids[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows.long()


def build_calibration(
    tokenizer,
    text: str,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    add_bos: bool = False,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """Tokenise ``text`` once and sample the calibration windows, cached on disk when ``cache_dir`` is set."""
    key = hashlib.sha256(
        "|".join(
            [
                hashlib.sha256(text.encode()).hexdigest(),
                getattr(tokenizer, "name_or_path", ""),
                str(len(tokenizer)),
                str(n_samples),
                str(seq_len),
                str(seed),
                str(add_bos),
            ]
        ).encode()
    ).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"calib-{key}.pt" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        return torch.load(cache_file)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos_id = tokenizer.bos_token_id if add_bos else None
    windows = sample_windows(ids, n_samples, seq_len, seed, bos_id)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(windows, tmp)
        tmp.replace(cache_file)
    return windows


def microbatches(calib_ids: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """Split the calibration tensor into equal micro-batches (the last may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return list(torch.split(calib_ids, micro_batch_size))
