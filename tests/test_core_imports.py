"""The pruning core runs anywhere torch and transformers run: it must not import the suite's edge libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["gradmap", "gradmap.api", "gradmap.layers", "gradmap.calib", "gradmap.stage1", "gradmap.stage2",
        "gradmap.models", "gradmap.timing", "gradmap.perplexity", "gradmap.speed", "gradmap.bench", "baselines"]
EDGE = ["hydra", "omegaconf", "wandb", "lm_eval", "datasets", "pandas", "matplotlib"]


def test_core_modules_import_no_edge_library():
    code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
            "from gradmap.base import METHODS; METHODS.names()\n"
            f"print(','.join(m for m in {EDGE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"core pulled in edge libraries: {out.stdout.strip()}"
