"""Pure statistics over RTT series. Lost samples are ``None`` and never count as zero."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import msgspec


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


class RttSummary(msgspec.Struct, kw_only=True):
    """Aggregates of one series of round trips (ICMP echoes, TCP connects …), in send order.

    Every aggregate is None when nothing was answered; the jitter measures need at least two
    answered samples. Duplicates never count as answers.
    """

    sent: int
    received: int
    duplicates: int
    loss_ratio: float
    rtt_min_ms: float | None
    rtt_avg_ms: float | None
    rtt_max_ms: float | None
    rtt_stddev_ms: float | None  # population stddev, iputils ping's "mdev"
    rtt_p50_ms: float | None
    rtt_p95_ms: float | None
    jitter_rfc3550_ms: float | None  # J += (|D| - J)/16 over consecutive answered samples, J0 = 0
    ipdv_mean_ms: float | None  # mean |RTT(i) - RTT(i-1)| over consecutive answered samples (RFC 3393)
    ipdv_p95_ms: float | None
    pdv_p95_ms: float | None  # p95 - min (RFC 5481 PDV)
    rtts_ms: list[float | None]  # per sample in send order, None when it got no answer


def _ms(value: float) -> float:
    return round(value, 6)  # nanosecond resolution; keeps float noise out of the JSON


def summarize_rtts(rtts_ms: Sequence[float | None], duplicates: int = 0) -> RttSummary:
    """Summarize a non-empty series of RTTs in send order (None = lost)."""
    ok = answered(rtts_ms)
    ordered = sorted(ok)
    n = len(ok)
    jitter = ipdv_mean = ipdv_p95 = pdv_p95 = None
    if n >= 2:
        diffs = [abs(b - a) for a, b in itertools.pairwise(ok)]
        j = 0.0
        for d in diffs:
            j += (d - j) / 16.0
        ordered_diffs = sorted(diffs)
        jitter = _ms(j)
        ipdv_mean = _ms(math.fsum(diffs) / len(diffs))
        ipdv_p95 = _ms(percentile(ordered_diffs, 95))
        pdv_p95 = _ms(percentile(ordered, 95) - ordered[0])
    return RttSummary(
        sent=len(rtts_ms),
        received=n,
        duplicates=duplicates,
        loss_ratio=loss_ratio(len(rtts_ms), n),
        rtt_min_ms=_ms(ordered[0]) if n else None,
        rtt_avg_ms=_ms(math.fsum(ok) / n) if n else None,
        rtt_max_ms=_ms(ordered[-1]) if n else None,
        rtt_stddev_ms=_ms(pstdev(ok)) if n else None,
        rtt_p50_ms=_ms(percentile(ordered, 50)) if n else None,
        rtt_p95_ms=_ms(percentile(ordered, 95)) if n else None,
        jitter_rfc3550_ms=jitter,
        ipdv_mean_ms=ipdv_mean,
        ipdv_p95_ms=ipdv_p95,
        pdv_p95_ms=pdv_p95,
        rtts_ms=list(rtts_ms),
    )
