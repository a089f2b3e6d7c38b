"""``python scripts/run_tiny_gguf.py <run.py overrides>``: run.py with a GGUF model's weights swapped for a tiny Llama.

Why: the model cache (GGUF dequantized once, published atomically under ``$GRADMAP_CACHE/models/<name>``) is only
on the path of GGUF models, and a real SmolLM2 job is too heavy for a shared 2-core box or a unit test. Here every
``from_pretrained(..., gguf_file=...)`` returns a seeded 30-layer, 64-wide random Llama with SmolLM2's vocabulary, so
a ``model=smollm2_135m`` job runs the real code after the weights: its tokenizer from the GGUF, ``_plain_copy``,
``publish_model_cache``, the calibration cache, pruning and the record. Used by ``make chaos`` (two jobs on an
empty cache) and tests/test_reliability.py. Never use its numbers: the weights are random.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYERS, VOCAB = 30, 49152  # SmolLM2-135M's layer count (config checks know it) and vocabulary


def main() -> None:
    import transformers

    from gradmap import models

    real = transformers.AutoModelForCausalLM.from_pretrained

    def tiny_for_gguf(path: Any, *args: Any, gguf_file: str | None = None, **kwargs: Any) -> Any:
        if gguf_file is None:  # the cached copy, a hub model: the real loader
            return real(path, *args, **kwargs)
        return models.tiny_llama(seed=0, vocab_size=VOCAB, num_hidden_layers=LAYERS)

    transformers.AutoModelForCausalLM.from_pretrained = tiny_for_gguf
    sys.argv = [str(ROOT / "run.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


if __name__ == "__main__":
    main()
