"""Bad input and faults: each gets one line that names the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from gradmap.core.calib import CalibrationError, sample_windows
from gradmap.core.components import METHODS, REPAIRS
from gradmap.models import load_model, resolve_device
from gradmap.paths import read_text_file
from gradmap.pipeline import one_line_error


def test_unknown_registry_names_suggest_the_closest():
    with pytest.raises(ValueError, match=r"unknown method 'gradmpa'\. Did you mean 'gradmap'"):
        METHODS.get("gradmpa")
    with pytest.raises(ValueError, match=r"unknown repair 'projecton'\. Did you mean 'projection'"):
        REPAIRS.get("projecton")


def test_cuda_oom_message_gives_micro_batch_advice():
    message = one_line_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert "prune.micro_batch_size" in message and "\n" not in message


def test_unavailable_cuda_is_named():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device='cuda' requested but CUDA is not available"):
        resolve_device("cuda")


def test_missing_calibration_file_says_how_to_restore(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        read_text_file(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"convert_data\.py"):
        read_text_file("data/wikitext2/not-there.tokens")


def test_calibration_too_short_names_the_sizes():
    with pytest.raises(CalibrationError, match="10 tokens, too short for windows of 64 tokens"):
        sample_windows(torch.arange(10), 2, 64, seed=0)


def test_hub_model_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = {"name": "llama2_7b", "source": "hub", "hub_id": "meta-llama/Llama-2-7b-hf", "trust_remote_code": False}
    with pytest.raises(OSError, match="hub models need internet access"):
        load_model(spec, torch.device("cpu"))


def test_trust_remote_code_is_off_in_every_hub_config():
    from pathlib import Path

    from omegaconf import OmegaConf

    for path in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"):
        cfg = OmegaConf.load(path)
        if cfg.source == "hub":
            assert cfg.trust_remote_code is False, path.name
