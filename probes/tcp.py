"""TCP connect probe: resolve once, then time ``count`` TCP handshakes to the same address.

Each attempt opens a new connection and closes it (FIN) as soon as the handshake completes;
nothing is sent. ``dns_ms`` is the duration of the one ``getaddrinfo`` before the attempts.
``connects_ms`` holds every attempt in order (None: refused, timed out or unreachable);
``connect_ms`` is the **median** of the answered attempts (also ``connect_p50_ms``), and
``connect_min/avg/max/stddev/p95_ms`` summarise them (population stddev, linear-interpolated p95).
Jitter of the series, under the same definitions as ICMP's (:func:`edgeprobe.probes.stats.summarize_rtts`)
with a ``connect_`` prefix: ``connect_jitter_rfc3550_ms`` (J += (|D| − J)/16 over consecutive
answered attempts), ``connect_ipdv_mean_ms``/``connect_ipdv_p95_ms`` (|Cᵢ − Cᵢ₋₁|, RFC 3393) and
``connect_pdv_p95_ms`` (p95 − min, RFC 5481); None with fewer than two answered attempts.
Failed attempts are never zero-time samples and stay in ``loss_ratio``. Attempts start ``interval_s`` apart
(start to start, like ``ping -i``); one that takes longer delays the next. A run where some
attempts failed is ``ok`` with ``loss_ratio`` > 0; a run where all failed raises the most common
failure (``refused``, ``timeout`` …) with the partial result.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import Counter
from typing import Annotated, Final, Literal

import msgspec

from edgeprobe.probes import netio
from edgeprobe.probes.context import ProbeContext, Step
from edgeprobe.probes.kind import Figure, LiveView, PolicyCost, ProbeKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.probes.stats import summarize_rtts
from edgeprobe.probes.text import num
from edgeprobe.schema import Observation


class TcpConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    interval_s: Annotated[float, msgspec.Meta(ge=0.01, le=60)] = 0.5  # start to start
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 3.0  # per attempt, and for the DNS lookup
    family: Literal["auto", "ipv4", "ipv6"] = "auto"


class TcpResult(msgspec.Struct, kw_only=True):
    port: int
    address: str | None = None  # the IP connected to
    dns_ms: float | None = None
    sent: int = 0  # attempts made
    received: int = 0  # attempts that completed the handshake
    loss_ratio: float | None = None
    connect_ms: float | None = None  # median of the answered attempts
    connect_min_ms: float | None = None
    connect_avg_ms: float | None = None
    connect_max_ms: float | None = None
    connect_stddev_ms: float | None = None
    connect_p95_ms: float | None = None
    connect_p50_ms: float | None = None  # the same as connect_ms, named like rtt_p50_ms
    connect_jitter_rfc3550_ms: float | None = None
    connect_ipdv_mean_ms: float | None = None
    connect_ipdv_p95_ms: float | None = None
    connect_pdv_p95_ms: float | None = None
    connects_ms: list[float | None] = []  # per attempt, in order; None: no handshake


_USAGE: Final = "expected HOST:PORT (e.g. example.net:443 or [2001:db8::1]:443), got {!r}"
_BRACKETED_RE: Final = re.compile(r"\A\[([^\[\]]+)\]:(\d{1,5})\Z")
_HOST_RE: Final = re.compile(r"\A[^\s/@\[\]:]+\Z")


def parse_hostport(target: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port); :class:`ValueError` with a usage hint."""
    usage = _USAGE.format(target)
    m = _BRACKETED_RE.match(target)
    if m:
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(usage) from None
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not _HOST_RE.match(host) or not port_text.isdigit() or not port_text.isascii():
            raise ValueError(usage)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(usage)
    return host, port


def check_target(target: str) -> str | None:
    try:
        parse_hostport(target)
    except ValueError as exc:
        return str(exc)
    return None


def fill_stats(result: TcpResult, connects_ms: list[float | None]) -> None:
    """Set counts, loss and the connect statistics of ``result`` from per-attempt times (pure)."""
    s = summarize_rtts(connects_ms)
    result.connects_ms = list(connects_ms)
    result.sent, result.received, result.loss_ratio = s.sent, s.received, s.loss_ratio
    result.connect_ms, result.connect_min_ms, result.connect_avg_ms = s.rtt_p50_ms, s.rtt_min_ms, s.rtt_avg_ms
    result.connect_max_ms, result.connect_stddev_ms = s.rtt_max_ms, s.rtt_stddev_ms
    result.connect_p95_ms, result.connect_p50_ms = s.rtt_p95_ms, s.rtt_p50_ms
    result.connect_jitter_rfc3550_ms = s.jitter_rfc3550_ms
    result.connect_ipdv_mean_ms, result.connect_ipdv_p95_ms = s.ipdv_mean_ms, s.ipdv_p95_ms
    result.connect_pdv_p95_ms = s.pdv_p95_ms


async def probe(target: str, config: TcpConfig, ctx: ProbeContext) -> TcpResult:
    """Time ``config.count`` TCP handshakes to ``target`` (``host:port``)."""
    try:
        host, port = parse_hostport(target)
    except ValueError as exc:
        raise ProbeFailure(Outcome.ERROR, str(exc)) from exc
    result = TcpResult(port=port)
    try:
        resolved = await netio.resolve(
            host, port, family=config.family, timeout_s=config.timeout_s, check=ctx.check_address
        )
    except ProbeFailure as failure:
        failure.partial = result
        raise
    result.address, result.dns_ms = resolved.address, resolved.dns_ms
    ctx.report(Step(target=target, address=resolved.address, seq=None, time_ms=resolved.dns_ms))
    samples: list[float | None] = []
    failures: list[ProbeFailure] = []
    first_ns = time.perf_counter_ns()
    interval_ns = int(config.interval_s * 1e9)
    for i in range(config.count):
        if i and await ctx.pause((first_ns + i * interval_ns - time.perf_counter_ns()) / 1e9):
            break  # a stop: no more attempts; the one under way (if any) has ended
        try:
            sock, connect_ms = await netio.connect_socket(resolved, timeout_s=config.timeout_s)
        except ProbeFailure as failure:
            samples.append(None)
            failures.append(failure)
            ctx.report(Step(target=target, address=resolved.address, seq=i + 1, error=failure.reason))
            continue
        sock.close()
        samples.append(connect_ms)
        ctx.report(Step(target=target, address=resolved.address, seq=i + 1, time_ms=connect_ms))
    fill_stats(result, samples)
    if result.received == 0:
        common = Counter(f.outcome for f in failures).most_common(1)[0][0]
        last = [f for f in failures if f.outcome == common][-1]
        raise ProbeFailure(last.outcome, last.reason, partial=result) from last
    return result


def max_run_s(config: TcpConfig) -> float:
    """One DNS lookup and ``count`` attempts, each bounded by ``timeout_s``, plus the gaps."""
    return config.timeout_s * (config.count + 1) + config.interval_s * (config.count - 1)


def _header(target: str, address: str | None, dns_ms: object) -> str:
    if not address:
        return f"TCP connect to {target}"
    return f"TCP connect to {target} ({address})" + (f", dns {num(dns_ms)} ms" if dns_ms is not None else "")


def render_step(step: Step) -> str:
    """One line of the live output: the header (the start, ``time_ms`` the DNS time) or an attempt."""
    if step.seq is None:
        return _header(step.target, step.address, step.time_ms)
    if step.time_ms is None:
        return f"  attempt {step.seq}: no connection: {step.error or 'no handshake'}"
    return f"  attempt {step.seq}: connected to {step.address} in {step.time_ms:.3f} ms"


def render_stats(obs: Observation) -> list[str]:
    """The summary after the attempts (nothing when none was made)."""
    f = obs.fields
    if not f.get("sent"):
        return []
    loss = f.get("loss_ratio")
    lines = [
        f"--- {obs.target} tcp connect statistics ---",
        f"{f.get('sent')} attempts, {f.get('received')} connected"
        + (f", {100 * float(loss):.4g}% failed" if isinstance(loss, int | float) else "")
        + f", time {obs.duration_ms:.0f} ms",
    ]
    if f.get("connect_min_ms") is not None:
        lines.append(
            f"connect min/median/avg/max = {num(f.get('connect_min_ms'))}/{num(f.get('connect_ms'))}/"
            f"{num(f.get('connect_avg_ms'))}/{num(f.get('connect_max_ms'))} ms"
        )
    return lines


def render_one_line(obs: Observation) -> str:
    """The run in one line."""
    f = obs.fields
    if not f.get("sent"):
        return f"{obs.target} : {obs.outcome}: {obs.reason or 'no reason given'}"
    line = f"{obs.target} : {f.get('received')}/{f.get('sent')} connected"
    if f.get("connect_ms") is not None:
        line += f", median {num(f.get('connect_ms'))} ms"
    return line


def render(obs: Observation) -> list[str]:
    """DNS time, each attempt, then the summary (from partial fields too) (pure)."""
    f = obs.fields
    lines = [_header(obs.target, f.get("address"), f.get("dns_ms"))]  # type: ignore[arg-type]
    attempts = f.get("connects_ms") or []
    assert isinstance(attempts, list)
    for i, c in enumerate(attempts, start=1):
        lines.append(f"  attempt {i}: " + (f"connected in {c:.3f} ms" if c is not None else "no connection"))
    return lines + render_stats(obs)


KIND: Final = ProbeKind(
    name="tcp",
    description="TCP handshake time to host:port, several attempts with loss and statistics",
    config_type=TcpConfig,
    result_type=TcpResult,
    run=probe,
    check_target=check_target,
    max_run_s=max_run_s,
    tag_fields=(),
    target_label="target",
    display_target=None,
    render=render,
    headline=Figure(field="connect_ms", label="connect"),
    jitter=Figure(field="connect_jitter_rfc3550_ms", label="RFC 3550"),
    fleet_field="connect_ms",
    live=LiveView(step=render_step, summary=render_stats, one_line=render_one_line),
    aliases=(),
    floor_field="connect_min_ms",
    first_byte_round_trips=None,
    policy_cost=lambda config: PolicyCost(packets=config.count),  # each attempt: SYN, ACK, FIN
    env_vars=None,
    privilege=None,
    sub_points=None,
    prepare=None,
)
