"""Beyond one device: accelerate-dispatched models run every method path, placement and eval settings are checked
before any model work, and offloaded weights refuse gradient scores and merges with one line."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from gradmap import prune
from gradmap.core.layers import decoder_layers
from gradmap.eval.harness import check_eval_config, resolve_batch_size
from gradmap.models import placement_kwargs
from tests.conftest import make_calib, make_tiny


def layerwise_map(n_layers: int, offloaded: set[int]) -> dict[str, str]:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("disk" if i in offloaded else "cpu") for i in range(n_layers)})
    return device_map


def test_forward_only_selector_on_a_disk_offloaded_model_matches_the_resident_one(tmp_path):
    """ShortGPT with layers 1-4 on disk (weights brought in one layer at a time per forward) removes the same
    layers with the same scores as on the plain model."""
    calib = make_calib(4, 16)
    plain = prune(make_tiny(6), calib, "shortgpt", n_remove=2)
    model = dispatch_model(make_tiny(6), layerwise_map(6, {1, 2, 3, 4}), main_device="cpu", offload_dir=str(tmp_path))
    assert model.model.layers[2].self_attn.q_proj.weight.device.type == "meta"
    offloaded = prune(model, calib, "shortgpt", n_remove=2)
    assert offloaded.removed_layers == plain.removed_layers
    for a, b in zip(offloaded.scores[0].values(), plain.scores[0].values()):
        assert a == pytest.approx(b, rel=1e-5)
    assert len(decoder_layers(model)) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib).logits, plain.model(input_ids=calib).logits)


def test_dispatched_model_runs_gradmap_and_the_projection_like_the_plain_one():
    """A dispatched (hooked, cpu-mapped) model gives GradMAP's removed layers and merged weights exactly."""
    calib = make_calib(4, 16)
    plain = prune(make_tiny(6), calib, "gradmap", n_remove=2, micro_batch_size=2)
    model = dispatch_model(make_tiny(6), layerwise_map(6, set()), main_device="cpu")
    assert getattr(model, "hf_device_map", None)
    hooked = prune(model, calib, "gradmap", n_remove=2, micro_batch_size=2)
    assert hooked.removed_layers == plain.removed_layers
    assert hooked.repair_info["site"] == plain.repair_info["site"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib).logits, plain.model(input_ids=calib).logits)


def test_offloaded_weights_refuse_gradient_scores_and_merges(tmp_path):
    calib = make_calib(2, 16)
    model = dispatch_model(make_tiny(4), layerwise_map(4, {1, 2}), main_device="cpu", offload_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"gradient scores need every scored weight resident.*offloaded"):
        prune(model, calib, "gradmap_s1", n_remove=1)
    model = dispatch_model(
        make_tiny(4), layerwise_map(4, {0, 1, 2, 3}), main_device="cpu", offload_dir=str(tmp_path / "b")
    )
    with pytest.raises(ValueError, match=r"cannot merge into .*offloaded"):
        prune(model, calib, "shortgpt", n_remove=1, repair="projection")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"source": "hub", "device_map": "everywhere"}, "device_map='everywhere' is not allowed"),
        ({"source": "hub", "max_memory": {"cpu": "1GiB"}}, "need a device_map"),
        ({"source": "hub", "device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, "max_memory key 'gpu0'"),
        ({"source": "hub", "device_map": "auto", "max_memory": {"cpu": "lots"}}, r"max_memory\['cpu'\]='lots'"),
        ({"source": "gguf", "device_map": "auto"}, "device_map is for hub models only"),
    ],
)
def test_bad_placement_fails_in_one_line(spec, match):
    with pytest.raises(ValueError, match=match):
        placement_kwargs({"name": "m", **spec}, torch.device("cpu"))


def test_good_placement_passes_through():
    spec = {"source": "hub", "device_map": "auto", "max_memory": {"cpu": "4GiB"}, "offload_folder": "/tmp/x"}
    assert placement_kwargs(spec, torch.device("cpu")) == {
        "device_map": "auto",
        "max_memory": {"cpu": "4GiB"},
        "offload_folder": "/tmp/x",
    }
    assert placement_kwargs({"source": "hub"}, torch.device("cpu")) == {}


def test_eval_batch_size_auto_and_bad_settings():
    assert resolve_batch_size("auto") == "auto" and resolve_batch_size("auto:4") == "auto:4"
    assert resolve_batch_size(8) == 8
    for bad, match in (
        ({"batch_size": 0}, "eval.batch_size=0"),
        ({"batch_size": "big"}, "eval.batch_size='big'"),
        ({"tasks": ["boolq"], "limit": {"piqa": 3}}, "eval.limit names"),
        ({"ppl": {"window": 1}}, "eval.ppl.window=1"),
        ({"ppl": {"max_windows": "all"}}, "eval.ppl.max_windows='all'"),
        ({"source": "web"}, "unknown eval.source 'web'"),
        ({"tasks": ["mmlu"]}, "mmlu"),
    ):
        with pytest.raises(ValueError, match=match):
            check_eval_config({"name": "x", **bad})


def test_bad_eval_setting_fails_before_the_model_loads(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import gradmap.pipeline as pipeline
    from gradmap.paths import REPO_ROOT

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the eval config was checked")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    overrides = ["model=tiny_llama", "eval=smoke", "eval.batch_size=-2", f"runs_dir={tmp_path}", "tracker=none"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    out = pipeline.execute(cfg)
    assert out["status"] == "failed" and "eval.batch_size=-2" in out["error"]
