"""Synthetic but realistic measurements for ``edgeprobe advise``: 3 PoPs × 4 inference endpoints.

PoPs in New York, Chicago and Frankfurt; endpoints at an IXP in New York and one in Frankfurt, a
regional site (Ashburn) and a central one (Council Bluffs). Each path's round trip is the fibre
floor of its great-circle distance (``probes/geo.py``) × a route factor of its own (1.3–1.9, as
real routes are) + 0.3 ms of hosts, with jitter; a first token takes 3 round trips (TCP, TLS 1.3,
request) + the server's 40 ms (the same everywhere, as in the lab demo). Frankfurt → Council Bluffs
has only 8 samples (too few to rank), and every pair has a few timeouts.

:func:`inference_samples` gives the points as dicts (for the pure tests), :func:`lines` as
InfluxDB line protocol (for the integration test).
"""

from __future__ import annotations

import random
from typing import Any

from edgeprobe.collector.lineproto import escape_tag_value, format_field_value
from edgeprobe.probes.geo import floor_rtt_ms, great_circle_km

POPS = {"nyc": (40.7128, -74.0060), "chi": (41.8781, -87.6298), "fra": (50.1109, 8.6821)}
ENDPOINTS = {
    "https://nyc-ixp.example.net/v1": ((40.7357, -74.1724), "edge"),
    "https://fra-ixp.example.net/v1": ((50.1200, 8.7300), "edge"),
    "https://ashburn.example.net/v1": ((39.0438, -77.4874), "regional"),
    "https://council-bluffs.example.net/v1": ((41.2619, -95.8608), "core"),
}
ROUND_TRIPS = 3
SERVER_MS = 40.0
HOST_MS = 0.3
SAMPLES = 60
SPARSE = ("fra", "https://council-bluffs.example.net/v1")
SPARSE_SAMPLES = 8
TIMEOUTS = 2


def route_factor(pop: str, endpoint: str) -> float:
    """A fixed route factor per path, 1.3–1.9."""
    return 1.3 + (sum(map(ord, pop + endpoint)) % 7) / 10.0


def distance_km(pop: str, endpoint: str) -> float:
    return great_circle_km(*POPS[pop], *ENDPOINTS[endpoint][0])


def expected_rtt_ms(pop: str, endpoint: str) -> float:
    return floor_rtt_ms(distance_km(pop, endpoint)) * route_factor(pop, endpoint) + HOST_MS


def inference_samples(seed: int = 1, now_ns: int = 0) -> list[dict[str, Any]]:
    """Points as {tags…, fields…, "time": ns}: 60 per pair (8 for the sparse one) plus timeouts."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    for pop in POPS:
        for endpoint, (_, tier) in ENDPOINTS.items():
            d = distance_km(pop, endpoint)
            floor = floor_rtt_ms(d)
            n = SPARSE_SAMPLES if (pop, endpoint) == SPARSE else SAMPLES
            base = {"site": pop, "agent": f"{pop}-a", "target": endpoint, "tier": tier, "model": "m", "api": "openai"}
            for i in range(n + TIMEOUTS):
                t = now_ns - (i + 1) * 20_000_000_000
                if i >= n:
                    out.append({**base, "outcome": "timeout", "time": t, "seq": i, "reason": "no first token in 30 s"})
                    continue
                rtt = expected_rtt_ms(pop, endpoint)
                connect, net_rtt = rtt * rnd.uniform(0.97, 1.08), rtt * rnd.uniform(0.97, 1.08)
                tls = rtt * rnd.uniform(0.97, 1.08) + rnd.uniform(0.5, 1.5)
                server = SERVER_MS + rnd.gauss(0, 2.0)
                setup = connect + tls
                fields = {
                    "seq": i,
                    "connect_ms": round(connect, 3),
                    "tls_ms": round(tls, 3),
                    "setup_ms": round(setup, 3),
                    "net_rtt_ms": round(net_rtt, 3),
                    "server_ms": round(server, 3),
                    "ttft_ms": round(setup + net_rtt + server, 3),
                    "itl_p95_ms": round(rnd.uniform(18, 26), 3),
                    "distance_km": round(d, 3),
                    "floor_rtt_ms": round(floor, 6),
                    "floor_ttft_ms": round(ROUND_TRIPS * floor, 6),
                }
                if d >= 1.0:
                    fields["inflation_ratio"] = net_rtt / floor
                out.append({**base, "outcome": "ok", "time": t, **fields})
    return out


def icmp_samples(seed: int = 2, now_ns: int = 0) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for pop in POPS:
        for endpoint in ENDPOINTS:
            host = endpoint.split("/")[2]
            for i in range(10):
                out.append(
                    {
                        "site": pop,
                        "agent": f"{pop}-a",
                        "target": host,
                        "outcome": "ok",
                        "time": now_ns - (i + 1) * 20_000_000_000,
                        "seq": i,
                        "rtt_p50_ms": round(expected_rtt_ms(pop, endpoint) * rnd.uniform(0.98, 1.05), 3),
                    }
                )
    return out


TAGS = ("site", "agent", "target", "outcome", "tier", "model", "api")


def to_line(measurement: str, point: dict[str, Any]) -> str:
    tags = ",".join(f"{k}={escape_tag_value(str(point[k]))}" for k in sorted(TAGS) if k in point)
    fields = []
    for k, v in point.items():
        if k in TAGS or k == "time":
            continue
        text = format_field_value(v)
        if text is not None:
            fields.append(f"{k}={text}")
    return f"{measurement},{tags} {','.join(fields)} {point['time']}"


def lines(now_ns: int, seed: int = 1) -> list[str]:
    return [to_line("edgeprobe_inference", p) for p in inference_samples(seed, now_ns)] + [
        to_line("edgeprobe_icmp", p) for p in icmp_samples(seed + 1, now_ns)
    ]


def candidates_yaml() -> str:
    """PoP coordinates and three candidates: Chicago (an IXP there), Ashburn (where an endpoint is
    measured: the prediction can be checked), London."""
    pops = "\n".join(f"  {name}: {{latitude: {lat}, longitude: {lon}}}" for name, (lat, lon) in POPS.items())
    return (
        f"pops:\n{pops}\n"
        "candidates:\n"
        "  - {name: chicago-ixp, latitude: 41.8500, longitude: -87.6500}\n"
        "  - {name: ashburn-2, latitude: 39.0438, longitude: -77.4874}\n"
        "  - {name: london, latitude: 51.5074, longitude: -0.1278, server_ms: 45}\n"
    )
