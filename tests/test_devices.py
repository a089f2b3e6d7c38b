"""GPU assignment and the placement record, on faked device lists (no GPU on the test machine).

gradmap/devices.py decides which device a job gets or refuses in one line; gradmap/core/sharing.py records which
other jobs ran on that device during the timed span. Both are pure enough to test with fake hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gradmap.core import sharing
from gradmap.devices import (
    Request,
    auto_device,
    gpu_slot,
    host_gpus,
    plan_local,
    plan_parallel,
    plan_ray,
    request_of,
    schedule,
    visible_gpus,
)


def test_visible_gpus_follow_cuda_rules():
    assert visible_gpus({}, 4) == ["0", "1", "2", "3"]  # unset: all of the host's
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, 4) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, 4) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 4) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,3"}, 4) == ["1"]  # CUDA stops at the first invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ab12"}, 1) == ["GPU-ab12"]


def test_host_gpus_counts_driver_nodes(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset"):
        (tmp_path / name).touch()
    assert host_gpus(tmp_path) == 2
    assert host_gpus(tmp_path / "missing") == 0


def test_auto_device_never_falls_back_to_the_cpu_silently():
    assert auto_device(2, 2, {}, Request(), "12.8") == "cuda"
    assert auto_device(0, 0, {}, Request(), None) == "cpu"  # a CPU machine: the CPU is the honest answer
    with pytest.raises(
        ValueError,
        match=r"^device=auto: this host has 8 GPU\(s\) but this job sees none "
        r"\(CUDA_VISIBLE_DEVICES='' hides them\); refusing to fall back .* device=cpu$",
    ):
        auto_device(0, 8, {"CUDA_VISIBLE_DEVICES": ""}, Request("local"), "12.8")
    with pytest.raises(ValueError, match=r"this torch is a CPU build"):
        auto_device(0, 1, {}, Request(), None)
    with pytest.raises(ValueError, match=r"hydra/launcher=slurm asked for 1 GPU\(s\) per job, but this job sees none"):
        auto_device(0, 0, {"CUDA_VISIBLE_DEVICES": "0"}, Request("slurm", 1.0), None)


def test_parallel_allows_one_job_per_gpu_and_refuses_more():
    gpus = ["0", "1"]
    assert plan_parallel(2, 10, "auto", gpus, 2, 16) == 2
    assert plan_parallel(4, 10, "cpu", gpus, 2, 16) == 4  # CPU jobs on purpose
    assert plan_parallel(4, 10, "auto", [], 0, 16) == 4  # a CPU machine
    assert plan_parallel(4, 1, "auto", gpus, 2, 16) == 1  # one task never shares
    with pytest.raises(ValueError, match=r"would run 4 jobs at once on 2 visible GPU\(s\).*n_jobs=2 \(or device=cpu;"):
        plan_parallel(4, 10, "auto", gpus, 2, 16)
    with pytest.raises(ValueError, match=r"would run 16 jobs at once"):  # n_jobs=-1: every core
        plan_parallel(-1, 40, "cuda", gpus, 2, 16)
    with pytest.raises(ValueError, match=r"device=cuda:0 puts all 2 concurrent jobs on one GPU"):
        plan_parallel(2, 10, "cuda:0", gpus, 2, 16)
    with pytest.raises(ValueError, match=r"this host has 2 GPU\(s\) but CUDA_VISIBLE_DEVICES hides them all"):
        plan_parallel(2, 10, "auto", [], 2, 16)
    # sharing on purpose (accuracy-only runs): K jobs per GPU, and no more
    assert plan_parallel(4, 10, "cuda", ["0"], 1, 16, per_gpu=4) == 4
    assert plan_parallel(4, 10, "cuda:0", ["0"], 1, 16, per_gpu=4) == 4
    with pytest.raises(ValueError, match=r"would run 6 jobs at once on 1 visible GPU\(s\) \(4 per GPU\)"):
        plan_parallel(6, 10, "cuda", ["0"], 1, 16, per_gpu=4)
    with pytest.raises(ValueError, match=r"jobs_per_gpu=0; allowed: a whole number >= 1"):
        plan_parallel(2, 10, "cuda", ["0"], 1, 16, per_gpu=0)


def test_local_hands_out_gpu_groups():
    assert plan_local(None, "auto", ["0", "1", "2", "3"], 4) == [(0,), (1,), (2,), (3,)]
    assert plan_local(2, "auto", ["4", "5", "6", "7", "0"], 8) == [(4, 5), (6, 7)]  # leftover GPU unused
    assert plan_local(None, "auto", [], 0) == []  # CPU machine: CPU jobs
    assert plan_local(1, "cpu", ["0"], 1) == []
    with pytest.raises(ValueError, match=r"gpus_per_node=0 hides this host's 2 GPU\(s\) from every job"):
        plan_local(0, "auto", ["0", "1"], 2)
    with pytest.raises(ValueError, match=r"asked for 2 GPU\(s\) per job but 1 are visible"):
        plan_local(2, "cuda", ["0"], 1)
    with pytest.raises(ValueError, match=r"needs GPU indices"):
        plan_local(1, "auto", ["GPU-ab12"], 1)


def test_ray_num_gpus_auto_and_refusals():
    assert plan_ray("auto", 8, "auto") == 1.0
    assert plan_ray("auto", 0, "auto") == 0.0
    assert plan_ray(None, 8, "cpu") == 0.0
    assert plan_ray(2, 8, "auto") == 2.0
    with pytest.raises(ValueError, match=r"num_gpus=0 on a cluster with 8 GPU\(s\): every job would see all of them"):
        plan_ray(0, 8, "auto")
    assert plan_ray(0.25, 1, "auto") == 0.25  # four jobs per GPU, asked for by name
    with pytest.raises(ValueError, match=r"num_gpus=1.5; allowed: auto, a fraction below 1, or a whole number"):
        plan_ray(1.5, 8, "auto")
    with pytest.raises(ValueError, match=r"num_gpus=1 but the cluster has 0 GPU\(s\): no job could ever start"):
        plan_ray(1, 0, "auto")
    with pytest.raises(ValueError, match=r"allowed: auto or a whole number"):
        plan_ray("many", 8, "auto")


def test_schedule_never_puts_two_running_jobs_on_one_group():
    """7 jobs on 2 GPUs: each job's lifetime is 1-3 polls; at no poll do two running jobs hold one GPU."""
    clock = {"t": 0}
    lifetimes = [3, 1, 2, 1, 3, 2, 1]
    started: list[tuple[int, tuple[int, ...], int]] = []

    def submit(i, group):
        started.append((i, group, clock["t"]))
        return i

    def done(i):
        return clock["t"] >= next(t for j, _, t in started if j == i) + lifetimes[i]

    def tick():
        clock["t"] += 1

    handles = schedule(len(lifetimes), [(0,), (1,)], submit, done, tick)
    assert handles == list(range(7)) and sorted(i for i, _, _ in started) == list(range(7))
    for t in range(clock["t"] + 1):
        running = [g for i, g, s in started if s <= t < s + lifetimes[i]]
        assert len(running) == len(set(running)) <= 2, (t, running)
    assert started[0][2] == started[1][2] == 0  # both GPUs busy from the start


def test_gpu_slot_gives_concurrent_jobs_different_gpus(tmp_path):
    got: list[int] = []
    hold = threading.Event()

    def job():
        with gpu_slot(["0", "1"], tmp_path, poll_s=0.05) as index:
            got.append(index)
            hold.wait(5)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    while len(got) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert sorted(got) == [0, 1]
    third: list[int] = []
    waiter = threading.Thread(target=lambda: third.extend(_take(tmp_path)))
    waiter.start()
    time.sleep(0.3)
    assert third == []  # both GPUs held: the third job waits
    hold.set()
    for t in [*threads, waiter]:
        t.join(5)
    assert third and third[0] in (0, 1)


def test_gpu_slot_spreads_shared_slots_over_gpus(tmp_path):
    """With 2 slots per GPU, the second job goes to the other GPU, the third shares the first."""
    with contextlib.ExitStack() as stack:
        got = [stack.enter_context(gpu_slot(["0", "1"], tmp_path, per_gpu=2)) for _ in range(4)]
    assert got == [0, 1, 0, 1]


def _take(lock_dir: Path) -> list[int]:
    with gpu_slot(["0", "1"], lock_dir, poll_s=0.05) as index:
        return [index]


def test_request_of_reads_the_launcher_config():
    hydra = OmegaConf.create(
        {
            "runtime": {"choices": {"hydra/launcher": "slurm"}},
            "launcher": {"_target_": "x.submitit.SlurmLauncher", "gpus_per_node": 1},
        }
    )
    assert request_of(hydra) == Request("slurm", 1.0, False)
    hydra.launcher = {
        "_target_": "hydra_plugins.gradmap_launchers.ray_gpu.GpuRayLauncher",
        "ray": {"remote": {"num_gpus": "auto"}},
    }
    hydra.runtime.choices["hydra/launcher"] = "ray"
    assert request_of(hydra) == Request("ray", None, False)
    hydra.launcher = {"_target_": "hydra_plugins.gradmap_launchers.joblib_gpu.GpuJoblibLauncher", "jobs_per_gpu": 3}
    hydra.runtime.choices["hydra/launcher"] = "parallel"
    assert request_of(hydra) == Request("parallel", None, True, 3)


# ------------------------------------------------------------------------------------ placement (core/sharing)

OTHER_JOB = """
import sys, time
from gradmap.core import sharing
seat = sharing.take_seat(sys.argv[1], sys.argv[2])
print("seated", flush=True)
time.sleep(float(sys.argv[3]))
seat.close()
"""


def _other_process(tmp_path: Path, job: str, device: str, seconds: float) -> subprocess.Popen:
    env = {**os.environ, sharing.SEATS_ENV: str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", OTHER_JOB, job, device, str(seconds)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "seated"
    return proc


def test_placement_records_a_job_sharing_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv(sharing.SEATS_ENV, str(tmp_path))
    sharing.set_launcher("parallel")
    other = _other_process(tmp_path, "bystander", "cpu", 3.0)
    try:
        seat = sharing.take_seat("me", "cpu")
        seat.begin_span()
        time.sleep(0.05)
        seat.end_span()
        placement = seat.close()
    finally:
        other.wait(30)
    assert placement["launcher"] == "parallel" and placement["device_key"] == "cpu"
    assert placement["same_device_jobs"] == ["bystander"] and placement["shared"] is True
    assert placement["node_jobs"] == 2
    after = sharing.take_seat("later", "cpu")  # the bystander has ended: nothing overlaps a new span
    after.begin_span()
    after.end_span()
    assert after.close()["same_device_jobs"] == []


def test_placement_of_a_job_alone_and_of_a_killed_one(tmp_path, monkeypatch):
    monkeypatch.setenv(sharing.SEATS_ENV, str(tmp_path))
    seat = sharing.take_seat("alone", "cpu")
    seat.begin_span()
    seat.end_span()
    alone = seat.close()
    assert (alone["node_jobs"], alone["same_device_jobs"], alone["shared"]) == (1, [], False)
    # A process killed mid-job leaves an open entry: it counts until its file was last written, not forever.
    stale = tmp_path / f"{alone['host']}-999999.json"
    old = time.time() - 3600
    stale.write_text(
        json.dumps(
            {"host": alone["host"], "pid": 999999, "jobs": [{"job": "dead", "key": "cpu", "start": old, "end": None}]}
        )
    )
    os.utime(stale, (old + 60, old + 60))
    assert sharing.others(tmp_path, old + 30, old + 40) == [("dead", "cpu")]
    assert sharing.others(tmp_path, time.time() - 1, time.time()) == []
