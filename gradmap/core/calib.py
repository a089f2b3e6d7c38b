"""Calibration data: one tensor of token windows shared by every method of a run.

Following SLEB/Wanda: join the text, tokenise it once, cut ``n_samples`` windows of ``seq_len`` tokens at seeded
random offsets, and add no BOS per window (``add_bos`` turns it on). The tensor depends only on the tokenizer, the
text, and these settings, so every method in a sweep prunes with exactly the same tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gradmap.core.cachefiles import private_temp, publish_file, quarantine


class CalibrationError(ValueError):
    """Calibration text missing or too short for the requested windows."""


def window_starts(n_tokens: int, n_samples: int, body: int, seed: int) -> list[int]:
    """The seeded random offsets ``sample_windows`` cuts at (also used to keep dev windows clear of them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - body, (n_samples,), generator=generator).tolist()


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
    if n_samples * body > token_ids.numel():
        raise CalibrationError(
            f"calib.n_samples x calib.seq_len = {n_samples} x {seq_len} needs {n_samples * body} text tokens but the "
            f"calibration text has {token_ids.numel()}; allowed: n_samples <= {token_ids.numel() // body} "
            "at this seq_len (more would sample the same text many times over)"
        )
    starts = window_starts(token_ids.numel(), n_samples, body, seed)
    windows = torch.stack([token_ids[s : s + body] for s in starts])
    if bos_id is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows.long()


def window_bos(tokenizer, add_bos: bool) -> int | None:
    """The BOS id to put in front of every window, or None without ``add_bos``; a tokenizer without one is an
    error rather than windows silently left without BOS (Gemma needs it: docs/protocol.md §6, BOS)."""
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise CalibrationError("calib.add_bos is true but the tokenizer has no bos_token_id")
    return int(tokenizer.bos_token_id)


def row_windows(
    tokenizer, rows: list[str], n_rows: int, seq_len: int, seed: int = 0, add_bos: bool = False
) -> torch.Tensor:
    """SLEB's native calibration (its reference data loader): shuffle the dataset's rows (seeded), join the first
    ``n_rows`` with blank lines, tokenise once and cut the stream into ⌊tokens / seq_len⌋ consecutive windows.

    Why a second sampler: SLEB's published numbers use 128 *rows* of WikiText-2 train, i.e. 3-5 windows of 2048
    tokens, not 128 windows; matched-token comparisons use :func:`build_calibration`, this reproduces the native
    setting. The permutation is torch's, not the ``datasets`` library's, so the same procedure picks other rows.
    """
    if n_rows < 1 or seq_len < 2:
        raise CalibrationError(
            f"calib.sampling=rows needs n_samples (rows) >= 1 and seq_len >= 2, got {n_rows} x {seq_len}"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    text = "\n\n".join(rows[i] for i in order[:n_rows])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = window_bos(tokenizer, add_bos)
    body = seq_len - (1 if bos is not None else 0)
    n = ids.numel() // body
    if n < 1:
        raise CalibrationError(
            f"calib.sampling=rows: {n_rows} rows give {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "raise calib.n_samples (rows) or lower calib.seq_len"
        )
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


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
    cache_file = Path(cache_dir) / f"calib-{key}.safetensors" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        cached = _load_cached(cache_file, n_samples, seq_len)
        if cached is not None:
            return cached
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = sample_windows(ids, n_samples, seq_len, seed, window_bos(tokenizer, add_bos))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = private_temp(cache_file)
        try:
            save_file({"windows": windows.contiguous()}, str(tmp))
            publish_file(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    return windows


def _load_cached(cache_file: Path, n_samples: int, seq_len: int) -> torch.Tensor | None:
    """The cached windows, or None after moving a corrupt entry aside. safetensors, never pickle: a planted file
    cannot run code even where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 overrides ``torch.load(weights_only=True)``."""
    try:
        windows = load_file(str(cache_file))["windows"]
        if tuple(windows.shape) != (n_samples, seq_len) or windows.dtype != torch.long:
            raise ValueError(f"holds {tuple(windows.shape)} {windows.dtype}, expected ({n_samples}, {seq_len}) int64")
        return windows
    except Exception as err:  # any unreadable entry: rebuild it rather than fail every later job
        quarantine(cache_file, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
        return None


def microbatches(calib_ids: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """Split the calibration tensor into equal micro-batches (the last may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return list(torch.split(calib_ids, micro_batch_size))


def dev_windows(
    token_ids: torch.Tensor, n_samples: int, seq_len: int, exclude: list[tuple[int, int]] = ()
) -> tuple[torch.Tensor, list[int]]:
    """Held-out dev windows: consecutive, non-overlapping ``seq_len`` tiles of the stream that overlap none of the
    ``exclude`` spans (start, length) of the calibration windows, ``n_samples`` of them evenly spaced over the
    stream (deterministic: dev never depends on a seed). Returns (windows, their starts).

    Dev is where every default of a repair is chosen, so it must share no token with the fitted calibration rows
    (docs/protocol.md §6 "Splits").
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"calib.dev needs n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    tiles = [
        s
        for s in range(0, token_ids.numel() - seq_len + 1, seq_len)
        if all(s + seq_len <= a or a + n <= s for a, n in exclude)
    ]
    if len(tiles) < n_samples:
        raise CalibrationError(
            f"calib.dev: only {len(tiles)} windows of {seq_len} tokens are clear of the calibration windows, "
            f"{n_samples} requested; lower calib.dev.n_samples or calib.dev.seq_len"
        )
    picks = [tiles[(k * len(tiles)) // n_samples] for k in range(n_samples)]
    return torch.stack([token_ids[s : s + seq_len] for s in picks]).long(), picks
