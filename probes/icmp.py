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
echo went to and quote the 8-byte token that starts each echo's payload (a per-socket counter
from a random start: unique per echo on the socket). Anything else (other processes' pings, our
own requests looped back, late replies to a reused number) is ignored. A raw socket also gets a
kernel filter (classic BPF, :func:`reply_filter`) that drops echo replies with another
identifier before they wake the agent: on a host where fping or other agents ping, their
replies cost nothing here.

The engine (:class:`EchoSocket`): a run hands its echoes to the socket, which sends each at its
time and ends each at its reply, ICMP error or deadline, all from one reader and one loop timer
over a :class:`Timeline` of sends and deadlines. There is no task, future, timer or thread hop
per echo: a run's task wakes once, when its last echo ended. An address literal is not passed
through ``getaddrinfo`` (a thread of the default executor each time).

RTT: the kernel's receive timestamp (``SO_TIMESTAMPNS``, realtime clock) minus ``time.time_ns()``
taken just before ``sendto``. It is checked against ``perf_counter`` (the fallback when there is
no timestamp or the wall clock stepped in between).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import heapq
import ipaddress
import itertools
import os
import re
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

import msgspec

from edgeprobe.probes import netio
from edgeprobe.probes.context import ProbeContext, Step
from edgeprobe.probes.kind import Figure, LiveView, PolicyCost, Privilege, ProbeKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure, classify_exception
from edgeprobe.probes.stats import RttSummary, summarize_rtts
from edgeprobe.probes.text import num
from edgeprobe.probes.wake import WAKE_GRID_NS, call_at_ns, grid_ceil_ns, next_grid_ns
from edgeprobe.schema import Observation

SocketKind = Literal["raw", "dgram"]
T = TypeVar("T")


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
_STAMP = struct.Struct("!Q")
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
    *,
    ipv6: bool,
    ident: int,
    seq: int,
    token: bytes,
    sent_at_ns: int,
    size_bytes: int,
    kernel_checksum: bool = False,
) -> bytes:
    """An echo request whose payload is ``token`` (8 bytes), the send time (8 bytes) and filler.

    IPv4 carries its checksum; for ICMPv6 the kernel computes it (it covers a pseudo-header), and
    so it does for a ping (dgram) socket's echoes (``kernel_checksum``: the field is left 0).
    """
    if len(token) != TOKEN_BYTES or size_bytes < TOKEN_BYTES + 8:
        raise ValueError("echo payload needs an 8-byte token and at least 16 bytes")
    filler = size_bytes - TOKEN_BYTES - 8
    head = token + _STAMP.pack(sent_at_ns)
    kind = ECHO_REQUEST[ipv6]
    cksum = 0
    if not ipv6 and not kernel_checksum:  # header, token and stamp summed here; the filler's sum once per size
        total = sum(_WORDS_24.unpack(_HEADER.pack(kind, 0, 0, ident, seq) + head)) + _filler_sum(filler)
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        cksum = ~total & 0xFFFF
    return _HEADER.pack(kind, 0, cksum, ident, seq) + head + _FILLER[:filler]


_WORDS_24 = struct.Struct("!12H")  # the header (8 bytes), token (8) and stamp (8) as 16-bit words


@functools.lru_cache(maxsize=64)
def _filler_sum(n: int) -> int:
    """The one's-complement partial sum of the first ``n`` filler bytes, as the checksum sees
    them after 24 bytes (an even offset) (pure)."""
    data = _FILLER[:n] + (b"\0" if n % 2 else b"")
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


class IcmpPacket(NamedTuple):
    """An echo reply, or an ICMP error quoting one of our echo requests (a tuple: one per reply
    received, made cheaply)."""

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


def _ipv4_header_bytes(data: bytes) -> int | None:
    """The header length of an IPv4 packet carrying ICMP, else None."""
    if len(data) < 20 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_ICMP:
        return None
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        return None
    return ihl


def _strip_ipv4_header(data: bytes) -> tuple[bytes, str] | None:
    """(the ICMP message inside, destination) of an IPv4 packet carrying ICMP, else None."""
    ihl = _ipv4_header_bytes(data)
    if ihl is None:
        return None
    return data[ihl:], socket.inet_ntop(socket.AF_INET, data[16:20])


def parse_reply(data: bytes, *, ipv6: bool, ip_header: bool, source: str) -> IcmpPacket | None:
    """Parse what a socket received from ``source``: an echo reply, an ICMP error quoting an echo
    request, or None for anything else.

    ``ip_header``: the data starts with the IPv4 header (raw IPv4 sockets). ICMPv6 and dgram
    sockets deliver the ICMP message alone.
    """
    if ip_header:  # the outer destination is ours: not needed
        ihl = _ipv4_header_bytes(data)
        if ihl is None:
            return None
        data = data[ihl:]
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
    return IcmpPacket(ident=fields[0], seq=fields[1], token=fields[2], peer=dest, error=error, offender=source)


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
    return IcmpPacket(ident=fields[0], seq=fields[1], token=fields[2], peer=dest, error=error, offender=offender)


# ---------------------------------------------------------------- the raw socket's kernel filter

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_BPF_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def reply_filter(ident: int, *, ipv6: bool) -> bytes:
    """A classic BPF program for a raw ICMP socket that drops echo replies whose identifier is
    not ``ident`` (other processes' pings: fping, ping, another agent) in the kernel, before they
    wake the agent; everything else the ICMP filter lets through (errors) passes (pure).

    Raw IPv4 sockets see the IP header first (the ICMP message starts at 4 × IHL); raw ICMPv6
    sockets see the ICMPv6 message.
    """
    echo_reply = ECHO_REPLY[ipv6]
    insns = [
        (0x01, 0, 0, 0) if ipv6 else (0xB1, 0, 0, 0),  # x = 0 (ldx #0) | x = 4*([0]&0xf) (ldxb msh)
        (0x50, 0, 0, 0),  # ldb [x + 0]: the ICMP type
        (0x15, 0, 2, echo_reply),  # jeq echo reply ? next : accept
        (0x48, 0, 0, 4),  # ldh [x + 4]: the identifier
        (0x15, 0, 1, ident),  # jeq ident ? accept : drop
        (0x06, 0, 0, 0xFFFFFFFF),  # accept: the whole packet
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(_BPF_INSN.pack(*insn) for insn in insns)


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER ``program`` (a :func:`reply_filter`); where the kernel refuses it, the
    socket stays unfiltered (replies are matched in user space anyway)."""
    import ctypes  # only here: the one place that needs a pointer

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // _BPF_INSN.size, ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        pass


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # == SCM_TIMESTAMPNS on Linux
IP_RECVTTL, IP_RECVERR, IPV6_RECVERR = 12, 11, 25
SOL_RAW, ICMP_FILTER, ICMP6_FILTER = 255, 1, 1
_TIMESPEC = struct.Struct("@ll")


class Ancillary(NamedTuple):
    received_at_ns: int | None = None  # kernel receive time, realtime clock
    ttl: int | None = None  # TTL / hop limit of the received packet
    extended_err: bytes | None = None  # IP_RECVERR / IPV6_RECVERR data (error queue)


_TTL_CMSGS = frozenset({(socket.IPPROTO_IP, socket.IP_TTL), (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)})
_ERR_CMSGS = frozenset({(socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)})


def parse_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> Ancillary:
    stamp = ttl = None
    err = None
    for level, kind, data in ancdata:
        if kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            stamp = sec * 1_000_000_000 + nsec
        elif (level, kind) in _TTL_CMSGS:
            ttl = int.from_bytes(data[:4], sys.byteorder)
        elif (level, kind) in _ERR_CMSGS:
            err = data
    return Ancillary(stamp, ttl, err)


def round_trip_ns(*, sent_wall_ns: int, sent_perf_ns: int, received_at_ns: int | None, now_perf_ns: int) -> int:
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


# ---------------------------------------------------------------- the timeline (pure)


class Timeline(Generic[T]):
    """Things due at a time (ns, any monotonic clock) in one heap, popped in time order.

    One per socket holds every run's next send and every echo's deadline, so the socket needs one
    loop timer (for the earliest live entry) however many echoes are in flight, instead of a
    timer per echo. Entries whose thing is no longer ``live`` (an echo answered before its
    deadline, a run stopped before its next send) are not removed when that happens but skipped
    when they reach the top: a reply costs no heap work and no timer cancellation.
    """

    __slots__ = ("_heap", "_live", "_tie")

    def __init__(self, live: Callable[[T], bool]) -> None:
        self._heap: list[tuple[int, int, T]] = []
        self._tie = itertools.count()  # equal times pop in push order; items are never compared
        self._live = live

    def __len__(self) -> int:
        return len(self._heap)  # dead entries not yet skipped included

    def push(self, at_ns: int, item: T) -> None:
        heapq.heappush(self._heap, (at_ns, next(self._tie), item))

    def next_at(self) -> int | None:
        """When the earliest live entry is due (dead ones on top are dropped), None when none."""
        heap, live = self._heap, self._live
        while heap:
            if live(heap[0][2]):
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def pop_due(self, now_ns: int) -> list[T]:
        """The live entries due at or before ``now_ns``, in time order (removed)."""
        heap, live = self._heap, self._live
        due: list[T] = []
        while heap and heap[0][0] <= now_ns:
            item = heapq.heappop(heap)[2]
            if live(item):
                due.append(item)
        return due


# ---------------------------------------------------------------- the shared socket


class _Echo:
    """One echo request of a run: sent (or not), then ended by a reply, an error or its deadline."""

    __slots__ = (
        "address",
        "deadline_ns",
        "duplicates",
        "ended",
        "error",
        "n",
        "outcome",
        "rtt_ns",
        "run",
        "sent_perf_ns",
        "sent_wall_ns",
        "seq",
        "token",
        "ttl",
    )  # fmt: skip

    def __init__(self, run: _Run, seq: int, token: bytes) -> None:
        self.run = run
        self.n = len(run.echoes) + 1  # 1, 2, … in send order
        self.address = run.address
        self.seq = seq
        self.token = token
        self.sent_wall_ns = 0
        self.sent_perf_ns = 0
        self.deadline_ns = 0  # monotonic
        self.rtt_ns: int | None = None
        self.ttl: int | None = None
        self.duplicates = 0
        self.outcome: Outcome | None = None  # set with ``error`` when an ICMP error answered or sendto failed
        self.error: str | None = None
        self.ended = False  # answered, failed, timed out, or its run stopped


def _echo_live(echo: _Echo) -> bool:
    return not echo.ended


class _Run:
    """One probe run on a socket: ``count`` echoes ``interval_ns`` apart, sent by the socket's
    timeline; ``done`` resolves when every echo has ended (or the run was stopped)."""

    __slots__ = ("address", "count", "done", "echoes", "interval_ns", "next_send_ns", "on_end", "open", "size_bytes",
                 "sockaddr", "started_ns", "stopped", "timeout_ns")  # fmt: skip

    def __init__(
        self,
        sockaddr: tuple[Any, ...],
        *,
        count: int,
        interval_ns: int,
        timeout_ns: int,
        size_bytes: int,
        done: asyncio.Future[None],
        on_end: Callable[[_Echo, int], None] | None,
    ) -> None:
        self.sockaddr = sockaddr
        self.address = str(sockaddr[0])
        self.count = count
        self.interval_ns = interval_ns
        self.timeout_ns = timeout_ns
        self.size_bytes = size_bytes
        self.done = done
        self.on_end = on_end  # (echo, its number 1, 2, …) as each ends; not for echoes a stop cut off
        self.echoes: list[_Echo] = []
        self.open = 0  # echoes sent and not ended
        self.started_ns = 0
        self.next_send_ns = 0
        self.stopped = False


def _send_live(run: _Run) -> bool:
    return not run.stopped


_BATCH = 256  # datagrams read per readiness callback, so one busy socket cannot starve the loop
# While busy the engine wakes only on the ticks of the agent's wake-up grid (probes/wake.py),
# where the scheduler starts runs too: at most once per tick, on the tick. A send leaves up to a
# tick early, a reply is read and a deadline ended up to a tick late. RTTs are unaffected (the
# kernel stamps each reply as it arrives: SO_TIMESTAMPNS), a reply later than its timeout is lost
# whenever it is read, and a socket that has not woken in the current tick reads a reply at once
# (a lone ping is not held back). A run's interval caps the tick at a quarter of it
# (_MIN_TICK_NS at least).
_TICK_NS = WAKE_GRID_NS
_MIN_TICK_NS = 250_000


class EchoSocket:
    """One ICMP socket shared by all runs of one family and kind (a :class:`ProbeContext` resource).

    The socket is the engine: :meth:`start` hands it a run; it sends each echo of every run at its
    time and ends each at its reply, ICMP error or deadline, from one reader and one loop timer
    (two :class:`Timeline` s: the sends and the deadlines) — no task, future or timer per echo.
    """

    def __init__(self, sock: socket.socket, *, ipv6: bool, kind: SocketKind, ident: int) -> None:
        self._sock = sock
        self.ipv6 = ipv6
        self.kind: SocketKind = kind
        self.ident = ident
        self._inflight: dict[int, _Echo] = {}
        self._next_seq = secrets.randbelow(0x10000)
        # Tokens: a counter from a random start, unique per echo on this socket (a late reply to
        # an earlier echo that had the same sequence number never matches) without a syscall each.
        self._next_token = secrets.randbits(64)
        self._buf = bytearray(65600)  # the largest ICMP message plus its IPv4 header
        self._view = memoryview(self._buf)
        self._loop = asyncio.get_running_loop()
        self._sends: Timeline[_Run] = Timeline(_send_live)
        self._deadlines: Timeline[_Echo] = Timeline(_echo_live)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ns = 0
        self._in_timer = False  # inside _on_timer: the timer is re-armed once, at its end
        self._tick_ns = _TICK_NS
        self._woke_ns = 0  # monotonic: the engine's last wake-up (timer, or a reply read at once)
        self._closed = False
        self._reading = True  # the reader is registered (taken off while a busy socket waits for its tick)
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
                _attach_filter(sock, reply_filter(ident, ipv6=ipv6))
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

    # ---- runs

    def start(
        self,
        sockaddr: tuple[Any, ...],
        *,
        count: int,
        interval_s: float,
        timeout_s: float,
        size_bytes: int,
        on_end: Callable[[_Echo, int], None] | None = None,
    ) -> _Run:
        """Send the run's first echo now and the others ``interval_s`` apart; ``run.done``
        resolves when all have ended. ``on_end(echo, n)`` is called as each ends (reply, error,
        deadline), never for echoes that :meth:`stop` cut off."""
        run = _Run(
            sockaddr,
            count=count,
            interval_ns=round(interval_s * 1e9),
            timeout_ns=round(timeout_s * 1e9),
            size_bytes=size_bytes,
            done=self._loop.create_future(),
            on_end=on_end,
        )
        if self._closed:
            run.stopped = True
            run.done.set_result(None)
            return run
        if count > 1:
            self._tick_ns = max(_MIN_TICK_NS, min(self._tick_ns, run.interval_ns // 4))
        now = time.monotonic_ns()
        run.started_ns = run.next_send_ns = now
        self._send_next(run, now)
        return run

    def stop(self, run: _Run) -> None:
        """Send nothing more for ``run``; its echoes still in flight end unanswered (not reported),
        and its numbers are free again (later duplicates are no longer counted)."""
        if run.stopped:
            return
        run.stopped = True
        run.open = 0
        self._forget(run)

    def _forget(self, run: _Run) -> None:
        inflight = self._inflight
        for echo in run.echoes:
            echo.ended = True
            if inflight.get(echo.seq) is echo:
                del inflight[echo.seq]
        if not run.done.done():
            run.done.set_result(None)

    def _send_next(self, run: _Run, now_ns: int) -> None:
        """Send the run's next echo and put what follows (its next send, its deadline) on the timelines."""
        echo = _Echo(run, self._allocate_seq(), (self._next_token & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big"))
        self._next_token += 1
        run.echoes.append(echo)
        sent = self._sendto(echo)
        if len(run.echoes) < run.count:
            run.next_send_ns += run.interval_ns
            self._schedule(self._sends, run.next_send_ns, run)
        if sent:
            run.open += 1
            self._inflight[echo.seq] = echo
            echo.deadline_ns = now_ns + run.timeout_ns
            self._schedule(self._deadlines, echo.deadline_ns, echo)
        else:
            self._end(echo)

    def _sendto(self, echo: _Echo) -> bool:
        """True when the echo left; False (with ``outcome``/``error`` set unless it was only a lost
        echo: no buffer space) when it did not."""
        run = echo.run
        echo.sent_perf_ns = time.perf_counter_ns()
        echo.sent_wall_ns = time.time_ns()
        packet = build_echo_request(
            ipv6=self.ipv6,
            ident=self.ident,
            seq=echo.seq,
            token=echo.token,
            sent_at_ns=echo.sent_wall_ns,
            size_bytes=run.size_bytes,
            kernel_checksum=self.kind == "dgram",
        )
        try:
            self._sock.sendto(packet, run.sockaddr)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):  # no buffer space: just a lost echo
                echo.outcome, reason = classify_exception(exc)
                echo.error = f"sendto: {reason}"
            return False
        return True

    def _end(self, echo: _Echo) -> None:
        """``echo`` ended (reply, error, deadline or not sent): tell the run; when it was the run's
        last, the run is done. Its echoes stay in the in-flight table until it is stopped (so
        duplicates are counted, late replies recognised), which its task does when it resumes."""
        echo.ended = True
        run = echo.run
        if echo.deadline_ns:  # it was sent
            run.open -= 1
        if run.on_end is not None:
            run.on_end(echo, echo.n)
        if len(run.echoes) == run.count and run.open == 0 and not run.done.done():
            run.done.set_result(None)  # the run's task stops it when it resumes: duplicates until then count

    # ---- the one timer

    def _schedule(self, timeline: Timeline[Any], at_ns: int, item: Any) -> None:
        timeline.push(at_ns, item)
        # Inside _on_timer the timer is re-armed once at the end, for the earliest of everything
        # left: arming here would set it for this item even when others are due sooner.
        if not self._in_timer:
            self._want(at_ns - self._tick_ns if timeline is self._sends else at_ns)

    def _next_tick_ns(self) -> int:
        """The first tick after the engine's last wake-up: the earliest it wakes again while busy."""
        return next_grid_ns(self._woke_ns, self._tick_ns)

    def _want(self, at_ns: int) -> None:
        """Wake up on the first tick at or after ``at_ns`` and after the last wake-up's (unless
        the timer is set sooner)."""
        at_ns = grid_ceil_ns(max(at_ns, self._next_tick_ns()), self._tick_ns)
        if self._timer is None or at_ns < self._timer_at_ns:
            self._arm(at_ns)

    def _next_wake_ns(self) -> int | None:
        """When the engine must wake next: a tick before the next send, at the next deadline, or at
        once for a reader held back; on a tick, and never before the tick after the last wake-up
        (None: idle)."""
        nexts = []
        send_at = self._sends.next_at()
        if send_at is not None:
            nexts.append(send_at - self._tick_ns)
        deadline_at = self._deadlines.next_at()
        if deadline_at is not None:
            nexts.append(deadline_at)
        if not self._reading:
            nexts.append(self._woke_ns)  # a reader held back until this tick
        return grid_ceil_ns(max(min(nexts), self._next_tick_ns()), self._tick_ns) if nexts else None

    def _arm(self, at_ns: int | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at_ns is not None and not self._closed:
            self._timer_at_ns = at_ns
            self._timer = call_at_ns(self._loop, at_ns, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic_ns()
        self._woke_ns = now
        self._in_timer = True
        try:
            for run in self._sends.pop_due(now + self._tick_ns):
                self._send_next(run, now)
            expired = self._deadlines.pop_due(now)
            # What came in (on loopback: the replies to what was just sent) is read in this
            # wake-up; before the deadlines, with the error queue: an ICMP error beats the deadline.
            self._drain(errqueue=bool(expired))
            for echo in expired:
                if not echo.ended:
                    self._end(echo)
            if not self._reading and not self._closed:
                self._loop.add_reader(self._sock.fileno(), self._on_readable)
                self._reading = True
        finally:
            self._in_timer = False
            self._arm(self._next_wake_ns())

    # ---- replies

    def _on_readable(self) -> None:
        now = time.monotonic_ns()
        if now >= self._next_tick_ns():  # not woken in this tick: read at once
            self._woke_ns = now
            self._drain(errqueue=False)
            return
        # Busy: the reader waits for the next tick, which reads everything that came in meanwhile.
        self._loop.remove_reader(self._sock.fileno())
        self._reading = False
        self._want(self._next_tick_ns())

    def _drain(self, *, errqueue: bool) -> None:
        """Read what is waiting (up to :data:`_BATCH`); the error queue (dgram sockets) when a read
        reports a pending error or ``errqueue`` asks for it."""
        ip_header = self.kind == "raw" and not self.ipv6
        sock, buf, view = self._sock, [self._buf], self._view
        for _ in range(_BATCH):
            try:
                n, anc, _, addr = sock.recvmsg_into(buf, 512)
            except BlockingIOError:
                break
            except OSError:  # a pending ICMP error on a dgram socket: it is on the error queue
                errqueue = True
                continue
            now_perf_ns = time.perf_counter_ns()
            packet = parse_reply(bytes(view[:n]), ipv6=self.ipv6, ip_header=ip_header, source=addr[0])
            if packet is not None:
                self._match(packet, parse_ancillary(anc), now_perf_ns)
        if not errqueue or self.kind != "dgram":
            return
        for _ in range(_BATCH):
            try:
                n, anc, _, addr = sock.recvmsg_into(buf, 512, socket.MSG_ERRQUEUE)
            except OSError:
                break
            ancillary = parse_ancillary(anc)
            if ancillary.extended_err is not None:
                data = bytes(view[:n])
                packet = parse_errqueue(data, ancillary.extended_err, ipv6=self.ipv6, dest=str(addr[0]))
                if packet is not None:
                    self._match(packet, ancillary, 0)

    def _match(self, packet: IcmpPacket, anc: Ancillary, now_perf_ns: int) -> None:
        echo = self._inflight.get(packet.seq)
        if echo is None:
            return
        if packet.ident != self.ident or packet.peer != echo.address or packet.token not in (echo.token, None):
            return
        if echo.ended:  # answered (a duplicate is counted), failed or timed out (a late answer is not)
            if echo.rtt_ns is not None and packet.error is None:
                echo.duplicates += 1
            return
        if packet.error is not None:
            echo.outcome = Outcome.UNREACHABLE
            echo.error = packet.error + (f" from {packet.offender}" if packet.offender else "")
            self._end(echo)
            return
        rtt_ns = round_trip_ns(
            sent_wall_ns=echo.sent_wall_ns,
            sent_perf_ns=echo.sent_perf_ns,
            received_at_ns=anc.received_at_ns,
            now_perf_ns=now_perf_ns,
        )
        if rtt_ns <= echo.run.timeout_ns:  # later than its timeout: lost, even if read before its deadline ended it
            echo.rtt_ns = rtt_ns
            echo.ttl = anc.ttl
        self._end(echo)

    async def aclose(self) -> None:
        self._closed = True
        self._arm(None)
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
        runs = {echo.run for echo in self._inflight.values()}
        runs.update(self._sends.pop_due(2**63))
        for run in runs:
            self.stop(run)
        self._sock.close()


# ---------------------------------------------------------------- the probe


async def _resolve(target: str, family: str) -> tuple[bool, tuple[Any, ...]]:
    literal = _literal(target, family)
    if literal is not None:  # an address: no lookup (and no thread hop through getaddrinfo)
        return literal
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


@functools.lru_cache(maxsize=4096)
def _literal(target: str, family: str) -> tuple[bool, tuple[Any, ...]] | None:
    """(ipv6, sockaddr) of an IP address literal of the family asked for, as getaddrinfo gives
    it; None for a name (or a literal of the other family: getaddrinfo says what is wrong) (pure)."""
    try:
        addr = ipaddress.ip_address(target)
    except ValueError:
        return None
    if addr.version == 4 and family != "ipv6":
        return False, (str(addr), 0)
    if addr.version == 6 and family != "ipv4" and "%" not in target:
        return True, (str(addr), 0, 0, 0)
    return None


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


class _Refused:
    """In a context's resources where a socket kind was refused (PermissionError): not tried again
    for every run (a failing ``socket()`` call each) while the context lives."""

    async def aclose(self) -> None:
        return None


async def _open_or_refused(ipv6: bool, kind: SocketKind, ttl: int | None) -> EchoSocket | _Refused:
    try:
        if ttl is None:
            return await EchoSocket.open(ipv6=ipv6, kind=kind)
        return await EchoSocket.open(ipv6=ipv6, kind=kind, ttl=ttl)
    except PermissionError:
        return _Refused()


async def _open_socket(
    ctx: ProbeContext, ipv6: bool, choice: Literal["auto", SocketKind], ttl: int | None = None
) -> EchoSocket:
    kinds: tuple[SocketKind, ...] = ("dgram", "raw") if choice == "auto" else (choice,)
    for kind in kinds:
        # One socket per TTL too (the TTL is the socket's); the system's TTL: the plain socket.
        key = ("icmp", ipv6, kind) if ttl is None else ("icmp", ipv6, kind, ttl)
        found = await ctx.resource(key, functools.partial(_open_or_refused, ipv6, kind, ttl))
        if isinstance(found, EchoSocket):
            return found
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


async def probe(target: str, config: IcmpConfig, ctx: ProbeContext) -> IcmpResult:
    """``count`` echoes ``interval_s`` apart; each reported to ``ctx.progress`` as it ends. A stop
    (``ctx.request_stop()``) sends no more, counts the echoes still unanswered as lost (as ping
    does on Ctrl-C) and returns what was measured.

    The socket sends the echoes and ends them (:meth:`EchoSocket.start`); the run only waits for
    them all to end: one wake-up per run, not one per echo.
    """
    ipv6, sockaddr = await _resolve(target, config.family)
    if ctx.check_address is not None:  # the address echoes go to, before the first one
        await netio.check_address(ctx.check_address, target, str(sockaddr[0]), 0)
    sock = await _open_socket(ctx, ipv6, config.socket, config.ttl)
    on_end = None
    if ctx.progress is not None:
        ctx.report(
            Step(
                target=target,
                address=str(sockaddr[0]),
                seq=None,
                detail=f"{config.size_bytes} data bytes over a {sock.kind} ICMP{'v6' if ipv6 else ''} socket"
                + (f", ttl {config.ttl}" if config.ttl is not None else ""),
            )
        )
        on_end = functools.partial(_report, ctx, target)
    run = sock.start(
        sockaddr,
        count=config.count,
        interval_s=config.interval_s,
        timeout_s=config.timeout_s,
        size_bytes=config.size_bytes,
        on_end=on_end,
    )  # the first echo leaves now, even when a stop was requested already (as before)
    unhook = ctx.on_stop(functools.partial(sock.stop, run))
    try:
        await run.done
    finally:
        unhook()
        sock.stop(run)  # a cancelled run (the handler's deadline, shutdown) frees its echoes
    echoes, run.echoes = run.echoes, []  # no run <-> echo cycle left for the cyclic GC: freed at once
    result = _build_result(echoes, address=str(sockaddr[0]), ipv6=ipv6, kind=sock.kind)
    if result.received == 0:
        failed = [e for e in echoes if e.outcome is not None]
        if failed:
            first = failed[0]
            reason = f"{first.error} for {len(failed)} of {result.sent} echo requests"
            raise ProbeFailure(first.outcome or Outcome.ERROR, reason, partial=result)
        raise ProbeFailure(Outcome.TIMEOUT, f"no reply to {result.sent} echo requests", partial=result)
    return result


def _report(ctx: ProbeContext, target: str, echo: _Echo, n: int) -> None:
    ctx.report(_step(target, echo, n))


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
    prepare=None,
)
