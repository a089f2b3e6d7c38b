"""The command line of ``python -m gradmap.bench`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradmap.bench
from gradmap.bench.config import ARCHS, DTYPES, PRESETS, BenchConfig
from gradmap.bench.runner import ALL_METHODS, run_bench
from gradmap.bench.tables import format_report, merge_results


def parse_args(argv: Sequence[str]) -> tuple[BenchConfig | None, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m gradmap.bench", description=gradmap.bench.__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--methods", help=f"comma list of {', '.join(ALL_METHODS)} (default: all)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-init decoder shape")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override an architecture field, e.g. --set num_hidden_layers=16",
    )
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
    parser.add_argument("--speedup-baselines", help="comma list (default: docs/protocol.md §5's four)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="merge bench JSON parts, run nothing")
    args = parser.parse_args(list(argv))
    if args.merge:
        return None, args
    values: dict[str, Any] = {"preset": args.preset, **PRESETS[args.preset]}
    for key in (
        "arch",
        "model",
        "device",
        "dtype",
        "n_samples",
        "seq_len",
        "seed",
        "ratio",
        "micro_batch_size",
        "grad_checkpointing",
        "repeats",
        "threads",
        "extrapolate_candidates",
        "streamline_train_samples",
        "streamline_batch_size",
    ):
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
