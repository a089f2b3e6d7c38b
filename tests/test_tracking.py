"""W&B runs as researchers expect them, checked in the offline run files themselves.

The ``.wandb`` file of an offline run is W&B's record log (a LevelDB-style log of protobuf ``Record``s, 32 KiB
blocks, 7-byte chunk headers); :func:`wandb_records` decodes it with wandb's own protobuf classes, so the tests
see what ``wandb sync`` would upload: the run's id/group/job type/tags, logged tables and artifacts.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap.pipeline import execute
from gradmap.tracking import Tracker, WandbTracker, make_tracker, result_rows, score_rows, wandb_run_id

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny_llama",
    "method=shortgpt",
    "prune.n_remove=1",
    "calib.n_samples=2",
    "calib.seq_len=32",
    "speed.enabled=false",
    "eval=smoke",
    "eval.tasks=[boolq]",
    "eval.limit=2",
    "eval.ppl.max_windows=1",
    "tracker=wandb",
    "tracker.mode=offline",
]


def wandb_records(run_dir: Path) -> list:
    """Every protobuf Record of the offline run in ``run_dir`` (``offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B record log"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def run_facts(run_dir: Path) -> dict:
    """Run id, group, job type, tags, the table keys logged and the artifacts (name, type, files)."""
    facts: dict = {"tables": set(), "artifacts": []}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            facts.update(
                id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type, tags=record.run.tags
            )
        elif kind == "history":
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                if keys[-1] == "_type" and json.loads(item.value_json) == "table-file":
                    facts["tables"].add(keys[0])
        elif kind == "artifact":
            files = [entry.path for entry in record.artifact.manifest.contents]
            facts["artifacts"].append((record.artifact.name, record.artifact.type, files))
    return facts


def job_config(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"runs_dir={tmp_path}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def offline_runs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


def test_same_job_in_two_sweeps_gives_two_runs_and_a_rerun_resumes_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    first = execute(job_config(tmp_path, "sweep=wa"))
    other = execute(job_config(tmp_path, "sweep=wb"))
    assert first["status"] == other["status"] == "ok", (first.get("error"), other.get("error"))
    assert first["job_id"] == other["job_id"], "the sweep name is not part of what the job computes"
    dirs = {s: tmp_path / s / f"{first['job_name']}-{first['job_id']}" for s in ("wa", "wb")}
    facts = {s: run_facts(offline_runs(d)[0]) for s, d in dirs.items()}
    assert facts["wa"]["id"] != facts["wb"]["id"]
    for sweep, fact in facts.items():
        assert fact["id"] == wandb_run_id(sweep, first["job_id"])
        assert fact["group"] == sweep and fact["job_type"] == "prune"
        assert {"tiny_llama", "shortgpt", "n1"} <= set(fact["tags"])
        assert {"results", "layer_scores"} <= fact["tables"], fact["tables"]
        assert "evaluation/eval_results" in fact["tables"], "lm-eval's WandbLogger table"
        ours = [a for a in fact["artifacts"] if a[0] == f"{first['job_name']}-{first['job_id']}-results"]
        assert ours and ours[0][1] == "eval_results" and "result.json" in ours[0][2]
        assert any(f.startswith("lm_eval/results_") for f in ours[0][2]), "lm-eval's results JSON is kept"
    again = execute(job_config(tmp_path, "sweep=wa", "force=true"))
    assert again["status"] == "ok"
    runs = offline_runs(dirs["wa"])
    assert len(runs) == 2 and run_facts(runs[1])["id"] == facts["wa"]["id"], "the rerun resumes its own run id"


def test_tables_of_a_record():
    record = {
        "removed_layers": [2, 0],
        "metrics": {
            "boolq": 0.5,
            "metric_map": {"boolq": "acc"},
            "boolq/acc": 0.5,
            "boolq/acc_stderr": 0.1,
            "boolq/acc_norm": 0.5,
            "boolq/n": 8,
            "wikitext2_ppl": 30.0,
            "ppl_windows": 2,
        },
        "scores": [{"0": 0.3, "1": 0.9, "2": 0.1}, {"0": 0.2, "1": 0.8}],
    }
    rows = {(r[0], r[1]): r for r in result_rows(record)}
    assert rows[("boolq", "acc")] == ["boolq", "acc", 0.5, 0.1, 8, True]
    assert rows[("boolq", "acc_norm")][5] is False, "equal values, but the metric map names acc"
    assert rows[("wikitext2", "ppl")][2] == 30.0
    removed = [(r[0], r[1]) for r in score_rows(record) if r[3]]
    assert removed == [(0, 2), (1, 0)], "each decision marks the layer it removed"


def tracker_config(tmp_path: Path, mode: str | None) -> dict:
    return {
        "tracker": {"name": "wandb", "mode": mode, "project": "t"},
        "sweep": "s",
        "model": {"name": "tiny"},
        "method": {"name": "none"},
    }


def test_wandb_mode_disabled_writes_no_run_unless_the_config_says(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = make_tracker(tracker_config(tmp_path, None), "job1", "job", tmp_path / "a")
    tracker.log_job({"job_name": "job", "job_id": "job1", "metrics": {"x/acc": 0.5}}, tmp_path)
    tracker.finish()
    assert not list((tmp_path / "a").rglob("*.wandb")), "WANDB_MODE=disabled decides when tracker.mode is null"
    explicit = make_tracker(tracker_config(tmp_path, "offline"), "job1", "job", tmp_path / "b")
    explicit.finish()
    assert list((tmp_path / "b").rglob("*.wandb")), "an explicit tracker.mode wins over WANDB_MODE"


def test_a_failed_online_start_falls_back_to_offline(monkeypatch, tmp_path, caplog):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") != "offline":
            raise RuntimeError("run ID in use")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING):
        tracker = make_tracker(tracker_config(tmp_path, "online"), "job2", "job", tmp_path)
    try:
        assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
        assert "online start failed (run ID in use)" in caplog.text
    finally:
        tracker.finish()
    assert Counter(p.suffix for p in tmp_path.rglob("*.wandb"))[".wandb"] == 1


def test_tracker_failure_never_fails_the_job(monkeypatch, tmp_path, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb exploded")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING):
        tracker = make_tracker(tracker_config(tmp_path, "offline"), "id", "name", tmp_path)
    assert type(tracker) is Tracker
    assert "tracking disabled" in caplog.text


def test_unknown_tracker_mode_is_one_line():
    from gradmap.tracking import resolve_mode

    with pytest.raises(ValueError, match=r"tracker.mode='offlin'; allowed: null .*online, offline, disabled"):
        resolve_mode("offlin")


def test_report_run_takes_project_group_and_mode_from_the_sweep(tmp_path, monkeypatch):
    from gradmap.report.wandb_log import report_init
    from gradmap.results import atomic_write_json

    monkeypatch.delenv("WANDB_MODE", raising=False)
    job = tmp_path / "mysweep" / "job-1"
    tracker = {"name": "wandb", "project": "proj", "entity": "team", "mode": "offline"}
    record = {"status": "ok", "job_name": "job", "model": "m", "method": "none", "n_layers": 2, "n_remove": 0}
    record |= {"removed_layers": [], "timing": {"select_s": 0, "repair_s": 0, "prune_s": 0}, "metrics": {}}
    atomic_write_json(job / "result.json", {**record, "config": {"tracker": tracker}})  # a valid record only
    init = report_init(tmp_path / "mysweep", tmp_path / "out")
    assert (init["project"], init["entity"], init["group"], init["job_type"]) == ("proj", "team", "mysweep", "report")
    assert init["mode"] == "offline" and init["id"] == report_init(tmp_path / "mysweep", tmp_path / "x")["id"]
