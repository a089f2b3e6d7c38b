"""Paired bootstrap confidence intervals (scipy.stats.bootstrap) for differences between two methods.

Why paired: every method of a sweep is scored on the same items and the same PPL windows, so most of the spread of
an accuracy is shared by both methods (hard items are hard for both). Resampling the per-item *differences* removes
that shared part; treating the two accuracies as independent samples (``2 * hypot(se_a, se_b)``, the old rule)
keeps it and calls real differences noise.

* One task: percentile bootstrap of mean(a_i - b_i) over items.
* The average over tasks: items are resampled *within* each task (a stratified bootstrap: scipy resamples each of
  several samples independently when ``paired=False``), and the statistic is the unweighted mean over tasks of the
  per-task mean difference, exactly how ``avg`` is defined.
* Perplexity: windows are resampled (paired: the same windows for both methods) and the statistic is
  exp(sum nll_a / sum tokens) - exp(sum nll_b / sum tokens).

Defaults: 95 %, 2000 resamples, seed 0 (so a report is reproducible to the digit). Percentile intervals, not BCa: BCa
is undefined for the degenerate samples small evaluations produce (every difference 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
MIN_RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    """A difference (a - b) with its bootstrap CI and the number of items (or windows) behind it."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = LEVEL
    resamples: int = RESAMPLES

    @property
    def significant(self) -> bool:
        """The CI excludes 0 (a difference the data supports at this level)."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > 0 or self.high < 0))


def _check(resamples: int, level: float) -> None:
    if resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples={resamples} is too few for a 95 % interval; allowed: >= {MIN_RESAMPLES}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")


def _interval(
    samples: tuple[np.ndarray, ...], statistic: Any, paired: bool, n: int, resamples: int, level: float, seed: int
) -> Interval:
    estimate = float(statistic(*samples, axis=-1))
    if n < 2:  # one item or window: no spread to resample
        return Interval(estimate, math.nan, math.nan, n, level, resamples)
    res = stats.bootstrap(
        samples,
        statistic,
        paired=paired,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(estimate, low, high, n, level, resamples)


def _pair(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal 1-D shapes, got {a.shape} and {b.shape}")
    return a - b


def _mean(d: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(d, axis=axis)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> Interval:
    """mean(a - b) over items scored by both methods, with a percentile bootstrap CI over items."""
    _check(resamples, level)
    d = _pair(a, b)
    return _interval((d,), _mean, False, len(d), resamples, level, seed)


def _mean_of_means(*diffs: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([np.mean(d, axis=axis) for d in diffs], axis=0)


def stratified_paired_bootstrap(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval:
    """Unweighted mean over strata (tasks) of mean(a - b), resampling items within each stratum."""
    _check(resamples, level)
    diffs = tuple(_pair(a, b) for a, b in pairs)
    if not diffs or any(len(d) == 0 for d in diffs):
        raise ValueError("every stratum (task) needs at least one paired item")
    n = sum(len(d) for d in diffs)
    if min(len(d) for d in diffs) < 2:
        return Interval(float(_mean_of_means(*diffs)), math.nan, math.nan, n, level, resamples)
    return _interval(diffs, _mean_of_means, False, n, resamples, level, seed)


def _ppl_diff(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    total = np.sum(tokens, axis=axis)
    return np.exp(np.sum(nll_a, axis=axis) / total) - np.exp(np.sum(nll_b, axis=axis) / total)


def ppl_paired_bootstrap(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    tokens: Sequence[int],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval:
    """PPL_a - PPL_b over the same windows (summed NLL per window, scored tokens per window), windows resampled."""
    _check(resamples, level)
    a, b, t = (np.asarray(x, dtype=float) for x in (nll_a, nll_b, tokens))
    if not (a.shape == b.shape == t.shape) or a.ndim != 1:
        raise ValueError(f"window NLLs and token counts need equal 1-D shapes, got {a.shape}, {b.shape}, {t.shape}")
    return _interval((a, b, t), _ppl_diff, True, len(a), resamples, level, seed)


def independent_noise(a: Sequence[float], b: Sequence[float]) -> float:
    """The independent-samples rule this module replaces: 2 * hypot(se_a, se_b) of two accuracies (for contrast)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return 2 * math.hypot(float(np.std(a, ddof=1)) / math.sqrt(len(a)), float(np.std(b, ddof=1)) / math.sqrt(len(b)))


def _median_ratio(b: np.ndarray, a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(b, axis=axis) / np.median(a, axis=axis)


def ratio_bootstrap(
    t_b: Sequence[float], t_a: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> Interval:
    """median(t_b) / median(t_a) of two methods' timed spans (repeats, seeds), each resampled independently.

    With fewer than 2 spans on either side the interval is undefined (NaN): one timing has no spread to resample.
    """
    _check(resamples, level)
    b, a = np.asarray(t_b, dtype=float), np.asarray(t_a, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ratio_bootstrap needs at least one timing per method")
    if min(len(a), len(b)) < 2:
        return Interval(float(_median_ratio(b, a)), math.nan, math.nan, min(len(a), len(b)), level, resamples)
    return _interval((b, a), _median_ratio, False, min(len(a), len(b)), resamples, level, seed)
