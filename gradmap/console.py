"""The console of a job: progress bars that never share a line with a log line, and nothing but text off a TTY.

Why: tqdm bars and logging both write to the terminal; a log line printed while a bar is drawn lands on the
bar's line, and nested bars leave cursor-up escape codes in captured output (a Slurm ``.out``, ``| tee``).

* On a terminal, log records go through ``tqdm.write`` (:class:`TqdmHandler`, wired in by
  ``conf/hydra/job_logging/gradmap.yaml``), which clears the bars, prints the line and redraws them.
* Off a terminal, :func:`configure_console` turns progress bars off (``TQDM_DISABLE``, and the HF datasets/hub
  equivalents) before tqdm is imported, so files get log lines only; each phase still logs when it starts and
  ends. A variable the user set is left as it is.

This module imports nothing heavy: ``run.py`` calls :func:`configure_console` before anything imports tqdm.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

NON_TTY_ENV = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_console(stream: TextIO | None = None) -> bool:
    """Off a TTY, switch progress bars off (where tqdm draws them: stderr). Returns whether bars stay on."""
    if is_tty(stream):
        return True
    for key, value in NON_TTY_ENV.items():
        os.environ.setdefault(key, value)
    return False


class TqdmHandler(logging.StreamHandler):
    """A StreamHandler that prints through ``tqdm.write`` so a log line never lands on a progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _round(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a" if value is None else str(value)
    return f"{value:.{digits}f}"


def final_line(record: Mapping[str, Any], result_path: Path) -> str:
    """``<job>: ok (prune 12.3 s, avg 45.21, ppl 18.84) -> runs/<sweep>/<job>/result.json``, numbers rounded."""
    metrics = record.get("metrics") or {}
    timing = record.get("timing") or {}
    parts = []
    if "prune_s" in timing:
        parts.append(f"prune {_round(timing['prune_s'], 1)} s")
    if "avg" in metrics:
        parts.append(f"avg {_round(metrics['avg'], 2)}")
    ppl = next((k for k in metrics if k.endswith("_ppl")), None)
    if ppl:
        parts.append(f"ppl {_round(metrics[ppl], 2)}")
    return f"{record['job_name']}: ok ({', '.join(parts) or 'no metrics'}) -> {result_path}"
