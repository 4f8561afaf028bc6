"""Summaries of repeated measurements: median and spread, robust to a noisy, shared machine."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1]; got q={q!r}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles, extremes and count of ``values``."""
    return {
        "median": statistics.median(values),
        "q1": quantile(values, 0.25),
        "q3": quantile(values, 0.75),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def bootstrap_interval(groups: Sequence[Sequence[float]], combine: Callable[..., float], *,
                       level: float = 0.9, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float] | None:
    """The central ``level`` interval of ``combine(*medians)`` over ``resamples`` resamplings,
    each group drawn again with replacement, independently of the others (a percentile
    bootstrap; seeded, so a report reads the same when written again). How far the statistic
    would move between runs of as many repetitions on a machine as noisy as during these; not
    the drift from one run to a later one. None where a group has fewer than 2 values."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got level={level!r}")
    if any(len(g) < 2 for g in groups):
        return None
    rng = random.Random(seed)
    values = [combine(*(statistics.median(rng.choices(g, k=len(g))) for g in groups))
              for _ in range(resamples)]
    tail = (1.0 - level) / 2
    return quantile(values, tail), quantile(values, 1.0 - tail)
