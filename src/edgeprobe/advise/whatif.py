"""What-if placements (pure): a TTFT prediction for an endpoint at a place nobody measured yet.

For a PoP *p* and a candidate site *c* at great-circle distance *d* (``probes/geo.py``)::

    predicted TTFT p50 = server_ms + overhead_ms + round_trips × floor_rtt_ms(d) × inflation_p(d)

* ``floor_rtt_ms(d)``: light in straight fibre there and back (the physical floor).
* ``inflation_p(d)``: how far *p*'s real paths are from that floor, observed on *p*'s measured
  (ranked) paths of similar length: the median inflation of those within a factor of 2 of *d*,
  else of the one nearest in length (log scale). The paths used are named in the prediction.
* ``round_trips``: what a first token needed on *p*'s measured paths (``floor_ttft / floor_rtt``:
  3 for a fresh TLS 1.3 connection, 1 on a reused one), unless the candidate says.
* ``server_ms``: the candidate's, else the median of the measured endpoints' server time p50.
* ``overhead_ms``: *p*'s network time that is not round trips (DNS: the resolver does not move
  with the endpoint; TLS computation; writing the request): the median over *p*'s measured paths
  of ``network_p50 - round_trips × net_rtt_p50``, never below 0.

Every prediction carries these inputs. :func:`backtest` checks the method on the data itself:
each measured pair is predicted from the PoP's *other* paths and the other endpoints' server time,
and compared with what was measured. :func:`best_k` chooses k sites (candidates and today's
endpoints) for the lowest weighted TTFT p50 (PoPs left unserved count first): exactly, by trying
every set of k while there are at most EXACT_MAX_COMBINATIONS of them, else greedily (each step
adds the site that lowers it most; not guaranteed optimal: this is the k-median problem); the
result says which.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from statistics import median
from typing import Annotated, Final

import msgspec

from edgeprobe import configfile
from edgeprobe.advise.pairs import PairStats, best_by_pop, pops
from edgeprobe.probes.geo import ROUND_TRIPS_TO_FIRST_BYTE, floor_rtt_ms, great_circle_km

SIMILAR_LENGTH_FACTOR: Final = 2.0
MIN_PATH_KM: Final = 1.0  # shorter paths have no inflation (geo.inflation_ratio)
ASSUMED_ROUND_TRIPS: Final = ROUND_TRIPS_TO_FIRST_BYTE["tls1.3"]
EXACT_MAX_COMBINATIONS: Final = 100_000  # best-k tries every set up to this many, else greedy

Latitude = Annotated[float, msgspec.Meta(ge=-90, le=90)]
Longitude = Annotated[float, msgspec.Meta(ge=-180, le=180)]


class Location(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    latitude: Latitude
    longitude: Longitude


class Candidate(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    latitude: Latitude
    longitude: Longitude
    server_ms: Annotated[float, msgspec.Meta(ge=0, le=600_000)] | None = None  # default: measured median
    round_trips: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None  # default: as measured per PoP


class CandidatesFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``--candidates FILE``: where the PoPs' users are, and the sites to consider."""

    pops: dict[str, Location]  # PoP (site tag) -> its coordinates (the agents' latitude/longitude)
    candidates: Annotated[list[Candidate], msgspec.Meta(min_length=1, max_length=1000)]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for c in self.candidates:
            if c.name in seen:
                raise ValueError(f"candidates: the name {c.name!r} appears twice; names must be unique")
            seen.add(c.name)


Weight = Annotated[float, msgspec.Meta(ge=0, le=1e15)]


def load_candidates(path: str | os.PathLike[str]) -> CandidatesFile:
    """Read and validate a candidates file; ConfigError naming the file, key and expectation."""
    data = configfile.read_yaml(path)
    pops = data.get("pops")
    if isinstance(pops, dict):  # check each PoP first, so that an error names it (pops.nyc.latitude)
        for name, value in pops.items():
            configfile.convert(value, Location, str(path), prefix=f"pops.{name}")
    return configfile.convert(data, CandidatesFile, str(path))


def load_weights(path: str | os.PathLike[str]) -> dict[str, float]:
    """``--weights FILE``: a mapping PoP -> users or requests (numbers >= 0, not all 0)."""
    data = configfile.read_yaml(path)
    weights = {
        str(pop): float(configfile.convert(value, Weight, str(path), prefix=str(pop))) for pop, value in data.items()
    }
    if not weights or sum(weights.values()) <= 0:
        raise configfile.ConfigError(f"{path}: (top level): expected at least one PoP with a weight above 0")
    return weights


class Prediction(msgspec.Struct, kw_only=True):
    """A predicted TTFT p50 for the users of ``pop`` at site ``site``, with every input it used."""

    pop: str
    site: str
    predicted_ttft_p50_ms: float | None
    reason: str | None = None  # why there is no prediction
    distance_km: float | None = None
    floor_rtt_ms: float | None = None
    inflation_ratio: float | None = None
    inflation_from: list[str] = msgspec.field(default_factory=list)  # "endpoint (km, inflation, n)"
    inflation_samples: int = 0
    round_trips: float | None = None
    round_trips_from: str = ""  # "measured" | "candidate" | "assumed (https, TLS 1.3)"
    server_ms: float | None = None
    server_from: str = ""
    overhead_ms: float = 0.0  # DNS, TLS computation, request write: network time that is not round trips
    today_best_endpoint: str | None = None
    today_best_ttft_p50_ms: float | None = None
    gain_ms: float | None = None  # today's best - predicted: > 0 is faster than today
    gain_ratio: float | None = None  # today's best / predicted


def _paths_with_inflation(pairs: Sequence[PairStats]) -> list[PairStats]:
    return [
        p
        for p in pairs
        if p.ranked
        and p.inflation_ratio.value is not None
        and p.distance_km.value is not None
        and p.distance_km.value >= MIN_PATH_KM
    ]


def inflation_for(paths: Sequence[PairStats], distance_km: float) -> tuple[float, list[PairStats]] | None:
    """The median inflation of the paths within SIMILAR_LENGTH_FACTOR of ``distance_km``, else of
    the one nearest in length (log scale); None without any path."""
    usable = [p for p in paths if p.distance_km.value is not None and p.inflation_ratio.value is not None]
    if not usable:
        return None
    d = max(distance_km, MIN_PATH_KM)
    similar = [
        p for p in usable if 1 / SIMILAR_LENGTH_FACTOR <= (p.distance_km.value or 0) / d <= SIMILAR_LENGTH_FACTOR
    ]
    if not similar:
        similar = [min(usable, key=lambda p: abs(math.log(max(p.distance_km.value or 0, MIN_PATH_KM) / d)))]
    return median(p.inflation_ratio.value or 0.0 for p in similar), similar


def server_median(pairs: Sequence[PairStats], exclude_endpoint: str | None = None) -> tuple[float, int] | None:
    """The median over endpoints of each endpoint's median server time (its ranked pairs)."""
    per_endpoint: dict[str, list[float]] = {}
    for p in pairs:
        if p.ranked and p.server_p50_ms.value is not None and p.endpoint != exclude_endpoint:
            per_endpoint.setdefault(p.endpoint, []).append(p.server_p50_ms.value)
    if not per_endpoint:
        return None
    return round(median(median(v) for v in per_endpoint.values()), 3), len(per_endpoint)


def _pop_overhead(paths: Sequence[PairStats]) -> float:
    values = [
        p.network_p50_ms.value - p.round_trips.value * p.net_rtt_p50_ms.value
        for p in paths
        if p.ranked
        and p.network_p50_ms.value is not None
        and p.round_trips.value is not None
        and p.net_rtt_p50_ms.value is not None
    ]
    return round(max(0.0, median(values)), 3) if values else 0.0


def _pop_round_trips(paths: Sequence[PairStats]) -> float | None:
    values = [p.round_trips.value for p in paths if p.ranked and p.round_trips.value is not None]
    return round(median(values), 3) if values else None


def predict(
    pop: str,
    site: str,
    distance_km: float,
    pop_pairs: Sequence[PairStats],
    server: tuple[float, str] | None,
    round_trips: int | None = None,
) -> Prediction:
    """One prediction from ``pop``'s measured pairs (those of other endpoints, for a backtest)."""
    out = Prediction(pop=pop, site=site, predicted_ttft_p50_ms=None, distance_km=round(distance_km, 3))
    floor = floor_rtt_ms(distance_km)
    out.floor_rtt_ms = round(floor, 4)
    found = inflation_for(_paths_with_inflation(pop_pairs), distance_km)
    if found is None:
        out.reason = (
            "no ranked path from this PoP with a physical floor (coordinates on both ends) to learn inflation from"
        )
        return out
    inflation, used = found
    out.inflation_ratio = round(inflation, 4)
    out.inflation_from = [
        f"{p.endpoint} ({p.distance_km.value:.0f} km, ×{p.inflation_ratio.value:.2f}, n={p.inflation_ratio.samples})"
        for p in used
    ]
    out.inflation_samples = sum(p.inflation_ratio.samples for p in used)
    if round_trips is not None:
        rt: float = round_trips
        out.round_trips_from = "candidate"
    else:
        measured = _pop_round_trips(pop_pairs)
        rt = measured if measured is not None else ASSUMED_ROUND_TRIPS
        out.round_trips_from = "measured" if measured is not None else "assumed (https, TLS 1.3, new connection)"
    out.round_trips = rt
    if server is None:
        out.reason = "no measured server time to assume (and none given for the candidate)"
        return out
    out.server_ms, out.server_from = server
    out.overhead_ms = _pop_overhead(pop_pairs)
    out.predicted_ttft_p50_ms = round(out.server_ms + out.overhead_ms + rt * floor * inflation, 3)
    return out


def _with_today(pred: Prediction, today: PairStats | None) -> Prediction:
    if today is not None and today.ttft_p50_ms.value is not None:
        pred.today_best_endpoint = today.endpoint
        pred.today_best_ttft_p50_ms = today.ttft_p50_ms.value
        if pred.predicted_ttft_p50_ms is not None:
            pred.gain_ms = round(today.ttft_p50_ms.value - pred.predicted_ttft_p50_ms, 3)
            pred.gain_ratio = (
                round(today.ttft_p50_ms.value / pred.predicted_ttft_p50_ms, 3)
                if pred.predicted_ttft_p50_ms > 0
                else None
            )
    return pred


class CandidateResult(msgspec.Struct, kw_only=True):
    name: str
    latitude: float
    longitude: float
    rank: int | None  # 1 = best; None: no PoP could be predicted
    weighted_ttft_p50_ms: float | None  # predicted, weighted over the PoPs predicted
    weighted_with_today_ttft_p50_ms: float | None  # each PoP's better of today's best and this site
    weighted_gain_ms: float | None  # weighted mean over PoPs of max(0, today's best - predicted)
    pops_faster: int  # PoPs for which it is predicted faster than today's best
    predictions: list[Prediction]


def _weight(weights: Mapping[str, float] | None, pop: str) -> float:
    return 1.0 if weights is None else weights.get(pop, 0.0)


def _wmean(items: Sequence[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in items)
    return round(sum(v * w for v, w in items) / total, 3) if total > 0 else None


def what_if(
    pairs: Sequence[PairStats], file: CandidatesFile, weights: Mapping[str, float] | None
) -> list[CandidateResult]:
    """A prediction for every PoP with coordinates and every candidate; candidates ranked."""
    best = best_by_pop(pairs)
    measured_server = server_median(pairs)
    results = []
    for c in file.candidates:
        if c.server_ms is not None:
            server: tuple[float, str] | None = (c.server_ms, "candidate")
        elif measured_server is not None:
            server = (measured_server[0], f"median of {measured_server[1]} measured endpoints")
        else:
            server = None
        preds = []
        for pop in pops(pairs):
            loc = file.pops.get(pop)
            if loc is None:
                preds.append(
                    Prediction(
                        pop=pop,
                        site=c.name,
                        predicted_ttft_p50_ms=None,
                        reason="no coordinates for this PoP in the candidates file",
                    )
                )
                continue
            d = great_circle_km(loc.latitude, loc.longitude, c.latitude, c.longitude)
            pop_pairs = [p for p in pairs if p.pop == pop]
            preds.append(_with_today(predict(pop, c.name, d, pop_pairs, server, c.round_trips), best.get(pop)))
        ok = [p for p in preds if p.predicted_ttft_p50_ms is not None and _weight(weights, p.pop) > 0]
        results.append(
            CandidateResult(
                name=c.name,
                latitude=c.latitude,
                longitude=c.longitude,
                rank=None,
                weighted_ttft_p50_ms=_wmean([(p.predicted_ttft_p50_ms or 0.0, _weight(weights, p.pop)) for p in ok]),
                weighted_with_today_ttft_p50_ms=_wmean(
                    [
                        (
                            min(p.predicted_ttft_p50_ms or 0.0, p.today_best_ttft_p50_ms or math.inf),
                            _weight(weights, p.pop),
                        )
                        for p in ok
                    ]
                ),
                weighted_gain_ms=_wmean([(max(0.0, p.gain_ms or 0.0), _weight(weights, p.pop)) for p in ok]),
                pops_faster=sum(1 for p in ok if p.gain_ms is not None and p.gain_ms > 0),
                predictions=preds,
            )
        )
    ranked = sorted(
        (r for r in results if r.weighted_with_today_ttft_p50_ms is not None),
        key=lambda r: (r.weighted_with_today_ttft_p50_ms or 0.0, r.weighted_ttft_p50_ms or 0.0),
    )
    for i, r in enumerate(ranked, 1):
        r.rank = i
    results.sort(key=lambda r: (r.rank is None, r.rank or 0))
    return results


class Assignment(msgspec.Struct, kw_only=True):
    pop: str
    weight: float
    site: str | None
    ttft_p50_ms: float | None
    predicted: bool  # True: a what-if prediction; False: measured today


class BestKStep(msgspec.Struct, kw_only=True):
    site: str
    kind: str  # "candidate" | "endpoint"
    weighted_ttft_p50_ms: float | None
    covered_weight_ratio: float


class BestK(msgspec.Struct, kw_only=True):
    k: int
    method: str
    weights_from: str  # "file" | "equal"
    today_weighted_ttft_p50_ms: float | None  # each PoP at today's best endpoint, same weights
    steps: list[BestKStep]
    assignment: list[Assignment]


def best_k(
    pairs: Sequence[PairStats], candidates: Sequence[CandidateResult], k: int, weights: Mapping[str, float] | None
) -> BestK:
    """Greedy best-k sites among the candidates and today's endpoints, for the weighted TTFT p50."""
    pop_list = sorted(weights) if weights is not None else pops(pairs)
    w = {p: _weight(weights, p) for p in pop_list}
    total = sum(w.values())
    value: dict[tuple[str, str], tuple[float, bool]] = {}  # (site, pop) -> (ttft p50, predicted)
    kinds: dict[str, str] = {}
    for p in pairs:
        if p.ranked and p.ttft_p50_ms.value is not None and p.pop in w:
            value[(p.endpoint, p.pop)] = (p.ttft_p50_ms.value, False)
            kinds[p.endpoint] = "endpoint"
    for c in candidates:
        for pred in c.predictions:
            if pred.predicted_ttft_p50_ms is not None and pred.pop in w:
                value[(c.name, pred.pop)] = (pred.predicted_ttft_p50_ms, True)
                kinds[c.name] = "candidate"
    sites = sorted(kinds)

    def score(chosen: Sequence[str]) -> tuple[float, float | None]:
        """(uncovered weight, weighted TTFT p50 over the covered PoPs)."""
        items, uncovered = [], 0.0
        for pop in pop_list:
            vals = [value[(s, pop)][0] for s in chosen if (s, pop) in value]
            if vals:
                items.append((min(vals), w[pop]))
            else:
                uncovered += w[pop]
        return uncovered, _wmean(items)

    def key(chosen: Sequence[str]) -> tuple[float, float]:
        uncovered, mean = score(chosen)
        return uncovered, mean if mean is not None else math.inf

    n = min(k, len(sites))
    if math.comb(len(sites), n) <= EXACT_MAX_COMBINATIONS:
        best_set = min(itertools.combinations(sites, n), key=key, default=())
        # in the order a greedy walk through the best set would add them, for the steps
        chosen_order: list[str] = []
        rest = list(best_set)
        while rest:
            nxt = min(rest, key=lambda s: (*key([*chosen_order, s]), s))
            chosen_order.append(nxt)
            rest.remove(nxt)
        method = f"exact (all {math.comb(len(sites), n)} combinations of {n} among {len(sites)} sites)"
    else:
        chosen_order = []
        for _ in range(n):
            options = [s for s in sites if s not in chosen_order]
            chosen_order.append(min(options, key=lambda s: (*key([*chosen_order, s]), s)))
        method = (
            f"greedy ({math.comb(len(sites), n)} combinations are too many to try: each step adds the site "
            "that lowers the weighted TTFT p50 most; not guaranteed optimal)"
        )
    chosen: list[str] = []
    steps = []
    for pick in chosen_order:
        chosen.append(pick)
        uncovered, mean = score(chosen)
        steps.append(
            BestKStep(
                site=pick,
                kind=kinds[pick],
                weighted_ttft_p50_ms=mean,
                covered_weight_ratio=round((total - uncovered) / total, 4) if total > 0 else 0.0,
            )
        )
    assignment = []
    for pop in pop_list:
        opts = [(value[(s, pop)], s) for s in chosen if (s, pop) in value]
        if opts:
            (v, predicted), s = min(opts)
            assignment.append(Assignment(pop=pop, weight=w[pop], site=s, ttft_p50_ms=v, predicted=predicted))
        else:
            assignment.append(Assignment(pop=pop, weight=w[pop], site=None, ttft_p50_ms=None, predicted=False))
    best = best_by_pop(pairs)
    today = _wmean([(best[p].ttft_p50_ms.value or 0.0, w[p]) for p in pop_list if p in best])
    return BestK(
        k=k,
        method=method,
        weights_from="equal" if weights is None else "file",
        today_weighted_ttft_p50_ms=today,
        steps=steps,
        assignment=assignment,
    )


class BacktestRow(msgspec.Struct, kw_only=True):
    pop: str
    endpoint: str
    measured_ttft_p50_ms: float
    measured_samples: int
    prediction: Prediction
    error_ms: float | None  # predicted - measured
    error_ratio: float | None  # |predicted - measured| / measured


def backtest(pairs: Sequence[PairStats]) -> list[BacktestRow]:
    """Each ranked pair with a floor, predicted as if its endpoint were a candidate: from the PoP's
    other paths and the other endpoints' server time (leave one out), against what was measured."""
    rows = []
    for p in pairs:
        if not p.ranked or p.ttft_p50_ms.value is None or p.distance_km.value is None:
            continue
        others = [q for q in pairs if q.pop == p.pop and q.endpoint != p.endpoint]
        srv = server_median(pairs, exclude_endpoint=p.endpoint)
        server = (srv[0], f"median of {srv[1]} other measured endpoints") if srv is not None else None
        pred = predict(p.pop, p.endpoint, p.distance_km.value, others, server)
        measured = p.ttft_p50_ms.value
        err = None if pred.predicted_ttft_p50_ms is None else round(pred.predicted_ttft_p50_ms - measured, 3)
        rows.append(
            BacktestRow(
                pop=p.pop,
                endpoint=p.endpoint,
                measured_ttft_p50_ms=measured,
                measured_samples=p.ttft_p50_ms.samples,
                prediction=pred,
                error_ms=err,
                error_ratio=round(abs(err) / measured, 4) if err is not None and measured > 0 else None,
            )
        )
    return rows
