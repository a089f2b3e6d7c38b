"""Per-item records of one evaluation: the ``items.jsonl.gz`` file in a job folder (format in docs/reports.md).

Why: every method of a sweep is scored on the same items (seeded subsets, the same PPL windows), so two methods can
be compared item by item (a paired test), which is far sharper than comparing two aggregate accuracies as if they
were independent samples. That needs the per-item outcomes, which lm-eval computes and then drops unless asked.

One JSON object per line, gzip-compressed (deterministic: no name or mtime in the gzip header), one line per item:

* a task item: ``{"task": "boolq", "doc_id": 1403, "doc_hash": "e1a49cdac66e48b2", "target": 1, "acc": 1.0,
  "acc_norm": 0.0, "ll": [-3.1, -2.7]}`` — ``doc_id`` is the item's index in the task's evaluation split (the
  seeded subset keeps original indices), ``doc_hash`` the first 16 hex digits of lm-eval's hash of the document
  (so a reader can check that two runs saw the same item), every per-item metric lm-eval lists for the task, and
  for multiple-choice tasks the log-likelihood of each choice (``ll``, in choice order).
* a perplexity window: ``{"task": "wikitext2_ppl", "doc_id": 0, "nll": 1432.7, "tokens": 255}`` — the window's
  summed NLL in nats and its scored tokens; PPL = exp(sum nll / sum tokens) over the windows.

Imports only the standard library, so the report (which never imports torch) reads these files with
:func:`read_items`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ITEMS_FILE = "items.jsonl.gz"
HASH_CHARS = 16


def _number(value: Any) -> float | None:
    """A per-item metric as a float (bools count as 0/1), or None when lm-eval stored something else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def task_items(task: str, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Compact rows from lm-eval's ``log_samples`` records of one task (see the module docstring)."""
    rows = []
    for sample in samples:
        row: dict[str, Any] = {"task": task, "doc_id": int(sample["doc_id"])}
        if sample.get("doc_hash"):
            row["doc_hash"] = str(sample["doc_hash"])[:HASH_CHARS]
        target = sample.get("target")
        if isinstance(target, (int, str)) and not isinstance(target, bool) and len(str(target)) <= 200:
            row["target"] = target
        for metric in sample.get("metrics") or ():
            value = _number(sample.get(metric))
            if value is not None:
                row[metric] = value
        resps = sample.get("filtered_resps")
        if isinstance(resps, (list, tuple)) and resps and all(isinstance(r, (list, tuple)) and r for r in resps):
            lls = [_number(r[0]) for r in resps]
            if all(v is not None for v in lls):
                row["ll"] = lls
        rows.append(row)
    return sorted(rows, key=lambda r: r["doc_id"])


def window_items(dataset: str, window_nll: Sequence[float], window_tokens: Sequence[int]) -> list[dict[str, Any]]:
    """One row per perplexity window: its summed NLL and scored tokens."""
    if len(window_nll) != len(window_tokens):
        raise ValueError(f"{len(window_nll)} window NLLs but {len(window_tokens)} token counts; they must match")
    return [
        {"task": f"{dataset}_ppl", "doc_id": i, "nll": float(nll), "tokens": int(tok)}
        for i, (nll, tok) in enumerate(zip(window_nll, window_tokens))
    ]


def write_items(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` as gzip JSON lines, atomically (temp file + rename, umask permissions); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    count = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as handle:
        for row in rows:
            handle.write((json.dumps(row, separators=(",", ":")) + "\n").encode("utf-8"))
            count += 1
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        tmp.write(buffer.getvalue())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)
    os.replace(tmp.name, path)
    return count


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an items file (a file, or a job folder holding ``items.jsonl.gz``)."""
    path = Path(path)
    if path.is_dir():
        path = path / ITEMS_FILE
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(f"items file {str(path)!r} is unreadable ({type(err).__name__}: {err})") from err
