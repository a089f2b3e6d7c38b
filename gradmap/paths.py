"""Where the repository and its shipped data live, and reading a data file named relative to the repository.

The suite's edges (pipeline, evaluation, results) resolve ``data/...`` paths here, so moving a module between
packages never changes what a relative path in a config means.
"""

from __future__ import annotations

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
