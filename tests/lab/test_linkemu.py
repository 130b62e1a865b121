"""The lab's pure parts: the link emulator's per-frame decisions, frame parsing, ping parsing, Wilson."""

from __future__ import annotations

import struct

import pytest

from tests.support.linkemu import Direction, Shaper, summarize_frame
from tests.support.measure import parse_ping, wilson_interval
from tests.support.netlab import FrameRecord, LinkLog

MS = 1_000_000


def test_constant_delay_and_no_loss() -> None:
    s = Shaper(Direction(delay_ms=5), seed=1)
    assert [s.admit(t * MS) for t in (0, 1, 2)] == [5 * MS, 6 * MS, 7 * MS]


def test_jitter_stays_within_bounds_and_fifo_keeps_order() -> None:
    s = Shaper(Direction(delay_ms=20, jitter_ms=5), seed=7)
    dues = [s.admit(t * MS // 10) for t in range(2000)]  # 0.1 ms apart: jitter would reorder
    assert all(d is not None for d in dues)
    assert dues == sorted(dues)  # FIFO: never overtakes
    first = [d - t * MS // 10 for t, d in enumerate(dues) if d is not None][:1]
    assert 15 * MS <= first[0] <= 25 * MS


def test_reorder_keeps_each_draw() -> None:
    s = Shaper(Direction(delay_ms=20, jitter_ms=5, reorder=True), seed=7)
    delays = [(s.admit(t * MS // 10) or 0) - t * MS // 10 for t in range(2000)]
    assert min(delays) >= 15 * MS and max(delays) <= 25 * MS
    assert 19 * MS < sum(delays) / len(delays) < 21 * MS
    assert delays != sorted(delays)


def test_jitter_larger_than_delay_is_clamped_at_zero() -> None:
    s = Shaper(Direction(delay_ms=1, jitter_ms=5, reorder=True), seed=3)
    assert all((s.admit(10 * MS) or 0) >= 10 * MS for _ in range(500))


def test_loss_is_seeded_and_near_the_ratio() -> None:
    def run(seed: int) -> list[int | None]:
        s = Shaper(Direction(loss_ratio=0.1), seed=seed)
        return [s.admit(t) for t in range(20_000)]

    a, b = run(5), run(5)
    assert a == b
    lost = sum(d is None for d in a)
    lo, hi = wilson_interval(lost, len(a), z=4.0)
    assert lo <= 0.1 <= hi
    assert run(6) != a


@pytest.mark.parametrize("bad", [{"delay_ms": -1}, {"jitter_ms": -0.1}, {"loss_ratio": 1.5}])
def test_direction_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Direction(**bad)


def _eth(ethertype: int, payload: bytes) -> bytes:
    return bytes(6) + bytes(6) + struct.pack("!H", ethertype) + payload


def test_summarize_frames() -> None:
    ip4 = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0]) + bytes(8)
    assert summarize_frame(_eth(0x0800, ip4 + struct.pack("!BBHHH", 8, 0, 0, 0x1234, 7))) == ("icmp", 8, 0x1234, 7)
    ip6 = bytes(6) + bytes([58, 64]) + bytes(32)
    assert summarize_frame(_eth(0x86DD, ip6 + struct.pack("!BBHHH", 129, 0, 0, 9, 10))) == ("icmp6", 129, 9, 10)
    tcp4 = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0]) + bytes(8)
    tcp = struct.pack("!HHIIBB", 40000, 443, 0, 0, 0x50, 0x02) + bytes(6)
    assert summarize_frame(_eth(0x0800, tcp4 + tcp)) == ("tcp", 0x02, 40000, 443)
    assert summarize_frame(_eth(0x0806, bytes(28))) == ("other", 0x0806, 0, 0)
    assert summarize_frame(b"\x00") == ("other", 0, 0, 0)


def _rec(direction: int, rx: int, due: int, tx: int, icmp_type: int, ident: int, seq: int) -> FrameRecord:
    return FrameRecord(
        dir=direction, rx_ns=rx, due_ns=due, tx_ns=tx, len=98, proto="icmp", type=icmp_type, ident=ident, seq=seq
    )


def test_link_log_pairs_echoes_with_their_replies() -> None:
    log = LinkLog(
        [
            _rec(0, 0, 5, 6, 8, 1, 1),
            _rec(0, 10, -1, -1, 8, 1, 2),  # lost on the way out
            _rec(1, 20, 25, 27, 0, 1, 1),
            _rec(0, 30, 35, 35, 8, 1, 3),  # its reply never came
        ]
    )
    pairs = log.echoes()
    assert [(req.seq, rep.seq if rep else None) for req, rep in pairs] == [(1, 1), (2, None), (3, None)]
    assert pairs[0][0].hold_ns == 6 and pairs[0][0].late_ns == 1


# Captured from iputils 20221126 (Debian 12) through the lab at 5 ms one way.
PING_OUTPUT = """PING 10.77.0.2 (10.77.0.2) 56(84) bytes of data.
64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=10.1 ms
64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=10.0 ms
64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=10.2 ms (DUP!)
64 bytes from 10.77.0.2: icmp_seq=4 ttl=64 time=9.98 ms

--- 10.77.0.2 ping statistics ---
4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 31ms
rtt min/avg/max/mdev = 9.980/10.076/10.151/0.027 ms
"""


def test_parse_ping() -> None:
    run = parse_ping(PING_OUTPUT, 4)
    assert run.rtts_ms == [10.1, None, 10.0, 9.98]
    assert (run.transmitted, run.received, run.duplicates) == (4, 3, 1)
    assert run.summary_ms == {"min": 9.98, "avg": 10.076, "max": 10.151, "mdev": 0.027}


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-4) and hi == pytest.approx(0.1744, abs=1e-4)
    assert wilson_interval(0, 50)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_without_root_the_lab_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import netlab

    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert netlab.lab_problem() == "needs root for network namespaces"
