"""Pure statistics over RTT series. Lost samples are ``None`` and never count as zero."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an already sorted, non-empty series."""
    if not sorted_values:
        raise ValueError("percentile of an empty series")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(sorted_values[lo])
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def pstdev(values: Sequence[float]) -> float:
    """Population standard deviation, as iputils ``ping`` reports it (``mdev``)."""
    if not values:
        raise ValueError("stddev of an empty series")
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def answered(samples: Sequence[float | None]) -> list[float]:
    """The samples that got an answer, in send order."""
    return [s for s in samples if s is not None]


def loss_ratio(sent: int, received: int) -> float:
    """Share of probes without an answer. Duplicates never make it negative."""
    if sent <= 0:
        raise ValueError("loss ratio needs at least one probe sent")
    return max(0.0, (sent - received) / sent)
