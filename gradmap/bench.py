"""``python -m gradmap.bench``: what pruning costs, every method timed the same way against the physical floor.

Pruning time does not depend on weight values, so a random-init model of the real architecture on a real GPU
measures it faithfully with nothing to download. The default (``--preset gpu``) is the Llama-2-7B shape (32
layers, d=4096, d_ff=11008, 32 heads) in bf16 with 128 × 2048 seeded random token ids; ``--preset cpu`` is the same
table in miniature on SmolLM2-135M (fp32, CPU). One run times:

- the floor: one dense forward over the calibration set D (C_F) and one forward+backward (C_FB) with gradients
  for the same weights GradMAP scores, each gradient dropped at once (median of ``--repeats``);
- every method as the suite runs it, looked up by name through :func:`gradmap.prune` at 25% removal: selection
  and repair timed apart, with CUDA synchronisation, an untimed warm-up forward and the allocator's peak memory.
  SLEB and PPL are timed on ``--extrapolate-candidates`` candidate forwards and scaled by the FLOPs of their exact
  pass count (marked *extrapolated*). LLM-Streamline's selection runs on D through ``prune()`` and its
  ``layer_replace`` training on its own ``--streamline-train-samples`` windows (``prune()`` gives selector and repair
  one tensor, and the paper trains on far more data than it selects on);

and prints one Markdown table (seconds, peak memory, ratio to GradMAP, cost in C_F, selection over its pass-count
floor), the GradMAP targets and the mean speedup over ``--speedup-baselines`` (METHODS.md §5). ``--out`` writes the
same as JSON with the device, versions, date and exact command. A run may cover a subset (``--methods``) and parts
combine with ``--merge a.json b.json`` (same device and setup required), so the 7B table fits 10-minute slots.

Only torch, transformers and this project's core are imported, so it runs on a machine that has just those.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from gradmap.core.calib import microbatches
from gradmap.core.components import METHODS, REPAIRS
from gradmap.core.grads import gradients_only_for, scored_parameters, training_mode
from gradmap.core.layers import decoder_layers, remove_layers
from gradmap.core.prune import PruneResult, prune, resolve_n_remove
from gradmap.core.timing import device_name, peak_memory_kind, timed

GIB = 2**30
SCHEMA = 1

# Decoder shapes for random-init models (Hugging Face config field names).
ARCHS: dict[str, dict[str, int]] = {
    "llama2_7b": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama2_13b": {"num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "llama3_8b": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "tiny": {"num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
}

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"model": "random", "arch": "llama2_7b", "device": "cuda", "dtype": "bfloat16", "n_samples": 128,
            "seq_len": 2048, "streamline_train_samples": 1024, "streamline_batch_size": 8},
    "cpu": {"model": "smollm2", "arch": None, "device": "cpu", "dtype": "float32", "n_samples": 8, "seq_len": 64,
            "streamline_train_samples": 16, "streamline_batch_size": 4},
}

DEFAULT_SPEEDUP_SET = ("shortgpt", "taylor_plus", "sleb", "streamline")  # METHODS.md §5


@dataclass
class BenchConfig:
    """Everything that defines a bench run; results only merge when these agree (except ``methods``)."""

    preset: str = "gpu"
    model: str = "random"  # random (seeded init of ``arch``) | smollm2
    arch: str | None = "llama2_7b"
    arch_overrides: dict[str, int] = field(default_factory=dict)
    device: str = "cuda"
    dtype: str = "bfloat16"
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    ratio: float = 0.25
    micro_batch_size: int = 1
    grad_checkpointing: bool = False
    repeats: int = 3
    extrapolate_candidates: int = 2
    streamline_train_samples: int = 1024
    streamline_batch_size: int = 8
    streamline_seed: int = 1
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: torch's default
    speedup_baselines: tuple[str, ...] = DEFAULT_SPEEDUP_SET
    methods: tuple[str, ...] = ()

    def setup(self) -> dict[str, Any]:
        """The fields that must match for two parts to be merged into one table."""
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "speedup_baselines", "repeats")}


# ---- model, data, FLOPs ------------------------------------------------------------------------------------------

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelFactory:
    """Hands out a fresh dense model for every timed run (``prune()`` edits the model in place).

    Random models are rebuilt on the device from the seed (well under a second for the 7B shape on a GPU);
    SmolLM2 is loaded once and deep-copied.
    """

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self._pristine: nn.Module | None = None
        if cfg.model == "smollm2":
            from gradmap.models import load_smollm2

            self._pristine = load_smollm2()[0].to(device=self.device, dtype=self.dtype).eval()
            self.config = self._pristine.config
        elif cfg.model == "random":
            if cfg.arch not in ARCHS:
                raise ValueError(f"unknown --arch {cfg.arch!r}; allowed: {', '.join(ARCHS)}")
            from transformers import LlamaConfig

            shape = {**ARCHS[cfg.arch], **cfg.arch_overrides}
            self.config = LlamaConfig(**shape, max_position_embeddings=max(4096, cfg.seq_len),
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        else:
            raise ValueError(f"unknown model {cfg.model!r}; allowed: random, smollm2")

    def __call__(self) -> nn.Module:
        if self._pristine is not None:
            return copy.deepcopy(self._pristine)
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            with self.device:
                # A copy: layer removal rewrites the config of the model it prunes.
                model = AutoModelForCausalLM.from_config(copy.deepcopy(self.config), dtype=self.dtype)
        return model.eval()


def calibration_ids(vocab_size: int, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random token windows (timing does not depend on the tokens)."""
    return torch.randint(0, vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))


def forward_flops(config: Any, n_layers: int, seq_len: int) -> float:
    """FLOPs per token of one forward of a model with ``n_layers`` decoder layers (matmuls and causal attention).

    Used only as a ratio, to scale timed candidate forwards of SLEB and PPL to their full pass count, where
    candidates have different numbers of layers but the lm_head does not shrink.
    """
    d, ff = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    layer_params = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ff
    attention = 2 * seq_len * heads * head_dim  # QKᵀ and AV, 4·s·d per token, halved by the causal mask
    return 2.0 * (n_layers * layer_params + d * config.vocab_size) + n_layers * attention


def stage1_floor_passes(n_layers: int, n_remove: int) -> float:
    """Σ_{i<n} (L−i)/L: dense forward+backward passes that iterative GradMAP needs at least (METHODS.md §5)."""
    return sum((n_layers - i) / n_layers for i in range(n_remove))


def sleb_candidate_layers(n_layers: int, n_remove: int, protect: int) -> list[int]:
    """Layers in each candidate forward of SLEB: step i tries L−i−protect candidates of L−i−1 layers."""
    return [n_layers - i - 1 for i in range(n_remove) for _ in range(n_layers - i - protect)]


# ---- timing helpers ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def measure_floor(model: nn.Module, calib: torch.Tensor, cfg: BenchConfig, backward: bool) -> dict[str, Any]:
    """C_F (and C_FB when ``backward``): median of ``cfg.repeats`` passes over D after an untimed warm-up.

    The forward+backward computes the gradients of exactly the weights GradMAP scores (the seven linears of every
    layer, embeddings, norms and lm_head frozen), in the same mode and micro-batches as GradMAP, and drops each
    gradient as soon as it is accumulated: the least work that yields them.
    """
    device = next(model.parameters()).device
    batches = microbatches(calib, cfg.micro_batch_size)
    rows = calib.shape[0]

    def forward(parts: Sequence[torch.Tensor]) -> None:
        with torch.inference_mode():
            losses = []
            for mb in parts:
                mb = mb.to(device)
                losses.append(model(input_ids=mb, labels=mb, use_cache=False).loss)
            float(torch.stack(losses).sum())

    params = [p for layer in decoder_layers(model) for p in scored_parameters(layer)]

    def forward_backward(parts: Sequence[torch.Tensor]) -> None:
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params]
        try:
            with training_mode(model, cfg.grad_checkpointing), gradients_only_for(model, params):
                total = torch.zeros((), device=device)
                for mb in parts:
                    mb = mb.to(device)
                    loss = model(input_ids=mb, labels=mb, use_cache=False).loss * (mb.shape[0] / rows)
                    loss.backward()
                    total = total + loss.detach()
                float(total)
        finally:
            for hook in hooks:
                hook.remove()

    out: dict[str, Any] = {"weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    kinds = [("forward", forward)] + ([("forward_backward", forward_backward)] if backward else [])
    for name, fn in kinds:
        fn(batches[:1])  # warm-up: kernels, cuBLAS handles, allocator
        spans = []
        for _ in range(max(1, cfg.repeats)):
            with timed(device) as span:
                fn(batches)
            spans.append(span)
        out[name] = {"seconds": statistics.median(s.seconds for s in spans), "all_s": [s.seconds for s in spans],
                     "peak_mem_bytes": max(s.peak_mem_bytes for s in spans), "repeats": len(spans)}
    return out


# ---- bench entries -----------------------------------------------------------------------------------------------

@dataclass
class Context:
    cfg: BenchConfig
    fresh: ModelFactory
    calib: torch.Tensor
    n_layers: int
    n_remove: int

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)


def _small_info(result: PruneResult) -> dict[str, Any]:
    """What the table and the profile need from a prune result (not the per-layer score lists)."""
    keep_sel = ("decisions", "backward_passes", "forward_passes", "calib_passes", "step_s", "wgrad_accum")
    keep_rep = ("site", "pass_s", "layer_forwards", "fit_rows", "train_steps", "train_windows", "val_windows",
                "forward_passes", "backward_passes")
    return {"selector": {k: v for k, v in result.selector_info.items() if k in keep_sel},
            "repair": {k: v for k, v in result.repair_info.items() if k in keep_rep}}


def run_prune(ctx: Context, method: str, repeats: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Time ``prune(method)`` on fresh models ``repeats`` times; median seconds, max peak memory."""
    results = []
    for _ in range(max(1, repeats)):
        model = ctx.fresh()
        result = prune(model, ctx.calib, method=method, diagnostics=False,
                       micro_batch_size=ctx.cfg.micro_batch_size, **kwargs)
        results.append({"timings": result.timings, "removed": result.removed_layers, "n_remove": result.n_remove,
                        "selector": result.selector, "repair": result.repair, "info": _small_info(result),
                        "selector_options": result.selector_options})
        del model, result
        _free(ctx.device)
    med = lambda key: statistics.median(r["timings"][key] for r in results)  # noqa: E731
    last = results[-1]
    return {
        "method": method, "selector": last["selector"], "repair": last["repair"],
        "options": {k: v for k, v in kwargs.items() if k != "repair"},
        "select_s": med("select_s"), "repair_s": med("repair_s"), "total_s": med("prune_s"),
        "all_total_s": [r["timings"]["prune_s"] for r in results], "repeats": len(results),
        "peak_mem_bytes": max(r["timings"]["peak_mem_bytes"] for r in results),
        "select_peak_mem_bytes": max(r["timings"]["select_peak_mem_bytes"] for r in results),
        "repair_peak_mem_bytes": max(r["timings"]["repair_peak_mem_bytes"] for r in results),
        "removed": last["removed"], "n_remove": last["n_remove"], "info": last["info"], "extrapolated": None,
    }


def _row(label: str, data: dict[str, Any], floor: dict[str, float] | None, note: str = "") -> dict[str, Any]:
    """A table row: ``floor`` gives the selection's pass-count floor as multiples of C_F ('f') and C_FB ('fb')."""
    return {"label": label, **data, "floor_passes": floor, "note": note}


def _gradmap_ckpt(ctx: Context) -> dict[str, Any]:
    return {"grad_checkpointing": True} if ctx.cfg.grad_checkpointing else {}


def entry_gradmap(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(ctx, "gradmap", ratio=ctx.cfg.ratio, **_gradmap_ckpt(ctx))
    return [_row("gradmap (iterative) + projection", data,
                 {"fb": stage1_floor_passes(ctx.n_layers, ctx.n_remove)},
                 "select = stage 1, repair = stage 2 (find layer, fit, merge)")]


def entry_gradmap_oneshot(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(ctx, "gradmap_s1", ratio=ctx.cfg.ratio, one_shot=True, **_gradmap_ckpt(ctx))
    return [_row("gradmap one-shot (stage 1)", data, {"fb": 1.0}, "one backward over D, n layers at once")]


def entry_gradmap_nobuffer(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(ctx, "gradmap_s1", ratio=ctx.cfg.ratio, one_shot=True, grad_aggregate="microbatch_abs",
                     **_gradmap_ckpt(ctx))
    return [_row("gradmap one-shot, grad_aggregate=microbatch_abs", data, {"fb": 1.0},
                 "no score buffer: the memory of the lean path (another score)")]


def _simple_entry(method: str, floor: dict[str, float], note: str = "", cheap: bool = False
                  ) -> Callable[[Context], list[dict[str, Any]]]:
    def entry(ctx: Context) -> list[dict[str, Any]]:
        extra = _gradmap_ckpt(ctx) if method.startswith("taylor") else {}
        data = run_prune(ctx, method, repeats=ctx.cfg.repeats if cheap else 1, ratio=ctx.cfg.ratio, **extra)
        return [_row(method, data, floor, note)]

    return entry


def _extrapolated(ctx: Context, method: str, measured_layers: list[int], full_layers: list[int],
                  protect_first: int, protect_last: int, note: str) -> list[dict[str, Any]]:
    """Time ``len(measured_layers)`` candidate forwards through ``prune()`` and scale by FLOPs to the full count.

    The candidates are chosen with protect_first/protect_last (the same computation per candidate as the full
    run: one forward over D of the model without that layer); n_remove=1.
    """
    data = run_prune(ctx, method, n_remove=1, protect_first=protect_first, protect_last=protect_last)
    seq = ctx.cfg.seq_len
    config = ctx.fresh.config
    factor = (sum(forward_flops(config, m, seq) for m in full_layers)
              / sum(forward_flops(config, m, seq) for m in measured_layers))
    data["extrapolated"] = {"timed_s": data["select_s"], "timed_candidates": len(measured_layers),
                            "full_candidates": len(full_layers), "flops_factor": factor}
    data["select_s"] *= factor
    data["total_s"] = data["select_s"] + data["repair_s"]
    data["all_total_s"] = [data["total_s"]]
    data["n_remove"] = ctx.n_remove
    data["removed"] = None
    return [_row(method, data, {"f": sum(m / ctx.n_layers for m in full_layers)}, note)]


def entry_ppl(ctx: Context) -> list[dict[str, Any]]:
    preset = METHODS.get("ppl").selector_options
    protected = preset.get("protect_first", 0) + preset.get("protect_last", 0)
    k = ctx.cfg.extrapolate_candidates
    full = [ctx.n_layers - 1] * (ctx.n_layers - protected)
    return _extrapolated(ctx, "ppl", [ctx.n_layers - 1] * k, full, ctx.n_layers - k, 0,
                         f"extrapolated: {k} of {len(full)} candidate forwards timed")


def entry_sleb(ctx: Context) -> list[dict[str, Any]]:
    preset = METHODS.get("sleb").selector_options
    first, last = preset.get("protect_first", 1), preset.get("protect_last", 1)
    k = ctx.cfg.extrapolate_candidates
    full = sleb_candidate_layers(ctx.n_layers, ctx.n_remove, first + last)
    return _extrapolated(ctx, "sleb", [ctx.n_layers - 1] * k, full, ctx.n_layers - last - k, last,
                         f"extrapolated: {k} of {len(full)} candidate forwards timed (step 1), FLOP-scaled")


def entry_streamline(ctx: Context) -> list[dict[str, Any]]:
    """Selection through ``prune()`` on D; ``layer_replace`` training on its own windows, timed the same way."""
    cfg = ctx.cfg
    data = run_prune(ctx, "streamline", ratio=cfg.ratio, repair="none")
    preset = METHODS.get("streamline")
    options = {**preset.repair_options, "batch_size": cfg.streamline_batch_size,
               "micro_batch_size": cfg.micro_batch_size}
    repair = REPAIRS.get(preset.repair).from_options(**options)
    train_ids = calibration_ids(ctx.fresh.config.vocab_size, cfg.streamline_train_samples, cfg.seq_len,
                                cfg.streamline_seed)
    model = ctx.fresh()
    with torch.inference_mode():  # untimed warm-up forward, as prune() does
        model(input_ids=ctx.calib[:1].to(ctx.device), use_cache=False)
    with timed(ctx.device) as span:
        info = repair.apply(model, train_ids, data["removed"])
        remove_layers(model, data["removed"])
    del model
    _free(ctx.device)
    data["repair"] = preset.repair
    data["repair_options"] = options
    data["repair_s"] = span.seconds
    data["total_s"] = data["select_s"] + span.seconds
    data["all_total_s"] = [data["total_s"]]
    data["repair_peak_mem_bytes"] = span.peak_mem_bytes
    data["peak_mem_bytes"] = max(data["select_peak_mem_bytes"], span.peak_mem_bytes)
    data["info"]["repair"] = {k: info[k] for k in ("train_steps", "train_windows", "val_windows", "forward_passes",
                                                   "backward_passes") if k in info}
    return [_row("streamline (+ layer_replace training)", data, {"f": 1.0},
                 f"training: {cfg.streamline_train_samples}×{cfg.seq_len} windows (seed {cfg.streamline_seed}), "
                 f"batch {cfg.streamline_batch_size}")]


def entry_replaceme(ctx: Context) -> list[dict[str, Any]]:
    # protect_first=1: the linear repair needs a survivor before the cut, and on a random-init model the angular
    # block may start at layer 0 (on trained Llamas it never does); it does not change the cost.
    data = run_prune(ctx, "replaceme", ratio=ctx.cfg.ratio, protect_first=1)
    return [_row("replaceme (angular + linear)", data, {"f": 1.0},
                 "repair = linear (least squares at the layer before the cut); angular protect_first=1")]


ENTRIES: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "gradmap": entry_gradmap,
    "gradmap_oneshot": entry_gradmap_oneshot,
    "gradmap_nobuffer": entry_gradmap_nobuffer,
    "shortgpt": _simple_entry("shortgpt", {"f": 1.0}, cheap=True),
    "angular": _simple_entry("angular", {"f": 1.0}, cheap=True),
    "taylor": _simple_entry("taylor", {"fb": 1.0}),
    "taylor_plus": _simple_entry("taylor_plus", {"fb": 1.0}),
    "ppl": entry_ppl,
    "sleb": entry_sleb,
    "streamline": entry_streamline,
    "replaceme": entry_replaceme,
}
ALL_METHODS = ("floor", *ENTRIES)


# ---- run, merge, summarise ---------------------------------------------------------------------------------------

def environment(cfg: BenchConfig, argv: Sequence[str]) -> dict[str, Any]:
    device = torch.device(cfg.device)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m gradmap.bench " + shlex.join(argv),
        "device": device_name(device),
        "peak_mem_kind": peak_memory_kind(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        meta.update({"cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory})
    else:
        meta["threads"] = torch.get_num_threads()
    return meta


def run_bench(cfg: BenchConfig, argv: Sequence[str] = (), log: Callable[[str], None] | None = None,
              checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the selected entries and return the result dict (see module docstring).

    ``checkpoint(result)`` is called after the floor and after every entry with the result so far (summary
    included), so a run stopped by a time limit still leaves everything it measured.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    methods = list(cfg.methods or ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; allowed: {', '.join(ALL_METHODS)}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("this preset needs a CUDA GPU; use --preset cpu (SmolLM2-135M on the CPU) instead")
    if cfg.threads:
        # On a CPU shared with other jobs, one thread avoids threads waiting on a descheduled sibling in every op.
        torch.set_num_threads(cfg.threads)
    fresh = ModelFactory(cfg)
    n_layers = fresh.config.num_hidden_layers
    ctx = Context(cfg, fresh, calibration_ids(fresh.config.vocab_size, cfg.n_samples, cfg.seq_len, cfg.seed),
                  n_layers, resolve_n_remove(n_layers, ratio=cfg.ratio))
    result: dict[str, Any] = {"schema": SCHEMA, "meta": environment(cfg, argv), "config": asdict(cfg), "rows": [],
                              "errors": {},
                              "model": {"n_layers": n_layers, "n_remove": ctx.n_remove,
                                        **{k: getattr(fresh.config, k) for k in ("hidden_size", "intermediate_size",
                                                                               "num_attention_heads", "vocab_size")}}}
    start = time.perf_counter()
    model = fresh()
    log(f"[bench] {result['meta']['device']}: {n_layers} layers, d={fresh.config.hidden_size}, "
        f"{cfg.n_samples}x{cfg.seq_len} tokens, removing {ctx.n_remove}")
    result["floor"] = measure_floor(model, ctx.calib, cfg, backward="floor" in methods)
    del model
    _free(device)
    log(f"[bench] floor: C_F {result['floor']['forward']['seconds']:.3f} s ({time.perf_counter() - start:.0f} s)")
    result["parts"] = [{**result["meta"], "methods": methods, "forward_s": result["floor"]["forward"]["seconds"]}]

    def save() -> None:
        if checkpoint is not None:
            result["summary"] = summarize(result)
            checkpoint(result)

    save()
    for name in methods:
        if name == "floor":
            continue
        try:
            rows = ENTRIES[name](ctx)
        except Exception as err:  # one failing method must not cost the other measurements of a GPU slot
            log(f"[bench] {name} FAILED: {type(err).__name__}: {err}")
            result["errors"][name] = f"{type(err).__name__}: {err}"
            _free(device)
            save()
            continue
        for row in rows:
            row["entry"] = name
            log(f"[bench] {row['label']}: select {row['select_s']:.3f} s, repair {row['repair_s']:.3f} s "
                f"({time.perf_counter() - start:.0f} s)")
        result["rows"].extend(rows)
        save()
    result["summary"] = summarize(result)
    return result


def merge_results(parts: Sequence[dict[str, Any]], argv: Sequence[str] = ()) -> dict[str, Any]:
    """One table from several runs of the same setup on the same device model.

    The floor comes from the part that measured the forward+backward; every part's own C_F is kept in ``parts``
    (a check that the machines agree). A row measured twice is taken from the later part.
    """
    if not parts:
        raise ValueError("--merge needs at least one JSON file")
    base = parts[0]
    setup = BenchConfig(**_config_fields(base["config"])).setup()
    for part in parts[1:]:
        other = BenchConfig(**_config_fields(part["config"])).setup()
        if other != setup:
            diff = sorted(k for k in setup if setup[k] != other.get(k))
            raise ValueError(f"cannot merge runs of different setups (differ in: {', '.join(diff)})")
        if part["meta"]["device"] != base["meta"]["device"]:
            raise ValueError(f"cannot merge runs on different devices: {base['meta']['device']!r} vs "
                             f"{part['meta']['device']!r}")
    with_fb = [p for p in parts if "forward_backward" in p["floor"]]
    floor_part = with_fb[0] if with_fb else base
    rows: dict[str, dict[str, Any]] = {}
    for part in parts:
        for row in part["rows"]:
            rows[row["label"]] = row
    merged = {
        "schema": SCHEMA,
        "meta": {**floor_part["meta"], "merged": True,
                 "merge_command": "python -m gradmap.bench " + shlex.join(argv) if argv else None},
        "config": {**floor_part["config"], "methods": sorted({m for p in parts for m in p["config"]["methods"]})},
        "model": floor_part["model"],
        "floor": floor_part["floor"],
        "rows": list(rows.values()),
        "errors": {k: v for p in parts for k, v in p.get("errors", {}).items() if k not in
                   {r["entry"] for r in rows.values()}},
        "parts": [q for p in parts for q in p.get("parts", [])],
    }
    merged["summary"] = summarize(merged)
    return merged


def _config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(BenchConfig)}
    out = {k: v for k, v in raw.items() if k in names}
    for key in ("speedup_baselines", "methods"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios, targets and the speedup, all computed from the measured rows and floor."""
    floor = result["floor"]
    t_f = floor["forward"]["seconds"]
    fb = floor.get("forward_backward")
    t_fb = fb["seconds"] if fb else None
    cfg = result["config"]
    rows = {row["entry"]: row for row in result["rows"]}
    gradmap = rows.get("gradmap")
    t_gm = gradmap["total_s"] if gradmap else None
    per_row = {}
    for row in result["rows"]:
        floor_s = None
        passes = row.get("floor_passes") or {}
        if passes and (t_fb is not None or "fb" not in passes):
            floor_s = passes.get("f", 0.0) * t_f + passes.get("fb", 0.0) * (t_fb or 0.0)
        per_row[row["label"]] = {
            "ratio_to_gradmap": row["total_s"] / t_gm if t_gm else None,
            "total_in_c_f": row["total_s"] / t_f,
            "select_floor_s": floor_s,
            "select_ratio_to_floor": row["select_s"] / floor_s if floor_s else None,
        }
    summary: dict[str, Any] = {"c_f_s": t_f, "c_fb_s": t_fb, "rows": per_row}
    if gradmap:
        summary["targets"] = gradmap_targets(gradmap, floor, result["model"]["n_layers"],
                                             result["meta"].get("peak_mem_kind") == "cuda_max_memory_allocated")
        speed = {}
        for name in cfg.get("speedup_baselines", DEFAULT_SPEEDUP_SET):
            if name in rows:
                speed[name] = rows[name]["total_s"] / t_gm
        missing = [n for n in cfg.get("speedup_baselines", DEFAULT_SPEEDUP_SET) if n not in rows]
        summary["speedup"] = {
            "set": list(cfg.get("speedup_baselines", DEFAULT_SPEEDUP_SET)), "missing": missing,
            "per_baseline": speed,
            "arithmetic_mean": statistics.fmean(speed.values()) if speed and not missing else None,
            "geometric_mean": math.exp(statistics.fmean(math.log(v) for v in speed.values()))
            if speed and not missing else None,
        }
    return summary


def gradmap_targets(row: dict[str, Any], floor: dict[str, Any], n_layers: int, span_memory: bool = True
                    ) -> dict[str, Any]:
    """The three GradMAP targets of the issue, with what each is measured against and where the time goes.

    The memory target needs a peak measured over the span alone (CUDA's allocator); a process's peak RSS
    (``span_memory=False``, CPU) includes everything before it, so no memory ratio is claimed there.
    """
    t_f = floor["forward"]["seconds"]
    fb = floor.get("forward_backward")
    steps = row["info"]["selector"].get("step_s", [])
    out: dict[str, Any] = {}
    if fb:
        t_fb = fb["seconds"]
        passes = row["floor_passes"]["fb"]
        out["stage1"] = {"seconds": row["select_s"], "floor_passes_fb": passes, "floor_s": passes * t_fb,
                         "ratio_to_floor": row["select_s"] / (passes * t_fb), "target": 1.15}
        out["stage1"]["met"] = out["stage1"]["ratio_to_floor"] <= 1.15
        # One layer leaves per decision (layers_per_step=1), so decision i runs a model of L−i layers.
        out["stage1"]["per_decision"] = [
            {"alive": n_layers - i, "seconds": s, "floor_s": (n_layers - i) / n_layers * t_fb,
             "ratio": s / ((n_layers - i) / n_layers * t_fb)} for i, s in enumerate(steps)]
    if fb and span_memory:
        ref = fb["peak_mem_bytes"]
        out["memory"] = {"peak_bytes": row["peak_mem_bytes"], "reference_bytes": ref,
                         "weights_bytes": floor["weights_bytes"], "activations_bytes": ref - floor["weights_bytes"],
                         "ratio": row["peak_mem_bytes"] / ref, "target": 1.3,
                         "met": row["peak_mem_bytes"] / ref < 1.3,
                         "reference": "peak of the floor forward+backward: weights + one micro-batch's activations"}
    out["stage2"] = {"seconds": row["repair_s"], "forward_s": t_f, "ratio_to_forward": row["repair_s"] / t_f,
                     "target": 2.0, "met": row["repair_s"] / t_f <= 2.0,
                     "pass_s": row["info"]["repair"].get("pass_s"),
                     "layer_forwards_per_microbatch": row["info"]["repair"].get("layer_forwards"),
                     "site": row["info"]["repair"].get("site"), "removed": row["removed"]}
    return out


# ---- printing ----------------------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def format_report(result: dict[str, Any]) -> str:
    """The Markdown table, the floor, the targets and the speedup, as printed and as pasted into the docs."""
    meta, floor, summary = result["meta"], result["floor"], result["summary"]
    mem_note = "" if meta.get("peak_mem_kind") == "cuda_max_memory_allocated" else \
        " (CPU: process peak RSS, cumulative over the run)"
    lines = [
        f"device: {meta['device']} · torch {meta['torch']} · transformers {meta['transformers']} · {meta['date']}",
        f"setup: {_setup_text(result)}",
        "",
        f"floor: C_F (one dense forward over D) {floor['forward']['seconds']:.3f} s, peak "
        f"{floor['forward']['peak_mem_bytes'] / GIB:.2f} GiB (median of {floor['forward']['repeats']})"
        + ("" if "forward_backward" not in floor else
           f"; C_FB (forward+backward) {floor['forward_backward']['seconds']:.3f} s = "
           f"{floor['forward_backward']['seconds'] / floor['forward']['seconds']:.2f} C_F, peak "
           f"{floor['forward_backward']['peak_mem_bytes'] / GIB:.2f} GiB (median of "
           f"{floor['forward_backward']['repeats']})")
        + f"; weights {floor['weights_bytes'] / GIB:.2f} GiB",
        "",
        f"| method | select s | repair s | total s | peak GiB{mem_note} | × GradMAP | total / C_F | select / floor "
        "| notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        s = summary["rows"][row["label"]]
        floor_txt = _floor_text(row.get("floor_passes"))
        notes = "; ".join(x for x in [row.get("note", ""), f"floor {floor_txt}" if floor_txt else "",
                                      f"median of {row['repeats']}" if row.get("repeats", 1) > 1 else ""] if x)
        lines.append(
            f"| {row['label']} | {row['select_s']:.2f} | {row['repair_s']:.2f} | {row['total_s']:.2f} "
            f"| {row['peak_mem_bytes'] / GIB:.2f} | {_fmt(s['ratio_to_gradmap'])} | {s['total_in_c_f']:.2f} "
            f"| {_fmt(s['select_ratio_to_floor'])} | {notes} |")
    targets = summary.get("targets")
    if targets:
        lines += ["", "GradMAP targets:"]
        if "stage1" in targets:
            t1 = targets["stage1"]
            lines.append(f"- stage 1 (iterative selection) {t1['seconds']:.2f} s vs floor {t1['floor_passes_fb']:.3f} "
                         f"× C_FB = {t1['floor_s']:.2f} s: {t1['ratio_to_floor']:.3f}× (target ≤ 1.15: "
                         f"{'met' if t1['met'] else 'NOT met'})")
            per = ", ".join(f"{d['alive']}: {d['ratio']:.3f}" for d in t1["per_decision"])
            lines.append(f"  per decision (layers alive: time / its floor): {per}")
        t2 = targets["stage2"]
        passes = t2.get("pass_s") or {}
        lf = t2.get("layer_forwards_per_microbatch") or {}
        lines.append(f"- stage 2 (find layer, fit, merge) {t2['seconds']:.2f} s vs one dense forward "
                     f"{t2['forward_s']:.2f} s: {t2['ratio_to_forward']:.2f}× (target ≤ 2: "
                     f"{'met' if t2['met'] else 'NOT met'}); shift pass {_fmt(passes.get('shift'))} s "
                     f"({lf.get('shift', '–')} layer forwards per micro-batch), fit pass {_fmt(passes.get('fit'))} s "
                     f"({lf.get('fit', '–')}), solve + merge + surgery "
                     f"{_fmt(t2['seconds'] - sum(passes.values()) if passes else None)} s; site {t2['site']}, "
                     f"removed {t2['removed']}")
        if "memory" not in targets:
            lines.append("- peak memory: not assessed here (the CPU's process peak RSS includes everything before "
                         "the span)")
        else:
            m = targets["memory"]
            lines.append(f"- peak memory {m['peak_bytes'] / GIB:.2f} GiB vs weights {m['weights_bytes'] / GIB:.2f} + "
                         f"one micro-batch's activations {m['activations_bytes'] / GIB:.2f} = "
                         f"{m['reference_bytes'] / GIB:.2f} GiB: {m['ratio']:.2f}× (target < 1.3: "
                         f"{'met' if m['met'] else 'NOT met'})")
    speed = summary.get("speedup")
    if speed:
        per = ", ".join(f"{k} {v:.2f}×" for k, v in speed["per_baseline"].items())
        if speed["missing"]:
            lines += ["", f"speedup (t_b / t_GradMAP) over {speed['set']}: incomplete, missing {speed['missing']}; "
                          f"measured: {per}"]
        else:
            lines += ["", f"speedup (t_b / t_GradMAP, t = select + repair) over {speed['set']}: arithmetic mean "
                          f"{speed['arithmetic_mean']:.2f}×, geometric mean {speed['geometric_mean']:.2f}×; "
                          f"per baseline: {per}"]
    if result.get("errors"):
        lines += ["", "failed:"] + [f"- {name}: {message}" for name, message in result["errors"].items()]
    commands = [p["command"] for p in result.get("parts", [])]
    lines += ["", "command(s): " + " ; ".join(f"`{c}`" for c in commands)]
    if meta.get("merge_command"):
        lines.append(f"merged with: `{meta['merge_command']}`")
    return "\n".join(lines)


def _floor_text(passes: dict[str, float] | None) -> str:
    if not passes:
        return ""
    parts = [f"{v:.3g} C_F" for k, v in passes.items() if k == "f"] + \
            [f"{v:.3g} C_FB" for k, v in passes.items() if k == "fb"]
    return " + ".join(parts)


def _setup_text(result: dict[str, Any]) -> str:
    cfg = result["config"]
    model = (f"random-init {cfg['arch']}" + (f" {cfg['arch_overrides']}" if cfg.get("arch_overrides") else "")
             if cfg["model"] == "random" else cfg["model"])
    return (f"{model}, {cfg['dtype']}, calibration {cfg['n_samples']}×{cfg['seq_len']} token ids (seed "
            f"{cfg['seed']}), ratio {cfg['ratio']}, micro-batch {cfg['micro_batch_size']}, gradient checkpointing "
            f"{'on' if cfg['grad_checkpointing'] else 'off'}")


# ---- command line ------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> tuple[BenchConfig | None, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m gradmap.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--methods", help=f"comma list of {', '.join(ALL_METHODS)} (default: all)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-init decoder shape")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                        help="override an architecture field, e.g. --set num_hidden_layers=16")
    parser.add_argument("--model", choices=["random", "smollm2"])
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--n-samples", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--grad-checkpointing", action="store_true", default=None)
    parser.add_argument("--repeats", type=int, help="repeats of the floor and the one-forward selectors")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--extrapolate-candidates", type=int)
    parser.add_argument("--streamline-train-samples", type=int)
    parser.add_argument("--streamline-batch-size", type=int)
    parser.add_argument("--speedup-baselines", help="comma list (default: METHODS.md §5's four)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="merge bench JSON parts, run nothing")
    args = parser.parse_args(list(argv))
    if args.merge:
        return None, args
    values: dict[str, Any] = {"preset": args.preset, **PRESETS[args.preset]}
    for key in ("arch", "model", "device", "dtype", "n_samples", "seq_len", "seed", "ratio", "micro_batch_size",
                "grad_checkpointing", "repeats", "threads", "extrapolate_candidates", "streamline_train_samples",
                "streamline_batch_size"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.arch:
        values["model"] = "random"
    overrides = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            parser.error(f"--set needs KEY=INT, got {item!r}")
        overrides[key] = int(raw)
    values["arch_overrides"] = overrides
    if args.methods:
        values["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.speedup_baselines:
        values["speedup_baselines"] = tuple(m.strip() for m in args.speedup_baselines.split(",") if m.strip())
    return BenchConfig(**values), args


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write atomically, so a run killed mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    if cfg is None:
        result = merge_results([json.loads(Path(p).read_text()) for p in args.merge], argv)
    else:
        result = run_bench(cfg, argv, checkpoint=(lambda partial: write_json(args.out, partial)) if args.out else None)
    if args.out:
        write_json(args.out, result)
    print(format_report(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
