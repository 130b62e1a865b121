"""Shared fixtures: real mosquitto and influxd on free loopback ports (see collector/localstack.py).

Missing binaries fail the tests that need them (never skip): ``./run.sh test`` installs them.
Servers are always stopped at teardown, also after failures, Ctrl-C and SIGTERM (turned into
KeyboardInterrupt below, so pytest tears down); children also get SIGKILL if pytest itself is
killed, so none outlives the run.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import TypeVar

import pytest

from collector.localstack import BinaryNotFoundError, InfluxError, InfluxServer, MosquittoServer

S = TypeVar("S", MosquittoServer, InfluxServer)


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
