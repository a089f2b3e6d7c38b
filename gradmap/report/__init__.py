"""The paper's tables and plots, and a plain verdict on the "about 4× faster" claim, from one sweep folder.

``python -m gradmap.report runs/<sweep> [--out DIR] [--speedup-baselines a,b,...|all] [--claim 4] [--wandb]``

Reads every ``runs/<sweep>/*/result.json`` and writes into ``runs/<sweep>/report/`` (or ``--out``):

* ``main.{csv,md,tex}`` — one row per model × ratio × method: each task, avg, WikiText-2 PPL, change vs the dense
  reference, selection/repair/total pruning time, peak memory, GradMAP's speedup vs that method, GradMAP's mean
  speedup over the stated averaging set, parameters kept and the pruned model's inference speedup vs dense.
* ``speedup.{csv,md,tex}`` — per model × ratio: t_method / t_GradMAP for every method, arithmetic and geometric
  means over the averaging set, and whether the claim holds there.
* ``jobs.csv`` — every job folder and its status (failed and incomplete ones included).
* plots (PNG + PDF): ``accuracy_vs_ratio``, ``ppl_vs_ratio``, ``pruning_time``, ``pareto``, ``removed_layers``,
  ``gradmap_stages``.
* ``verdict.md`` — per model and ratio: GradMAP's measured speedups and whether it is ahead on accuracy and PPL.
* ``README.md`` — an index that embeds the main table and names every file.

Conventions (docs/protocol.md §5–6): pruning time t = selection + repair (GradMAP: stage 1 + stage 2); loading,
calibration and evaluation are excluded. "GradMAP speedup vs b" = t_b / t_GradMAP (> 1: GradMAP is faster).
The default averaging set is docs/protocol.md §5's assumption [shortgpt, taylor_plus, sleb, streamline] — members
missing from the sweep are named, never silently replaced; ``--speedup-baselines all`` averages over every
baseline present (controls random/last_n and GradMAP variants excluded). avg = unweighted mean of the tasks'
primary metrics ×100; retention = avg / dense avg. Several runs of one cell (seeds) are averaged (metrics) or
take the median (times).

Tables are pandas (``to_csv``, ``to_markdown``, ``Styler.to_latex``); plots are matplotlib. Nothing else.
"""

from gradmap.report.cli import main
from gradmap.report.common import (
    CLAIM,
    CONTROLS,
    DEFAULT_AVERAGING,
    DENSE,
    GIB,
    GRADMAP,
    METHOD_ORDER,
    PLOTS,
    SHORT_PRUNE_S,
    TASK_LABELS,
)
from gradmap.report.driver import ReportFiles, build, index_md, parse_averaging, tables
from gradmap.report.plots import (
    pareto_front,
    plot_gradmap_stages,
    plot_metric_vs_ratio,
    plot_pareto,
    plot_pruning_time,
    plot_removed_layers,
)
from gradmap.report.rows import aggregate, load, row_of, variant_of
from gradmap.report.table import (
    Averaging,
    Column,
    display,
    display_columns,
    is_baseline,
    layers_label,
    main_caption,
    main_table,
    speedup_table,
    speedup_view,
    times,
    write_table,
)
from gradmap.report.verdicts import verdict
from gradmap.report.wandb_log import log_to_wandb

__all__ = [
    "CLAIM",
    "CONTROLS",
    "DEFAULT_AVERAGING",
    "DENSE",
    "GIB",
    "GRADMAP",
    "METHOD_ORDER",
    "PLOTS",
    "SHORT_PRUNE_S",
    "TASK_LABELS",
    "Averaging",
    "Column",
    "ReportFiles",
    "aggregate",
    "build",
    "display",
    "display_columns",
    "index_md",
    "is_baseline",
    "layers_label",
    "load",
    "log_to_wandb",
    "main",
    "main_caption",
    "main_table",
    "pareto_front",
    "parse_averaging",
    "plot_gradmap_stages",
    "plot_metric_vs_ratio",
    "plot_pareto",
    "plot_pruning_time",
    "plot_removed_layers",
    "row_of",
    "speedup_table",
    "speedup_view",
    "tables",
    "times",
    "variant_of",
    "verdict",
    "write_table",
]
