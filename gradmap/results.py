"""Result records: one ``result.json`` per job, written atomically, with the versions that produced it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from gradmap.paths import REPO_ROOT

RESULT_FILE = "result.json"

# Config keys that change what a job computes. Tracker, launcher, paths and the sweep name do not.
IDENTITY_KEYS = ("model", "method", "repair", "prune", "calib", "eval", "seed", "dtype", "device_type")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file.

    mkstemp creates its file 0600 whatever the umask; the file gets the mode a plain ``open()`` would give it
    (0644 under umask 0022), so colleagues on a shared cluster can read the results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, record: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_result(path: str | Path) -> dict[str, Any] | None:
    """The record in ``path`` (a file or a job folder), or None if absent or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stable_hash(payload: Mapping[str, Any], length: int = 10) -> str:
    """Hash of a JSON-able mapping that is independent of key order and of the Python session."""
    text = json.dumps(payload, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """Library versions and the project commit, recorded in every result."""
    out: dict[str, str | None] = {}
    for package in ("torch", "transformers", "lm_eval", "hydra-core", "wandb"):
        try:
            out[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package.replace("-", "_")] = None
    out["gradmap_bench"] = git_commit()
    return out
