"""``python -m gradmap.bench``: what pruning costs, every method timed the same way against the physical floor.

Pruning time does not depend on weight values, so a random-init model of the real architecture on a real GPU
measures it faithfully with nothing to download. The default (``--preset gpu``) is the Llama-2-7B shape (32
layers, d=4096, d_ff=11008, 32 heads) in bf16 with 128 × 2048 seeded random token ids; ``--preset cpu`` is the same
table in miniature on SmolLM2-135M (fp32, CPU). One run times:

- the floor: one dense forward over the calibration set D (C_F) and one forward+backward (C_FB) with gradients
  for the same weights GradMAP scores, each gradient dropped at once (median of ``--repeats``);
- every method as the suite runs it, looked up by name through :func:`gradmap.prune` at 25% removal: selection
  and repair timed apart, with CUDA synchronisation, an untimed warm-up forward and the allocator's peak memory.
  SLEB and PPL are timed on ``--extrapolate-candidates`` candidate forwards and scaled by the FLOPs of their exact
  pass count (marked *extrapolated*). LLM-Streamline's selection runs on D through ``prune()`` and its
  ``layer_replace`` training on its own ``--streamline-train-samples`` windows (``prune()`` gives selector and repair
  one tensor, and the paper trains on far more data than it selects on);

and prints one Markdown table (seconds, peak memory, ratio to GradMAP, cost in C_F, selection over its pass-count
floor), the GradMAP targets and the mean speedup over ``--speedup-baselines`` (docs/protocol.md §5). ``--out``
writes the same as JSON with the device, versions, date and exact command. A run may cover a subset (``--methods``)
and parts combine with ``--merge a.json b.json`` (same device and setup required), so the 7B table fits 10-minute slots.

Only torch, transformers and this project's core are imported, so it runs on a machine that has just those.
"""

from gradmap.bench.cli import main, parse_args, write_json
from gradmap.bench.config import (
    ARCHS,
    DEFAULT_SPEEDUP_SET,
    DTYPES,
    GIB,
    PRESETS,
    SCHEMA,
    BenchConfig,
    ModelFactory,
    calibration_ids,
)
from gradmap.bench.floor import forward_flops, measure_floor, sleb_candidate_layers, stage1_floor_passes
from gradmap.bench.runner import (
    ALL_METHODS,
    ENTRIES,
    Context,
    entry_gradmap,
    entry_gradmap_nobuffer,
    entry_gradmap_oneshot,
    entry_ppl,
    entry_replaceme,
    entry_sleb,
    entry_streamline,
    environment,
    run_bench,
    run_prune,
)
from gradmap.bench.tables import format_report, gradmap_targets, merge_results, summarize

__all__ = [
    "ALL_METHODS",
    "ARCHS",
    "DEFAULT_SPEEDUP_SET",
    "DTYPES",
    "ENTRIES",
    "GIB",
    "PRESETS",
    "SCHEMA",
    "BenchConfig",
    "Context",
    "ModelFactory",
    "calibration_ids",
    "entry_gradmap",
    "entry_gradmap_nobuffer",
    "entry_gradmap_oneshot",
    "entry_ppl",
    "entry_replaceme",
    "entry_sleb",
    "entry_streamline",
    "environment",
    "format_report",
    "forward_flops",
    "gradmap_targets",
    "main",
    "measure_floor",
    "merge_results",
    "parse_args",
    "run_bench",
    "run_prune",
    "sleb_candidate_layers",
    "stage1_floor_passes",
    "summarize",
    "write_json",
]
