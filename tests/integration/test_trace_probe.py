"""The trace kind's I/O on loopback (needs root for raw sockets): each method reaches 127.0.0.1 in
one hop, many traces share the context's sockets, the raw TCP socket is open only while a tcp trace
runs, and an address the caller refuses is never sent anything."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from edgeprobe.probes import trace
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: the SYN gets an RST


async def test_each_method_reaches_loopback_in_one_hop() -> None:
    port = closed_port()
    async with ProbeContext() as ctx:
        configs = [
            trace.TraceConfig(method="icmp", max_hops=3, timeout_s=1.0),
            trace.TraceConfig(method="udp", max_hops=3, timeout_s=1.0),
            trace.TraceConfig(method="tcp", port=port, max_hops=3, timeout_s=1.0),
            trace.TraceConfig(method="udp", max_hops=3, timeout_s=1.0, paris=False),
        ]
        runs = [run_probe(trace.KIND, "127.0.0.1", c, ctx, seq=i) for i, c in enumerate(configs)]
        observations = await asyncio.gather(*runs)  # at once, on the same sockets
        sockets = await ctx.resource(("trace", False), lambda: trace.TraceSocket.open(ipv6=False))
        assert sockets._tcp is None  # closed with the last tcp trace
    for obs in observations:
        assert obs.outcome == "ok", obs.reason
        f = obs.fields
        assert (f["reached"], f["hop_count"], f["hop_addresses"], f["silent_hops"]) == (True, 1, "127.0.0.1", 0)
        assert f["hop_loss_ratio"] == [0.0] and all(0 < r < 50 for r in f["hop_rtts_ms"])
    assert [o.fields["hop_icmp"] for o in observations] == ["0/0", "3/3", "-", "3/3"]


async def test_path_changed_compares_with_the_previous_run() -> None:
    async with ProbeContext() as ctx:
        config = trace.TraceConfig(max_hops=2, timeout_s=1.0, queries=1)
        first = await run_probe(trace.KIND, "127.0.0.1", config, ctx, seq=0)
        second = await run_probe(trace.KIND, "127.0.0.1", config, ctx, seq=1)
    assert first.fields["path_changed"] is None and second.fields["path_changed"] is False


async def test_a_refused_address_is_sent_nothing() -> None:
    async def refuse(name: str, address: str, port: int) -> str | None:
        return f"{address} is not allowed"

    async with ProbeContext(check_address=refuse) as ctx:
        obs = await run_probe(trace.KIND, "127.0.0.1", trace.TraceConfig(), ctx, seq=0)
    assert obs.outcome == "policy_refused" and obs.reason is not None and "not allowed" in obs.reason
    assert not obs.fields
