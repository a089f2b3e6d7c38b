"""Taylor / Taylor+ block importance (Kim et al., Shortened LLaMA, arXiv 2402.02834; LLM-Pruner's element score).

    I_ℓ = Σ_{W∈ℓ} Σ_ij |W_ij · ∂L/∂W_ij|

over every weight of decoder layer ℓ (the seven linears and both RMSNorm weights; embeddings and lm_head are
excluded), with L the mean next-token loss over the calibration set and the gradient accumulated over all of it
before |·| is taken (one backward over D, micro-batched). The n lowest go, one-shot. ``taylor_plus`` never prunes
the first 4 or last 2 blocks (raw Taylor ranks block 0 first on Llama-2-7B).

The gradient is reduced inside post-accumulate-grad hooks (GradMAP stage 1's scorer, with |W·g| instead of |g|),
so with one micro-batch no gradient copy of the model ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from baselines._common import accumulate_loss_gradients, info_counts
from gradmap.core.calib import microbatches
from gradmap.core.components import (
    SELECTORS,
    Selection,
    Selector,
    check_finite,
    pick_lowest,
    register_method,
    warn_if_edge,
)
from gradmap.core.grads import WeightGradScorer, gradients_only_for, training_mode
from gradmap.core.layers import decoder_layers


def taylor_reduction(param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """Σ|W ⊙ g| of one weight: stage 1's hook machinery (buffers, last-micro-batch reduction), another reduction."""
    return torch.linalg.vector_norm(grad.float() * param.detach().float(), 1)


@dataclass
class TaylorSelector(Selector):
    """First-order Taylor block importance from one backward over the calibration set."""

    name: ClassVar[str] = "taylor"
    needs_whole_model: ClassVar[str | None] = "gradients of the loss through the whole model (a backward pass)"
    score_accum: str = "fp32"  # fp32 | bf16 gradient buffer when there are several micro-batches
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.check_choice("score_accum", ["fp32", "bf16"])

    def select(self, model: nn.Module, calib_ids: torch.Tensor, n_remove: int) -> Selection:
        layers = decoder_layers(model)
        n_layers = len(layers)
        batches = microbatches(calib_ids, self.micro_batch_size)
        scorer = WeightGradScorer(
            dict(enumerate(layers)),
            include_norms=True,
            norm="l1",
            reduce="sum",
            aggregate="batch",
            accum_dtype=torch.bfloat16 if self.score_accum == "bf16" else torch.float32,
            reduction=taylor_reduction,
        )

        def mark_last(i: int) -> None:
            scorer.last_microbatch = i == len(batches) - 1

        try:
            with training_mode(model, self.grad_checkpointing), gradients_only_for(model, scorer.params):
                loss = accumulate_loss_gradients(model, batches, mark_last, desc="taylor")
            scores = dict(sorted(scorer.scores().items()))
        finally:
            scorer.close()
        check_finite(scores, "Taylor importance", model.dtype)
        removed = pick_lowest({i: scores[i] for i in self.candidates(range(n_layers), n_layers)}, n_remove)
        warn_if_edge(removed, n_layers, self.name)
        return Selection(
            removed=removed,
            scores=[scores],
            info=info_counts(
                len(batches),
                len(batches),
                calib_passes=1,
                calib_loss=[loss],
                score="taylor sum |W*dL/dW|",
                select="min",
            ),
        )


SELECTORS.add("taylor", TaylorSelector)
register_method(
    "taylor",
    "taylor",
    "none",
    "Taylor (Shortened LLaMA): remove the n blocks of lowest sum |W * dL/dW|, one backward, no protection.",
)
register_method(
    "taylor_plus",
    "taylor",
    "none",
    "Taylor+ (Shortened LLaMA): Taylor importance, first 4 and last 2 blocks never pruned.",
    selector_options={"protect_first": 4, "protect_last": 2},
)
