"""Layerwise onloading (gradmap/core/onload.py): forward-only selectors scored one decoder layer at a time give the
normal forward's scores exactly, on plain and on accelerate cpu/disk-offloaded models (each offloaded weight read
once, not once per micro-batch), across layouts; selectors that need the whole model refuse in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import accelerate.hooks
import pytest
import torch
from accelerate import cpu_offload, dispatch_model

from baselines._common import stream_statistic, token_cosine
from gradmap import prune
from gradmap.config import ConfigError, check_components
from gradmap.core.layers import decoder_layers
from gradmap.core.onload import layerwise_states
from tests.conftest import make_calib, make_tiny, plant_identity
from tests.test_placement import layerwise_map

pytestmark = pytest.mark.filterwarnings("ignore:.*edge layer:UserWarning")
ROOT = Path(__file__).resolve().parents[1]


def planted(n_layers: int = 6):
    model = make_tiny(n_layers)
    plant_identity(model, 3)
    return model


@pytest.mark.parametrize("method", ["shortgpt", "angular", "streamline_noheal"])
def test_layerwise_scores_equal_the_full_forward_bit_for_bit(method):
    """Same removed layers and the very same fp64 means (CPU, fp32), micro-batches of 2 over 6 windows."""
    calib = make_calib(6, 16)
    full = prune(planted(), calib, method, n_remove=2, micro_batch_size=2)
    lw = prune(planted(), calib, method, n_remove=2, micro_batch_size=2, onload="layerwise")
    assert lw.removed_layers == full.removed_layers
    assert lw.scores == full.scores
    assert lw.selector_info["onload"] == "layerwise" and lw.selector_info["onload_device"] == "cpu"
    assert lw.selector_info["forward_passes"] == full.selector_info["forward_passes"] == 3
    assert lw.selector_options["onload"] == "layerwise" and full.selector_options["onload"] == "none"
    if method == "shortgpt":
        assert 3 in lw.removed_layers  # the planted identity layer has zero block influence


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text", "falcon", "bloom", "gpt2", "opt", "phi"])
def test_layer_replay_matches_the_forward_across_layouts(model_type):
    """Per-layer masks (sliding windows), two rotary bases, ALiBi, tuple returns, positional arguments, the OPT
    stack path and a parallel block: the recorded per-layer arguments reproduce the normal forward exactly."""
    from tests.test_families import build, ids

    model = build(model_type)
    x = ids(4, 12)
    pairs = {layer: (layer, layer + 1) for layer in range(4)} | {10: (0, 3), 11: (1, 4)}
    full, calls, _ = stream_statistic(model, x, 2, pairs, token_cosine, "full")
    lw, lw_calls, info = stream_statistic(model, x, 2, pairs, token_cosine, "lw", onload=torch.device("cpu"))
    assert lw == full and calls == lw_calls == 2
    assert info["onloaded_bytes"] == 0  # already on the compute device: nothing moved


def _count_loads(monkeypatch) -> list[str]:
    """Every tensor accelerate's hooks bring off meta (names), to count offload-map reads."""
    loads: list[str] = []
    real = accelerate.hooks.set_module_tensor_to_device

    def spy(module, name, device, *args, **kwargs):
        if str(device) != "meta":
            loads.append(name)
        return real(module, name, device, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks, "set_module_tensor_to_device", spy)
    return loads


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def on_disk(folder: Path) -> torch.nn.Module:
    """The planted 6-layer model with layers 1-4 offloaded to disk (the rest resident on the CPU)."""
    return dispatch_model(planted(), layerwise_map(6, {1, 2, 3, 4}), main_device="cpu", offload_dir=str(folder))


def test_disk_offloaded_map_scores_layerwise_reading_each_weight_once(tmp_path, monkeypatch):
    """Layers 1-4 on disk: the layerwise run removes the same layers with the same scores as the plain model,
    reads each offloaded weight once (the normal path reads it once per micro-batch) and leaves it offloaded."""
    calib = make_calib(4, 16)
    plain = prune(planted(), calib, "shortgpt", n_remove=2)
    model = on_disk(tmp_path)
    offloaded = [p for i in (1, 2, 3, 4) for p in decoder_layers(model)[i].parameters()]
    loads = _count_loads(monkeypatch)
    result = prune(model, calib, "shortgpt", n_remove=2, onload="layerwise")
    assert result.removed_layers == plain.removed_layers
    assert result.scores[0] == pytest.approx(plain.scores[0], rel=1e-6, abs=1e-9)
    assert len(loads) == len(offloaded) == 36  # 4 layers x (7 linears + 2 norms), each read once
    assert result.selector_info["onloaded_bytes"] == _bytes(offloaded)
    kept = [i for i in range(6) if i not in result.removed_layers]
    assert decoder_layers(model)[kept.index(2)].self_attn.q_proj.weight.device.type == "meta"
    again = on_disk(tmp_path / "again")
    loads.clear()
    prune(again, calib, "shortgpt", n_remove=2)
    assert len(loads) == 4 * 36  # the normal path: once per micro-batch (4 windows, micro-batch 1)
    with torch.no_grad():  # the pruned, still offloaded model runs its normal forward like the plain one
        torch.testing.assert_close(model(input_ids=calib).logits, plain.model(input_ids=calib).logits)


def test_cpu_offloaded_model_scores_layerwise_like_the_plain_one(monkeypatch):
    """accelerate.cpu_offload (weights in a CPU state dict, meta in the model): same scores, and each weight of the
    body (embeddings, layers, final norm) read once."""
    calib = make_calib(4, 16)
    plain = prune(planted(), calib, "angular", n_remove=2)
    model = cpu_offload(planted(), execution_device=torch.device("cpu"))
    body = list(model.model.parameters())
    layer_bytes = _bytes(p for layer in decoder_layers(model) for p in layer.parameters())
    loads = _count_loads(monkeypatch)
    result = prune(model, calib, "angular", n_remove=2, onload="layerwise")
    assert result.removed_layers == plain.removed_layers
    assert result.scores[0] == pytest.approx(plain.scores[0], rel=1e-6, abs=1e-9)
    assert len(loads) == len(body)
    assert result.selector_info["onloaded_bytes"] == layer_bytes > 0


@pytest.mark.parametrize(
    ("method", "needs"),
    [
        ("gradmap", "gradients"),
        ("taylor", "gradients"),
        ("ppl", "each layer left out"),
        ("sleb", "blocks left out"),
        ("blockpruner", "branches left out"),
        ("laco", "layers merged"),
        ("mka", "layers merged"),
    ],
)
def test_selectors_that_need_the_whole_model_refuse_layerwise_in_one_line(method, needs):
    with pytest.raises(ValueError, match=rf"selector '{method}' cannot use onload='layerwise': it needs ") as err:
        prune(make_tiny(4), make_calib(2, 8), method, n_remove=1, onload="layerwise")
    message = str(err.value)
    assert needs in message and "whole model" in message and "\n" not in message
    assert "supports angular, last_n, random, shortgpt, streamline" in message
    cfg = {"method": {"name": method, "options": {"onload": "layerwise"}}, "repair": {}, "prune": {}, "seed": 0}
    with pytest.raises(ConfigError, match=r"method.options: selector .* cannot use onload='layerwise'.*supports"):
        check_components(cfg)


def test_bad_onload_settings_fail_in_one_line():
    with pytest.raises(ValueError, match=r"onload='sometimes' is not allowed; choose one of \['none', 'layerwise'\]"):
        prune(make_tiny(4), make_calib(2, 8), "shortgpt", n_remove=1, onload="sometimes")
    with pytest.raises(ValueError, match=r"onload_device='abacus' is not a device"):
        prune(make_tiny(4), make_calib(2, 8), "shortgpt", n_remove=1, onload="layerwise", onload_device="abacus")
    cfg = {"method": {"name": "last_n", "options": {"onload": "layerwise"}}, "repair": {}, "prune": {}, "seed": 0}
    check_components(cfg)  # runs no forward: nothing to onload, accepted


def test_a_forward_that_changes_the_stream_between_layers_is_refused():
    """Replaying layers alone would skip what the body does between them, so that is an error, not a wrong score."""
    model = make_tiny(4)
    decoder_layers(model)[2].register_forward_pre_hook(lambda mod, args: (args[0] * 2.0, *args[1:]))
    with pytest.raises(ValueError, match=r"changes the hidden states between decoder layers 1 and 2"):
        next(layerwise_states(model, make_calib(2, 8), 1, torch.device("cpu")))


def test_layerwise_warm_up_and_repeats_run():
    calib = make_calib(4, 16)
    result = prune(planted(), calib, "shortgpt", n_remove=1, onload="layerwise", warm_up=True, repeats=2)
    assert result.removed_layers == [3] and result.timings["repeats_same_layers"]


def test_onload_script_runs_at_a_tiny_shape_on_the_cpu(tmp_path):
    """scripts/onload_run.py end to end on the CPU (tiny arch): every path removes the same layers."""
    out = tmp_path / "onload.json"
    cmd = [sys.executable, str(ROOT / "scripts/onload_run.py"), "--arch", "tiny", "--device", "cpu"]
    cmd += ["--dtype", "float32", "--n-samples", "4", "--seq-len", "16", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["same_removed_layers"] is True and record["same_scores"] is True
    assert set(record["paths"]) == {"resident", "layerwise", "offload", "offload_layerwise"}
    assert record["paths"]["layerwise"]["onload"] == "layerwise"
