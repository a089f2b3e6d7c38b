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


def test_cuda_oom_in_evaluation_gives_eval_advice(monkeypatch):
    """An OOM inside lm-eval or perplexity names eval.batch_size, not the pruning settings (the Gemma reference jobs
    on a shared H200 were told to lower prune.micro_batch_size for an OOM in lm-eval's logits)."""
    from gradmap.eval import harness

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.05 GiB")

    monkeypatch.setattr(harness, "_run_ppl", out_of_memory)
    ppl = {"dataset": "wikitext2", "window": 16, "stride": None, "max_windows": 1, "add_bos": False}
    cfg = {"name": "ppl_only", "tasks": [], "batch_size": 16, "source": "local", "ppl": ppl}
    model = torch.nn.Linear(2, 2)
    with pytest.raises(harness.EvalOutOfMemory) as caught:
        harness.evaluate(model, None, cfg)
    message = one_line_error(caught.value)
    assert "eval.batch_size=16" in message and "prune.micro_batch_size" not in message and "\n" not in message
    assert model.training  # the train/eval mode is restored on the way out


def test_a_gguf_model_that_an_old_transformers_converts_wrongly_is_refused_before_loading(tmp_path, monkeypatch):
    """transformers 5.17 builds Gemma 3's GGUF tokenizer wrongly (dense PPL 109 instead of 22): refuse it by version
    in one line; and a converted cache is kept per transformers version, because one version's cache read by
    another was wrong too (PPL 1355)."""
    from gradmap import models

    need = models.GGUF_PACKAGES["gemma3_270m"].min_transformers
    with pytest.raises(ValueError, match=rf"'gemma3_270m' needs transformers>={need} \(installed 5\.17\.0"):
        models.check_gguf_transformers("gemma3_270m", installed="5.17.0")
    models.check_gguf_transformers("gemma3_270m", installed=need)  # the first good version passes
    models.check_gguf_transformers("smollm2_135m", installed="5.17.0")  # SmolLM2 scores the same on 5.17
    monkeypatch.setenv("GRADMAP_CACHE", str(tmp_path))
    monkeypatch.setattr(models.transformers, "__version__", "5.17.0")
    old = models.model_cache_dir("gemma3_270m")
    monkeypatch.setattr(models.transformers, "__version__", need)
    assert models.model_cache_dir("gemma3_270m") != old and old.parent == tmp_path / "models"
