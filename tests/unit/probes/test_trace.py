"""The trace kind's pure parts: probes (Paris flow identity), replies (captured on the lab's
routers), RFC 4950 MPLS extensions, hops, path id, RTT step, AS/IXP annotation, fields and views."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgeprobe.probes import trace, tracepath, tracepkt
from edgeprobe.probes.outcome import Outcome
from edgeprobe.probes.registry import get_kind
from edgeprobe.schema import Observation

DATA = Path(__file__).with_name("data")
CAPTURE = json.loads((DATA / "trace_capture_v4.json").read_text())["packets"]


def captured(what: str) -> bytes:
    found = [bytes.fromhex(p["hex"]) for p in CAPTURE if p["what"].startswith(what)]
    assert found, what
    return found[0]


def scapy() -> Any:
    return tracepkt._scapy()


# ----- crafting ----------------------------------------------------------------------------------


def flow(
    method: tracepkt.Method, *, paris: bool = True, dst: str = "10.91.7.2", src: str = "10.91.1.2"
) -> tracepkt.Flow:
    return tracepkt.Flow(
        method=method, src=src, dst=dst, sport=40001, dport={"icmp": 0, "udp": 33434, "tcp": 80}[method], paris=paris
    )


def transport(packet: bytes) -> Any:
    s = scapy()
    p = s.IPv6(packet) if packet[0] >> 4 == 6 else s.IP(packet)
    return p.payload


def checksum_holds(packet: bytes) -> bool:
    """Rebuild with the checksum left to scapy: the same bytes when ours was right."""
    s = scapy()
    p = s.IPv6(packet) if packet[0] >> 4 == 6 else s.IP(packet)
    layer = p.payload
    given = layer.chksum if hasattr(layer, "chksum") else layer.cksum
    if hasattr(layer, "chksum"):
        del layer.chksum
    else:
        del layer.cksum
    again = s.IPv6(bytes(p)) if packet[0] >> 4 == 6 else s.IP(bytes(p))
    l2 = again.payload
    return bool((l2.chksum if hasattr(l2, "chksum") else l2.cksum) == given)


@pytest.mark.parametrize("method", ["icmp", "udp", "tcp"])
@pytest.mark.parametrize("dst,src", [("10.91.7.2", "10.91.1.2"), ("2001:db8::2", "2001:db8::1")])
def test_probes_carry_valid_checksums_and_the_ttl(method: tracepkt.Method, dst: str, src: str) -> None:
    for identity, ttl in ((1, 1), (2, 7), (300, 30), (tracepkt.MAX_IDENTITY, 64)):
        packet = tracepkt.build_probe(flow(method, dst=dst, src=src), identity, ttl)
        assert checksum_holds(packet), (method, identity)
        assert (packet[7] if ":" in dst else packet[8]) == ttl


@pytest.mark.parametrize("dst,src", [("10.91.7.2", "10.91.1.2"), ("2001:db8::2", "2001:db8::1")])
def test_paris_keeps_what_balancers_hash_and_classic_does_not(dst: str, src: str) -> None:
    def hashed(method: tracepkt.Method, paris: bool) -> set[bytes]:
        """The first 4 octets of the transport header (ports; ICMP type, code, checksum)."""
        out = set()
        for identity in range(1, 40):
            packet = tracepkt.build_probe(flow(method, paris=paris, dst=dst, src=src), identity, 1 + identity % 30)
            header = 40 if ":" in dst else 20
            out.add(packet[header : header + 4])
        return out

    for method in ("icmp", "udp", "tcp"):
        assert len(hashed(method, True)) == 1, method  # type: ignore[arg-type]
        assert len(hashed(method, False)) == 39, method  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["icmp", "udp", "tcp"])
@pytest.mark.parametrize("paris", [True, False])
@pytest.mark.parametrize("dst,src", [("10.91.7.2", "10.91.1.2"), ("2001:db8::2", "2001:db8::1")])
def test_the_template_makes_the_bytes_scapy_makes(method: tracepkt.Method, paris: bool, dst: str, src: str) -> None:
    """The probes the trace sends (patched copies of one scapy packet) equal scapy's own, byte for byte."""
    rnd = random.Random(f"{method}{paris}{dst}")
    for sport in (33000, rnd.randrange(33000, 61000)):
        f = tracepkt.Flow(
            method=method, src=src, dst=dst, sport=sport, dport=80 if method == "tcp" else 33434, paris=paris
        )
        template = tracepkt.ProbeTemplate(f)
        for identity, ttl in [(1, 1), (tracepkt.MAX_IDENTITY, 64)] + [
            (rnd.randrange(1, tracepkt.MAX_IDENTITY + 1), rnd.randrange(1, 65)) for _ in range(25)
        ]:
            assert template.probe(identity, ttl) == tracepkt.build_probe(f, identity, ttl), (identity, ttl)


def test_udp_identity_is_the_checksum() -> None:
    for identity in (1, 2, 0x1234, tracepkt.MAX_IDENTITY):
        packet = tracepkt.build_probe(flow("udp"), identity, 3)
        assert struct.unpack_from("!H", packet, 26)[0] == identity


def test_checksum_compensation_arithmetic() -> None:
    rnd = random.Random(4)
    for _ in range(2000):
        words = [rnd.randrange(0x10000) for _ in range(rnd.randrange(1, 20))]
        wanted = rnd.randrange(1, 0xFFFF)
        data = struct.pack(f"!{len(words)}H", *words) + b"\0\0"
        word = tracepkt.compensation_for_checksum(tracepkt.internet_checksum(data), wanted)
        assert tracepkt.internet_checksum(data[:-2] + struct.pack("!H", word)) == wanted


def test_probe_identity_is_bounded() -> None:
    with pytest.raises(ValueError):
        tracepkt.probe_fields(flow("udp"), 0)
    with pytest.raises(ValueError):
        tracepkt.probe_fields(flow("udp"), 0xFFFF)


# ----- replies captured in the lab ---------------------------------------------------------------


def test_captured_probes_are_what_build_probe_makes() -> None:
    """The probes on the wire (Linux routers forwarded them) have our flow identity."""
    icmp1, icmp4 = captured("probe icmp ttl 1"), captured("probe icmp ttl 4")
    assert icmp1[20:24] == icmp4[20:24]  # type, code and checksum constant
    udp1, udp5 = captured("probe udp ttl 1"), captured("probe udp ttl 5")
    assert udp1[20:24] == udp5[20:24] and udp1[26:28] != udp5[26:28]  # ports constant, checksum = identity


def test_time_exceeded_quoting_each_method() -> None:
    for method, proto in (("icmp", 1), ("udp", 17), ("tcp", 6)):
        probe = captured(f"probe {method} ttl 1")
        reply = tracepkt.parse_ipv4_icmp(captured(f"time-exceeded from 10.91.1.1 quoting proto {proto}"))
        assert reply is not None and reply.kind == "time_exceeded"
        assert (reply.responder, reply.icmp_type, reply.icmp_code) == ("10.91.1.1", 11, 0)
        q = reply.quote
        assert q is not None and (q.proto, q.src, q.dst, q.ttl) == (proto, "10.91.1.2", "10.91.7.2", 1)
        if method == "udp":
            assert (q.sport, q.dport, q.checksum) == struct.unpack_from("!HHxxH", probe, 20)
        elif method == "tcp":
            assert (q.sport, q.dport, q.seq) == struct.unpack_from("!HHI", probe, 20)
        else:
            assert (q.sport, q.seq) == struct.unpack_from("!HH", probe, 24)
        assert reply.mpls == ()


def test_the_target_s_answers() -> None:
    echo = tracepkt.parse_ipv4_icmp(captured("echo-reply from 10.91.7.2"))
    probe = captured("probe icmp ttl 5")
    assert echo is not None and echo.kind == "echo_reply"
    assert (echo.ident, echo.seq) == struct.unpack_from("!HH", probe, 24)
    unreach = tracepkt.parse_ipv4_icmp(captured("dest-unreach from 10.91.7.2"))
    assert unreach is not None and unreach.kind == "unreachable" and (unreach.icmp_type, unreach.icmp_code) == (3, 3)
    assert unreach.quote is not None and unreach.quote.dst == "10.91.7.2"
    rst = tracepkt.parse_ipv4_tcp(captured("tcp RA from 10.91.7.2"))
    tcp_probe = captured("probe tcp ttl 5")
    assert rst is not None and rst.kind == "tcp" and rst.responder == "10.91.7.2"
    assert rst.ack == (struct.unpack_from("!I", tcp_probe, 24)[0] + 1) & 0xFFFFFFFF
    assert rst.sport == 80


CAPTURE6 = json.loads((DATA / "trace_capture_v6.json").read_text())["packets"]


def captured6(what: str) -> bytes:
    found = [bytes.fromhex(p["hex"]) for p in CAPTURE6 if p["what"].startswith(what)]
    assert found, what
    return found[0]


def test_ipv6_replies_captured_in_the_lab() -> None:
    """ICMPv6 and raw TCP sockets deliver the message without the IPv6 header: strip its 40 bytes."""
    for method, nh in (("icmp", 58), ("udp", 17), ("tcp", 6)):
        probe = captured6(f"probe {method} hlim 1")
        reply = tracepkt.parse_icmp(
            captured6(f"time-exceeded from fd91:1::1 quoting nh {nh}")[40:], ipv6=True, source="fd91:1::1"
        )
        assert reply is not None and (reply.kind, reply.icmp_type, reply.icmp_code) == ("time_exceeded", 3, 0)
        q = reply.quote
        assert q is not None and (q.proto, q.src, q.dst, q.ttl) == (nh, "fd91:1::2", "fd91:7::2", 1)
        if method == "udp":
            assert (q.sport, q.dport, q.checksum) == struct.unpack_from("!HHxxH", probe, 40)
        elif method == "tcp":
            assert (q.sport, q.dport, q.seq) == struct.unpack_from("!HHI", probe, 40)
        else:
            assert (q.sport, q.seq) == struct.unpack_from("!HH", probe, 44)
    echo = tracepkt.parse_icmp(captured6("echo-reply from fd91:7::2")[40:], ipv6=True, source="fd91:7::2")
    assert echo is not None and (echo.ident, echo.seq) == struct.unpack_from("!HH", captured6("probe icmp hlim 5"), 44)
    unreach = tracepkt.parse_icmp(captured6("dest-unreach from fd91:7::2")[40:], ipv6=True, source="fd91:7::2")
    assert unreach is not None and (unreach.kind, unreach.icmp_type, unreach.icmp_code) == ("unreachable", 1, 4)
    rst = tracepkt.parse_tcp(captured6("tcp RA from fd91:7::2")[40:], source="fd91:7::2")
    tcp_probe = captured6("probe tcp hlim 5")
    assert rst is not None and rst.ack == (struct.unpack_from("!I", tcp_probe, 44)[0] + 1) & 0xFFFFFFFF
    paris = {
        captured6(f"probe {m} hlim 1")[40:44] == captured6(f"probe {m} hlim 5")[40:44] for m in ("icmp", "udp", "tcp")
    }
    assert paris == {True}  # what balancers hash is the same at every hop limit


def test_foreign_and_truncated_packets_are_turned_down() -> None:
    te = captured("time-exceeded from 10.91.1.1 quoting proto 17")
    for cut in range(0, 48):
        assert tracepkt.parse_ipv4_icmp(te[:cut]) is None
    assert tracepkt.parse_ipv4_icmp(captured("probe udp ttl 1")) is None  # not ICMP
    assert tracepkt.parse_ipv4_icmp(captured("probe icmp ttl 1")) is None  # an echo request
    syn = captured("probe tcp ttl 1")
    assert tracepkt.parse_ipv4_tcp(syn) is None  # a bare SYN answers nothing


# ----- RFC 4884 / 4950 extensions (crafted with scapy's own MPLS layers) --------------------------


def mpls_extension(labels: list[tuple[int, int, int, int]]) -> bytes:
    s = scapy()
    from scapy.contrib.mpls import MPLS, ICMPExtension_MPLS

    stack = [MPLS(label=label, cos=tc, s=bos, ttl=ttl) for label, tc, bos, ttl in labels]
    return bytes(s.ICMPExtension_Header() / ICMPExtension_MPLS(stack=stack))


def time_exceeded_with(ext: bytes, *, rfc4884: bool, ipv6: bool = False) -> bytes:
    quote = tracepkt.build_probe(
        flow("udp", dst="2001:db8::2" if ipv6 else "10.91.7.2", src="2001:db8::1" if ipv6 else "10.91.1.2"), 7, 1
    )
    quote = quote.ljust(128, b"\0")
    if ipv6:
        header = struct.pack("!BBHBBH", 3, 0, 0, len(quote) // 8 if rfc4884 else 0, 0, 0)
    else:
        header = struct.pack("!BBHBBH", 11, 0, 0, 0, len(quote) // 4 if rfc4884 else 0, 0)
    return header + quote + ext


@pytest.mark.parametrize("rfc4884", [True, False])
@pytest.mark.parametrize("ipv6", [False, True])
def test_mpls_label_stack(rfc4884: bool, ipv6: bool) -> None:
    ext = mpls_extension([(16005, 0, 0, 1), (24001, 5, 1, 1)])
    reply = tracepkt.parse_icmp(time_exceeded_with(ext, rfc4884=rfc4884, ipv6=ipv6), ipv6=ipv6, source="x")
    assert reply is not None and reply.quote is not None and reply.quote.checksum == 7
    assert [m.text() for m in reply.mpls] == ["16005/0/0/1", "24001/5/1/1"]


def test_a_damaged_extension_is_ignored() -> None:
    ext = bytearray(mpls_extension([(16005, 0, 1, 1)]))
    ext[-1] ^= 0xFF  # the checksum no longer holds
    reply = tracepkt.parse_icmp(time_exceeded_with(bytes(ext), rfc4884=True), ipv6=False, source="x")
    assert reply is not None and reply.mpls == ()


def test_ipv6_time_exceeded_and_echo_reply() -> None:
    s = scapy()
    f = flow("icmp", dst="2001:db8::2", src="2001:db8::1")
    probe = tracepkt.build_probe(f, 9, 3)
    te = bytes(s.ICMPv6TimeExceeded() / s.IPv6(probe))
    reply = tracepkt.parse_icmp(te, ipv6=True, source="2001:db8:1::1")
    assert reply is not None and reply.kind == "time_exceeded" and reply.quote is not None
    assert (reply.quote.dst, reply.quote.sport, reply.quote.seq, reply.quote.ttl) == ("2001:db8::2", 40001, 9, 3)
    echo = bytes(s.ICMPv6EchoReply(id=40001, seq=9))
    got = tracepkt.parse_icmp(echo, ipv6=True, source="2001:db8::2")
    assert got is not None and (got.kind, got.ident, got.seq) == ("echo_reply", 40001, 9)


# ----- hops and path ----------------------------------------------------------------------------


def S(ttl: int, q: int, who: str | None = None, rtt: float | None = None, **kw: Any) -> tracepath.Sample:
    return tracepath.Sample(ttl=ttl, query=q, responder=who, rtt_ms=rtt if who else None, **kw)


SAMPLES = [
    S(1, 0, "10.91.1.1", 0.1, icmp_type=11, icmp_code=0, quoted_ttl=1),
    S(1, 1, "10.91.1.1", 0.3, icmp_type=11, icmp_code=0, quoted_ttl=1),
    S(1, 2),
    S(2, 0),
    S(2, 1),
    S(2, 2),
    S(3, 0, "10.91.6.2", 20.5, icmp_type=11, icmp_code=0, quoted_ttl=1, mpls="16005/0/1/1"),
    S(3, 1, "10.91.6.9", 20.1, icmp_type=11, icmp_code=0, quoted_ttl=1),
    S(3, 2, "10.91.6.2", 21.0, icmp_type=11, icmp_code=0, quoted_ttl=1),
    S(4, 0, "10.91.7.2", 20.9, icmp_type=0, icmp_code=0, from_target=True, final=True),
]


def test_aggregate_lists_silent_hops_and_keeps_query_order() -> None:
    hops = tracepath.aggregate(SAMPLES, queries=3, last_ttl=4)
    assert [h.address for h in hops] == ["10.91.1.1", None, "10.91.6.2", "10.91.7.2"]
    assert hops[0].rtts_ms == [0.1, 0.3, None] and hops[0].loss_ratio == pytest.approx(1 / 3, abs=1e-6)
    assert (hops[0].rtt_min_ms, hops[0].rtt_avg_ms, hops[0].rtt_max_ms) == (0.1, 0.2, 0.3)
    assert hops[1].loss_ratio == 1.0 and hops[1].rtt_min_ms is None and hops[1].rtts_ms == [None] * 3
    assert hops[2].addresses == ["10.91.6.2", "10.91.6.9"] and hops[2].mpls == "16005/0/1/1"
    assert hops[2].icmp == "11/0" and hops[2].quoted_ttl == 1
    assert hops[3].reached and hops[3].rtts_ms == [20.9, None, None]


def test_path_id_is_stable_and_sees_silence() -> None:
    a = tracepath.aggregate(SAMPLES, queries=3, last_ttl=4)
    b = tracepath.aggregate(list(reversed(SAMPLES)), queries=3, last_ttl=4)
    assert tracepath.path_id(a) == tracepath.path_id(b)
    answered = [*SAMPLES, S(2, 0, "10.91.2.2", 1.0)]
    assert tracepath.path_id(tracepath.aggregate(answered, queries=3, last_ttl=4)) != tracepath.path_id(a)
    assert len(tracepath.path_id(a)) == 16


def test_largest_step_is_between_smallest_rtts() -> None:
    hops = tracepath.aggregate(SAMPLES, queries=3, last_ttl=4)
    assert tracepath.largest_step(hops) == (3, pytest.approx(20.0))
    assert tracepath.largest_step(tracepath.aggregate([S(1, 0)], queries=1, last_ttl=1)) is None


def test_collapse() -> None:
    assert tracepath.collapse([None, 1, 1, None, 2, 2, 1]) == [1, 2, 1]


def test_asn_table_reads_pyasn_ipasn_files() -> None:
    table = tracepath.AsnTable.parse((DATA / "ipasn_sample.txt").read_text())
    assert len(table) == 6
    assert table.lookup("10.91.1.1") == 64500
    assert table.lookup("10.91.6.2") == 64501  # the longest prefix wins
    assert table.lookup("198.51.100.7") == 64510  # an AS set: the first
    assert table.lookup("2001:db8::5") == 64499
    assert table.lookup("203.0.113.1") is None and table.lookup("not an address") is None
    with pytest.raises(ValueError, match=r"x\.txt:1"):
        tracepath.AsnTable.parse("10.0.0.0/8 AS1 extra\n", source="x.txt")


def test_ixp_table_reads_a_peeringdb_export() -> None:
    doc = (DATA / "peeringdb_sample.json").read_text()
    table = tracepath.IxpTable.parse([doc])
    assert table.lookup("80.81.192.10") == "DE-CIX Frankfurt"
    assert table.lookup("2001:7f8::1") == "DE-CIX Frankfurt"
    assert table.lookup("80.249.209.1") == "AMS-IX"
    assert table.lookup("203.0.113.1") is None  # its ixlan is not in the export
    parts = json.loads(doc)
    separate = [json.dumps(parts[k]) for k in ("ixpfx", "ix", "ixlan")]  # one file per API object
    assert tracepath.IxpTable.parse(separate).lookup("10.91.6.2") == "Lab-IX"
    with pytest.raises(ValueError, match="not JSON"):
        tracepath.IxpTable.parse(["{"])


# ----- fields, views, the kind -------------------------------------------------------------------


def filled() -> trace.TraceResult:
    hops = tracepath.aggregate(SAMPLES, queries=3, last_ttl=4)
    asns = tracepath.AsnTable.parse((DATA / "ipasn_sample.txt").read_text())
    ixps = tracepath.IxpTable.parse([(DATA / "peeringdb_sample.json").read_text()])
    tracepath.annotate(hops, asns, ixps)
    result = trace.TraceResult(address="10.91.7.2", family="ipv4", method="udp", port=33434, paris=True, queries=3)
    trace.fill(result, hops)
    return result


def test_fill_summarises_the_path() -> None:
    r = filled()
    assert (r.reached, r.hop_count, r.hops_listed, r.silent_hops, r.multipath_hops) == (True, 4, 4, 1, 1)
    assert r.as_path == "64500 64501 64502" and r.ixps == "Lab-IX"
    assert (r.largest_step_ttl, r.last_hop_rtt_ms) == (3, 20.9)
    assert r.hop_addresses == "10.91.1.1,*,10.91.6.2|10.91.6.9,10.91.7.2"
    assert r.hop_ixp == "-,-,Lab-IX,-" and r.hop_icmp == "11/0,-,11/0,0/0"
    assert len(r.hop_rtts_ms) == 12


def test_fields_survive_the_wire_and_come_back_as_hops() -> None:
    fields = msgspec.to_builtins(filled())
    obs = Observation(
        id="x", seq=0, kind="trace", target="s", started_at_ns=1, duration_ms=1.0, outcome="ok", fields=fields
    )
    wire = msgspec.json.decode(msgspec.json.encode(obs), type=Observation)  # the schema's field types
    hops = trace.hops_of(wire.fields)
    assert [h["address"] for h in hops] == ["10.91.1.1", None, "10.91.6.2", "10.91.7.2"]
    assert hops[2]["addresses"] == ["10.91.6.2", "10.91.6.9"] and hops[2]["mpls"] == ["16005/0/1/1"]
    assert hops[2]["asn"] == 64501 and hops[2]["ixp"] == "Lab-IX" and hops[2]["quoted_ttl"] == 1
    assert hops[1]["rtts_ms"] == [None, None, None] and hops[1]["loss_ratio"] == 1.0
    points = trace.hop_points(wire.fields)
    assert [p.tags["ttl"] for p in points] == ["1", "2", "3", "4"]
    assert points[1].fields["silent"] is True and points[1].fields["address"] is None
    assert trace.hops_of({}) == []  # a failed run without fields


def test_render_looks_like_traceroute() -> None:
    obs = Observation(
        id="x",
        seq=0,
        kind="trace",
        target="s",
        started_at_ns=1,
        duration_ms=1.0,
        outcome="ok",
        fields=msgspec.to_builtins(filled()),
    )
    lines = trace.render(obs)
    assert lines[0].startswith("traceroute to s (10.91.7.2), udp port 33434, paris")
    assert lines[1] == " 1  10.91.1.1 [AS64500]  0.100 ms  0.300 ms  *  (33% loss)"
    assert lines[2] == " 2  *  *  *"
    assert "IXP Lab-IX" in lines[3] and "also 10.91.6.9" in lines[3] and "MPLS L=16005/0/1/1" in lines[3]
    assert lines[-1].startswith(
        "reached in 4 hops, 1 silent; largest RTT step +20.000 ms at hop 3; AS path 64500 64501 64502"
    )


def test_config_defaults_costs_and_aliases() -> None:
    config = trace.TraceConfig()
    assert (config.method, config.queries, config.max_hops, config.gap_limit) == ("icmp", 3, 30, 5)
    assert trace.policy_cost(config).packets == 90
    assert trace.max_run_s(config) == pytest.approx(6 * 2.0 + 1.0)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"hops": 3}, trace.TraceConfig)
    assert get_kind("traceroute") is trace.KIND and get_kind("mtr") is trace.KIND


def test_a_target_not_reached_is_a_failure_with_its_hops() -> None:
    reached = filled()
    assert trace.verdict(reached, []) is None
    partial = [
        S(1, 0, "10.91.1.1", 0.1, icmp_type=11, icmp_code=0),
        S(2, 0),
        S(3, 0, "10.91.6.2", 5.0, icmp_type=3, icmp_code=1, final=True),  # a router: host unreachable
    ]
    hops = tracepath.aggregate(partial, queries=1, last_ttl=3)
    result = trace.TraceResult(address="10.91.7.9", family="ipv4", method="icmp", port=None, paris=True, queries=1)
    trace.fill(result, hops)
    assert not result.reached and result.hop_count is None
    assert trace.verdict(result, hops) == (
        Outcome.UNREACHABLE,
        "hop 3 (10.91.6.2) answered destination unreachable (3/1)",
    )
    hops = tracepath.aggregate(partial[:2], queries=1, last_ttl=6)
    trace.fill(result, hops)
    assert trace.verdict(result, hops) == (
        Outcome.TIMEOUT,
        "target not reached: the last answer came from hop 1 (10.91.1.1)",
    )
    hops = tracepath.aggregate([S(1, 0)], queries=1, last_ttl=1)
    result.sent = 5
    trace.fill(result, hops)
    assert trace.verdict(result, hops) == (Outcome.TIMEOUT, "no hop answered any of 5 probes")


def test_path_memory_marks_changes() -> None:
    memory = trace.PathMemory(max_entries=2)
    assert memory.swap(("a", "icmp", None), "p1") is None
    assert memory.swap(("a", "icmp", None), "p2") == "p1"
    memory.swap(("b", "icmp", None), "x")
    memory.swap(("c", "icmp", None), "y")
    assert memory.swap(("a", "icmp", None), "p3") is None  # the oldest was forgotten
