"""``--html FILE``: the advisor's report as one self-contained HTML page (pure: report in, text out).

Charts are hand-written inline SVG: no JavaScript, no library, no CDN, nothing fetched. A charting
library would add 50 kB to 1 MB of script to every report, a dependency to vet and update, and a
script that has to run before anything shows; the three charts here are horizontal bars (TTFT by
PoP and endpoint with the floor drawn in, network vs server stacked, the what-if ranking), which
SVG ``rect`` and ``text`` draw directly, scale without blur, print, and show in any browser,
offline, also with scripts disabled. The page's Content-Security-Policy forbids every fetch
(``default-src 'none'``), so a report that tried to load anything would show a console error.

Every value from InfluxDB or a file is escaped (:func:`html.escape`); every figure has its sample
count in its tooltip (SVG ``title``) and in the tables.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Final

from edgeprobe.advise.pairs import PairStats, Stat
from edgeprobe.advise.report import Report

ROW_H: Final = 18
LABEL_W: Final = 330
PLOT_W: Final = 560
RIGHT_W: Final = 150
COLORS: Final = {
    "floor": "#333333",
    "network": "#e8893a",
    "server": "#4a7fc1",
    "ttft": "#4a7fc1",
    "best": "#2e9b55",
    "unranked": "#bbbbbb",
    "predicted": "#9b59b6",
    "today": "#c0392b",
}
CSS: Final = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.muted{color:#777}.warn{color:#a66a00}.pred{color:#7d3c98;font-weight:600}
svg text{font:11px system-ui,sans-serif}svg .axis{stroke:#999;stroke-width:1}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _s(s: Stat, digits: int = 1) -> str:
    return "–" if s.value is None else f"{s.value:.{digits}f}"


def _share(s: Stat | None) -> str:
    return "–" if s is None or s.value is None else f"{100 * s.value:.0f} %"


def _clip(text: str, n: int = 48) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def _scale(values: Sequence[float | None]) -> float:
    top = max((v for v in values if v is not None), default=0.0)
    return PLOT_W / top if top > 0 else 0.0


def _axis(x0: int, height: int, scale: float, top: float) -> str:
    """A baseline and a few ticks in ms."""
    if scale <= 0:
        return ""
    step = 10 ** max(0, len(str(int(top))) - 1)
    while top / step > 8:
        step *= 2
    out = [f'<line class="axis" x1="{x0}" y1="{height - 16}" x2="{x0 + PLOT_W}" y2="{height - 16}"/>']
    v = 0.0
    while v <= top:
        x = x0 + v * scale
        out.append(f'<line class="axis" x1="{x:.1f}" y1="{height - 16}" x2="{x:.1f}" y2="{height - 12}"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 2}" text-anchor="middle">{v:g}</text>')
        v += step
    out.append(f'<text x="{x0 + PLOT_W}" y="{height - 20}" text-anchor="end" class="muted">ms</text>')
    return "".join(out)


def _svg(chart_id: str, title: str, rows: int, body: str) -> str:
    height = rows * ROW_H + 24
    width = LABEL_W + PLOT_W + RIGHT_W
    return (
        f'<svg class="chart" id="{chart_id}" role="img" aria-label="{esc(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>{body}</svg>'
    )


def chart_ttft(pairs: Sequence[PairStats]) -> str:
    """TTFT p50 per PoP and endpoint (bar), p95 (whisker), the floor (dark part at the start)."""
    scale = _scale([p.ttft_p95_ms.value for p in pairs] + [p.ttft_p50_ms.value for p in pairs])
    top = PLOT_W / scale if scale else 0.0
    parts = []
    for i, p in enumerate(pairs):
        y = i * ROW_H
        label = f"{p.pop} → {_clip(p.endpoint)}"
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>')
        v = p.ttft_p50_ms.value
        if v is None:
            parts.append(f'<text x="{LABEL_W + 4}" y="{y + 13}" class="muted">no successful sample</text>')
            continue
        color = COLORS["unranked"] if not p.ranked else COLORS["best"] if p.best else COLORS["ttft"]
        tip = (
            f"{p.pop} → {p.endpoint}: TTFT p50 {v:.1f} ms, p95 {_s(p.ttft_p95_ms)} ms, floor {_s(p.floor_ttft_ms)} ms "
            f"(n={p.samples}{'' if p.ranked else ', too few to rank'})"
        )
        parts.append(
            f'<rect class="bar ttft" x="{LABEL_W}" y="{y + 3}" width="{max(1.0, v * scale):.1f}" height="{ROW_H - 6}" '
            f'fill="{color}"><title>{esc(tip)}</title></rect>'
        )
        if p.floor_ttft_ms.value is not None:
            parts.append(
                f'<rect class="floor" x="{LABEL_W}" y="{y + 3}" width="{max(1.0, p.floor_ttft_ms.value * scale):.1f}" '
                f'height="{ROW_H - 6}" fill="{COLORS["floor"]}">'
                f"<title>{esc('physical floor: ' + _s(p.floor_ttft_ms) + ' ms')}</title></rect>"
            )
        if p.ttft_p95_ms.value is not None:
            x1, x2 = LABEL_W + v * scale, LABEL_W + p.ttft_p95_ms.value * scale
            parts.append(f'<line x1="{x1:.1f}" y1="{y + 9}" x2="{x2:.1f}" y2="{y + 9}" stroke="#555"/>')
            parts.append(f'<line x1="{x2:.1f}" y1="{y + 5}" x2="{x2:.1f}" y2="{y + 13}" stroke="#555"/>')
        note = f"{v:.1f} ms n={p.samples}" + ("" if p.ranked else " (too few)")
        parts.append(f'<text x="{LABEL_W + PLOT_W + 6}" y="{y + 13}">{esc(note)}</text>')
    parts.append(_axis(LABEL_W, len(pairs) * ROW_H + 24, scale, top))
    return _svg(
        "chart-ttft", "TTFT p50 by PoP and endpoint, p95 whisker, physical floor in black", len(pairs), "".join(parts)
    )


def chart_split(pairs: Sequence[PairStats]) -> str:
    """Stacked: floor | network above the floor | server (medians)."""
    totals = [
        (p.network_p50_ms.value or 0.0) + (p.server_p50_ms.value or 0.0) if p.network_p50_ms.value is not None else None
        for p in pairs
    ]
    scale = _scale(totals)
    top = PLOT_W / scale if scale else 0.0
    parts = []
    for i, p in enumerate(pairs):
        y = i * ROW_H
        parts.append(
            f'<text x="{LABEL_W - 6}" y="{y + 13}" text-anchor="end">{esc(f"{p.pop} → {_clip(p.endpoint)}")}</text>'
        )
        net, srv, floor = p.network_p50_ms.value, p.server_p50_ms.value, p.floor_ttft_ms.value
        if net is None:
            parts.append(f'<text x="{LABEL_W + 4}" y="{y + 13}" class="muted">network not measured</text>')
            continue
        floor_part = min(floor, net) if floor is not None else 0.0
        segments = [
            ("floor", floor_part, f"floor {floor_part:.1f} ms (no software removes it)"),
            (
                "network",
                net - floor_part,
                f"network above the floor {net - floor_part:.1f} ms "
                f"(network total {net:.1f} ms, n={p.network_p50_ms.samples})",
            ),
            ("server", srv or 0.0, f"server {_f(srv)} ms (n={p.server_p50_ms.samples})"),
        ]
        x = float(LABEL_W)
        for name, value, tip in segments:
            if value <= 0:
                continue
            w = value * scale
            parts.append(
                f'<rect class="bar {name}" x="{x:.1f}" y="{y + 3}" width="{max(0.5, w):.1f}" height="{ROW_H - 6}" '
                f'fill="{COLORS[name]}"><title>{esc(p.pop + " → " + p.endpoint + ": " + tip)}</title></rect>'
            )
            x += w
        share = p.network_share_ratio.value
        parts.append(
            f'<text x="{LABEL_W + PLOT_W + 6}" y="{y + 13}">'
            f"{esc(f'network {100 * share:.0f} %' if share is not None else '')}</text>"
        )
    parts.append(_axis(LABEL_W, len(pairs) * ROW_H + 24, scale, top))
    return _svg("chart-split", "Network vs server per PoP and endpoint (medians)", len(pairs), "".join(parts))


def chart_whatif(report: Report) -> str:
    """Per candidate (in rank order): the predicted weighted TTFT p50 with it added to today's
    endpoints (bar: what the rank is by), with it alone (tick), today's measured (dashed line)."""
    cands = report.candidates or []
    today = report.best_k.today_weighted_ttft_p50_ms if report.best_k else None
    scale = _scale(
        [c.weighted_ttft_p50_ms for c in cands] + [c.weighted_with_today_ttft_p50_ms for c in cands] + [today]
    )
    top = PLOT_W / scale if scale else 0.0
    parts = []
    for i, c in enumerate(cands):
        y = i * ROW_H
        parts.append(
            f'<text x="{LABEL_W - 6}" y="{y + 13}" text-anchor="end">'
            f"{esc('#' + str(c.rank or '–') + ' ' + _clip(c.name))}</text>"
        )
        added, alone = c.weighted_with_today_ttft_p50_ms, c.weighted_ttft_p50_ms
        if added is None or alone is None:
            parts.append(f'<text x="{LABEL_W + 4}" y="{y + 13}" class="muted">no prediction</text>')
            continue
        tip = (
            f"PREDICTED weighted TTFT p50 with {c.name} added to today's endpoints: {added:.1f} ms; "
            f"if every PoP used {c.name} alone: {alone:.1f} ms; faster than today for {c.pops_faster} PoP(s)"
        )
        parts.append(
            f'<rect class="bar predicted" x="{LABEL_W}" y="{y + 3}" width="{max(1.0, added * scale):.1f}" '
            f'height="{ROW_H - 6}" fill="{COLORS["predicted"]}"><title>{esc(tip)}</title></rect>'
        )
        x = LABEL_W + alone * scale
        parts.append(
            f'<line class="alone" x1="{x:.1f}" y1="{y + 2}" x2="{x:.1f}" y2="{y + ROW_H - 2}" stroke="#333" '
            f'stroke-width="2"><title>{esc(f"{c.name} alone: {alone:.1f} ms (predicted)")}</title></line>'
        )
        parts.append(
            f'<text x="{LABEL_W + PLOT_W + 6}" y="{y + 13}">{esc(f"{added:.1f} ms (alone {alone:.1f})")}</text>'
        )
    if today is not None and scale:
        x = LABEL_W + today * scale
        h = len(cands) * ROW_H
        parts.append(
            f'<line class="today" x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{h}" stroke="{COLORS["today"]}" '
            f'stroke-width="2" stroke-dasharray="4 3">'
            f"<title>{esc(f'today: {today:.1f} ms (measured, each PoP at its best endpoint)')}</title></line>"
        )
    parts.append(_axis(LABEL_W, len(cands) * ROW_H + 24, scale, top))
    return _svg(
        "chart-whatif",
        "What-if ranking: predicted weighted TTFT p50 with each candidate added (bar) and alone (tick); today dashed",
        len(cands),
        "".join(parts),
    )


def _pairs_table(pairs: Sequence[PairStats]) -> str:
    head = [
        "PoP",
        "endpoint",
        "n",
        "ok",
        "TTFT p50",
        "p95",
        "setup",
        "net RTT",
        "server",
        "ITL p95",
        "floor RTT",
        "inflation",
        "vs best",
    ]
    rows = []
    for p in pairs:
        if not p.ranked:
            vs = f'<span class="warn">too few samples ({p.samples})</span>'
        elif p.best:
            vs = "<b>best</b>"
        else:
            vs = f"{p.vs_best_ratio:.2f}× +{p.vs_best_ms:.1f} ms"
        cells = [
            f'<td class="l">{esc(p.pop)}</td>',
            f'<td class="l">{esc(p.endpoint)}</td>',
            f"<td>{p.samples}</td>",
            f"<td>{_f(100 * p.success_ratio if p.success_ratio is not None else None, 0)} %</td>",
            *(
                f'<td title="n={s.samples}">{_s(s, d)}</td>'
                for s, d in (
                    (p.ttft_p50_ms, 1),
                    (p.ttft_p95_ms, 1),
                    (p.setup_p50_ms, 1),
                    (p.net_rtt_p50_ms, 2),
                    (p.server_p50_ms, 1),
                    (p.itl_p95_ms, 1),
                    (p.floor_rtt_ms, 2),
                    (p.inflation_ratio, 2),
                )
            ),
            f"<td>{vs}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(head, rows, "pairs")


def _table(head: Sequence[str], rows: Sequence[str], table_id: str, left: Sequence[int] = (0, 1)) -> str:
    th = "".join(f'<th class="{"l" if i in left else ""}">{esc(h)}</th>' for i, h in enumerate(head))
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _whatif_table(report: Report) -> str:
    rows = []
    for c in report.candidates or []:
        for pr in c.predictions:
            inputs = pr.reason or (
                f"{_f(pr.distance_km, 0)} km, floor {_f(pr.floor_rtt_ms, 2)} ms "
                f"× inflation {_f(pr.inflation_ratio, 2)} "
                f"from {'; '.join(pr.inflation_from)} × {pr.round_trips:g} round trips ({pr.round_trips_from}) "
                f"+ server {_f(pr.server_ms)} ms ({pr.server_from}) "
                f"+ overhead {pr.overhead_ms:.1f} ms (DNS, TLS computation)"
            )
            rows.append(
                f'<tr><td class="l">{esc(c.rank or "–")} {esc(c.name)}</td><td class="l">{esc(pr.pop)}</td>'
                f'<td class="pred">{_f(pr.predicted_ttft_p50_ms)}</td><td>{_f(pr.today_best_ttft_p50_ms)}</td>'
                f'<td>{"–" if pr.gain_ms is None else f"{pr.gain_ms:+.1f}"}</td><td class="l">{esc(inputs)}</td></tr>'
            )
    return _table(
        ["candidate", "PoP", "predicted TTFT p50", "today's best", "gain ms", "inputs"], rows, "whatif", (0, 1, 5)
    )


def _backtest_table(report: Report) -> str:
    rows = []
    for r in report.backtest:
        pr = r.prediction
        rows.append(
            f'<tr><td class="l">{esc(r.pop)}</td><td class="l">{esc(r.endpoint)}</td>'
            f"<td>{r.measured_ttft_p50_ms:.1f}</td>"
            f'<td>{r.measured_samples}</td><td class="pred">{_f(pr.predicted_ttft_p50_ms)}</td>'
            f"<td>{'–' if r.error_ratio is None else f'{100 * r.error_ratio:.1f} %'}</td>"
            f'<td class="l">{esc(pr.reason or "; ".join(pr.inflation_from))}</td></tr>'
        )
    return _table(
        ["PoP", "endpoint", "measured p50", "n", "predicted", "error", "inflation learnt from"],
        rows,
        "backtest",
        (0, 1, 6),
    )


def legend(*names: str) -> str:
    return (
        '<div class="legend">'
        + "".join(f'<span style="background:{COLORS[n]}"></span>{esc(n)}' for n in names)
        + "</div>"
    )


def render_html(report: Report) -> str:
    src = report.source
    where = f", where {' and '.join(src.where)}" if src.where else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>edgeprobe advise</title>",
        f"<style>{CSS}</style></head><body>",
        '<h1>Where should inference live? <span class="muted">edgeprobe advise</span></h1>',
        f'<p class="muted">{esc(src.points_read)} inference points from database {esc(src.database)} '
        f"at {esc(src.url)}, "
        f"last {esc(src.since)}{esc(where)}, generated {esc(report.generated_at)}. A PoP × endpoint pair needs "
        f"≥ {src.min_samples} successful samples to be ranked; n is the number of samples behind each figure.</p>",
        "<h2>Best endpoint per PoP</h2>",
        _table(
            ["PoP", "best endpoint", "TTFT p50 ms", "n", "network share", "floor ms"],
            [
                f'<tr><td class="l">{esc(s.pop)}</td><td class="l">{esc(s.best_endpoint or "none ranked")}</td>'
                f"<td>{_s(s.best_ttft_p50_ms) if s.best_ttft_p50_ms else '–'}</td>"
                f"<td>{s.best_ttft_p50_ms.samples if s.best_ttft_p50_ms else 0}</td>"
                f"<td>{_share(s.network_share_ratio)}</td>"
                f"<td>{_s(s.floor_ttft_ms) if s.floor_ttft_ms else '–'}</td></tr>"
                for s in report.pops
            ],
            "pops",
        ),
        "<h2>TTFT by PoP and endpoint</h2>",
        legend("best", "ttft", "unranked", "floor"),
        chart_ttft(report.pairs),
        _pairs_table(report.pairs),
        "<h2>Network vs server</h2>",
        "<p>Network = connection set-up (DNS, TCP, TLS) + the request's and first token's transit; "
        "its dark part is the physical floor (light in fibre over the great-circle distance, × the round trips): "
        "the part no software can remove.</p>",
        legend("floor", "network", "server"),
        chart_split(report.pairs),
    ]
    if report.candidates is not None:
        parts += [
            '<h2>What-if placements <span class="pred">(predictions)</span></h2>',
            legend("predicted", "today"),
            "<p>Bar: the weighted TTFT p50 with the candidate added to today's endpoints (each PoP uses the "
            "faster); tick: the candidate alone; dashed: today, measured. All candidate figures are predictions.</p>",
            chart_whatif(report),
            _whatif_table(report),
        ]
    if report.best_k is not None:
        bk = report.best_k
        parts.append(
            f'<h2>Best {bk.k} site(s) <span class="pred">(predicted)</span></h2><p>{esc(bk.method)}; '
            f"{esc(bk.weights_from)} weights; today's weighted TTFT p50 "
            f"{_f(bk.today_weighted_ttft_p50_ms)} ms (measured).</p>"
        )
        parts.append(
            _table(
                ["step", "site", "kind", "weighted TTFT p50", "weight served"],
                [
                    f'<tr><td class="l">{i}</td><td class="l">{esc(s.site)}</td><td>{esc(s.kind)}</td>'
                    f"<td>{_f(s.weighted_ttft_p50_ms)}</td><td>{100 * s.covered_weight_ratio:.0f} %</td></tr>"
                    for i, s in enumerate(bk.steps, 1)
                ],
                "bestk",
            )
        )
    if report.backtest:
        parts += [
            "<h2>Backtest of the prediction method</h2>",
            "<p>Each measured endpoint predicted as if it were a candidate, from its PoP's other paths and the "
            "other endpoints' server time (leave one out), against its measured TTFT p50.</p>",
            _backtest_table(report),
        ]
    parts += ["<ul>", *(f"<li>{esc(n)}</li>" for n in report.notes), "</ul>", "</body></html>", ""]
    return "\n".join(parts)
