"""Running the bench: every method timed through ``prune()``, one entry per table row group, and the whole run."""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers

from gradmap.bench.config import SCHEMA, BenchConfig, ModelFactory, calibration_ids
from gradmap.bench.floor import _free, forward_flops, measure_floor, sleb_candidate_layers, stage1_floor_passes
from gradmap.bench.new_entries import new_entries
from gradmap.bench.tables import summarize
from gradmap.core.components import METHODS, REPAIRS
from gradmap.core.layers import remove_layers
from gradmap.core.prune import PruneResult, prune, resolve_n_remove
from gradmap.core.sharing import take_seat
from gradmap.core.timing import device_name, peak_memory_kind, timed

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
    keep_rep = (
        "site",
        "pass_s",
        "layer_forwards",
        "fit_rows",
        "train_steps",
        "train_windows",
        "val_windows",
        "forward_passes",
        "backward_passes",
    )
    return {
        "selector": {k: v for k, v in result.selector_info.items() if k in keep_sel},
        "repair": {k: v for k, v in result.repair_info.items() if k in keep_rep},
    }


def run_prune(ctx: Context, method: str, repeats: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Time ``prune(method)`` on fresh models ``repeats`` times; median seconds, max peak memory."""
    results = []
    for _ in range(max(1, repeats)):
        model = ctx.fresh()
        result = prune(
            model, ctx.calib, method=method, diagnostics=False, micro_batch_size=ctx.cfg.micro_batch_size, **kwargs
        )
        results.append(
            {
                "timings": result.timings,
                "removed": result.removed_layers,
                "n_remove": result.n_remove,
                "selector": result.selector,
                "repair": result.repair,
                "info": _small_info(result),
                "selector_options": result.selector_options,
            }
        )
        del model, result
        _free(ctx.device)
    med = lambda key: statistics.median(r["timings"][key] for r in results)  # noqa: E731
    last = results[-1]
    return {
        "method": method,
        "selector": last["selector"],
        "repair": last["repair"],
        "options": {k: v for k, v in kwargs.items() if k != "repair"},
        "select_s": med("select_s"),
        "repair_s": med("repair_s"),
        "total_s": med("prune_s"),
        "all_total_s": [r["timings"]["prune_s"] for r in results],
        "repeats": len(results),
        "peak_mem_bytes": max(r["timings"]["peak_mem_bytes"] for r in results),
        "select_peak_mem_bytes": max(r["timings"]["select_peak_mem_bytes"] for r in results),
        "repair_peak_mem_bytes": max(r["timings"]["repair_peak_mem_bytes"] for r in results),
        "removed": last["removed"],
        "n_remove": last["n_remove"],
        "info": last["info"],
        "extrapolated": None,
    }


def _row(label: str, data: dict[str, Any], floor: dict[str, float] | None, note: str = "") -> dict[str, Any]:
    """A table row: ``floor`` gives the selection's pass-count floor as multiples of C_F ('f') and C_FB ('fb')."""
    return {"label": label, **data, "floor_passes": floor, "note": note}


def _gradmap_ckpt(ctx: Context) -> dict[str, Any]:
    return {"grad_checkpointing": True} if ctx.cfg.grad_checkpointing else {}


def entry_gradmap(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(ctx, "gradmap", ratio=ctx.cfg.ratio, **_gradmap_ckpt(ctx))
    return [
        _row(
            "gradmap (iterative) + projection",
            data,
            {"fb": stage1_floor_passes(ctx.n_layers, ctx.n_remove)},
            "select = stage 1, repair = stage 2 (find layer, fit, merge)",
        )
    ]


def entry_gradmap_oneshot(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(ctx, "gradmap_s1", ratio=ctx.cfg.ratio, one_shot=True, **_gradmap_ckpt(ctx))
    return [_row("gradmap one-shot (stage 1)", data, {"fb": 1.0}, "one backward over D, n layers at once")]


def entry_gradmap_tok_oneshot(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(
        ctx, "gradmap_s1", ratio=ctx.cfg.ratio, one_shot=True, grad_target="layer_gate_tok", **_gradmap_ckpt(ctx)
    )
    return [
        _row(
            "gradmap_tok one-shot (stage 1)",
            data,
            {"fb": 1.0},
            "activation gradients only: no weight gradient is requested (the lean reading)",
        )
    ]


def entry_gradmap_nobuffer(ctx: Context) -> list[dict[str, Any]]:
    data = run_prune(
        ctx, "gradmap_s1", ratio=ctx.cfg.ratio, one_shot=True, grad_aggregate="microbatch_abs", **_gradmap_ckpt(ctx)
    )
    return [
        _row(
            "gradmap one-shot, grad_aggregate=microbatch_abs",
            data,
            {"fb": 1.0},
            "no score buffer: the memory of the lean path (another score)",
        )
    ]


def _simple_entry(
    method: str, floor: dict[str, float], note: str = "", cheap: bool = False
) -> Callable[[Context], list[dict[str, Any]]]:
    def entry(ctx: Context) -> list[dict[str, Any]]:
        extra = _gradmap_ckpt(ctx) if method.startswith("taylor") else {}
        data = run_prune(ctx, method, repeats=ctx.cfg.repeats if cheap else 1, ratio=ctx.cfg.ratio, **extra)
        return [_row(method, data, floor, note)]

    return entry


def _extrapolated(
    ctx: Context,
    method: str,
    measured_layers: list[int],
    full_layers: list[int],
    protect_first: int,
    protect_last: int,
    note: str,
) -> list[dict[str, Any]]:
    """Time ``len(measured_layers)`` candidate forwards through ``prune()`` and scale by FLOPs to the full count.

    The candidates are chosen with protect_first/protect_last (the same computation per candidate as the full
    run: one forward over D of the model without that layer); n_remove=1.
    """
    data = run_prune(ctx, method, n_remove=1, protect_first=protect_first, protect_last=protect_last)
    seq = ctx.cfg.seq_len
    config = ctx.fresh.config
    factor = sum(forward_flops(config, m, seq) for m in full_layers) / sum(
        forward_flops(config, m, seq) for m in measured_layers
    )
    scale_selection(data, len(measured_layers), len(full_layers), factor, ctx.n_remove)
    return [_row(method, data, {"f": sum(m / ctx.n_layers for m in full_layers)}, note)]


def scale_selection(data: dict[str, Any], timed: int, full: int, factor: float, n_remove: int) -> None:
    """Turn a timed sample of candidate forwards into the full selection's time (recorded as extrapolated)."""
    data["extrapolated"] = {
        "timed_s": data["select_s"],
        "timed_candidates": timed,
        "full_candidates": full,
        "flops_factor": factor,
    }
    data["select_s"] *= factor
    data["total_s"] = data["select_s"] + data["repair_s"]
    data["all_total_s"] = [data["total_s"]]
    data["n_remove"] = n_remove
    data["removed"] = None


def entry_ppl(ctx: Context) -> list[dict[str, Any]]:
    preset = METHODS.get("ppl").selector_options
    protected = preset.get("protect_first", 0) + preset.get("protect_last", 0)
    k = ctx.cfg.extrapolate_candidates
    full = [ctx.n_layers - 1] * (ctx.n_layers - protected)
    return _extrapolated(
        ctx,
        "ppl",
        [ctx.n_layers - 1] * k,
        full,
        ctx.n_layers - k,
        0,
        f"extrapolated: {k} of {len(full)} candidate forwards timed",
    )


def entry_sleb(ctx: Context) -> list[dict[str, Any]]:
    preset = METHODS.get("sleb").selector_options
    first, last = preset.get("protect_first", 1), preset.get("protect_last", 1)
    k = ctx.cfg.extrapolate_candidates
    full = sleb_candidate_layers(ctx.n_layers, ctx.n_remove, first + last)
    return _extrapolated(
        ctx,
        "sleb",
        [ctx.n_layers - 1] * k,
        full,
        ctx.n_layers - last - k,
        last,
        f"extrapolated: {k} of {len(full)} candidate forwards timed (step 1), FLOP-scaled",
    )


def entry_streamline(ctx: Context) -> list[dict[str, Any]]:
    """Selection through ``prune()`` on D; ``layer_replace`` training on its own windows, timed the same way."""
    cfg = ctx.cfg
    data = run_prune(ctx, "streamline", ratio=cfg.ratio, repair="none")
    preset = METHODS.get("streamline")
    options = {
        **preset.repair_options,
        "batch_size": cfg.streamline_batch_size,
        "micro_batch_size": cfg.micro_batch_size,
    }
    repair = REPAIRS.get(preset.repair).from_options(**options)
    train_ids = calibration_ids(
        ctx.fresh.config.vocab_size, cfg.streamline_train_samples, cfg.seq_len, cfg.streamline_seed
    )
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
    data["info"]["repair"] = {
        k: info[k]
        for k in ("train_steps", "train_windows", "val_windows", "forward_passes", "backward_passes")
        if k in info
    }
    return [
        _row(
            "streamline (+ layer_replace training)",
            data,
            {"f": 1.0},
            f"training: {cfg.streamline_train_samples}×{cfg.seq_len} windows (seed {cfg.streamline_seed}), "
            f"batch {cfg.streamline_batch_size}",
        )
    ]


def entry_replaceme(ctx: Context) -> list[dict[str, Any]]:
    # protect_first=1: the linear repair needs a survivor before the cut, and on a random-init model the angular
    # block may start at layer 0 (on trained Llamas it never does); it does not change the cost.
    data = run_prune(ctx, "replaceme", ratio=ctx.cfg.ratio, protect_first=1)
    return [
        _row(
            "replaceme (angular + linear)",
            data,
            {"f": 1.0},
            "repair = linear (least squares at the layer before the cut); angular protect_first=1",
        )
    ]


ENTRIES: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "gradmap": entry_gradmap,
    "gradmap_oneshot": entry_gradmap_oneshot,
    "gradmap_nobuffer": entry_gradmap_nobuffer,
    "gradmap_tok_oneshot": entry_gradmap_tok_oneshot,
    "shortgpt": _simple_entry("shortgpt", {"f": 1.0}, cheap=True),
    "angular": _simple_entry("angular", {"f": 1.0}, cheap=True),
    "taylor": _simple_entry("taylor", {"fb": 1.0}),
    "taylor_plus": _simple_entry("taylor_plus", {"fb": 1.0}),
    "ppl": entry_ppl,
    "sleb": entry_sleb,
    "streamline": entry_streamline,
    "replaceme": entry_replaceme,
}
ENTRIES.update(new_entries(run_prune, _row, scale_selection))  # MKA, BlockPruner, LaCo, the two repairs
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
        meta.update(
            {
                "cuda": torch.version.cuda,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
            }
        )
    else:
        meta["threads"] = torch.get_num_threads()
    return meta


def run_bench(
    cfg: BenchConfig,
    argv: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
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
    ctx = Context(
        cfg,
        fresh,
        calibration_ids(fresh.config.vocab_size, cfg.n_samples, cfg.seq_len, cfg.seed),
        n_layers,
        resolve_n_remove(n_layers, ratio=cfg.ratio),
    )
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": environment(cfg, argv),
        "config": asdict(cfg),
        "rows": [],
        "errors": {},
        "model": {
            "n_layers": n_layers,
            "n_remove": ctx.n_remove,
            **{
                k: getattr(fresh.config, k)
                for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
            },
        },
    }
    start = time.perf_counter()
    seat = take_seat(f"bench:{cfg.preset}", device)  # who else computes on this device while the bench times
    seat.begin_span()
    model = fresh()
    log(
        f"[bench] {result['meta']['device']}: {n_layers} layers, d={fresh.config.hidden_size}, "
        f"{cfg.n_samples}x{cfg.seq_len} tokens, removing {ctx.n_remove}"
    )
    result["floor"] = measure_floor(model, ctx.calib, cfg, backward="floor" in methods)
    del model
    _free(device)
    log(f"[bench] floor: C_F {result['floor']['forward']['seconds']:.3f} s ({time.perf_counter() - start:.0f} s)")
    result["parts"] = [{**result["meta"], "methods": methods, "forward_s": result["floor"]["forward"]["seconds"]}]

    def save() -> None:
        result["meta"]["placement"] = result["parts"][0]["placement"] = seat.observe()
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
            log(
                f"[bench] {row['label']}: select {row['select_s']:.3f} s, repair {row['repair_s']:.3f} s "
                f"({time.perf_counter() - start:.0f} s)"
            )
        result["rows"].extend(rows)
        save()
    seat.end_span()
    result["meta"]["placement"] = result["parts"][0]["placement"] = seat.close()
    result["summary"] = summarize(result)
    return result
