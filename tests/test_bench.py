"""The benchmark's arithmetic and a tiny end-to-end run, and the fast paths of GradMAP stage 1 and stage 2 against
plain re-computations (the bench times those paths, so they must compute exactly what the method defines)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gradmap.bench import (
    BenchConfig,
    format_report,
    forward_flops,
    main,
    merge_results,
    run_bench,
    sleb_candidate_layers,
    stage1_floor_passes,
    summarize,
)
from gradmap.core.adapters import merge_output_transform
from gradmap.core.layers import active_layers, decoder_layers
from gradmap.core.stage1 import GradMAPSelector
from gradmap.core.stage2 import ProjectionRepair, next_survivor_map, solve_projection
from tests.conftest import VOCAB, make_calib, make_tiny

# ---- floor formulas --------------------------------------------------------------------------------------------

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama block


def test_stage1_floor_is_the_shrinking_model_pass_count():
    assert stage1_floor_passes(32, 8) == pytest.approx(sum(range(25, 33)) / 32)  # 7.125 for Llama-2-7B at 25%
    assert stage1_floor_passes(30, 8) == pytest.approx(sum(range(23, 31)) / 30)
    assert stage1_floor_passes(10, 1) == 1.0


def test_sleb_pass_count_matches_methods_md():
    layers = sleb_candidate_layers(32, 8, protect=2)
    assert len(layers) == sum(30 - i for i in range(8))  # candidates tried
    assert sum(layers) / 32 == pytest.approx(sum((30 - i) * (31 - i) for i in range(8)) / 32)  # ≈ 184 C_F
    assert round(sum(layers) / 32) == 184


def test_forward_flops_grow_by_one_layer_and_keep_the_head():
    cfg = make_tiny(4).config
    per_layer = forward_flops(cfg, 3, 16) - forward_flops(cfg, 2, 16)
    assert forward_flops(cfg, 5, 16) - forward_flops(cfg, 4, 16) == pytest.approx(per_layer)
    assert forward_flops(cfg, 0, 16) == 2 * cfg.hidden_size * cfg.vocab_size  # lm_head alone


# ---- table logic on a synthetic result -------------------------------------------------------------------------

ALL_ROWS = ("gradmap", "shortgpt", "taylor_plus", "sleb", "streamline")


def synthetic(device: str = "GPU X", with_fb: bool = True, rows: tuple[str, ...] = ALL_ROWS):
    floor = {"weights_bytes": 10 * 2**30, "forward": {"seconds": 2.0, "peak_mem_bytes": 11 * 2**30, "repeats": 3}}
    if with_fb:
        floor["forward_backward"] = {"seconds": 6.0, "peak_mem_bytes": 20 * 2**30, "repeats": 3}
    times = {
        "gradmap": (45.0, 3.0),
        "shortgpt": (2.4, 0.0),
        "taylor_plus": (7.2, 0.0),
        "sleb": (360.0, 0.0),
        "streamline": (2.4, 93.6),
    }
    out_rows = []
    for name in rows:
        sel, rep = times[name]
        row = {
            "label": name,
            "entry": name,
            "select_s": sel,
            "repair_s": rep,
            "total_s": sel + rep,
            "peak_mem_bytes": 30 * 2**30,
            "repeats": 1,
            "note": "",
            "removed": [5, 6, 7, 8],
            "n_remove": 4,
            "floor_passes": {"fb": stage1_floor_passes(16, 4)} if name == "gradmap" else {"f": 1.0},
            "info": {
                "selector": {"step_s": [12.0, 11.25, 10.9, 10.85]},
                "repair": {"site": 4, "pass_s": {"shift": 2.0, "fit": 0.6}, "layer_forwards": {"shift": 19, "fit": 5}},
            },
        }
        out_rows.append(row)
    cfg = BenchConfig(arch="tiny", device="cpu", methods=("floor", *rows))
    from dataclasses import asdict

    result = {
        "schema": 1,
        "meta": {
            "device": device,
            "torch": "t",
            "transformers": "x",
            "date": "d",
            "command": "c",
            "peak_mem_kind": "cuda_max_memory_allocated",
        },
        "config": asdict(cfg),
        "model": {"n_layers": 16, "n_remove": 4},
        "floor": floor,
        "rows": out_rows,
        "errors": {},
        "parts": [{"command": f"python -m gradmap.bench --methods {','.join(rows)}"}],
    }
    result["summary"] = summarize(result)
    return result


def test_summary_ratios_targets_and_speedup():
    s = synthetic()["summary"]
    floor_passes = stage1_floor_passes(16, 4)  # (16+15+14+13)/16 = 3.625
    t1 = s["targets"]["stage1"]
    assert t1["floor_s"] == pytest.approx(floor_passes * 6.0)
    assert t1["ratio_to_floor"] == pytest.approx(45.0 / (floor_passes * 6.0))
    assert t1["met"] is (45.0 / (floor_passes * 6.0) <= 1.15)
    assert [d["alive"] for d in t1["per_decision"]] == [16, 15, 14, 13]
    assert t1["per_decision"][1]["ratio"] == pytest.approx(11.25 / (15 / 16 * 6.0))
    assert s["targets"]["stage2"]["ratio_to_forward"] == pytest.approx(1.5) and s["targets"]["stage2"]["met"]
    mem = s["targets"]["memory"]
    assert mem["ratio"] == pytest.approx(1.5) and not mem["met"]
    assert mem["activations_bytes"] == 10 * 2**30
    ratios = {"shortgpt": 2.4 / 48, "taylor_plus": 7.2 / 48, "sleb": 360 / 48, "streamline": 96 / 48}
    assert s["speedup"]["per_baseline"] == pytest.approx(ratios)
    assert s["speedup"]["arithmetic_mean"] == pytest.approx(sum(ratios.values()) / 4)
    assert s["speedup"]["geometric_mean"] == pytest.approx(math.prod(ratios.values()) ** 0.25)
    assert s["rows"]["sleb"]["ratio_to_gradmap"] == pytest.approx(7.5)
    assert s["rows"]["shortgpt"]["select_ratio_to_floor"] == pytest.approx(1.2)
    assert s["rows"]["shortgpt"]["total_in_c_f"] == pytest.approx(1.2)


def test_speedup_is_not_claimed_when_a_baseline_is_missing():
    s = synthetic(rows=("gradmap", "shortgpt"))["summary"]
    assert s["speedup"]["arithmetic_mean"] is None
    assert s["speedup"]["missing"] == ["taylor_plus", "sleb", "streamline"]


def test_report_is_a_markdown_table_with_targets():
    text = format_report(synthetic())
    assert "| method | select s | repair s | total s |" in text
    assert text.count("\n| ") == 1 + 5  # header + one line per row
    assert "stage 1 (iterative selection)" in text and "target ≤ 1.15" in text
    mean = (2.4 / 48 + 7.2 / 48 + 360 / 48 + 96 / 48) / 4
    assert f"arithmetic mean {mean:.2f}×" in text


def test_report_flags_a_bench_timed_beside_other_jobs():
    alone, shared = synthetic(), synthetic()
    alone["parts"][0]["placement"] = {"same_device_jobs": [], "shared": False}
    shared["parts"][0]["placement"] = {"same_device_jobs": ["tiny_llama-gradmap-r0.25"], "shared": True}
    assert "Timing flag" not in format_report(alone)
    assert (
        "**Timing flag:** other jobs ran on this device while the bench timed (tiny_llama-gradmap-r0.25; "
        "`placement` in the JSON): these times are not comparable; rerun with the device to itself."
    ) in format_report(merge_results([alone, shared]))  # a merge keeps every part's placement


def test_merge_takes_the_floor_from_the_part_with_a_backward_and_checks_setup():
    a = synthetic(rows=("gradmap",))
    b = synthetic(with_fb=False, rows=("shortgpt", "taylor_plus", "sleb", "streamline"))
    b["floor"]["forward"]["seconds"] = 2.2  # another machine's C_F is kept in parts, not used
    merged = merge_results([b, a], ["--merge", "b.json", "a.json"])
    assert merged["floor"]["forward"]["seconds"] == 2.0
    assert [r["label"] for r in merged["rows"]] == ["shortgpt", "taylor_plus", "sleb", "streamline", "gradmap"]
    assert merged["summary"]["speedup"]["arithmetic_mean"] is not None
    with pytest.raises(ValueError, match="different devices"):
        merge_results([a, synthetic(device="GPU Y")])
    other = synthetic()
    other["config"]["n_samples"] = 7
    with pytest.raises(ValueError, match="n_samples"):
        merge_results([a, other])


# ---- tiny end-to-end run -----------------------------------------------------------------------------------------


def test_tiny_bench_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADMAP_SEATS_DIR", str(tmp_path / "seats"))  # this test's own registry: no other jobs
    out = tmp_path / "part.json"
    code = main(
        [
            "--preset",
            "cpu",
            "--arch",
            "tiny",
            "--set",
            "num_hidden_layers=4",
            "--n-samples",
            "2",
            "--seq-len",
            "8",
            "--repeats",
            "1",
            "--methods",
            "floor,gradmap,shortgpt,sleb",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["meta"]["command"].startswith("python -m gradmap.bench --preset cpu")
    assert {"device", "torch", "transformers", "date"} <= set(result["meta"])
    assert not result["errors"]
    placement = result["meta"]["placement"]
    assert placement == result["parts"][0]["placement"]
    assert (placement["device_key"], placement["same_device_jobs"], placement["node_jobs"]) == ("cpu", [], 1)
    rows = {r["entry"]: r for r in result["rows"]}
    assert set(rows) == {"gradmap", "shortgpt", "sleb"}
    assert len(rows["gradmap"]["removed"]) == 1 and rows["gradmap"]["repair"] == "projection"
    assert rows["sleb"]["extrapolated"]["timed_candidates"] == 2
    assert rows["sleb"]["extrapolated"]["full_candidates"] == 2  # L=4, n=1, first and last protected
    assert result["summary"]["targets"]["stage1"]["floor_passes_fb"] == 1.0
    printed = capsys.readouterr().out
    assert "GradMAP targets" in printed and "| gradmap (iterative) + projection |" in printed
    merged = tmp_path / "merged.json"
    assert main(["--merge", str(out), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text())["summary"]["rows"].keys() == result["summary"]["rows"].keys()


def test_unknown_method_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown bench method"):
        run_bench(BenchConfig(model="random", arch="tiny", device="cpu", dtype="float32", methods=("gradmapp",)))


# ---- stage 1: the lean / fused paths against plain autograd ------------------------------------------------------


def plain_scores(model, ids, micro: int, norm: str = "l1", aggregate: str = "batch") -> dict[int, float]:
    """G_ℓ from ``torch.autograd.grad`` of each micro-batch's share of the mean loss, summed (batch) or |·| per
    micro-batch (microbatch_abs), over every parameter of the seven projections (biases too, where present)."""
    params = {
        i: [
            p
            for name in LINEAR_NAMES
            for p in getattr(getattr(layer, "self_attn" if name in LINEAR_NAMES[:4] else "mlp"), name).parameters()
        ]
        for i, layer in enumerate(decoder_layers(model))
    }
    flat = [p for ps in params.values() for p in ps]
    total = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in flat}
    for mb in torch.split(ids, micro):
        loss = model(input_ids=mb, labels=mb, use_cache=False).loss * (mb.shape[0] / ids.shape[0])
        for p, g in zip(flat, torch.autograd.grad(loss, flat)):
            total[id(p)] += g.double().abs() if aggregate == "microbatch_abs" else g.double()
    out = {}
    for i, ps in params.items():
        if norm == "l1":
            value = sum(float(total[id(p)].abs().sum()) for p in ps)
        else:
            value = math.sqrt(sum(float(total[id(p)].square().sum()) for p in ps))
        out[i] = value / sum(p.numel() for p in ps)
    return out


def assert_scores_close(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert got.keys() == want.keys()
    for layer in want:
        assert got[layer] == pytest.approx(want[layer], rel=rel), layer


@pytest.mark.parametrize(
    "micro, wgrad, norm",
    [(1, "fused", "l1"), (2, "fused", "l2"), (1, "hook", "l1"), (4, "hook", "l2"), (4, "fused", "l1")],
)
def test_lean_stage1_equals_plain_grad_scores(micro, wgrad, norm):
    model, ids = make_tiny(4), make_calib(4, 12)
    want = plain_scores(model, ids, micro, norm)
    sel = GradMAPSelector(micro_batch_size=micro, wgrad_accum=wgrad, grad_norm=norm).select(model, ids, 1)
    assert sel.info["wgrad_accum"] == wgrad
    assert_scores_close(sel.scores[0], want, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())  # the fused path restored every linear


def test_auto_fuses_only_where_a_buffer_is_needed():
    assert GradMAPSelector(micro_batch_size=1).uses_fused(4)
    assert not GradMAPSelector(micro_batch_size=4).uses_fused(1)  # one micro-batch: reduce-and-free hooks
    assert not GradMAPSelector(grad_aggregate="microbatch_abs").uses_fused(4)
    assert not GradMAPSelector(include_norms=True).uses_fused(4)
    with pytest.raises(ValueError, match="wgrad_accum=fused needs"):
        GradMAPSelector(wgrad_accum="fused", grad_target="layer_gate")


def test_microbatch_abs_is_the_sum_of_per_microbatch_magnitudes():
    model, ids = make_tiny(4), make_calib(4, 12)
    want = plain_scores(model, ids, 2, aggregate="microbatch_abs")
    sel = GradMAPSelector(micro_batch_size=2, grad_aggregate="microbatch_abs").select(model, ids, 1)
    assert_scores_close(sel.scores[0], want, rel=1e-4)


def test_fused_path_never_materialises_a_gradient():
    model, ids = make_tiny(4), make_calib(4, 12)
    materialised = []  # autograd still calls the hook (with no gradient) for an input whose gradient is None
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: materialised.append(p.grad is not None))
        for p in model.parameters()
    ]
    GradMAPSelector(micro_batch_size=1, wgrad_accum="fused").select(model, ids, 2)
    for h in handles:
        h.remove()
    assert not any(materialised)


def test_fused_handles_biases_and_checkpointing():
    """Qwen2 has q/k/v biases (scored with their weights); gradient checkpointing re-runs the fused forward."""
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = make_calib(4, 12)
    want = plain_scores(model, ids, 1)
    for ckpt in (False, True):
        sel = GradMAPSelector(micro_batch_size=1, wgrad_accum="fused", grad_checkpointing=ckpt).select(model, ids, 1)
        assert_scores_close(sel.scores[0], want, rel=1e-4)


def test_fused_and_hook_agree_in_bf16():
    model, ids = make_tiny(4, dtype=torch.bfloat16), make_calib(4, 12)
    hook = GradMAPSelector(micro_batch_size=1, wgrad_accum="hook").select(model, ids, 1).scores[0]
    fused = GradMAPSelector(micro_batch_size=1, wgrad_accum="fused").select(model, ids, 1).scores[0]
    assert_scores_close(fused, hook, rel=2e-2)


def test_loss_check_names_the_microbatch_after_the_step():
    model = make_tiny(4)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(float("nan"))
    with pytest.raises(Exception, match="micro-batch 0"):
        GradMAPSelector(micro_batch_size=2).select(model, make_calib(4, 12), 1)


# ---- stage 2: lockstep passes against separate dense and pruned forwards -----------------------------------------


def reference_projection(model, ids, removed, repair: ProjectionRepair):
    """Shifts, site and P from one full dense and one full pruned forward of all windows at once (no lockstep)."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    nxt = next_survivor_map(n_layers, removed)
    skip = repair.skip_first_tokens

    def run(alive):
        outs, downs, hooks = {}, {}, []
        for i in alive:
            hooks.append(
                layers[i].register_forward_hook(
                    lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)
                )
            )
            hooks.append(layers[i].mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: downs.__setitem__(i, o)))
        with active_layers(model, alive), torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        return outs, downs

    dense, _ = run(list(range(n_layers)))
    pruned, pruned_down = run(list(nxt))

    def token_sum(h):
        h = h[:, skip:].double()
        return (h.square() if repair.shift_stat == "rms" else h).sum(dim=(0, 1))

    shifts = {}
    for j in nxt:
        ref = token_sum(dense[nxt[j] - 1 if repair.shift_ref == "next_input" else j])
        diff = float(torch.linalg.vector_norm(token_sum(pruned[j]) - ref))
        shifts[j] = diff / float(torch.linalg.vector_norm(ref)) if repair.shift_stat == "relative" else diff
    site = (
        repair.choose_site(shifts, nxt, removed)
        if repair.site != "max_shift"
        else max(shifts, key=lambda j: (shifts[j], -j))
    )
    d = model.config.hidden_size
    x = pruned_down[site][:, skip:].reshape(-1, d).double()
    y = dense[nxt[site] - 1][:, skip:].reshape(-1, d).double() - pruned[site][:, skip:].reshape(-1, d).double() + x
    p, _ = solve_projection(x.T @ x, x.T @ y, repair.lambda_rel, repair.reg_target)
    return shifts if repair.site == "max_shift" else {}, site, p


@pytest.mark.parametrize(
    "removed, micro, options",
    [
        ([2, 3], 1, {}),
        ([2, 3], 3, {"shift_stat": "rms", "skip_first_tokens": 1}),
        ([0, 5], 1, {}),
        ([0, 5], 3, {"site": "first_after_cut"}),  # first cut at 0: no cached stream
        ([3, 7], 3, {}),
        ([3, 7], 1, {"shift_ref": "same_layer"}),  # last layer removed
        ([1, 4, 6], 1, {}),
        ([1, 4, 6], 3, {"site": "last_before_cut", "shift_stat": "absolute"}),
    ],
)
def test_lockstep_projection_equals_separate_forwards(removed, micro, options):
    ids = make_calib(4, 12)  # micro=3 splits it 3 + 1: the cached stream is per micro-batch
    model = make_tiny(8)
    repair = ProjectionRepair(micro_batch_size=micro, **options)
    shifts, site, p = reference_projection(model, ids, removed, repair)
    reference = make_tiny(8)
    merge_output_transform(reference.model.layers[site].mlp.down_proj, p)
    info = repair.apply(model, ids, removed)
    assert info["site"] == site
    assert info["shifts"].keys() == shifts.keys()
    for j in shifts:
        assert info["shifts"][j] == pytest.approx(shifts[j], rel=1e-9, abs=1e-12), j
    torch.testing.assert_close(
        model.model.layers[site].mlp.down_proj.weight,
        reference.model.layers[site].mlp.down_proj.weight,
        rtol=1e-5,
        atol=1e-6,
    )
    assert not any(m._forward_hooks for m in model.modules())


def test_stage2_layer_forward_count_and_pass_times_are_reported():
    model, ids = make_tiny(8), make_calib(4, 12)
    info = ProjectionRepair().apply(model, ids, [5, 6])
    # shift pass: 8 dense layers + survivors from the first cut on (7); fit pass from layer 4 (the stream entering it
    # is cached) to the reference nxt(site)−1, plus the pruned survivors between the cut and the site
    assert info["layer_forwards"]["shift"] == 8 + 1
    site = info["site"]
    ref = next_survivor_map(8, [5, 6])[site] - 1
    assert info["layer_forwards"]["fit"] == (ref - 4 + 1) + (1 if site == 7 else 0)
    assert set(info["pass_s"]) == {"shift", "fit"}
