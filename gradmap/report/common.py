"""Names and constants every part of the report shares."""

from __future__ import annotations

import logging

log = logging.getLogger("gradmap.report")

GRADMAP = "gradmap"
DENSE = "none"
CONTROLS = ("random", "last_n")
DEFAULT_AVERAGING = ("shortgpt", "taylor_plus", "sleb", "streamline")  # METHODS.md §5 (an assumption)
SHORT_PRUNE_S = 10.0  # below this, a pruning time says more about fixed overheads than about the method
CLAIM = 4.0
# Display order: GradMAP first, then the baselines roughly by cost, then controls.
METHOD_ORDER = (
    "none",
    "gradmap",
    "gradmap_s1",
    "shortgpt",
    "angular",
    "taylor",
    "taylor_plus",
    "ppl",
    "sleb",
    "streamline",
    "streamline_noheal",
    "replaceme",
    "random",
    "last_n",
)
TASK_LABELS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}
PLOTS = ("accuracy_vs_ratio", "ppl_vs_ratio", "pruning_time", "pareto", "removed_layers", "gradmap_stages")
GIB = 2**30
