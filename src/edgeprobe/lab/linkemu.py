"""A userspace link emulator: one-way delay, jitter and loss per direction, for kernels without netem.

It runs inside the lab's middle ("link") namespace as a two-port store-and-forward bridge
between two veth interfaces. Each port is read with an ``AF_PACKET`` socket that carries the
kernel's receive timestamp (``SO_TIMESTAMPNS``), so a frame's due time is measured from the moment
the kernel saw it, not from when this process got round to reading it: the only error left is how
late the frame is written out. Due frames wait in a heap; a ``timerfd`` (CLOCK_REALTIME, absolute,
timer slack 1 ns) wakes the process shortly before the earliest one, which it then spins for.
The process runs at ``SCHED_FIFO`` priority when allowed and with the garbage collector off.

Per direction (``a_to_b``, ``b_to_a``): ``delay_ms``, ``jitter_ms`` (a uniform draw in ±jitter
per frame, the total clamped at ≥ 0, like netem's default), ``loss_ratio`` (Bernoulli per frame,
seeded RNG, so a run is repeatable) and ``reorder``: off by default, a direction is then a FIFO
(a frame is never due before the one ahead of it, as on a real link); on, each frame keeps its own
draw and frames may overtake each other (netem's behaviour with jitter).

Every frame's fate is logged (direction, kernel receive time, due time, time just before the
write, a parsed ICMP/TCP/UDP summary) and written as JSON lines to ``--log`` when the process
stops (its stdin closes, or SIGTERM), so a benchmark knows each packet's true holding time.

Standalone (standard library only); run as::

    python3 linkemu.py run --config '<json>' [--log FILE]    # prints "ready" once forwarding
    python3 linkemu.py offload-off DEV [DEV ...]              # no TX checksum offload / TSO / GSO / GRO

The ``offload-off`` step matters: with offloads on, a veth hands over TCP/UDP frames whose
checksum the sender left to "hardware" (and super-sized GSO frames), which a packet socket
cannot forward as they are.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fcntl
import gc
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_OUTGOING = 4
PACKET_IGNORE_OUTGOING = 23
SO_TIMESTAMPNS = 35
CLOCK_REALTIME = 0
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000
TFD_TIMER_ABSTIME = 1
PR_SET_TIMERSLACK = 29
SIOCETHTOOL = 0x8946
# Legacy ethtool "set" commands (still honoured by every kernel): tx csum, scatter-gather, TSO, GSO, GRO.
ETHTOOL_SET_OFFLOADS = (0x17, 0x19, 0x1F, 0x24, 0x2C)

_TIMESPEC = struct.Struct("@ll")


@dataclass(frozen=True, kw_only=True)
class Direction:
    """What one direction of the link does to each frame."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_ratio: float = 0.0
    reorder: bool = False

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if not 0.0 <= self.loss_ratio <= 1.0:
            raise ValueError("loss_ratio must be within 0..1")

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Direction:
        return cls(**obj)


class Shaper:
    """The fate of each frame in one direction (pure apart from its seeded RNG)."""

    def __init__(self, direction: Direction, seed: int) -> None:
        self.d = direction
        self.rng = random.Random(seed)
        self.last_due_ns = 0
        self._delay_ns = direction.delay_ms * 1e6
        self._jitter_ns = direction.jitter_ms * 1e6

    def admit(self, rx_ns: int) -> int | None:
        """The time the frame received at ``rx_ns`` is due to leave, or None when it is lost."""
        if self.d.loss_ratio > 0.0 and self.rng.random() < self.d.loss_ratio:
            return None
        delay = self._delay_ns
        if self._jitter_ns > 0.0:
            delay += self.rng.uniform(-self._jitter_ns, self._jitter_ns)
        due = rx_ns + max(0, round(delay))
        if not self.d.reorder:
            due = max(due, self.last_due_ns)
            self.last_due_ns = due
        return due


def summarize_frame(frame: bytes) -> tuple[str, int, int, int]:
    """(protocol, type-or-flags, ident-or-sport, seq-or-dport) of an Ethernet frame, for the log.

    ``("icmp", 8, ident, seq)`` for an IPv4 echo request, ``("icmp6", 129, ident, seq)`` for an
    ICMPv6 echo reply, ``("tcp", flags, sport, dport)``, ``("udp", 0, sport, dport)``, else
    ``("other", ethertype, 0, 0)``.
    """
    if len(frame) < 14:
        return "other", 0, 0, 0
    ethertype = int.from_bytes(frame[12:14], "big")
    offset = 14
    if ethertype == 0x8100 and len(frame) >= 18:  # one VLAN tag
        ethertype = int.from_bytes(frame[16:18], "big")
        offset = 18
    proto = -1
    if ethertype == 0x0800 and len(frame) >= offset + 20:
        ihl = (frame[offset] & 0x0F) * 4
        proto = frame[offset + 9]
        offset += ihl
    elif ethertype == 0x86DD and len(frame) >= offset + 40:
        proto = frame[offset + 6]
        offset += 40
    l4 = frame[offset:]
    if proto in (1, 58) and len(l4) >= 8:
        return (
            ("icmp" if proto == 1 else "icmp6"),
            l4[0],
            int.from_bytes(l4[4:6], "big"),
            int.from_bytes(l4[6:8], "big"),
        )
    if proto == 6 and len(l4) >= 14:
        return "tcp", l4[13], int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    if proto == 17 and len(l4) >= 4:
        return "udp", 0, int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    return "other", ethertype, 0, 0


# ---------------------------------------------------------------- system glue


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class TimerFd:
    """An absolute CLOCK_REALTIME timerfd (ctypes: Python 3.11 has no os.timerfd_*)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._libc = libc
        fd = libc.timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.fd: int = fd
        self._spec = (ctypes.c_long * 4)()
        self.armed_ns = 0

    def arm(self, at_ns: int) -> None:
        """Fire at wall-clock ``at_ns`` (0 disarms)."""
        if at_ns == self.armed_ns:
            return
        spec = self._spec
        spec[0] = spec[1] = 0  # it_interval
        spec[2], spec[3] = divmod(max(at_ns, 1), 1_000_000_000) if at_ns else (0, 0)
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        self.armed_ns = at_ns

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_ns = 0


def offload_off(ifname: str) -> None:
    """Switch off TX checksum offload, SG, TSO, GSO and GRO of ``ifname`` (SIOCETHTOOL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in ETHTOOL_SET_OFFLOADS:
            value = ctypes.create_string_buffer(struct.pack("=II", cmd, 0), 8)
            ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)) + bytes(16)
            try:
                fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
            except OSError:
                if cmd == 0x17:  # the one that matters for correctness
                    raise


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernels: outgoing frames are filtered by pkttype below
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def _realtime_priority() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(40))
    except (OSError, AttributeError):
        return False
    return True


# ---------------------------------------------------------------- the forwarder


class Forwarder:
    """Two ports, two shapers, one heap of due frames."""

    def __init__(
        self,
        if_a: str,
        if_b: str,
        a_to_b: Direction,
        b_to_a: Direction,
        *,
        seed: int,
        spin_us: float,
        log_frames: bool,
    ) -> None:
        self.ports = (open_port(if_a), open_port(if_b))
        self.shapers = (Shaper(a_to_b, seed), Shaper(b_to_a, seed + 1))
        self.spin_ns = round(spin_us * 1000)
        self.log_frames = log_frames
        self.heap: list[tuple[int, int, int, bytes, int]] = []  # (due, order, direction, frame, rx)
        self.order = 0
        # (direction, rx_ns, due_ns or -1 when lost, tx_ns or -1, len, proto, type, ident, seq)
        self.records: list[tuple[Any, ...]] = []
        self.send_errors = 0
        self._buf = bytearray(65600)

    def _drain(self, direction: int) -> None:
        sock = self.ports[direction]
        shaper = self.shapers[direction]
        buf = self._buf
        while True:
            try:
                n, anc, _, addr = sock.recvmsg_into([buf], 64)
            except (BlockingIOError, InterruptedError):
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            rx_ns = 0
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(data)
                    rx_ns = sec * 1_000_000_000 + nsec
            if not rx_ns:
                rx_ns = time.time_ns()
            frame = bytes(buf[:n])
            due = shaper.admit(rx_ns)
            if due is None:
                if self.log_frames:
                    self.records.append((direction, rx_ns, -1, -1, n, *summarize_frame(frame)))
                continue
            self.order += 1
            heapq.heappush(self.heap, (due, self.order, direction, frame, rx_ns))

    def _send_due(self) -> None:
        heap = self.heap
        while heap:
            due = heap[0][0]
            now = time.time_ns()
            if due > now + self.spin_ns:
                return
            while now < due:  # the last few µs: spin rather than sleep
                now = time.time_ns()
            _, _, direction, frame, rx_ns = heapq.heappop(heap)
            tx_ns = time.time_ns()
            try:
                self.ports[1 - direction].send(frame)
            except OSError:
                self.send_errors += 1
                tx_ns = -1
            if self.log_frames:
                self.records.append((direction, rx_ns, due, tx_ns, len(frame), *summarize_frame(frame)))

    def run(self, control_fds: list[int]) -> None:
        """Forward until one of ``control_fds`` reaches EOF."""
        timer = TimerFd(_libc())
        poller = select.epoll()
        fds = {self.ports[0].fileno(): 0, self.ports[1].fileno(): 1}
        for fd in fds:
            poller.register(fd, select.EPOLLIN)
        poller.register(timer.fd, select.EPOLLIN)
        for fd in control_fds:
            poller.register(fd, select.EPOLLIN | select.EPOLLHUP)
        stop = False
        while not stop:
            for fd, _ in poller.poll():
                if fd in fds:
                    self._drain(fds[fd])
                elif fd == timer.fd:
                    timer.clear()
                elif fd in control_fds:
                    try:
                        data = os.read(fd, 4096)
                    except BlockingIOError:
                        data = b"x"
                    stop = stop or not data
            self._send_due()
            timer.arm(self.heap[0][0] - self.spin_ns if self.heap else 0)
        poller.close()

    def close(self) -> None:
        for sock in self.ports:
            sock.close()


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = json.loads(args.config)
    a_to_b = Direction.from_json(cfg.get("a_to_b", {}))
    b_to_a = Direction.from_json(cfg.get("b_to_a", {}))
    libc = _libc()
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    realtime = _realtime_priority()
    fwd = Forwarder(
        cfg["if_a"],
        cfg["if_b"],
        a_to_b,
        b_to_a,
        seed=int(cfg.get("seed", 1)),
        spin_us=float(cfg.get("spin_us", 300.0)),
        log_frames=args.log is not None,
    )
    read_fd, write_fd = os.pipe()  # SIGTERM closes the control channel like an EOF on stdin does
    signal.signal(signal.SIGTERM, lambda *_: os.close(write_fd))
    control = [read_fd, sys.stdin.fileno()] if args.stdin_control else [read_fd]
    gc.disable()
    print(f"ready realtime={int(realtime)}", flush=True)
    try:
        fwd.run(control)
    finally:
        fwd.close()
        if args.log:
            with open(args.log, "w", encoding="ascii") as fh:
                keys = ("dir", "rx_ns", "due_ns", "tx_ns", "len", "proto", "type", "ident", "seq")
                fh.write(json.dumps({"send_errors": fwd.send_errors, "realtime": realtime}) + "\n")
                for rec in fwd.records:
                    fh.write(json.dumps(dict(zip(keys, rec, strict=True))) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="forward frames between two interfaces")
    run.add_argument("--config", required=True, help="JSON: if_a, if_b, a_to_b, b_to_a, seed, spin_us")
    run.add_argument("--log", help="write every frame's fate here as JSON lines at exit")
    run.add_argument("--stdin-control", action="store_true", help="stop when stdin closes (else only on SIGTERM)")
    off = sub.add_parser("offload-off", help="switch off checksum/segmentation offloads")
    off.add_argument("devices", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "offload-off":
        for dev in args.devices:
            offload_off(dev)
        return 0
    return _cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
