"""Pure parts of the ICMP engine: the timeline (one timer for every send and deadline of a
socket), the raw socket's kernel filter program, the address-literal fast path, and a stop
reaching runs through ``ProbeContext.on_stop``."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.probes import icmp
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.icmp import Timeline, build_echo_request, reply_filter


class Thing:
    def __init__(self, name: str) -> None:
        self.name = name
        self.live = True


def test_timeline_pops_what_is_due_in_time_order_and_skips_what_died() -> None:
    line: Timeline[Thing] = Timeline(lambda t: t.live)
    a, b, c, d = Thing("a"), Thing("b"), Thing("c"), Thing("d")
    line.push(30, c)
    line.push(10, a)
    line.push(20, b)
    line.push(10, d)  # the same time as a: after a (push order)
    assert line.next_at() == 10
    a.live = False  # answered before its deadline: no removal needed
    assert [t.name for t in line.pop_due(20)] == ["d", "b"]
    assert line.next_at() == 30
    c.live = False
    assert line.next_at() is None  # the dead entry on top was dropped
    assert len(line) == 0
    assert line.pop_due(10**18) == []


@given(st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), max_size=200), st.integers(0, 10**6))
def test_timeline_matches_a_sorted_list(entries: list[tuple[int, bool]], now: int) -> None:
    line: Timeline[Thing] = Timeline(lambda t: t.live)
    things = []
    for i, (at, live) in enumerate(entries):
        thing = Thing(str(i))
        thing.live = live
        things.append((at, i, thing))
        line.push(at, thing)
    expected = [t.name for at, _, t in sorted(things, key=lambda x: (x[0], x[1])) if at <= now and t.live]
    assert [t.name for t in line.pop_due(now)] == expected
    later = [at for at, _, t in things if at > now and t.live]
    assert line.next_at() == (min(later) if later else None)


def run_filter(program: bytes, packet: bytes) -> int:
    """A tiny interpreter for the classic BPF instructions :func:`reply_filter` uses."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    a = x = pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x01:  # ldx #k
            x = k
        elif code == 0xB1:  # ldxb 4*([k]&0xf)
            x = 4 * (packet[k] & 0x0F)
        elif code == 0x50:  # ldb [x+k]
            a = packet[x + k]
        elif code == 0x48:  # ldh [x+k]
            a = int.from_bytes(packet[x + k : x + k + 2], "big")
        elif code == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x06:  # ret #k
            return int(k)
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def ipv4(icmp_message: bytes) -> bytes:
    header = bytes([0x45, 0, 0, 20 + len(icmp_message), 0, 0, 0, 0, 64, socket.IPPROTO_ICMP, 0, 0])
    return header + socket.inet_aton("127.0.0.1") * 2 + icmp_message


def reply(ipv6: bool, ident: int) -> bytes:
    request = build_echo_request(ipv6=ipv6, ident=ident, seq=9, token=b"t" * 8, sent_at_ns=0, size_bytes=56)
    return bytes([icmp.ECHO_REPLY[ipv6]]) + request[1:]


def test_the_raw_socket_filter_drops_other_processes_replies_only() -> None:
    for ipv6 in (False, True):
        program = reply_filter(0x4242, ipv6=ipv6)
        wrap = (lambda m: m) if ipv6 else ipv4
        assert run_filter(program, wrap(reply(ipv6, 0x4242))) == 0xFFFFFFFF  # ours
        assert run_filter(program, wrap(reply(ipv6, 0x4243))) == 0  # fping's, ping's, another agent's
        error = bytes([1 if ipv6 else 3, 1, 0, 0, 0, 0, 0, 0]) + b"quoted"
        assert run_filter(program, wrap(error)) == 0xFFFFFFFF  # errors are matched in user space


def test_the_raw_ipv4_filter_reads_past_ip_options() -> None:
    message = reply(False, 7)
    with_options = bytearray(ipv4(message))
    with_options[0] = 0x46  # IHL 6: four bytes of options before the ICMP message
    packet = bytes(with_options[:20]) + b"\x01\x01\x01\x00" + message
    assert run_filter(reply_filter(7, ipv6=False), packet) == 0xFFFFFFFF
    assert run_filter(reply_filter(8, ipv6=False), packet) == 0


def test_address_literals_skip_the_resolver() -> None:
    assert icmp._literal("127.0.1.1", "auto") == (False, ("127.0.1.1", 0))
    assert icmp._literal("::1", "ipv6") == (True, ("::1", 0, 0, 0))
    assert icmp._literal("example.net", "auto") is None  # a name: getaddrinfo
    assert icmp._literal("127.0.0.1", "ipv6") is None  # the wrong family: getaddrinfo says why
    assert icmp._literal("fe80::1%eth0", "auto") is None  # a scope: getaddrinfo resolves it


async def test_on_stop_calls_back_once_and_can_be_taken_back() -> None:
    ctx = ProbeContext()
    calls: list[str] = []
    ctx.on_stop(lambda: calls.append("a"))
    take_back = ctx.on_stop(lambda: calls.append("b"))
    take_back()
    ctx.request_stop()
    ctx.request_stop()
    assert calls == ["a"]
    ctx.on_stop(lambda: calls.append("late"))  # a stop already requested: at once
    assert calls == ["a", "late"]
