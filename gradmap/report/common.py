"""Names and constants every part of the report shares."""

from __future__ import annotations

import logging

log = logging.getLogger("gradmap.report")

GRADMAP = "gradmap"
DENSE = "none"
CONTROLS = ("random", "last_n")
DEFAULT_AVERAGING = ("shortgpt", "taylor_plus", "sleb", "streamline")  # docs/protocol.md §5 (an assumption)
SHORT_PRUNE_S = 10.0  # below this, a pruning time says more about fixed overheads than about the method
CLAIM = 4.0
# Display order: GradMAP first, then the baselines roughly by cost, then controls.
METHOD_ORDER = (
    "none",
    "gradmap",
    "gradmap_s1",
    "gradmap_tok",
    "gradmap_tok_oneshot",
    "shortgpt",
    "angular",
    "taylor",
    "taylor_plus",
    "ppl",
    "ppl_plus",
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
PLOTS = (
    "accuracy_vs_ratio",
    "ppl_vs_ratio",
    "pruning_time",
    "pareto",
    "removed_layers",
    "gradmap_stages",
    "per_task",
    "equal_compute",
    "layer_scores",
    "stability",
    "claim",
)
GIB = 2**30
# Names as a paper prints them; variants not listed keep their config key.
DISPLAY_NAMES = {
    "none": "Dense",
    "gradmap": "GradMAP",
    "gradmap_s1": "GradMAP (stage 1)",
    "shortgpt": "ShortGPT",
    "angular": "Angular",
    "taylor": "Taylor",
    "taylor_plus": "Taylor+",
    "ppl": "PPL",
    "sleb": "SLEB",
    "streamline": "LLM-Streamline",
    "streamline_noheal": "LLM-Streamline (no heal)",
    "replaceme": "ReplaceMe",
    "random": "Random",
    "last_n": "Last-n",
}


def display_name(variant: str) -> str:
    """ "shortgpt+projection" -> "ShortGPT + projection"; unknown methods keep their key."""
    method, _, repair = str(variant).partition("+")
    name = DISPLAY_NAMES.get(method, method)
    return f"{name} + {repair}" if repair else name


def family(variant: str) -> str:
    """The method family that sets a plot's colour: GradMAP readings, selectors (baselines), controls, dense."""
    method = str(variant).split("+")[0]
    if method == DENSE:
        return "dense"
    if method.startswith(GRADMAP):
        return "gradmap"
    return "control" if method in CONTROLS else "selector"
