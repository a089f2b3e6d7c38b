"""gradmap-bench: prune whole decoder layers out of LLMs with GradMAP and compare layer-pruning methods.

The pruning library lives in ``gradmap.core`` (torch and transformers only)::

    from gradmap import prune
    result = prune(model, calib_ids, method="gradmap", ratio=0.25)
    result.model, result.removed_layers, result.scores, result.timings

The names below are loaded on first use, so ``import gradmap.report`` (which reads result files only) never
imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PruneResult": "gradmap.core.prune",
    "prune": "gradmap.core.prune",
    "resolve_n_remove": "gradmap.core.prune",
    "METHODS": "gradmap.core.components",
    "REPAIRS": "gradmap.core.components",
    "SELECTORS": "gradmap.core.components",
}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradmap' has no attribute {name!r}")
