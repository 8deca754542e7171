"""Small summary statistics for results over several seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``0.0`` for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], precision: int = 2) -> str:
    """``"mean ± std"`` of ``values``, e.g. ``"79.12 ± 0.53"``."""
    mean, std = mean_std(values)
    return f"{mean:.{precision}f} ± {std:.{precision}f}"
