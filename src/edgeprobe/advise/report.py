"""The advisor's whole answer as one structure: what ``--json`` prints (schema ``edgeprobe.advise/1``)
and what the table and the HTML renderers draw. Built from the pair statistics, pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from edgeprobe.advise.model import SCHEMA
from edgeprobe.advise.pairs import PairStats, Stat, best_by_pop, pops
from edgeprobe.advise.whatif import BacktestRow, BestK, CandidateResult, CandidatesFile, backtest, best_k, what_if


class Source(msgspec.Struct, kw_only=True):
    url: str
    database: str
    since: str
    where: list[str]
    min_samples: int
    max_points_per_series: int
    points_read: int  # inference points, every outcome


class PopSummary(msgspec.Struct, kw_only=True):
    pop: str
    endpoints: int  # seen from this PoP
    ranked_endpoints: int  # with >= min_samples successful samples
    best_endpoint: str | None
    best_ttft_p50_ms: Stat | None
    network_p50_ms: Stat | None  # of the best endpoint
    network_share_ratio: Stat | None
    floor_ttft_ms: Stat | None
    server_p50_ms: Stat | None


class Report(msgspec.Struct, kw_only=True):
    schema: str
    generated_at: str  # RFC 3339, UTC
    source: Source
    pops: list[PopSummary]
    pairs: list[PairStats]
    backtest: list[BacktestRow]
    candidates: list[CandidateResult] | None = None
    best_k: BestK | None = None
    notes: list[str] = msgspec.field(default_factory=list)


def pop_summaries(pairs: Sequence[PairStats]) -> list[PopSummary]:
    best = best_by_pop(pairs)
    out = []
    for pop in pops(pairs):
        mine = [p for p in pairs if p.pop == pop]
        b = best.get(pop)
        out.append(
            PopSummary(
                pop=pop,
                endpoints=len(mine),
                ranked_endpoints=sum(1 for p in mine if p.ranked),
                best_endpoint=b.endpoint if b else None,
                best_ttft_p50_ms=b.ttft_p50_ms if b else None,
                network_p50_ms=b.network_p50_ms if b else None,
                network_share_ratio=b.network_share_ratio if b else None,
                floor_ttft_ms=b.floor_ttft_ms if b else None,
                server_p50_ms=b.server_p50_ms if b else None,
            )
        )
    return out


def build_report(
    source: Source,
    pairs: Sequence[PairStats],
    generated_at: str,
    candidates: CandidatesFile | None = None,
    weights: Mapping[str, float] | None = None,
    k: int | None = None,
) -> Report:
    notes = []
    unranked = [p for p in pairs if not p.ranked]
    if unranked:
        notes.append(
            f"{len(unranked)} PoP × endpoint pair(s) have fewer than {source.min_samples} successful samples: "
            "shown, not ranked"
        )
    report = Report(
        schema=SCHEMA,
        generated_at=generated_at,
        source=source,
        pops=pop_summaries(pairs),
        pairs=list(pairs),
        backtest=backtest(pairs),
    )
    if candidates is not None:
        report.candidates = what_if(pairs, candidates, weights)
        report.best_k = best_k(pairs, report.candidates, k or 1, weights)
        missing = sorted(set(pops(pairs)) - set(candidates.pops))
        if missing:
            notes.append(f"no coordinates in the candidates file for PoP(s) {', '.join(missing)}: not predicted")
        if weights is not None:
            unknown = sorted(set(weights) - set(pops(pairs)))
            if unknown:
                notes.append(f"weights name PoP(s) without data: {', '.join(unknown)}")
    notes.append("predictions are model outputs, not measurements: each lists the inputs it used")
    report.notes = notes
    return report


def to_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)
