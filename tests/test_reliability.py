"""Reliability defects of issue 17, one test each: records that lie, writes outside runs_dir, cache races and
corruption, a planted pickle, and a force rerun that gets killed. No test here loads a real model."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap import pipeline
from gradmap.config import ConfigError, validate
from gradmap.core.cachefiles import publish_dir
from gradmap.core.calib import build_calibration
from gradmap.overrides import check_overrides
from gradmap.results import JobClaim, atomic_write_json, check_record
from gradmap.sweep import main as sweep_main
from gradmap.sweep import scan

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=tiny_llama", "eval=none", "tracker=none", "calib.n_samples=2", "calib.seq_len=32", "speed.enabled=false"]


def config(runs: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*FAST, f"runs_dir={runs}", "method=last_n", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def valid_record(job: pipeline.Job, **extra) -> dict:
    """A complete ok record as run_job writes it (what the reader requires, nothing invented beyond that)."""
    return {
        "status": "ok",
        "job_id": job.job_id,
        "job_name": job.name,
        "model": "tiny_llama",
        "method": "last_n",
        "n_layers": 8,
        "n_remove": 2,
        "removed_layers": [5, 6],
        "timing": {"select_s": 0.0, "repair_s": 0.0, "prune_s": 0.0},
        "metrics": {},
        "finished_at": "2026-12-01T00:00:00+00:00",
        **extra,
    }


def fake_run_job(cfg, job, tracker=None):
    return valid_record(job, finished_at="recomputed")


# ---------------------------------------------------------------------------------------------------------------
# Records that cannot lie


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"status": "ok", "job_name": "x"}', "model missing"),
        ("[]", "not a JSON object but list"),
        ('"ok"', "not a JSON object but str"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        ('{"status": "ok", "job_na', "not JSON"),
        ("", "empty"),
        ("\x00\xff\x00", "not JSON"),
    ],
)
def test_stub_non_dict_and_truncated_records_are_corrupt(tmp_path, content, problem):
    (tmp_path / "result.json").write_bytes(content.encode("latin-1"))
    found = check_record(tmp_path)
    assert found.status == "corrupt" and problem in found.problem and found.record is None


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"metrics": {"boolq": "high", "boolq/n": 5}}, "metrics.boolq='high'"),
        ({"metrics": {"wikitext2_ppl": float("inf")}}, "metrics.wikitext2_ppl=inf"),
        ({"metrics": {"avg": float("nan")}}, "metrics.avg=nan"),
        ({"metrics": {"piqa": 3.5}}, "an accuracy in [0, 1]"),
        ({"removed_layers": [99999, 6]}, "distinct indices 0..7"),
        ({"n_layers": 10**12}, "n_layers=1000000000000"),
        ({"timing": {"select_s": 0, "repair_s": 0, "prune_s": float("inf")}}, "timing.prune_s=inf"),
        ({"n_remove": 3}, "n_remove=3 but 2 removed_layers"),
        ({"n_remove": 3, "removed_units": 5}, "n_remove=3 but 2 removed_layers (and removed_units=5)"),
    ],
)
def test_values_are_checked_before_the_report_sees_them(tmp_path, change, problem):
    cfg = config(tmp_path)
    job = pipeline.Job.from_config(cfg)
    atomic_write_json(tmp_path / "result.json", {**valid_record(job), **change})
    found = check_record(tmp_path)
    assert found.status == "corrupt" and problem in found.problem


def test_a_blockpruner_record_counts_half_layers_in_units(tmp_path):
    """BlockPruner removes 2·n_remove branches, some as half layers: fewer whole removed_layers is then valid."""
    job = pipeline.Job.from_config(config(tmp_path))
    atomic_write_json(tmp_path / "result.json", {**valid_record(job), "n_remove": 3, "removed_units": 6})
    assert check_record(tmp_path).status == "ok"


def test_stub_record_is_recomputed_not_skipped(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    job = pipeline.Job.from_config(cfg)
    job.dir.mkdir(parents=True)
    (job.dir / "result.json").write_text('{"status": "ok"}')
    monkeypatch.setattr(pipeline, "run_job", fake_run_job)
    out = pipeline.execute(cfg)
    assert not out.get("skipped") and out["finished_at"] == "recomputed"
    assert check_record(job.dir).status == "ok"


def test_truncated_record_without_job_log_is_listed_by_path(tmp_path, capsys):
    sweep = tmp_path / "copied"
    (sweep / "tiny_llama-last_n-r0.25-abc").mkdir(parents=True)  # as copied from docs/results/: no job.log
    (sweep / "tiny_llama-last_n-r0.25-abc" / "result.json").write_text('{"status": "ok", "metr')
    (sweep / "notes").mkdir()  # a folder with no result.json and no job.log is not a job
    states = scan(sweep)
    assert [(s.status, s.dir.name) for s in states] == [("corrupt", "tiny_llama-last_n-r0.25-abc")]
    assert sweep_main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "corrupt" in printed and str(sweep / "tiny_llama-last_n-r0.25-abc" / "result.json") in printed


def test_report_names_every_file_it_could_not_use(tmp_path):
    from gradmap.report.driver import tables

    sweep = tmp_path / "s"
    (sweep / "a").mkdir(parents=True)
    (sweep / "a" / "result.json").write_text("[]")
    with pytest.raises(ValueError, match=r"not used .*a/result.json: not a JSON object but list \(corrupt\)"):
        tables(sweep, None)


def test_killed_force_rerun_keeps_the_finished_result(tmp_path):
    """force=true used to delete result.json first: SIGKILL during the rerun lost a finished result."""
    cfg = config(tmp_path, "force=true")
    job = pipeline.Job.from_config(cfg)
    atomic_write_json(job.dir / "result.json", valid_record(job))
    before = (job.dir / "result.json").read_bytes()
    script = (
        "import json, sys, time\n"
        "from gradmap import pipeline\n"
        "pipeline.run_job = lambda *a: time.sleep(120)\n"
        "pipeline.execute(json.loads(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)], env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not (job.dir / "job.log").exists() and time.time() < deadline:  # job.log appears once the run starts
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (job.dir / "job.log").exists(), "the rerun started before it was killed"
    assert (job.dir / "result.json").read_bytes() == before
    assert check_record(job.dir).status == "ok"


def test_second_process_on_a_claimed_job_skips_and_says_so(tmp_path, monkeypatch, caplog):
    cfg = config(tmp_path)
    job = pipeline.Job.from_config(cfg)
    job.dir.mkdir(parents=True)
    holder = JobClaim(job.dir)
    assert holder.acquire() is None
    monkeypatch.setattr(pipeline, "run_job", lambda *a: pytest.fail("computed twice"))
    with caplog.at_level(logging.WARNING, logger="gradmap"):
        out = pipeline.execute(cfg)
    assert out["status"] == "busy" and f"pid {os.getpid()}" in out["error"]
    assert "skipped here so it is not computed twice" in caplog.text
    holder.release()
    monkeypatch.setattr(pipeline, "run_job", fake_run_job)
    assert pipeline.execute(cfg)["status"] == "ok"


# ---------------------------------------------------------------------------------------------------------------
# Paths


@pytest.mark.parametrize("override", ["sweep=../../x", "sweep=/abs/path", "sweep=..", "model.name=../../x"])
def test_path_escapes_are_refused_before_anything_is_written(tmp_path, override):
    runs = tmp_path / "runs"
    out = pipeline.execute(config(runs, override))
    key = override.split("=")[0]
    assert out["status"] == "failed" and f"{key}=" in out["error"] and "cannot be a folder name" in out["error"]
    assert not any(tmp_path.iterdir()), "nothing is created, inside runs_dir or outside it"
    with pytest.raises(ValueError, match="cannot be a folder name under runs_dir"):
        check_overrides([override])


def test_runs_dir_that_is_a_file_fails_before_hydra(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "run.py", *FAST, f"runs_dir={blocked}/sub"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and f"runs_dir='{blocked}/sub' cannot be created" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Caches


class WordTokenizer:
    """Enough of a tokenizer for build_calibration: one id per character."""

    name_or_path = "chars"
    bos_token_id = 1

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 256 for c in text]}


TEXT = "".join(chr(97 + (i * 7) % 26) for i in range(5000))


def _calib_worker(cache: str, keys: int) -> list[list[int]]:
    return [build_calibration(WordTokenizer(), TEXT, 2, 16, seed, cache_dir=cache)[0].tolist() for seed in range(keys)]


def test_calibration_cache_race_with_6_processes(tmp_path):
    """One fixed temporary name made 27 of 120 calls fail with FileNotFoundError."""
    with multiprocessing.get_context("fork").Pool(6) as pool:
        results = pool.starmap(_calib_worker, [(str(tmp_path), 20)] * 6)
    assert all(r == results[0] for r in results)
    assert len(list(tmp_path.glob("calib-*.safetensors"))) == 20 and not list(tmp_path.glob(".*tmp"))


def test_corrupted_calibration_cache_is_moved_aside_and_rebuilt(tmp_path, caplog):
    fresh = build_calibration(WordTokenizer(), TEXT, 2, 16, 0, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("calib-*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="gradmap.cache"):
        again = build_calibration(WordTokenizer(), TEXT, 2, 16, 0, cache_dir=tmp_path)
    assert torch.equal(fresh, again)
    assert str(entry) in caplog.text and "moved to" in caplog.text and len(caplog.records) == 1
    assert len(list(tmp_path.glob("calib-*.corrupt-*"))) == 1 and entry.is_file()


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANT_MARKER']}",))


def test_planted_pickle_in_the_cache_does_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("PLANT_MARKER", str(tmp_path / "pwned"))
    cache = tmp_path / "cache"
    build_calibration(WordTokenizer(), TEXT, 2, 16, 0, cache_dir=cache)
    (entry,) = cache.glob("calib-*.safetensors")
    payload = pickle.dumps(Planted())
    entry.write_bytes(payload)
    entry.with_suffix(".pt").write_bytes(payload)  # where the old cache looked
    out = build_calibration(WordTokenizer(), TEXT, 2, 16, 0, cache_dir=cache)
    assert out.shape == (2, 16) and not (tmp_path / "pwned").exists()


def test_model_cache_publish_tolerates_a_finished_twin(tmp_path):
    final, mine = tmp_path / "smollm2_135m", tmp_path / ".smollm2_135m.1.tmp"
    for folder in (final, mine):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    assert publish_dir(mine, final) is False and not mine.exists() and (final / "config.json").is_file()


def test_corrupted_model_cache_is_moved_aside_and_rebuilt(tmp_path, monkeypatch, caplog):
    from gradmap import models

    monkeypatch.setenv("GRADMAP_CACHE", str(tmp_path))
    cached = models.model_cache_dir("smollm2_135m")
    assert cached.parent == tmp_path / "models"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{not json")

    def rebuilt(name):
        raise RuntimeError("rebuild reached")

    monkeypatch.setattr(models, "gguf_path", rebuilt)
    with caplog.at_level(logging.WARNING, logger="gradmap.cache"), pytest.raises(RuntimeError, match="rebuild"):
        models.load_smollm2()
    assert not cached.exists() and len(list(cached.parent.glob(f"{cached.name}.corrupt-*"))) == 1
    assert str(cached) in caplog.text


@pytest.mark.slow
def test_two_jobs_at_once_on_an_empty_cache_both_finish(tmp_path):
    """Two GGUF-model jobs started together on an empty GRADMAP_CACHE: both build the model cache and the
    calibration cache, both finish ok, and the cache holds one published copy of each with no temp leftovers.
    scripts/run_tiny_gguf.py swaps the GGUF weights for a tiny Llama, so this is seconds, not a SmolLM2 run."""
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADMAP_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["model=smollm2_135m", *FAST[1:], f"runs_dir={runs}", "sweep=cache", "prune.n_remove=2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "scripts/run_tiny_gguf.py", *args, f"method={m}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for m in ("shortgpt", "angular")
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-800:] for o in outs]
    records = [json.loads(p.read_text()) for p in sorted((runs / "cache").glob("*/result.json"))]
    assert [(r["method"], r["status"], r["n_layers"]) for r in records] == [
        ("angular", "ok", 30),
        ("shortgpt", "ok", 30),
    ]
    published = [p.name for p in (cache / "models").iterdir()]
    assert published == [f"smollm2_135m-transformers{transformers.__version__}"], published
    assert (cache / "models" / published[0] / "config.json").is_file()
    assert len(list((cache / "calib").glob("calib-*.safetensors"))) == 1
    leftovers = [p.name for p in cache.rglob("*") if p.name.startswith(".") or ".tmp" in p.name or "corrupt" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------------------------
# Security and the checkout


def test_trust_remote_code_string_false_is_refused(tmp_path, monkeypatch):
    from gradmap import models

    with pytest.raises(ConfigError, match=r"model.trust_remote_code='false' is not a boolean"):
        validate(config(tmp_path, "model=llama2_7b", "model.trust_remote_code='false'"))
    monkeypatch.setattr(models, "AutoTokenizer", None)  # the hub must not be reached
    with pytest.raises(ValueError, match=r"trust_remote_code='false' is not a boolean"):
        models.load_model({"source": "hub", "hub_id": "x/y", "trust_remote_code": "false"}, torch.device("cpu"))


def test_git_status_takes_no_index_lock(monkeypatch):
    from gradmap import results

    calls = []
    real = subprocess.run
    monkeypatch.setattr(results.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw))
    results.git_commit()
    status = [c for c in calls if "status" in c]
    assert status and all("--no-optional-locks" in c for c in status)


def test_a_bos_model_has_one_job_id_for_every_caller(tmp_path):
    """model.bos changes calib/eval before the job id; the sweep summary and run.py call Job.from_config on the raw
    config, so it must apply the same change (it did not: a Gemma sweep reported its 3 finished jobs as missing)."""
    from gradmap.models import with_model_bos

    cfg = config(tmp_path, "+model.bos=true")
    assert pipeline.Job.from_config(cfg).job_id == pipeline.Job.from_config(with_model_bos(cfg)).job_id
    assert pipeline.Job.from_config(cfg).job_id != pipeline.Job.from_config(config(tmp_path)).job_id
