"""Measuring through the lab: edgeprobe and iputils ``ping`` side by side, and the link's own truth.

Pure parsers and statistics (tested on captured output) plus thin runners. The lab tests and the
benchmarks (``tests/benchmarks/truth.py``) share them.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeprobe.probes.stats import percentile

from .netlab import FrameRecord, Lab, LinkLog

PING_IDENT = 0x4550  # iputils ping -e: marks its echoes in the link log


@dataclass
class PingRun:
    """What iputils ``ping`` printed: per-sequence RTTs (None = no reply) and its summary."""

    rtts_ms: list[float | None]  # index i is icmp_seq i + 1
    transmitted: int
    received: int
    duplicates: int = 0
    summary_ms: dict[str, float] = field(default_factory=dict)  # min, avg, max, mdev (µs resolution)


_REPLY_RE = re.compile(r"icmp_seq=(\d+) .*?time=([\d.]+) ms(.*)$")
_STATS_RE = re.compile(r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?")
_SUMMARY_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(text: str, count: int) -> PingRun:
    """Parse iputils ``ping`` output (per-reply lines on, ``-q`` off). Duplicate lines are counted, not used.

    Note ping's per-reply resolution: 3 significant-ish digits (``time=10.1 ms``, ``time=100 ms``);
    the summary line has µs resolution.
    """
    rtts: list[float | None] = [None] * count
    dups = 0
    transmitted = received = 0
    summary: dict[str, float] = {}
    for line in text.splitlines():
        m = _REPLY_RE.search(line)
        if m:
            seq = int(m.group(1))
            if "DUP!" in m.group(3):
                dups += 1
            elif 1 <= seq <= count and rtts[seq - 1] is None:
                rtts[seq - 1] = float(m.group(2))
            continue
        m = _STATS_RE.search(line)
        if m:
            transmitted, received = int(m.group(1)), int(m.group(2))
            continue
        m = _SUMMARY_RE.search(line)
        if m and line.startswith(("rtt", "round-trip")):
            summary = dict(zip(("min", "avg", "max", "mdev"), map(float, m.groups()), strict=True))
    return PingRun(rtts, transmitted, received, dups, summary)


def wilson_interval(lost: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (lost of n), 95 % by default."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = lost / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 50)


def pct(values: Sequence[float], q: float) -> float:
    return percentile(sorted(values), q)


def echo_truth_ms(log: LinkLog, ident: int | None, *, exclude_ident: int | None = None) -> list[float | None]:
    """Per echo request a → b in send order (of ``ident``, or of every ident but ``exclude_ident``):
    how long the link held the request and its reply together (ms), None when either was lost."""
    out: list[float | None] = []
    for req, rep in log.echoes():
        if (ident is not None and req.ident != ident) or (exclude_ident is not None and req.ident == exclude_ident):
            continue
        out.append(None if rep is None or req.lost or req.tx_ns < 0 or rep.tx_ns < 0 else held_ms(req, rep))
    return out


def held_ms(req: FrameRecord, rep: FrameRecord) -> float:
    return (req.hold_ns + rep.hold_ns) / 1e6


def lost_requests(log: LinkLog, ident: int | None = None, *, exclude_ident: int | None = None) -> int:
    return sum(
        1
        for req, _ in log.echoes()
        if req.lost and (ident is None or req.ident == ident) and (exclude_ident is None or req.ident != exclude_ident)
    )


TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08


def tcp_wire_phases(log: LinkLog, server_port: int) -> list[dict[str, float]]:
    """Per TCP connection to ``server_port`` (a → b), in the order they began, what the link saw (ms):

    * ``handshake_ms``: the client's SYN arriving at the link → the server's SYN-ACK leaving it;
    * ``client_gap_ms``: SYN-ACK leaving the link → the client's first data (ClientHello, or the
      HTTP request) arriving: the client's own time between its connect and its first send;
    * ``second_flight_ms``: SYN-ACK leaving → the client's first data after the server's first data
      (with TLS 1.3: the client's Finished), i.e. connect done → handshake done, seen on the wire.

    A connection missing any of these frames is left out.
    """
    conns: dict[int, list[FrameRecord]] = {}
    for r in log.records:
        if r.proto != "tcp" or r.lost:
            continue
        if r.dir == 0 and r.seq == server_port:
            conns.setdefault(r.ident, []).append(r)
        elif r.dir == 1 and r.ident == server_port:
            conns.setdefault(r.seq, []).append(r)
    out: list[tuple[int, dict[str, float]]] = []
    for frames in conns.values():
        frames.sort(key=lambda r: r.rx_ns)
        syn = next((r for r in frames if r.dir == 0 and r.type & TCP_SYN and not r.type & TCP_ACK), None)
        synack = next((r for r in frames if r.dir == 1 and r.type & TCP_SYN and r.type & TCP_ACK), None)
        c1 = next((r for r in frames if r.dir == 0 and r.type & TCP_PSH), None)
        if syn is None or synack is None or c1 is None:
            continue
        s1 = next((r for r in frames if r.dir == 1 and r.type & TCP_PSH and r.rx_ns > c1.rx_ns), None)
        c2 = None if s1 is None else next(
            (r for r in frames if r.dir == 0 and r.type & TCP_PSH and r.rx_ns > s1.tx_ns), None
        )
        phases = {
            "handshake_ms": (synack.tx_ns - syn.rx_ns) / 1e6,
            "client_gap_ms": (c1.rx_ns - synack.tx_ns) / 1e6,
        }
        if c2 is not None:
            phases["second_flight_ms"] = (c2.rx_ns - synack.tx_ns) / 1e6
        out.append((syn.rx_ns, phases))
    return [phases for _, phases in sorted(out, key=lambda pair: pair[0])]


def edgeprobe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeprobe.cli", *args]


@dataclass
class SideBySide:
    edgeprobe: dict[str, Any]  # the CLI's --json object
    ping: PingRun
    log: LinkLog | None  # the link's own record (userspace emulator only)

    @property
    def ep_rtts(self) -> list[float | None]:
        return list(self.edgeprobe.get("rtts_ms") or [])

    def ep_truth(self) -> list[float | None]:
        return [] if self.log is None else echo_truth_ms(self.log, None, exclude_ident=PING_IDENT)

    def ping_truth(self) -> list[float | None]:
        return [] if self.log is None else echo_truth_ms(self.log, PING_IDENT)


def ping_side_by_side(
    lab: Lab, target: str, *, count: int, interval_s: float, timeout_s: float = 2.0, ping: bool = True
) -> SideBySide:
    """edgeprobe and iputils ping from ``a`` to ``target`` at the same time, over the link as it is
    configured now; the link is restarted afterwards so its log covers exactly this run."""
    from .netlab import ROOT

    ep_args = ["ping", target, "-c", str(count), "-i", f"{interval_s:g}", "-W", f"{timeout_s:g}", "--json"]
    ep = lab.popen(lab.ns_a, edgeprobe_cmd(*ep_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    ping_text = ""
    if ping:
        ping_args = ["ping", "-n", "-e", str(PING_IDENT), "-c", str(count), "-i", f"{interval_s:g}"]
        ping_args += ["-W", f"{timeout_s:g}", target]
        proc = lab.run(lab.ns_a, ping_args)
        ping_text = proc.stdout
    out, err = ep.communicate(timeout=count * interval_s + timeout_s + 60)
    if not out.strip():
        raise RuntimeError(f"edgeprobe ping printed nothing: {err.strip()}")
    log = lab.take_log()  # the link restarts, so its log covers exactly this run
    return SideBySide(json.loads(out), parse_ping(ping_text, count), log)
