"""Trace probe (traceroute / mtr): the path to a target hop by hop, with RTTs, loss, AS and IXP.

Probes rise in TTL (IPv4) / hop limit (IPv6), ``queries`` per TTL, up to ``in_flight`` of them
at once (like ``traceroute -N`` / mtr), each waited for ``timeout_s``. Routers answer ICMP time
exceeded; the target answers an echo reply (``icmp``), port unreachable (``udp``) or SYN-ACK / RST
(``tcp``). No probe goes beyond the TTL at which the target answered; after ``gap_limit`` silent
TTLs in a row nothing more is sent. Every probe of a trace keeps the fields load balancers hash
(Paris traceroute, :mod:`edgeprobe.probes.tracepkt`), so ECMP routers send them all one way;
``paris=false`` gives classic traceroute for comparison.

I/O: packets are crafted with scapy (imported on first use; one packet per trace, the probes
are patched copies of it: :class:`~edgeprobe.probes.tracepkt.ProbeTemplate`) and sent on an ``IPPROTO_RAW``
socket; replies come in on raw ICMP (and for ``tcp`` raw TCP) sockets shared by every trace of a
:class:`ProbeContext`, read with ``loop.add_reader``, matched by the flow and identity quoted in
them. RTT: the kernel's receive timestamp minus the wall clock just before ``sendto`` (as the
icmp kind). Needs CAP_NET_RAW: without it the run fails ``permission_denied`` in one line.

A run whose target did not answer fails (``timeout``, or ``unreachable`` when a router said so)
with every hop it measured kept (:func:`verdict`).

The wire schema's fields are scalars or lists of numbers, so hops travel as parallel per-hop
lists (``hop_*``, index = TTL - 1) and comma-separated texts (``hop_addresses``: ``*`` for a silent
hop, ``|`` between several addresses answering at one TTL); :func:`hops_of` turns them back into
one object per hop (the CLI's ``--json``, the collector's ``edgeprobe_trace_hop`` points).
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from edgeprobe.probes import netio, tracepath, tracepkt
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.icmp import check_target, parse_ancillary, round_trip_ns
from edgeprobe.probes.kind import Figure, PolicyCost, Privilege, ProbeKind, SubPoint
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.probes.text import num
from edgeprobe.schema import Observation

DEFAULT_PORT: Final = {"icmp": 0, "udp": 33434, "tcp": 80}  # traceroute's defaults (-T: 80)
MEMORY_KEY: Final = "edgeprobe.probes.trace.PathMemory"
MEMORY_MAX_ENTRIES: Final = 10_000


class TraceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    method: Literal["icmp", "udp", "tcp"] = "icmp"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None  # udp/tcp; None: 33434 / 80
    queries: Annotated[int, msgspec.Meta(ge=1, le=32)] = 3  # probes per TTL
    max_hops: Annotated[int, msgspec.Meta(ge=1, le=64)] = 30
    first_ttl: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=30)] = 2.0  # per probe, from its send
    gap_limit: Annotated[int, msgspec.Meta(ge=1, le=64)] = 5  # silent TTLs in a row that end the trace
    in_flight: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16  # probes outstanding at once
    family: Literal["auto", "ipv4", "ipv6"] = "auto"
    paris: bool = True  # keep the flow constant (false: classic traceroute, for comparison)
    asn_file: str | None = None  # pyasn "ipasn" file (prefix/len<TAB>asn)
    ixp_files: list[str] = []  # PeeringDB JSON (ix, ixlan, ixpfx)


class TraceResult(msgspec.Struct, kw_only=True):
    address: str  # the target's IP address
    family: Literal["ipv4", "ipv6"]
    method: str
    port: int | None  # udp/tcp destination port
    paris: bool
    queries: int  # per hop
    first_ttl: int = 1  # the TTL of the first listed hop
    reached: bool = False
    hop_count: int | None = None  # the TTL at which the target answered; None: not reached
    hops_listed: int = 0
    silent_hops: int = 0  # listed hops without any answer
    path_id: str | None = None  # hash of the ordered responding addresses, silent hops as "*"
    path_changed: bool | None = None  # path_id differs from the previous run's (same context); None: none before
    sent: int = 0  # probes sent
    as_path: str | None = None  # "64500 64501" (consecutive duplicates collapsed)
    ixps: str | None = None  # exchanges crossed, in order, comma-separated
    last_hop_rtt_ms: float | None = None  # smallest RTT of the last responding hop
    largest_step_ttl: int | None = None  # the hop after which-… where the smallest RTT grows most
    largest_step_ms: float | None = None
    multipath_hops: int = 0  # TTLs where several addresses answered one flow (per-packet balancing)
    # Per hop, index = TTL - 1:
    hop_addresses: str | None = None  # "10.0.0.1,*,10.0.2.1|10.0.3.1"
    hop_rtt_min_ms: list[float | None] = []
    hop_rtt_avg_ms: list[float | None] = []
    hop_rtt_max_ms: list[float | None] = []
    hop_loss_ratio: list[float | None] = []
    hop_rtts_ms: list[float | None] = []  # queries per hop, flattened (None: unanswered)
    hop_quoted_ttl: list[float | None] = []
    hop_asn: list[float | None] = []
    hop_icmp: str | None = None  # "11/0,-,3/3" (type/code; "-" silent or not ICMP)
    hop_ixp: str | None = None  # IXP names, comma-separated, "-" none
    hop_mpls: str | None = None  # RFC 4950 labels "label/tc/s/ttl" joined by "+", hops by ",", "-" none


def max_run_s(config: TraceConfig) -> float:
    """Every probe may be waited for, ``in_flight`` at a time."""
    probes = (config.max_hops - config.first_ttl + 1) * config.queries
    waves = -(-probes // config.in_flight)
    return waves * config.timeout_s + 1.0


def policy_cost(config: TraceConfig) -> PolicyCost:
    """Every probe the trace may send."""
    return PolicyCost(packets=(config.max_hops - config.first_ttl + 1) * config.queries)


# ----- from hops to fields and back (pure) ------------------------------------------------------


def _join(values: Sequence[str | None]) -> str | None:
    return ",".join(v or "-" for v in values) if values else None


def fill(result: TraceResult, hops: Sequence[tracepath.Hop]) -> None:
    """The result's path and per-hop fields from the hops (pure)."""
    result.hops_listed = len(hops)
    result.silent_hops = sum(h.address is None for h in hops)
    result.path_id = tracepath.path_id(hops) if hops else None
    reached = [h for h in hops if h.reached]
    result.reached = bool(reached)
    result.hop_count = reached[0].ttl if reached else None
    answered = [h for h in hops if h.rtt_min_ms is not None]
    result.last_hop_rtt_ms = answered[-1].rtt_min_ms if answered else None
    step = tracepath.largest_step(hops)
    result.largest_step_ttl, result.largest_step_ms = step if step else (None, None)
    result.multipath_hops = sum(len(h.addresses) > 1 for h in hops)
    path = tracepath.collapse(h.asn for h in hops)
    result.as_path = " ".join(str(a) for a in path) or None
    result.ixps = ",".join(tracepath.collapse(h.ixp for h in hops)) or None
    result.hop_addresses = _join(["|".join(h.addresses) if h.addresses else tracepath.SILENT for h in hops])
    result.hop_rtt_min_ms = [h.rtt_min_ms for h in hops]
    result.hop_rtt_avg_ms = [h.rtt_avg_ms for h in hops]
    result.hop_rtt_max_ms = [h.rtt_max_ms for h in hops]
    result.hop_loss_ratio = [h.loss_ratio for h in hops]
    result.hop_rtts_ms = [r for h in hops for r in h.rtts_ms]
    result.hop_quoted_ttl = [None if h.quoted_ttl is None else float(h.quoted_ttl) for h in hops]
    result.hop_asn = [None if h.asn is None else float(h.asn) for h in hops]
    result.hop_icmp = _join([h.icmp for h in hops])
    result.hop_ixp = _join([h.ixp for h in hops])
    result.hop_mpls = _join([h.mpls for h in hops])


def _at(values: Any, i: int) -> Any:
    return values[i] if isinstance(values, list) and 0 <= i < len(values) else None


def _texts(value: Any, n: int) -> list[str | None]:
    parts = str(value).split(",") if isinstance(value, str) and value else []
    return [(parts[i] if i < len(parts) and parts[i] != "-" else None) for i in range(n)]


def hops_of(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One object per hop from a trace observation's fields (pure; tolerant of partial fields)."""
    listed = fields.get("hop_addresses")
    addresses = str(listed).split(",") if isinstance(listed, str) and listed else []
    n = len(addresses)
    queries = fields.get("queries") if isinstance(fields.get("queries"), int) else 0
    assert isinstance(queries, int)
    icmp, ixp, mpls = (
        _texts(fields.get("hop_icmp"), n),
        _texts(fields.get("hop_ixp"), n),
        _texts(fields.get("hop_mpls"), n),
    )
    flat = fields.get("hop_rtts_ms")
    hops: list[dict[str, Any]] = []
    for i, text in enumerate(addresses):
        all_addresses = [] if text == tracepath.SILENT else text.split("|")
        asn, quoted = _at(fields.get("hop_asn"), i), _at(fields.get("hop_quoted_ttl"), i)
        hops.append(
            {
                "ttl": i + 1 + (int(fields.get("first_ttl") or 1) - 1),
                "address": all_addresses[0] if all_addresses else None,
                "addresses": all_addresses,
                "rtts_ms": [_at(flat, i * queries + q) for q in range(queries)],
                "loss_ratio": _at(fields.get("hop_loss_ratio"), i),
                "rtt_min_ms": _at(fields.get("hop_rtt_min_ms"), i),
                "rtt_avg_ms": _at(fields.get("hop_rtt_avg_ms"), i),
                "rtt_max_ms": _at(fields.get("hop_rtt_max_ms"), i),
                "quoted_ttl": None if quoted is None else int(quoted),
                "icmp": icmp[i],
                "mpls": (mpls[i] or "").split("+") if mpls[i] else [],
                "asn": None if asn is None else int(asn),
                "ixp": ixp[i],
            }
        )
    return hops


def hop_points(fields: Mapping[str, Any]) -> list[SubPoint]:
    """The ``edgeprobe_trace_hop`` points of one run: one per listed hop (pure). ``ttl`` is a tag
    (bounded by max_hops, and what queries group by); the address, AS and IXP are fields (they
    change with the path: as tags they would add series with every path change)."""
    points: list[SubPoint] = []
    for hop in hops_of(fields):
        values: dict[str, Any] = {
            "address": hop["address"],
            "silent": hop["address"] is None,
            "loss_ratio": hop["loss_ratio"],
            "rtt_min_ms": hop["rtt_min_ms"],
            "rtt_avg_ms": hop["rtt_avg_ms"],
            "rtt_max_ms": hop["rtt_max_ms"],
            "asn": hop["asn"],
            "ixp": hop["ixp"],
            "icmp": hop["icmp"],
            "mpls": "+".join(hop["mpls"]) or None,
            "path_id": fields.get("path_id"),
        }
        points.append(SubPoint(suffix="hop", tags={"ttl": str(hop["ttl"])}, fields=values))
    return points


# ----- annotation data (read once per file version) ----------------------------------------------


@dataclass(slots=True)
class _Tables:
    asns: dict[tuple[str, int, int], tracepath.AsnTable] = field(default_factory=dict)
    ixps: dict[tuple[tuple[str, int, int], ...], tracepath.IxpTable] = field(default_factory=dict)

    async def aclose(self) -> None:
        self.asns.clear()
        self.ixps.clear()


async def _new_tables() -> _Tables:
    return _Tables()


def _stamp(path: str) -> tuple[str, int, int]:
    st = Path(path).stat()
    return path, st.st_mtime_ns, st.st_size


def _load_asn(path: str) -> tracepath.AsnTable:
    return tracepath.AsnTable.parse(Path(path).read_text(encoding="utf-8", errors="replace"), source=path)


def _load_ixp(paths: Sequence[str]) -> tracepath.IxpTable:
    return tracepath.IxpTable.parse([Path(p).read_text(encoding="utf-8") for p in paths], source=", ".join(paths))


async def _tables(
    config: TraceConfig, ctx: ProbeContext
) -> tuple[tracepath.AsnTable | None, tracepath.IxpTable | None]:
    if config.asn_file is None and not config.ixp_files:
        return None, None
    cache = await ctx.resource("edgeprobe.probes.trace.Tables", _new_tables)
    asns = ixps = None
    try:
        if config.asn_file is not None:
            key = _stamp(config.asn_file)
            asns = cache.asns.get(key)
            if asns is None:
                asns = await asyncio.to_thread(_load_asn, config.asn_file)
                cache.asns = {key: asns}  # keep only the newest version
        if config.ixp_files:
            keys = tuple(_stamp(p) for p in config.ixp_files)
            ixps = cache.ixps.get(keys)
            if ixps is None:
                ixps = await asyncio.to_thread(_load_ixp, config.ixp_files)
                cache.ixps = {keys: ixps}
    except (OSError, ValueError) as exc:
        raise ProbeFailure(Outcome.ERROR, f"annotation data: {exc}") from exc
    return asns, ixps


# ----- path memory across runs -------------------------------------------------------------------


class PathMemory:
    """The last path_id per (target, method, port), kept by a ProbeContext across runs."""

    def __init__(self, max_entries: int = MEMORY_MAX_ENTRIES) -> None:
        self._last: OrderedDict[tuple[str, str, int | None], str] = OrderedDict()
        self._max = max_entries

    def swap(self, key: tuple[str, str, int | None], value: str) -> str | None:
        before = self._last.pop(key, None)
        self._last[key] = value
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        return before

    async def aclose(self) -> None:
        self._last.clear()


async def _new_memory() -> PathMemory:
    return PathMemory()


# ----- the shared raw sockets --------------------------------------------------------------------

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SOL_RAW, ICMP_FILTER, ICMP6_FILTER = 255, 1, 1
_BATCH = 256


@dataclass(eq=False)
class _Probe:
    ttl: int
    query: int
    done: asyncio.Future[None]
    sent_wall_ns: int = 0
    sent_perf_ns: int = 0
    sample: tracepath.Sample | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Trace:
    flow: tracepkt.Flow
    template: tracepkt.ProbeTemplate  # scapy builds one packet per trace; the probes are patched copies
    probes: dict[int, _Probe] = field(default_factory=dict)  # by identity


def _flow_key(method: str, dst: str, base_port: int) -> tuple[str, str, int]:
    return method, dst, base_port


class TraceSocket:
    """Raw sockets of one family shared by every trace of a :class:`ProbeContext`."""

    def __init__(self, ipv6: bool, send: socket.socket, icmp: socket.socket) -> None:
        self.ipv6 = ipv6
        self._send = send
        self._icmp = icmp
        # Every TCP segment of the host arrives on a raw TCP socket: it is open only while a tcp
        # trace runs (opened by the first, closed with the last).
        self._tcp: socket.socket | None = None
        self._traces: dict[tuple[str, str, int], _Trace] = {}
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(65600)
        self._loop.add_reader(icmp.fileno(), self._on_readable, icmp)

    @staticmethod
    def _receiver(sock: socket.socket) -> socket.socket:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return sock

    def _tcp_needed(self, needed: bool) -> None:
        if needed and self._tcp is None:
            family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
            tcp = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
            try:
                self._tcp = self._receiver(tcp)
            except BaseException:
                tcp.close()
                raise
            self._loop.add_reader(tcp.fileno(), self._on_readable, tcp)
        elif not needed and self._tcp is not None:
            self._loop.remove_reader(self._tcp.fileno())
            self._tcp.close()
            self._tcp = None

    @classmethod
    async def open(cls, *, ipv6: bool) -> TraceSocket:
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        opened: list[socket.socket] = []
        try:
            send = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            opened.append(send)
            send.setblocking(False)
            icmp = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if ipv6 else socket.IPPROTO_ICMP)
            opened.append(icmp)
            if ipv6:
                words = [0xFFFFFFFF] * 8
                for t in (1, 3, 129):  # unreachable, time exceeded, echo reply
                    words[t >> 5] &= ~(1 << (t & 31))
                icmp.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
                icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            else:
                passed = sum(1 << t for t in (0, 3, 11))
                icmp.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~passed & 0xFFFFFFFF))
            return cls(ipv6, send, cls._receiver(icmp))
        except BaseException:
            for sock in opened:
                sock.close()
            raise

    def register(self, flow: tracepkt.Flow) -> _Trace:
        key = _flow_key(flow.method, flow.dst, flow.sport)
        if key in self._traces:
            raise ProbeFailure(Outcome.ERROR, "flow identity already in use")  # random ports collided
        trace = _Trace(flow, tracepkt.ProbeTemplate(flow))
        if flow.method == "tcp":
            self._tcp_needed(True)
        self._traces[key] = trace
        return trace

    def in_use(self, method: str, dst: str, port: int) -> bool:
        return _flow_key(method, dst, port) in self._traces

    def unregister(self, trace: _Trace) -> None:
        self._traces.pop(_flow_key(trace.flow.method, trace.flow.dst, trace.flow.sport), None)
        if trace.flow.method == "tcp" and not any(k[0] == "tcp" for k in self._traces):
            self._tcp_needed(False)
        for probe in trace.probes.values():
            if probe.timer is not None:
                probe.timer.cancel()
            if not probe.done.done():
                probe.done.set_result(None)

    def send(self, trace: _Trace, identity: int, ttl: int, query: int, timeout_s: float) -> _Probe:
        packet = trace.template.probe(identity, ttl)
        probe = _Probe(ttl=ttl, query=query, done=self._loop.create_future())
        trace.probes[identity] = probe
        probe.sent_perf_ns = time.perf_counter_ns()
        probe.sent_wall_ns = time.time_ns()
        try:
            self._send.sendto(packet, (trace.flow.dst, 0))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EHOSTUNREACH, errno.ENETUNREACH):
                raise
            probe.done.set_result(None)
            return probe
        probe.timer = self._loop.call_later(timeout_s, self._expire, probe)
        return probe

    @staticmethod
    def _expire(probe: _Probe) -> None:
        if not probe.done.done():
            probe.done.set_result(None)

    def _on_readable(self, sock: socket.socket) -> None:
        is_tcp = sock.proto == socket.IPPROTO_TCP
        for _ in range(_BATCH):
            try:
                n, anc, _, addr = sock.recvmsg_into([self._buf], 512)
            except OSError:
                break
            if not self._traces:
                continue
            now_perf_ns = time.perf_counter_ns()
            data = bytes(self._buf[:n])
            source = str(addr[0])
            if is_tcp:
                reply = tracepkt.parse_tcp(data, source=source) if self.ipv6 else tracepkt.parse_ipv4_tcp(data)
            elif self.ipv6:
                reply = tracepkt.parse_icmp(data, ipv6=True, source=source.split("%")[0])
            else:
                reply = tracepkt.parse_ipv4_icmp(data)
            if reply is not None:
                self._match(reply, anc, now_perf_ns)

    def _find(self, reply: tracepkt.Reply) -> tuple[_Trace, int, bool] | None:
        """The trace and probe identity a reply answers, and whether the target itself sent it."""
        q = reply.quote
        if q is not None:
            if q.proto == 17 and q.sport is not None and q.checksum is not None:
                trace, identity = self._traces.get(("udp", q.dst, q.sport)), q.checksum
            elif q.proto == 6 and q.seq is not None:
                trace, identity = self._traces.get(("tcp", q.dst, q.seq & 0xFFFF)), q.seq >> 16
            elif q.sport is not None and q.seq is not None:
                trace, identity = self._traces.get(("icmp", q.dst, q.sport)), q.seq
            else:
                return None
            if trace is None:
                return None
            return trace, identity, reply.kind == "unreachable" and reply.responder == q.dst
        if reply.kind == "echo_reply" and reply.ident is not None and reply.seq is not None:
            trace = self._traces.get(("icmp", reply.responder, reply.ident))
            return None if trace is None else (trace, reply.seq, True)
        if reply.kind == "tcp" and reply.ack is not None:
            seq = (reply.ack - 1) & 0xFFFFFFFF
            trace = self._traces.get(("tcp", reply.responder, seq & 0xFFFF))
            if trace is None or reply.sport != trace.flow.dport:
                return None
            return trace, seq >> 16, True
        return None

    def _match(self, reply: tracepkt.Reply, anc: Any, now_perf_ns: int) -> None:
        found = self._find(reply)
        if found is None:
            return
        trace, identity, from_target = found
        probe = trace.probes.get(identity)
        if probe is None or probe.done.done():
            return
        ancillary = parse_ancillary(anc)
        rtt_ns = round_trip_ns(
            sent_wall_ns=probe.sent_wall_ns,
            sent_perf_ns=probe.sent_perf_ns,
            received_at_ns=ancillary.received_at_ns,
            now_perf_ns=now_perf_ns,
        )
        probe.sample = tracepath.Sample(
            ttl=probe.ttl,
            query=probe.query,
            responder=reply.responder,
            rtt_ms=round(rtt_ns / 1e6, 6),
            icmp_type=reply.icmp_type,
            icmp_code=reply.icmp_code,
            quoted_ttl=None if reply.quote is None else reply.quote.ttl,
            mpls="+".join(m.text() for m in reply.mpls) or None,
            from_target=from_target or reply.responder == trace.flow.dst,
            final=from_target or reply.responder == trace.flow.dst or reply.kind == "unreachable",
        )
        if probe.timer is not None:
            probe.timer.cancel()
        probe.done.set_result(None)

    async def aclose(self) -> None:
        self._loop.remove_reader(self._icmp.fileno())
        for trace in list(self._traces.values()):
            self.unregister(trace)
        self._tcp_needed(False)
        self._send.close()
        self._icmp.close()


PERMISSION_REASON: Final = (
    "trace needs raw sockets: CAP_NET_RAW (root, or the service's AmbientCapabilities=CAP_NET_RAW: "
    "edgeprobe init systemd)"
)


async def _open(ctx: ProbeContext, ipv6: bool) -> TraceSocket:
    async def opener() -> TraceSocket:
        return await TraceSocket.open(ipv6=ipv6)

    try:
        return await ctx.resource(("trace", ipv6), opener)
    except PermissionError:
        raise ProbeFailure(Outcome.PERMISSION_DENIED, PERMISSION_REASON) from None


# ----- the probe ---------------------------------------------------------------------------------


async def _resolve(target: str, family: str) -> tuple[bool, str]:
    want = {"auto": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}[family]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target, None, family=want, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ProbeFailure(Outcome.DNS_ERROR, f"name resolution failed: {exc.strerror or exc}") from exc
    for fam, _, _, _, sockaddr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6):
            return fam == socket.AF_INET6, str(sockaddr[0])
    raise ProbeFailure(Outcome.DNS_ERROR, f"name resolution failed: no address for {target!r}")


def _source_for(address: str, ipv6: bool) -> str:
    """The source address the kernel would use towards ``address`` (a connected UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return str(s.getsockname()[0])


def _gap_reached(probes: Mapping[tuple[int, int], _Probe], first_ttl: int, gap: int, queries: int) -> bool:
    """``gap`` TTLs in a row completed without any answer (and no answer beyond them)."""
    silent = 0
    ttl = first_ttl
    while True:
        batch = [probes.get((ttl, q)) for q in range(queries)]
        if any(p is None for p in batch):
            return False
        if any(p is not None and p.sample is not None for p in batch):
            silent = 0
        elif all(p is not None and p.done.done() for p in batch):
            silent += 1
            if silent >= gap:
                return True
        else:
            return False
        ttl += 1


async def probe(target: str, config: TraceConfig, ctx: ProbeContext) -> TraceResult:
    """Trace the path to ``target`` (see the module docstring)."""
    ipv6, address = await _resolve(target, config.family)
    port = None if config.method == "icmp" else (config.port or DEFAULT_PORT[config.method])
    if ctx.check_address is not None:
        await netio.check_address(ctx.check_address, target, address, port or 0)
    asns, ixps = await _tables(config, ctx)
    sock = await _open(ctx, ipv6)
    try:
        source = _source_for(address, ipv6)
    except OSError as exc:
        raise ProbeFailure(Outcome.UNREACHABLE, f"no route to {address}: {exc.strerror or exc}") from exc
    for _ in range(64):
        base = 33000 + secrets.randbelow(28000)
        if not sock.in_use(config.method, address, base):
            break
    flow = tracepkt.Flow(method=config.method, src=source, dst=address, sport=base, dport=port or 0, paris=config.paris)
    trace = sock.register(flow)
    result = TraceResult(
        address=address,
        family="ipv6" if ipv6 else "ipv4",
        method=config.method,
        port=port,
        paris=config.paris,
        queries=config.queries,
        first_ttl=config.first_ttl,
    )
    sent: dict[tuple[int, int], _Probe] = {}
    order = [(ttl, q) for ttl in range(config.first_ttl, config.max_hops + 1) for q in range(config.queries)]
    identity = 0
    target_ttl: int | None = None
    try:
        pending: set[asyncio.Future[None]] = set()
        i = 0
        while True:
            while i < len(order) and len(pending) < config.in_flight and not ctx.stop_requested:
                ttl, q = order[i]
                if target_ttl is not None and ttl > target_ttl:
                    break
                if _gap_reached(sent, config.first_ttl, config.gap_limit, config.queries):
                    break
                identity += 1
                p = sock.send(trace, identity, ttl, q, config.timeout_s)
                sent[(ttl, q)] = p
                if not p.done.done():
                    pending.add(p.done)
                i += 1
            if not pending:
                break
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for p in sent.values():
                if p.sample is not None and p.sample.final:
                    target_ttl = p.ttl if target_ttl is None else min(target_ttl, p.ttl)
            if target_ttl is not None:  # nothing beyond the target is waited for
                for p in sent.values():
                    if p.ttl > target_ttl and not p.done.done():
                        p.done.set_result(None)
                pending = {f for f in pending if not f.done()}
    finally:
        sock.unregister(trace)
    result.sent = len(sent)
    samples = [p.sample or tracepath.Sample(ttl=p.ttl, query=p.query) for p in sent.values()]
    last_sent = max((p.ttl for p in sent.values()), default=config.first_ttl - 1)
    last = target_ttl if target_ttl is not None else last_sent
    hops = tracepath.aggregate(samples, queries=config.queries, first_ttl=config.first_ttl, last_ttl=last)
    tracepath.annotate(hops, asns, ixps)
    fill(result, hops)
    if result.path_id is not None and not ctx.stop_requested:
        memory = await ctx.resource(MEMORY_KEY, _new_memory)
        before = memory.swap((target, config.method, port), result.path_id)
        result.path_changed = None if before is None else before != result.path_id
    failure = verdict(result, hops)
    if failure is not None:
        raise ProbeFailure(failure[0], failure[1], partial=result)
    return result


def verdict(result: TraceResult, hops: Sequence[tracepath.Hop]) -> tuple[Outcome, str] | None:
    """None when the target answered; else the failure (pure): ``unreachable`` when a router said
    so (ICMP destination unreachable from an address that is not the target's), else ``timeout``.
    The hops measured stay in the result either way."""
    if result.reached:
        return None
    answered = [h for h in hops if h.address is not None]
    if not answered:
        return Outcome.TIMEOUT, f"no hop answered any of {result.sent} probes"
    last = answered[-1]
    if last.icmp is not None and last.icmp.split("/")[0] in ("1", "3"):  # ICMPv6 / ICMP unreachable
        return Outcome.UNREACHABLE, f"hop {last.ttl} ({last.address}) answered destination unreachable ({last.icmp})"
    return Outcome.TIMEOUT, f"target not reached: the last answer came from hop {last.ttl} ({last.address})"


# ----- the human view (pure) ---------------------------------------------------------------------


def hop_line(hop: Mapping[str, Any]) -> str:
    """One traceroute line: ``ttl  address [AS…, IXP]  rtt ms  rtt ms  *  (loss)``."""
    rtts = "  ".join("*" if r is None else f"{r:.3f} ms" for r in hop.get("rtts_ms") or [])
    if hop.get("address") is None:
        return f"{hop['ttl']:>2}  {rtts or '*'}"
    where = str(hop["address"])
    notes = []
    if hop.get("asn") is not None:
        notes.append(f"AS{hop['asn']}")
    if hop.get("ixp"):
        notes.append(f"IXP {hop['ixp']}")
    if len(hop.get("addresses") or []) > 1:
        notes.append("also " + " ".join(hop["addresses"][1:]))
    if hop.get("mpls"):
        notes.append("MPLS " + " ".join(f"L={m}" for m in hop["mpls"]))
    extra = f" [{', '.join(notes)}]" if notes else ""
    loss = hop.get("loss_ratio")
    lost = f"  ({100 * float(loss):.0f}% loss)" if isinstance(loss, int | float) and loss > 0 else ""
    return f"{hop['ttl']:>2}  {where}{extra}  {rtts}{lost}"


def render(obs: Observation) -> list[str]:
    """Like ``traceroute -n``: a header, one line per hop, then where the RTT grows (pure)."""
    f = obs.fields
    how = f"{f.get('method', '?')}" + (f" port {f['port']}" if f.get("port") else "")
    mode = "paris" if f.get("paris", True) else "classic"
    lines = [
        f"traceroute to {obs.target} ({f.get('address', '?')}), {how}, {mode}, {f.get('queries', '?')} queries per hop"
    ]
    lines += [hop_line(h) for h in hops_of(f)]
    if f.get("hop_addresses") is None:
        return lines
    count = f.get("hop_count")
    summary = f"reached in {count} hop{'s' * (count != 1)}" if f.get("reached") else "target not reached"
    summary += f", {f.get('silent_hops', 0)} silent"
    if f.get("largest_step_ttl") is not None:
        summary += f"; largest RTT step +{num(f.get('largest_step_ms'))} ms at hop {f['largest_step_ttl']}"
    if f.get("as_path"):
        summary += f"; AS path {f['as_path']}"
    if f.get("ixps"):
        summary += f"; via {f['ixps']}"
    changed = f.get("path_changed")
    if changed is not None:
        summary += "; path changed" if changed else "; path unchanged"
    lines.append(summary + f" (path {f.get('path_id')})")
    return lines


KIND: Final = ProbeKind(
    name="trace",
    description="traceroute/mtr: the path hop by hop (Paris flow identity), RTT and loss per hop, AS/IXP, path changes",
    config_type=TraceConfig,
    result_type=TraceResult,
    run=probe,
    check_target=check_target,
    max_run_s=max_run_s,
    tag_fields=("method",),
    target_label="target",
    display_target=None,
    render=render,
    headline=Figure(field="last_hop_rtt_ms", label="last hop"),
    jitter=None,
    fleet_field="last_hop_rtt_ms",
    live=None,
    aliases=("traceroute", "mtr"),
    floor_field=None,  # the last hop is not always the target: no physical floor to compare
    first_byte_round_trips=None,
    policy_cost=policy_cost,
    env_vars=None,
    # Status.raw_permitted: the agent could open a raw IP socket (CAP_NET_RAW) when it started.
    privilege=Privilege(status_field="raw_permitted", missing_note="no raw socket"),
    sub_points=hop_points,
    prepare=tracepkt.load,
)


def mtr_rows(observations: Sequence[Observation]) -> list[dict[str, Any]]:
    """mtr's report over several runs of one trace (pure): per TTL the addresses seen (most frequent
    first), probes sent, loss, and last / avg / best / worst / stdev of the RTTs in ms."""
    rows: dict[int, dict[str, Any]] = {}
    for obs in observations:
        for hop in hops_of(obs.fields):
            row = rows.setdefault(hop["ttl"], {"ttl": hop["ttl"], "counts": {}, "rtts": [], "sent": 0, "last": None})
            for address in hop["addresses"]:
                row["counts"][address] = row["counts"].get(address, 0) + 1
            got = [r for r in hop["rtts_ms"] if r is not None]
            row["sent"] += len(hop["rtts_ms"])
            row["rtts"] += got
            if got:
                row["last"] = got[-1]
    out = []
    for ttl in sorted(rows):
        row = rows[ttl]
        rtts: list[float] = row["rtts"]
        mean = sum(rtts) / len(rtts) if rtts else None
        out.append(
            {
                "ttl": ttl,
                "addresses": [a for a, _ in sorted(row["counts"].items(), key=lambda kv: -kv[1])],
                "sent": row["sent"],
                "loss_ratio": round(1 - len(rtts) / row["sent"], 6) if row["sent"] else None,
                "last_ms": row["last"],
                "avg_ms": None if mean is None else round(mean, 6),
                "best_ms": min(rtts) if rtts else None,
                "worst_ms": max(rtts) if rtts else None,
                "stdev_ms": None if mean is None else round((sum((r - mean) ** 2 for r in rtts) / len(rtts)) ** 0.5, 6),
            }
        )
    return out
