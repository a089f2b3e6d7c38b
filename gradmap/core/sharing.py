"""Who else computed on a job's device while it was timed: the ``placement`` block of every record.

A pruning time or a tokens/s figure means something only if nothing else ran on that GPU (or those CPU cores)
meanwhile. Launchers have put several jobs on one device (joblib: every worker on cuda:0), and two sweeps started
by hand on one machine share its GPU just as well; the numbers look normal either way. So every job takes a *seat*
in a node-local registry: one small JSON file per process (``<host>-<pid>.json``), listing the jobs that process
ran, each with its device and the time it started and ended. Only the owning process writes its file (atomically).

When a job's timed part ends it reads the other files of its host: a job of another process whose run overlapped
the timed span counts as concurrent on the node, and as sharing the device when its device key is the same (the
GPU's UUID, else its physical index behind ``CUDA_VISIBLE_DEVICES``; ``cpu`` for CPU jobs). A process that died
without closing its entry is taken to have run until its file was last written. Jobs of other users, and programs
that are not gradmap jobs, are not seen: the record says what gradmap itself can vouch for.

The registry is ``$GRADMAP_SEATS_DIR`` or ``<tmp>/gradmap-seats-<uid>`` (node-local on purpose: a Ray or Slurm
node has its own). The launcher's name comes from the entry point (``run.py`` calls :func:`set_launcher`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SEATS_ENV = "GRADMAP_SEATS_DIR"
KEEP_S = 2 * 86400  # entries older than this are dropped from a process's own file when it next writes
_STATE: dict[str, Any] = {"launcher": "none", "open": None}


def set_launcher(name: str) -> None:
    """The launcher this process's jobs run under (``hydra/launcher`` choice; ``none`` outside a sweep)."""
    _STATE["launcher"] = str(name)


def registry_dir() -> Path:
    return Path(os.environ.get(SEATS_ENV) or Path(tempfile.gettempdir()) / f"gradmap-seats-{os.getuid()}")


def device_key(device: torch.device | str) -> str:
    """What identifies the physical device across processes: ``cpu``, ``gpu:<uuid>`` or ``gpu:<index>``.

    Two processes that see one GPU under different ``CUDA_VISIBLE_DEVICES`` numbering get the same key.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid:
        return f"gpu:{uuid}"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"gpu:{visible[index] if index < len(visible) else index}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: alive
        return True
    return True


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "jobs": entries}, handle)
    os.replace(tmp, path)


def others(registry: Path, start: float, end: float, host: str | None = None, pid: int | None = None):
    """Entries of other processes on ``host`` whose run overlapped ``[start, end]``: (job, device key) pairs."""
    host = host or socket.gethostname()
    pid = os.getpid() if pid is None else pid
    found: list[tuple[str, str]] = []
    for path in sorted(registry.glob(f"{host}-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            mtime = path.stat().st_mtime
        except (OSError, ValueError):  # being replaced, or not ours: skip
            continue
        if not isinstance(data, dict) or data.get("pid") == pid or data.get("host") != host:
            continue
        alive = _pid_alive(int(data.get("pid", -1)))
        for entry in data.get("jobs") or []:
            stop = entry.get("end") or (end if alive else mtime)
            if entry.get("start", end) < end and stop > start:
                found.append((str(entry.get("job")), str(entry.get("key"))))
    return found


@dataclass
class Seat:
    """This job's entry in the registry; ``begin_span``/``end_span`` bracket the timed part (load and evaluation
    stay outside the span but inside the entry, since they disturb *other* jobs' timings)."""

    job: str
    device: str
    key: str
    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    span: list[float] = field(default_factory=list)

    def begin_span(self) -> None:
        self.span = [time.time()]
        self._save()  # refreshes the file's mtime: a killed job's entry then ends no earlier than this

    def end_span(self) -> None:
        if self.span:
            self.span = [*self.span[:1], time.time()]
            self._save()

    def observe(self) -> dict[str, Any]:
        """The placement block: the launcher, the device, and which gradmap jobs ran during the timed span."""
        start = self.span[0] if self.span else self.entries[-1]["start"]
        end = self.span[1] if len(self.span) > 1 else time.time()
        seen = others(self.path.parent, start, end)
        same = sorted({job for job, key in seen if key == self.key})
        return {
            "launcher": _STATE["launcher"],
            "host": socket.gethostname(),
            "device": self.device,
            "device_key": self.key,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "span_s": round(end - start, 3),
            "node_jobs": 1 + len({job for job, _ in seen}),
            "same_device_jobs": same,
            "shared": bool(same),
        }

    def close(self) -> dict[str, Any]:
        """Observe, then end this job's entry (the process may run another job next)."""
        placement = self.observe()
        self._end()
        return placement

    def _end(self) -> None:
        if self.entries and self.entries[-1].get("end") is None:
            self.entries[-1]["end"] = time.time()
            self._save()
        if _STATE["open"] is self:
            _STATE["open"] = None

    def _save(self) -> None:
        with contextlib.suppress(OSError):  # a full or read-only /tmp must not fail the job; the record sees less
            _write(self.path, self.entries)


def take_seat(job: str, device: torch.device | str, registry: Path | None = None) -> Seat:
    """Register ``job`` on ``device`` for this process; an earlier job of the process still open ends now."""
    if _STATE["open"] is not None:
        _STATE["open"]._end()
    path = (registry or registry_dir()) / f"{socket.gethostname()}-{os.getpid()}.json"
    previous: list[dict[str, Any]] = []
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("jobs") or []
    except (OSError, ValueError, AttributeError):
        previous = []
    now = time.time()
    kept = [e for e in previous if (e.get("end") or now) > now - KEEP_S and e.get("end") is not None]
    key = device_key(device)
    seat = Seat(job, str(device), key, path, [*kept, {"job": job, "key": key, "start": now, "end": None}])
    seat._save()
    _STATE["open"] = seat
    return seat


@atexit.register
def _close_open_seat() -> None:
    if _STATE["open"] is not None:
        _STATE["open"]._end()
