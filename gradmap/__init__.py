"""gradmap-bench: prune whole decoder layers out of LLMs with GradMAP and compare layer-pruning methods.

The core (this package's pruning code) imports only torch and transformers::

    from gradmap import prune
    result = prune(model, calib_ids, method="gradmap", ratio=0.25)
    result.model, result.removed_layers, result.scores, result.timings
"""

from gradmap.core.components import METHODS, REPAIRS, SELECTORS
from gradmap.core.prune import PruneResult, prune, resolve_n_remove

__all__ = ["METHODS", "REPAIRS", "SELECTORS", "PruneResult", "prune", "resolve_n_remove"]
__version__ = "0.1.0"
