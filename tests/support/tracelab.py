"""A routed lab for the trace probe: a client, four routers (one silent), an ECMP split, a delayed link.

Topology (namespaces ``epD-<pid>-<n>-<role>``; addresses exist only inside them)::

                         ┌─ r2a 10.91.2.2 | 10.91.4.1 ─┐
    c 10.91.1.2 ── r1 ───┤                              ├── r3 (silent) ══ link ══ r4 ── s 10.91.7.2
         10.91.1.1       └─ r2b 10.91.3.2 | 10.91.5.1 ─┘    10.91.6.1     (delay)  10.91.6.2 | 10.91.7.1

* r1 reaches 10.91.4.0/22 (r3, r4, s) via r2a only, or via r2a *and* r2b (``set_ecmp(True)``: a
  multipath route, ``fib_multipath_hash_policy=1`` so the kernel hashes ports: a flow keeps its path).
* r3 drops the ICMP time exceeded it would send itself (``iptables -A OUTPUT``): a silent hop.
* r3–r4 is the userspace link emulator (:mod:`linkemu`, static neighbours on both ends) with the
  delay given to :meth:`TraceLab.set_delay`.
* Routers and the server answer without ICMP rate limits (``icmp_ratelimit=0``), so many queries
  per hop all get answers.

The hop list from c to s: 10.91.1.1, 10.91.2.2 (or 10.91.3.2), *, 10.91.6.2, 10.91.7.2. Every
address has an IPv6 twin (10.91.X.Y → fd91:X::Y, :func:`v6`) with the same routes and the same
silent router (``ip6tables``). Needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .linkemu import Direction
from .netlab import LINKEMU, ROOT, LabError, _delete_ns, _ip, namespaces, sweep_stale

PREFIX = "epD-"
CLIENT, R1, R2A, R2B, R3, R4, SERVER = (
    "10.91.1.2",
    "10.91.1.1",
    "10.91.2.2",
    "10.91.3.2",
    "10.91.6.1",
    "10.91.6.2",
    "10.91.7.2",
)
R2A_FAR, R2B_FAR = "10.91.4.1", "10.91.5.1"
MAC_R3, MAC_R4 = "02:00:00:91:06:01", "02:00:00:91:06:02"
EXPECTED = [R1, R2A, None, R4, SERVER]  # hop addresses c -> s without ECMP (None: silent)
_counter = 0


def v6(text: str) -> str:
    """The lab's IPv6 twin of an IPv4 address, prefix or word: 10.91.X.Y → fd91:X::Y (/24 → /64)."""
    if not text.startswith("10.91."):
        return text
    address, _, length = text.partition("/")
    _, _, x, y = address.split(".")
    twin = f"fd91:{x}::{y}" if y != "0" else f"fd91:{x}::"
    return twin + ("/64" if length else "")


def sweep() -> list[str]:
    return sweep_stale(PREFIX)


class TraceLab:
    def __init__(self) -> None:
        global _counter
        _counter += 1
        base = f"{PREFIX}{os.getpid()}-{_counter}"
        self.ns = {role: f"{base}-{role}" for role in ("c", "r1", "r2a", "r2b", "r3", "l", "r4", "s")}
        self._emu: subprocess.Popen[str] | None = None
        self.delay_ms = 0.0
        self.ecmp = False
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def __getitem__(self, role: str) -> str:
        return self.ns[role]

    def _veth(self, a: str, a_dev: str, b: str, b_dev: str, *, mac_a: str = "", mac_b: str = "") -> None:
        args = ["link", "add", a_dev]
        if mac_a:
            args += ["address", mac_a]
        args += ["netns", self.ns[a], "type", "veth", "peer", "name", b_dev]
        if mac_b:
            args += ["address", mac_b]
        _ip(*args, "netns", self.ns[b])

    def _addr(self, role: str, dev: str, cidr: str) -> None:
        _ip("-n", self.ns[role], "addr", "add", cidr, "dev", dev)
        _ip("-n", self.ns[role], "addr", "add", v6(cidr), "dev", dev, "nodad")
        _ip("-n", self.ns[role], "link", "set", dev, "up")

    def _route(self, role: str, *args: str) -> None:
        """The IPv4 route and its IPv6 twin (fd91:X::Y for 10.91.X.Y; a /22 becomes its four /64s)."""
        _ip("-n", self.ns[role], "route", "replace", *args)
        nets = (
            [args[0]]
            if args[0] == "default" or not args[0].endswith("/22")
            else [f"10.91.{int(args[0].split('.')[2]) + i}.0/24" for i in range(4)]
        )
        for net in nets:
            _ip("-n", self.ns[role], "-6", "route", "replace", *(v6(a) for a in (net, *args[1:])))

    def _build(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        self._veth("c", "e0", "r1", "e0")
        self._veth("r1", "ea", "r2a", "e0")
        self._veth("r1", "eb", "r2b", "e0")
        self._veth("r2a", "e1", "r3", "ea")
        self._veth("r2b", "e1", "r3", "eb")
        self._veth("r3", "e1", "l", "ra", mac_a=MAC_R3)
        self._veth("l", "rb", "r4", "e0", mac_b=MAC_R4)
        self._veth("r4", "e1", "s", "e0")
        for role, dev, cidr in (
            ("c", "e0", "10.91.1.2/24"),
            ("r1", "e0", "10.91.1.1/24"),
            ("r1", "ea", "10.91.2.1/24"),
            ("r1", "eb", "10.91.3.1/24"),
            ("r2a", "e0", "10.91.2.2/24"),
            ("r2a", "e1", "10.91.4.1/24"),
            ("r2b", "e0", "10.91.3.2/24"),
            ("r2b", "e1", "10.91.5.1/24"),
            ("r3", "ea", "10.91.4.2/24"),
            ("r3", "eb", "10.91.5.2/24"),
            ("r3", "e1", "10.91.6.1/24"),
            ("r4", "e0", "10.91.6.2/24"),
            ("r4", "e1", "10.91.7.1/24"),
            ("s", "e0", "10.91.7.2/24"),
        ):
            self._addr(role, dev, cidr)
        for dev in ("ra", "rb"):
            _ip("-n", self.ns["l"], "link", "set", dev, "promisc", "on")
            _ip("-n", self.ns["l"], "link", "set", dev, "up")
        for a, b in ((R4, R3), (v6(R4), v6(R3))):
            _ip("-n", self.ns["r3"], "neigh", "replace", a, "lladdr", MAC_R4, "dev", "e1", "nud", "permanent")
            _ip("-n", self.ns["r4"], "neigh", "replace", b, "lladdr", MAC_R3, "dev", "e0", "nud", "permanent")
        for role in ("c", "r1", "r2a", "r2b", "r3", "r4", "s"):
            for key, value in (
                ("net.ipv4.icmp_ratelimit", "0"),
                ("net.ipv6.icmp.ratelimit", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.accept_ra", "0"),
            ):
                self.sysctl(role, key, value)
            if role not in ("c", "s"):
                self.sysctl(role, "net.ipv4.ip_forward", "1")
                self.sysctl(role, "net.ipv6.conf.all.forwarding", "1")
        self.sysctl("l", "net.ipv6.conf.all.disable_ipv6", "1")
        self.sysctl("r1", "net.ipv4.fib_multipath_hash_policy", "1")
        self.sysctl("r1", "net.ipv6.fib_multipath_hash_policy", "1")
        self._route("c", "default", "via", R1)
        self._route("r2a", "default", "via", "10.91.4.2")
        self._route("r2a", "10.91.1.0/24", "via", "10.91.2.1")
        self._route("r2b", "default", "via", "10.91.5.2")
        self._route("r2b", "10.91.1.0/24", "via", "10.91.3.1")
        for net in ("10.91.1.0/24", "10.91.2.0/24"):
            self._route("r3", net, "via", R2A_FAR)
        self._route("r3", "10.91.3.0/24", "via", R2B_FAR)
        self._route("r3", "10.91.7.0/24", "via", R4)
        self._route("r4", "default", "via", R3)
        self._route("s", "default", "via", "10.91.7.1")
        self.set_ecmp(False)
        for rule in (
            ["iptables", "-w", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "time-exceeded", "-j", "DROP"],
            ["ip6tables", "-w", "-A", "OUTPUT", "-p", "icmpv6", "--icmpv6-type", "time-exceeded", "-j", "DROP"],
        ):
            proc = self.run("r3", rule)
            if proc.returncode != 0:
                raise LabError(f"{rule[0]} in r3: {proc.stderr.strip()}")
        for role, devs in (("r3", ["e1"]), ("l", ["ra", "rb"]), ("r4", ["e0"])):
            proc = self.run(role, [sys.executable, str(LINKEMU), "offload-off", *devs])
            if proc.returncode != 0:
                raise LabError(f"offload-off in {role}: {proc.stderr.strip()}")
        self.set_delay(0.0)
        for address in (SERVER, v6(SERVER)):  # neighbours resolved on every link before anything is measured
            proc = self.run("c", ["ping", "-n", "-q", "-c", "1", "-W", "5", address])
            if proc.returncode != 0:
                raise LabError(f"ping {address} from c: {proc.stdout.strip()} {proc.stderr.strip()}")

    def sysctl(self, role: str, key: str, value: str) -> None:
        proc = self.run(role, ["sysctl", "-qw", f"{key}={value}"])
        if proc.returncode != 0:
            raise LabError(f"sysctl {key}={value} in {role}: {proc.stderr.strip()}")

    def set_ecmp(self, on: bool) -> None:
        """r1's route to r3 and beyond: via r2a only, or split over r2a and r2b."""
        self.ecmp = on
        hops = ["nexthop", "via", R2A, "nexthop", "via", R2B] if on else ["via", R2A]
        self._route("r1", "10.91.4.0/22", *hops)

    def route_via(self, which: str) -> None:
        """r1 sends everything beyond through r2a or r2b alone (a path change)."""
        self.ecmp = False
        self._route("r1", "10.91.4.0/22", "via", R2A if which == "a" else R2B)

    def set_delay(self, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """(Re)start the emulated r3–r4 link with this one-way delay each way."""
        self.stop_link()
        d = Direction(delay_ms=delay_ms, jitter_ms=jitter_ms)
        config = {"if_a": "ra", "if_b": "rb", "a_to_b": asdict(d), "b_to_a": asdict(d), "seed": 1, "spin_us": 300.0}
        argv = [sys.executable, str(LINKEMU), "run", "--stdin-control", "--config", json.dumps(config)]
        emu = subprocess.Popen(
            ["ip", "netns", "exec", self.ns["l"], *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert emu.stdout is not None
        line = emu.stdout.readline()
        if not line.startswith("ready"):
            err = emu.stderr.read() if emu.stderr else ""
            emu.wait(timeout=10)
            raise LabError(f"link emulator did not start: {line.strip()} {err.strip()}")
        self._emu, self.delay_ms = emu, delay_ms

    def stop_link(self) -> None:
        emu, self._emu = self._emu, None
        if emu is None:
            return
        assert emu.stdin is not None
        with contextlib.suppress(OSError):
            emu.stdin.close()
        try:
            emu.wait(timeout=30)
        except subprocess.TimeoutExpired:
            emu.kill()
            emu.wait(timeout=10)
        for pipe in (emu.stdout, emu.stderr):
            if pipe:
                pipe.close()

    def run(self, role: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(["ip", "netns", "exec", self.ns[role], *argv], check=False, **kwargs)

    def python(self, role: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("cwd", str(ROOT))
        return self.run(role, [sys.executable, *args], **kwargs)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_link()
        present = set(namespaces())
        for ns in self.ns.values():
            if ns in present:
                _delete_ns(ns)

    def __enter__(self) -> TraceLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def traceroute_problem() -> str | None:
    return None if shutil.which("traceroute") else "needs Debian's traceroute (apt-get install traceroute)"


def parse_traceroute(text: str) -> list[list[str | None]]:
    """``traceroute -n`` output → per hop the addresses that answered each query (None: ``*``)."""
    hops: list[list[str | None]] = []
    for line in text.splitlines()[1:]:
        words = line.split()
        if not words or not words[0].isdigit():
            continue
        queries: list[str | None] = []
        current: str | None = None
        i = 1
        while i < len(words):
            w = words[i]
            if w == "*":
                queries.append(None)
            elif i + 1 < len(words) and words[i + 1] == "ms":
                queries.append(current)
                i += 1
            elif w.count(".") == 3 or ":" in w:
                current = w
            i += 1
        hops.append(queries)
    return hops


def traceroute_rtts(text: str) -> list[list[float | None]]:
    """``traceroute -n`` output → per hop the RTT of each query in ms (None: ``*``)."""
    hops: list[list[float | None]] = []
    for line in text.splitlines()[1:]:
        words = line.split()
        if not words or not words[0].isdigit():
            continue
        rtts: list[float | None] = []
        for i, w in enumerate(words[1:], start=1):
            if w == "*":
                rtts.append(None)
            elif i + 1 < len(words) and words[i + 1] == "ms":
                rtts.append(float(w))
        hops.append(rtts)
    return hops
