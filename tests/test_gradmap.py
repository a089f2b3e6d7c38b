"""GradMAP stage 1 (selection) and stage 2 (projection compensation) against plain re-computations."""

from __future__ import annotations

import pytest
import torch

from gradmap import prune, resolve_n_remove
from gradmap.core.adapters import merge_output_transform
from gradmap.core.components import NonFiniteError
from gradmap.core.layers import decoder_layers
from gradmap.core.stage1 import GradMAPSelector
from gradmap.core.stage2 import ProjectionRepair, next_survivor_map, solve_projection
from tests.conftest import make_calib, make_tiny, plant_identity

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama block


def direct_gradmap_scores(model, ids) -> dict[int, float]:
    """G_ℓ = Σ|∂L/∂W| / Σ numel(W) over the seven linears, by plain autograd on the batch-mean loss."""
    weights = {
        i: [
            getattr(getattr(layer, part), name).weight
            for part, names in (("self_attn", LINEAR_NAMES[:4]), ("mlp", LINEAR_NAMES[4:]))
            for name in names
        ]
        for i, layer in enumerate(model.model.layers)
    }
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    flat = [w for ws in weights.values() for w in ws]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat)))
    return {
        i: sum(float(grads[id(w)].abs().sum()) for w in ws) / sum(w.numel() for w in ws) for i, ws in weights.items()
    }


def test_scores_match_direct_computation_and_microbatching_does_not_change_them():
    model, ids = make_tiny(4), make_calib(4, 12)
    expected = direct_gradmap_scores(model, ids)
    for micro in (4, 1):
        sel = GradMAPSelector(micro_batch_size=micro).select(model, ids, 1)
        got = sel.scores[0]
        assert got.keys() == expected.keys()
        for layer in expected:
            assert got[layer] == pytest.approx(expected[layer], rel=1e-4)


def test_planted_identity_layer_is_removed_first():
    model = make_tiny(8)
    plant_identity(model, 5)
    result = prune(model, make_calib(), method="gradmap", n_remove=3)
    assert result.removed_layers[0] == 5
    assert result.scores[0][5] == 0.0
    assert len(decoder_layers(result.model)) == 5


@pytest.mark.parametrize("target", ["layer_gate", "weights"])
def test_planted_identity_first_for_gradient_targets(target):
    model = make_tiny(6)
    plant_identity(model, 2)
    sel = GradMAPSelector(grad_target=target).select(model, make_calib(), 1)
    assert sel.removed == [2]


@pytest.mark.parametrize("micro, one_shot", [(4, False), (2, False), (4, True)])
def test_one_backward_pass_per_decision(monkeypatch, micro, one_shot):
    calls = []
    real_backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: (calls.append(1), real_backward(*a, **k))[1])
    n_remove, ids = 3, make_calib(4, 8)
    sel = GradMAPSelector(micro_batch_size=micro, one_shot=one_shot).select(make_tiny(6), ids, n_remove)
    decisions = 1 if one_shot else n_remove
    assert len(calls) == decisions * (ids.shape[0] // micro)
    assert sel.info["backward_passes"] == len(calls)
    assert len(sel.scores) == decisions


def test_iterative_scores_shrink_with_the_model_and_protection_holds():
    model = make_tiny(6)
    sel = GradMAPSelector(protect_first=1, protect_last=1).select(model, make_calib(), 3)
    assert not {0, 5} & set(sel.removed)
    for step, scores in enumerate(sel.scores):
        assert len(scores) == 6 - step  # every alive layer is scored, protected ones too
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_selector_leaves_weights_untouched():
    model = make_tiny(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    GradMAPSelector().select(model, make_calib(), 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_scores_stop_the_job_naming_the_layer():
    model = make_tiny(4)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="dtype"):
        GradMAPSelector().select(model, make_calib(), 1)


def test_bad_option_values_are_one_line_errors():
    with pytest.raises(ValueError, match="grad_norm='l3' is not allowed; choose one of"):
        GradMAPSelector(grad_norm="l3")
    with pytest.raises(ValueError, match="unknown option"):
        prune(make_tiny(4), make_calib(), method="gradmap", n_remove=1, grad_nrom="l1")


@pytest.mark.parametrize(
    "n_layers, ratio, expected",
    [(28, 0.375, 11), (32, 0.25, 8), (30, 0.25, 8), (32, 0.125, 4), (40, 0.375, 15), (30, 0.125, 4)],
)
def test_ratio_rounds_half_up(n_layers, ratio, expected):
    assert resolve_n_remove(n_layers, ratio=ratio) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 0.0}, "out of range"),
        ({"ratio": 1.0}, "out of range"),
        ({"ratio": 0.01}, "rounds to 0"),
        ({"ratio": 0.25, "n_remove": 2}, "not both"),
        ({"n_remove": 8}, "too large"),
        ({"n_remove": 0}, ">= 1"),
        ({"n_remove": 7, "protected": 2}, "too large"),
    ],
)
def test_bad_amounts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_n_remove(8, **kwargs)


# ---- stage 2 ------------------------------------------------------------------------------------------------


def ridge_by_lstsq(x, y, lam):
    """min ‖XB − Y‖² + λ‖B − I‖² as an ordinary least-squares problem on stacked rows."""
    d = x.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    a = torch.cat([x, lam**0.5 * eye])
    b = torch.cat([y, lam**0.5 * eye])
    return torch.linalg.lstsq(a, b).solution


def test_closed_form_equals_lstsq_ridge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 8, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        200, 8, generator=g, dtype=torch.float64
    )
    p, info = solve_projection(x.T @ x, x.T @ y, lambda_rel=1e-2)
    b = ridge_by_lstsq(x, y, info["lambda"])
    torch.testing.assert_close(p, b.T, rtol=1e-9, atol=1e-9)


def test_identity_limits_of_the_fit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64)
    p_star = torch.randn(6, 6, generator=g, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    huge, _ = solve_projection(x.T @ x, x.T @ (x @ p_star.T), lambda_rel=1e12)
    torch.testing.assert_close(huge, eye, rtol=0, atol=1e-9)
    same, _ = solve_projection(x.T @ x, x.T @ x, lambda_rel=0.3)  # Y = X: nothing to correct
    torch.testing.assert_close(same, eye, rtol=0, atol=1e-12)
    exact, _ = solve_projection(x.T @ x, x.T @ (x @ p_star.T), lambda_rel=0.0)  # λ = 0 recovers P*
    torch.testing.assert_close(exact, p_star, rtol=1e-8, atol=1e-8)


def test_merged_weights_equal_an_explicit_matrix_on_the_branch():
    model = make_tiny(4)
    ids = make_calib(2, 10)
    g = torch.Generator().manual_seed(3)
    d = model.config.hidden_size
    p = torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)
    down = model.model.layers[2].mlp.down_proj
    handle = down.register_forward_hook(lambda mod, args, out: out @ p.T.to(out.dtype))
    with torch.no_grad():
        explicit = model(input_ids=ids).logits
    handle.remove()
    merge_output_transform(model.model.layers[2].mlp.down_proj, p)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, explicit, rtol=1e-5, atol=1e-5)


def test_next_survivor_map():
    assert next_survivor_map(6, [2, 3]) == {0: 1, 1: 4, 4: 5, 5: 6}
    assert next_survivor_map(4, [3]) == {0: 1, 1: 2, 2: 4}


def test_projection_fit_reduces_calibration_mse_and_keeps_the_architecture():
    model = make_tiny(6)
    ids = make_calib(4, 16)
    before_keys = {k: v.shape for k, v in model.state_dict().items()}
    repair = ProjectionRepair()
    info = repair.apply(model, ids, [2, 3])
    assert info["site"] in info["shifts"] and info["shifts"][info["site"]] == max(info["shifts"].values())
    assert info["shifts"][0] == 0.0 and info["shifts"][1] > 0.0  # before the cut nothing moves
    assert info["mse_after"] < info["mse_before"]
    assert {k: v.shape for k, v in model.state_dict().items()} == before_keys


def test_gradmap_prunes_to_exactly_the_smaller_parameter_count():
    model = make_tiny(8)
    result = prune(model, make_calib(), method="gradmap", n_remove=2)
    assert result.params_after == make_tiny(6).num_parameters()
    assert result.repair == "projection" and "site" in result.repair_info
    assert result.timings["prune_s"] == pytest.approx(result.timings["select_s"] + result.timings["repair_s"])
    assert not any(m._forward_hooks for m in result.model.modules())
