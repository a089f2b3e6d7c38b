"""lm-eval throughput of the full 7-task evaluation on SmolLM2, by dtype and batch size (issue: fast full eval).

Loads the offline SmolLM2-135M (GGUF, dequantised to fp32), casts it to each dtype, and runs the ``eval=full``
task set (no perplexity) through :func:`gradmap.eval.harness.evaluate` once per batch size, counting the
log-likelihood requests lm-eval sends. Prints one line per setting and writes a JSON list:
``{dtype, batch_size, requests, seconds, requests_per_s, avg, per_task}``. Equal ``avg`` across batch sizes at
one dtype shows the batch size does not change the scores (padding is masked); a different dtype may.

    python scripts/eval_throughput.py --dtypes float32,bfloat16 --batch-sizes 32,128,256 --out eval_tp.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gradmap.eval.harness import evaluate
from gradmap.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestCounter:
    """Counts the log-likelihood requests lm-eval's HFLM receives (one per answer choice per item)."""

    def __init__(self) -> None:
        from lm_eval.models.huggingface import HFLM

        self.count = 0
        self._original = HFLM.loglikelihood
        counter = self

        def counted(lm, requests, *args, **kwargs):
            counter.count += len(requests)
            return counter._original(lm, requests, *args, **kwargs)

        HFLM.loglikelihood = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="32,128,256")
    parser.add_argument("--preset", default="full", help="conf/eval preset whose tasks and limits are used")
    parser.add_argument("--out", type=Path, default=Path("eval_throughput.json"))
    args = parser.parse_args()

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / f"{args.preset}.yaml"))
    cfg["ppl"] = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counter = RequestCounter()
    rows = []
    for dtype_name in args.dtypes.split(","):
        model, tokenizer = load_smollm2()  # fresh fp32 copy per dtype (cached after the first dequantisation)
        model = model.to(DTYPES[dtype_name]).to(device)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            counter.count = 0
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            metrics = evaluate(model, tokenizer, {**cfg, "batch_size": batch_size}, device=device)
            seconds = time.perf_counter() - start
            row = {
                "dtype": dtype_name,
                "batch_size": batch_size,
                "requests": counter.count,
                "seconds": round(seconds, 2),
                "requests_per_s": round(counter.count / seconds, 1),
                "avg": metrics["avg"],
                "per_task": {t: metrics[t] for t in cfg["tasks"]},
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_task"}), flush=True)
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
