"""WikiText-2 perplexity of an in-memory causal LM (docs/protocol.md §6 "Perplexity").

Protocol (GPTQ / SparseGPT / SLEB style, the one behind the usual "Llama-2-7B WikiText-2 PPL ≈ 5.47 at 2048"):
the raw test split is joined with "\\n\\n" into one string, tokenised once, cut into windows of ``window``
tokens with the tail dropped, and PPL = exp(mean NLL over every predicted token). Windows do not overlap by
default (``stride = window``), so each window's first token is context only. ``stride < window`` slides the
window by ``stride`` tokens and scores only its last ``stride`` tokens (the first window scores all of its
tokens), which gives every scored token at least ``window - stride`` tokens of context. ``max_windows`` keeps
only the first k windows, for quick presets; the window count and the number of scored tokens are returned so
tables can say what was measured. No BOS is added per window by default; the tokenizer's own special tokens
apply once, at the start of the joined text, as in the reference implementations.

Kept free of lm-eval/datasets so that pruning code and tests can import it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradmap.paths import DATA_DIR

WIKITEXT2_TEST = DATA_DIR / "wikitext2" / "wiki.test.raw.reconstructed"
PPL_DATASETS = ("wikitext2",)


@dataclass(frozen=True)
class PerplexityResult:
    """PPL plus what was measured (all needed to compare numbers across runs and papers)."""

    ppl: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int  # scored (predicted) tokens
    windows: int  # windows scored
    window: int
    stride: int
    corpus_tokens: int  # tokens in the whole tokenised text
    # Per window, in order: summed NLL (nats) and scored tokens. The paired bootstrap of the report resamples these
    # (two methods scored on the same windows differ window by window far less than their PPLs' spreads suggest).
    window_nll: tuple[float, ...] = ()
    window_tokens: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def wikitext2_rows(raw: str) -> list[str]:
    """Split the raw test file into HF ``wikitext-2-raw-v1`` rows: ``line + "\\n"``, or ``""`` if blank.

    This is how HF's builder yields the file, and the "\\n\\n" join of docs/protocol.md §6 is defined over those rows.
    """
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with "\n": no row after it
    return [line + "\n" if line.strip() else "" for line in lines]


def load_ppl_text(dataset: str = "wikitext2", path: str | Path | None = None) -> str:
    """The evaluation text of ``dataset``: HF rows of WikiText-2 raw test joined with "\\n\\n"."""
    if dataset not in PPL_DATASETS:
        raise ValueError(f"unknown ppl dataset {dataset!r}; allowed: {', '.join(PPL_DATASETS)}")
    path = Path(path) if path is not None else WIKITEXT2_TEST
    if not path.is_file():
        raise FileNotFoundError(
            f"perplexity text {str(path)!r} is missing; restore it with `git checkout -- data/` "
            "or `python scripts/convert_data.py --shared ../shared`"
        )
    # bytes -> str without newline translation, so the text is exactly the file's
    return "\n\n".join(wikitext2_rows(path.read_bytes().decode("utf-8")))


def tokenize_corpus(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokenise the whole text once (1-D LongTensor), with the tokenizer's default special tokens.

    Tokenising once, rather than per window, is what makes windows comparable across methods and papers.
    """
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids[0].long()


def window_spans(
    n_tokens: int, window: int, stride: int | None = None, max_windows: int | None = None
) -> list[tuple[int, int]]:
    """(start, end) of each ``window``-token window, one per ``stride`` tokens; tail dropped; first k kept."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"ppl.window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"ppl.stride must be in [1, window={window}] (null = window), got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"ppl.max_windows must be >= 1 or null, got {max_windows}")
    starts = range(0, n_tokens - window + 1, stride)
    spans = [(s, s + window) for s in starts[:max_windows]]
    if not spans:
        raise ValueError(f"text has {n_tokens} tokens, fewer than one ppl.window of {window}")
    return spans


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    window: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream ``input_ids``, windowed as described in the module doc.

    ``bos_token_id`` (off by default) prepends BOS to every window, which then holds BOS + ``window - 1`` text
    tokens (the gradmap.core.calib convention); LLM-Pruner-style tables use this ("13.29 with BOS per window").
    The NLL is accumulated in float64 from float32 log-softmax, whatever the model dtype, so bf16 models are
    comparable. The model is put in eval mode for the call and its previous mode restored.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (one token stream), got shape {tuple(input_ids.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bos = bos_token_id is not None
    body = window - 1 if bos else window  # text tokens per window
    if stride is not None and not 1 <= stride <= window:
        raise ValueError(f"ppl.stride must be in [1, window={window}] (null = window), got {stride}")
    step = body if stride is None else min(stride, body)
    spans = window_spans(input_ids.numel(), body, step, max_windows)
    # Text tokens with a prediction: all but the first (all, with BOS) in the first window; later windows
    # score only the tokens not scored before, at most the predictable ones (body - 1 without BOS).
    first_scored = body if bos else body - 1
    later_scored = min(step, first_scored)
    was_training = model.training
    model.eval()
    window_nll: list[float] = []
    window_tokens: list[int] = []
    try:
        for start, end in tqdm(spans, desc="ppl", unit="win", disable=not progress):
            n_scored = first_scored if start == 0 else later_scored
            ids = input_ids[start:end]
            if bos:
                ids = torch.cat([ids.new_tensor([bos_token_id]), ids])
            ids = ids.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, -n_scored - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, -n_scored:], reduction="sum")
            window_nll.append(float(nll.double()))
            window_tokens.append(n_scored)
    finally:
        model.train(was_training)
    total_tokens = sum(window_tokens)
    mean_nll = math.fsum(window_nll) / total_tokens
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        tokens=total_tokens,
        windows=len(spans),
        window=window,
        stride=step,
        corpus_tokens=int(input_ids.numel()),
        window_nll=tuple(window_nll),
        window_tokens=tuple(window_tokens),
    )
