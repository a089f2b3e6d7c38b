"""Where the repository and its shipped data live, and reading a data file named relative to the repository.

The suite's edges (pipeline, evaluation, results) resolve ``data/...`` paths here, so moving a module between
packages never changes what a relative path in a config means.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"


def read_text_file(path: str | Path) -> str:
    """Read a calibration text file, resolving relative paths against the repository."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        restore = (
            f"; restore it with `git checkout -- {path.relative_to(REPO_ROOT)}` or regenerate data/ with "
            "`python scripts/convert_data.py --shared ../shared`"
            if path.is_relative_to(REPO_ROOT)
            else ""
        )
        raise FileNotFoundError(f"calibration file {str(path)!r} is missing{restore}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        from gradmap.core.calib import CalibrationError  # here, so that reading paths never imports torch

        raise CalibrationError(f"calibration file {str(path)!r} is empty")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Names that become folders, the runs folder, and the shipped data's integrity (checked before any model work)

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SAFE_NAME_TEXT = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"


def check_name(key: str, value: object) -> None:
    """A value that becomes one folder name (sweep, model name): no separator, no '..', nothing outside runs_dir."""
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise ValueError(f"{key}={value!r} cannot be a folder name under runs_dir; allowed: {SAFE_NAME_TEXT}")


def check_runs_dir(runs_dir: str | Path) -> None:
    """runs_dir is a folder, or can be created as one, and is writable: checked before anything is written."""
    path = Path(runs_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"runs_dir={str(runs_dir)!r} is a file, not a folder; give a folder path")
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"runs_dir={str(runs_dir)!r} cannot be created: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"runs_dir={str(runs_dir)!r} is not writable ({str(probe)!r} is read-only)")


def resolve_data_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


@functools.cache
def shipped_hashes() -> dict[Path, str]:
    """data/<file> -> sha256, from the table in data/SOURCES.md (written by scripts/convert_data.py)."""
    sources = DATA_DIR / "SOURCES.md"
    table = sources.read_text(encoding="utf-8") if sources.is_file() else ""
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", table, flags=re.M)
    return {(DATA_DIR / name).resolve(): digest for name, digest in rows}


@functools.cache
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_shipped_file(path: str | Path, key: str) -> None:
    """A file shipped in data/ must be byte for byte the one data/SOURCES.md lists (a cut-down WikiText file would
    otherwise give a perplexity with status ok); files outside that table are not checked."""
    path = Path(path)
    expected = shipped_hashes().get(path.resolve())
    if expected is None:
        return
    if not path.is_file():
        raise ValueError(f"{key}: data file {str(path)!r} is missing; restore it with `git checkout -- data/`")
    stat = path.stat()
    if _sha256(path.resolve(), stat.st_mtime_ns, stat.st_size) != expected:
        raise ValueError(
            f"{key}: data file {str(path)!r} is not the shipped one (sha256 differs from data/SOURCES.md, "
            f"{stat.st_size} bytes); restore it with `git checkout -- {_repo_relative(path)}`"
        )


def _repo_relative(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else "data/"
