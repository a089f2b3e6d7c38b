"""What the suite leaves on disk: file modes that follow the umask, and a saved model that says what it is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gradmap.results import atomic_write_json


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask_0022):
    atomic_write_json(tmp_path / "result.json", {"status": "ok"})
    assert mode(tmp_path / "result.json") == 0o644
    os.umask(0o077)
    atomic_write_json(tmp_path / "private.json", {"status": "ok"})
    assert mode(tmp_path / "private.json") == 0o600
