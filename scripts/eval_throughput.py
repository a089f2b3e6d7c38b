"""lm-eval throughput of the full 7-task evaluation, by request loop, dtype and batch size (issue: fast full eval).

Loads an offline GGUF model (SmolLM2-135M by default; ``--model gemma3_270m`` for Gemma 3), casts it to each dtype,
and runs the ``eval=full`` task set (no perplexity) through :func:`gradmap.eval.harness.evaluate` once per setting,
with lm-eval's own request loop and/or the lean loop (``eval.loop``, gradmap/eval/loops.py). Prints one line per
setting and writes a JSON list ``{model, loop, dtype, batch_size, requests, seconds, requests_per_s, peak_gib,
avg, per_task}``, plus, for each setting after the first at one dtype, how its per-item records differ from the
first's (``items_vs_first``: items whose accuracy differs, largest log-likelihood difference). Equal items across
batch sizes or loops show those do not change the scores.

    python scripts/eval_throughput.py --loops lm_eval,lean --dtypes bfloat16 --batch-sizes 64,256 --out eval_tp.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gradmap.eval.harness import evaluate
from gradmap.eval.items import ITEMS_FILE, read_items
from gradmap.models import load_gguf

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def items_difference(first: list[dict], other: list[dict]) -> dict[str, float | int]:
    """How two evaluations' per-item records differ: items, accuracy flips, largest |log-likelihood| change."""
    flips = sum(a.get("acc") != b.get("acc") or a.get("acc_norm") != b.get("acc_norm") for a, b in zip(first, other))
    lls = [abs(x - y) for a, b in zip(first, other) for x, y in zip(a.get("ll", ()), b.get("ll", ()))]
    return {"items": len(other), "acc_flips": flips, "max_abs_ll_diff": max(lls, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model preset with source: gguf")
    parser.add_argument("--loops", default="lm_eval", help="comma list of eval.loop values: lm_eval, lean")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="32,128,256")
    parser.add_argument("--preset", default="full", help="conf/eval preset whose tasks and limits are used")
    parser.add_argument("--out", type=Path, default=Path("eval_throughput.json"))
    args = parser.parse_args()

    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml"))
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / f"{args.preset}.yaml"))
    cfg["ppl"] = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for dtype_name in args.dtypes.split(","):
            # a fresh fp32 copy per dtype (cached after the first dequantisation)
            model, tokenizer = load_gguf(spec.get("gguf") or args.model)
            model = model.to(DTYPES[dtype_name]).to(device).eval()
            first = None
            for loop in args.loops.split(","):
                for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                    folder = Path(scratch) / f"{dtype_name}-{loop}-{batch_size}"
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    metrics = evaluate(
                        model, tokenizer, {**cfg, "batch_size": batch_size, "loop": loop}, device=device,
                        items_path=folder / ITEMS_FILE,
                    )  # fmt: skip
                    seconds = time.perf_counter() - start
                    requests = metrics["lm_eval"]["throughput"]["requests"]
                    row = {
                        "model": args.model, "loop": loop, "dtype": dtype_name, "batch_size": batch_size,
                        "requests": requests, "seconds": round(seconds, 2),
                        "requests_per_s": round(requests / seconds, 1),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                        "avg": metrics["avg"], "per_task": {t: metrics[t] for t in cfg["tasks"]},
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    }  # fmt: skip
                    items = read_items(folder)
                    if first is None:
                        first = items
                    else:
                        row["items_vs_first"] = items_difference(first, items)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "per_task"}), flush=True)
                    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
