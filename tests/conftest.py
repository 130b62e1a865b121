"""Shared fixtures: real mosquitto and influxd on free loopback ports (see collector/localstack.py).

Missing binaries fail the tests that need them (never skip): ``./run.sh test`` installs them.
Servers are always stopped at teardown, also after failures, Ctrl-C and SIGTERM (turned into
KeyboardInterrupt below, so pytest tears down); children also get SIGKILL if pytest itself is
killed, so none outlives the run.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import TypeVar

import pytest

from edgeprobe.localstack import BinaryNotFoundError, InfluxError, InfluxServer, MosquittoServer

S = TypeVar("S", MosquittoServer, InfluxServer)


def _hosts_names() -> set[str]:
    names = {"localhost"}
    try:
        with open("/etc/hosts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split("#", 1)[0].split()
                names.update(n.lower() for n in fields[1:])
    except OSError:
        pass
    return names


_LOCAL_NAMES = _hosts_names()
_real_getaddrinfo = socket.getaddrinfo


def _is_literal(host: object) -> bool:
    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def guarded_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Tests may resolve only literals and /etc/hosts names: no DNS query ever leaves the machine.

    Names under ``.invalid`` fail as an unknown name would (EAI_NONAME), without asking a resolver;
    any other name fails the test loudly.
    """
    name = (host.decode() if isinstance(host, bytes) else str(host or "")).rstrip(".").lower()
    if _is_literal(host) or name in _LOCAL_NAMES:
        return _real_getaddrinfo(host, *args, **kwargs)
    if name.endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    raise AssertionError(f"test tried to resolve {host!r} through DNS: tests must not send traffic off the machine")


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Applied to every test (see guarded_getaddrinfo)."""
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def pytest_sessionstart() -> None:
    """Let SIGTERM (a CI time-out, a ``kill``) run fixture teardown as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


def _started(server: S) -> S:
    try:
        return server.start()
    except BinaryNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoServer]:
    """One broker for the whole session. Don't stop or pause it: use ``fresh_mosquitto`` for that."""
    server = _started(MosquittoServer())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def influxdb() -> Iterator[InfluxServer]:
    """One influxd for the whole session; give each test its own database with ``influx_db``."""
    server = _started(InfluxServer())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influx_db(influxdb: InfluxServer) -> Iterator[str]:
    """Name of a fresh, empty database on the session influxd, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    influxdb.create_database(name)
    yield name
    if influxdb.paused:
        influxdb.resume()
    try:
        influxdb.drop_database(name)
    except (InfluxError, OSError) as exc:  # a broken server is the test's failure, not teardown's
        print(f"influx_db teardown: could not drop {name}: {exc}")


@pytest.fixture
def fresh_mosquitto() -> Iterator[MosquittoServer]:
    """A broker of the test's own, free to stop, restart or pause."""
    server = _started(MosquittoServer())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_influxdb() -> Iterator[InfluxServer]:
    """An influxd of the test's own, free to stop, restart or pause."""
    server = _started(InfluxServer())
    try:
        yield server
    finally:
        server.stop()
