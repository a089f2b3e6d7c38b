"""Score a random-init model of a real shape from CPU memory, one decoder layer's weights on the GPU at a time
(``onload=layerwise``), against the normal full-model path: time, peak GPU memory, same layers (GPU; the lead runs it).

    python scripts/onload_run.py --arch llama2_7b --n-samples 32 --seq-len 2048 --out onload_7b.json
    python scripts/onload_run.py --arch tiny --device cpu --dtype float32 --n-samples 4 --seq-len 16   # smoke test

It builds the same seeded model (``gradmap.bench``'s factory, on ``--device``) once per path and selects with
``gradmap.prune`` on the same seeded calibration ids (ShortGPT by default; any forward-only selector works):

- ``resident``: the whole model on the device, the normal forward (the reference; needs the model to fit);
- ``layerwise``: the weights in CPU memory (``--pin-memory`` pins them), ``onload=layerwise``: each layer is copied
  to the device once, runs every calibration window, and leaves;
- ``offload``: accelerate's ``dispatch_model`` with every decoder layer offloaded to CPU memory (embeddings, norm
  and head on the device), the normal forward: every micro-batch brings every layer in again;
- ``offload_layerwise``: the same dispatched model with ``onload=layerwise`` (each offloaded layer read once).

On ``--device cpu`` the offloaded layers go to disk instead (accelerate offloads to CPU memory only when the compute
device is not the CPU), which is what the CPU smoke test exercises. For every path it records the removed layers and
scores, select/prune seconds, the allocator's peak over the selection span and over the whole call (warm-up
included), and the bytes onloaded; then whether every path removed the resident path's layers with its scores.
Exit status 1 if the removed layers differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import dispatch_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradmap import prune
from gradmap.bench.config import ARCHS, DTYPES, GIB, BenchConfig, ModelFactory, calibration_ids
from gradmap.core.adapters import adapter

PATHS = ("resident", "layerwise", "offload", "offload_layerwise")


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def offload_map(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Every decoder layer offloaded (CPU memory; disk when the device is the CPU), the rest on the device."""
    names = {id(m): n for n, m in model.named_modules()}
    stack = names[id(adapter(model).layers)]
    parts = stack.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}  # "" (the model) down to the stack's parent
    where: Any = (device.index or 0) if device.type == "cuda" else str(device)
    device_map: dict[str, Any] = {
        name: where
        for name, _ in model.named_modules()
        if name and name.rpartition(".")[0] in ancestors and name not in ancestors and name != stack
    }
    target = "cpu" if device.type != "cpu" else "disk"
    device_map.update({f"{stack}.{i}": target for i in range(len(adapter(model).layers))})
    return device_map


def build(factory: ModelFactory, path: str, device: torch.device, pin: bool, offload_dir: str) -> torch.nn.Module:
    model = factory()
    if path == "resident":
        return model
    model = model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if pin:
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.pin_memory()
    if path in ("offload", "offload_layerwise"):
        main = device if device.type == "cpu" else (device.index or 0)
        model = dispatch_model(model, offload_map(model, device), main_device=main, offload_dir=offload_dir)
    return model


def run_path(model: torch.nn.Module, calib: torch.Tensor, path: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    options: dict[str, Any] = {"onload": "layerwise"} if path.endswith("layerwise") else {}
    if path == "layerwise":
        options["onload_device"] = args.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = prune(
        model, calib, args.method, ratio=args.ratio, micro_batch_size=args.micro_batch_size, warm_up=True, **options
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = result.timings
    return {
        "removed_layers": result.removed_layers,
        "scores": {str(k): v for k, v in result.scores[0].items()},
        "onload": result.selector_options.get("onload"),
        "onloaded_gib": result.selector_info.get("onloaded_bytes", 0) / GIB,
        "select_s": t["select_s"],
        "prune_s": t["prune_s"],
        "wall_s_with_warm_up": time.perf_counter() - start,
        "select_peak_gib": t["select_peak_mem_bytes"] / GIB,
        "peak_mem_kind": t["peak_mem_kind"],
        "call_peak_gpu_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "device": t["device"],
    }


def compare(paths: dict[str, dict[str, Any]]) -> tuple[bool, bool, dict[str, float]]:
    """(same removed layers, same scores within 1e-5 + 1e-4·|s|, the largest score difference per path)."""
    ref = paths.get("resident") or next(iter(paths.values()))
    diffs = {name: max(abs(rec["scores"][k] - ref["scores"][k]) for k in ref["scores"]) for name, rec in paths.items()}
    same_layers = all(rec["removed_layers"] == ref["removed_layers"] for rec in paths.values())
    same_scores = all(
        abs(rec["scores"][k] - s) <= 1e-5 + 1e-4 * abs(s) for rec in paths.values() for k, s in ref["scores"].items()
    )
    return same_layers, same_scores, diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama2_7b")
    parser.add_argument("--method", default="shortgpt", help="a forward-only selector's method (shortgpt, angular...)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    parser.add_argument("--pin-memory", action="store_true", help="pin the CPU weights of the layerwise paths")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = sorted(set(paths) - set(PATHS))
    if bad or not paths:
        parser.error(f"--paths {bad or args.paths!r}: allowed {', '.join(PATHS)}")
    device = torch.device(args.device)
    cfg = BenchConfig(
        model="random", arch=args.arch, device=args.device, dtype=args.dtype, seq_len=args.seq_len, seed=args.seed
    )
    factory = ModelFactory(cfg)
    calib = calibration_ids(factory.config.vocab_size, args.n_samples, args.seq_len, args.seed)
    out: dict[str, Any] = {
        "arch": args.arch,
        "method": args.method,
        "ratio": args.ratio,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size,
        "dtype": args.dtype,
        "pin_memory": args.pin_memory,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "paths": {},
    }
    with tempfile.TemporaryDirectory(prefix="onload_offload_") as offload_dir:
        for path in paths:
            model = build(factory, path, device, args.pin_memory, offload_dir)
            out.setdefault("weights_gib", weight_bytes(model) / GIB)
            out["paths"][path] = run_path(model, calib, path, args)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(path, {k: v for k, v in out["paths"][path].items() if k != "scores"}, flush=True)
    same_layers, same_scores, diffs = compare(out["paths"])
    out.update(same_removed_layers=same_layers, same_scores=same_scores, max_score_diff=diffs)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if same_layers else 1


if __name__ == "__main__":
    raise SystemExit(main())
