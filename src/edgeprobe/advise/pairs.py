"""Per PoP × endpoint statistics, the best endpoint of each PoP, and network vs server (pure).

Every figure is a :class:`Stat`: a value and the number of samples it rests on (a figure that
was not measured has ``value: None`` and ``samples: 0``, never 0). A pair with fewer successful
samples than ``min_samples`` is computed and shown but never ranked (``ranked: false``).

Definitions (all over the pair's successful points, ``outcome=ok``):

* ``ttft_p50_ms``/``ttft_p95_ms``: percentiles of ``ttft_ms`` (linear interpolation).
* ``setup_p50_ms`` (DNS + TCP + TLS until the request was written), ``dns_p50_ms``,
  ``net_rtt_p50_ms`` (one TCP handshake on a separate connection: one network round trip),
  ``server_p50_ms`` (``ttft - setup - net_rtt``): medians.
* ``network_p50_ms``: the median of ``setup_ms + net_rtt_ms`` per request: connection set-up plus
  the request's and the first token's transit. ``network_share_ratio``: the median of
  ``(setup + net_rtt) / ttft`` per request.
* ``itl_p95_ms``: the median over requests of each request's ``itl_p95_ms``.
* ``floor_rtt_ms``, ``floor_ttft_ms``, ``distance_km``: the physical floor the agent wrote
  (``probes/geo.py``); ``inflation_ratio``: the median of the points' ``net_rtt / floor_rtt``.
  ``round_trips``: ``floor_ttft_ms / floor_rtt_ms``, the round trips a first token needed.
* ``icmp_rtt_p50_ms``/``tcp_connect_p50_ms``: the median of the runs' medians from the same PoP
  to the endpoint's host (and port), where the fleet probes them.
* ``success_ratio``: ok points / all points of the pair.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import msgspec

from edgeprobe.advise.model import InferenceSample, PathSample, endpoint_host_port, path_host_port
from edgeprobe.probes.stats import percentile

OK = "ok"


class Stat(msgspec.Struct, frozen=True):
    """A figure and the number of samples it rests on."""

    value: float | None
    samples: int


NONE = Stat(None, 0)


def stat(values: Iterable[float | None], q: float = 50.0) -> Stat:
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    if not xs:
        return NONE
    return Stat(round(percentile(xs, q), 3), len(xs))


class PairStats(msgspec.Struct, kw_only=True):
    pop: str
    endpoint: str
    tier: str
    attempts: int  # all points, every outcome
    samples: int  # successful points (outcome=ok) with a TTFT
    ranked: bool  # samples >= min_samples
    success_ratio: float | None
    ttft_p50_ms: Stat
    ttft_p95_ms: Stat
    setup_p50_ms: Stat
    dns_p50_ms: Stat
    net_rtt_p50_ms: Stat
    server_p50_ms: Stat
    network_p50_ms: Stat
    network_share_ratio: Stat
    itl_p95_ms: Stat
    distance_km: Stat
    floor_rtt_ms: Stat
    floor_ttft_ms: Stat
    inflation_ratio: Stat
    round_trips: Stat
    icmp_rtt_p50_ms: Stat
    tcp_connect_p50_ms: Stat
    best: bool = False
    vs_best_ratio: float | None = None  # ttft_p50 / the PoP's best ttft_p50 (ranked pairs only)
    vs_best_ms: float | None = None


def _sum2(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _share(s: InferenceSample) -> float | None:
    net = _sum2(s.setup_ms, s.net_rtt_ms)
    if net is None or s.ttft_ms is None or s.ttft_ms <= 0:
        return None
    return net / s.ttft_ms


def _round_trips(s: InferenceSample) -> float | None:
    if s.floor_ttft_ms is None or s.floor_rtt_ms is None or s.floor_rtt_ms <= 0:
        return None
    return s.floor_ttft_ms / s.floor_rtt_ms


def pair_stats(samples: Sequence[InferenceSample], paths: Sequence[PathSample], min_samples: int) -> list[PairStats]:
    """One PairStats per (PoP, endpoint) seen, sorted by PoP then TTFT p50, best marked."""
    by_pair: dict[tuple[str, str], list[InferenceSample]] = defaultdict(list)
    for s in samples:
        by_pair[(s.site, s.target)].append(s)
    path_rtts: dict[tuple[str, str, str, int | None], list[float]] = defaultdict(list)
    for p in paths:
        if p.outcome == OK and p.rtt_ms is not None:
            host, port = path_host_port(p.kind, p.target)
            path_rtts[(p.kind, p.site, host, port)].append(p.rtt_ms)

    out = []
    for (pop, endpoint), points in by_pair.items():
        ok = [s for s in points if s.outcome == OK and s.ttft_ms is not None]

        def col(
            get: Callable[[InferenceSample], float | None], q: float = 50.0, ok: list[InferenceSample] = ok
        ) -> Stat:
            return stat((get(s) for s in ok), q)

        host, port = endpoint_host_port(endpoint)
        tiers = sorted({s.tier for s in points if s.tier})
        out.append(
            PairStats(
                pop=pop,
                endpoint=endpoint,
                tier=",".join(tiers),
                attempts=len(points),
                samples=len(ok),
                ranked=len(ok) >= min_samples,
                success_ratio=round(len(ok) / len(points), 4) if points else None,
                ttft_p50_ms=col(lambda s: s.ttft_ms),
                ttft_p95_ms=col(lambda s: s.ttft_ms, 95.0),
                setup_p50_ms=col(lambda s: s.setup_ms),
                dns_p50_ms=col(lambda s: s.dns_ms),
                net_rtt_p50_ms=col(lambda s: s.net_rtt_ms),
                server_p50_ms=col(lambda s: s.server_ms),
                network_p50_ms=col(lambda s: _sum2(s.setup_ms, s.net_rtt_ms)),
                network_share_ratio=col(_share),
                itl_p95_ms=col(lambda s: s.itl_p95_ms),
                distance_km=col(lambda s: s.distance_km),
                floor_rtt_ms=col(lambda s: s.floor_rtt_ms),
                floor_ttft_ms=col(lambda s: s.floor_ttft_ms),
                inflation_ratio=col(lambda s: s.inflation_ratio),
                round_trips=col(_round_trips),
                icmp_rtt_p50_ms=stat(path_rtts.get(("icmp", pop, host, None), [])),
                tcp_connect_p50_ms=stat(path_rtts.get(("tcp", pop, host, port), [])),
            )
        )
    mark_best(out)
    out.sort(key=lambda p: (p.pop, not p.ranked, p.ttft_p50_ms.value if p.ttft_p50_ms.value is not None else math.inf))
    return out


def mark_best(pairs: Sequence[PairStats]) -> None:
    """Mark each PoP's ranked pair of lowest TTFT p50 best; give the others their ratio and ms to it."""
    best: dict[str, float] = {}
    for p in pairs:
        v = p.ttft_p50_ms.value
        if p.ranked and v is not None and (p.pop not in best or v < best[p.pop]):
            best[p.pop] = v
    done: set[str] = set()
    for p in pairs:
        v, b = p.ttft_p50_ms.value, best.get(p.pop)
        if not p.ranked or v is None or b is None:
            continue
        if v == b and p.pop not in done:
            p.best = True
            done.add(p.pop)
        p.vs_best_ratio = round(v / b, 3) if b > 0 else None
        p.vs_best_ms = round(v - b, 3)


def best_by_pop(pairs: Sequence[PairStats]) -> dict[str, PairStats]:
    return {p.pop: p for p in pairs if p.best}


def pops(pairs: Sequence[PairStats]) -> list[str]:
    return sorted({p.pop for p in pairs})
