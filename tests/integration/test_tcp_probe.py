"""The tcp probe against listeners on 127.0.0.1 / ::1, plus its pure parts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest

from edgeprobe.probes import tcp
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.probes.tcp import TcpConfig, TcpResult, fill_stats, parse_hostport

FAST: dict[str, Any] = {"interval_s": 0.01, "timeout_s": 2.0}


# ---- pure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("example.net:443", "example.net", 443),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
        ("[::1]:65535", "::1", 65535),
        ("[fe80::1%eth0]:22", "fe80::1%eth0", 22),
        ("bücher.example:80", "bücher.example", 80),
    ],
)
def test_parse_hostport(target: str, host: str, port: int) -> None:
    assert parse_hostport(target) == (host, port)


@pytest.mark.parametrize(
    "target",
    ["x", "x:", ":80", "x:0", "x:65536", "x:-1", "x:http", "2001:db8::1:443", "[2001:db8::1]", "[x]:80",
     "a b:80", "http://x:80", "x:80/", "x:٨٠", "[::1]:+80", "x: 80"],
)  # fmt: skip
def test_parse_hostport_rejects(target: str) -> None:
    expected = f"expected HOST:PORT (e.g. example.net:443 or [2001:db8::1]:443), got {target!r}"
    with pytest.raises(ValueError) as info:
        parse_hostport(target)
    assert str(info.value) == expected
    assert tcp.check_target(target) == expected


def test_check_target_ok() -> None:
    assert tcp.check_target("example.net:443") is None


def test_fill_stats() -> None:
    r = TcpResult(port=443)
    fill_stats(r, [1.0, None, 3.0, 2.0, None])
    assert (r.sent, r.received, r.loss_ratio) == (5, 3, 0.4)
    assert r.connects_ms == [1.0, None, 3.0, 2.0, None]
    assert (r.connect_ms, r.connect_min_ms, r.connect_avg_ms, r.connect_max_ms) == (2.0, 1.0, 2.0, 3.0)
    assert r.connect_stddev_ms == pytest.approx(0.816497, abs=1e-6)
    assert r.connect_p95_ms == pytest.approx(2.9)
    fill_stats(r, [4.0, 1.0, 2.0, 3.0])
    assert (r.connect_ms, r.loss_ratio) == (2.5, 0.0)  # the median of an even count
    fill_stats(r, [None, None])
    assert (r.sent, r.received, r.loss_ratio, r.connect_ms, r.connect_p95_ms) == (2, 0, 1.0, None, None)


def test_config() -> None:
    assert msgspec.convert({}, TcpConfig) == TcpConfig(count=3, interval_s=0.5, timeout_s=3.0, family="auto")
    for bad in (
        {"count": 0},
        {"count": 1001},
        {"timeout_s": 0},
        {"interval_s": -1},
        {"family": "v4"},
        {"x": 1},
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, TcpConfig)


def test_kind() -> None:
    assert tcp.KIND.name == "tcp"
    assert tcp.KIND.measurement == "edgeprobe_tcp"
    # DNS (timeout_s) + 3 attempts (timeout_s each) + 2 gaps + 1 s
    assert tcp.KIND.max_run_s(TcpConfig()) == pytest.approx(3 * 4 + 0.5 * 2)


# ---- against local listeners ---------------------------------------------------------------


@pytest.fixture
async def listening() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """Bound but not listening: a connect is answered with RST."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield int(sock.getsockname()[1])
    sock.close()


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A listener that never accepts, its accept queue already filled: further SYNs go unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(4):  # the kernel allows backlog + 1; a few more are harmless
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


async def run(target: str, **cfg: Any) -> TcpResult:
    config = msgspec.convert({**FAST, **cfg}, TcpConfig)
    return await tcp.probe(target, config, ProbeContext())


async def test_all_answered(listening: int) -> None:
    r = await run(f"127.0.0.1:{listening}", count=3)
    assert (r.address, r.port, r.sent, r.received, r.loss_ratio) == ("127.0.0.1", listening, 3, 3, 0.0)
    assert len(r.connects_ms) == 3 and all(c is not None and c >= 0 for c in r.connects_ms)
    assert r.dns_ms is not None and r.dns_ms >= 0
    assert r.connect_min_ms is not None and r.connect_max_ms is not None and r.connect_ms is not None
    assert r.connect_min_ms <= r.connect_ms <= r.connect_max_ms
    assert r.connect_min_ms <= (r.connect_avg_ms or 0) <= r.connect_max_ms
    assert r.connect_p95_ms is not None and r.connect_p95_ms <= r.connect_max_ms
    assert r.connect_stddev_ms is not None and r.connect_stddev_ms >= 0


async def test_via_handler_ok(listening: int) -> None:
    async with ProbeContext() as ctx:
        obs = await run_probe(
            tcp.KIND, f"127.0.0.1:{listening}", msgspec.convert(FAST, TcpConfig), ctx, seq=1
        )
    assert (obs.outcome, obs.reason, obs.kind) == ("ok", None, "tcp")
    assert obs.fields["received"] == 3
    assert set(obs.fields) == set(TcpResult.__struct_fields__)


async def test_ipv6_loopback() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    try:
        server = await asyncio.start_server(handle, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        port = server.sockets[0].getsockname()[1]
        r = await run(f"[::1]:{port}", count=2, family="ipv6")
        assert (r.address, r.received) == ("::1", 2)
    finally:
        server.close()
        await server.wait_closed()


async def test_closed_port_is_refused(closed_port: int) -> None:
    with pytest.raises(ProbeFailure) as info:
        await run(f"127.0.0.1:{closed_port}", count=3)
    failure = info.value
    assert failure.outcome is Outcome.REFUSED
    assert failure.reason == f"connection refused by 127.0.0.1:{closed_port}"
    assert isinstance(failure.__cause__, ProbeFailure)
    assert isinstance(failure.__cause__.__cause__, ConnectionRefusedError)
    partial = failure.partial
    assert isinstance(partial, TcpResult)
    assert (partial.sent, partial.received, partial.loss_ratio) == (3, 0, 1.0)
    assert partial.connects_ms == [None, None, None]
    assert partial.connect_ms is None and partial.dns_ms is not None


async def test_refused_via_handler(closed_port: int) -> None:
    async with ProbeContext() as ctx:
        obs = await run_probe(
            tcp.KIND, f"127.0.0.1:{closed_port}", msgspec.convert({**FAST, "count": 2}, TcpConfig), ctx, seq=0
        )
    assert (obs.outcome, obs.reason) == ("refused", f"connection refused by 127.0.0.1:{closed_port}")
    assert obs.fields["sent"] == 2 and obs.fields["received"] == 0
    assert obs.fields["connects_ms"] == [None, None]
    assert obs.fields["connect_ms"] is None


async def test_unanswered_syn_is_timeout(full_backlog: int) -> None:
    with pytest.raises(ProbeFailure) as info:
        await run(f"127.0.0.1:{full_backlog}", count=2, timeout_s=0.2)
    assert info.value.outcome is Outcome.TIMEOUT
    assert info.value.reason == f"no TCP handshake with 127.0.0.1:{full_backlog} within 0.2 s"
    assert isinstance(info.value.partial, TcpResult)
    assert info.value.partial.connects_ms == [None, None]


async def test_partial_loss_is_ok() -> None:
    """backlog 0: the first handshake is queued and answered, later ones are not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    try:
        port = listener.getsockname()[1]
        r = await run(f"127.0.0.1:{port}", count=3, timeout_s=0.2)
    finally:
        listener.close()
    assert r.sent == 3
    assert 1 <= r.received < 3
    assert r.connects_ms[0] is not None
    assert r.loss_ratio == pytest.approx((3 - r.received) / 3)


async def test_dns_error() -> None:
    """No resolver is asked: conftest's guard fails names under .invalid without a query."""
    async with ProbeContext() as ctx:
        obs = await run_probe(
            tcp.KIND, "nonexistent.invalid:443", msgspec.convert(FAST, TcpConfig), ctx, seq=0
        )
    assert obs.outcome == "dns_error"
    assert obs.reason == "cannot resolve 'nonexistent.invalid': Name or service not known"
    assert obs.fields["port"] == 443 and obs.fields["sent"] == 0 and obs.fields["address"] is None


async def test_family_mismatch_is_dns_error() -> None:
    # glibc answers EAI_ADDRFAMILY for an IPv4 literal asked as IPv6 without any lookup
    with pytest.raises(ProbeFailure) as info:
        await run("127.0.0.1:80", family="ipv6")
    assert info.value.outcome is Outcome.DNS_ERROR
