"""Real ICMP echoes to 127.0.0.0/8 and ::1 over raw and dgram sockets (needs root).

Loopback always answers, so the failure paths run in throw-away network namespaces
(``unshare --net``, so the host's sysctls and routes are never touched): kernel echo replies are
switched off there and a small responder plays the network, answering with ICMP errors,
duplicated replies and a reply carrying a wrong token. Those namespaces run this file as a
script (see ``__main__`` at the bottom) and print their observations as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgeprobe.probes import icmp
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe
from edgeprobe.probes.icmp import EchoSocket, IcmpConfig, IcmpResult
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.probes.wake import WAKE_GRID_NS
from tests.support.paths import REPO

ROOT = REPO
RANGE_FILE = Path("/proc/sys/net/ipv4/ping_group_range")
FAST = IcmpConfig(count=5, interval_s=0.02, timeout_s=1.0)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: raw ICMP sockets and sysctl writes")


def icmp_kind() -> AnyKind:
    """The registered kind when the registry imports (it also needs the tcp and http modules)."""
    try:
        from edgeprobe.probes.registry import KINDS
    except ImportError:
        return icmp.KIND
    return KINDS["icmp"]


@pytest.fixture
def ping_group_range() -> Iterator[Callable[[str], None]]:
    """Set net.ipv4.ping_group_range for the test; the original value is restored afterwards."""
    saved = RANGE_FILE.read_text()

    def set_range(value: str) -> None:
        RANGE_FILE.write_text(value)

    try:
        yield set_range
    finally:
        RANGE_FILE.write_text(saved)


@pytest.fixture
def dgram_allowed(ping_group_range: Callable[[str], None]) -> None:
    ping_group_range("0 2147483647")


@pytest.fixture
async def ctx() -> AsyncIterator[ProbeContext]:
    async with ProbeContext() as context:
        yield context


@pytest.fixture
def sockets_opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, str]]:
    """Records every (ipv6, kind) socket the probe opens."""
    opened: list[tuple[bool, str]] = []
    real_open = EchoSocket.open

    async def counting_open(*, ipv6: bool, kind: icmp.SocketKind) -> EchoSocket:
        opened.append((ipv6, kind))
        return await real_open(ipv6=ipv6, kind=kind)

    monkeypatch.setattr(EchoSocket, "open", counting_open)
    return opened


def assert_all_answered(result: IcmpResult, count: int) -> None:
    assert (result.sent, result.received, result.duplicates, result.errors) == (count, count, 0, 0)
    assert result.loss_ratio == 0.0
    rtts = [r for r in result.rtts_ms if r is not None]
    assert len(rtts) == count
    # plausibility, not speed: a kernel stamp read with the wrong clock or unit would be far off
    assert all(0 < r < 1000 for r in rtts), rtts
    assert min(rtts) < 5.0, rtts
    assert result.rtt_min_ms is not None and result.rtt_max_ms is not None
    assert result.rtt_min_ms <= (result.rtt_p50_ms or 0) <= result.rtt_max_ms
    assert result.ttl is not None and result.ttl > 0


# ---------------------------------------------------------------- loopback, host namespace


@pytest.mark.parametrize("target", ["127.0.0.1", "::1"])
async def test_raw_echoes(target: str, ctx: ProbeContext) -> None:
    result = await icmp.probe(target, msgspec.structs.replace(FAST, socket="raw"), ctx)
    assert_all_answered(result, 5)
    assert (result.address, result.socket) == (target, "raw")
    assert result.family == ("ipv6" if ":" in target else "ipv4")


@pytest.mark.parametrize("target", ["127.0.0.1", "::1"])
async def test_dgram_echoes(target: str, ctx: ProbeContext, dgram_allowed: None) -> None:
    result = await icmp.probe(target, msgspec.structs.replace(FAST, socket="dgram"), ctx)
    assert_all_answered(result, 5)
    assert (result.address, result.socket) == (target, "dgram")


async def test_auto_prefers_dgram_and_falls_back_to_raw(
    ctx: ProbeContext, ping_group_range: Callable[[str], None]
) -> None:
    ping_group_range("1 0")  # nobody may use dgram ICMP sockets
    assert (await icmp.probe("127.0.0.1", FAST, ctx)).socket == "raw"
    ping_group_range("0 2147483647")
    async with ProbeContext() as fresh:
        assert (await icmp.probe("127.0.0.1", FAST, fresh)).socket == "dgram"


async def test_whole_path_through_the_handler(ctx: ProbeContext) -> None:
    obs = await run_probe(
        icmp_kind(), "localhost", IcmpConfig(count=3, interval_s=0.02, family="ipv4"), ctx, seq=7
    )
    assert (obs.outcome, obs.reason, obs.kind, obs.seq) == ("ok", None, "icmp", 7)
    assert obs.fields["address"] == "127.0.0.1" and obs.fields["received"] == 3
    assert len(obs.fields["rtts_ms"]) == 3  # type: ignore[arg-type]


async def test_unresolvable_name_is_a_dns_error(ctx: ProbeContext) -> None:
    obs = await run_probe(icmp_kind(), "nonexistent.invalid", FAST, ctx, seq=0)
    assert obs.outcome == "dns_error"
    assert obs.reason is not None and obs.reason.startswith("name resolution failed: ")
    assert obs.fields == {}


async def test_run_ends_when_the_last_reply_arrives(ctx: ProbeContext) -> None:
    config = IcmpConfig(count=2, interval_s=0.01, timeout_s=30.0, socket="raw")
    t0 = time.perf_counter()
    result = await icmp.probe("127.0.0.1", config, ctx)
    assert result.received == 2
    assert time.perf_counter() - t0 < config.timeout_s  # did not sit out the 30 s timeout


async def test_staggered_runs_on_one_socket_each_send_on_time(
    ctx: ProbeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket's one timer serves every run: each echo leaves at its run's start + k × interval,
    whoever else is due. (A timer armed for the first run's next send while others were due
    sooner sent theirs up to an interval late: 1,000 targets held ~5 s runs instead of ~4 s.)"""
    sent: dict[int, list[int]] = {}
    real = icmp.EchoSocket._sendto

    def recording(self: icmp.EchoSocket, echo: Any) -> bool:
        sent.setdefault(id(echo.run), []).append(time.monotonic_ns())
        return real(self, echo)

    monkeypatch.setattr(icmp.EchoSocket, "_sendto", recording)
    armed: list[tuple[int, int]] = []  # (the time the timer is set for, the socket's tick)
    woke: list[tuple[int, int]] = []
    real_arm, real_on_timer = icmp.EchoSocket._arm, icmp.EchoSocket._on_timer

    def arm(self: icmp.EchoSocket, at_ns: int | None) -> None:
        if at_ns is not None:
            armed.append((at_ns, self._tick_ns))
        real_arm(self, at_ns)

    def on_timer(self: icmp.EchoSocket) -> None:
        woke.append((time.monotonic_ns(), self._timer_at_ns))
        real_on_timer(self)

    monkeypatch.setattr(icmp.EchoSocket, "_arm", arm)
    monkeypatch.setattr(icmp.EchoSocket, "_on_timer", on_timer)
    config = IcmpConfig(count=4, interval_s=0.4, timeout_s=5.0, socket="raw")  # a quarter of it: the grid's step

    async def staggered(i: int) -> icmp.IcmpResult:
        await asyncio.sleep(i * 0.028)  # starts spread over the interval, as the scheduler's slots are
        return await icmp.probe(f"127.0.2.{i + 1}", config, ctx)

    results = await asyncio.gather(*(staggered(i) for i in range(14)))
    for result in results:
        assert_all_answered(result, 4)
    assert len(sent) == 14
    late_ms = [(t - times[0]) / 1e6 - k * 400 for times in sent.values() for k, t in enumerate(times)]
    # On time within a generous bound for a shared 2-vCPU host; the bug made it up to an interval.
    assert max(late_ms) < 30, sorted(late_ms)[-5:]
    assert min(late_ms) >= -icmp._TICK_NS / 1e6, sorted(late_ms)[:5]  # early by at most the engine's tick
    # The engine's timer is set only for ticks of the wake-up grid the scheduler uses (100 ms: a
    # quarter of this interval), never fires before its tick, and fires once per tick.
    assert armed and {tick for _, tick in armed} == {WAKE_GRID_NS}
    assert all(at % WAKE_GRID_NS == 0 for at, _ in armed)
    assert all(now >= at for now, at in woke)
    assert len({at for _, at in woke}) == len(woke), "two timer wake-ups for one tick"


@pytest.mark.parametrize("kind", ["raw", "dgram"])
async def test_many_concurrent_runs_share_one_socket_without_cross_talk(
    kind: str,
    ctx: ProbeContext,
    sockets_opened: list[tuple[bool, str]],
    ping_group_range: Callable[[str], None],
) -> None:
    if kind == "dgram":
        ping_group_range("0 2147483647")
    targets = [f"127.0.{net}.{host}" for net in (0, 1) for host in range(1, 101)]
    config = IcmpConfig(count=3, interval_s=0.01, timeout_s=2.0, socket=kind)  # type: ignore[arg-type]
    results = await asyncio.gather(*(icmp.probe(t, config, ctx) for t in targets))
    for target, result in zip(targets, results, strict=True):
        assert result.address == target
        assert_all_answered(result, 3)
    assert sockets_opened == [(False, kind)]


async def test_two_raw_sockets_ignore_each_others_replies(sockets_opened: list[tuple[bool, str]]) -> None:
    """Each raw socket sees every reply on the host: identifiers and tokens keep them apart."""
    config = IcmpConfig(count=3, interval_s=0.01, timeout_s=2.0, socket="raw")
    targets = [f"127.0.2.{host}" for host in range(1, 51)] + ["::1"] * 10
    async with ProbeContext() as a, ProbeContext() as b:
        results = await asyncio.gather(*(icmp.probe(t, config, c) for t in targets for c in (a, b)))
    for result in results:
        assert_all_answered(result, 3)
    assert sorted(sockets_opened) == [(False, "raw"), (False, "raw"), (True, "raw"), (True, "raw")]


async def test_closing_the_context_closes_the_sockets(sockets_opened: list[tuple[bool, str]]) -> None:
    async with ProbeContext() as ctx:
        await icmp.probe("127.0.0.1", IcmpConfig(count=1, socket="raw"), ctx)

        async def not_shared() -> EchoSocket:
            pytest.fail("the probe's socket is not in the context")

        shared = await ctx.resource(("icmp", False, "raw"), not_shared)
    assert shared._sock.fileno() == -1  # closed with the context
    assert sockets_opened == [(False, "raw")]


async def test_no_socket_allowed_is_permission_denied(
    monkeypatch: pytest.MonkeyPatch, ctx: ProbeContext
) -> None:
    async def denied(*, ipv6: bool, kind: icmp.SocketKind) -> EchoSocket:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(EchoSocket, "open", denied)
    with pytest.raises(ProbeFailure) as caught:
        await icmp.probe("127.0.0.1", FAST, ctx)
    assert caught.value.outcome is Outcome.PERMISSION_DENIED
    assert (
        "CAP_NET_RAW (root, or the service's AmbientCapabilities=CAP_NET_RAW: edgeprobe init systemd)"
        in caught.value.reason
    )
    assert "setcap" not in caught.value.reason  # never file capabilities on a shared interpreter
    assert f"net.ipv4.ping_group_range covering gid {os.getegid()}" in caught.value.reason


# ---------------------------------------------------------------- failure paths, private namespaces


def in_netns(scenario: str, sysctls: dict[str, str], *, lo_up: bool = True, user: int | None = None) -> Any:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare(1) and ip(8)")
    steps = ["ip link set lo up"] if lo_up else []
    steps += [f"sysctl -qw {shlex.quote(f'{key}={value}')}" for key, value in sysctls.items()]
    run = [sys.executable, str(Path(__file__).resolve()), *scenario.split()]
    if user is not None:
        # Unprivileged as far as ICMP goes: every capability dropped (no CAP_NET_RAW) and the
        # given gid (ping_group_range is checked against it). The uid stays the owner of the
        # checkout, so the test runs from a clone in a private (0700) directory too.
        run = ["setpriv", f"--regid={user}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", *run]
    script = " && ".join([*steps, "exec " + shlex.join(run)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


NO_KERNEL_ECHO = {
    "net.ipv4.icmp_echo_ignore_all": "1",
    "net.ipv6.icmp.echo_ignore_all": "1",
    "net.ipv4.ping_group_range": "0 0",
}


@pytest.fixture(scope="module")
def responder_results() -> dict[str, dict[str, Any]]:
    return dict(in_netns("responder", NO_KERNEL_ECHO))  # key: "<kind> <target> <size>"


@pytest.mark.parametrize("kind", ["raw", "dgram"])
def test_icmp_unreachable_fails_the_run_with_partial_data(
    kind: str, responder_results: dict[str, dict[str, Any]]
) -> None:
    for key, what in ((f"{kind} 127.0.0.77 56", "host unreachable) from 127.0.0.254"),
                      (f"{kind} ::1 56", "address unreachable) from ::1")):  # fmt: skip
        obs = responder_results[key]
        assert obs["outcome"] == "unreachable", key
        assert obs["reason"] == f"destination unreachable ({what} for 3 of 3 echo requests"
        fields = obs["fields"]
        assert (fields["sent"], fields["received"], fields["errors"], fields["loss_ratio"]) == (3, 0, 3, 1.0)
        assert fields["rtts_ms"] == [None, None, None] and fields["rtt_avg_ms"] is None
        assert fields["socket"] == kind


@pytest.mark.parametrize("kind", ["raw", "dgram"])
def test_no_answer_is_a_timeout_with_loss_data(
    kind: str, responder_results: dict[str, dict[str, Any]]
) -> None:
    obs = responder_results[f"{kind} 127.0.0.99 56"]
    assert (obs["outcome"], obs["reason"]) == ("timeout", "no reply to 3 echo requests")
    fields = obs["fields"]
    assert (fields["sent"], fields["received"], fields["loss_ratio"], fields["errors"]) == (3, 0, 1.0, 0)
    assert fields["rtts_ms"] == [None, None, None]


@pytest.mark.parametrize("kind", ["raw", "dgram"])
@pytest.mark.parametrize("target", ["127.0.0.88 56", "::1 60"])
def test_duplicates_are_counted_and_wrong_tokens_ignored(
    kind: str, target: str, responder_results: dict[str, dict[str, Any]]
) -> None:
    obs = responder_results[f"{kind} {target}"]
    assert obs["outcome"] == "ok"
    fields = obs["fields"]
    # each request got a reply with a wrong token (ignored), then the reply, then a copy of it
    assert (fields["sent"], fields["received"], fields["duplicates"], fields["loss_ratio"]) == (3, 3, 3, 0.0)


@pytest.mark.parametrize("kind", ["raw", "dgram"])
def test_no_route_is_unreachable(kind: str) -> None:
    results = in_netns(f"no-route {kind}", {"net.ipv4.ping_group_range": "0 0"}, lo_up=False)
    for target in ("127.0.0.1", "::1"):
        obs = results[target]
        assert obs["outcome"] == "unreachable", obs
        assert obs["reason"].startswith("sendto: ") and obs["reason"].endswith(" for 2 of 2 echo requests")
        assert obs["fields"]["errors"] == 2


def test_unprivileged_user_without_ping_group_is_denied() -> None:
    obs = in_netns("unprivileged", {"net.ipv4.ping_group_range": "1 0"}, user=65534)["127.0.0.1"]
    assert obs["outcome"] == "permission_denied"
    assert obs["reason"] == (
        "no dgram ICMP or raw ICMP socket allowed: needs CAP_NET_RAW (root, or the service's "
        "AmbientCapabilities=CAP_NET_RAW: edgeprobe init systemd) or net.ipv4.ping_group_range covering "
        "gid 65534 (now '1 0')"
    )


def test_unprivileged_user_in_ping_group_uses_dgram() -> None:
    results = in_netns("unprivileged", {"net.ipv4.ping_group_range": "65534 65534"}, user=65534)
    for target in ("127.0.0.1", "::1"):
        assert results[target]["outcome"] == "ok", results[target]
        assert results[target]["fields"]["socket"] == "dgram"
        assert results[target]["fields"]["received"] == 3


# ---------------------------------------------------------------- the namespace side


class Responder:
    """Plays the network while the kernel's own echo replies are off (see NO_KERNEL_ECHO).

    IPv4 by destination: 127.0.0.77 → host unreachable from 127.0.0.254; 127.0.0.88 → a reply
    with a wrong token, the reply, and a duplicate; anything else → silence. ICMPv6 to ::1 by
    payload size: 56 bytes → address unreachable; 60 bytes → like 127.0.0.88.
    """

    def __init__(self) -> None:
        self.v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        loop = asyncio.get_running_loop()
        for sock, handler in ((self.v4, self.on_v4), (self.v6, self.on_v6)):
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), handler)

    @staticmethod
    def send_v4(source: str, message: bytes, dest: str) -> None:
        message = message[:2] + struct.pack("!H", icmp.checksum(message)) + message[4:]  # its checksum is 0
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as out:
            out.bind((source, 0))
            out.sendto(message, (dest, 0))

    @staticmethod
    def replies(echo: bytes, reply_type: int) -> list[bytes]:
        reply = bytes([reply_type, 0, 0, 0]) + echo[4:]
        wrong = reply[:8] + bytes(8) + reply[16:]
        return [wrong, reply, reply]

    def on_v4(self) -> None:
        packet = self.v4.recv(65535)
        ihl = (packet[0] & 0x0F) * 4
        source, dest = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
        if packet[ihl] != 8:
            return
        if dest == "127.0.0.77":
            self.send_v4("127.0.0.254", bytes([3, 1, 0, 0, 0, 0, 0, 0]) + packet, source)
        elif dest == "127.0.0.88":
            for message in self.replies(packet[ihl:], 0):
                self.send_v4(dest, message, source)

    def on_v6(self) -> None:
        echo = self.v6.recv(65535)
        if echo[0] != 128:
            return
        loopback = socket.inet_pton(socket.AF_INET6, "::1")
        if len(echo) == 8 + 56:
            header = struct.pack("!IHBB", 6 << 28, len(echo), socket.IPPROTO_ICMPV6, 64) + loopback * 2
            self.v6.sendto(bytes([1, 3, 0, 0, 0, 0, 0, 0]) + header + echo, ("::1", 0))
        elif len(echo) == 8 + 60:
            for message in self.replies(echo, 129):
                self.v6.sendto(message, ("::1", 0))


async def _observe(runs: list[tuple[str, str, IcmpConfig]]) -> dict[str, Any]:
    async with ProbeContext() as ctx:
        observations = await asyncio.gather(
            *(run_probe(icmp.KIND, target, config, ctx, seq=i) for i, (_, target, config) in enumerate(runs))
        )
    return {key: msgspec.to_builtins(obs) for (key, _, _), obs in zip(runs, observations, strict=True)}


async def _scenario(name: str, arg: str) -> dict[str, Any]:
    quick = IcmpConfig(count=3, interval_s=0.02, timeout_s=0.5)
    if name == "responder":
        responder = Responder()
        runs = [
            (f"{kind} {target} {size}", target, msgspec.structs.replace(quick, socket=kind, size_bytes=size))
            for kind in ("raw", "dgram")
            for target, size in (
                ("127.0.0.77", 56),
                ("127.0.0.88", 56),
                ("127.0.0.99", 56),
                ("::1", 56),
                ("::1", 60),
            )
        ]
        try:
            return await _observe(runs)
        finally:
            responder.v4.close()
            responder.v6.close()
    if name == "no-route":
        config = msgspec.structs.replace(quick, count=2, socket=arg)
        return await _observe([(t, t, config) for t in ("127.0.0.1", "::1")])
    if name == "unprivileged":
        return await _observe([(t, t, quick) for t in ("127.0.0.1", "::1")])
    raise SystemExit(f"unknown scenario {name!r}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_scenario(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))))
