"""Pure parts of the ICMP probe: packet building/parsing on captured bytes, RTT summary, config.

The packets below were captured on Linux 6.18 loopback (``recvmsg`` output, hex). Loopback never
produces ICMP errors by itself: those were captured in a network namespace with kernel echo
replies disabled, where a test responder answered the echo request with a destination
unreachable; what the probe socket then received (the raw packet, or the dgram socket's error
queue entry with its ``IP_RECVERR`` control data) is the kernel's real output.
"""

from __future__ import annotations

import math
import socket
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.configfile import ConfigError, convert
from edgeprobe.probes import icmp
from edgeprobe.probes.icmp import (
    IcmpConfig,
    IcmpPacket,
    build_echo_request,
    check_target,
    checksum,
    parse_ancillary,
    parse_errqueue,
    parse_reply,
    round_trip_ns,
)
from edgeprobe.probes.stats import summarize_rtts

TOKEN = b"TOKEN123"
STAMP = 0x1122334455667788
PAYLOAD_TAIL = "544f4b454e3132331122334455667788" + bytes(range(0x10, 0x38)).hex()  # token, stamp, filler

# raw IPv4 socket, ping of 127.0.0.1 (identifier 0x4242, sequence 7): our request looped back, the reply
RAW4_REQUEST = bytes.fromhex("45000054b1d9400040018acd7f0000017f0000010800c59542420007" + PAYLOAD_TAIL)
RAW4_REPLY = bytes.fromhex("45000054b1da00004001cacc7f0000017f0000010000cd9542420007" + PAYLOAD_TAIL)
# raw ICMPv6 socket, ping of ::1: no IPv6 header; the kernel filled in the checksum
RAW6_REQUEST = bytes.fromhex("80004d1942420007" + PAYLOAD_TAIL)
RAW6_REPLY = bytes.fromhex("81004c1942420007" + PAYLOAD_TAIL)
# dgram ("ping") sockets bound to ports 44518 / 44519: the kernel rewrote the identifier to the port
DGRAM4_REPLY = bytes.fromhex("000061f1ade60007" + PAYLOAD_TAIL)
DGRAM6_REPLY = bytes.fromhex("8100e073ade70007" + PAYLOAD_TAIL)
# raw IPv4: host unreachable from 127.0.0.254 quoting the echo to 127.0.0.77 (IP header + whole echo)
RAW4_UNREACH = bytes.fromhex(
    "450000704feb40004001eba27f0000fe7f0000010301fcfe00000000"
    "450000543b614000400100fa7f0000017f00004d0800c59542420007" + PAYLOAD_TAIL
)
# raw ICMPv6: address unreachable quoting the IPv6 header and the echo to ::1
RAW6_UNREACH = bytes.fromhex(
    "0103644a00000000600000000040"
    "3a4000000000000000000000000000000001000000000000000000000000000000018000"
    "4d1942420007" + PAYLOAD_TAIL
)
# dgram sockets' error queue (MSG_ERRQUEUE): the quoted echo, and the IP_RECVERR / IPV6_RECVERR data
DGRAM4_ERRQ = bytes.fromhex("0800fde909ee0007" + PAYLOAD_TAIL)
DGRAM4_EXT_ERR = bytes.fromhex("71000000020301000000000000000000020000007f0000fe0000000000000000")
DGRAM6_ERRQ = bytes.fromhex("8000856c09ef0007" + PAYLOAD_TAIL)
DGRAM6_EXT_ERR = bytes.fromhex(
    "710000000301030000000000000000000a000000000000000000000000000000000000000000000100000000"
)
# control messages that came with RAW4_REPLY: SO_TIMESTAMPNS (struct timespec) and IP_TTL
TIMESPEC = bytes.fromhex("b93a096b00000000e9eb7a1000000000")
TTL_64 = bytes.fromhex("40000000")


# ---------------------------------------------------------------- building


def test_build_ipv4_request_matches_the_captured_bytes() -> None:
    built = build_echo_request(ipv6=False, ident=0x4242, seq=7, token=TOKEN, sent_at_ns=STAMP, size_bytes=56)
    assert built == RAW4_REQUEST[20:]
    assert checksum(built) == 0  # a correct checksum sums to zero


def test_build_ipv6_request_leaves_the_checksum_to_the_kernel() -> None:
    built = build_echo_request(ipv6=True, ident=0x4242, seq=7, token=TOKEN, sent_at_ns=STAMP, size_bytes=56)
    assert built == RAW6_REQUEST[:2] + b"\0\0" + RAW6_REQUEST[4:]


@pytest.mark.parametrize("size", [16, 17, 1000, 65000])
def test_build_request_sizes(size: int) -> None:
    built = build_echo_request(ipv6=False, ident=1, seq=65535, token=TOKEN, sent_at_ns=0, size_bytes=size)
    assert len(built) == 8 + size
    assert checksum(built) == 0  # also for odd lengths


def test_build_request_rejects_payloads_without_room_for_token_and_stamp() -> None:
    with pytest.raises(ValueError):
        build_echo_request(ipv6=False, ident=1, seq=1, token=TOKEN, sent_at_ns=0, size_bytes=15)
    with pytest.raises(ValueError):
        build_echo_request(ipv6=False, ident=1, seq=1, token=b"short", sent_at_ns=0, size_bytes=56)


def test_checksum_of_captured_ip_headers_verifies() -> None:
    assert checksum(RAW4_REPLY[:20]) == 0
    assert checksum(RAW4_UNREACH[:20]) == 0
    assert checksum(RAW4_UNREACH[20:]) == 0


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("data", "ipv6", "ip_header", "ident"),
    [
        (RAW4_REPLY, False, True, 0x4242),
        (RAW6_REPLY, True, False, 0x4242),
        (DGRAM4_REPLY, False, False, 44518),
        (DGRAM6_REPLY, True, False, 44519),
    ],
)
def test_parse_echo_replies(data: bytes, ipv6: bool, ip_header: bool, ident: int) -> None:
    packet = parse_reply(data, ipv6=ipv6, ip_header=ip_header, source="peer")
    assert packet == IcmpPacket(ident=ident, seq=7, token=TOKEN, peer="peer")


@pytest.mark.parametrize(
    ("data", "ipv6", "ip_header"), [(RAW4_REQUEST, False, True), (RAW6_REQUEST, True, False)]
)
def test_our_own_requests_seen_on_loopback_are_ignored(data: bytes, ipv6: bool, ip_header: bool) -> None:
    assert parse_reply(data, ipv6=ipv6, ip_header=ip_header, source="127.0.0.1") is None


def test_parse_ipv4_unreachable_quoting_our_echo() -> None:
    packet = parse_reply(RAW4_UNREACH, ipv6=False, ip_header=True, source="127.0.0.254")
    assert packet == IcmpPacket(
        ident=0x4242,
        seq=7,
        token=TOKEN,
        peer="127.0.0.77",
        error="destination unreachable (host unreachable)",
        offender="127.0.0.254",
    )


def test_parse_ipv6_unreachable_quoting_our_echo() -> None:
    packet = parse_reply(RAW6_UNREACH, ipv6=True, ip_header=False, source="::1")
    assert packet is not None
    assert (packet.ident, packet.seq, packet.token, packet.peer) == (0x4242, 7, TOKEN, "::1")
    assert packet.error == "destination unreachable (address unreachable)"


def test_error_quoting_only_eight_bytes_has_no_token_but_still_matches() -> None:
    # RFC 792 routers quote the IP header and only the first 8 bytes of the datagram
    short = RAW4_UNREACH[: 20 + 8 + 20 + 8]
    packet = parse_reply(short, ipv6=False, ip_header=True, source="192.0.2.1")
    assert packet is not None
    assert (packet.ident, packet.seq, packet.token, packet.peer) == (0x4242, 7, None, "127.0.0.77")


def test_errors_quoting_something_else_are_ignored() -> None:
    quoted_reply = bytearray(RAW4_UNREACH)
    quoted_reply[48] = 0  # the quoted ICMP message is an echo reply, not our request
    assert parse_reply(bytes(quoted_reply), ipv6=False, ip_header=True, source="x") is None
    quoted_udp = bytearray(RAW4_UNREACH)
    quoted_udp[28 + 9] = socket.IPPROTO_UDP
    assert parse_reply(bytes(quoted_udp), ipv6=False, ip_header=True, source="x") is None
    other_type = bytearray(RAW6_UNREACH)
    other_type[0] = 135  # neighbour solicitation
    assert parse_reply(bytes(other_type), ipv6=True, ip_header=False, source="x") is None


def test_time_exceeded_is_reported_as_an_error() -> None:
    exceeded = bytearray(RAW4_UNREACH)
    exceeded[20:22] = b"\x0b\x00"
    packet = parse_reply(bytes(exceeded), ipv6=False, ip_header=True, source="10.0.0.1")
    assert packet is not None and packet.error == "time exceeded"


def test_unknown_unreachable_code_is_named_by_number() -> None:
    odd = bytearray(RAW6_UNREACH)
    odd[1] = 42
    packet = parse_reply(bytes(odd), ipv6=True, ip_header=False, source="::1")
    assert packet is not None and packet.error == "destination unreachable (code 42)"


@pytest.mark.parametrize(
    ("data", "ipv6", "ip_header"),
    [
        (b"", False, True),
        (RAW4_REPLY[:27], False, True),  # header cut short
        (RAW4_REPLY[: 20 + 8 + 7], False, True),  # reply too short to carry our token
        (b"\x60" + RAW4_REPLY[1:], False, True),  # not IPv4
        (DGRAM6_REPLY[:7], True, False),
        (RAW6_UNREACH[: 8 + 39], True, False),  # quoted IPv6 header cut short
    ],
)
def test_truncated_or_foreign_data_is_ignored(data: bytes, ipv6: bool, ip_header: bool) -> None:
    assert parse_reply(data, ipv6=ipv6, ip_header=ip_header, source="x") is None


@given(data=st.binary(max_size=200), ipv6=st.booleans(), ip_header=st.booleans())
def test_parse_reply_never_raises(data: bytes, ipv6: bool, ip_header: bool) -> None:
    parse_reply(data, ipv6=ipv6, ip_header=ip_header, source="x")


def test_parse_ipv4_error_queue_entry() -> None:
    packet = parse_errqueue(DGRAM4_ERRQ, DGRAM4_EXT_ERR, ipv6=False, dest="127.0.0.77")
    assert packet == IcmpPacket(
        ident=2542,
        seq=7,
        token=TOKEN,
        peer="127.0.0.77",
        error="destination unreachable (host unreachable)",
        offender="127.0.0.254",
    )


def test_parse_ipv6_error_queue_entry() -> None:
    packet = parse_errqueue(DGRAM6_ERRQ, DGRAM6_EXT_ERR, ipv6=True, dest="::1")
    assert packet is not None
    assert (packet.ident, packet.seq, packet.peer, packet.offender) == (2543, 7, "::1", "::1")
    assert packet.error == "destination unreachable (address unreachable)"


def test_error_queue_entries_not_from_icmp_are_ignored() -> None:
    local = bytearray(DGRAM4_EXT_ERR)
    local[4] = 1  # SO_EE_ORIGIN_LOCAL, e.g. EMSGSIZE
    assert parse_errqueue(DGRAM4_ERRQ, bytes(local), ipv6=False, dest="127.0.0.77") is None
    assert parse_errqueue(DGRAM4_ERRQ, DGRAM4_EXT_ERR[:10], ipv6=False, dest="127.0.0.77") is None


def test_error_queue_entry_without_offender() -> None:
    no_offender = DGRAM4_EXT_ERR[:16] + bytes(16)
    packet = parse_errqueue(DGRAM4_ERRQ, no_offender, ipv6=False, dest="127.0.0.77")
    assert packet is not None and packet.offender is None


@pytest.mark.skipif(sys.byteorder != "little" or struct.calcsize("l") != 8, reason="captured on 64-bit LE")
def test_parse_ancillary_data() -> None:
    anc = parse_ancillary(
        [(socket.SOL_SOCKET, icmp.SO_TIMESTAMPNS, TIMESPEC), (socket.IPPROTO_IP, 2, TTL_64)]
    )
    assert anc.received_at_ns == 0x6B093AB9 * 1_000_000_000 + 0x107AEBE9
    assert anc.ttl == 64 and anc.extended_err is None
    anc6 = parse_ancillary([(socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, TTL_64)])
    assert anc6 == icmp.Ancillary(ttl=64)
    errq = parse_ancillary([(socket.IPPROTO_IP, icmp.IP_RECVERR, DGRAM4_EXT_ERR)])
    assert errq.extended_err == DGRAM4_EXT_ERR
    assert parse_ancillary([]) == icmp.Ancillary()


def test_round_trip_prefers_the_kernel_stamp_when_plausible() -> None:
    sent = dict(sent_wall_ns=1_000_000_000, sent_perf_ns=5_000)
    assert round_trip_ns(**sent, received_at_ns=1_000_040_000, now_perf_ns=5_000 + 90_000) == 40_000
    # no stamp: perf_counter
    assert round_trip_ns(**sent, received_at_ns=None, now_perf_ns=5_000 + 90_000) == 90_000
    # the wall clock stepped back or forward between send and receive: perf_counter
    assert round_trip_ns(**sent, received_at_ns=999_000_000, now_perf_ns=5_000 + 90_000) == 90_000
    assert round_trip_ns(**sent, received_at_ns=2_000_000_000, now_perf_ns=5_000 + 90_000) == 90_000


# ---------------------------------------------------------------- summary statistics


def test_summary_of_a_hand_computed_series() -> None:
    s = summarize_rtts([10.0, None, 12.0, 11.0, None, 15.0], duplicates=1)
    assert (s.sent, s.received, s.duplicates) == (6, 4, 1)
    assert s.loss_ratio == pytest.approx(2 / 6)
    assert (s.rtt_min_ms, s.rtt_avg_ms, s.rtt_max_ms) == (10.0, 12.0, 15.0)
    assert s.rtt_stddev_ms == pytest.approx(math.sqrt(14 / 4), abs=1e-6)  # deviations -2, 0, -1, 3
    assert s.rtt_p50_ms == pytest.approx(11.5)
    assert s.rtt_p95_ms == pytest.approx(14.55)  # sorted 10, 11, 12, 15: position 2.85
    # consecutive answered RTTs 10 → 12 → 11 → 15: |D| = 2, 1, 4
    j = 0.0
    for d in (2, 1, 4):
        j += (d - j) / 16
    assert s.jitter_rfc3550_ms == pytest.approx(j, abs=1e-6)
    assert s.jitter_rfc3550_ms == pytest.approx(0.418457, abs=1e-6)
    assert s.ipdv_mean_ms == pytest.approx(7 / 3, abs=1e-6)
    assert s.ipdv_p95_ms == pytest.approx(3.8)  # sorted 1, 2, 4: position 1.9
    assert s.pdv_p95_ms == pytest.approx(4.55)
    assert s.rtts_ms == [10.0, None, 12.0, 11.0, None, 15.0]


def test_summary_when_nothing_was_answered() -> None:
    s = summarize_rtts([None, None, None])
    assert (s.sent, s.received, s.loss_ratio) == (3, 0, 1.0)
    for name in ("rtt_min_ms", "rtt_avg_ms", "rtt_max_ms", "rtt_stddev_ms", "rtt_p50_ms", "rtt_p95_ms",
                 "jitter_rfc3550_ms", "ipdv_mean_ms", "ipdv_p95_ms", "pdv_p95_ms"):  # fmt: skip
        assert getattr(s, name) is None, name
    assert s.rtts_ms == [None, None, None]


def test_loss_never_counts_as_zero_rtt() -> None:
    s = summarize_rtts([1.0, None, 3.0])
    assert (s.rtt_min_ms, s.rtt_avg_ms) == (1.0, 2.0)
    zero = summarize_rtts([0.0, None])  # a real 0 ms answer is an answer
    assert (zero.received, zero.rtt_min_ms) == (1, 0.0)


def test_duplicates_are_counted_but_never_answer() -> None:
    s = summarize_rtts([1.0, None], duplicates=5)
    assert (s.received, s.duplicates, s.loss_ratio) == (1, 5, 0.5)


def test_one_answer_is_too_few_for_jitter() -> None:
    s = summarize_rtts([None, 5.0, None])
    assert (s.rtt_min_ms, s.rtt_max_ms, s.rtt_stddev_ms, s.rtt_p95_ms) == (5.0, 5.0, 0.0, 5.0)
    assert (s.jitter_rfc3550_ms, s.ipdv_mean_ms, s.ipdv_p95_ms, s.pdv_p95_ms) == (None, None, None, None)


def test_summary_of_an_empty_series_is_an_error() -> None:
    with pytest.raises(ValueError):
        summarize_rtts([])


# ---------------------------------------------------------------- config and targets


def test_config_defaults_and_bounds() -> None:
    assert convert({}, IcmpConfig, "t") == IcmpConfig(
        count=5, interval_s=1.0, size_bytes=56, timeout_s=1.0, family="auto", socket="auto"
    )
    for bad in ({"count": 0}, {"count": 10001}, {"size_bytes": 15}, {"interval_s": 0}, {"timeout_s": 0},
                {"family": "ipx"}, {"socket": "packet"}):  # fmt: skip
        with pytest.raises(ConfigError):
            convert(bad, IcmpConfig, "t")
    with pytest.raises(ConfigError, match="unknown key"):
        convert({"cnt": 3}, IcmpConfig, "t")


def test_deadline_covers_every_echo_and_its_timeout() -> None:
    assert icmp.max_run_s(IcmpConfig(count=5, interval_s=1.0, timeout_s=2.0)) == 4.0 + 2.0
    assert icmp.max_run_s(IcmpConfig(count=1, timeout_s=0.5)) == 0.5


@pytest.mark.parametrize(
    "target",
    ["example.com", "localhost", "127.0.0.1", "::1", "2001:db8::1", "fe80::1%eth0", "a-b.example.", "x"],
)
def test_good_targets(target: str) -> None:
    assert check_target(target) is None


@pytest.mark.parametrize(
    ("target", "complaint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (" example.com", "whitespace"),
        ("exa mple.com", "whitespace"),
        ("https://example.com", "URL"),
        ("example.com/path", "URL"),
        ("example.com:80", "port"),
        ("127.0.0.1:80", "port"),
        ("[::1]", "brackets"),
        ("[::1]:80", "port"),
        ("-bad.example", "not a valid host name"),
        ("a" * 64 + ".example", "not a valid host name"),
        ("1.2.3.999", "not a valid IPv4 address"),
    ],
)
def test_bad_targets(target: str, complaint: str) -> None:
    reason = check_target(target)
    assert reason is not None and complaint in reason


def test_kind_declaration() -> None:
    assert icmp.KIND.name == "icmp"
    assert icmp.KIND.config_type is IcmpConfig and icmp.KIND.result_type is icmp.IcmpResult
    assert set(icmp.KIND.tag_fields) <= set(icmp.IcmpResult.__struct_fields__)
