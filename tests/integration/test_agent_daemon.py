"""The agent daemon against a real mosquitto: presence, clean shutdown, and broker outages."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.daemon import run_agent
from edgeprobe.configfile import convert
from edgeprobe.localstack import MosquittoServer, free_port
from edgeprobe.schema import AgentHealth, Envelope, Observation, Status
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration


def agent_cfg(
    broker_url: str, spool_path: Path | None, agent_id: str = "t-a1", reconnect_s: float = 0.1
) -> AgentConfig:
    """``spool_path`` None: the in-memory spool."""
    return convert(
        {
            "agent": {"id": agent_id, "site": "lab", "shutdown_grace_s": 1.0},
            "spool": {"path": None if spool_path is None else str(spool_path)},
            "broker": {
                "url": broker_url,
                "reconnect_min_s": reconnect_s,
                "reconnect_max_s": 5 * reconnect_s,
                "connect_timeout_s": 2,
            },
            # No collector here: observations leave the spool on the broker's PUBACK.
            "publish": {"flush_interval_s": 0.1, "delivery": "broker"},
            "jobs": [
                {
                    "kind": "icmp",
                    "targets": ["127.0.0.1"],
                    "interval_s": 0.2,
                    "options": {"count": 1, "timeout_s": 0.2},
                }
            ],
        },
        AgentConfig,
        "test",
    )


class Collect:
    """Subscribes to everything under edgeprobe/ and keeps what arrives."""

    def __init__(self, server: MosquittoServer, persistent: bool = False) -> None:
        self.server = server
        self.persistent = persistent
        self.identifier = f"collect-{id(self)}" if persistent else None
        self.ids: list[str] = []
        self.status: list[Status] = []
        self.health: list[AgentHealth] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.server.host,
                    self.server.port,
                    identifier=self.identifier,
                    clean_session=not self.persistent,
                ) as client:
                    await client.subscribe("edgeprobe/#", qos=1)
                    self.ready.set()
                    async for msg in client.messages:
                        payload = bytes(msg.payload)  # type: ignore[arg-type]
                        if str(msg.topic).endswith("/obs"):
                            env = msgspec.json.decode(payload, type=Envelope)
                            self.ids.extend(o.id for o in env.observations)
                        elif str(msg.topic).endswith("/health"):
                            self.health.append(msgspec.json.decode(payload, type=AgentHealth))
                        else:
                            self.status.append(msgspec.json.decode(payload, type=Status))
            except aiomqtt.MqttError:
                self.ready.clear()
                await asyncio.sleep(0.05)  # retry pace while the broker is down


async def register_persistent(collect: Collect) -> None:
    """Create the subscriber's persistent session, then leave: the broker queues for it from now on."""
    async with aiomqtt.Client(
        collect.server.host, collect.server.port, identifier=collect.identifier, clean_session=False
    ) as client:
        await client.subscribe("edgeprobe/#", qos=1)


@pytest.mark.parametrize("spool", ["memory", "sqlite"])
async def test_broker_down_at_start_then_up(caplog: pytest.LogCaptureFixture, tmp_path: Path, spool: str) -> None:
    """Broker unreachable at start: the agent keeps probing, retries, says so, and delivers later."""
    caplog.set_level(logging.INFO)
    async with MosquittoServer(port=free_port()) as server:
        collect = Collect(server, persistent=True)
        await register_persistent(collect)
        await server.astop(keep_state=True)  # the broker is down when the agent starts
        cfg = agent_cfg(server.url, tmp_path / "spool.db" if spool == "sqlite" else None)
        produced: list[Observation] = []
        stop = asyncio.Event()
        started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(cfg, build_jobs(cfg, "t"), stop=stop, started=started, tap=produced.append)
        )
        handles = await started
        await wait_for_async(
            lambda: len(produced) >= 3 and any("unreachable" in r.message for r in caplog.records),
            10,
            "three observations and an 'unreachable' warning without a broker",
        )
        assert len(produced) >= 3  # probing went on without a broker
        await handles.spool.flush()
        assert handles.publisher.stats.connects == 0 and len(handles.spool) == len(produced)
        assert any("unreachable" in r.message for r in caplog.records)
        await server.astart()
        ctask = asyncio.create_task(collect.run())
        queued = len(produced)
        await wait_for_async(
            lambda: handles.publisher.stats.acknowledged_observations >= queued,
            15,
            f"the {queued} observations queued while the broker was down acknowledged after it came up",
        )
        stop.set()
        await asyncio.wait_for(task, 15)
        await wait_for_async(
            lambda: {o.id for o in produced} <= set(collect.ids), 10, "every observation at the subscriber"
        )
        ctask.cancel()
    assert handles.publisher.stats.connects >= 1
    assert handles.spool.dropped == 0 and len(handles.spool) == 0
    assert sorted(collect.ids) == sorted(o.id for o in produced)  # all of them, queued ones included


async def test_broker_restart_mid_run_loses_nothing(tmp_path: Path) -> None:
    """The broker stops for 1.5 s and comes back on the same port: every observation arrives."""
    async with MosquittoServer(port=free_port()) as server:
        cfg = agent_cfg(server.url, tmp_path / "spool.db")
        produced: list[Observation] = []
        collect = Collect(server, persistent=True)  # the broker keeps its queue across the restart
        ctask = asyncio.create_task(collect.run())
        await asyncio.wait_for(collect.ready.wait(), 10)
        stop = asyncio.Event()
        started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(cfg, build_jobs(cfg, "t"), stop=stop, started=started, tap=produced.append)
        )
        running = await asyncio.wait_for(started, 10)
        await wait_for_async(
            lambda: running.publisher.stats.acknowledged_observations > 0, 10, "the agent publishing before the stop"
        )
        await server.astop(keep_state=True)
        await asyncio.sleep(1.5)  # the outage (the scenario): observations pile up in the agent's spool
        await server.astart()
        await wait_for_async(lambda: running.publisher.stats.connects >= 2, 15, "the agent reconnected")
        stop.set()
        handles = await asyncio.wait_for(task, 15)
        await wait_for_async(
            lambda: {o.id for o in produced} <= set(collect.ids), 10, "every observation at the subscriber"
        )
        ctask.cancel()
    assert handles.publisher.stats.connects >= 2
    assert handles.spool.dropped == 0 and len(handles.spool) == 0
    assert set(collect.ids) == {o.id for o in produced}


def test_daemon_sigterm_is_clean_and_presence_is_visible(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    """Also ``agent run --ready-file``: written (the pid) once connected, removed at the clean stop."""
    conf, ready = tmp_path / "agent.yaml", tmp_path / "agent.ready"
    conf.write_text(
        textwrap.dedent(
            f"""
            agent: {{id: sig-a1, site: lab}}
            broker: {{url: "{mosquitto.url}"}}
            publish: {{flush_interval_s: 0.2, delivery: broker}}
            spool: {{path: "{tmp_path}/spool.db"}}
            jobs:
              - {{kind: icmp, targets: [127.0.0.1], interval_s: 0.5, options: {{count: 1, timeout_s: 0.2}}}}
            """
        )
    )

    async def scenario() -> tuple[list[str], list[Status], int, str]:
        collect = Collect(mosquitto)
        ctask = asyncio.create_task(collect.run())
        await asyncio.wait_for(collect.ready.wait(), 10)
        exe = str(Path(sys.executable).with_name("edgeprobe"))
        proc = await asyncio.create_subprocess_exec(
            exe, "agent", "run", "-c", str(conf), "--ready-file", str(ready),
            stderr=asyncio.subprocess.PIPE, env={**os.environ},
        )  # fmt: skip
        await wait_for_async(ready.exists, 20, "the agent's ready file")
        pid_in_file = ready.read_text()
        await wait_for_async(
            lambda: len(collect.ids) >= 3 and any(s.agent == "sig-a1" and s.state == "online" for s in collect.status),
            20,
            "sig-a1 online and three observations delivered",
        )
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
        assert pid_in_file == f"{proc.pid}\n" and not ready.exists()  # removed when the agent stops
        await wait_for_async(
            lambda: [s.state for s in collect.status if s.agent == "sig-a1"][-1:] == ["offline"],
            10,
            "sig-a1's offline status",
        )
        ctask.cancel()
        return collect.ids, collect.status, proc.returncode or 0, err.decode()

    ids, status, code, log = asyncio.run(scenario())
    assert code == 0, log
    assert "agent stopped:" in log and "0 dropped, 0 left undelivered" in log
    assert len(ids) >= 3
    states = [s.state for s in status if s.agent == "sig-a1"]
    assert states[0] == "online" and states[-1] == "offline"


def test_last_will_marks_a_killed_agent_offline(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(
        f'agent: {{id: kill-a1, site: lab}}\nbroker: {{url: "{mosquitto.url}"}}\nspool: {{path: "{tmp_path}/s.db"}}\n'
    )
    exe = str(Path(sys.executable).with_name("edgeprobe"))
    proc = subprocess.Popen([exe, "agent", "run", "-c", str(conf)], stderr=subprocess.DEVNULL)

    async def watch() -> list[str]:
        states: list[str] = []
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.subscribe("edgeprobe/v1/lab/kill-a1/status", qos=1)
            killed = False
            async with asyncio.timeout(20):
                async for msg in client.messages:
                    states.append(msgspec.json.decode(bytes(msg.payload), type=Status).state)  # type: ignore[arg-type]
                    if states[-1] == "online" and not killed:
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                    elif killed and states[-1] == "offline":
                        return states
        return states

    try:
        states = asyncio.run(watch())
    finally:
        proc.kill()
        proc.wait()
    assert states[-1] == "offline"


async def test_the_agent_prepares_its_kinds_before_the_first_run(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    """A kind's heavy prepare (the trace kind's scapy import) is done before the scheduler starts:
    no run is in flight, and so none is timed late, while it holds the interpreter."""
    from edgeprobe.agent.config import Job
    from edgeprobe.probes.context import ProbeContext
    from tests.support.kinds import EmptyConfig, OkResult, hold_interpreter, stand_in_kind

    events: list[tuple[str, float]] = []

    def prepare() -> None:
        events.append(("prepare", time.monotonic()))
        hold_interpreter(0.3)  # CPU, as an import
        events.append(("prepared", time.monotonic()))

    async def run(target: str, config: EmptyConfig, ctx: ProbeContext) -> OkResult:
        events.append(("run", time.monotonic()))
        return OkResult()

    kind = stand_in_kind(run, prepare=prepare)
    cfg = agent_cfg(mosquitto.url, None)
    jobs = [Job(name="heavy", kind=kind, targets=("a", "b", "c"), interval_s=0.2, config=EmptyConfig(), labels={})]
    produced: list[Observation] = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_agent(cfg, jobs, stop=stop, tap=produced.append))
    await wait_for_async(lambda: len(produced) >= 6, 15, "six runs")
    stop.set()
    await asyncio.wait_for(task, 15)
    names = [e for e, _ in events]
    assert names[:2] == ["prepare", "prepared"] and names.count("prepare") == 1, names
    assert all(o.outcome == "ok" and o.duration_ms < 100 for o in produced), produced
    # The scheduler started after it: no run was due, so none started late, while it worked.
    assert all((o.sched_lag_ms or 0) < 100 for o in produced), [o.sched_lag_ms for o in produced]
