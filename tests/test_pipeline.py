"""The pipeline end to end on tiny_llama: the record it writes, failures it survives, and reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap.pipeline import execute

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
FAST = ["model=tiny_llama", "eval=smoke", "tracker=none", "calib.n_samples=2", "calib.seq_len=32", "speed.min_time_s=0"]


def config(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*FAST, f"runs_dir={tmp_path}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def gradmap_record(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("runs")
    return execute(config(tmp, "method=gradmap", "prune.n_remove=2"))


def test_result_json_has_the_documented_keys(gradmap_record):
    rec = gradmap_record
    assert rec["status"] == "ok", rec.get("error")
    for key in (
        "model",
        "method",
        "repair",
        "n_layers",
        "n_remove",
        "removed_layers",
        "timing",
        "metrics",
        "versions",
        "config",
    ):
        assert key in rec
    assert rec["model"] == "tiny_llama" and rec["method"] == "gradmap" and rec["repair"] == "projection"
    assert rec["n_layers"] == 8 and rec["n_remove"] == 2 and len(rec["removed_layers"]) == 2
    for key in ("select_s", "repair_s", "prune_s", "peak_mem_bytes", "device"):
        assert key in rec["timing"]
    for task in TASKS:
        assert 0.0 <= rec["metrics"][task] <= 1.0
    assert rec["metrics"]["avg"] == pytest.approx(100 * sum(rec["metrics"][t] for t in TASKS) / len(TASKS))
    assert rec["metrics"]["wikitext2_ppl"] > 1.0
    for key in ("torch", "transformers", "lm_eval", "gradmap_bench"):
        assert key in rec["versions"]
    on_disk = json.loads(next(Path(rec["config"]["runs_dir"]).rglob("result.json")).read_text())
    assert on_disk["removed_layers"] == rec["removed_layers"]
    # the dev split: disjoint tiles, the final model's dev NLL, and the projection's dev check before/after
    assert rec["dev"]["n_samples"] == 4 and rec["dev"]["disjoint_from_calibration"].startswith("by construction")
    info = rec["repair_info"]
    assert rec["dev_nll"] == pytest.approx(info["dev_nll_compensated"], abs=1e-4)
    assert info["dev_nll_compensated"] <= info["dev_nll_uncompensated"]
    assert info["refused"] == (info["dev_choice"] == "none")


def test_same_config_twice_gives_the_same_layers_and_metrics(tmp_path):
    overrides = ("method=gradmap", "prune.n_remove=2", "eval.tasks=[piqa,winogrande]")
    first = execute(config(tmp_path / "a", *overrides))
    again = execute(config(tmp_path / "b", *overrides))
    assert first["status"] == again["status"] == "ok"
    assert again["removed_layers"] == first["removed_layers"]
    untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith("_seconds")}  # noqa: E731
    assert untimed(again["metrics"]) == untimed(first["metrics"])
    assert again["job_id"] == first["job_id"]


def test_default_ratio_and_explicit_ratio_are_the_same_job(tmp_path):
    from gradmap.pipeline import Job

    assert Job.from_config(config(tmp_path)).job_id == Job.from_config(config(tmp_path, "prune.ratio=0.25")).job_id
    assert Job.from_config(config(tmp_path)).job_id != Job.from_config(config(tmp_path, "prune.ratio=0.5")).job_id


def test_finished_job_is_skipped(tmp_path):
    first = execute(config(tmp_path, "method=random", "prune.n_remove=1", "eval=none"))
    second = execute(config(tmp_path, "method=random", "prune.n_remove=1", "eval=none"))
    assert first["status"] == "ok" and second.get("skipped") is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prune.ratio=1.5"], "prune.ratio=1.5 is out of range; allowed: 0 < prune.ratio < 1"),
        (["prune.ratio=0.25", "prune.n_remove=2"], "not both"),
        (["prune.n_remove=8"], "prune.n_remove=8 is too large"),
        (["prune.ratio=0.01"], "rounds to 0 layers"),
        (["dtype=float8"], "dtype='float8' is not allowed"),
        (["calib.seq_len=100000000"], "calib.seq_len=100000000 is out of range"),
        (["calib.n_samples=100000"], "calib.n_samples x calib.seq_len = 100000 x 32"),
    ],
)
def test_bad_values_fail_before_anything_is_written(tmp_path, overrides, message):
    rec = execute(config(tmp_path, "eval=none", *overrides))
    assert rec["status"] == "failed"
    assert message in rec["error"] and "\n" not in rec["error"]
    assert not any(tmp_path.iterdir()), "an invalid config creates no job folder"


def test_errors_found_after_loading_are_recorded_with_a_traceback(tmp_path):
    rec = execute(config(tmp_path, "eval=none", "calib.seq_len=5000"))
    assert rec["status"] == "failed"
    assert "calib.seq_len=5000 exceeds the model's max_position_embeddings=4096" in rec["error"]
    job_dir = Path(rec["config"]["runs_dir"]) / rec["sweep"] / f"{rec['job_name']}-{rec['job_id']}"
    assert (job_dir / "error.log").is_file()


def test_unwritable_runs_dir_fails_before_model_work(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    rec = execute(config(tmp_path, f"runs_dir={blocked}"))
    assert rec["status"] == "failed" and f"runs_dir='{blocked}' is a file, not a folder" in rec["error"]


def test_unknown_group_value_gets_did_you_mean():
    out = subprocess.run([sys.executable, "run.py", "method=shortgtp"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "unknown method 'shortgtp'. Did you mean 'shortgpt'?" in out.stderr


@pytest.mark.slow
def test_run_py_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "run.py",
            *FAST,
            f"runs_dir={tmp_path}",
            "prune.n_remove=2",
            "tracker=wandb",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = list(tmp_path.rglob("result.json"))
    assert len(results) == 1
    rec = json.loads(results[0].read_text())
    assert rec["status"] == "ok" and set(TASKS) <= set(rec["metrics"])
    assert list(results[0].parent.rglob("wandb/offline-run-*")), "an offline W&B run is written"


def test_dtype_aliases_are_the_same_job(tmp_path):
    from gradmap.pipeline import Job

    same = {Job.from_config(config(tmp_path, f"dtype={name}")).job_id for name in ("auto", "float32", "fp32")}
    assert len(same) == 1, "on CPU auto means float32, and fp32 is an alias of it"
    assert Job.from_config(config(tmp_path, "dtype=bf16")).job_id != same.pop()


def test_calib_protocol_matched_is_the_default_job_and_native_is_another(tmp_path):
    from gradmap.config import validate
    from gradmap.pipeline import Job

    plain, matched, native = (
        config(tmp_path, *o) for o in ([], ["+calib.protocol=matched"], ["+calib.protocol=native"])
    )
    for cfg in (plain, matched, native):
        validate(cfg)
    assert Job.from_config(plain).job_id == Job.from_config(matched).job_id
    assert Job.from_config(native).job_id != Job.from_config(plain).job_id


def test_eval_loop_lm_eval_is_the_default_job_and_lean_is_another(tmp_path):
    """A sweep keeps one request loop: the lean loop is another job, lm-eval's own loop spelt out is not (so
    results recorded before eval.loop existed keep their ids)."""
    from gradmap.config import validate
    from gradmap.pipeline import Job

    plain, stock, lean = (config(tmp_path, *o) for o in ([], ["+eval.loop=lm_eval"], ["+eval.loop=lean"]))
    for cfg in (plain, stock, lean):
        validate(cfg)
    assert Job.from_config(plain).job_id == Job.from_config(stock).job_id
    assert Job.from_config(lean).job_id != Job.from_config(plain).job_id
    with pytest.raises(ValueError, match=r"eval\.loop"):
        validate(config(tmp_path, "+eval.loop=fast"))
