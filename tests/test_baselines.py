"""Baseline selectors and repairs on a tiny seeded Llama: formulas, planted redundancy, pass counts, every pair.

Reference values are computed here plainly (HF ``output_hidden_states``, swapping the layer list, autograd.grad),
never by calling the code under test. The planted-redundancy model is briefly trained on the calibration windows
first: in a random-init model removing some layers *lowers* the loss, so PPL/SLEB would rightly pick those
instead of the planted identity layer.
"""

from __future__ import annotations

import functools
import math
import pathlib

import pytest
import torch
from torch import nn

from baselines.layer_replace import LayerReplaceRepair
from gradmap import METHODS, REPAIRS, SELECTORS, prune
from gradmap.core.components import NonFiniteError
from gradmap.core.registry import UnknownNameError
from gradmap.models import tiny_llama

L = 8
K = 3  # the planted identity layer
SCORED = ["shortgpt", "angular", "taylor", "ppl", "sleb", "streamline", "gradmap"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and spinning OpenMP threads crawl when other jobs share the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def calib(rows: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(0))


@functools.cache
def _random_state() -> dict[str, torch.Tensor]:
    return tiny_llama(seed=0, vocab_size=256, num_hidden_layers=L).state_dict()


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    """30 Adam steps on the calibration windows, so that every layer lowers the loss."""
    model = tiny_llama(seed=0, vocab_size=256, num_hidden_layers=L)
    ids = calib()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny(trained: bool = False) -> nn.Module:
    model = tiny_llama(seed=0, vocab_size=256, num_hidden_layers=L)
    model.load_state_dict(_trained_state() if trained else _random_state())
    return model.eval()


def planted(k: int = K) -> nn.Module:
    """Zeroing both RMSNorm weights makes layer k an exact identity (all its branch inputs are 0, no biases)."""
    model = tiny(trained=True)
    with torch.no_grad():
        model.model.layers[k].input_layernorm.weight.zero_()
        model.model.layers[k].post_attention_layernorm.weight.zero_()
    return model


# -- plain reference computations ----------------------------------------------------------------------------------
def stream(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L: HF hidden states, except h_L, which HF gives after the final norm; take the last layer's output."""
    last = {}
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, o: last.setdefault("h", o))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    assert len(hs) == len(model.model.layers) + 1
    return [h.double() for h in hs[:-1]] + [last["h"].double()]


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def nll_with(model: nn.Module, ids: torch.Tensor, keep: list[int]) -> float:
    """Full-batch calibration NLL with only the layers ``keep`` (swapping the ModuleList by hand)."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    try:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)
    finally:
        model.model.layers = layers


def select(name: str, model: nn.Module, n: int, ids: torch.Tensor | None = None, **options):
    return SELECTORS.get(name).from_options(**options).select(model, calib() if ids is None else ids, n)


def close(got: dict[int, float], want: dict[int, float], rel: float = 1e-4, abs_: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=abs_), key


# -- planted redundancy --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCORED)
def test_planted_identity_layer_goes_first(name):
    options = {"window": "n"} if name == "streamline" else {}
    selection = select(name, planted(), 1, **options)
    assert selection.removed == [K]


def test_streamline_n_plus_1_window_contains_identity_layer():
    selection = select("streamline", planted(), 1)
    start = selection.info["block_start"]
    assert K in (start, start + 1) and selection.removed == [start + 1]


# -- formulas --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mbs", [1, 3])
def test_shortgpt_block_influence(mbs):
    model, ids = tiny(), calib()
    h = stream(model, ids)
    want = {i: 1 - float(cos(h[i], h[i + 1]).mean()) for i in range(L)}
    selection = select("shortgpt", model, 2, micro_batch_size=mbs)
    close(selection.scores[0], want)
    assert selection.removed == sorted(want, key=want.get)[:2]


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_angular_distance(tokens):
    model, ids, n = tiny(), calib(), 2
    h = stream(model, ids)
    part = (lambda x: x[:, -1]) if tokens == "last" else (lambda x: x)
    want = {
        s: float((torch.arccos(cos(part(h[s]), part(h[s + n])).clamp(-1, 1)) / math.pi).mean())
        for s in range(L - n + 1)
    }
    selection = select("angular", model, n, tokens=tokens)
    close(selection.scores[0], want)
    best = min(want, key=want.get)
    assert selection.removed == [best, best + 1]


@pytest.mark.parametrize("window", ["n_plus_1", "n"])
def test_streamline_cosine(window):
    model, ids, n = tiny(), calib(), 2
    w = n + 1 if window == "n_plus_1" else n
    h = stream(model, ids)
    want = {j: float(cos(h[j], h[j + w]).mean()) for j in range(L - w + 1)}
    selection = select("streamline", model, n, window=window, protect_last=1)
    close(selection.scores[0], want)
    valid = {j: v for j, v in want.items() if j + w - 1 <= L - 2}  # the last layer is protected
    best = max(valid, key=valid.get)
    first = best + 1 if window == "n_plus_1" else best
    assert selection.removed == [first, first + 1]


@pytest.mark.parametrize("mbs", [1, 4])
def test_taylor_importance(mbs):
    model, ids = tiny(), calib()
    loss = model(input_ids=ids, labels=ids).loss
    want = {}
    for i, layer in enumerate(model.model.layers):
        params = list(layer.parameters())  # 7 linears + 2 RMSNorm weights
        assert len(params) == 9
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        want[i] = sum(float((p.double() * g.double()).abs().sum()) for p, g in zip(params, grads))
    model.zero_grad(set_to_none=True)
    close(select("taylor", model, 2, micro_batch_size=mbs).scores[0], want, rel=1e-4)


def test_ppl_leave_one_out_perplexity():
    model, ids = tiny(), calib()
    want = {i: math.exp(nll_with(model, ids, [j for j in range(L) if j != i])) for i in range(L)}
    selection = select("ppl", model, 2, micro_batch_size=4)
    close(selection.scores[0], want)
    assert selection.removed == sorted(want, key=want.get)[:2]


def test_sleb_greedy_nll():
    model, ids = tiny(), calib()
    selection = select("sleb", model, 2, micro_batch_size=4)
    first = {i: nll_with(model, ids, [j for j in range(L) if j != i]) for i in range(1, L - 1)}
    close(selection.scores[0], first)
    drop = min(first, key=first.get)
    second = {
        i: nll_with(model, ids, [j for j in range(L) if j not in (drop, i)]) for i in range(1, L - 1) if i != drop
    }
    close(selection.scores[1], second)
    assert selection.removed == [drop, min(second, key=second.get)]


def test_random_is_seeded_and_last_n_is_deepest():
    model = tiny()
    a, b = select("random", model, 3, seed=5), select("random", model, 3, seed=5)
    assert a.removed == b.removed and a.scores == b.scores
    assert {tuple(select("random", model, 3, seed=s).removed) for s in range(6)} != {tuple(a.removed)}
    draws = torch.rand(L, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
    assert a.scores[0] == dict(enumerate(draws))
    assert select("last_n", model, 3).removed == [L - 2, L - 3, L - 4]


# -- pass counts -----------------------------------------------------------------------------------------------------
class ForwardCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.model.embed_tokens.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize("mbs", [1, 3])
def test_ppl_and_sleb_forward_counts(mbs):
    ids, n = calib(), 3
    n_micro = math.ceil(ids.shape[0] / mbs)
    model = tiny()
    counter = ForwardCounter(model)
    ppl = select("ppl", model, n, ids, micro_batch_size=mbs)
    assert counter.calls == L * n_micro == ppl.info["forward_passes"] and ppl.info["calib_passes"] == L
    counter.calls = 0
    sleb = select("sleb", model, n, ids, micro_batch_size=mbs)  # barriers 1/1 on the alive list
    tried = sum(L - i - 2 for i in range(n))
    assert counter.calls == tried * n_micro == sleb.info["forward_passes"] and sleb.info["calib_passes"] == tried
    counter.calls = 0
    for name in ("shortgpt", "angular", "streamline"):
        select(name, model, n, ids, micro_batch_size=mbs)
    assert counter.calls == 3 * n_micro


@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_taylor_one_backward_per_microbatch(mbs, monkeypatch):
    calls = []
    original = torch.autograd.backward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counting)
    selection = select("taylor", tiny(), 2, micro_batch_size=mbs)
    assert len(calls) == 4 // mbs == selection.info["backward_passes"]


# -- contract: weights unchanged, protection, NaN ----------------------------------------------------------------
@pytest.mark.parametrize("name", SELECTORS.names())
def test_selector_leaves_weights_and_flags_unchanged(name):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    extra = {"min_layer_frac": 0.0} if name == "laco" else {}  # LaCo's default range (top half) is all protected
    selection = select(name, model, 2, protect_first=2, protect_last=2, **extra)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()] and len(model.model.layers) == L
    touched = set(selection.removed) | set(selection.partial)  # partial: BlockPruner's half-removed layers
    assert touched <= set(range(2, L - 2)) and 2 * len(set(selection.removed)) + len(selection.partial) == 4
    assert selection.scores and all(isinstance(s, dict) for s in selection.scores)


@pytest.mark.parametrize("name", SCORED)
def test_nan_raises_nonfinite(name):
    model = tiny()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        select(name, model, 1)


# -- layer_replace ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["decoder_layer", "ffn"])
@pytest.mark.parametrize("removed", [[3, 4], [0, 1]])
def test_layer_replace_lowers_mse(module, removed):
    ids = calib()
    first, last = removed[0], removed[-1]
    keep_old, keep_new = (first - 1, first - 1) if first > 0 else (last + 1, 0)
    dense = tiny()
    target = stream(dense, ids)[last + 2 if first == 0 else last + 1]

    def replacement_mse(model: nn.Module) -> float:
        model.model.layers = nn.ModuleList([m for i, m in enumerate(model.model.layers) if i not in removed])
        model.config.num_hidden_layers = L - len(removed)
        return float(((stream(model, ids)[keep_new + 1] - target) ** 2).mean())

    repaired = tiny()
    attn_before = {k: v.clone() for k, v in repaired.model.layers[keep_old].self_attn.state_dict().items()}
    repair = LayerReplaceRepair(module=module, lr=1e-3, epochs=5, val_fraction=0)
    info = repair.apply(repaired, ids, removed)
    assert info["replaced_by"] == keep_old and info["train_steps"] == 5 * 4 == info["backward_passes"]
    assert info["forward_passes"] == 5 * 4
    attn_after = repaired.model.layers[keep_old].self_attn.state_dict()
    assert all(torch.equal(attn_before[k], attn_after[k]) for k in attn_before) == (module == "ffn")
    assert replacement_mse(repaired) < 0.9 * replacement_mse(tiny())


def test_layer_replace_best_validation_checkpoint_and_defaults():
    model, ids = tiny(), calib()
    info = LayerReplaceRepair().apply(model, ids, [4, 5])
    assert info["val_windows"] == 1 and info["train_windows"] == 3 and info["train_steps"] == 3
    assert info["best_val_mse"] == min(h["val_mse"] for h in info["val_history"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_layer_replace_needs_contiguous_cut():
    with pytest.raises(ValueError, match="contiguous"):
        LayerReplaceRepair().apply(tiny(), calib(), [1, 3])


# -- every selector x repair through prune() -----------------------------------------------------------------------
@functools.cache
def plain_selection(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(removed layers, layers that lost one branch) of a selector's own choice with repair=none."""
    result = prune(tiny(), calib(), method=name, n_remove=2, repair="none", diagnostics=False)
    return tuple(result.removed_layers), tuple(sorted(result.partial_layers))


def invalid_reason(selector: str, repair: str, removed: tuple[int, ...], partial: tuple[int, ...]) -> str | None:
    """Pairs that are invalid by definition, and the words their one-line error must contain."""
    required = REPAIRS.get(repair).requires_selector
    if required is not None and required != selector:
        return f"cannot follow selector {selector!r}"
    if partial and not REPAIRS.get(repair).handles_partial:
        return "cannot act on layers with one branch removed"
    cut = sorted(removed)
    if repair == "layer_replace" and cut != list(range(cut[0], cut[-1] + 1)):
        return "contiguous"
    if repair == "linear" and cut == list(range(len(cut))):  # no survivor before the cut
        return "nothing was removed before a survivor"
    return None


@pytest.mark.parametrize("repair", REPAIRS.names())
@pytest.mark.parametrize("selector", SELECTORS.names())
def test_every_selector_repair_pair(selector, repair):
    assert METHODS.get(selector).selector == selector  # every selector has a method of the same name
    ids = calib()
    removed, partial = plain_selection(selector)
    reason = invalid_reason(selector, repair, removed, partial)
    model = tiny()
    if reason:
        with pytest.raises(ValueError, match=reason):
            prune(model, ids, method=selector, n_remove=2, repair=repair, diagnostics=False)
        return
    result = prune(model, ids, method=selector, n_remove=2, repair=repair)
    assert tuple(result.removed_layers) == removed and tuple(sorted(result.partial_layers)) == partial
    assert result.removed_units == 4
    kept = L - len(removed)
    assert len(model.model.layers) == kept == model.config.num_hidden_layers
    with_attention = [layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "q_proj")]
    assert [attn.layer_idx for attn in with_attention] == list(range(len(with_attention)))
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    if repair == "linearpatch":  # its patches are explicit modules called by pre-hooks; nothing else is hooked
        assert len(hooked) == len(result.repair_info["patches"]) == len(model.model.linear_patches)
        assert result.repair_info["merged"] is False
    else:
        assert not hooked
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_non_contiguous_random_selection_rejected_by_layer_replace():
    seed = next(s for s in range(50) if (r := sorted(select("random", tiny(), 2, seed=s).removed)) and r[1] - r[0] > 1)
    with pytest.raises(ValueError, match="contiguous"):
        prune(tiny(), calib(), method="random", n_remove=2, repair="layer_replace", seed=seed)


def test_streamline_preset_trains_and_counts_steps():
    result = prune(tiny(), calib(), method="streamline", n_remove=2)
    info = result.repair_info
    assert result.repair == "layer_replace" and info["train_steps"] >= 1 and info["window"][0] == info["replaced_by"]
    assert info["window"] == [min(result.removed_layers) - 1, max(result.removed_layers)]
    assert "calib_nll_trained" in info


# -- registry --------------------------------------------------------------------------------------------------------
def test_unknown_method_did_you_mean():
    with pytest.raises(UnknownNameError, match="Did you mean 'shortgpt'"):
        METHODS.get("shortgtp")


def test_method_yamls_match_presets():
    """Each conf/method YAML names a preset, its options build the selector, and it repeats the preset's options
    (the runner fills prune.protect_* defaults into missing keys, which would otherwise override them)."""
    import yaml

    conf = pathlib.Path(__file__).resolve().parents[1] / "conf" / "method"
    for name in [
        "shortgpt",
        "angular",
        "replaceme",
        "taylor",
        "taylor_plus",
        "ppl",
        "sleb",
        "streamline",
        "streamline_noheal",
        "random",
        "last_n",
        "mka",
        "mka_refcode",
        "blockpruner",
        "laco",
    ]:
        cfg = yaml.safe_load((conf / f"{name}.yaml").read_text())
        preset = METHODS.get(cfg["name"])
        options = cfg["options"] or {}
        assert cfg["name"] == name and preset.selector_options.items() <= options.items(), name
        SELECTORS.get(preset.selector).from_options(**options)


def test_presets():
    assert METHODS.get("taylor_plus").selector_options == {"protect_first": 4, "protect_last": 2}
    assert (METHODS.get("replaceme").selector, METHODS.get("replaceme").repair) == ("angular", "linear")
    assert METHODS.get("streamline_noheal").selector_options == {"window": "n"}
    assert METHODS.get("sleb").selector_options == {"protect_first": 1, "protect_last": 1}
