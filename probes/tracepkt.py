"""Trace probe packets: crafting them with a Paris-traceroute flow identity, and reading the replies (pure).

**Crafting** uses scapy (imported on first use, so that no other probe pays for it): it builds
the whole IP packet (the trace sends it on an ``IPPROTO_RAW`` socket, header included) and
computes its checksums. What load balancers hash stays constant for a whole trace (addresses,
protocol and the first four octets of the transport header); the identity of each probe sits
where they do not look (see the Paris traceroute manual page and Augustin et al., IMC 2006):

* ``icmp``: echo request, constant identifier *and* constant checksum; the sequence number is the
  probe's identity and the first two payload octets are its one's complement, so the ICMP sum
  (hence the checksum) is the same for every probe.
* ``udp``: constant ports; the identity is the UDP checksum, made to come out as wanted by the
  first two payload octets (a wrong checksum would get the probe dropped).
* ``tcp``: SYN with constant ports; the identity is the sequence number (routers quote it: it is
  within the first eight octets of the TCP header).

``paris=False`` gives classic traceroute for comparison: the UDP destination port, the TCP source
port or the ICMP checksum changes from probe to probe, so ECMP routers may send each another way.

**Reading** is plain ``struct`` (replies arrive for every ICMP message on the host and must be
cheap to turn down): an ICMP time exceeded or destination unreachable (IPv4 and IPv6) with the
probe it quotes, RFC 4884 extensions with the RFC 4950 MPLS label stack, an echo reply, or a TCP
segment answering a SYN.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal

Method = Literal["icmp", "udp", "tcp"]

PROTO: Final = {"icmp": 1, "udp": 17, "tcp": 6}
PROTO6_ICMP: Final = 58
PAYLOAD_BYTES: Final = 12  # after the 2-byte compensation word; a probe is 20 + 8 + 14 bytes (IPv4)
_FILL: Final = bytes(range(0x40, 0x40 + PAYLOAD_BYTES))

# ICMP types: (ipv6) -> type
TIME_EXCEEDED: Final = {False: 11, True: 3}
UNREACHABLE: Final = {False: 3, True: 1}
ECHO_REQUEST: Final = {False: 8, True: 128}
ECHO_REPLY: Final = {False: 0, True: 129}


def ones_add(a: int, b: int) -> int:
    """16-bit one's complement addition (end-around carry)."""
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def compensation_for_checksum(checksum_with_zero_word: int, wanted: int) -> int:
    """The 16-bit word that, put where a zero word was, turns a packet whose checksum is
    ``checksum_with_zero_word`` into one whose checksum is ``wanted`` (pure one's complement
    arithmetic: checksum = ~(S + w), so w = ~wanted - S = ~wanted + ~S)."""
    w = ones_add(~wanted & 0xFFFF, checksum_with_zero_word & 0xFFFF)
    return 0 if w == 0xFFFF else w  # 0xFFFF and 0 are the same one's complement number


@dataclass(frozen=True, slots=True)
class Flow:
    """What stays constant for one trace (Paris) and who the probes are from and to."""

    method: Method
    src: str
    dst: str
    sport: int  # udp/tcp source port; icmp: the echo identifier
    dport: int  # udp/tcp destination port; icmp: unused (0)
    paris: bool = True

    @property
    def ipv6(self) -> bool:
        return ":" in self.dst


MAX_IDENTITY: Final = 0xFFFE  # identities are 1..MAX_IDENTITY (UDP checksums 0 and 0xFFFF are special)


def probe_fields(flow: Flow, identity: int) -> dict[str, int]:
    """The header fields one probe gets (pure; what :func:`build_probe` puts in the packet and
    what a reply is matched on): ``sport``, ``dport``, ``seq`` (icmp/tcp), ``checksum`` (udp)."""
    if not 1 <= identity <= MAX_IDENTITY:
        raise ValueError(f"probe identity must be within 1..{MAX_IDENTITY}, got {identity}")
    if flow.method == "udp":
        # Classic traceroute: a new destination port per probe (33434 + n), which ECMP hashes.
        dport = flow.dport if flow.paris else (flow.dport + identity) & 0xFFFF
        return {"sport": flow.sport, "dport": dport, "checksum": identity}
    if flow.method == "tcp":
        sport = flow.sport if flow.paris else (flow.sport + identity) & 0xFFFF
        return {"sport": sport, "dport": flow.dport, "seq": identity << 16 | flow.sport}
    return {"sport": flow.sport, "dport": 0, "seq": identity}


def _scapy() -> Any:
    """scapy's layers, imported on first use (it takes ~0.5 s and is for this kind only)."""
    from scapy import all as scapy_all

    return scapy_all


def load() -> None:
    """Import scapy now (the kind's ``prepare``: ~0.5 s of CPU, so never on the event loop)."""
    _scapy()


def build_probe(flow: Flow, identity: int, ttl: int) -> bytes:
    """The whole IP packet of probe ``identity`` with TTL / hop limit ``ttl`` (pure; scapy)."""
    s = _scapy()
    f = probe_fields(flow, identity)
    ip = (
        s.IPv6(src=flow.src, dst=flow.dst, hlim=ttl, nh=PROTO6_ICMP if flow.method == "icmp" else PROTO[flow.method])
        if flow.ipv6
        else s.IP(src=flow.src, dst=flow.dst, ttl=ttl, id=identity)
    )
    if flow.method == "icmp":
        # Constant checksum (Paris): the first payload word is ~seq, so seq + word is constant.
        word = (~f["seq"] & 0xFFFF) if flow.paris else 0
        payload = struct.pack("!H", word) + _FILL
        icmp = (
            s.ICMPv6EchoRequest(id=flow.sport, seq=f["seq"], data=payload)
            if flow.ipv6
            else s.ICMP(type=8, id=flow.sport, seq=f["seq"]) / s.Raw(payload)
        )
        return bytes(ip / icmp)
    if flow.method == "udp":
        zero = ip / s.UDP(sport=f["sport"], dport=f["dport"]) / s.Raw(b"\0\0" + _FILL)
        base = s.IPv6(bytes(zero)) if flow.ipv6 else s.IP(bytes(zero))
        word = compensation_for_checksum(base[s.UDP].chksum, f["checksum"])
        packet = ip / s.UDP(sport=f["sport"], dport=f["dport"]) / s.Raw(struct.pack("!H", word) + _FILL)
        return bytes(packet)
    tcp = s.TCP(sport=f["sport"], dport=f["dport"], seq=f["seq"], flags="S", window=64240)
    return bytes(ip / tcp)


def _ones_sum(*words: int) -> int:
    total = 0
    for w in words:
        total = ones_add(total, w & 0xFFFF)
    return total


def _update(checksum: int, changes: list[tuple[int, int]]) -> int:
    """RFC 1624 incremental update of ``checksum`` for 16-bit words changed (old, new)."""
    total = ~checksum & 0xFFFF
    for old, new in changes:
        total = _ones_sum(total, ~old & 0xFFFF, new)
    return ~total & 0xFFFF


class ProbeTemplate:
    """Probes of one flow made from one packet scapy built (pure): each probe is that packet with
    its TTL, identity and the words that follow from them patched in, the checksums kept right
    incrementally (RFC 1624). Gives the same bytes as :func:`build_probe` at a fraction of its
    cost (scapy builds a packet in about 0.3–0.8 ms)."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self._packet = build_probe(flow, 1, 1)
        self._l4 = 40 if flow.ipv6 else (self._packet[0] & 0x0F) * 4
        self._base = probe_fields(flow, 1)

    def probe(self, identity: int, ttl: int) -> bytes:
        f = probe_fields(self.flow, identity)
        p = bytearray(self._packet)
        t = self._l4
        if self.flow.ipv6:
            p[7] = ttl
        else:
            p[8] = ttl
            struct.pack_into("!H", p, 4, identity)
            struct.pack_into("!H", p, 10, 0)
            struct.pack_into("!H", p, 10, internet_checksum(bytes(p[:t])))
        method = self.flow.method
        if method == "icmp":
            old_seq, old_word = struct.unpack_from("!HH", p, t + 6)
            word = (~f["seq"] & 0xFFFF) if self.flow.paris else 0
            struct.pack_into("!HH", p, t + 6, f["seq"], word)
            (csum,) = struct.unpack_from("!H", p, t + 2)
            struct.pack_into("!H", p, t + 2, _update(csum, [(old_seq, f["seq"]), (old_word, word)]))
        elif method == "udp":
            old_dport, _, old_csum, old_word = struct.unpack_from("!HHHH", p, t + 2)
            # checksum = ~S; S' = S - old_dport + dport - old_word + word; want ~S' = wanted.
            word = _ones_sum(~f["checksum"], old_csum, old_dport, ~f["dport"], old_word)
            word = 0 if word == 0xFFFF else word
            struct.pack_into("!H", p, t + 2, f["dport"])
            struct.pack_into("!H", p, t + 6, f["checksum"])
            struct.pack_into("!H", p, t + 8, word)
        else:
            old_sport, _, old_hi, old_lo = struct.unpack_from("!HHHH", p, t)
            hi, lo = f["seq"] >> 16, f["seq"] & 0xFFFF
            struct.pack_into("!H", p, t, f["sport"])
            struct.pack_into("!I", p, t + 4, f["seq"])
            (csum,) = struct.unpack_from("!H", p, t + 16)
            changes = [(old_sport, f["sport"]), (old_hi, hi), (old_lo, lo)]
            struct.pack_into("!H", p, t + 16, _update(csum, changes))
        return bytes(p)


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class MplsLabel:
    """One RFC 4950 label stack entry."""

    label: int  # 20 bits
    tc: int  # 3 bits (formerly EXP)
    bottom: bool  # S bit
    ttl: int

    def text(self) -> str:
        return f"{self.label}/{self.tc}/{int(self.bottom)}/{self.ttl}"


@dataclass(frozen=True, slots=True)
class Quote:
    """The probe an ICMP error quotes: enough of it to know which one it was."""

    proto: int
    src: str
    dst: str
    ttl: int  # the quoted TTL / hop limit (what was left when the router gave up: 0 or 1 usually)
    sport: int | None = None  # udp/tcp ports; icmp: the echo identifier
    dport: int | None = None
    seq: int | None = None  # icmp sequence / tcp sequence number
    checksum: int | None = None  # udp checksum (the Paris identity)


@dataclass(frozen=True, slots=True)
class Reply:
    """One received packet that may answer a probe."""

    kind: Literal["time_exceeded", "unreachable", "echo_reply", "tcp"]
    responder: str  # who sent it
    icmp_type: int | None = None
    icmp_code: int | None = None
    quote: Quote | None = None  # ICMP errors
    ident: int | None = None  # echo reply identifier
    seq: int | None = None  # echo reply sequence
    sport: int | None = None  # tcp: the segment's ports (the probe's, swapped)
    dport: int | None = None
    ack: int | None = None  # tcp: acknowledgement number (probe seq + 1)
    tcp_flags: int | None = None
    mpls: tuple[MplsLabel, ...] = ()


def _transport_quote(proto: int, src: str, dst: str, ttl: int, data: bytes, ipv6: bool) -> Quote | None:
    if len(data) < 8:
        return None
    if proto == 17:
        sport, dport, _, csum = struct.unpack_from("!HHHH", data)
        return Quote(proto=proto, src=src, dst=dst, ttl=ttl, sport=sport, dport=dport, checksum=csum)
    if proto == 6:
        sport, dport, seq = struct.unpack_from("!HHI", data)
        return Quote(proto=proto, src=src, dst=dst, ttl=ttl, sport=sport, dport=dport, seq=seq)
    if proto == (PROTO6_ICMP if ipv6 else 1) and data[0] == ECHO_REQUEST[ipv6]:
        ident, seq = struct.unpack_from("!HH", data, 4)
        return Quote(proto=proto, src=src, dst=dst, ttl=ttl, sport=ident, seq=seq)
    return None


def parse_quote(data: bytes, *, ipv6: bool) -> Quote | None:
    """The probe quoted after an ICMP error's 8-byte header (pure)."""
    if ipv6:
        if len(data) < 48 or data[0] >> 4 != 6:
            return None
        proto, hlim = data[6], data[7]
        src = socket.inet_ntop(socket.AF_INET6, data[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, data[24:40])
        return _transport_quote(proto, src, dst, hlim, data[40:], True)
    if len(data) < 28 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl + 8:
        return None
    src = socket.inet_ntop(socket.AF_INET, data[12:16])
    dst = socket.inet_ntop(socket.AF_INET, data[16:20])
    return _transport_quote(data[9], src, dst, data[8], data[ihl:], False)


MPLS_CLASS, MPLS_CTYPE = 1, 1


def parse_extensions(icmp: bytes, *, ipv6: bool) -> tuple[MplsLabel, ...]:
    """The MPLS label stack of an ICMP error's RFC 4884 extension structure, if any (pure).

    The length attribute (IPv4: octet 5, in 32-bit words; IPv6: octet 4, in 64-bit words) says
    where the quoted datagram ends; RFC 4884 pads it to at least 128 octets. Older (RFC 4950
    "compliant" but pre-4884) routers send no length and put the extension at octet 128 of the
    quote when the message is long enough: accepted too when its version and checksum hold.
    """
    if len(icmp) < 8:
        return ()
    words = icmp[4] if ipv6 else icmp[5]
    quoted = words * (8 if ipv6 else 4)
    if quoted:
        start = 8 + quoted
    elif len(icmp) >= 8 + 128 + 4:
        start = 8 + 128  # pre-RFC 4884 routers: fixed 128-octet quote
    else:
        return ()
    ext = icmp[start:]
    if len(ext) < 4 or ext[0] >> 4 != 2:
        return ()
    if struct.unpack_from("!H", ext, 2)[0] and internet_checksum(ext) != 0:
        return ()  # a checksum is given and it does not hold: not an extension structure
    labels: list[MplsLabel] = []
    pos = 4
    while pos + 4 <= len(ext):
        length, cls, ctype = struct.unpack_from("!HBB", ext, pos)
        if length < 4 or pos + length > len(ext):
            break
        if cls == MPLS_CLASS and ctype == MPLS_CTYPE:
            for i in range(pos + 4, pos + length - 3, 4):
                (entry,) = struct.unpack_from("!I", ext, i)
                labels.append(
                    MplsLabel(label=entry >> 12, tc=(entry >> 9) & 7, bottom=bool(entry >> 8 & 1), ttl=entry & 0xFF)
                )
        pos += length
    return tuple(labels)


def parse_icmp(icmp: bytes, *, ipv6: bool, source: str) -> Reply | None:
    """An ICMP(v6) message without its IP header from ``source``: a time exceeded or unreachable
    quoting a probe, an echo reply, or None (pure)."""
    if len(icmp) < 8:
        return None
    icmp_type, code = icmp[0], icmp[1]
    if icmp_type == ECHO_REPLY[ipv6]:
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return Reply(kind="echo_reply", responder=source, icmp_type=icmp_type, icmp_code=code, ident=ident, seq=seq)
    if icmp_type == TIME_EXCEEDED[ipv6]:
        kind: Literal["time_exceeded", "unreachable"] = "time_exceeded"
    elif icmp_type == UNREACHABLE[ipv6]:
        kind = "unreachable"
    else:
        return None
    quote = parse_quote(icmp[8:], ipv6=ipv6)
    if quote is None:
        return None
    return Reply(
        kind=kind,
        responder=source,
        icmp_type=icmp_type,
        icmp_code=code,
        quote=quote,
        mpls=parse_extensions(icmp, ipv6=ipv6),
    )


def strip_ipv4(packet: bytes, proto: int) -> tuple[bytes, str, str] | None:
    """(payload, source, destination) of an IPv4 packet carrying ``proto``, else None (pure)."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != proto:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl:
        return None
    return (
        packet[ihl:],
        socket.inet_ntop(socket.AF_INET, packet[12:16]),
        socket.inet_ntop(socket.AF_INET, packet[16:20]),
    )


def parse_ipv4_icmp(packet: bytes) -> Reply | None:
    """What a raw IPv4 ICMP socket received (the IP header first) (pure)."""
    stripped = strip_ipv4(packet, 1)
    return None if stripped is None else parse_icmp(stripped[0], ipv6=False, source=stripped[1])


def parse_tcp(segment: bytes, *, source: str) -> Reply | None:
    """A TCP segment (without IP header) from ``source``: SYN-ACK or RST answering a SYN (pure)."""
    if len(segment) < 20:
        return None
    sport, dport, _, ack, _, flags = struct.unpack_from("!HHIIBB", segment)
    if not flags & 0x04 and (flags & 0x12) != 0x12:  # neither RST nor SYN+ACK
        return None
    return Reply(kind="tcp", responder=source, sport=sport, dport=dport, ack=ack, tcp_flags=flags)


def parse_ipv4_tcp(packet: bytes) -> Reply | None:
    stripped = strip_ipv4(packet, 6)
    return None if stripped is None else parse_tcp(stripped[0], source=stripped[1])


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
