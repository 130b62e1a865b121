"""What the advisor reads from InfluxDB (one struct per point) and its defaults, in one place."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

import msgspec

DEFAULT_SINCE: Final = "24h"
DEFAULT_MIN_SAMPLES: Final = 20  # a PoP × endpoint pair with fewer successful samples is shown, never ranked
DEFAULT_MAX_POINTS_PER_SERIES: Final = 20_000  # the newest ones of each series are read (bounded)
DEFAULT_K: Final = 1
SCHEMA: Final = "edgeprobe.advise/1"

INFERENCE_MEASUREMENT: Final = "edgeprobe_inference"
ICMP_MEASUREMENT: Final = "edgeprobe_icmp"
TCP_MEASUREMENT: Final = "edgeprobe_tcp"

# Fields read from edgeprobe_inference (see docs/data-model.md); all optional on a point.
INFERENCE_FIELDS: Final = (
    "ttft_ms",
    "setup_ms",
    "dns_ms",
    "net_rtt_ms",
    "server_ms",
    "itl_p95_ms",
    "distance_km",
    "floor_rtt_ms",
    "inflation_ratio",
    "floor_ttft_ms",
)
INFERENCE_TAGS: Final = ("site", "target", "outcome", "tier")
ICMP_FIELD: Final = "rtt_p50_ms"  # the median echo of each run
TCP_FIELD: Final = "connect_ms"  # the median connect of each run
PATH_TAGS: Final = ("site", "target", "outcome")


class InferenceSample(msgspec.Struct, frozen=True, kw_only=True):
    """One ``edgeprobe_inference`` point. ``None``: not measured (never 0)."""

    site: str  # the agent's site: the PoP
    target: str  # the endpoint (URL, tag value decoded)
    outcome: str
    tier: str = ""
    ttft_ms: float | None = None
    setup_ms: float | None = None  # DNS + TCP + TLS: cumulative time until the request was written
    dns_ms: float | None = None
    net_rtt_ms: float | None = None  # one TCP handshake: one network round trip
    server_ms: float | None = None  # ttft - setup - net_rtt
    itl_p95_ms: float | None = None
    distance_km: float | None = None
    floor_rtt_ms: float | None = None
    inflation_ratio: float | None = None
    floor_ttft_ms: float | None = None


class PathSample(msgspec.Struct, frozen=True, kw_only=True):
    """One ``edgeprobe_icmp`` (rtt_p50_ms) or ``edgeprobe_tcp`` (connect_ms) point."""

    kind: str  # "icmp" | "tcp"
    site: str
    target: str  # icmp: a host; tcp: host:port
    outcome: str
    rtt_ms: float | None = None


def endpoint_host_port(url: str) -> tuple[str, int | None]:
    """The host (lower-case, IPv6 without brackets) and port of an inference endpoint URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url, None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    return (parts.hostname or url), port


def path_host_port(kind: str, target: str) -> tuple[str, int | None]:
    """The host and port an icmp (host) or tcp (host:port, [v6]:port) target names."""
    if kind == "icmp":
        return target.lower().strip("[]"), None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return target.lower(), None
    return host.lower().strip("[]"), int(port)
