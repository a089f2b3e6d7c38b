"""The evidence-chosen GradMAP readings: activation-gradient scores (no weight gradients), the dev check and
refusal of the projection, λ=auto, the mean-only rank-1 P, and the dev split's disjointness."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.layer_replace import LayerReplaceRepair
from gradmap import prune
from gradmap.core.adapters import merge_output_transform
from gradmap.core.calib import dev_windows, window_starts
from gradmap.core.components import calibration_nll
from gradmap.core.layers import decoder_layers, remove_layers
from gradmap.core.projection import mean_rank1_projection
from gradmap.core.stage1 import ACTIVATION_TARGETS, GradMAPSelector
from gradmap.core.stage2 import ProjectionRepair
from tests.conftest import make_calib, make_tiny


def direct_gate_scores(model, ids) -> dict[str, dict[int, float]]:
    """Σ_t|⟨g_t,f_t⟩|, −Σ_t⟨g_t,f_t⟩ and |Σ_t⟨g_t,f_t⟩| by plain autograd on the layer outputs."""
    outs, ins = {}, {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):

        def hook(mod, args, kwargs, out, i=i):
            ins[i] = args[0] if args else kwargs["hidden_states"]
            outs[i] = out[0] if isinstance(out, tuple) else out

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    for h in handles:
        h.remove()
    keys = sorted(outs)
    grads = torch.autograd.grad(loss, [outs[i] for i in keys])
    per_tok = {i: (g * (outs[i] - ins[i]).detach()).sum(-1) for i, g in zip(keys, grads)}
    return {
        "layer_gate_tok": {i: float(v.abs().sum()) for i, v in per_tok.items()},
        "layer_gate_signed": {i: -float(v.sum()) for i, v in per_tok.items()},
        "layer_gate": {i: abs(float(v.sum())) for i, v in per_tok.items()},
    }


@pytest.mark.parametrize("micro", [4, 1])
def test_gate_scores_match_autograd_and_microbatching(micro):
    model, ids = make_tiny(4), make_calib(4, 12)
    expected = direct_gate_scores(model, ids)
    for target, want in expected.items():
        got = GradMAPSelector(grad_target=target, micro_batch_size=micro, protect_first=1).select(model, ids, 1)
        for layer, value in want.items():
            assert got.scores[0][layer] == pytest.approx(value, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("target", ACTIVATION_TARGETS)
def test_activation_scores_request_no_weight_gradient(target):
    model = make_tiny(4)
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda mod, args: seen.append(any(p.requires_grad for p in mod.parameters()))
    )
    GradMAPSelector(grad_target=target, protect_first=1).select(model, make_calib(4, 12), 2)
    handle.remove()
    assert seen and not any(seen)  # no weight required grad during any scored forward (so none in backward)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("micro, one_shot", [(2, False), (4, True), (1, True)])
def test_tok_reading_one_backward_per_decision(monkeypatch, micro, one_shot):
    calls = []
    real_backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: (calls.append(1), real_backward(*a, **k))[1])
    ids = make_calib(4, 8)
    sel = GradMAPSelector(grad_target="layer_gate_tok", micro_batch_size=micro, one_shot=one_shot).select(
        make_tiny(6), ids, 3
    )
    decisions = 1 if one_shot else 3
    assert len(calls) == decisions * (ids.shape[0] // micro) == sel.info["backward_passes"]


def test_signed_layer_gate_warns_without_protection():
    with pytest.warns(UserWarning, match="protect_first"):
        GradMAPSelector(grad_target="layer_gate")
    GradMAPSelector(grad_target="layer_gate", protect_first=1)  # no warning needed (pytest -W error would fail)


def overfit_case():
    """Few rows in a wide stream: 1 window of 10 tokens (10 rows) against d = 96, the fit has 96² unknowns."""
    model = make_tiny(6, hidden_size=96, intermediate_size=192)
    return model, make_calib(1, 10, seed=1), make_calib(4, 24, seed=2)


@pytest.mark.parametrize("options", [{"lambda_rel": "auto"}, {}, {"lambda_rel": 0.0}, {"form": "mean_rank1"}])
def test_projection_never_raises_dev_nll_on_an_overfit_case(options):
    model, calib, dev = overfit_case()
    removed = [2, 3]
    unrepaired = remove_layers(copy.deepcopy(model), removed)
    base = calibration_nll(unrepaired, dev)
    repair = ProjectionRepair(**options)
    repair.dev_ids = dev
    info = repair.apply(model, calib, removed)
    remove_layers(model, removed)
    after = calibration_nll(model, dev)
    assert info["dev_nll_uncompensated"] == pytest.approx(base, abs=1e-5)
    assert after == pytest.approx(info["dev_nll_compensated"], abs=1e-5)
    assert after <= base + 1e-6
    if info["refused"]:
        assert info["dev_choice"] == "none" and "kept P = I" in info["refusal"]


def test_unregularised_fit_overfits_and_is_refused():
    model, calib, dev = overfit_case()
    down = decoder_layers(model)[4].mlp.down_proj.weight.detach().clone()
    repair = ProjectionRepair(lambda_rel=0.0, site="first_after_cut")
    repair.dev_ids = dev
    info = repair.apply(model, calib, [2, 3])
    assert info["site"] == 4
    assert info["nll_rose"] and info["refused"]  # the in-sample fit is exact, dev gets worse: refused
    torch.testing.assert_close(decoder_layers(model)[4].mlp.down_proj.weight, down, rtol=0, atol=0)
    assert repair.diagnostics(model, calib) == {}


def test_auto_without_dev_windows_is_an_error():
    model, calib, _ = overfit_case()
    with pytest.raises(ValueError, match="lambda_rel=auto chooses on dev windows"):
        ProjectionRepair(lambda_rel="auto").apply(model, calib, [2, 3])
    with pytest.raises(ValueError, match="lambda_rel='often'"):
        ProjectionRepair(lambda_rel="often")


def test_mean_rank1_maps_the_input_mean_to_the_target_mean_and_merges_exactly():
    model, ids = make_tiny(6), make_calib(4, 16)
    repair = ProjectionRepair(form="mean_rank1", site="first_after_cut")
    batches = list(torch.split(ids, 1))
    *_, stats = repair.fit(model, batches, [2, 3], site=4)
    p, _ = mean_rank1_projection(stats["mu_x"], stats["mu_y"])
    torch.testing.assert_close(p @ stats["mu_x"], stats["mu_y"], rtol=1e-10, atol=1e-12)
    mu = stats["mu_x"] / stats["mu_x"].norm()
    other = torch.randn(p.shape[0], dtype=torch.float64)
    other -= (other @ mu) * mu
    torch.testing.assert_close(p @ other, other, rtol=1e-10, atol=1e-12)  # identity off the mean direction
    down = decoder_layers(model)[4].mlp.down_proj
    handle = down.register_forward_hook(lambda mod, args, out: out @ p.T.to(out.dtype))
    with torch.no_grad():
        explicit = model(input_ids=ids).logits
    handle.remove()
    merge_output_transform(down, p)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, explicit, rtol=1e-5, atol=1e-5)
    assert down.bias is None


def test_dev_windows_avoid_calibration_windows():
    ids = torch.arange(5000)
    starts = window_starts(ids.numel(), 6, 256, seed=0)
    windows, picks = dev_windows(ids, 4, 300, [(s, 256) for s in starts])
    assert windows.shape == (4, 300)
    for p in picks:
        assert all(p + 300 <= s or s + 256 <= p for s in starts)
    with pytest.raises(ValueError, match="only"):
        dev_windows(ids, 40, 300, [(s, 256) for s in starts])


def test_ppl_plus_keeps_the_first_four_and_last_two():
    result = prune(make_tiny(8), make_calib(2, 8), method="ppl_plus", n_remove=2)
    assert sorted(result.removed_layers) == [4, 5]
    assert result.selector_options["protect_first"] == 4 and result.selector_options["protect_last"] == 2


def test_layer_replace_warns_when_it_trains_on_a_handful_of_windows():
    with pytest.warns(UserWarning, match="not LLM-Streamline's"):
        train, val = LayerReplaceRepair().split(make_calib(4, 8))
    assert train.shape[0] + val.shape[0] == 4


@pytest.mark.parametrize("method", ["gradmap_tok", "gradmap_tok_oneshot"])
def test_swapping_the_repair_drops_the_presets_repair_options(method):
    """gradmap_tok's default repair carries lambda_rel=auto; under repair=none (the ablation's no-repair variant)
    that option must not follow, or the job fails as an unknown key."""
    from gradmap.config import check_components

    cfg = {"method": {"name": method, "options": {}}, "repair": {"name": "none", "options": {}}, "prune": {}, "seed": 0}
    check_components(cfg)
    model = make_tiny(n_layers=4)
    result = prune(model, make_calib(), method=method, n_remove=1, repair="none")
    assert result.repair == "none" and len(decoder_layers(model)) == 3


def test_a_bos_model_gets_bos_in_calibration_dev_and_ppl_windows(monkeypatch):
    """model.bos: true (Gemma) turns on BOS for calibration, dev and perplexity windows, before the job id."""
    import gradmap.splits as splits
    from gradmap.models import with_model_bos

    cfg = {"model": {"name": "m", "bos": True}, "calib": {"add_bos": False}, "eval": {"ppl": {"add_bos": False}}}
    out = with_model_bos(cfg)
    assert out["calib"]["add_bos"] and out["eval"]["ppl"]["add_bos"] and not cfg["calib"]["add_bos"]
    assert with_model_bos({**cfg, "model": {"name": "m"}})["calib"]["add_bos"] is False

    words = list(range(10, 74))

    class Tokenizer:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": words}

    monkeypatch.setattr(splits, "read_text_file", lambda path: "text")
    calib = {"source": "hf_dataset", "add_bos": True, "dev": {"path": "x", "n_samples": 2, "seq_len": 8}}
    windows, info = splits.dev_split(calib, Tokenizer())
    assert info["add_bos"] and windows.shape == (2, 8) and (windows[:, 0] == 7).all()
    assert windows[0, 1:].tolist() == words[:7]
    Tokenizer.bos_token_id = None  # asked for BOS, none to give: an error, not windows silently without it
    with pytest.raises(ValueError, match="tokenizer has no bos_token_id"):
        splits.dev_split(calib, Tokenizer())


def test_sleb_native_rows_sampler_cuts_consecutive_windows_of_shuffled_rows(monkeypatch):
    """calib.sampling=rows (SLEB's reference loader): n_samples *rows*, shuffled by seed, joined with blank lines,
    cut into floor(tokens / seq_len) consecutive windows; a dev split of the same file is refused in one line."""
    import gradmap.splits as splits
    from gradmap.core.calib import CalibrationError, row_windows

    class Tokenizer:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(w) for w in text.split()]}

    rows = [f"{10 * i} {10 * i + 1} {10 * i + 2}" for i in range(20)]  # 3 tokens per row
    windows = row_windows(Tokenizer(), rows, n_rows=5, seq_len=4, seed=3)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()[:5]
    stream = [t for i in order for t in (10 * i, 10 * i + 1, 10 * i + 2)]
    assert windows.shape == (3, 4) and windows.flatten().tolist() == stream[:12]
    with pytest.raises(CalibrationError, match="fewer than one window"):
        row_windows(Tokenizer(), rows, n_rows=1, seq_len=8)
    monkeypatch.setattr(splits, "read_text_file", lambda path: "\n".join(rows))
    same = {
        "source": "file",
        "path": "a.txt",
        "sampling": "rows",
        "dev": {"path": "a.txt", "n_samples": 1, "seq_len": 4},
    }
    with pytest.raises(ValueError, match="cannot keep dev clear of the sampled rows"):
        splits.dev_split({**same, "n_samples": 5, "seq_len": 4, "seed": 0}, Tokenizer())
