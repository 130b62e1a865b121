"""Network-namespace plumbing for labs: ``ip`` calls, finding, emptying and deleting namespaces.

Everything a lab makes lives inside namespaces it created (named with a prefix it can find), so
deleting those namespaces — after killing every process still inside them — removes all of it:
devices, addresses, routes, emulators, agents. Nothing here changes the host's own namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

T = TypeVar("T")

CLONE_NEWNET: Final = 0x40000000
CAP_NET_ADMIN: Final = 12
CAP_SYS_ADMIN: Final = 21
NETNS_DIR: Final = "/run/netns"
NEEDS_PRIVILEGE: Final = "needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"


class LabError(RuntimeError):
    """Building, using or removing a lab failed; the message says what and where."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _effective_caps(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privilege_problem(status_text: str | None = None) -> str | None:
    """None when this process may create namespaces (effective CAP_NET_ADMIN and CAP_SYS_ADMIN, as
    root has), else why not (one line). ``status_text``: /proc/self/status (read when None)."""
    if status_text is None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                status_text = fh.read()
        except OSError:
            return NEEDS_PRIVILEGE
    caps = _effective_caps(status_text)
    if caps >> CAP_NET_ADMIN & 1 and caps >> CAP_SYS_ADMIN & 1:
        return None
    return NEEDS_PRIVILEGE


def lab_problem() -> str | None:
    """None when labs can be built here, else why not (a one-line error or a test's skip reason)."""
    if (why := privilege_problem()) is not None:
        return why
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) for network namespaces"
    return None


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]


def kill_inside(ns: str, timeout_s: float = 2.0) -> None:
    """SIGKILL every process inside the namespace ``ns`` until none is left (best effort, bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = pids_in(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def delete_ns(ns: str) -> None:
    kill_inside(ns)
    ip("netns", "delete", ns, check=False)


def host_networks() -> dict[str, list[str]]:
    """The host namespace's interfaces and their IPv4 networks (for topology validation)."""
    proc = ip("-j", "-4", "addr", "show", check=False)
    try:
        data = json.loads(proc.stdout or "[]")
    except ValueError:
        return {}
    out: dict[str, list[str]] = {}
    for link in data if isinstance(data, list) else []:
        name = str(link.get("ifname", "?"))
        for a in link.get("addr_info", []) or []:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
                out.setdefault(name, []).append(str(net))
    return out


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that has entered namespace ``ns``; sockets it creates stay in ``ns``.

    (A network namespace is per thread: the caller's own threads are not moved.)
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(Path(NETNS_DIR) / ns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise LabError(f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    t = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def listen_in(ns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host:port`` inside namespace ``ns`` (non-blocking)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    return in_netns(ns, make)


def sysctl_in(ns: str, settings: dict[str, str]) -> None:
    """Set per-namespace ``net.*`` sysctls inside ``ns`` (through /proc/sys, from a thread inside it)."""

    def write() -> None:
        for key, value in settings.items():
            path = "/proc/sys/" + key.replace(".", "/")
            with open(path, "w", encoding="ascii") as fh:
                fh.write(value)

    in_netns(ns, write)


@functools.cache
def netem_available(probe_ns: str) -> bool:
    """Whether the kernel has the netem qdisc (tried on a veth in the throw-away namespace ``probe_ns``)."""
    if shutil.which("tc") is None:
        return False
    try:
        ip("netns", "add", probe_ns)
        ip("-n", probe_ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        proc = subprocess.run(
            ["ip", "netns", "exec", probe_ns, "tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.returncode == 0
    finally:
        delete_ns(probe_ns)
