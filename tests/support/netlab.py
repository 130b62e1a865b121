"""A WAN lab from Linux network namespaces: two hosts joined by a link with a known delay, jitter and loss.

Topology (all names carry :data:`PREFIX`, the creating process id and a counter)::

    ns "a" (client)            ns "l" (link)                  ns "b" (server)
    lab0 10.77.0.1/24  ─veth─  ra ═[ a_to_b / b_to_a ]═ rb  ─veth─  lab0 10.77.0.2/24
         fd77::1/64                                                      fd77::2/64

The addresses exist only inside these namespaces, which have no route anywhere else: nothing
leaves them. Neighbours are static (no ARP/ND on the link), IPv6 addresses skip DAD, and the
link namespace has no addresses at all: it only carries frames between ``ra`` and ``rb``.

The link is either the kernel's ``netem`` (a bridge in the link namespace with a netem qdisc on
each port's egress) when the kernel has it, or the product's userspace emulator
(:mod:`edgeprobe.lab.linkemu`)
(``AF_PACKET`` sockets with kernel receive timestamps, a timerfd and a heap), which also logs
each frame's true holding time. ``EDGEPROBE_LAB_LINK=userspace|netem`` forces one.

Needs root. Everything created is removed by :meth:`Lab.destroy` (namespaces, and with them the
devices; every process still inside them is killed by pid); :func:`sweep_stale` removes what a
crashed run left behind (namespaces whose creating process is gone).

The namespace plumbing (``ip``, emptying and deleting namespaces, the netem check) and the link
emulator are the product's (:mod:`edgeprobe.lab`); this module keeps only the tests' two-host lab.
Its names are ``eplab-<pid>-…`` (digits after the prefix); ``edgeprobe lab`` names its labs with a
letter first, so neither ever sweeps the other's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeprobe.lab import linkemu
from edgeprobe.lab.linkemu import Direction
from edgeprobe.lab.netns import LabError, delete_ns, namespaces
from edgeprobe.lab.netns import ip as _ip
from edgeprobe.lab.netns import netem_available as _netem_available

PREFIX = "eplab-"
A4, B4 = "10.77.0.1", "10.77.0.2"
A6, B6 = "fd77::1", "fd77::2"
MAC_A, MAC_B = "02:00:00:77:00:01", "02:00:00:77:00:02"
LINKEMU = Path(linkemu.__file__)
ROOT = Path(__file__).resolve().parents[2]
NEEDS_ROOT = "needs root for network namespaces"

_counter = 0


def lab_problem() -> str | None:
    """None when this process can build labs, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) for network namespaces"
    return None


def _delete_ns(ns: str) -> None:
    delete_ns(ns)


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete lab namespaces left by processes that no longer exist; returns their names."""
    swept = []
    for ns in namespaces():
        if not ns.startswith(prefix):
            continue
        pid = ns[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue  # not a test lab (`edgeprobe lab` names start with a letter), or its creator lives
        _delete_ns(ns)
        swept.append(ns)
    return swept


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (the product's check, in a namespace of ours)."""
    return _netem_available(f"{PREFIX}{os.getpid()}-0-probe")


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One frame's fate in the userspace link (times are wall-clock ns)."""

    dir: int  # 0: a → b, 1: b → a
    rx_ns: int  # kernel receive timestamp at the link
    due_ns: int  # -1 when lost
    tx_ns: int  # just before the write out of the other port; -1 when lost or not sendable
    len: int
    proto: str  # icmp, icmp6, tcp, udp, other
    type: int  # ICMP type / TCP flags
    ident: int  # ICMP identifier / source port
    seq: int  # ICMP sequence / destination port

    @property
    def lost(self) -> bool:
        return self.due_ns < 0

    @property
    def hold_ns(self) -> int:
        """How long the link held the frame (from the kernel's receive stamp to the write)."""
        return self.tx_ns - self.rx_ns

    @property
    def late_ns(self) -> int:
        """How much later than due the frame left: the emulator's own error."""
        return self.tx_ns - self.due_ns


@dataclass
class LinkLog:
    records: list[FrameRecord]
    send_errors: int = 0
    realtime: bool = False

    def echoes(self, *, ipv6: bool = False) -> list[tuple[FrameRecord, FrameRecord | None]]:
        """Echo requests a → b in order, each with the reply b → a that carried its id and seq (or None)."""
        proto = "icmp6" if ipv6 else "icmp"
        req_type, rep_type = (128, 129) if ipv6 else (8, 0)
        replies: dict[tuple[int, int], list[FrameRecord]] = {}
        for r in self.records:
            if r.proto == proto and r.dir == 1 and r.type == rep_type:
                replies.setdefault((r.ident, r.seq), []).append(r)
        out: list[tuple[FrameRecord, FrameRecord | None]] = []
        for r in self.records:
            if r.proto == proto and r.dir == 0 and r.type == req_type:
                later = [x for x in replies.get((r.ident, r.seq), []) if x.rx_ns >= r.rx_ns and not x.lost]
                out.append((r, later[0] if later and not r.lost else None))
        out.sort(key=lambda pair: pair[0].rx_ns)
        return out


class Lab:
    """One client–link–server lab. Use as a context manager, or call :meth:`destroy`."""

    def __init__(self, *, mode: str | None = None) -> None:
        global _counter
        _counter += 1
        base = f"{PREFIX}{os.getpid()}-{_counter}"
        self.ns_a, self.ns_link, self.ns_b = f"{base}-a", f"{base}-l", f"{base}-b"
        wanted = mode or os.environ.get("EDGEPROBE_LAB_LINK", "auto")
        if wanted not in ("auto", "userspace", "netem"):
            raise LabError(f"EDGEPROBE_LAB_LINK: expected auto, userspace or netem, got {wanted!r}")
        self.mode = ("netem" if netem_available() else "userspace") if wanted == "auto" else wanted
        self._emu: subprocess.Popen[str] | None = None
        self._emu_log: Path | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="eplab-"))
        self.a_to_b = Direction()
        self.b_to_a = Direction()
        self.seed = 1
        self.spin_us = 300.0
        self.realtime = False
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    # ------------------------------------------------------------ building

    def _build(self) -> None:
        a, link, b = self.ns_a, self.ns_link, self.ns_b
        for ns in (a, link, b):
            _ip("netns", "add", ns)
        _ip("link", "add", "lab0", "address", MAC_A, "netns", a, "type", "veth", "peer", "name", "ra", "netns", link)
        _ip("link", "add", "lab0", "address", MAC_B, "netns", b, "type", "veth", "peer", "name", "rb", "netns", link)
        self.sysctl(link, "net.ipv6.conf.all.disable_ipv6", "1")
        self.sysctl(link, "net.ipv6.conf.default.disable_ipv6", "1")
        for ns in (a, b):
            self.sysctl(ns, "net.ipv6.conf.all.accept_ra", "0")
            self.sysctl(ns, "net.ipv6.conf.default.accept_ra", "0")
            self.sysctl(ns, "net.ipv6.conf.lab0.router_solicitations", "0")
        self._offload_off(a, "lab0")
        self._offload_off(b, "lab0")
        self._offload_off(link, "ra", "rb")
        for ns, me4, me6, peer4, peer6, peer_mac in ((a, A4, A6, B4, B6, MAC_B), (b, B4, B6, A4, A6, MAC_A)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{me4}/24", "dev", "lab0")
            _ip("-n", ns, "addr", "add", f"{me6}/64", "dev", "lab0", "nodad")
            _ip("-n", ns, "link", "set", "lab0", "up")
            _ip("-n", ns, "neigh", "replace", peer4, "lladdr", peer_mac, "dev", "lab0", "nud", "permanent")
            _ip("-n", ns, "neigh", "replace", peer6, "lladdr", peer_mac, "dev", "lab0", "nud", "permanent")
        _ip("-n", link, "link", "set", "lo", "up")
        for dev in ("ra", "rb"):
            _ip("-n", link, "link", "set", dev, "promisc", "on")
            _ip("-n", link, "link", "set", dev, "up")
        if self.mode == "netem":
            _ip("-n", link, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            for dev in ("ra", "rb"):
                _ip("-n", link, "link", "set", dev, "master", "br0")
            _ip("-n", link, "link", "set", "br0", "up")
        self.set_link(Direction(), Direction(), log=False)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Set a per-namespace sysctl (``net.*``) inside the lab namespace ``ns``."""
        proc = self.run(ns, ["sysctl", "-qw", f"{key}={value}"])
        if proc.returncode != 0:
            raise LabError(f"sysctl {key}={value} in {ns}: {proc.stderr.strip()}")

    def _offload_off(self, ns: str, *devices: str) -> None:
        proc = self.run(ns, [sys.executable, str(LINKEMU), "offload-off", *devices])
        if proc.returncode != 0:
            raise LabError(f"offload-off {devices} in {ns}: {proc.stderr.strip()}")

    # ------------------------------------------------------------ the link

    def set_link(
        self,
        a_to_b: Direction,
        b_to_a: Direction | None = None,
        *,
        seed: int = 1,
        log: bool = True,
        spin_us: float = 300.0,
    ) -> LinkLog | None:
        """(Re)configure the link; ``b_to_a`` defaults to the same as ``a_to_b``.

        Returns the log of the previous userspace configuration (None with netem or without a log).
        """
        b_to_a = a_to_b if b_to_a is None else b_to_a
        previous = self.stop_link()
        self.a_to_b, self.b_to_a = a_to_b, b_to_a
        self.seed, self.spin_us = seed, spin_us
        if self.mode == "netem":
            for dev, d in (("rb", a_to_b), ("ra", b_to_a)):
                args = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "limit", "100000"]
                args += ["delay", f"{d.delay_ms}ms"]
                if d.jitter_ms:
                    args += [f"{d.jitter_ms}ms"]
                if d.loss_ratio:
                    args += ["loss", f"{d.loss_ratio * 100}%"]
                proc = self.run(self.ns_link, args)
                if proc.returncode != 0:
                    raise LabError(f"{' '.join(args)}: {proc.stderr.strip()}")
            return previous
        config = {
            "if_a": "ra",
            "if_b": "rb",
            "a_to_b": asdict(a_to_b),
            "b_to_a": asdict(b_to_a),
            "seed": seed,
            "spin_us": spin_us,
        }
        argv = [sys.executable, str(LINKEMU), "run", "--stdin-control", "--config", json.dumps(config)]
        self._emu_log = None
        if log:
            self._emu_log = self._tmp / f"link-{time.monotonic_ns()}.jsonl"
            argv += ["--log", str(self._emu_log)]
        emu = subprocess.Popen(
            self.exec_args(self.ns_link) + argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._emu = emu
        assert emu.stdout is not None
        line = emu.stdout.readline()  # "ready realtime=N", or EOF when it failed
        if not line.startswith("ready"):
            err = emu.stderr.read() if emu.stderr else ""
            self._emu = None
            emu.wait(timeout=10)
            raise LabError(f"link emulator did not start: {line.strip()} {err.strip()}")
        self.realtime = line.strip().endswith("realtime=1")
        return previous

    def take_log(self) -> LinkLog | None:
        """The log of everything since the link was last (re)started; the link restarts as it was."""
        return self.set_link(self.a_to_b, self.b_to_a, seed=self.seed, spin_us=self.spin_us)

    def stop_link(self) -> LinkLog | None:
        """Stop the userspace emulator (if running) and return its log (when it kept one)."""
        emu, self._emu = self._emu, None
        if emu is None:
            return None
        assert emu.stdin is not None
        with contextlib.suppress(OSError):
            emu.stdin.close()
        try:
            emu.wait(timeout=30)
        except subprocess.TimeoutExpired:
            emu.kill()
            emu.wait(timeout=10)
        if emu.stdout:
            emu.stdout.close()
        if emu.stderr:
            emu.stderr.close()
        path, self._emu_log = self._emu_log, None
        if path is None or not path.exists():
            return None
        return read_log(path)

    # ------------------------------------------------------------ running things inside

    def exec_args(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 300)
        return subprocess.run(self.exec_args(ns) + list(argv), check=False, **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("text", True)
        return subprocess.Popen(self.exec_args(ns) + list(argv), **kwargs)

    def python(self, ns: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run this interpreter with ``args`` inside ``ns``, from the repository root."""
        kwargs.setdefault("cwd", str(ROOT))
        return self.run(ns, [sys.executable, *args], **kwargs)

    # ------------------------------------------------------------ teardown

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_link()
        for ns in (self.ns_a, self.ns_link, self.ns_b):
            if ns in namespaces():
                _delete_ns(ns)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def read_log(path: Path) -> LinkLog:
    lines = path.read_text(encoding="ascii").splitlines()
    head = json.loads(lines[0]) if lines else {}
    records = [FrameRecord(**json.loads(line)) for line in lines[1:]]
    return LinkLog(records, send_errors=int(head.get("send_errors", 0)), realtime=bool(head.get("realtime")))


@contextlib.contextmanager
def lab(mode: str | None = None) -> Iterator[Lab]:
    with Lab(mode=mode) as made:
        yield made
