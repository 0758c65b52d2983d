"""Summaries of repeated timings: the median with the 10th and 90th percentiles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Median, p10 and p90 of `n` samples (percentiles interpolated linearly between samples)."""

    median: float
    p10: float
    p90: float
    n: int

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.p10 * factor, self.p90 * factor, self.n)


def spread(values) -> Spread:
    values = [float(value) for value in values]
    if not values:
        return Spread(float("nan"), float("nan"), float("nan"), 0)
    p10, median, p90 = np.percentile(values, [10, 50, 90]).tolist()
    return Spread(median, p10, p90, len(values))
