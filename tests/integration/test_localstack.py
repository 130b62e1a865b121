"""The local mosquitto/influxd launchers, against the real servers (loopback only)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from edgeprobe import localstack
from edgeprobe.localstack import (
    BinaryNotFoundError,
    InfluxError,
    InfluxServer,
    MosquittoServer,
    ServerStartError,
    find_binary,
)


def _process_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _state(server: MosquittoServer | InfluxServer) -> tuple[int | None, bool, bool]:
    """(pid, running, paused), read afresh (keeps mypy from carrying narrowed attributes along)."""
    return server.pid, server.running, server.paused


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a listening socket of ours for the test's duration."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_find_binary() -> None:
    assert find_binary("mosquitto") is not None
    assert find_binary("influxd") is not None
    assert find_binary("edgeprobe-no-such-binary") is None


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localstack, "find_binary", lambda name: None)
    with pytest.raises(BinaryNotFoundError, match="mosquitto not found: apt-get install mosquitto"):
        MosquittoServer().start()
    with pytest.raises(BinaryNotFoundError, match="influxd not found: apt-get install influxdb"):
        InfluxServer().start()


@pytest.mark.integration
def test_start_stop_both_sync() -> None:
    broker = MosquittoServer().start()
    influx = InfluxServer().start()
    try:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert influx.url == f"http://127.0.0.1:{influx.port}"
        assert influx.rpc_port != influx.port
        assert broker.workdir != influx.workdir
        assert broker.log_path.is_file()
        assert influx.log_path.is_file()
        assert influx.ping()
        pids = [broker.pid, influx.pid]
        workdirs = [broker.workdir, influx.workdir]
        assert all(pid is not None and not _process_gone(pid) for pid in pids)

        port = broker.port
        broker.restart()
        assert broker.port == port
        assert broker.pid is not None and broker.pid != pids[0]
        assert _process_gone(pids[0] or 0)
        pids[0] = broker.pid
    finally:
        broker.stop()
        influx.stop()
    assert all(pid is not None and _process_gone(pid) for pid in pids)
    assert not any(w.exists() for w in workdirs)
    assert _state(broker) == (None, False, False)
    broker.stop()  # stopping twice is harmless


@pytest.mark.integration
async def test_async_context_managers_and_keep() -> None:
    async with MosquittoServer(keep=True) as broker, InfluxServer() as influx:
        assert broker.running and influx.running
        assert influx.ping()
        pids = [broker.pid, influx.pid]
        kept = broker.workdir
    try:
        assert all(pid is not None and _process_gone(pid) for pid in pids)
        assert (kept / "mosquitto.log").is_file()
        assert (kept / "mosquitto.db").is_file()  # persistence was saved at SIGTERM
    finally:
        shutil.rmtree(kept)


@pytest.mark.integration
def test_influx_write_tagged_point_and_query_back(influxdb: InfluxServer, influx_db: str) -> None:
    influxdb.write("probe,target=127.0.0.1,pop=lab rtt_ms=1.25 1700000000000000000", influx_db)
    rows = influxdb.rows("SELECT * FROM probe", influx_db, epoch="ns")
    assert rows == [{"time": 1700000000000000000, "pop": "lab", "target": "127.0.0.1", "rtt_ms": 1.25}]
    grouped = influxdb.rows('SELECT last(rtt_ms) FROM probe GROUP BY "pop"', influx_db)
    assert [(r["pop"], r["last"]) for r in grouped] == [("lab", 1.25)]
    raw = influxdb.query("SHOW TAG VALUES FROM probe WITH KEY = pop", influx_db)
    assert raw["results"][0]["series"][0]["values"] == [["pop", "lab"]]


@pytest.mark.integration
def test_influx_errors_carry_the_server_message(influxdb: InfluxServer, influx_db: str) -> None:
    with pytest.raises(InfluxError, match="error parsing query"):
        influxdb.query("SELEC nothing", influx_db)
    with pytest.raises(InfluxError, match="database not found"):
        influxdb.query("SELECT * FROM probe", "edgeprobe_no_such_db")
    with pytest.raises(InfluxError, match="unable to parse") as caught:
        influxdb.write("probe rtt_ms=", influx_db)
    assert caught.value.status == 400


@pytest.mark.integration
async def test_mosquitto_pubsub_roundtrip(mosquitto: MosquittoServer) -> None:
    topic = f"edgeprobe/test/{uuid.uuid4().hex}"
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as sub:
        await sub.subscribe(topic, qos=1)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            await pub.publish(topic, b"hello", qos=1)
        async with asyncio.timeout(10):
            msg = await anext(sub.messages)
    assert msg.topic.value == topic
    assert msg.payload == b"hello"
    assert msg.qos == 1


@pytest.mark.integration
async def test_mosquitto_restart_keeps_port_and_persistent_session(fresh_mosquitto: MosquittoServer) -> None:
    broker = fresh_mosquitto
    topic = f"edgeprobe/test/{uuid.uuid4().hex}"
    ident = f"edgeprobe-test-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(broker.host, broker.port, identifier=ident, clean_session=False) as sub:
        await sub.subscribe(topic, qos=1)

    port, old_pid = broker.port, broker.pid
    await broker.arestart()
    assert broker.port == port
    assert old_pid is not None and _process_gone(old_pid)

    async with aiomqtt.Client(broker.host, broker.port) as pub:
        await pub.publish(topic, b"queued while offline", qos=1)
    async with aiomqtt.Client(broker.host, broker.port, identifier=ident, clean_session=False) as sub:
        async with asyncio.timeout(10):
            msg = await anext(sub.messages)
    assert msg.payload == b"queued while offline"


@pytest.mark.integration
def test_influx_pause_resume_and_stop_while_paused(fresh_influxdb: InfluxServer) -> None:
    influx = fresh_influxdb
    influx.create_database("paused")
    influx.pause()
    assert _state(influx)[1:] == (True, True)
    assert not influx.ping(timeout_s=0.5)
    influx.resume()
    assert influx.ping()
    influx.write("m v=1 1", "paused")
    assert influx.rows("SELECT v FROM m", "paused", epoch="ns") == [{"time": 1, "v": 1.0}]

    influx.pause()
    pid = influx.pid
    assert pid is not None
    influx.stop()
    assert _process_gone(pid)


@pytest.mark.integration
def test_mosquitto_pause_resume(fresh_mosquitto: MosquittoServer) -> None:
    pid = fresh_mosquitto.pid
    fresh_mosquitto.pause()
    assert _state(fresh_mosquitto) == (pid, True, True)
    fresh_mosquitto.resume()
    assert _state(fresh_mosquitto) == (pid, True, False)
    with socket.create_connection((fresh_mosquitto.host, fresh_mosquitto.port), timeout=5):
        pass


@pytest.mark.integration
def test_port_race_retries_on_new_ports(monkeypatch: pytest.MonkeyPatch, busy_port: int) -> None:
    real_free_port, real_free_ports = localstack.free_port, localstack.free_ports
    handed: list[int] = []

    def racy_free_port(host: str = "127.0.0.1") -> int:
        handed.append(busy_port if not handed else real_free_port(host))
        return handed[-1]

    def racy_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
        ports = real_free_ports(count, host)
        if not handed:
            ports[0] = busy_port
        handed.append(ports[0])
        return ports

    monkeypatch.setattr(localstack, "free_port", racy_free_port)
    with MosquittoServer() as broker:
        assert handed[0] == busy_port and broker.port == handed[-1] != busy_port
    handed.clear()
    monkeypatch.setattr(localstack, "free_ports", racy_free_ports)
    with InfluxServer() as influx:
        assert handed[0] == busy_port and influx.port == handed[-1] != busy_port
        assert influx.ping()


@pytest.mark.integration
def test_fixed_port_in_use_fails_with_log_tail(busy_port: int) -> None:
    with pytest.raises(ServerStartError, match=r"(?i)address already in use"):
        MosquittoServer(port=busy_port).start()


@pytest.mark.integration
def test_bad_config_fails_fast_with_log_tail() -> None:
    with pytest.raises(ServerStartError, match="edgeprobe_no_such_option") as caught:
        MosquittoServer(extra_config=["edgeprobe_no_such_option 1"]).start()
    assert "exited with code" in str(caught.value)  # it saw the exit rather than waiting it out
