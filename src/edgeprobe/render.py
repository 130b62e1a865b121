"""Human and JSON renderings of one observation for the CLI (pure: observation in, text out)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from typing import Any

from edgeprobe.probes.outcome import Outcome
from edgeprobe.schema import Observation


def as_json_obj(obs: Observation) -> dict[str, Any]:
    """The CLI's ``--json`` object: the kind's fields plus target, outcome and timing."""
    out: dict[str, Any] = {"url" if obs.kind in ("http", "inference") else "target": obs.target}
    out.update(obs.fields)
    out["outcome"] = obs.outcome
    out["reason"] = obs.reason
    out["started_at_ns"] = obs.started_at_ns
    out["duration_ms"] = obs.duration_ms
    return out


def _ms(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"  # None: not measured, never shown as 0


def error_line(obs: Observation) -> str | None:
    """The one-line error for a failed run, or None when it succeeded."""
    if obs.outcome == Outcome.OK:
        return None
    return f"edgeprobe {obs.kind} {obs.target}: {obs.outcome}: {obs.reason or 'no reason given'}"


def render_icmp(obs: Observation) -> list[str]:
    f = obs.fields
    address = f.get("address") or obs.target
    lines = [
        f"PING {obs.target} ({address}) over a {f.get('socket', '?')} ICMP socket"
    ]
    rtts = f.get("rtts_ms") or []
    assert isinstance(rtts, list)
    for i, rtt in enumerate(rtts, start=1):
        lines.append(
            f"reply from {address}: icmp_seq={i} time={rtt:.3f} ms"
            if rtt is not None
            else f"no reply from {address}: icmp_seq={i}"
        )
    sent, received = f.get("sent"), f.get("received")
    if sent is not None:
        loss = f.get("loss_ratio")
        loss_pct = "-" if loss is None else f"{100 * float(loss):.1f}%"  # type: ignore[arg-type]
        dup = f.get("duplicates") or 0
        lines.append(f"--- {obs.target} ping statistics ---")
        lines.append(
            f"{sent} packets transmitted, {received} received"
            + (f", +{dup} duplicates" if dup else "")
            + f", {loss_pct} packet loss, time {obs.duration_ms:.0f} ms"
        )
        if f.get("rtt_min_ms") is not None:
            lines.append(
                "rtt min/avg/max/stddev = "
                f"{_ms(f.get('rtt_min_ms'))}/{_ms(f.get('rtt_avg_ms'))}/{_ms(f.get('rtt_max_ms'))}/"
                f"{_ms(f.get('rtt_stddev_ms'))} ms"
            )
            extra = [
                (k, f.get(k))
                for k in ("rtt_p50_ms", "rtt_p95_ms", "jitter_rfc3550_ms", "ipdv_mean_ms", "pdv_p95_ms")
                if f.get(k) is not None
            ]
            if extra:
                lines.append("  ".join(f"{k}={_ms(v)}" for k, v in extra))
    return lines


def render_tcp(obs: Observation) -> list[str]:
    f = obs.fields
    address = f.get("address") or obs.target
    lines = [f"TCP connect to {obs.target} ({address}), dns {_ms(f.get('dns_ms'))} ms"]
    attempts = f.get("connects_ms") or []
    assert isinstance(attempts, list)
    for i, c in enumerate(attempts, start=1):
        lines.append(f"  attempt {i}: " + (f"connected in {c:.3f} ms" if c is not None else "no connection"))
    if f.get("sent") is not None:
        lines.append(
            f"{f.get('sent')} attempts, {f.get('received')} connected; connect median {_ms(f.get('connect_ms'))} ms"
        )
    return lines


HTTP_PHASES = (
    ("dns", "dns_ms", "name lookup"),
    ("connect", "connect_ms", "TCP handshake"),
    ("tls", "tls_ms", "TLS handshake"),
    ("ttfb", "ttfb_ms", "first byte (cumulative)"),
    ("total", "total_ms", "last byte (cumulative)"),
)


def render_http(obs: Observation) -> list[str]:
    f = obs.fields
    status = f.get("status")
    lines = [
        f"{obs.target} → {f.get('address', '?')}  status {status if status is not None else '-'}"
        f"  {_ms(f.get('bytes'), 0)} bytes" + (f"  {f.get('tls_version')}" if f.get("tls_version") else "")
    ]
    for name, key, meaning in HTTP_PHASES:
        lines.append(f"  {name:<8} {_ms(f.get(key)):>10} ms   {meaning}")
    return lines


BAR_WIDTH = 40


def inference_phases(f: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(phase, start, end) in ms from the run's start; None where the phase was not measured.

    dns, connect and tls follow each other from 0 (a new connection only); ``wait`` runs from the
    request being written to the first response byte, ``first token`` from there to the first
    content event, ``stream`` from there to the end marker (or the last content event).
    """
    out: list[tuple[str, float | None, float | None]] = []
    t = 0.0
    for name in ("dns", "connect", "tls"):
        dur = f.get(f"{name}_ms")
        if isinstance(dur, int | float):
            out.append((name, t, t + dur))
            t += dur
        else:
            out.append((name, None, None))

    def num(key: str) -> float | None:
        v = f.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    setup, ttfb, ttft = num("setup_ms"), num("ttfb_ms"), num("ttft_ms")
    end = num("stream_end_ms") if num("stream_end_ms") is not None else num("e2e_ms")
    out.append(("wait", setup, ttfb))
    out.append(("first token", ttfb, ttft))
    out.append(("stream", ttft, end))
    return out


def _bar(start: float, end: float, scale: float, width: int = BAR_WIDTH) -> str:
    if scale <= 0:
        return ""
    a = min(width - 1, int(start / scale * width))
    cells = (end - start) / scale * width
    if cells < 0.5:
        return " " * a + "▏"
    b = min(width, max(a + 1, round(end / scale * width)))
    return " " * a + "█" * (b - a)


def _num(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_inference(obs: Observation) -> list[str]:
    f = obs.fields
    where = f.get("address")
    where_text = f" → {where}:{f.get('port')}" if where else ""
    status = f.get("status")
    lines = [
        f"{obs.target}{where_text}  {f.get('api', '?')}  model {f.get('model', '?')}"
        f"  HTTP {status if status is not None else '-'}  connection {f.get('connection') or '-'}"
        + (f"  {f.get('tls_version')}" if f.get("tls_version") else "")
    ]
    phases = inference_phases(f)
    ends = [e for _, _, e in phases if e is not None]
    scale = max(ends) if ends else 0.0
    lines.append(f"  {'phase':<12} {'start ms':>10} {'took ms':>10}  |0{'':{BAR_WIDTH - 2}}| {_num(scale, 1)} ms")
    for name, start, end in phases:
        if start is None or end is None:
            note = "  (reused connection)" if f.get("connection") == "reused" and name in ("dns", "connect") else ""
            lines.append(f"  {name:<12} {_num(start):>10} {'-':>10}{note}")
            continue
        lines.append(f"  {name:<12} {start:>10.3f} {end - start:>10.3f}  {_bar(start, end, scale)}")
    if f.get("chunks") is not None:
        src = f.get("output_tokens_source")
        prompt = f", {f.get('prompt_tokens')} prompt" if f.get("prompt_tokens") is not None else ""
        finish = f"; finish {f.get('finish_reason')}" if f.get("finish_reason") else ""
        lines.append(
            f"  tokens: {_num(f.get('output_tokens'), 0)} output ({src}) in {f.get('chunks')} chunk(s){prompt}{finish}"
        )
        lines.append(
            f"  itl p50/p95/max {_num(f.get('itl_p50_ms'))}/{_num(f.get('itl_p95_ms'))}/{_num(f.get('itl_max_ms'))} ms"
            f"  tpot {_num(f.get('tpot_ms'))} ms  {_num(f.get('tokens_per_s'), 1)} tokens/s"
            f"  e2e {_num(f.get('e2e_ms'))} ms"
        )
    if f.get("server_ms") is not None:
        lines.append(
            f"  network vs server: net_rtt {_num(f.get('net_rtt_ms'))} ms, "
            f"server ≈ {_num(f.get('server_ms'))} ms (ttft - setup - net_rtt)"
        )
    elif f.get("net_rtt_ms") is not None:
        lines.append(f"  network: net_rtt {_num(f.get('net_rtt_ms'))} ms")
    server_keys = ("load_ms", "prompt_eval_ms", "eval_ms", "server_total_ms")
    reported = [(k, f.get(k)) for k in server_keys if f.get(k) is not None]
    if reported:
        lines.append("  server reports: " + "  ".join(f"{k} {_num(v)}" for k, v in reported))
    headers = f.get("server_headers")
    if isinstance(headers, str):
        try:
            shown = json.loads(headers)
            lines.append("  served by: " + "  ".join(f"{k}={v}" for k, v in shown.items()))
        except (ValueError, AttributeError):
            lines.append(f"  served by: {headers}")
    return lines


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def inference_summary(observations: list[Observation]) -> list[str]:
    """Totals and medians over several inference runs (``edgeprobe ttft --count N``)."""
    if not observations:
        return []
    target = observations[0].target
    ok = [o for o in observations if o.outcome == Outcome.OK]
    failed = Counter(o.outcome for o in observations if o.outcome != Outcome.OK)
    conns = Counter(str(o.fields.get("connection")) for o in observations if o.fields.get("connection"))
    conn_text = ", ".join(f"{n} {kind}" for kind, n in sorted(conns.items()))
    fail_text = f", {sum(failed.values())} failed ({', '.join(f'{k} {n}' for k, n in sorted(failed.items()))})"
    lines = [
        f"--- {len(observations)} requests to {target}: {len(ok)} ok"
        + (fail_text if failed else "")
        + (f"; connections: {conn_text}" if conn_text else "")
        + " ---"
    ]

    def series(key: str) -> list[float]:
        return [float(v) for o in ok if isinstance(v := o.fields.get(key), int | float)]

    ttft = sorted(series("ttft_ms"))
    if ttft:
        lines.append(f"ttft min/median/max = {ttft[0]:.3f}/{_median(ttft):.3f}/{ttft[-1]:.3f} ms")
    medians = [
        (label, _median(series(key)))
        for label, key in (
            ("ttfb", "ttfb_ms"),
            ("setup", "setup_ms"),
            ("itl_p50", "itl_p50_ms"),
            ("tpot", "tpot_ms"),
            ("e2e", "e2e_ms"),
            ("net_rtt", "net_rtt_ms"),
            ("server", "server_ms"),
        )
    ]
    shown = [f"{label} {v:.3f}" for label, v in medians if v is not None]
    if shown:
        lines.append("medians (ms): " + "  ".join(shown))
    return lines


RENDERERS = {"icmp": render_icmp, "tcp": render_tcp, "http": render_http, "inference": render_inference}


def render(obs: Observation) -> list[str]:
    renderer = RENDERERS.get(obs.kind)
    lines = renderer(obs) if renderer else [f"{k}: {v}" for k, v in obs.fields.items()]
    err = error_line(obs)
    if err:
        lines.append(err)
    return lines
