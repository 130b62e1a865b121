"""Human and JSON renderings of one observation for the CLI (pure: observation in, text out)."""

from __future__ import annotations

from typing import Any

from probes.outcome import Outcome
from probes.schema import Observation


def as_json_obj(obs: Observation) -> dict[str, Any]:
    """The CLI's ``--json`` object: the kind's fields plus target, outcome and timing."""
    out: dict[str, Any] = {"url" if obs.kind == "http" else "target": obs.target}
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


RENDERERS = {"icmp": render_icmp, "tcp": render_tcp, "http": render_http}


def render(obs: Observation) -> list[str]:
    renderer = RENDERERS.get(obs.kind)
    lines = renderer(obs) if renderer else [f"{k}: {v}" for k, v in obs.fields.items()]
    err = error_line(obs)
    if err:
        lines.append(err)
    return lines
