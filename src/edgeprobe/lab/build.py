"""Bring a :class:`~edgeprobe.lab.topology.Topology` up as network namespaces on this host, and down.

Layout (``<lab>`` is the topology's name)::

    eplab-<lab>-n-<node>   one namespace per node: its address on lo (/32), one interface e<i> per
                           link i, a /32 route to every other node it can reach (via the first hop
                           of the least-delay path), static neighbours; routers forward.
    eplab-<lab>-l<i>       one namespace per link with a delay: its two ports a and b joined by the
                           kernel's netem (a bridge, a netem qdisc on each port's egress) where the
                           kernel has it, else by the userspace emulator (:mod:`edgeprobe.lab.linkemu`).

A link without delay, jitter or loss is a plain veth pair between the two node namespaces. No
device, address or route is ever made in the host's namespace, and nothing is routed out of the
lab: its addresses exist only inside its namespaces.

``down`` finds everything by the name prefix, so it also cleans up after a crash: it kills every
process still inside the lab's namespaces (emulators, agents, responders) and deletes them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from edgeprobe.lab import linkemu
from edgeprobe.lab.netns import (
    LabError,
    delete_ns,
    in_netns,
    ip,
    lab_problem,
    namespaces,
    netem_available,
    sysctl_in,
)
from edgeprobe.lab.topology import PREFIX, Link, Topology

STATE_DIR: Final = Path("/run/edgeprobe-lab")
LINKEMU_PATH: Final = Path(linkemu.__file__)
MODES: Final = ("auto", "userspace", "netem")
CALIBRATION_PINGS: Final = 20
_LAB_OF_NS: Final = re.compile(rf"^{re.escape(PREFIX)}([a-z][a-z0-9]*)-(?:n-|l\d|probe)")


@dataclass(frozen=True, slots=True)
class LinkCheck:
    """One emulated link's round trip measured with ping right after ``up``."""

    link: int
    a: str
    b: str
    expected_rtt_ms: float
    measured_avg_ms: float | None
    measured_min_ms: float | None

    @property
    def added_ms(self) -> float | None:
        """What the emulator (and the kernel's path) added to the configured round trip."""
        return None if self.measured_avg_ms is None else self.measured_avg_ms - self.expected_rtt_ms


@dataclass(frozen=True, slots=True)
class Accuracy:
    """The link emulator's own added round-trip delay, measured on this lab's links."""

    links: int
    added_p50_ms: float
    added_max_ms: float

    def sentence(self, mode: str) -> str:
        what = "the kernel's netem" if mode == "netem" else "the userspace link emulator (this kernel has no netem)"
        return (
            f"links: {what}; measured on {self.links} link(s) with ping: it adds {self.added_p50_ms:+.3f} ms "
            f"per round trip (median), {self.added_max_ms:+.3f} ms at most, to the configured delay"
        )


@dataclass
class UpResult:
    mode: str
    namespaces: list[str]
    checks: list[LinkCheck]
    accuracy: Accuracy | None


def lab_of_namespace(ns: str) -> str | None:
    """The ``edgeprobe lab`` lab a namespace belongs to (None: not one of ours, e.g. a test's)."""
    m = _LAB_OF_NS.match(ns)
    return m.group(1) if m else None


def labs_up() -> dict[str, list[str]]:
    """Lab name → its namespaces, for every lab on this host (found by prefix)."""
    out: dict[str, list[str]] = {}
    for ns in namespaces():
        if (lab := lab_of_namespace(ns)) is not None:
            out.setdefault(lab, []).append(ns)
    return out


def choose_mode(wanted: str, lab: str) -> str:
    if wanted not in MODES:
        raise LabError(f"link mode: expected one of {', '.join(MODES)}, got {wanted!r}")
    if wanted != "auto":
        return wanted
    return "netem" if netem_available(f"{PREFIX}{lab}-probe") else "userspace"


def mac(link: int, side: int) -> str:
    return f"02:e1:{link >> 8 & 0xFF:02x}:{link & 0xFF:02x}:00:{side:02x}"


def state_path(lab: str) -> Path:
    return STATE_DIR / f"{lab}.json"


def up(topo: Topology, mode: str = "auto", *, calibrate: bool = True) -> UpResult:
    """Build the lab; on any failure, remove what was made and raise :class:`LabError`."""
    if (why := lab_problem()) is not None:
        raise LabError(why)
    if topo.name in labs_up():
        raise LabError(f"a lab named {topo.name!r} is already up: edgeprobe lab down {topo.name} first")
    chosen = choose_mode(os.environ.get("EDGEPROBE_LAB_LINK", mode) if mode == "auto" else mode, topo.name)
    try:
        made = _build(topo, chosen)
        _write_state(topo, chosen)
        checks = measure_links(topo) if calibrate else []
    except BaseException:
        down(topo.name)
        raise
    return UpResult(chosen, made, checks, accuracy_of(checks))


def _build(topo: Topology, mode: str) -> list[str]:
    made: list[str] = []
    for node in topo.nodes.values():
        ns = topo.node_ns(node.name)
        ip("netns", "add", ns)
        made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{node.address}/32", "dev", "lo")
        sysctl_in(
            ns,
            {
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                "net.ipv4.ip_forward": "1" if node.role == "router" else "0",
                "net.ipv4.ping_group_range": "0 2147483647",
            },
        )
    for link in topo.links:
        made += _build_link(topo, link, mode)
    for node in topo.nodes.values():
        ns = topo.node_ns(node.name)
        for dst, hop in sorted(topo.routes(node.name).items()):
            dev = f"e{hop.link}"
            addr = topo.nodes[dst].address
            if dst == hop.via:
                ip("-n", ns, "route", "replace", f"{addr}/32", "dev", dev, "src", node.address)
            else:
                via = topo.nodes[hop.via].address
                ip("-n", ns, "route", "replace", f"{addr}/32", "via", via, "dev", dev, "onlink", "src", node.address)
    return made


def _build_link(topo: Topology, link: Link, mode: str) -> list[str]:
    dev = f"e{link.index}"
    ns_a, ns_b = topo.node_ns(link.a), topo.node_ns(link.b)
    made: list[str] = []
    if not link.emulated:
        ip("link", "add", dev, "address", mac(link.index, 1), "netns", ns_a,
           "type", "veth", "peer", "name", dev, "address", mac(link.index, 2), "netns", ns_b)  # fmt: skip
    else:
        ns_l = topo.link_ns(link)
        ip("netns", "add", ns_l)
        made.append(ns_l)
        for side, ns, port in ((1, ns_a, "pa"), (2, ns_b, "pb")):
            ip("link", "add", dev, "address", mac(link.index, side), "netns", ns,
               "type", "veth", "peer", "name", port, "netns", ns_l)  # fmt: skip
            in_netns(ns, functools.partial(linkemu.offload_off, dev))
        sysctl_in(ns_l, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"})
        ip("-n", ns_l, "link", "set", "lo", "up")
        for port in ("pa", "pb"):
            in_netns(ns_l, functools.partial(linkemu.offload_off, port))
            ip("-n", ns_l, "link", "set", port, "promisc", "on")
            ip("-n", ns_l, "link", "set", port, "up")
        if mode == "netem":
            _netem(ns_l, link)
        else:
            _start_emulator(topo, link, ns_l)
    for side, ns, peer in ((1, ns_a, topo.nodes[link.b]), (2, ns_b, topo.nodes[link.a])):
        ip("-n", ns, "link", "set", dev, "up")
        peer_mac = mac(link.index, 3 - side)
        ip("-n", ns, "neigh", "replace", peer.address, "lladdr", peer_mac, "dev", dev, "nud", "permanent")
    return made


def _netem(ns_l: str, link: Link) -> None:
    ip("-n", ns_l, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
    for port in ("pa", "pb"):
        ip("-n", ns_l, "link", "set", port, "master", "br0")
    ip("-n", ns_l, "link", "set", "br0", "up")
    for port in ("pa", "pb"):
        args = ["tc", "qdisc", "replace", "dev", port, "root", "netem", "limit", "100000"]
        args += ["delay", f"{link.delay_ms:.6f}ms"]
        if link.jitter_ms:
            args += [f"{link.jitter_ms:.6f}ms"]
        if link.loss_ratio:
            args += ["loss", f"{link.loss_ratio * 100}%"]
        proc = subprocess.run(["ip", "netns", "exec", ns_l, *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise LabError(f"{' '.join(args)} in {ns_l}: {proc.stderr.strip()}")


def _start_emulator(topo: Topology, link: Link, ns_l: str) -> None:
    d = {"delay_ms": link.delay_ms, "jitter_ms": link.jitter_ms, "loss_ratio": link.loss_ratio}
    config = {"if_a": "pa", "if_b": "pb", "a_to_b": d, "b_to_a": d, "seed": link.index + 1, "spin_us": 300.0}
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = STATE_DIR / f"{topo.name}-l{link.index}.log"
    with open(log, "w", encoding="utf-8") as err:
        emu = subprocess.Popen(
            ["ip", "netns", "exec", ns_l, sys.executable, str(LINKEMU_PATH), "run", "--config", json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # outlives `edgeprobe lab up`; `lab down` kills it inside its namespace
        )
    assert emu.stdout is not None
    line = emu.stdout.readline()
    emu.stdout.close()
    if not line.startswith("ready"):
        emu.wait(timeout=10)
        raise LabError(f"link emulator for links[{link.index}] did not start: {log.read_text(errors='replace')[-500:]}")


def _write_state(topo: Topology, mode: str) -> None:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = {
        "name": topo.name,
        "source": topo.source,
        "mode": mode,
        "sites": {k: asdict(v) for k, v in topo.sites.items()},
        "nodes": {k: {**asdict(v), "namespace": topo.node_ns(k)} for k, v in topo.nodes.items()},
        "links": [{**asdict(lk), "emulated": lk.emulated} for lk in topo.links],
    }
    state_path(topo.name).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")


def read_state(lab: str) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(lab).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def down(lab: str | None = None) -> list[str]:
    """Remove the lab ``lab`` (None: every lab on this host) and return the namespaces deleted."""
    labs = labs_up()
    names = list(labs) if lab is None else [lab]
    removed: list[str] = []
    for name in names:
        nss = labs.get(name, [])
        # Links first: their emulators stop forwarding before the nodes go.
        for ns in sorted(nss, key=lambda n: "-n-" in n):
            delete_ns(ns)
            removed.append(ns)
        with contextlib.suppress(OSError):
            state_path(name).unlink()
        for log in STATE_DIR.glob(f"{name}-l*.log") if STATE_DIR.exists() else []:
            with contextlib.suppress(OSError):
                log.unlink()
    return removed


def exec_args(lab: str, node: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``node`` of ``lab``."""
    ns = f"{PREFIX}{lab}-n-{node}"
    if ns not in namespaces():
        raise LabError(f"no node {node!r} in lab {lab!r} (edgeprobe lab ls shows the nodes)")
    return ["ip", "netns", "exec", ns, *argv]


# ---------------------------------------------------------------- measuring what was built

_PING_SUMMARY: Final = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping_summary(text: str) -> tuple[float, float] | None:
    """(min, avg) in ms from iputils ping's ``rtt min/avg/max/mdev = …`` line (None: no reply)."""
    m = _PING_SUMMARY.search(text)
    return None if m is None else (float(m.group(1)), float(m.group(2)))


def ping_many(
    topo: Topology, pairs: Iterable[tuple[str, str]], count: int = CALIBRATION_PINGS, interval_s: float = 0.01
) -> dict[tuple[str, str], tuple[float, float] | None]:
    """Ping from each node to the other's address (all pairs at once); (min, avg) ms or None."""
    procs = {}
    for a, b in pairs:
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval_s}", "-W", "3", topo.nodes[b].address]
        procs[(a, b)] = subprocess.Popen(
            ["ip", "netns", "exec", topo.node_ns(a), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    out: dict[tuple[str, str], tuple[float, float] | None] = {}
    for pair, proc in procs.items():
        text, _ = proc.communicate(timeout=60)
        out[pair] = parse_ping_summary(text)
    return out


def measure_links(topo: Topology) -> list[LinkCheck]:
    """Ping across every emulated link without jitter or loss that is its ends' route both ways
    (there the truth is exact: twice the configured delay)."""
    chosen = [
        lk
        for lk in topo.links
        if lk.emulated
        and lk.jitter_ms == 0
        and lk.loss_ratio == 0
        and topo.path(lk.a, lk.b) == [lk]
        and topo.path(lk.b, lk.a) == [lk]
    ]
    results = ping_many(topo, [(lk.a, lk.b) for lk in chosen])
    checks = []
    for lk in chosen:
        got = results[(lk.a, lk.b)]
        expected = topo.expected_rtt_ms(lk.a, lk.b) or 0.0
        checks.append(LinkCheck(lk.index, lk.a, lk.b, expected, got[1] if got else None, got[0] if got else None))
    return checks


def accuracy_of(checks: Sequence[LinkCheck]) -> Accuracy | None:
    added = [c.added_ms for c in checks if c.added_ms is not None]
    if not added:
        return None
    return Accuracy(len(added), statistics.median(added), max(added))
