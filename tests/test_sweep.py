"""Sweeps that resume: real subprocess sweeps (experiment=smoke, eval=none to keep them to seconds) in a temp
runs folder, with the test-only fault switch; plus launcher/preset composition, the fault switch, dense reuse
and the inference-speed measurement in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap import faults
from gradmap.core.layers import remove_layers
from gradmap.eval.speed import measure_from_config, measure_speed, same_setup
from gradmap.models import tiny_llama
from gradmap.results import read_result
from gradmap.sweep import Outcome, classify, scan, summarize

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Tiny and fast: the dense reference and a random selector at two ratios (4 jobs; the dense one twice).
SWEEP = ("experiment=smoke", "eval=none", "method=none,random", "prune.ratio=0.25,0.5")


def run_sweep(runs_dir: Path, *overrides: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV_SPEC, faults.ENV_ALLOW)}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if fault:
        env.update({faults.ENV_ALLOW: "1", faults.ENV_SPEC: fault})
    cmd = [sys.executable, "run.py", "-m", *SWEEP, f"runs_dir={runs_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    proc.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return proc


def summary_line(proc: subprocess.CompletedProcess) -> str:
    match = re.search(r"sweep smoke: .*?failed", proc.stdout + proc.stderr)
    assert match, (proc.stdout + proc.stderr)[-3000:]
    return match.group(0)


def job_dir(runs: Path, name: str) -> Path:
    (folder,) = (runs / "smoke").glob(f"{name}-*")
    return folder


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    """One sweep taken through a failure, a kill, a repair rerun and a no-op rerun."""
    runs = tmp_path_factory.mktemp("runs")
    out: dict = {"runs": runs}
    out["failed"] = run_sweep(runs, fault="random-r0.5:raise")
    out["after_failed"] = {p.name: read_result(p) for p in (runs / "smoke").glob("tiny_llama-*")}
    out["killed"] = run_sweep(runs, fault="random-r0.5:kill")  # the failed job is redone, and dies mid-way
    out["killed_files"] = sorted(p.name for p in job_dir(runs, "tiny_llama-random-r0.5").iterdir())
    left = job_dir(runs, "tiny_llama-random-r0.5") / "result.json"
    out["killed_status"] = json.loads(left.read_text())["status"] if left.is_file() else None
    out["repaired"] = run_sweep(runs)
    out["noop"] = run_sweep(runs)
    return out


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_others_complete(scenario):
    proc = scenario["failed"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary_line(proc) == "sweep smoke: 4 jobs: 2 ok, 0 reused, 1 skipped, 1 failed"
    records = {name.rsplit("-", 1)[0]: rec for name, rec in scenario["after_failed"].items()}
    assert {k: r["status"] for k, r in records.items()} == {
        "tiny_llama-none-dense": "ok",
        "tiny_llama-random-r0.25": "ok",
        "tiny_llama-random-r0.5": "failed",
    }
    failed = records["tiny_llama-random-r0.5"]
    assert failed["error"] == "InjectedFault: injected test fault in tiny_llama-random-r0.5"
    assert "injected test fault" in (proc.stdout + proc.stderr)
    ok = records["tiny_llama-random-r0.25"]
    assert ok["speed"]["prompt_len"] == 16 and ok["speed"]["n_layers"] == 6  # speed measured on the pruned model


@pytest.mark.slow
def test_killed_job_leaves_no_result_and_is_redone(scenario):
    assert scenario["killed"].returncode == faults.KILL_EXIT_CODE
    # A record is replaced only when a new one is written: the kill leaves the earlier failed record as it was
    # (never an ok one), so the next run redoes the job.
    assert scenario["killed_status"] in (None, "failed")
    assert "job.log" in scenario["killed_files"]
    proc = scenario["repaired"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary_line(proc) == "sweep smoke: 4 jobs: 1 ok, 0 reused, 3 skipped, 0 failed"
    assert {s.status for s in scan(scenario["runs"] / "smoke")} == {"ok"}


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_skips_everything(scenario):
    proc = scenario["noop"]
    text = proc.stdout + proc.stderr
    assert summary_line(proc) == "sweep smoke: 4 jobs: 0 ok, 0 reused, 4 skipped, 0 failed"
    assert text.count("skip tiny_llama-") == 4 and "removed layers" not in text
    summaries = sorted((scenario["runs"] / "smoke" / ".hydra").glob("multirun-*/summary.json"))
    assert json.loads(summaries[-1].read_text())["counts"] == {"skipped": 4}


@pytest.mark.slow
def test_dense_reference_is_reused_across_sweeps(scenario):
    from gradmap.pipeline import execute

    cfg = composed(
        "experiment=smoke", "eval=none", "method=none", f"runs_dir={scenario['runs']}", "sweep=other", hydra=False
    )
    first = execute(OmegaConf.to_container(cfg, resolve=True))
    source = job_dir(scenario["runs"], "tiny_llama-none-dense")
    assert first["reused_from"] == str(source) and first["sweep"] == "other"
    assert read_result(Path(first["reused_from"]))["job_id"] == first["job_id"]
    again = execute(OmegaConf.to_container(cfg, resolve=True))
    assert again.get("skipped") is True  # now it is this sweep's own finished job
    forced = OmegaConf.to_container(cfg, resolve=True) | {"force": True, "eval": {"name": "none", "tasks": []}}
    assert "reused_from" not in execute(forced)  # force recomputes


@pytest.mark.slow
def test_tiny_sweep_runs_through_submitit_local(tmp_path):
    proc = run_sweep(tmp_path, "method=random", "prune.ratio=0.25", "hydra/launcher=local")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert summary_line(proc) == "sweep smoke: 1 job: 1 ok, 0 reused, 0 skipped, 0 failed"
    assert read_result(job_dir(tmp_path, "tiny_llama-random-r0.25"))["status"] == "ok"
    assert list((tmp_path / "smoke" / ".hydra").glob("multirun-*/.submitit"))


# --------------------------------------------------------------------------------------------------------------
# Composition


def composed(*overrides: str, hydra: bool = True):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize(
    ("launcher", "target", "fields"),
    [
        (None, "BasicLauncher", {}),
        ("parallel", "GpuJoblibLauncher", {"n_jobs": 2, "backend": "loky"}),
        ("joblib", "JoblibLauncher", {}),
        ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 480, "array_parallelism": 8, "partition": None}),
        ("local", "GpuLocalLauncher", {"timeout_min": 60, "gpus_per_node": None}),
        (
            "ray",
            "GpuRayLauncher",
            {
                "ray": {
                    "init": {
                        "address": None,
                        "num_cpus": None,
                        "num_gpus": None,
                        "include_dashboard": False,
                        "log_to_driver": True,
                    },
                    "remote": {"num_gpus": "auto", "num_cpus": 1, "max_retries": 0},
                }
            },
        ),
        ("submitit_local", "LocalLauncher", {}),
    ],
)
def test_launchers_compose(launcher, target, fields):
    cfg = composed("experiment=smoke", *([f"hydra/launcher={launcher}"] if launcher else []))
    assert cfg.hydra.launcher._target_.endswith(target)
    for key, value in fields.items():
        assert cfg.hydra.launcher[key] == value
    assert cfg.hydra.callbacks.sweep_summary._target_ == "gradmap.sweep.SweepSummary"


def test_slurm_fields_override():
    cfg = composed("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.timeout_min) == ("gpu", 30)


ALL_METHODS = {p.stem for p in (CONF / "method").glob("*.yaml")}
ABLATIONS = {"mka_refcode"}  # the reference code's behaviour of MKA (= last_n), not a method of the main studies


@pytest.mark.parametrize(
    ("preset", "model", "eval_name", "ratios", "methods"),
    [
        ("smoke", "tiny_llama", "smoke", "0.25,0.5", {"none", "gradmap", "shortgpt", "sleb", "random"}),
        ("offline_main", "smollm2_135m", "quick", "0.125,0.25,0.375", ALL_METHODS - ABLATIONS),
        ("paper_main", None, "full", "0.125,0.25,0.375", ALL_METHODS - ABLATIONS),
        ("paper_speed", None, "none", "0.125,0.25,0.375", None),
    ],
)
def test_experiment_presets(preset, model, eval_name, ratios, methods):
    cfg = composed(f"experiment={preset}")
    params = cfg.hydra.sweeper.params
    assert cfg.sweep == preset and cfg.eval.name == eval_name and params["prune.ratio"] == ratios
    if model:
        assert cfg.model.name == model
    else:
        assert params["model"] == "llama2_7b,llama2_13b,llama3_8b"
    swept = set(params["method"].split(","))
    assert swept <= ALL_METHODS
    if methods is not None:
        assert swept == methods
    else:  # the pruning-cost sweep must contain GradMAP, the averaging set and the dense reference
        assert {"none", "gradmap", "shortgpt", "taylor_plus", "sleb", "streamline"} <= swept
    assert preset != "smoke" or cfg.tracker.name == "none"


# --------------------------------------------------------------------------------------------------------------
# Fault switch, outcomes, speed


def test_fault_switch_needs_both_variables():
    spec = {faults.ENV_SPEC: "random-r0.5:raise,gradmap:kill"}
    assert faults.fault_for("tiny_llama-random-r0.5", spec) is None  # not allowed: ignored
    allowed = spec | {faults.ENV_ALLOW: "1"}
    assert faults.fault_for("tiny_llama-random-r0.5", allowed) == "raise"
    assert faults.fault_for("tiny_llama-gradmap-r0.25", allowed) == "kill"
    assert faults.fault_for("tiny_llama-none-dense", allowed) is None
    with pytest.raises(ValueError, match=r"bad GRADMAP_TEST_FAULT entry 'x:explode'.*raise, nan, kill"):
        faults.fault_for("x", {faults.ENV_SPEC: "x:explode", faults.ENV_ALLOW: "1"})


def test_nan_fault_poisons_the_model(monkeypatch):
    monkeypatch.setenv(faults.ENV_ALLOW, "1")
    monkeypatch.setenv(faults.ENV_SPEC, "victim:nan")
    model = tiny_llama(vocab_size=64, num_hidden_layers=2)
    faults.inject("bystander", model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    faults.inject("the-victim-job", model)
    assert all(torch.isnan(p).all() for p in model.parameters())
    monkeypatch.setenv(faults.ENV_SPEC, "victim:raise")
    with pytest.raises(faults.InjectedFault, match="the-victim-job"):
        faults.inject("the-victim-job", model)


def test_outcomes_and_summary():
    ok = {"status": "ok", "finished_at": "t1"}
    assert classify(None, ok, None) == "ok"
    assert classify(ok, dict(ok), None) == "skipped"
    assert classify({"status": "failed", "finished_at": "t0"}, ok, None) == "ok"
    assert classify(None, ok | {"reused_from": "x", "reused_at": "t2"}, None) == "reused"
    assert classify(None, {"status": "failed"}, None) == "failed"
    assert classify(ok, ok, "ValueError: bad") == "failed"
    assert classify(None, None, None) == "missing"
    outcomes = [Outcome(0, "a", "ok"), Outcome(1, "b", "skipped"), Outcome(2, "c", "failed", "E: x")]
    assert summarize(outcomes, "s") == "sweep s: 3 jobs: 1 ok, 0 reused, 1 skipped, 1 failed"


def test_speed_is_measured_the_same_way_for_dense_and_pruned():
    model = tiny_llama(vocab_size=256, num_hidden_layers=4)
    dense = measure_speed(model, prompt_len=8, gen_len=3, repeats=1, warmup=0).as_dict()
    remove_layers(model, [1, 2])
    pruned = measure_from_config(model, {"enabled": True, "prompt_len": 8, "gen_len": 3, "repeats": 1, "warmup": 0})
    assert (dense["n_layers"], pruned["n_layers"]) == (4, 2) and pruned["params"] < dense["params"]
    for rec in (dense, pruned):
        assert rec["prefill_tok_s"] == pytest.approx(8 / rec["prefill_s"])
        assert rec["decode_tok_s"] == pytest.approx(3 / rec["decode_s"])
        assert rec["latency_s"] == pytest.approx(rec["prefill_s"] + rec["decode_s"])
    assert same_setup(dense, pruned)
    assert measure_from_config(model, {"enabled": False}) is None
    with pytest.raises(ValueError, match=r"speed.gen_len=0 is invalid; allowed: a whole number >= 1"):
        measure_speed(model, gen_len=0)
    with pytest.raises(ValueError, match=r"unknown key speed\.prompt; allowed"):
        measure_from_config(model, {"enabled": True, "prompt": 3})


def test_speed_runs_until_its_time_floor():
    """A model that answers in milliseconds is timed over more runs than ``repeats`` (GPU clocks, noise)."""
    model = tiny_llama(vocab_size=256, num_hidden_layers=2)
    exact = measure_speed(model, prompt_len=4, gen_len=2, repeats=2, warmup=0, min_time_s=0)
    floored = measure_speed(model, prompt_len=4, gen_len=2, repeats=1, warmup=1, min_time_s=0.2)
    assert exact.timed_runs == 2
    assert floored.timed_runs > 1, "one run of a 2-layer toy model takes far less than 0.2 s"
    with pytest.raises(ValueError, match=r"speed.min_time_s=-1 is invalid; allowed: seconds from 0 to 600"):
        measure_speed(model, min_time_s=-1)
