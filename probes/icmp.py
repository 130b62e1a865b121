"""ICMP echo probe ("ping"): ``count`` echo requests ``interval_s`` apart, loss, RTT and jitter.

Sockets: ONE socket per (family, kind) per :class:`ProbeContext`, shared by every concurrent run
and read with ``loop.add_reader``. ``dgram`` is Linux's unprivileged ICMP socket (allowed by
``net.ipv4.ping_group_range``): the kernel rewrites the identifier to the socket's port, hands
it only its own replies and reports ICMP errors on the error queue (``IP_RECVERR``). ``raw``
needs CAP_NET_RAW and sees every ICMP message of the host (a kernel filter passes only echo
replies and errors); it uses a random identifier. ``auto`` tries dgram first (no privilege, no
copies of foreign traffic), then raw.

Demultiplexing: sequence numbers come from one pool per socket, so no two echoes in flight on a
socket share one; a reply must also carry the socket's identifier, come from the address the
echo went to and quote the random 8-byte token that starts each echo's payload. Anything else
(other processes' pings, our own requests looped back, late replies to a reused number) is
ignored.

RTT: the kernel's receive timestamp (``SO_TIMESTAMPNS``, realtime clock) minus ``time.time_ns()``
taken just before ``sendto``. It is checked against ``perf_counter`` (the fallback when there is
no timestamp or the wall clock stepped in between).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import re
import secrets
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from edgeprobe.probes import netio
from edgeprobe.probes.context import ProbeContext, Step
from edgeprobe.probes.kind import Figure, LiveView, PolicyCost, Privilege, ProbeKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure, classify_exception
from edgeprobe.probes.stats import RttSummary, summarize_rtts
from edgeprobe.probes.text import num
from edgeprobe.schema import Observation

SocketKind = Literal["raw", "dgram"]


class IcmpConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    count: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 5
    interval_s: Annotated[float, msgspec.Meta(ge=0.001, le=3600)] = 1.0
    size_bytes: Annotated[int, msgspec.Meta(ge=16, le=65000)] = 56  # payload: token, timestamp, filler
    timeout_s: Annotated[float, msgspec.Meta(ge=0.001, le=60)] = 1.0  # per echo, from its send
    family: Literal["auto", "ipv4", "ipv6"] = "auto"
    socket: Literal["auto", "raw", "dgram"] = "auto"
    # IP TTL (IPv4) / unicast hop limit (IPv6) of the echo requests; None: the system's default
    # (net.ipv4.ip_default_ttl, usually 64). A small one makes routers on the way answer
    # "time to live exceeded".
    ttl: Annotated[int, msgspec.Meta(ge=1, le=255)] | None = None


class IcmpResult(RttSummary, kw_only=True):
    """The :class:`RttSummary` fields (sent, received, duplicates, loss_ratio, rtt_*_ms, jitter
    measures, rtts_ms) plus these."""

    address: str  # the resolved IP address that was pinged
    family: Literal["ipv4", "ipv6"]
    socket: SocketKind  # which kind of socket was used
    ttl: int | None  # TTL / hop limit of the last answered echo (send order)
    errors: int  # echoes answered by an ICMP error (unreachable, time exceeded) or not sendable


def max_run_s(config: IcmpConfig) -> float:
    return (config.count - 1) * config.interval_s + config.timeout_s


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")


def check_target(target: str) -> str | None:
    """None for a host name or an IPv4/IPv6 literal, else what is wrong with it."""
    if not target.strip():
        return "empty target: give a host name or an IP address"
    if any(c.isspace() for c in target):
        return f"{target!r} contains whitespace"
    if "://" in target or "/" in target:
        return f"{target!r} looks like a URL or path; icmp takes a bare host name or IP address"
    try:
        ipaddress.ip_address(target)
        return None
    except ValueError:
        pass
    if target.startswith("[") or ":" in target:
        return f"{target!r} has a port, brackets or is not a valid IPv6 address; icmp takes no port"
    if len(target.rstrip(".")) > 253 or not _HOSTNAME_RE.match(target):
        return f"{target!r} is not a valid host name or IP address"
    if target.rstrip(".").rsplit(".", 1)[-1].isdigit():
        return f"{target!r} is not a valid IPv4 address"
    return None


# ---------------------------------------------------------------- packets (pure)

ECHO_REQUEST = {False: 8, True: 128}  # keyed by ipv6
ECHO_REPLY = {False: 0, True: 129}
_ERROR_TYPES = {
    False: {3: "destination unreachable", 11: "time exceeded"},
    True: {1: "destination unreachable", 3: "time exceeded"},
}
_UNREACH_CODES = {
    False: {0: "net unreachable", 1: "host unreachable", 2: "protocol unreachable", 3: "port unreachable"}
    | {4: "fragmentation needed", 9: "net prohibited", 10: "host prohibited", 13: "prohibited"},
    True: {0: "no route", 1: "administratively prohibited", 3: "address unreachable", 4: "port unreachable"}
    | {5: "source address failed policy", 6: "reject route"},
}
_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
TOKEN_BYTES = 8
_FILLER = bytes((0x10 + i) & 0xFF for i in range(65536))  # like ping's 0x10, 0x11, …


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_echo_request(
    *, ipv6: bool, ident: int, seq: int, token: bytes, sent_at_ns: int, size_bytes: int
) -> bytes:
    """An echo request whose payload is ``token`` (8 bytes), the send time (8 bytes) and filler.

    IPv4 carries its checksum; for ICMPv6 the kernel computes it (it covers a pseudo-header).
    """
    if len(token) != TOKEN_BYTES or size_bytes < TOKEN_BYTES + 8:
        raise ValueError("echo payload needs an 8-byte token and at least 16 bytes")
    payload = token + struct.pack("!Q", sent_at_ns) + _FILLER[: size_bytes - TOKEN_BYTES - 8]
    kind = ECHO_REQUEST[ipv6]
    cksum = 0 if ipv6 else checksum(_HEADER.pack(kind, 0, 0, ident, seq) + payload)
    return _HEADER.pack(kind, 0, cksum, ident, seq) + payload


@dataclass(frozen=True, slots=True)
class IcmpPacket:
    """An echo reply, or an ICMP error quoting one of our echo requests."""

    ident: int
    seq: int
    token: bytes | None  # None when an error quotes too little of the echo to hold it
    peer: str  # replies: who answered; errors: where the quoted echo was going
    error: str | None = None  # errors: "destination unreachable (host unreachable)"
    offender: str | None = None  # errors: who sent the error, when known


def describe_error(*, ipv6: bool, icmp_type: int, code: int) -> str | None:
    """``"destination unreachable (host unreachable)"``, or None when not an error we report."""
    name = _ERROR_TYPES[ipv6].get(icmp_type)
    if name is None:
        return None
    if icmp_type == (1 if ipv6 else 3):
        return f"{name} ({_UNREACH_CODES[ipv6].get(code, f'code {code}')})"
    return name


def _echo_fields(echo: bytes, *, ipv6: bool, icmp_type: int) -> tuple[int, int, bytes | None] | None:
    if len(echo) < _HEADER.size or echo[0] != icmp_type or echo[1] != 0:
        return None
    _, _, _, ident, seq = _HEADER.unpack_from(echo)
    token = echo[8 : 8 + TOKEN_BYTES] if len(echo) >= 8 + TOKEN_BYTES else None
    return ident, seq, token


def _strip_ipv4_header(data: bytes) -> tuple[bytes, str] | None:
    """(the ICMP message inside, destination) of an IPv4 packet carrying ICMP, else None."""
    if len(data) < 20 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_ICMP:
        return None
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        return None
    return data[ihl:], socket.inet_ntop(socket.AF_INET, data[16:20])


def parse_reply(data: bytes, *, ipv6: bool, ip_header: bool, source: str) -> IcmpPacket | None:
    """Parse what a socket received from ``source``: an echo reply, an ICMP error quoting an echo
    request, or None for anything else.

    ``ip_header``: the data starts with the IPv4 header (raw IPv4 sockets). ICMPv6 and dgram
    sockets deliver the ICMP message alone.
    """
    if ip_header:
        stripped = _strip_ipv4_header(data)
        if stripped is None:
            return None
        data = stripped[0]
    if len(data) < _HEADER.size:
        return None
    icmp_type, code = data[0], data[1]
    if icmp_type == ECHO_REPLY[ipv6]:
        fields = _echo_fields(data, ipv6=ipv6, icmp_type=icmp_type)
        if fields is None or fields[2] is None:
            return None
        return IcmpPacket(ident=fields[0], seq=fields[1], token=fields[2], peer=source)
    error = describe_error(ipv6=ipv6, icmp_type=icmp_type, code=code)
    if error is None:
        return None
    quoted = data[8:]  # after type, code, checksum and 4 unused bytes
    if ipv6:
        if len(quoted) < 40 or quoted[0] >> 4 != 6 or quoted[6] != socket.IPPROTO_ICMPV6:
            return None
        dest, echo = socket.inet_ntop(socket.AF_INET6, quoted[24:40]), quoted[40:]
    else:
        inner = _strip_ipv4_header(quoted)
        if inner is None:
            return None
        echo, dest = inner
    fields = _echo_fields(echo, ipv6=ipv6, icmp_type=ECHO_REQUEST[ipv6])
    if fields is None:
        return None
    return IcmpPacket(
        ident=fields[0], seq=fields[1], token=fields[2], peer=dest, error=error, offender=source
    )


_EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6 = 2, 3


def parse_errqueue(data: bytes, extended_err: bytes, *, ipv6: bool, dest: str) -> IcmpPacket | None:
    """An ICMP error from a dgram socket's error queue: ``data`` is our quoted echo request,
    ``extended_err`` the IP_RECVERR/IPV6_RECVERR control data, ``dest`` the address from msg_name."""
    if len(extended_err) < _EXT_ERR.size:
        return None
    _, origin, icmp_type, code, _, _, _ = _EXT_ERR.unpack_from(extended_err)
    if origin != (_SO_EE_ORIGIN_ICMP6 if ipv6 else _SO_EE_ORIGIN_ICMP):
        return None
    error = describe_error(ipv6=ipv6, icmp_type=icmp_type, code=code)
    fields = _echo_fields(data, ipv6=ipv6, icmp_type=ECHO_REQUEST[ipv6])
    if error is None or fields is None:
        return None
    sockaddr = extended_err[_EXT_ERR.size :]  # SO_EE_OFFENDER: sockaddr_in / sockaddr_in6
    family, where = (socket.AF_INET6, sockaddr[8:24]) if ipv6 else (socket.AF_INET, sockaddr[4:8])
    offender = socket.inet_ntop(family, where) if len(where) == (16 if ipv6 else 4) and any(where) else None
    return IcmpPacket(
        ident=fields[0], seq=fields[1], token=fields[2], peer=dest, error=error, offender=offender
    )


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # == SCM_TIMESTAMPNS on Linux
IP_RECVTTL, IP_RECVERR, IPV6_RECVERR = 12, 11, 25
SOL_RAW, ICMP_FILTER, ICMP6_FILTER = 255, 1, 1
_TIMESPEC = struct.Struct("@ll")


@dataclass(frozen=True, slots=True)
class Ancillary:
    received_at_ns: int | None = None  # kernel receive time, realtime clock
    ttl: int | None = None  # TTL / hop limit of the received packet
    extended_err: bytes | None = None  # IP_RECVERR / IPV6_RECVERR data (error queue)


def parse_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> Ancillary:
    stamp = ttl = None
    err = None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            stamp = sec * 1_000_000_000 + nsec
        elif (level, kind) in (
            (socket.IPPROTO_IP, socket.IP_TTL),
            (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT),
        ):
            ttl = int.from_bytes(data[:4], sys.byteorder)
        elif (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            err = data
    return Ancillary(received_at_ns=stamp, ttl=ttl, extended_err=err)


def round_trip_ns(
    *, sent_wall_ns: int, sent_perf_ns: int, received_at_ns: int | None, now_perf_ns: int
) -> int:
    """The kernel-stamped RTT when it is plausible, else the perf_counter one.

    The perf_counter RTT (taken before the wall clock at send, after the kernel stamp at
    receive) bounds the kernel one from above, up to clock drift; outside that the clock stepped.
    """
    perf = now_perf_ns - sent_perf_ns
    if received_at_ns is not None:
        kernel = received_at_ns - sent_wall_ns
        if 0 <= kernel <= perf + perf // 1000 + 1000:
            return kernel
    return perf


# ---------------------------------------------------------------- the shared socket


@dataclass(eq=False)
class _Echo:
    address: str
    seq: int
    token: bytes
    done: asyncio.Future[None]  # resolved by the first reply, an error or the timeout
    sent_wall_ns: int = 0
    sent_perf_ns: int = 0
    rtt_ns: int | None = None
    ttl: int | None = None
    duplicates: int = 0
    outcome: Outcome | None = None  # set with ``error`` when an ICMP error answered or sendto failed
    error: str | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


_BATCH = 256  # datagrams read per readiness callback, so one busy socket cannot starve the loop


class EchoSocket:
    """One ICMP socket shared by all runs of one family and kind (a :class:`ProbeContext` resource)."""

    def __init__(self, sock: socket.socket, *, ipv6: bool, kind: SocketKind, ident: int) -> None:
        self._sock = sock
        self.ipv6 = ipv6
        self.kind: SocketKind = kind
        self.ident = ident
        self._inflight: dict[int, _Echo] = {}
        self._next_seq = secrets.randbelow(0x10000)
        self._buf = bytearray(65600)  # the largest ICMP message plus its IPv4 header
        self._view = memoryview(self._buf)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def open(cls, *, ipv6: bool, kind: SocketKind, ttl: int | None = None) -> EchoSocket:
        """Open and configure the socket (``ttl``: its echoes' TTL / hop limit, None: the
        system's); PermissionError when this kind is not allowed."""
        sol = socket.IPPROTO_IPV6 if ipv6 else socket.IPPROTO_IP
        sock = socket.socket(
            socket.AF_INET6 if ipv6 else socket.AF_INET,
            socket.SOCK_RAW if kind == "raw" else socket.SOCK_DGRAM,
            socket.IPPROTO_ICMPV6 if ipv6 else socket.IPPROTO_ICMP,
        )
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(sol, socket.IPV6_RECVHOPLIMIT if ipv6 else IP_RECVTTL, 1)
            if ttl is not None:
                sock.setsockopt(sol, socket.IPV6_UNICAST_HOPS if ipv6 else socket.IP_TTL, ttl)
            if kind == "dgram":
                sock.setsockopt(sol, IPV6_RECVERR if ipv6 else IP_RECVERR, 1)
                sock.bind(("::" if ipv6 else "0.0.0.0", 0))
                ident = int(sock.getsockname()[1])  # the kernel puts the port in the identifier
            else:
                if ipv6:  # ICMP6_FILTER: a set bit blocks the type; pass echo reply and errors
                    words = [0xFFFFFFFF] * 8
                    for t in (ECHO_REPLY[True], *_ERROR_TYPES[True]):
                        words[t >> 5] &= ~(1 << (t & 31))
                    sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
                else:  # ICMP_FILTER: the same for 32 types
                    passed = sum(1 << t for t in (ECHO_REPLY[False], *_ERROR_TYPES[False]))
                    sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~passed & 0xFFFFFFFF))
                ident = secrets.randbelow(0x10000)
            return cls(sock, ipv6=ipv6, kind=kind, ident=ident)
        except BaseException:
            sock.close()
            raise

    def _allocate_seq(self) -> int:
        for _ in range(0x10000):
            seq, self._next_seq = self._next_seq, (self._next_seq + 1) & 0xFFFF
            if seq not in self._inflight:
                return seq
        raise ProbeFailure(Outcome.ERROR, "all 65536 ICMP sequence numbers of the socket are in flight")

    def send(self, sockaddr: tuple[Any, ...], size_bytes: int, timeout_s: float) -> _Echo:
        """Send one echo request; its ``done`` future resolves on reply, error or timeout."""
        echo = _Echo(
            str(sockaddr[0]),
            self._allocate_seq(),
            secrets.token_bytes(TOKEN_BYTES),
            self._loop.create_future(),
        )
        packet = build_echo_request(
            ipv6=self.ipv6,
            ident=self.ident,
            seq=echo.seq,
            token=echo.token,
            sent_at_ns=time.time_ns(),
            size_bytes=size_bytes,
        )
        self._inflight[echo.seq] = echo
        echo.sent_perf_ns = time.perf_counter_ns()
        echo.sent_wall_ns = time.time_ns()
        try:
            self._sock.sendto(packet, sockaddr)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):  # no buffer space: just a lost echo
                echo.outcome, reason = classify_exception(exc)
                echo.error = f"sendto: {reason}"
            self.release(echo)
            return echo
        echo.timer = self._loop.call_later(timeout_s, self.release, echo)
        return echo

    def release(self, echo: _Echo) -> None:
        """Stop listening for ``echo`` (its timeout, or its run ended) and free its number."""
        if echo.timer is not None:
            echo.timer.cancel()
        if self._inflight.get(echo.seq) is echo:
            del self._inflight[echo.seq]
        echo.finish()

    def _on_readable(self) -> None:
        ip_header = self.kind == "raw" and not self.ipv6
        for _ in range(_BATCH):
            try:
                n, anc, _, addr = self._sock.recvmsg_into([self._buf], 512)
            except OSError:  # EAGAIN, or a pending ICMP error on a dgram socket (see the error queue)
                break
            now_perf_ns = time.perf_counter_ns()
            data = bytes(self._view[:n])
            packet = parse_reply(data, ipv6=self.ipv6, ip_header=ip_header, source=str(addr[0]))
            if packet is not None:
                self._match(packet, parse_ancillary(anc), now_perf_ns)
        for _ in range(_BATCH if self.kind == "dgram" else 0):
            try:
                n, anc, _, addr = self._sock.recvmsg_into([self._buf], 512, socket.MSG_ERRQUEUE)
            except OSError:
                break
            ancillary = parse_ancillary(anc)
            if ancillary.extended_err is not None:
                data = bytes(self._view[:n])
                packet = parse_errqueue(data, ancillary.extended_err, ipv6=self.ipv6, dest=str(addr[0]))
                if packet is not None:
                    self._match(packet, ancillary, 0)

    def _match(self, packet: IcmpPacket, anc: Ancillary, now_perf_ns: int) -> None:
        echo = self._inflight.get(packet.seq)
        if echo is None or packet.ident != self.ident or packet.peer != echo.address:
            return
        if packet.token not in (echo.token, None):
            return
        if packet.error is not None:
            if not echo.done.done():
                echo.outcome = Outcome.UNREACHABLE
                echo.error = packet.error + (f" from {packet.offender}" if packet.offender else "")
                echo.finish()
            return
        if echo.rtt_ns is not None:
            echo.duplicates += 1
        elif not echo.done.done():
            echo.rtt_ns = round_trip_ns(
                sent_wall_ns=echo.sent_wall_ns,
                sent_perf_ns=echo.sent_perf_ns,
                received_at_ns=anc.received_at_ns,
                now_perf_ns=now_perf_ns,
            )
            echo.ttl = anc.ttl
            echo.finish()

    async def aclose(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        for echo in list(self._inflight.values()):
            self.release(echo)
        self._sock.close()


# ---------------------------------------------------------------- the probe


async def _resolve(target: str, family: str) -> tuple[bool, tuple[Any, ...]]:
    want = {"auto": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}[family]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target, None, family=want, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ProbeFailure(Outcome.DNS_ERROR, f"name resolution failed: {exc.strerror or exc}") from exc
    for fam, _, _, _, sockaddr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6):
            return fam == socket.AF_INET6, sockaddr
    what = {"ipv4": "IPv4", "ipv6": "IPv6"}.get(family, "IP")
    raise ProbeFailure(Outcome.DNS_ERROR, f"name resolution failed: no {what} address for {target!r}")


def _permission_reason(ipv6: bool, kinds: Sequence[SocketKind]) -> str:
    needs = []
    if "raw" in kinds:
        # Not `setcap` on the interpreter: that would give raw sockets to every Python program on
        # the host. The agent's systemd unit (edgeprobe init systemd) grants it to the one service.
        needs.append("CAP_NET_RAW (root, or the service's AmbientCapabilities=CAP_NET_RAW: edgeprobe init systemd)")
    if "dgram" in kinds:
        try:
            with open("/proc/sys/net/ipv4/ping_group_range") as f:
                now = " ".join(f.read().split())
        except OSError:
            now = "unknown"
        needs.append(f"net.ipv4.ping_group_range covering gid {os.getegid()} (now {now!r})")
    sockets = " or ".join(f"{k} ICMP{'v6' if ipv6 else ''}" for k in kinds)
    return f"no {sockets} socket allowed: needs {' or '.join(needs)}"


async def _open_socket(
    ctx: ProbeContext, ipv6: bool, choice: Literal["auto", SocketKind], ttl: int | None = None
) -> EchoSocket:
    kinds: tuple[SocketKind, ...] = ("dgram", "raw") if choice == "auto" else (choice,)
    for kind in kinds:
        # One socket per TTL too (the TTL is the socket's); the system's TTL: the plain socket.
        opener = functools.partial(EchoSocket.open, ipv6=ipv6, kind=kind)
        if ttl is not None:
            opener = functools.partial(opener, ttl=ttl)
        try:
            return await ctx.resource(("icmp", ipv6, kind) if ttl is None else ("icmp", ipv6, kind, ttl), opener)
        except PermissionError:
            continue
    raise ProbeFailure(Outcome.PERMISSION_DENIED, _permission_reason(ipv6, kinds))


def _build_result(echoes: Sequence[_Echo], *, address: str, ipv6: bool, kind: SocketKind) -> IcmpResult:
    summary = summarize_rtts(
        [None if e.rtt_ns is None else e.rtt_ns / 1e6 for e in echoes], sum(e.duplicates for e in echoes)
    )
    answered = [e for e in echoes if e.rtt_ns is not None]
    return IcmpResult(
        **msgspec.structs.asdict(summary),
        address=address,
        family="ipv6" if ipv6 else "ipv4",
        socket=kind,
        ttl=answered[-1].ttl if answered else None,
        errors=sum(e.error is not None for e in echoes),
    )


def _step(target: str, echo: _Echo, n: int) -> Step:
    """Echo number ``n`` (1, 2, … in send order) as it ended."""
    if echo.rtt_ns is not None:
        return Step(target=target, address=echo.address, seq=n, time_ms=echo.rtt_ns / 1e6, ttl=echo.ttl)
    return Step(target=target, address=echo.address, seq=n, error=echo.error or "no reply")


def _report(ctx: ProbeContext, target: str, echo: _Echo, n: int, _done: object) -> None:
    if echo.rtt_ns is not None or echo.error is not None or not ctx.stop_requested:  # not those a stop cut off
        ctx.report(_step(target, echo, n))


async def probe(target: str, config: IcmpConfig, ctx: ProbeContext) -> IcmpResult:
    """``count`` echoes ``interval_s`` apart; each reported to ``ctx.progress`` as it ends. A stop
    (``ctx.request_stop()``) sends no more, counts the echoes still unanswered as lost (as ping
    does on Ctrl-C) and returns what was measured."""
    ipv6, sockaddr = await _resolve(target, config.family)
    if ctx.check_address is not None:  # the address echoes go to, before the first one
        await netio.check_address(ctx.check_address, target, str(sockaddr[0]), 0)
    sock = await _open_socket(ctx, ipv6, config.socket, config.ttl)
    ctx.report(
        Step(
            target=target,
            address=str(sockaddr[0]),
            seq=None,
            detail=f"{config.size_bytes} data bytes over a {sock.kind} ICMP{'v6' if ipv6 else ''} socket"
            + (f", ttl {config.ttl}" if config.ttl is not None else ""),
        )
    )
    loop = asyncio.get_running_loop()
    echoes: list[_Echo] = []
    start = loop.time()
    try:
        for i in range(config.count):
            if i and await ctx.pause(start + i * config.interval_s - loop.time()):
                break
            echo = sock.send(sockaddr, config.size_bytes, config.timeout_s)
            echoes.append(echo)
            if ctx.progress is not None:
                echo.done.add_done_callback(functools.partial(_report, ctx, target, echo, i + 1))
        if not ctx.stop_requested:
            stop: asyncio.Future[None] = asyncio.ensure_future(ctx.stopped())
            replies: asyncio.Future[Any] = asyncio.gather(*(e.done for e in echoes))
            try:
                await asyncio.wait((replies, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
    finally:
        for echo in echoes:
            sock.release(echo)
    result = _build_result(echoes, address=str(sockaddr[0]), ipv6=ipv6, kind=sock.kind)
    if result.received == 0:
        failed = [e for e in echoes if e.outcome is not None]
        if failed:
            first = failed[0]
            reason = f"{first.error} for {len(failed)} of {result.sent} echo requests"
            raise ProbeFailure(first.outcome or Outcome.ERROR, reason, partial=result)
        raise ProbeFailure(Outcome.TIMEOUT, f"no reply to {result.sent} echo requests", partial=result)
    return result


# ---------------------------------------------------------------- the human view (pure)


def render_step(step: Step) -> str:
    """One line of ping's live output: the header (the start), a reply or an echo without one."""
    if step.seq is None:
        return f"PING {step.target} ({step.address})" + (f": {step.detail}" if step.detail else "")
    if step.time_ms is None:
        return f"no reply from {step.address}: icmp_seq={step.seq}: {step.error or 'no reply'}"
    ttl = f" ttl={step.ttl}" if step.ttl is not None else ""
    return f"reply from {step.address}: icmp_seq={step.seq}{ttl} time={step.time_ms:.3f} ms"


def _header(obs: Observation) -> str:
    f = obs.fields
    if not f.get("address"):
        return f"PING {obs.target}"
    how = f" over a {f['socket']} ICMP socket" if f.get("socket") else ""
    return f"PING {obs.target} ({f['address']}){how}"


def render_stats(obs: Observation) -> list[str]:
    """ping's statistics of a run (from partial fields too; nothing when nothing was sent)."""
    f = obs.fields
    sent, received = f.get("sent"), f.get("received")
    if sent is None:
        return []
    loss = f.get("loss_ratio")
    dup = f.get("duplicates") or 0
    errors = f.get("errors") or 0
    lines = [
        f"--- {obs.target} ping statistics ---",
        f"{sent} packets transmitted, {received} received"
        + (f", +{dup} duplicates" if dup else "")
        + (f", +{errors} errors" if errors else "")
        + (f", {100 * float(loss):.4g}% packet loss" if isinstance(loss, int | float) else "")
        + f", time {obs.duration_ms:.0f} ms",
    ]
    if f.get("rtt_min_ms") is not None:
        lines.append(
            "rtt min/avg/max/stddev = "
            f"{num(f.get('rtt_min_ms'))}/{num(f.get('rtt_avg_ms'))}/{num(f.get('rtt_max_ms'))}/"
            f"{num(f.get('rtt_stddev_ms'))} ms"
        )
        extra = [
            (k, f.get(k))
            for k in ("rtt_p50_ms", "rtt_p95_ms", "jitter_rfc3550_ms", "ipdv_mean_ms", "pdv_p95_ms")
            if f.get(k) is not None
        ]
        if extra:
            lines.append("  ".join(f"{k}={num(v)}" for k, v in extra))
    return lines


def render_one_line(obs: Observation) -> str:
    """fping's summary of one target: ``target : xmt/rcv/%loss = 5/5/0%, min/avg/max = …``."""
    f = obs.fields
    if f.get("sent") is None:
        return f"{obs.target} : {obs.outcome}: {obs.reason or 'no reason given'}"
    loss = f.get("loss_ratio")
    line = f"{obs.target} : xmt/rcv/%loss = {f.get('sent')}/{f.get('received')}/"
    line += f"{100 * float(loss):.4g}%" if isinstance(loss, int | float) else "-"
    if f.get("rtt_min_ms") is not None:
        line += f", min/avg/max = {num(f.get('rtt_min_ms'))}/{num(f.get('rtt_avg_ms'))}/{num(f.get('rtt_max_ms'))} ms"
    return line


def render(obs: Observation) -> list[str]:
    """``ping``'s output after the run: one line per echo, then the statistics (from partial
    fields too)."""
    f = obs.fields
    address = f.get("address") or obs.target
    lines = [_header(obs)]
    rtts = f.get("rtts_ms") or []
    assert isinstance(rtts, list)
    for i, rtt in enumerate(rtts, start=1):
        lines.append(
            f"reply from {address}: icmp_seq={i} time={rtt:.3f} ms"
            if rtt is not None
            else f"no reply from {address}: icmp_seq={i}"
        )
    return lines + render_stats(obs)


KIND = ProbeKind(
    name="icmp",
    description="ICMP echo (ping): loss, RTT percentiles and jitter over `count` echo requests",
    config_type=IcmpConfig,
    result_type=IcmpResult,
    run=probe,
    check_target=check_target,
    max_run_s=max_run_s,
    tag_fields=("family",),
    target_label="target",
    display_target=None,
    render=render,
    headline=Figure(field="rtt_p50_ms", label="rtt p50"),
    jitter=Figure(field="jitter_rfc3550_ms", label="RFC 3550"),
    fleet_field="rtt_avg_ms",
    live=LiveView(step=render_step, summary=render_stats, one_line=render_one_line),
    aliases=("ping",),
    floor_field="rtt_min_ms",
    first_byte_round_trips=None,
    policy_cost=lambda config: PolicyCost(packets=config.count),
    env_vars=None,
    # Status.icmp_permitted: the agent could open an ICMP socket (dgram or raw) when it started.
    privilege=Privilege(status_field="icmp_permitted", missing_note="no perm"),
    sub_points=None,
)
