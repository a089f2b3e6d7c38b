"""Any decoder-only family, by structure: tiny random-init models from transformers' own config classes (no files).

For each family a cheap representative set of methods removes layers through ``prune()``; the pruned model must
run forward, generate with a KV cache exactly as without one, and reload from ``save_pretrained`` with identical
logits. Every selector runs on three families of different layouts. Families whose MLP output is normalised
before the residual add (Gemma 2/3, OLMo 2) get the projection in its diagonal form, merged into that norm; a
post-normed layout without a known norm refuses with one line; encoder-decoders, MoE and hybrid state-space stacks
refuse pruning with one line.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gradmap import prune
from gradmap.core.adapters import (
    LAYOUTS,
    UnsupportedModelError,
    _detect_layout,
    adapter,
    merge_diagonal,
    merge_output_transform,
    mlp_merge_target,
    residual_gain,
)
from gradmap.core.layers import active_layers, decoder_layers

pytestmark = pytest.mark.filterwarnings("ignore:.*edge layer:UserWarning")
V, D, L = 96, 32, 4
SIZES = {
    "vocab_size": V,
    "hidden_size": D,
    "intermediate_size": 2 * D,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": L,
    "head_dim": D // 4,
    "max_position_embeddings": 64,
}
# model_type -> extra config (a layout feature each family brings)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},  # per-layer layer_types
    "qwen3": {},  # q_norm/k_norm inside attention
    "gemma": {},  # embedding scale, tied embeddings
    "gemma2": {"sliding_window": 8},  # four norms per block, post-branch norms, soft-capping
    "gemma3_text": {"sliding_window": 8},  # layer_types schedule, two rotary bases
    "phi": {},  # parallel attention + MLP, partial rotary, biases, LayerNorm
    "phi3": {"pad_token_id": 0},  # fused qkv / gate_up projections
    "gpt_neox": {"use_parallel_residual": True},  # stack at gpt_neox.layers, parallel residual
    "gpt2": {"n_embd": D, "n_head": 4, "n_layer": L, "n_inner": 2 * D, "n_positions": 64},  # Conv1D, transformer.h
    "opt": {"ffn_dim": 2 * D, "word_embed_proj_dim": D},  # model.decoder.layers, MLP linears on the block
    "falcon": {"new_decoder_architecture": False, "parallel_attn": True, "num_kv_heads": 1},
    "stablelm": {"use_parallel_residual": False, "partial_rotary_factor": 0.25},
    "olmo": {},  # non-parametric LayerNorm
    "olmo2": {},  # post-branch norms only
    "granite": {"residual_multiplier": 0.5, "embedding_multiplier": 2.0},  # scaled branch outputs
    "cohere": {"pad_token_id": 0},  # parallel block, one norm
    "starcoder2": {},  # biases, LayerNorm, c_proj
    "smollm3": {"pad_token_id": 0, "no_rope_layer_interval": 2},  # no_rope_layers per-layer list
    "bloom": {"n_head": 4, "n_layer": L},  # ALiBi, self_attention.dense
    "gpt_bigcode": {"n_embd": D, "n_head": 4, "n_layer": L, "n_inner": 2 * D, "n_positions": 64},  # MQA
}
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}  # MLP output is normalised before the residual add


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    defaults = AutoConfig.for_model(model_type)
    known = {k: v for k, v in SIZES.items() if hasattr(defaults, k) or k in getattr(defaults, "attribute_map", {})}
    kwargs = {**known, **FAMILIES[model_type], "tie_word_embeddings": model_type in ("gemma", "gpt2")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(defaults, key, None), int) and getattr(defaults, key) >= V:
            kwargs.setdefault(key, 1)
    if model_type == "falcon":
        kwargs.pop("head_dim", None)  # derived from hidden_size / heads
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def ids(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def check_pruned_model(model: torch.nn.Module, n_left: int, tmp_path) -> None:
    """Forward runs, cached generation equals uncached, save -> reload gives identical logits."""
    x = ids(2, 10, seed=1)
    assert len(decoder_layers(model)) == n_left == model.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert torch.isfinite(logits).all()
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(x[:1], use_cache=True, **gen)
    uncached = model.generate(x[:1], use_cache=False, **gen)
    assert torch.equal(cached, uncached) and cached.shape[1] == 14
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert len(decoder_layers(reloaded)) == n_left
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_prunes_runs_generates_and_reloads(model_type, tmp_path):
    model = build(model_type)
    adapt = adapter(model)
    assert len(adapt.layers) == L
    assert not adapt.generic, f"{model_type} should be in the layout table"
    result = prune(model, ids(), "gradmap", n_remove=1)  # weight-gradient stage 1 + projection stage 2
    assert result.repair_info["merge_form"] == ("diagonal" if model_type in POST_NORM else "full")
    assert result.repair_info["mse_after"] < result.repair_info["mse_before"]
    assert result.params_after < result.params_before
    prune(model, ids(), "shortgpt", n_remove=1)
    check_pruned_model(model, L - 2, tmp_path)


@pytest.mark.parametrize("model_type", sorted(t for t in FAMILIES if t in LAYOUTS))
def test_generic_detection_agrees_with_the_layout_table(model_type):
    model = build(model_type)
    adapt = adapter(model)
    found = _detect_layout(adapt.layers[0], D, model_type)
    table = LAYOUTS[model_type]
    assert (found.attn_out, found.mlp_out) == (table.attn_out, table.mlp_out)


ALL_SELECTOR_METHODS = ["angular", "gradmap_s1", "last_n", "ppl", "random", "shortgpt", "sleb", "streamline", "taylor"]


@pytest.mark.parametrize("model_type", ["gpt2", "phi", "olmo2"])
def test_every_selector_on_other_layouts(model_type, tmp_path):
    for method in ALL_SELECTOR_METHODS:
        model = build(model_type)
        result = prune(model, ids(), method, n_remove=1)
        assert len(result.removed_layers) == 1
        assert len(decoder_layers(model)) == L - 1
    check_pruned_model(model, L - 1, tmp_path)


def test_residual_gain_is_measured_per_layout():
    """c = 1 for pre-norm blocks, Granite's residual_multiplier, and None where a norm follows the branch."""
    x = ids(1, 8)
    for model_type, expected in (("llama", 1.0), ("phi", 1.0), ("granite", 0.5), ("gemma2", None), ("olmo2", None)):
        adapt = adapter(build(model_type))
        gain = residual_gain(adapt, 1, adapt.mlp_out(adapt.layers[1]), x)
        assert gain == pytest.approx(expected, rel=1e-6) if expected is not None else gain is None, model_type


def test_residual_gain_of_a_post_branch_norm_in_bf16_beside_a_large_residual():
    """Gemma 3 in bf16 with a residual stream ~1000x the branch output (as at some of Gemma 3 270M's layers): the
    block output is still exactly residual + norm output, so the gain is 1, not a refusal caused by rounding of
    the residual add (the probe's step is scaled to the stream; a doubled branch drowned in bf16 rounding)."""
    model = build("gemma3_text").to(torch.bfloat16)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1000.0)
    adapt = adapter(model)
    norm = adapt.layers[1].post_feedforward_layernorm
    assert residual_gain(adapt, 1, norm, ids(1, 8)) == pytest.approx(1.0, abs=0.03)
    assert residual_gain(adapt, 1, adapt.mlp_out(adapt.layers[1]), ids(1, 8)) is None  # normalised: no gain


def test_merge_output_transform_on_conv1d_and_linear():
    """Both storage conventions: after the merge the linear's output is exactly P·(old output)."""
    for model_type in ("gpt2", "llama"):
        adapt = adapter(build(model_type))
        linear = adapt.mlp_out(adapt.layers[0])
        width = linear.weight.shape[-1] if model_type == "gpt2" else linear.weight.shape[0]
        inp = torch.randn(5, linear.weight.shape[0] if model_type == "gpt2" else linear.weight.shape[1])
        p = torch.eye(width, dtype=torch.float64) + 0.1 * torch.randn(width, width, dtype=torch.float64)
        with torch.no_grad():
            before = linear(inp).double()
            merge_output_transform(linear, p)
            torch.testing.assert_close(linear(inp).double(), before @ p.T, rtol=1e-5, atol=1e-5)


def test_per_layer_config_lists_follow_removal_and_active_layers():
    model = build("smollm3")
    fields = adapter(model).per_layer_fields()
    assert "no_rope_layers" in fields and "layer_types" in fields
    with active_layers(model, [0, 2]):
        assert model.config.no_rope_layers == [fields["no_rope_layers"][i] for i in (0, 2)]
    assert model.config.no_rope_layers == fields["no_rope_layers"]


@pytest.mark.parametrize(
    ("model_type", "why"),
    [
        ("t5", "encoder-decoder"),
        ("mixtral", "mixture-of-experts"),
        ("qwen3_moe", "mixture-of-experts"),
        ("falcon_h1", "'mamba' mixer"),
    ],
)
def test_refused_families_say_why_in_one_line(model_type, why):
    config = AutoConfig.for_model(model_type)
    if model_type == "t5":
        from transformers import T5ForConditionalGeneration

        kwargs = {"vocab_size": V, "d_model": D, "d_ff": 2 * D, "num_layers": 2, "num_heads": 4, "d_kv": 8}
        model = T5ForConditionalGeneration(AutoConfig.for_model(model_type, **kwargs))
    else:
        known = {k: v for k, v in SIZES.items() if hasattr(config, k)}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **known))
    with pytest.raises(UnsupportedModelError, match=f"model type '{model_type}' cannot be layer-pruned here: .*{why}"):
        decoder_layers(model)


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
def test_diagonal_merge_into_the_post_mlp_norm_is_exact(model_type):
    """Gemma's norm scales by (1 + w), OLMo 2's by w: either way the merged norm outputs exactly s ⊙ (old output)."""
    adapt = adapter(build(model_type))
    target = mlp_merge_target(adapt, 1, ids(1, 8))
    assert target.form == "diagonal" and target.offset == (1.0 if model_type == "gemma2" else 0.0)
    x = torch.randn(2, 5, D)
    s = 1 + 0.3 * torch.randn(D, dtype=torch.float64)
    with torch.no_grad():
        before = target.module(x).double()
        merge_diagonal(target, s)
        torch.testing.assert_close(target.module(x).double(), before * s, rtol=1e-5, atol=1e-6)


def test_post_normed_layout_without_a_known_norm_refuses_projection(monkeypatch):
    import gradmap.core.adapters as adapters

    monkeypatch.setitem(adapters.LAYOUTS, "gemma2", adapters.LAYOUTS["llama"])
    with pytest.raises(ValueError, match="model type 'gemma2' the block output is not linear in the MLP output"):
        prune(build("gemma2"), ids(), "shortgpt", n_remove=1, repair="projection")


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
def test_projection_chosen_on_dev_windows_on_a_post_normed_layout(model_type):
    """The dev check (lambda_rel=auto, refuse_worse) restores and re-merges a post-branch norm, which has no bias:
    the path every pipeline job with calib.dev takes (it failed on Gemma 3 270M with an AttributeError)."""
    model = build(model_type)
    result = prune(model, ids(), "gradmap", n_remove=1, repair_options={"lambda_rel": "auto"}, dev_ids=ids(2, 12, 5))
    assert result.repair_info["merge_form"] == "diagonal"
    assert result.repair_info["dev_choice"] in {*result.repair_info["dev_grid"], "none"}
    assert result.repair_info["dev_nll_compensated"] <= result.repair_info["dev_nll_uncompensated"]
