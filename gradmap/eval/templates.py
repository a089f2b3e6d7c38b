"""Compile each lm-eval prompt template once per evaluation, not once per document.

lm-eval 0.4.13 renders every ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` Jinja template through
``lm_eval.utils.apply_template``, which calls ``Environment.from_string`` (a full parse and compile) for every
document and every field: about 1.3 ms a call on the CPU machine, the largest single piece of the full
evaluation's host work that is not the model (profile in docs/benchmarks.md, "Evaluation throughput"). The
rendered strings are unchanged: the same template string is compiled by the same environment, once, and
rendered with the same document (tests/test_evaluate.py compares every prompt of the 7 tasks both ways).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def templates_compiled_once() -> Iterator[None]:
    """Within the block, ``lm_eval.utils.apply_template`` compiles each distinct template string once (cached for
    the block only, so nothing outlives one evaluation). Without lm-eval's ``env`` (a different lm-eval), the
    block runs lm-eval's own function: slower, same prompts."""
    from lm_eval import utils

    environment = getattr(utils, "env", None)
    original = utils.apply_template
    if environment is None:
        log.warning("lm_eval.utils.env not found: prompt templates are compiled per document (slower, same prompts)")
        yield
        return
    compiled = functools.lru_cache(maxsize=None)(environment.from_string)

    def apply_template(template: str, doc: dict[str, Any]) -> str:
        return compiled(template).render(**doc)

    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = original
