"""One job per device: which GPUs a host has, which a job may see, and where a launcher must refuse (one line).

Launchers decide what a job sees. Left alone they get it wrong quietly: submitit's local executor hides every GPU
(``CUDA_VISIBLE_DEVICES=''``) unless ``gpus_per_node`` is set, and then gives every job the same first GPU; joblib
workers inherit the parent's view, so each picks ``cuda:0``; Ray tasks with ``num_gpus=0`` see every GPU and pick
the first too. The job then runs on the CPU, or beside its siblings on one GPU, and its timings look normal.

The rules here, each a pure function tested with faked device lists (tests/test_devices.py):

* ``device=auto`` is CUDA when the job sees a GPU; when it sees none but the host has GPUs (``/dev/nvidia<N>``),
  or the launcher asked for GPUs, :func:`auto_device` raises instead of falling back to the CPU (``device=cpu``
  runs on the CPU on purpose).
* ``parallel`` (joblib): at most one job per visible GPU at once (:func:`plan_parallel`); each job holds a lock on
  a free GPU for its life (:func:`gpu_slot`) and runs on ``cuda:<that index>``.
* ``local`` (submitit): each job gets its own GPU group through ``CUDA_VISIBLE_DEVICES``, and no more jobs run at
  once than there are groups (:func:`plan_local`, :func:`schedule`).
* ``ray``: ``num_gpus: auto`` is 1 per job when the cluster has GPUs, 0 on a CPU cluster (:func:`plan_ray`).

Sharing a GPU stays possible where it is asked for by name (accuracy-only runs, whose timings do not matter):
``hydra.launcher.jobs_per_gpu=K`` under ``parallel``, a fractional ``num_gpus`` under ``ray``. Those runs' placement
blocks then list the jobs beside them, and the verdict flags their times.

What else ran on a job's device anyway is recorded by :mod:`gradmap.core.sharing` (the ``placement`` block).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("gradmap")
J = TypeVar("J")
HIDDEN = ("", "-1", "NoDevFiles")


@dataclass(frozen=True)
class Request:
    """What the launcher of this job asked for: its name and GPUs per job (None: not stated, decided by us)."""

    launcher: str = "none"
    gpus: float | None = None
    joblib: bool = False  # the job runs in a joblib worker: it picks its own GPU (gpu_slot)
    per_gpu: int = 1  # joblib: jobs that may share one GPU (hydra.launcher.jobs_per_gpu; > 1 only on purpose)


_REQUEST: dict[str, Request] = {"now": Request()}


def set_request(request: Request) -> None:
    _REQUEST["now"] = request


def current_request() -> Request:
    return _REQUEST["now"]


def host_gpus(dev: Path = Path("/dev")) -> int:
    """NVIDIA GPUs of this host, whatever CUDA_VISIBLE_DEVICES says (the driver's /dev/nvidia<N> nodes)."""
    try:
        return sum(1 for p in dev.iterdir() if re.fullmatch(r"nvidia\d+", p.name))
    except OSError:
        return 0


def visible_gpus(env: Mapping[str, str], n_host: int) -> list[str]:
    """The GPUs a process with ``env`` may use, as CUDA numbers them for it (ids or UUIDs, in order).

    Unset means all of the host's; an empty value or ``-1`` hides all; CUDA stops at the first invalid entry.
    """
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return [str(i) for i in range(n_host)]
    if raw.strip() in HIDDEN:
        return []
    out: list[str] = []
    for token in (t.strip() for t in raw.split(",")):
        if not token or token.startswith("-"):
            break
        out.append(token)
    return out


def auto_device(cuda_count: int, n_host: int, env: Mapping[str, str], request: Request, torch_cuda: str | None) -> str:
    """``cuda`` or ``cpu`` for ``device=auto``; a ValueError (one line) where ``cpu`` would be a silent mistake."""
    if cuda_count > 0:
        return "cuda"
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if torch_cuda is None:
        why = "this torch is a CPU build"
    elif raw is not None and not visible_gpus(env, n_host):
        why = f"CUDA_VISIBLE_DEVICES={raw!r} hides them"
    else:
        why = "torch.cuda.is_available() is False"
    if request.gpus:
        raise ValueError(
            f"device=auto: hydra/launcher={request.launcher} asked for {request.gpus:g} GPU(s) per job, but this "
            f"job sees none ({why}); fix the GPU setup, or run on the CPU on purpose with device=cpu"
        )
    if n_host > 0:
        raise ValueError(
            f"device=auto: this host has {n_host} GPU(s) but this job sees none ({why}); refusing to fall back to "
            "the CPU silently: fix the launcher's GPU assignment, or pass device=cpu"
        )
    return "cpu"


def wants_gpus(device: str, cpu_fallback: bool) -> bool:
    """Whether jobs with this ``device`` setting would use GPUs (auto: when any exist)."""
    return device.startswith("cuda") or (device == "auto" and not cpu_fallback)


def plan_parallel(
    n_jobs: int, n_tasks: int, device: str, gpus: Sequence[str], n_host: int, cores: int, per_gpu: int = 1
) -> int:
    """Jobs the joblib launcher may run at once (``per_gpu`` per visible GPU, 1 unless sharing is asked for on
    purpose); a ValueError names the fix otherwise."""
    if per_gpu < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu={per_gpu}; allowed: a whole number >= 1")
    at_once = min(n_tasks, n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs))
    if device == "cpu" or at_once <= 1:
        return at_once
    if re.fullmatch(r"cuda:\d+", device) and at_once > per_gpu:
        raise ValueError(
            f"hydra/launcher=parallel: device={device} puts all {at_once} concurrent jobs on one GPU; use "
            "device=auto (one GPU per job) or hydra.launcher.n_jobs=1"
        )
    if not gpus:
        if n_host > 0 and device == "auto":
            raise ValueError(
                f"hydra/launcher=parallel: this host has {n_host} GPU(s) but CUDA_VISIBLE_DEVICES hides them all; "
                "unhide them, or pass device=cpu to run the jobs on the CPU"
            )
        return at_once
    if at_once > len(gpus) * per_gpu and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(
            f"hydra/launcher=parallel would run {at_once} jobs at once on {len(gpus)} visible GPU(s) "
            f"({per_gpu} per GPU): set hydra.launcher.n_jobs={len(gpus) * per_gpu} (or device=cpu; "
            "hydra.launcher.jobs_per_gpu=K shares each GPU between K jobs on purpose, their timings flagged)"
        )
    return at_once


def plan_local(gpus_per_job: int | None, device: str, gpus: Sequence[str], n_host: int) -> list[tuple[int, ...]]:
    """The GPU groups submitit's local executor hands out, one group per running job ([]: CPU jobs)."""
    if device == "cpu":
        return []
    k = (1 if gpus else 0) if gpus_per_job is None else int(gpus_per_job)
    if k == 0:
        if gpus or n_host:
            raise ValueError(
                f"hydra/launcher=local with gpus_per_node=0 hides this host's {len(gpus) or n_host} GPU(s) from "
                "every job; set hydra.launcher.gpus_per_node=1 (one GPU per job) or device=cpu"
            )
        return []
    if len(gpus) < k:
        raise ValueError(
            f"hydra/launcher=local asked for {k} GPU(s) per job but {len(gpus)} are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); lower gpus_per_node or use device=cpu"
        )
    if not all(g.isdigit() for g in gpus):
        raise ValueError(
            f"hydra/launcher=local needs GPU indices in CUDA_VISIBLE_DEVICES to hand them out, got {','.join(gpus)}"
        )
    ids = [int(g) for g in gpus]
    return [tuple(ids[i : i + k]) for i in range(0, len(ids) - k + 1, k)]


def plan_ray(num_gpus: Any, cluster_gpus: float, device: str) -> float:
    """GPUs per Ray task: ``auto`` is 1 on a cluster with GPUs, else 0; settings that share or hide GPUs refuse."""
    if num_gpus in (None, "auto"):
        return 1.0 if cluster_gpus >= 1 and device != "cpu" else 0.0
    try:
        n = float(num_gpus)
    except (TypeError, ValueError):
        raise ValueError(f"hydra.launcher.ray.remote.num_gpus={num_gpus!r}; allowed: auto or a whole number") from None
    if device == "cpu":
        return n
    if n == 0 and cluster_gpus > 0:
        raise ValueError(
            f"hydra/launcher=ray with num_gpus=0 on a cluster with {cluster_gpus:g} GPU(s): every job would see "
            "all of them and use the first; set hydra.launcher.ray.remote.num_gpus=auto (or 1), or device=cpu"
        )
    if n > 1 and n != int(n):
        raise ValueError(
            f"hydra.launcher.ray.remote.num_gpus={n:g}; allowed: auto, a fraction below 1, or a whole number"
        )
    if n > cluster_gpus:
        raise ValueError(
            f"hydra.launcher.ray.remote.num_gpus={n:g} but the cluster has {cluster_gpus:g} GPU(s): no job could "
            "ever start; lower num_gpus or use device=cpu"
        )
    return n


def schedule(
    n: int,
    groups: Sequence[tuple[int, ...]],
    submit: Callable[[int, tuple[int, ...]], J],
    done: Callable[[J], bool],
    wait: Callable[[], None] = lambda: time.sleep(0.5),
) -> list[J]:
    """Start ``n`` jobs, each on a free group, never two at once on one group; return the handles in job order."""
    if not groups:
        raise ValueError("schedule needs at least one GPU group")
    free: deque[tuple[int, ...]] = deque(groups)
    pending = deque(range(n))
    handles: dict[int, J] = {}
    running: dict[int, tuple[int, ...]] = {}
    while pending or running:
        for i, group in list(running.items()):
            if done(handles[i]):
                free.append(group)
                del running[i]
        while pending and free:
            i, group = pending.popleft(), free.popleft()
            handles[i] = submit(i, group)
            running[i] = group
        if running:
            wait()
    return [handles[i] for i in range(n)]


@contextlib.contextmanager
def gpu_slot(gpus: Sequence[str], lock_dir: Path, poll_s: float = 2.0, per_gpu: int = 1) -> Iterator[int]:
    """Hold an exclusive lock on one of ``per_gpu`` slots of one of ``gpus`` for the job's life and yield the GPU's
    index (waits while all are held). Slots fill GPU by GPU: a second job goes to the second GPU, not beside the first.

    flock locks die with their process, so a killed job frees its GPU; jobs of other sweeps on this host that use
    the same launcher wait for it too.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    slots = [(index, gpu, k) for k in range(per_gpu) for index, gpu in enumerate(gpus)]
    while True:
        for index, gpu, k in slots:
            name = f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}" + (f"-{k}" if k else "")
            handle = open(lock_dir / f"{name}.lock", "a+")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not waited:
            log.info("waiting for a free GPU: all %d visible ones are held by other jobs of this host", len(gpus))
            waited = True
        time.sleep(poll_s)


def request_of(hydra_cfg: Any) -> Request:
    """The launcher and its GPUs per job from a job's Hydra config (``HydraConfig.get()``)."""
    name = str((hydra_cfg.runtime.choices or {}).get("hydra/launcher") or "basic")
    launcher = hydra_cfg.launcher
    target = str(launcher.get("_target_", ""))
    gpus: Any = None
    if "submitit" in target:
        gpus = launcher.get("gpus_per_node")
    elif "ray" in target.lower():
        gpus = ((launcher.get("ray") or {}).get("remote") or {}).get("num_gpus")
    gpus = None if gpus in (None, "auto") else float(gpus)
    return Request(name, gpus, joblib="Joblib" in target, per_gpu=int(launcher.get("jobs_per_gpu") or 1))


@contextlib.contextmanager
def job_placement(cfg: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Around one Hydra job: note its launcher (for device=auto and the placement record); under joblib, hold a
    free GPU and run the job on it (``device=cuda:<i>``)."""
    from hydra.core.hydra_config import HydraConfig

    from gradmap.core.sharing import registry_dir, set_launcher

    try:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode.name == "MULTIRUN"
    except ValueError:  # not under Hydra (tests, notebooks)
        hydra_cfg, multirun = None, False
    request = request_of(hydra_cfg) if multirun else Request("none (single run)")
    set_request(request)
    set_launcher(request.launcher)
    if not (request.joblib and cfg["device"] in ("auto", "cuda")):
        yield cfg
        return
    import torch

    gpus = visible_gpus(os.environ, host_gpus())
    if not gpus or not torch.cuda.is_available():
        yield cfg  # CPU jobs, or a setup that resolve_device refuses with its own line
        return
    with gpu_slot(gpus[: torch.cuda.device_count()], registry_dir() / "locks", per_gpu=request.per_gpu) as index:
        torch.cuda.set_device(index)
        yield {**cfg, "device": f"cuda:{index}"}
