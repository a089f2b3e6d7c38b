"""Layer-score diagnostic: how well does each one-pass layer score rank layers by their true removal cost?

    python -m gradmap.diagnose model=smollm2_135m            [diagnose.sleb=true] [diagnose.out=runs/diagnose]

On the dense model and the run's calibration windows it computes every stage-1 score variant (one backward each)
and the one-pass baseline scores, the leave-one-out (LOO) NLL increase of every layer on calibration *and* on the
dev windows (the truth), and reports Spearman ρ and the overlap of each score's n lowest with the truth's n lowest.
Then, at ``prune.ratio`` (default 25 %), the removed sets of the main readings without repair (calibration, dev and
held-out NLL), and the stage-2 λ table (dev and held-out NLL per λ_rel and for the mean-only rank-1 P) on the
literal GradMAP cut and on ShortGPT's cut. Held-out = the first 4 × 512 tokens of the WikiText-2 test text (the
reference point of docs/protocol.md; never used to choose anything). Writes diagnose.{json,md,png}.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from baselines._common import leave_one_out_nll
from gradmap.core.adapters import adapter, merge_output_transform
from gradmap.core.components import METHODS, SELECTORS, calibration_nll
from gradmap.core.layers import active_layers, decoder_layers
from gradmap.core.projection import mean_rank1_projection
from gradmap.core.prune import resolve_n_remove
from gradmap.core.stage2 import ProjectionRepair, next_survivor_map, solve_projection
from gradmap.eval.perplexity import load_ppl_text, tokenize_corpus
from gradmap.models import load_model, resolve_device, with_model_bos
from gradmap.paths import REPO_ROOT
from gradmap.pipeline import calibration
from gradmap.splits import dev_split

# name -> (selector, options): every score is the first (dense-model) decision of that selector; lower = remove.
SCORES: dict[str, tuple[str, dict[str, Any]]] = {
    "gradmap weights l1 mean (literal default)": ("gradmap", {}),
    "gradmap weights l2": ("gradmap", {"grad_norm": "l2"}),
    "gradmap weights, sum_b |g_b| (microbatch_abs)": ("gradmap", {"grad_aggregate": "microbatch_abs"}),
    "gradmap weights l1 + norms": ("gradmap", {"include_norms": True}),
    "layer_output  mean ||dL/dh_out||": ("gradmap", {"grad_target": "layer_output"}),
    "layer_gate  |sum_t <g_t,f_t>|": ("gradmap", {"grad_target": "layer_gate", "protect_first": 0}),
    "layer_gate_signed  -sum_t <g_t,f_t>": ("gradmap", {"grad_target": "layer_gate_signed"}),
    "layer_gate_tok  sum_t |<g_t,f_t>|": ("gradmap", {"grad_target": "layer_gate_tok"}),
    "Taylor  sum |W*g|": ("taylor", {}),
    "Taylor+": ("taylor_plus", {}),
    "ShortGPT BI": ("shortgpt", {}),
}
# removed sets at the target ratio, without repair: name -> (selector, options)
SETS: dict[str, tuple[str, dict[str, Any]]] = {
    "literal GradMAP, iterative": ("gradmap", {}),
    "layer_gate_tok, iterative": ("gradmap", {"grad_target": "layer_gate_tok"}),
    "layer_gate_tok, one-shot": ("gradmap", {"grad_target": "layer_gate_tok", "one_shot": True}),
    "ShortGPT": ("shortgpt", {}),
    "PPL (0/0)": ("ppl", {}),  # = the n lowest of the LOO-calib truth: taken from it, not recomputed
    "SLEB": ("sleb", {}),
}
LAMBDAS = (0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0)


def parse(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hydra-compose the run config from ``key=value`` overrides; ``diagnose.*`` keys are this tool's own."""
    own = {"out": "runs/diagnose", "sleb": False, "heldout_windows": 4, "heldout_len": 512}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("diagnose."):
            name = key.removeprefix("diagnose.")
            if name not in own:
                raise ValueError(f"unknown option {key}; allowed: {', '.join('diagnose.' + k for k in own)}")
            own[name] = value.lower() == "true" if isinstance(own[name], bool) else type(own[name])(value)
        else:
            overrides.append(arg)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    plain = OmegaConf.to_container(cfg, resolve=False)  # hydra's own resolvers need a running app: resolve calib only
    plain["calib"] = OmegaConf.to_container(cfg.calib, resolve=True)  # its seed follows ${seed}
    return plain, own  # type: ignore[return-value]


def make_selector(name: str, options: dict[str, Any]):
    """A selector by method preset name (its preset options first) or by selector name."""
    if name in METHODS.names():
        preset = METHODS.get(name)
        return SELECTORS.get(preset.selector).from_options(**{**preset.selector_options, **options})
    return SELECTORS.get(name).from_options(**options)


def lowest(scores: dict[int, float], k: int) -> set[int]:
    return {i for i, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]}


def compare(scores: dict[int, float], truth: dict[int, float], k: int) -> dict[str, Any]:
    """Spearman ρ over the layers both score, and |score's k lowest ∩ truth's k lowest|."""
    common = sorted(set(scores) & set(truth))
    rho = float(spearmanr([scores[i] for i in common], [truth[i] for i in common]).statistic)
    return {"rho": rho, "overlap": len(lowest(scores, k) & lowest({i: truth[i] for i in common}, k))}


def nll_without(model, ids: torch.Tensor, removed: Sequence[int]) -> float:
    alive = [i for i in range(len(decoder_layers(model))) if i not in set(removed)]
    with active_layers(model, alive):
        return calibration_nll(model, ids)


def stage2_row(model, calib, dev, held, removed: list[int]) -> dict[str, Any]:
    """Dev and held-out NLL of the cut with no P, P at each λ_rel, and the mean-only rank-1 P (fit on calib)."""
    repair = ProjectionRepair()
    nxt = next_survivor_map(len(decoder_layers(model)), removed)
    batches = list(torch.split(calib, 1))
    cache_from = max(min(removed) - 1, 0)
    shifts, cache = repair.shift_pass(model, batches, removed, cache_from)
    site = repair.choose_site(shifts, nxt, removed)
    xtx, xty, stats = repair.fit(model, batches, removed, site, cache, cache_from)
    down = adapter(model).mlp_out(decoder_layers(model)[site])
    original = down.weight.detach().clone()
    candidates = {"none": None, **{f"{lam:g}": solve_projection(xtx, xty, lam, with_cond=False)[0] for lam in LAMBDAS}}
    candidates["mean_rank1"] = mean_rank1_projection(stats["mu_x"], stats["mu_y"])[0]
    out: dict[str, Any] = {"site": site, "rows": stats["rows"], "dev": {}, "heldout": {}}
    for key, p in candidates.items():
        if p is not None:
            merge_output_transform(down, p)
        for split, ids in (("dev", dev), ("heldout", held)):
            out[split][key] = nll_without(model, ids, removed)
        with torch.no_grad():
            down.weight.copy_(original)
    return out


def run(cfg: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    cfg = with_model_bos(cfg)
    torch.manual_seed(int(cfg["seed"]))
    device = resolve_device(cfg["device"])
    model, tokenizer = load_model(cfg["model"], device, cfg["dtype"])
    calib = calibration(cfg["calib"], tokenizer)
    split = dev_split(cfg["calib"], tokenizer)
    if split is None:
        raise ValueError("the diagnostic needs calib.dev (held-out dev windows); the calib preset has none")
    dev = split[0]
    n_h, len_h = int(own["heldout_windows"]), int(own["heldout_len"])
    held = tokenize_corpus(load_ppl_text(), tokenizer)[: n_h * len_h].view(n_h, len_h)
    n_layers = len(decoder_layers(model))
    n_remove = resolve_n_remove(n_layers, cfg["prune"].get("ratio") or cfg["prune"]["default_ratio"])
    clock: dict[str, float] = {}
    t = time.perf_counter()
    dense = {"calib": calibration_nll(model, calib), "dev": calibration_nll(model, dev), "heldout": 0.0}
    dense["heldout"] = calibration_nll(model, held)
    alive = list(range(n_layers))
    loo_calib, _ = leave_one_out_nll(model, calib, 1, alive, alive, "LOO calib")
    loo_dev, _ = leave_one_out_nll(model, dev, 1, alive, alive, "LOO dev")
    truth = {
        "calib": {i: v - dense["calib"] for i, v in loo_calib.items()},
        "dev": {i: v - dense["dev"] for i, v in loo_dev.items()},
    }
    clock["loo_s"] = time.perf_counter() - t
    table: dict[str, Any] = {}
    for name, (selector, options) in SCORES.items():
        t = time.perf_counter()
        sel = make_selector(selector, options).select(model, calib, 1)
        scores = {int(k): float(v) for k, v in sel.scores[0].items()}
        table[name] = {
            "scores": scores,
            "seconds": time.perf_counter() - t,
            **{f"vs_{s}": compare(scores, truth[s], n_remove) for s in truth},
            "lowest": [i for i, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:n_remove]],
        }
    sets: dict[str, Any] = {}
    for name, (selector, options) in SETS.items():
        if selector == "sleb" and not own["sleb"]:
            continue
        t = time.perf_counter()
        if selector == "ppl":
            removed = sorted(lowest(loo_calib, n_remove), key=lambda i: (loo_calib[i], i))
        else:
            removed = make_selector(selector, options).select(model, calib, n_remove).removed
        sets[name] = {"removed": removed, "select_s": time.perf_counter() - t}
        sets[name].update({s: nll_without(model, ids, removed) for s, ids in (("calib", calib), ("dev", dev))})
        sets[name]["heldout"] = nll_without(model, held, removed)
    stage2 = {
        f"{name} (site {{}})": stage2_row(model, calib, dev, held, sets[name]["removed"])
        for name in ("literal GradMAP, iterative", "ShortGPT", "layer_gate_tok, one-shot")
    }
    return {
        "model": cfg["model"]["name"],
        "calib": f"{calib.shape[0]}x{calib.shape[1]} ({cfg['calib']['name']}, seed {cfg['calib']['seed']})",
        "dev": split[1],
        "heldout": f"first {n_h}x{len_h} tokens of the WikiText-2 test text",
        "n_remove": n_remove,
        "dense": dense,
        "truth": truth,
        "truth_best_sum": {s: sum(sorted(v.values())[:n_remove]) for s, v in truth.items()},
        "scores": table,
        "sets": sets,
        "stage2": {k.format(v["site"]): v for k, v in stage2.items()},
        "seconds": clock,
    }


def markdown(res: dict[str, Any]) -> str:
    k = res["n_remove"]
    lines = [
        f"Model {res['model']}; calibration {res['calib']}; dev {res['dev']['n_samples']}x{res['dev']['seq_len']} "
        f"(WikiText-2 validation tiles clear of the calibration windows); held-out {res['heldout']}.",
        f"Dense NLL calib / dev / held-out: {res['dense']['calib']:.3f} / {res['dense']['dev']:.3f} / "
        f"{res['dense']['heldout']:.3f}. Truth = LOO NLL increase; best {k} by it sum to "
        f"{res['truth_best_sum']['calib']:.2f} (calib) / {res['truth_best_sum']['dev']:.2f} (dev) nats.",
        "",
        f"| score | ρ vs LOO calib | top-{k} overlap | ρ vs LOO dev | top-{k} overlap | its {k} lowest |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in res["scores"].items():
        c, d = row["vs_calib"], row["vs_dev"]
        lowest_s = ",".join(map(str, row["lowest"]))
        lines.append(
            f"| {name} | {c['rho']:.2f} | {c['overlap']}/{k} | {d['rho']:.2f} | {d['overlap']}/{k} | {lowest_s} |"
        )
    lines += ["", f"Removed sets ({k} layers, no repair): NLL", "", "| set | removed | calib | dev | held-out |"]
    lines.append("|---|---|---:|---:|---:|")
    for name, row in res["sets"].items():
        removed = ",".join(map(str, row["removed"]))
        lines.append(f"| {name} | {removed} | {row['calib']:.3f} | {row['dev']:.3f} | {row['heldout']:.3f} |")
    keys = ["none", *[f"{lam:g}" for lam in LAMBDAS], "mean_rank1"]
    lines += ["", "Stage 2, λ_rel (λ = λ_rel·tr(XᵀX)/d; fit on calibration): dev NLL / held-out NLL", ""]
    lines.append("| cut | rows | " + " | ".join(keys) + " |")
    lines.append("|---|---:|" + "---:|" * len(keys))
    for name, row in res["stage2"].items():
        cells = " | ".join(f"{row['dev'][key]:.3f} / {row['heldout'][key]:.3f}" for key in keys)
        lines.append(f"| {name} | {row['rows']} | {cells} |")
    return "\n".join(lines) + "\n"


def figure(res: dict[str, Any], path: Path) -> None:
    """ρ per score (vs LOO on calib and dev), and the truth beside the best and the literal score per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["scores"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.0, 3.2), gridspec_kw={"width_ratios": [1.1, 1]})
    y = np.arange(len(names))
    for off, split, colour in ((-0.2, "calib", "tab:blue"), (0.2, "dev", "tab:orange")):
        rho = [res["scores"][n][f"vs_{split}"]["rho"] for n in names]
        ax1.barh(y + off, rho, 0.4, color=colour, label=f"vs LOO {split}")
    ax1.set_yticks(y, [n.split("  ")[0] for n in names], fontsize=6)
    ax1.invert_yaxis()
    ax1.axvline(0, color="k", lw=0.5)
    ax1.set_xlabel("Spearman ρ with leave-one-out", fontsize=7)
    ax1.legend(fontsize=6)
    ax1.tick_params(labelsize=6)
    layers = sorted(res["truth"]["dev"])

    def ranks(d: dict[int, float]) -> np.ndarray:
        return np.argsort(np.argsort([d[i] for i in layers]))

    ax2.plot(layers, ranks(res["truth"]["dev"]), "k-o", ms=3, label="LOO dev (truth)")
    shown = (("layer_gate_tok  sum_t |<g_t,f_t>|", "g-s"), ("gradmap weights l1 mean (literal default)", "r-^"))
    for name, style in shown:
        ax2.plot(layers, ranks(res["scores"][name]["scores"]), style, ms=3, lw=0.8, label=name.split("  ")[0][:28])
    ax2.set_xlabel("layer", fontsize=7)
    ax2.set_ylabel("rank (0 = removed first)", fontsize=7)
    ax2.legend(fontsize=6)
    ax2.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    cfg, own = parse(sys.argv[1:] if argv is None else argv)
    res = run(cfg, own)
    out = Path(own["out"]) / res["model"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    text = markdown(res)
    (out / "diagnose.md").write_text(text, encoding="utf-8")
    figure(res, out / "diagnose.png")
    print(text)
    print(f"wrote {out}/diagnose.{{json,md,png}}")


if __name__ == "__main__":
    main()
