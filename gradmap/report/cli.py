"""The command line of ``python -m gradmap.report`` (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gradmap.report.common import CLAIM, DEFAULT_AVERAGING
from gradmap.report.driver import build, parse_averaging
from gradmap.report.wandb_log import log_to_wandb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradmap.report", description="Tables, plots and verdict.md for one sweep folder."
    )
    parser.add_argument("sweep_dir", type=Path, help="runs/<sweep>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    parser.add_argument(
        "--speedup-baselines",
        default=None,
        help=f"comma-separated methods for the mean speedup, or 'all' (every baseline present); "
        f"default: {','.join(DEFAULT_AVERAGING)} (docs/protocol.md §5)",
    )
    parser.add_argument("--claim", type=float, default=CLAIM, help="the claimed mean speedup (default 4)")
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots as one W&B run")
    parser.add_argument("--no-plots", action="store_true", help="tables and verdict only (fast)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its font subsetting logs a line per table at INFO
    try:
        files = build(
            args.sweep_dir, args.out, parse_averaging(args.speedup_baselines), args.claim, plots=not args.no_plots
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.wandb:
        log_to_wandb(args.sweep_dir, files)
    print(f"report for {args.sweep_dir} -> {files.out}")
    print("tables: " + ", ".join(p.name for p in files.tables))
    print("plots:  " + ", ".join(p.name for p in files.plots))
    print(f"verdict: {files.verdict}")
    return 0
