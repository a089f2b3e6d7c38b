"""MKA, BlockPruner, LaCo, Prune&Comp and LinearPatch on a tiny seeded Llama: formulas, planted redundancy, passes.

Reference values are computed plainly here (hooks, hand-built merged weights, hand-zeroed branches), never by
calling the code under test for the value it is checked against.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.linearpatch import LinearPatchRepair, hadamard, runs
from baselines.mka import nmi
from gradmap import SELECTORS, prune
from gradmap.core.layers import remove_layers
from gradmap.models import tiny_llama
from tests.conftest import make_calib, plant_identity

L = 8
K = 3  # planted identity layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def calib() -> torch.Tensor:
    return make_calib(4, 16, seed=0)  # the same windows as tests/test_baselines.py


def build(tied: bool) -> nn.Module:
    model = tiny_llama(seed=0, vocab_size=256, num_hidden_layers=L)
    if tied:  # as SmolLM2: the output head shares the embedding matrix
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@functools.cache
def _state(trained: bool, tied: bool) -> dict[str, torch.Tensor]:
    model = build(tied)
    if trained:  # in a random-init model removing layers can lower the loss; train so that every layer helps
        ids = calib()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(30):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny(trained: bool = False, tied: bool = False) -> nn.Module:
    model = build(tied)
    model.load_state_dict(_state(trained, tied))
    return model.eval()


def planted(k: int = K) -> nn.Module:
    model = tiny(trained=True)
    plant_identity(model, k)
    return model


def nll(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def zero_branch(layer: nn.Module, branch: str):
    """A hook that replaces a branch's output by zeros (the plain way to switch it off)."""
    module = layer.self_attn if branch == "attn" else layer.mlp
    if branch == "attn":
        return module.register_forward_hook(lambda m, a, o: (torch.zeros_like(o[0]), *o[1:]))
    return module.register_forward_hook(lambda m, a, o: torch.zeros_like(o))


# -- planted redundancy ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mka", "blockpruner"])
def test_planted_identity_layer_goes_first(name):
    selection = SELECTORS.get(name)().select(planted(), calib(), 1)
    assert selection.removed == [K] and selection.partial == {}


def test_blockpruner_removes_both_units_of_the_identity_layer_first():
    selection = SELECTORS.get("blockpruner")().select(planted(), calib(), 1)
    assert selection.info["units_removed"] == [f"{K}.attn", f"{K}.mlp"]


# -- BlockPruner -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_blockpruner_scores_are_nll_with_the_branch_zeroed(prefix_cache):
    model, ids = tiny(trained=True), calib()
    selection = SELECTORS.get("blockpruner")(prefix_cache=prefix_cache).select(model, ids, 1)
    first = selection.scores[0]
    assert len(first) == 2 * L
    for layer, branch in [(0, "attn"), (5, "mlp"), (7, "attn")]:
        handle = zero_branch(model.model.layers[layer], branch)
        want = nll(model, ids)
        handle.remove()
        assert first[2 * layer + (branch == "mlp")] == pytest.approx(want, rel=1e-5)
    best = min(first, key=lambda k: (first[k], k % 2, k // 2))
    assert selection.info["units_removed"][0] == f"{best // 2}.{'mlp' if best % 2 else 'attn'}"


def test_blockpruner_pass_counts_and_pool():
    ids = calib()
    full = SELECTORS.get("blockpruner")(prefix_cache=False).select(tiny(), ids, 1)
    assert full.info["calib_passes"] == 2 * L + (2 * L - 1)  # two steps: 16 then 15 candidates
    assert full.info["forward_passes"] == full.info["calib_passes"] * ids.shape[0]
    pooled = SELECTORS.get("blockpruner")(search_pool=4, prefix_cache=False).select(tiny(), ids, 1)
    assert pooled.info["calib_passes"] == 4 + 3 and len(pooled.info["search_pool"]) == 4
    assert pooled.info["forward_passes"] == (1 + 7) * ids.shape[0]  # + the influence forward
    with pytest.raises(ValueError, match="search_pool=1 is smaller than the 2 units"):
        SELECTORS.get("blockpruner")(search_pool=1).select(tiny(), ids, 1)


def test_blockpruner_half_layers_are_exact_generate_and_refuse_save(tmp_path):
    ids = calib()
    model = tiny()
    result = prune(model, ids, method="blockpruner", n_remove=2)
    assert result.removed_units == 4 == 2 * len(result.removed_layers) + len(result.partial_layers)
    # the same model built by hand: zero the branches of the partial layers, drop the removed layers
    ref = tiny()
    handles = [zero_branch(ref.model.layers[i], b) for i, b in result.partial_layers.items()]
    ref.model.layers = nn.ModuleList([m for i, m in enumerate(ref.model.layers) if i not in result.removed_layers])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    for h in handles:
        h.remove()
    with torch.no_grad():
        out = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        x = ids[:1, :4]
        for _ in range(6):
            x = torch.cat([x, model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)
    if result.partial_layers:
        assert result.params_after < result.params_before
        with pytest.raises(ValueError, match="one branch removed"):
            model.save_pretrained(tmp_path)


# -- MKA ---------------------------------------------------------------------------------------------------------------
def test_nmi_identical_is_one_and_independent_is_small():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 16, (4000,), generator=g)
    assert nmi(a, a) == pytest.approx(1.0)
    assert nmi(a, torch.randint(0, 16, (4000,), generator=g)) < 0.02


def test_mka_merge_is_the_weighted_average_of_the_pair():
    ids, dense = calib(), tiny()
    model = tiny()
    result = prune(model, ids, method="mka", n_remove=1)
    (merge,) = result.selector_info["merges"]
    i, j = merge["layers"]
    a = merge["coeffs"][0]
    assert j == result.removed_layers[0] and j == i + 1 and merge["coeffs"][1] == pytest.approx(1 - a)
    assert a == pytest.approx(min(1.0, max(0.0, merge["similarity"])))
    kept = model.model.layers[i]
    for name, p in kept.named_parameters():
        di, dj = dict(dense.model.layers[i].named_parameters())[name], dict(dense.model.layers[j].named_parameters())
        want = di if "norm" in name else a * di + (1 - a) * dj[name]
        torch.testing.assert_close(p, want.detach())


def test_mka_refcode_is_last_n():
    ids = calib()
    ref = prune(tiny(), ids, method="mka_refcode", n_remove=3)
    last = prune(tiny(), ids, method="last_n", n_remove=3, protect_last=0)  # the code protects nothing
    assert ref.removed_layers == last.removed_layers == [7, 6, 5]
    assert ref.repair == "none"


def test_merge_repairs_refuse_other_selectors():
    with pytest.raises(ValueError, match="repair 'mka_merge' merges the layers that selector 'mka' planned"):
        prune(tiny(), calib(), method="shortgpt", repair="mka_merge", n_remove=1)
    with pytest.raises(ValueError, match="cannot follow selector 'mka'"):
        prune(tiny(), calib(), method="mka", repair="laco_merge", n_remove=1)


# -- LaCo --------------------------------------------------------------------------------------------------------------
def test_laco_rdsc_merge_and_similarity():
    ids, dense = calib(), tiny()
    model = tiny()
    result = prune(model, ids, method="laco", n_remove=2, threshold=-1.0)  # accept the first collapse tried
    (merge,) = result.selector_info["merges"]
    assert merge["layers"] == [L - 3, L - 2, L - 1] and result.removed_layers == [L - 2, L - 1]  # C=4, take 3
    kept = dict(model.model.layers[L - 3].named_parameters())
    src = [dict(dense.model.layers[i].named_parameters()) for i in merge["layers"]]
    for name, p in kept.items():
        want = src[0][name] if "norm" in name else src[0][name] + sum(s[name] - src[0][name] for s in src[1:])
        torch.testing.assert_close(p, want.detach())
    with torch.no_grad():
        a = dense.model(input_ids=ids).last_hidden_state
        b = model.model(input_ids=ids).last_hidden_state
    assert merge["similarity"] == pytest.approx(float(F.cosine_similarity(a, b, dim=-1).mean()), rel=1e-5)
    assert result.selector_info["forward_passes"] == 2 * ids.shape[0]  # dense reference + one candidate


def test_laco_lowers_threshold_until_n_is_reached():
    result = prune(tiny(), calib(), method="laco", n_remove=2, threshold=1.01, threshold_step=0.5)
    assert result.selector_info["final_threshold"] < 1.01 and len(result.removed_layers) == 2


# -- Prune&Comp --------------------------------------------------------------------------------------------------------
def magnitudes(model: nn.Module, ids: torch.Tensor, layer: int) -> tuple[float, float]:
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return float(hs[layer].abs().mean()), float(hs[layer + 1].abs().mean())


def test_prunecomp_scale_and_matched_magnitude():
    ids = calib()
    model = tiny()
    result = prune(model, ids, method="mka_refcode", n_remove=1, repair="prunecomp")  # layer 7: nothing after it
    assert result.repair_info["scales"][0]["applied"] is False
    model = tiny()
    info = prune(model, ids, method="random", n_remove=1, repair="prunecomp", seed=0).repair_info
    r = info["scales"][0]["layer"]
    if r < L - 1:
        before_mag, after_mag = magnitudes(tiny(), ids, r)
        assert info["scales"][0]["scale"] == pytest.approx(after_mag / before_mag, rel=1e-5)
        assert info["side"] == "before"
        with torch.no_grad():  # the stream entering the first survivor after the cut now has the dense magnitude
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[r]
        assert float(h.abs().mean()) == pytest.approx(after_mag, rel=1e-4)


def test_prunecomp_before_and_after_are_the_same_model():
    ids = calib()
    logits = []
    for side in ("before", "after"):
        model = tiny()
        prune(model, ids, method="shortgpt", n_remove=2, repair="prunecomp", repair_options={"side": side})
        with torch.no_grad():
            logits.append(torch.log_softmax(model(input_ids=ids).logits, -1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_prunecomp_tied_embeddings_compensate_after_the_cut():
    model, ids = tiny(tied=True), calib()
    emb = model.get_input_embeddings().weight.detach().clone()
    info = prune(model, ids, method="shortgpt", n_remove=2, repair="prunecomp").repair_info
    assert info["tied_embeddings"] and info["side"] == "after"
    torch.testing.assert_close(model.get_input_embeddings().weight, emb)
    with pytest.raises(ValueError, match="tied embeddings"):
        prune(tiny(tied=True), ids, "shortgpt", n_remove=2, repair="prunecomp", repair_options={"side": "before"})


# -- LinearPatch -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 12, 40, 64, 96, 576])
def test_hadamard_is_orthonormal_with_equal_magnitudes(d):
    h = hadamard(d)
    torch.testing.assert_close(h @ h.T, torch.eye(d, dtype=torch.float64))
    assert torch.allclose(h.abs(), torch.full_like(h, d**-0.5))


def test_hadamard_refuses_impossible_size():
    with pytest.raises(ValueError, match="hidden size 6 "):  # no Hadamard matrix of order 6 exists
        hadamard(6)


def test_runs():
    assert runs([5, 3, 4, 7]) == [(3, 5), (7, 7)]


def test_linearpatch_scale_output_and_save(tmp_path):
    ids = calib()
    dense = tiny()
    cap = {}
    hooks = [
        dense.model.layers[i].register_forward_pre_hook(lambda m, a, i=i: cap.__setitem__(i, a[0])) for i in (3, 5)
    ]
    with torch.no_grad():
        dense(input_ids=ids)
    for h in hooks:
        h.remove()
    rot = hadamard(64).float()
    s = (cap[5].reshape(-1, 64) @ rot).abs().sum(0) / (cap[3].reshape(-1, 64) @ rot).abs().sum(0)
    model = tiny()
    result = prune(model, ids, method="shortgpt", n_remove=2, repair="linearpatch")
    removed = result.removed_layers
    info = result.repair_info
    assert info["merged"] is False and info["extra_params"] == 64 * len(runs(removed))
    assert (
        result.params_after
        == result.params_before - 2 * sum(p.numel() for p in tiny().model.layers[0].parameters()) + info["extra_params"]
    )
    with pytest.raises(ValueError, match="not mergeable"):
        model.save_pretrained(tmp_path)
    # the same patch built by hand for removed = [3, 4]
    ref = tiny()
    ref.model.layers = nn.ModuleList([m for i, m in enumerate(ref.model.layers) if i not in (3, 4)])
    ref.model.layers[3].register_forward_pre_hook(lambda m, a: ((((a[0] @ rot) * s) @ rot.T), *a[1:]))
    patched = tiny()
    LinearPatchRepair().apply(patched, ids, [3, 4])
    remove_layers(patched, [3, 4])
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patched.model.linear_patches[0].scale, s, rtol=1e-5, atol=1e-6)


def test_partial_selection_refused_by_merged_repairs():
    with pytest.raises(ValueError, match="cannot act on layers with one branch removed"):
        prune(tiny(), calib(), method="blockpruner", n_remove=2, repair="projection")


# -- bench and report wiring ---------------------------------------------------------------------------------------
def test_bench_entries_and_not_merged_label():
    from gradmap.bench.runner import ALL_METHODS
    from gradmap.report.rows import variant_of

    assert {"mka", "mka_native", "blockpruner", "laco", "laco_native", "prunecomp", "linearpatch"} <= set(ALL_METHODS)
    record = {"method": "shortgpt", "config": {"repair": {"name": "linearpatch"}}, "repair_info": {"merged": False}}
    assert variant_of(record) == "shortgpt+linearpatch (not merged)"
    record["repair_info"]["merged"] = True
    assert variant_of(record) == "shortgpt+linearpatch"


def test_tiny_bench_times_the_new_methods_and_averages_over_them(tmp_path):
    import json

    from gradmap.bench.cli import main

    out = tmp_path / "part.json"
    methods = "floor,gradmap,shortgpt,sleb,mka,blockpruner,laco,prunecomp,linearpatch"  # *_native: same code
    argv = ["--preset", "cpu", "--arch", "tiny", "--set", "num_hidden_layers=4", "--n-samples", "2"]
    argv += ["--seq-len", "8", "--repeats", "1", "--methods", methods, "--out", str(out)]
    assert main([*argv, "--speedup-baselines", "shortgpt,sleb,mka,blockpruner"]) == 0
    result = json.loads(out.read_text())
    assert not result["errors"]
    rows = {r["entry"]: r for r in result["rows"]}
    assert set(methods.split(",")) - {"floor"} <= set(rows)
    assert rows["blockpruner"]["extrapolated"]["full_candidates"] == 8 + 7  # 2n*2L with L=4, n=1
    assert rows["linearpatch"]["repair"] == "linearpatch" and rows["mka"]["repair"] == "mka_merge"
    speed = result["summary"]["speedup"]
    assert speed["set"] == ["shortgpt", "sleb", "mka", "blockpruner"] and speed["arithmetic_mean"] is not None
