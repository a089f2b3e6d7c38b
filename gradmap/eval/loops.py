"""``eval.loop=lean``: lm-eval's log-likelihood loop with one model call, one gather and one copy to the host per batch.

lm-eval 0.4.13's ``HFLM._loglikelihood_tokens`` computes logits and a log-softmax over the whole vocabulary at
*every* position of every padded row, then, per request, launches a slice, an argmax, a comparison, a gather and a
sum on the device and reads two scalars back (two device syncs per request). On a GPU this per-request work, not the
model, bounds a small model's evaluation (docs/benchmarks.md, "Evaluation throughput"), and for a 262k-token
vocabulary (Gemma 3) the full-width logits dominate memory: one batch of 16 long requests took 38 GiB.

The lean loop keeps lm-eval's request order, batching (the same ``Collator``: same sort, same batches, same
one-token-continuation cache) and answers, and changes only where the work happens:

* the output head gets the hidden states of the continuation positions only (a forward pre-hook on
  ``get_output_embeddings()`` picks them), so vocabulary-wide logits and the log-softmax exist for the scored
  tokens alone, not for every padded position;
* the log-probabilities of all continuation tokens of the batch are picked with one indexing op, and the greedy
  tokens with one argmax, and both come to the host in one copy each; sums and exact-match checks run there.

The answers are lm-eval's up to float rounding of the sum (tests/test_evaluate.py compares both loops request by
request, including lm-eval's cache quirks, and the 7 tasks item by item). It is opt-in (``eval.loop: lean``;
default ``lm_eval``, lm-eval's own loop) because a sweep must keep one loop for all its jobs: the loop is part of
the job identity once it is not the default.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
LOOPS = ("lm_eval", "lean")


def check_loop(value: Any) -> str:
    """``eval.loop`` as given, checked (None means lm-eval's own loop)."""
    loop = "lm_eval" if value is None else value
    if loop not in LOOPS:
        raise ValueError(f"unknown eval.loop {value!r}; allowed: {', '.join(LOOPS)}")
    return loop


def counting_hflm(hflm: type) -> type:
    """HFLM that counts the requests it is sent (one per answer choice per item for multiple choice): the
    throughput in the record is requests / seconds of ``simple_evaluate``, so an eval-speed change is visible per
    job, not only in scripts/eval_throughput.py."""

    class CountingHFLM(hflm):
        requests = 0

        def loglikelihood(self, requests: Any, *args: Any, **kwargs: Any) -> Any:
            self.requests += len(requests)
            return super().loglikelihood(requests, *args, **kwargs)

        def loglikelihood_rolling(self, requests: Any, *args: Any, **kwargs: Any) -> Any:
            self.requests += len(requests)
            return super().loglikelihood_rolling(requests, *args, **kwargs)

        def generate_until(self, requests: Any, *args: Any, **kwargs: Any) -> Any:
            self.requests += len(requests)
            return super().generate_until(requests, *args, **kwargs)

    return CountingHFLM


def lean_hflm(hflm: type) -> type:
    """``hflm`` (lm-eval's HFLM or a subclass) with the lean log-likelihood loop. Seq2seq models and lm-eval's
    ``batch_size: auto`` keep lm-eval's loop (they need its adaptive batching), so the choice never fails a job."""
    from lm_eval.models.utils import Collator
    from tqdm import tqdm

    class LeanHFLM(hflm):
        def _loglikelihood_tokens(
            self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None
        ) -> list[tuple[float, bool]]:
            if self.backend != "causal" or self.batch_size == "auto" or override_bs is not None:
                log.warning(
                    "eval.loop=lean runs lm-eval's own loop here (backend %s, batch size %s): same answers, its speed",
                    self.backend, self.batch_size,
                )  # fmt: skip
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            head = _output_head(self.model)
            re_ord = Collator(
                requests,
                sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),  # lm-eval's _collate
                group_by="contexts" if self.logits_cache else None,
                group_fn=lambda req: req[-2] + req[-1][:-1],  # lm-eval's _lookup_one_token_cont
            )
            answers: list[tuple[float, bool]] = []
            progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Lean loglikelihood")
            for chunk in re_ord.get_batched(n=self.batch_size, batch_fn=None):
                for request_str, answer in self._score_batch(chunk, re_ord, head):
                    answers.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    progress.update(1)
            progress.close()
            return re_ord.get_original(answers)

        def _score_batch(self, chunk: list, re_ord: Any, head: torch.nn.Module) -> list[tuple[Any, tuple[float, bool]]]:
            """(request string, (log-likelihood, greedy)) for each request the batch answers, in lm-eval's order."""
            rows, spans = [], []
            for _, context, continuation in chunk:
                assert context and continuation and len(continuation) <= self.max_length
                row = (context + continuation)[-(self.max_length + 1) :][:-1]  # left-truncated, as lm-eval does
                rows.append(row)
                spans.append((len(row) - len(continuation), len(row)))  # continuation positions [start, end)
            batch = torch.zeros((len(rows), max(len(row) for row in rows)), dtype=torch.long)  # right-padded with 0
            for i, row in enumerate(rows):
                batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            # every continuation position of every row, flattened: row i's span starts at pair offsets[i]
            row_of = [i for i, (start, end) in enumerate(spans) for _ in range(start, end)]
            position_of = [p for start, end in spans for p in range(start, end)]
            offsets = [0, *itertools.accumulate(end - start for start, end in spans)]
            logprobs = self._pair_logprobs(head, batch, torch.tensor(row_of), torch.tensor(position_of))
            greedy = logprobs.argmax(dim=-1).cpu()

            # Which pairs and tokens each answer reads: as lm-eval, a one-token-continuation cache hit reads the
            # greedy tokens from the end of the row's continuation span and the log-probs from its start.
            members, pair, token = [], [], []
            placeholder = torch.empty((1, 1, 1))  # get_cache only expands it; it records lm-eval's order
            for i, (request_str, context, continuation) in enumerate(chunk):
                for member_str, member_cont, _ in re_ord.get_cache(
                    req_str=request_str, cxt_toks=context, cont_toks=continuation, logits=placeholder
                ):
                    n = len(member_cont)
                    members.append((member_str, len(pair), offsets[i + 1] - n, member_cont))
                    pair += range(offsets[i], offsets[i] + n)
                    token += member_cont
            picked = logprobs[torch.tensor(pair), torch.tensor(token)].cpu()
            out = []
            for member_str, first_read, greedy_start, member_cont in members:
                n = len(member_cont)
                loglik = float(picked[first_read : first_read + n].sum())
                exact = bool((greedy[greedy_start : greedy_start + n] == torch.tensor(member_cont)).all())
                out.append((member_str, (loglik, exact)))
            return out

        def _pair_logprobs(
            self, head: torch.nn.Module, batch: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
        ) -> torch.Tensor:
            """Log-softmax of the logits at (row, position) pairs of the batch: [pairs, vocab]. The output head
            gets only those pairs' hidden states (a pre-hook picks them), so the vocabulary-wide logits exist for
            the continuation tokens alone; the call is lm-eval's own ``_model_call`` (no_grad, its autocast), and
            whatever the model does after the head (Gemma's soft-capping) still applies."""

            def pick_pairs(_module: torch.nn.Module, args: tuple) -> tuple:
                hidden = args[0]
                if hidden.shape[:2] != batch.shape:
                    raise RuntimeError(f"output head got hidden states {tuple(hidden.shape)}; expected {batch.shape}")
                return (hidden[rows.to(hidden.device), positions.to(hidden.device)].unsqueeze(0), *args[1:])

            handle = head.register_forward_pre_hook(pick_pairs)
            try:
                logits = self._model_call(batch.to(self.device))[0]
            finally:
                handle.remove()
            return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)

    return LeanHFLM


def _output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps hidden states to vocabulary logits; a model without one gets a clear error."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        raise TypeError(
            f"eval.loop=lean needs a causal LM with an output head (get_output_embeddings(), as transformers' "
            f"models have); {type(model).__name__} has none: use eval.loop=lm_eval"
        )
    return head
