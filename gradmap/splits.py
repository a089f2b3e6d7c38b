"""Calibration and the dev split from the run config. Dev = held-out windows of the calibration source, where
repair defaults are chosen and checked.

Three splits never share a token (docs/protocol.md §6 "Splits"): calibration windows (what methods fit on), dev windows
(``calib.dev``: tiles of the dev text clear of every calibration window when both come from the same file), and the
test data (WikiText-2 test for perplexity, the task items). Everything chosen in this suite is chosen on dev.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gradmap.core.calib import build_calibration, dev_windows, row_windows, window_bos, window_starts
from gradmap.core.components import calibration_nll
from gradmap.models import cache_root
from gradmap.paths import REPO_ROOT, read_text_file


def calibration(calib_cfg: Mapping[str, Any], tokenizer) -> torch.Tensor:
    """The calibration tensor shared by every method of a run (cached on disk by content)."""
    source = calib_cfg["source"]
    if source == "file":
        text = read_text_file(calib_cfg["path"])
        rows = text.split("\n")
    elif source == "hf_dataset":
        from datasets import load_dataset  # edge dependency, online users only

        rows = list(load_dataset(calib_cfg["dataset"], calib_cfg.get("subset"), split=calib_cfg["split"])["text"])
        text = "\n\n".join(rows)
    else:
        raise ValueError(f"unknown calib.source {source!r}; allowed: file, hf_dataset")
    if calib_cfg.get("sampling") == "rows":  # SLEB's native sampler: n_samples rows, cut into consecutive windows
        n_rows, seq_len, seed = int(calib_cfg["n_samples"]), int(calib_cfg["seq_len"]), int(calib_cfg["seed"])
        return row_windows(tokenizer, rows, n_rows, seq_len, seed, bool(calib_cfg.get("add_bos", False)))
    return build_calibration(
        tokenizer,
        text,
        int(calib_cfg["n_samples"]),
        int(calib_cfg["seq_len"]),
        int(calib_cfg["seed"]),
        bool(calib_cfg.get("add_bos", False)),
        cache_dir=cache_root() / "calib",
    )


def _same_file(a: str, b: str) -> bool:
    resolve = lambda p: (Path(p) if Path(p).is_absolute() else REPO_ROOT / p).resolve()  # noqa: E731
    return resolve(a) == resolve(b)


def dev_split(calib_cfg: Mapping[str, Any], tokenizer) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """(dev windows, a description for the record), or None when ``calib.dev`` is not set.

    When calibration samples the same file, every dev tile overlapping a calibration window is dropped (the
    calibration offsets are recomputed from its seed, exactly as ``sample_windows`` draws them).
    """
    dev = calib_cfg.get("dev")
    if not dev:
        return None
    for key in ("path", "n_samples", "seq_len"):
        if key not in dev:
            raise ValueError(f"calib.dev needs {key!r} (got keys {sorted(dev)}); allowed: path, n_samples, seq_len")
    text = read_text_file(dev["path"])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    exclude: list[tuple[int, int]] = []
    same_file = calib_cfg.get("source") == "file" and _same_file(calib_cfg["path"], dev["path"])
    if same_file and calib_cfg.get("sampling") == "rows":
        raise ValueError(
            "calib.sampling=rows with calib.dev from the same file cannot keep dev clear of the sampled rows; "
            "set calib.dev=null or take dev from another text"
        )
    if same_file:
        body = int(calib_cfg["seq_len"]) - (1 if calib_cfg.get("add_bos") else 0)
        starts = window_starts(ids.numel(), int(calib_cfg["n_samples"]), body, int(calib_cfg["seed"]))
        exclude = [(s, body) for s in starts]
    windows, picks = dev_windows(ids, int(dev["n_samples"]), int(dev["seq_len"]), exclude)
    bos = window_bos(tokenizer, bool(calib_cfg.get("add_bos")))
    if bos is not None:  # like the calibration windows: BOS, then the tile's first seq_len - 1 tokens
        windows = torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)
    info = {
        "path": str(dev["path"]),
        "n_samples": int(dev["n_samples"]),
        "seq_len": int(dev["seq_len"]),
        "add_bos": bool(calib_cfg.get("add_bos")),
        "starts": picks,
        "disjoint_from_calibration": "by construction (same file, overlapping tiles dropped)"
        if exclude
        else "different text from calibration",
    }
    return windows, info


def dev_fields(model, dev: tuple[torch.Tensor, dict[str, Any]] | None) -> dict[str, Any]:
    """The record's ``dev_nll`` (mean NLL of the final model on the dev windows) and ``dev`` (which windows)."""
    if dev is None:
        return {}
    nll = calibration_nll(model, dev[0])
    return {"dev_nll": nll, "dev": {**dev[1], "nll": nll}}
