"""The daemons' one-line summary every ``log.summary_interval_s``, against real mosquitto and influxd."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.daemon import run_agent
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import CollectorStats, run_collector
from edgeprobe.configfile import ConfigError, LogConfig, convert
from edgeprobe.localstack import InfluxServer, MosquittoServer
from tests.integration.test_agent_daemon import agent_cfg
from tests.integration.test_collector import Fleet, collector_config
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

AGENT_LINE = re.compile(
    r"last [\d.]+ s: (\d+) observations produced, (\d+) published, (\d+) confirmed; "
    r"spool backlog (\d+); overloaded: (yes|no)"
)
COLLECTOR_LINE = re.compile(
    r"last [\d.]+ s: (\d+) messages, (\d+) observations in, (\d+) points written; spool backlog (\d+) lines; "
    r"(no successful write yet|last successful write \d+ s ago)"
)


def _matches(caplog: pytest.LogCaptureFixture, logger: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    return [m for r in caplog.records if r.name == logger and (m := pattern.fullmatch(r.getMessage()))]


def test_summary_interval_is_validated() -> None:
    assert convert({}, LogConfig, "t").summary_interval_s == 60.0
    agent = {"agent": {"id": "a1", "site": "s1"}, "log": {"summary_interval_s": 0}}
    assert convert(agent, AgentConfig, "t").log.summary_interval_s == 0
    with pytest.raises(ConfigError, match=r"log.summary_interval_s"):
        convert({"log": {"summary_interval_s": -1}}, CollectorConfig, "t")


async def test_agent_logs_a_summary(
    mosquitto: MosquittoServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeprobe.agent")
    cfg = agent_cfg(mosquitto.url, tmp_path / "spool.db", agent_id="t-summary")
    cfg = msgspec.structs.replace(cfg, log=LogConfig(summary_interval_s=0.3))
    stop = asyncio.Event()
    started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_agent(cfg, build_jobs(cfg, "t"), stop=stop, started=started))
    try:
        await asyncio.wait_for(started, 10)
        lines = await wait_for_async(
            lambda: [m for m in _matches(caplog, "edgeprobe.agent", AGENT_LINE) if int(m[1]) and int(m[3])],
            15,
            lambda: f"a summary line with observations produced and confirmed; log: {caplog.text[-600:]}",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    m = lines[0]
    assert int(m[2]) >= int(m[3]) > 0 and m[5] == "no"


async def test_collector_logs_a_summary(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeprobe.collector")
    cfg = collector_config(mosquitto, influxdb, influx_db, tmp_path)
    cfg = msgspec.structs.replace(cfg, log=LogConfig(summary_interval_s=0.3))
    fleet = Fleet(cfg.broker.topic_prefix)
    stats = CollectorStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
    try:
        await wait_for_async(lambda: stats.connects >= 1, 20, "the collector subscribed")
        await wait_for_async(
            lambda: _matches(caplog, "edgeprobe.collector", COLLECTOR_LINE), 10, "a summary line while idle"
        )
        assert _matches(caplog, "edgeprobe.collector", COLLECTOR_LINE)[0][5] == "no successful write yet"
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            await pub.publish(fleet.topic(), fleet.envelope([fleet.obs() for _ in range(3)]), qos=1)
        lines = await wait_for_async(
            lambda: [m for m in _matches(caplog, "edgeprobe.collector", COLLECTOR_LINE) if int(m[3])],
            20,
            lambda: f"a summary line with points written; log: {caplog.text[-600:]}",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    in_lines = [m for m in _matches(caplog, "edgeprobe.collector", COLLECTOR_LINE) if int(m[2])]
    assert sum(int(m[1]) for m in in_lines) == 1 and sum(int(m[2]) for m in in_lines) == 3
    assert lines[0][5].startswith("last successful write")
