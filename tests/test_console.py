"""The console: app help without torch, no progress-bar escape codes off a TTY, a rounded final line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from gradmap.console import NON_TTY_ENV, configure_console, final_line

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_the_apps_own_and_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.startswith("gradmap-bench: prune whole decoder layers")
    assert "Examples:" in out.stdout and "method: angular" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "gradmap.pipeline" not in imported


def test_off_a_tty_progress_bars_are_switched_off(monkeypatch):
    for key in NON_TTY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # a user's own choice is kept
    assert configure_console(io.StringIO()) is False
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_final_line_is_rounded_and_points_at_the_result():
    record = {
        "job_name": "m-gradmap-r0.25",
        "timing": {"prune_s": 12.3456},
        "metrics": {"avg": 45.678912, "wikitext2_ppl": 18.83912},
    }
    line = final_line(record, Path("runs/s/m-gradmap-r0.25-abc/result.json"))
    assert line == "m-gradmap-r0.25: ok (prune 12.3 s, avg 45.68, ppl 18.84) -> runs/s/m-gradmap-r0.25-abc/result.json"
