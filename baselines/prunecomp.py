"""Repair ``prunecomp`` (Prune&Comp, arXiv 2507.18212): magnitude compensation merged exactly into the weights.

Removing layer r leaves the next layer a stream of smaller magnitude than it was trained on (it expected
h_{r+1} = h_r + f_r(h_r)). With s = mean|h_{r+1}| / mean|h_r| over the calibration tokens, scaling every
contribution to the stream before the cut (the embeddings and the last linear of each earlier branch, o_proj and
down_proj) by s scales h_r by exactly s, because every RMSNorm reading it is scale-invariant. Layers are handled in
the selector's removal order, each measured on the model already pruned and compensated so far (iterative, one
partial forward over D per removed layer), so the repair follows one-shot and iterative selectors alike.

Tied embeddings (SmolLM2): scaling ``embed_tokens`` would scale the logits too. Scaling everything *before* the
cut by s is, up to RMSNorm's eps, the same model as scaling every branch output *after* the cut by 1/s (the final
norm is scale-invariant as well), so ``side=auto`` compensates after the cut when the embeddings are tied and
before it otherwise; nothing is untied and no parameter is added. Removing the last layers needs no compensation
at all (only the final norm reads the stream); those factors are recorded but change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gradmap.core.adapters import adapter
from gradmap.core.calib import microbatches
from gradmap.core.capture import capture, forward_quietly
from gradmap.core.components import REPAIRS, Repair, calibration_nll, model_device
from gradmap.core.layers import active_layers, decoder_layers


def branch_outputs(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The last linear of each residual branch (where a scale on the branch's contribution is exact)."""
    adapt = adapter(model)
    return [adapt.attn_out(layer), adapt.mlp_out(layer)]


def tied_embeddings(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def magnitude_ratio(model: nn.Module, calib_ids: torch.Tensor, layer: nn.Module, micro_batch_size: int) -> float:
    """mean|output of layer| / mean|input of layer| over every calibration token and channel (fp64 sums)."""
    num = den = 0.0
    device = model_device(model)
    with torch.inference_mode():
        for mb in microbatches(calib_ids, micro_batch_size):
            with capture({"in": layer}, "input") as x, capture({"out": layer}, "output", stop_at=layer) as y:
                forward_quietly(adapter(model).body, mb.to(device))
            num += float(y["out"].double().abs().sum())
            den += float(x["in"].double().abs().sum())
    return num / den


def scale_(modules: Sequence[nn.Module], factor: float) -> None:
    with torch.no_grad():
        for module in modules:
            module.weight.mul_(factor)  # Linear and GPT-2's Conv1D: the output scales either way
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(factor)


@dataclass
class PruneCompRepair(Repair):
    """After each removal, rescale the stream on one side of the cut so its magnitude matches the dense model's."""

    name: ClassVar[str] = "prunecomp"
    side: str = "auto"  # auto (after if embeddings are tied, else before) | before (the paper) | after

    def __post_init__(self) -> None:
        self.check_choice("side", ["auto", "before", "after"])

    def apply(self, model: nn.Module, calib_ids: torch.Tensor, removed: Sequence[int]) -> dict[str, Any]:
        layers = decoder_layers(model)
        tied = tied_embeddings(model)
        side = ("after" if tied else "before") if self.side == "auto" else self.side
        if side == "before" and tied:
            raise ValueError(
                "repair 'prunecomp': side=before would scale the tied embeddings and hence the logits; "
                "use side=auto or side=after"
            )
        alive = list(range(len(layers)))
        steps = []
        for r in removed:
            with active_layers(model, alive):
                s = magnitude_ratio(model, calib_ids, layers[r], self.micro_batch_size)
            alive.remove(r)
            before = [i for i in alive if i < r]
            after = [i for i in alive if i > r]
            if not after:
                steps.append({"layer": r, "scale": s, "applied": False})  # only the final norm reads the stream
                continue
            if side == "before":
                targets = [model.get_input_embeddings()] + [m for i in before for m in branch_outputs(model, layers[i])]
                scale_(targets, s)
            else:
                scale_([m for i in after for m in branch_outputs(model, layers[i])], 1.0 / s)
            steps.append({"layer": r, "scale": s, "applied": True})
        return {
            "side": side,
            "tied_embeddings": tied,
            "scales": steps,
            "forward_passes": len(removed) * len(microbatches(calib_ids, self.micro_batch_size)),
            "merged": True,
        }

    def diagnostics(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        return {"calib_nll_after": calibration_nll(model, calib_ids, self.micro_batch_size)}


REPAIRS.add("prunecomp", PruneCompRepair)
