"""Client ids are not tied to logins (mosquitto 2.0: any login may connect with any client id and the
broker drops the older connection). The collector's id is unguessable and kept in its state
directory; a lost persistent session (CONNACK session_present false where it should be true) and a
takeover fight (connections lost right after connecting, again and again) are logged and counted.
A real mosquitto; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edgeprobe.collector.config import CLIENT_ID_FILE, CollectorConfig, collector_client_id
from edgeprobe.collector.service import CollectorStats, run_collector
from edgeprobe.configfile import convert
from edgeprobe.localstack import MosquittoServer, free_port
from edgeprobe.mqtt import SESSION_LOST, TAKEOVER_SUSPECTED, BrokerConfig, run_session
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration


def collector_cfg(broker: MosquittoServer, state: Path) -> CollectorConfig:
    raw: dict[str, Any] = {
        "name": "c1",
        "broker": {"url": broker.url, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2},
        # nothing listens there: the consumer does not need InfluxDB to hold its session
        "influx": {"api": "v1", "url": f"http://127.0.0.1:{free_port()}", "database": "x"},
        "spool": {"path": str(state / "collector-{name}.spool.sqlite")},
        "limits": {"shutdown_flush_s": 0.5},
    }
    return convert(raw, CollectorConfig, "test")


def test_the_collector_client_id_is_unguessable_and_kept(tmp_path: Path) -> None:
    cfg = convert({"name": "c1", "spool": {"path": str(tmp_path / "a" / "s.sqlite")}}, CollectorConfig, "t")
    first, existed = collector_client_id(cfg)
    assert not existed and first.startswith("edgeprobe-collector-c1-") and first != cfg.default_client_id
    assert len(first.rsplit("-", 1)[1]) == 24  # 96 random bits
    path = tmp_path / "a" / CLIENT_ID_FILE.format(name="c1")
    assert path.stat().st_mode & 0o777 == 0o600
    assert collector_client_id(cfg) == (first, True)  # the same after a restart
    other = convert({"name": "c1", "spool": {"path": str(tmp_path / "b" / "s.sqlite")}}, CollectorConfig, "t")
    assert collector_client_id(other)[0] != first  # another deployment, another id
    fixed = convert({"broker": {"client_id": "mine"}}, CollectorConfig, "t")
    assert collector_client_id(fixed) == ("mine", False)
    memory = convert({"spool": {"path": None}}, CollectorConfig, "t")
    assert collector_client_id(memory) == (memory.default_client_id, False)


async def test_the_collector_notices_its_session_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="edgeprobe.collector")
    async with MosquittoServer() as server:
        cfg = collector_cfg(server, tmp_path)
        stats = CollectorStats()
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats, on_ready=ready.set))
        try:
            await asyncio.wait_for(ready.wait(), 20)
            client_id, _ = collector_client_id(cfg)
            # Another login takes the id with a clean session: the broker drops the collector and the
            # queued messages with its session. The collector reconnects (dropping the intruder) and
            # finds no session.
            async with aiomqtt.Client(server.host, server.port, identifier=client_id, clean_session=True):
                pass
            await wait_for_async(lambda: stats.sessions_lost == 1, 20, "the lost session noticed")
            assert any("had no session for client id" in r.getMessage() for r in caplog.records)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

        # While it is down: the session is taken over and dropped; at its next start it expects it.
        async with aiomqtt.Client(server.host, server.port, identifier=client_id, clean_session=True):
            pass
        stats2 = CollectorStats()
        stop2, ready2 = asyncio.Event(), asyncio.Event()
        task2 = asyncio.create_task(run_collector(cfg, stop=stop2, stats=stats2, on_ready=ready2.set))
        try:
            await asyncio.wait_for(ready2.wait(), 20)
            assert stats2.sessions_lost == 1
        finally:
            stop2.set()
            await asyncio.wait_for(task2, 30)


async def test_a_takeover_fight_is_reported(mosquitto: MosquittoServer) -> None:
    """Two clients with one id take it from each other: reported after FLAP_COUNT short connections."""
    broker = convert({"url": mosquitto.url, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}, BrokerConfig, "test")
    events: list[str] = []
    started = 0
    stop = asyncio.Event()

    async def session(client: aiomqtt.Client) -> None:
        nonlocal started
        started += 1
        async for _ in client.messages:  # until the broker drops this connection
            pass

    task = asyncio.create_task(
        run_session(
            broker,
            "edgeprobe-agent-victim",
            session,
            stop=stop,
            name="victim",
            log=logging.getLogger("test"),
            clean_session=True,
            on_session_event=lambda event, line: events.append(event),
        )
    )
    try:
        for i in range(3):
            await wait_for_async(lambda i=i: started > i, 20, f"victim connection {i + 1}")  # type: ignore[misc]
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="edgeprobe-agent-victim"):
                pass
        await wait_for_async(lambda: TAKEOVER_SUSPECTED in events, 20, "the takeover reported")
        assert SESSION_LOST not in events  # a clean session has none to lose
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_agent_client_ids_are_unguessable_and_never_collide() -> None:
    from edgeprobe.agent import publisher
    from tests.integration.test_agent_daemon import agent_cfg

    cfg = agent_cfg("mqtt://127.0.0.1:1883", None, agent_id="fra1-a")
    pub_id, control_id = publisher.agent_client_ids(cfg)
    assert pub_id.startswith("edgeprobe-agent-fra1-a-") and len(pub_id) >= len("edgeprobe-agent-fra1-a-") + 16
    assert control_id == pub_id + "-control"
    fixed = msgspec.structs.replace(cfg, broker=msgspec.structs.replace(cfg.broker, client_id="mine"))
    assert publisher.agent_client_ids(fixed) == ("mine", "mine-control")  # a configured id: still two ids


async def test_an_agent_with_a_configured_client_id_keeps_both_connections(tmp_path: Path) -> None:
    """broker.client_id used to name both of the agent's connections: the broker kept dropping one
    for the other. Now the control channel's id is the configured one plus -control."""
    from edgeprobe.agent.config import AgentConfig, build_jobs
    from edgeprobe.agent.daemon import run_agent
    from edgeprobe.signing import generate_key
    from tests.integration.test_agent_daemon import agent_cfg

    async with MosquittoServer(port=free_port()) as server:
        base = agent_cfg(server.url, None)
        raw = msgspec.to_builtins(base)
        raw["broker"]["client_id"] = "pinned-agent"
        generate_key(tmp_path / "c.key", tmp_path / "c.pub")
        raw["control"] = {"accept_commands": True, "public_key_file": str(tmp_path / "c.pub")}
        cfg = convert(raw, AgentConfig, "test")
        stop = asyncio.Event()
        ready = asyncio.Event()
        started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_agent(cfg, build_jobs(cfg, "t"), stop=stop, started=started, on_ready=ready.set))
        running = await asyncio.wait_for(started, 10)
        await asyncio.wait_for(ready.wait(), 15)  # published online AND the control channel subscribed
        produced_before = running.publisher.stats.acknowledged_observations
        await wait_for_async(
            lambda: running.publisher.stats.acknowledged_observations >= produced_before + 10, 15, "ten more sent"
        )
        assert running.publisher.stats.connects == 1  # never knocked off by its own control channel
        stop.set()
        await asyncio.wait_for(task, 15)
