"""Layer surgery must leave a model that stock transformers code runs, saves, reloads and generates with."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gradmap.core.layers import UnsupportedModelError, active_layers, decoder_layers, parameter_count, remove_layers
from tests.conftest import make_calib, make_tiny


def logits_skipping(model, ids, skip: set[int]) -> torch.Tensor:
    """Reference: run the dense model by hand, skipping layers, without any surgery helper."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(h, position_ids=pos)
    mask = None  # sdpa with is_causal when mask is None
    for i, layer in enumerate(inner.layers):
        if i not in skip:
            out = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(h))


def test_pruned_forward_equals_dense_with_layers_skipped():
    model = make_tiny(6)
    ids = make_calib(2, 12)
    with torch.no_grad():
        expected = logits_skipping(model, ids, {1, 4})
        remove_layers(model, [1, 4])
        got = model(input_ids=ids).logits
    assert len(decoder_layers(model)) == 4
    assert model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2, 3]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_parameter_count_is_that_of_a_smaller_model():
    model = make_tiny(6)
    per_layer = parameter_count(model.model.layers[0])
    before = parameter_count(model)
    remove_layers(model, [0, 2, 5])
    assert parameter_count(model) == before - 3 * per_layer
    assert parameter_count(model) == parameter_count(make_tiny(3))


def test_save_reload_gives_identical_logits(tmp_path):
    model = make_tiny(6)
    remove_layers(model, [2, 3])
    ids = make_calib(2, 10)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_generation_with_cache_matches_no_cache_after_pruning():
    model = make_tiny(6)
    remove_layers(model, [0, 5])
    ids = make_calib(1, 8)
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == 14


def test_active_layers_is_temporary_and_matches_removal():
    model = make_tiny(5)
    ids = make_calib(2, 8)
    with torch.no_grad():
        with active_layers(model, [0, 2, 4]):
            inside = model(input_ids=ids).logits
            assert model.config.num_hidden_layers == 3
        assert model.config.num_hidden_layers == 5
        assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == list(range(5))
        remove_layers(model, [1, 3])
        torch.testing.assert_close(model(input_ids=ids).logits, inside, rtol=0, atol=0)


def test_qwen2_layer_types_follow_the_surviving_layers():
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    types = list(model.config.layer_types)
    remove_layers(model, [1])
    assert model.config.layer_types == [types[0], types[2], types[3]]
    ids = torch.randint(0, 64, (1, 6))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 9


def test_unsupported_architecture_names_supported_families():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match=r"model type 'bert' cannot be layer-pruned here: .*no language"):
        decoder_layers(bert)


def test_remove_rejects_bad_indices():
    model = make_tiny(4)
    with pytest.raises(ValueError, match="out of range"):
        remove_layers(model, [4])
    with pytest.raises(ValueError, match="cannot remove all"):
        remove_layers(model, [0, 1, 2, 3])
