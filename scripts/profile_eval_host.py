"""Profile the host side of ``eval=full`` (lm-eval's request building, prompt rendering, request loop) on the CPU.

The model is a 1-layer random Llama with SmolLM2's tokenizer and vocabulary, so the profile separates lm-eval's
per-request Python work from the model: subtract ``torch._C._nn.linear``, ``log_softmax`` and ``argmax`` from
the total and the rest is host work that a GPU does not speed up. Writes the per-item records to ``--items`` so two
runs (say, before and after a change to the evaluation loop) can be compared item by item.

    python scripts/profile_eval_host.py --limit 300 --items /tmp/items.jsonl.gz
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from gradmap.eval.harness import evaluate
from gradmap.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
MODEL_OPS = ("{built-in method torch._C._nn.linear}", "{method 'log_softmax'", "{method 'argmax'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=300, help="items per task (seeded subset, as eval.limit)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loop", default="lm_eval", help="eval.loop: lm_eval (lm-eval's own) or lean")
    parser.add_argument("--items", type=Path, default=Path("profile_items.jsonl.gz"))
    parser.add_argument("--top", type=int, default=30, help="rows of the cumulative-time table to print")
    args = parser.parse_args()

    _, tokenizer = load_smollm2()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / "full.yaml"))
    cfg.update(ppl=None, limit=args.limit, batch_size=args.batch_size, loop=args.loop)

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    metrics = evaluate(model, tokenizer, cfg, device="cpu", items_path=args.items)
    profile.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profile)
    model_seconds = sum(
        row[2] for func, row in stats.stats.items() if any(op in pstats.func_std_string(func) for op in MODEL_OPS)
    )
    requests = metrics["lm_eval"]["throughput"]["requests"]
    host = seconds - model_seconds
    summary = {"requests": requests, "seconds": round(seconds, 1), "model_seconds": round(model_seconds, 1)}
    summary.update(host_seconds=round(host, 1), host_ms_per_request=round(1000 * host / requests, 2))
    print(json.dumps(summary))
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
