"""Launchers end to end on the CPU: ray (a tiny sweep on 2 Ray workers, then a rerun that skips both jobs), local
with faked visible GPUs (each job gets its own), and parallel refusing two jobs on one GPU in one line.

One Ray head is started for the module (``ray start --head --block``, 2 CPUs, no dashboard) and both sweeps join it
by address, so Ray's start-up (10-25 s on a busy 2-core box) is paid once; the head is stopped through its own
process group at the end. The default path (a local instance started and shut down by the launcher) is the same
launcher code with ``address: null``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradmap import faults
from gradmap.core.sharing import SEATS_ENV
from gradmap.results import read_result

REPO = Path(__file__).resolve().parents[1]
JOBS = (
    "experiment=smoke",
    "eval=none",
    "speed.enabled=false",
    "method=none,random",
    "prune.ratio=0.25",
    "calib.n_samples=2",
)


def sweep_env(seats: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV_SPEC, faults.ENV_ALLOW)}
    env.update(
        PYTHONPATH=str(REPO),
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",  # a head of this test only, on this machine: no token to hand around
        **{SEATS_ENV: str(seats)},
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-CPU Ray head of this test's own; its workers inherit this environment (PYTHONPATH, seats folder)."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    seats = tmp_path_factory.mktemp("seats")
    port = free_port()
    script = Path(sys.executable).with_name("ray")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    cmd += ["start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
    cmd += ["--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
    log = (seats / "ray-head.log").open("w")
    head = subprocess.Popen(cmd, env=sweep_env(seats), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (seats / "ray-head.log").read_text() and time.time() < deadline:
            assert head.poll() is None, (seats / "ray-head.log").read_text()[-2000:]
            time.sleep(0.5)
        address = re.search(rf"(\d+\.\d+\.\d+\.\d+:{port})\b", (seats / "ray-head.log").read_text())
        assert address, (seats / "ray-head.log").read_text()[-2000:]
        yield {"address": address.group(1), "seats": seats, "head": head}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and every Ray process it started, nothing else
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        log.close()


def run_ray_sweep(ray_head: dict, runs: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "run.py", "-m", *JOBS, f"runs_dir={runs}", "hydra/launcher=ray"]
    cmd.append(f"hydra.launcher.ray.init.address={ray_head['address']}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=sweep_env(ray_head["seats"]), capture_output=True, text=True, timeout=400)
    return proc, time.perf_counter() - start


@pytest.mark.slow
def test_ray_sweep_runs_on_two_workers_and_resumes(ray_head, tmp_path):
    first, first_s = run_ray_sweep(ray_head, tmp_path)
    text = first.stdout + first.stderr
    assert first.returncode == 0, text[-3000:]
    assert "sweep smoke: 2 jobs: 2 ok, 0 reused, 0 skipped, 0 failed" in text, text[-3000:]
    workers = set(re.findall(r"\(_run_job pid=(\d+)\).*removed layers", text))
    assert len(workers) == 2, text[-3000:]  # the two jobs ran in two Ray worker processes
    records = [read_result(p) for p in sorted((tmp_path / "smoke").glob("tiny_llama-*"))]
    assert [r["status"] for r in records] == ["ok", "ok"]
    for rec in records:
        placement = rec["placement"]
        assert (placement["launcher"], placement["device"], placement["device_key"]) == ("ray", "cpu", "cpu")
        assert placement["node_jobs"] in (1, 2) and placement["shared"] == bool(placement["same_device_jobs"])

    again, again_s = run_ray_sweep(ray_head, tmp_path)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert "sweep smoke: 2 jobs: 0 ok, 0 reused, 2 skipped, 0 failed" in text, text[-3000:]
    assert "removed layers" not in text  # the rerun did no model work
    assert ray_head["head"].poll() is None  # joining by address leaves the cluster running
    print(f"ray sweep {first_s:.0f} s, rerun {again_s:.0f} s")


def run_sweep(runs: Path, *overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", "-m", *JOBS, f"runs_dir={runs}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_local_launcher_gives_each_job_its_own_gpu(tmp_path):
    """Two faked visible GPUs: each job's process gets one of them (CUDA_VISIBLE_DEVICES), recorded in placement.

    No GPU exists here, so the jobs themselves run on the CPU (device=auto on a host without GPUs)."""
    env = sweep_env(tmp_path / "seats") | {"CUDA_VISIBLE_DEVICES": "0,1"}
    proc = run_sweep(tmp_path, "hydra/launcher=local", env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "2 GPU group(s): [(0,), (1,)]" in text and "sweep smoke: 2 jobs: 2 ok" in text, text[-3000:]
    visible = sorted(read_result(p)["placement"]["visible_devices"] for p in (tmp_path / "smoke").glob("tiny_*"))
    assert visible == ["0", "1"]


@pytest.mark.slow
def test_parallel_launcher_refuses_two_jobs_on_one_gpu_in_one_line(tmp_path):
    env = sweep_env(tmp_path / "seats") | {"CUDA_VISIBLE_DEVICES": "0"}
    proc = run_sweep(tmp_path, "hydra/launcher=parallel", "device=cuda", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: hydra/launcher=parallel would run 2 jobs at once on 1 visible GPU(s) (1 per GPU): set "
        "hydra.launcher.n_jobs=1 (or device=cpu; hydra.launcher.jobs_per_gpu=K shares each GPU between K jobs on "
        "purpose, their timings flagged)"
    )
    assert not list((tmp_path / "smoke").glob("tiny_*"))  # refused before any job started
