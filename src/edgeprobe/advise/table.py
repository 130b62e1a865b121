"""The advisor's terminal rendering (rich tables). Text from InfluxDB (PoPs, endpoint URLs) goes
through :func:`edgeprobe.termtext.term_safe` and is never read as rich markup."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeprobe.advise.pairs import Stat
from edgeprobe.advise.report import Report
from edgeprobe.termtext import term_safe


def _t(value: object, style: str = "", max_chars: int = 300) -> Text:
    return Text(term_safe(value, max_chars), style=style)


def _columns(table: Table, names: tuple[str, ...], left: tuple[str, ...], wide_min: int | None = 24) -> None:
    """Columns in ``left`` left-aligned; endpoint and inputs get ``wide_min`` characters at least
    (None: let rich shrink them, for the widest table), the rest fold rather than crop."""
    for col in names:
        wide = col in ("endpoint", "inputs")
        table.add_column(
            col, justify="left" if col in left else "right", overflow="fold", min_width=wide_min if wide else None
        )


def ms(s: Stat | float | None, digits: int = 1, n: int | None = None) -> str:
    """A value; with ``n`` (the pair's samples), a Stat resting on fewer shows its own count."""
    v = s.value if isinstance(s, Stat) else s
    if v is None:
        return "–"
    text = f"{v:.{digits}f}"
    if isinstance(s, Stat) and n is not None and s.samples != n:
        text += f" (n={s.samples})"
    return text


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def render(report: Report, console: Console) -> None:
    src = report.source
    where = f", where {' and '.join(src.where)}" if src.where else ""
    console.print(
        _t(
            f"edgeprobe advise: {src.points_read} inference points, last {src.since}{where} "
            f"(database {src.database} at {src.url}); a pair needs ≥ {src.min_samples} samples to be ranked",
            max_chars=2000,
        )
    )

    t = Table(
        title="Per PoP × endpoint (ms; n = successful samples; a figure resting on fewer shows its own n)",
        title_justify="left",
    )
    _columns(
        t,
        (
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
            "infl.",
            "vs best",
        ),
        ("PoP", "endpoint"),
        None,
    )
    for p in report.pairs:
        if not p.ranked:
            vs = _t(f"too few samples ({p.samples})", "yellow")
        elif p.best:
            vs = _t("best", "bold green")
        else:
            vs = _t(f"{p.vs_best_ratio:.2f}× +{p.vs_best_ms:.1f}")
        t.add_row(
            _t(p.pop),
            _t(p.endpoint + (f" [{p.tier}]" if p.tier else "")),
            str(p.samples),
            pct(p.success_ratio),
            ms(p.ttft_p50_ms, 1, p.samples),
            ms(p.ttft_p95_ms, 1, p.samples),
            ms(p.setup_p50_ms, 1, p.samples),
            ms(p.net_rtt_p50_ms, 2, p.samples),
            ms(p.server_p50_ms, 1, p.samples),
            ms(p.itl_p95_ms, 1, p.samples),
            ms(p.floor_rtt_ms, 2, p.samples),
            ms(p.inflation_ratio, 2, p.samples),
            vs,
        )
    console.print(t)

    n = Table(
        title="Network vs server, TTFT p50 (ms): network = setup + request transit; the floor no software removes",
        title_justify="left",
    )
    _columns(n, ("PoP", "endpoint", "n", "TTFT", "network", "share", "of it floor", "server"), ("PoP", "endpoint"))
    for p in report.pairs:
        n.add_row(
            _t(p.pop),
            _t(p.endpoint),
            str(p.samples),
            ms(p.ttft_p50_ms, 1, p.samples),
            ms(p.network_p50_ms, 1, p.samples),
            pct(p.network_share_ratio.value),
            ms(p.floor_ttft_ms, 1, p.samples),
            ms(p.server_p50_ms, 1, p.samples),
        )
    console.print(n)

    if report.backtest:
        b = Table(
            title="Backtest: each measured endpoint predicted from the PoP's other paths (leave one out)",
            title_justify="left",
        )
        _columns(
            b, ("PoP", "endpoint", "measured p50", "n", "predicted", "error", "inputs"), ("PoP", "endpoint", "inputs")
        )
        for r in report.backtest:
            pr = r.prediction
            inputs = pr.reason or (
                f"{pr.distance_km:.0f} km, floor {pr.floor_rtt_ms:.2f} ms × infl. {pr.inflation_ratio:.2f} × "
                f"{pr.round_trips:g} RT + server {pr.server_ms:.1f} + overhead {pr.overhead_ms:.1f}"
            )
            b.add_row(
                _t(r.pop),
                _t(r.endpoint),
                ms(r.measured_ttft_p50_ms),
                str(r.measured_samples),
                ms(pr.predicted_ttft_p50_ms),
                pct(r.error_ratio),
                _t(inputs),
            )
        console.print(b)

    if report.candidates is not None:
        c = Table(title="What-if placements (PREDICTED TTFT p50, ms)", title_justify="left")
        _columns(
            c,
            ("rank", "candidate", "PoP", "predicted", "today's best", "gain", "inputs"),
            ("candidate", "PoP", "inputs"),
        )
        for cand in report.candidates:
            for i, pr in enumerate(cand.predictions):
                inputs = pr.reason or (
                    f"{pr.distance_km:.0f} km × infl. {pr.inflation_ratio:.2f} ({pr.inflation_samples} samples), "
                    f"{pr.round_trips:g} RT ({pr.round_trips_from}), server {pr.server_ms:.1f} ({pr.server_from}), "
                    f"overhead {pr.overhead_ms:.1f}"
                )
                gain = "–" if pr.gain_ms is None else f"{pr.gain_ms:+.1f}"
                c.add_row(
                    str(cand.rank or "–") if i == 0 else "",
                    _t(cand.name) if i == 0 else "",
                    _t(pr.pop),
                    ms(pr.predicted_ttft_p50_ms),
                    ms(pr.today_best_ttft_p50_ms),
                    gain,
                    _t(inputs),
                )
        console.print(c)
    if report.best_k is not None:
        bk = report.best_k
        s = Table(
            title=f"Best {bk.k} site(s), {bk.weights_from} weights: {bk.method}; today's weighted TTFT p50 "
            f"{ms(bk.today_weighted_ttft_p50_ms)} ms",
            title_justify="left",
        )
        _columns(s, ("step", "site", "kind", "weighted TTFT p50", "PoP weight served"), ("site", "kind"))
        for i, step in enumerate(bk.steps, 1):
            s.add_row(str(i), _t(step.site), step.kind, ms(step.weighted_ttft_p50_ms), pct(step.covered_weight_ratio))
        console.print(s)
    for note in report.notes:
        console.print(_t(f"note: {note}", "dim"))
