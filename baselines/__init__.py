"""Baseline layer-pruning methods; each module registers its selector/repair and method presets on import.

The registries in ``gradmap.core.components`` import this package on first lookup, so every module must be
imported here.
"""

from baselines import (
    angular,
    blockpruner,
    laco,
    last_n,
    layer_replace,
    linearpatch,
    mka,
    ppl,
    prunecomp,
    random_layers,
    shortgpt,
    sleb,
    streamline,
    taylor,
)

__all__ = [
    "angular",
    "blockpruner",
    "laco",
    "last_n",
    "layer_replace",
    "linearpatch",
    "mka",
    "ppl",
    "prunecomp",
    "random_layers",
    "shortgpt",
    "sleb",
    "streamline",
    "taylor",
]
