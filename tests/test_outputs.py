"""What the suite leaves on disk: file modes that follow the umask, and a saved model that says what it is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gradmap.results import atomic_write_json


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask_0022):
    atomic_write_json(tmp_path / "result.json", {"status": "ok"})
    assert mode(tmp_path / "result.json") == 0o644
    os.umask(0o077)
    atomic_write_json(tmp_path / "private.json", {"status": "ok"})
    assert mode(tmp_path / "private.json") == 0o600


ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "model=tiny_llama",
    "method=last_n",
    "prune.n_remove=2",
    "eval=none",
    "tracker=none",
    "calib.n_samples=2",
    "calib.seq_len=32",
    "speed.enabled=false",
]


def config(tmp_path: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*FAST, f"runs_dir={tmp_path}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_saved_model_has_card_and_pruning_record_and_reloads(tmp_path, umask_0022):
    from transformers import AutoModelForCausalLM

    from gradmap.modelcard import read_pruning_record
    from gradmap.pipeline import execute

    rec = execute(config(tmp_path, "save_model=true", f"save_path='{tmp_path}/models/{{job}}'"))
    assert rec["status"] == "ok", rec.get("error")
    result = next(tmp_path.rglob("result.json"))
    assert mode(result) == 0o644, "result.json follows the umask"
    folder = Path(rec["saved_model"])
    assert folder.parent == tmp_path / "models" and folder.name == result.parent.name
    info = read_pruning_record(folder)
    assert info["removed_layers"] == rec["removed_layers"] and sorted(rec["removed_layers"]) == [5, 6]
    assert info["kept_layers"] == [0, 1, 2, 3, 4, 7] and info["base_model"]["name"] == "tiny_llama"
    assert info["reproduce"].startswith("python run.py")
    card = (folder / "README.md").read_text()
    for needle in ("tiny_llama", "last_n", "Repair", "Calibration", "Metrics", "gradmap-bench", "run.py"):
        assert needle in card
    assert all(mode(p) == 0o644 for p in folder.iterdir() if p.is_file())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6


def test_push_to_hub_offline_fails_before_model_work_with_one_line(tmp_path, monkeypatch):
    from gradmap.pipeline import execute

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = execute(config(tmp_path, "save_model=true", "push_to_hub=me/pruned"))
    assert rec["status"] == "failed" and "\n" not in rec["error"]
    assert "push_to_hub='me/pruned' needs internet" in rec["error"]
    assert "n_layers" not in rec, "no model was loaded"


def test_offline_eval_refuses_an_online_task_before_model_work(tmp_path):
    from gradmap.pipeline import execute

    rec = execute(config(tmp_path, "eval=smoke", "eval.tasks=[mmlu]"))
    assert rec["status"] == "failed" and "n_layers" not in rec
    assert "eval task 'mmlu' needs eval=online and internet; offline, the tasks are boolq," in rec["error"]


def test_online_eval_without_internet_fails_before_model_work(tmp_path, monkeypatch):
    from gradmap.pipeline import execute

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = execute(config(tmp_path, "eval=online", "eval.tasks=[mmlu]"))
    assert rec["status"] == "failed" and "n_layers" not in rec
    assert "eval=online (tasks 'mmlu') needs internet" in rec["error"]
