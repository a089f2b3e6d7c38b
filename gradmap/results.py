"""Result records: one ``result.json`` per job, written atomically, with the versions that produced it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gradmap.paths import REPO_ROOT

RESULT_FILE = "result.json"

# Config keys that change what a job computes. Tracker, launcher, paths and the sweep name do not.
IDENTITY_KEYS = ("model", "method", "repair", "prune", "calib", "eval", "seed", "dtype", "device_type")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file.

    mkstemp creates its file 0600 whatever the umask; the file gets the mode a plain ``open()`` would give it
    (0644 under umask 0022), so colleagues on a shared cluster can read the results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, record: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


@dataclass
class RecordCheck:
    """What a ``result.json`` holds: ``ok``/``failed`` (a valid record), ``corrupt`` (why, in ``problem``) or
    ``missing``. Only a valid ok record counts as finished; everything else is recomputed by a rerun."""

    path: Path
    status: str
    record: dict[str, Any] | None = None
    problem: str | None = None


MAX_LAYERS = 100_000  # far above any model; a forged n_layers=10**12 must not reach the report's allocations
# Metric keys that describe the evaluation rather than measure it (gradmap.eval.harness): not numbers.
TEXT_METRICS = (
    "eval_preset",
    "items_file",
    "metric_map",
    "avg_tasks",
)


def check_record(path: str | Path) -> RecordCheck:
    """Read and validate the record in ``path`` (a file or a job folder); never raises for its content."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return RecordCheck(path, "missing")
    except OSError as err:
        return RecordCheck(path, "corrupt", problem=f"unreadable ({type(err).__name__})")
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        what = "empty" if not raw.strip() else f"not JSON ({type(err).__name__}, {len(raw)} bytes)"
        return RecordCheck(path, "corrupt", problem=what)
    problem = record_problem(record)
    if problem is not None:
        return RecordCheck(path, "corrupt", problem=problem)
    return RecordCheck(path, record["status"], record)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record: Any) -> str | None:
    """Why ``record`` cannot be used (None: it can). An ok record needs its metrics, removed layers and timing,
    with finite values in range; a failed one needs its error line."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    status = record.get("status")
    if status not in ("ok", "failed"):
        return f"status {status!r}; allowed: ok, failed"
    if not isinstance(record.get("job_name"), str):
        return "no job_name"
    if status == "failed":
        return None if isinstance(record.get("error"), str) else "failed record without an error message"
    for key in ("model", "method"):
        if not isinstance(record.get(key), str):
            return f"{key} missing or not a string"
    n_layers, n_remove, removed = record.get("n_layers"), record.get("n_remove"), record.get("removed_layers")
    if not (isinstance(n_layers, int) and not isinstance(n_layers, bool) and 1 <= n_layers <= MAX_LAYERS):
        return f"n_layers={n_layers!r}; allowed: 1..{MAX_LAYERS}"
    if not isinstance(removed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
        return f"removed_layers={removed!r} is not a list of layer indices"
    if len(set(removed)) != len(removed) or any(not 0 <= i < n_layers for i in removed):
        return f"removed_layers={removed!r}; allowed: distinct indices 0..{n_layers - 1}"
    units = record.get("removed_units")  # BlockPruner: whole layers + half layers, counted in branches
    partial = isinstance(units, int) and units == 2 * (n_remove or 0) and len(removed) <= (n_remove or 0)
    if n_remove != len(removed) and not partial:
        return f"n_remove={n_remove!r} but {len(removed)} removed_layers (and removed_units={units!r})"
    return _sections_problem(record)


def _sections_problem(record: dict[str, Any]) -> str | None:
    timing, metrics, speed = record.get("timing"), record.get("metrics"), record.get("speed")
    if not isinstance(timing, dict):
        return "no timing"
    if not isinstance(metrics, dict):
        return "no metrics"
    for key in ("select_s", "repair_s", "prune_s"):
        if not (_finite(timing.get(key)) and timing[key] >= 0):
            return f"timing.{key}={timing.get(key)!r}; allowed: a finite number >= 0"
    for section, values in (("timing", timing), ("speed", speed or {})):
        if not isinstance(values, dict):
            return f"{section} is not a mapping"
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"{section}.{key}={value!r} is not finite"
    from gradmap.eval.tasks import TASK_NAMES  # torch-free; the report imports it too

    for key, value in metrics.items():
        if "/" in key and (isinstance(value, str) or value is None or isinstance(value, bool)):
            continue  # per-task details may be lm-eval's "N/A"
        if key in TEXT_METRICS or (key.startswith("ppl_") and (isinstance(value, bool) or value is None)):
            continue
        if not _finite(value):
            return f"metrics.{key}={value!r}; allowed: a finite number"
        if key in TASK_NAMES and not 0 <= value <= 1:
            return f"metrics.{key}={value!r}; allowed: an accuracy in [0, 1]"
        if key == "avg" and not 0 <= value <= 100:
            return f"metrics.avg={value!r}; allowed: 0..100"
        if key.endswith("_ppl") and value < 1:
            return f"metrics.{key}={value!r}; allowed: a perplexity >= 1"
    return None


def read_result(path: str | Path) -> dict[str, Any] | None:
    """The valid record in ``path`` (a file or a job folder), or None if absent or corrupt (see check_record)."""
    return check_record(path).record


def stable_hash(payload: Mapping[str, Any], length: int = 10) -> str:
    """Hash of a JSON-able mapping that is independent of key order and of the Python session."""
    text = json.dumps(payload, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def without_default(section: Mapping[str, Any], key: str, default: str) -> dict[str, Any]:
    """``section`` without ``key`` where it is absent-equivalent (None or ``default``): a job identity hashed with
    :func:`stable_hash` then stays the same when a new key is spelt out at its default."""
    return {k: v for k, v in section.items() if k != key or v not in (None, default)}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """Library versions and the project commit, recorded in every result."""
    out: dict[str, str | None] = {}
    for package in ("torch", "transformers", "lm_eval", "hydra-core", "wandb"):
        try:
            out[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package.replace("-", "_")] = None
    out["gradmap_bench"] = git_commit()
    return out


CLAIM_FILE = ".claim"


class JobClaim:
    """An exclusive claim on a job folder, so that two processes never compute the same job at once.

    ``fcntl.flock`` on ``<job>/.claim``: the kernel drops the lock when its process dies (SIGKILL, OOM, pre-emption),
    so a claim can never go stale; the file's text (pid, host, start time) only says who holds it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / CLAIM_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the claim; None when taken, else a description of the process that holds it."""
        import fcntl
        import socket
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it would race a new claimer)
            self._fd = None
