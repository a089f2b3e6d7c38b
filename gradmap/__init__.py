"""gradmap-bench: prune whole decoder layers out of LLMs with GradMAP and compare layer-pruning methods.

The core (this package's pruning code) imports only torch and transformers::

    from gradmap import prune
    result = prune(model, calib_ids, method="gradmap", ratio=0.25)
    result.model, result.removed_layers, result.scores, result.timings
"""

from gradmap.api import PruneResult, prune, resolve_n_remove
from gradmap.base import METHODS, REPAIRS, SELECTORS

__all__ = ["METHODS", "REPAIRS", "SELECTORS", "PruneResult", "prune", "resolve_n_remove"]
__version__ = "0.1.0"
