"""Supervision on a real mosquitto: a crashed agent task is logged, restarted, and nothing is lost;
one that keeps crashing ends the agent (and ``edgeprobe agent run``) with an error.

The fault is injected in-process: the spool's read (``take``, what the publisher calls for every
batch) raises the SpoolError a failing SQLite read gives. Before edgeprobe.supervise the publisher
task died of it silently and the agent went on probing and spooling with nothing sent.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from edgeprobe.agent.config import AgentConfig
from edgeprobe.agent.spool import SpoolEntry, SpoolError, SqliteSpool
from edgeprobe.cli import main
from edgeprobe.configfile import convert
from edgeprobe.localstack import MosquittoServer
from edgeprobe.supervise import TaskFailedError
from tests.e2e.test_agent_faults import RunningAgent, Subscriber, agent_dict, eventually

pytestmark = pytest.mark.integration

SUPERVISE = {"max_restarts": 3, "window_s": 60, "restart_min_s": 0.05, "restart_max_s": 0.2}


def config(broker: MosquittoServer, spool: Path, agent_id: str, **extra: Any) -> dict[str, Any]:
    raw = agent_dict(broker, spool, agent_id)
    raw["supervise"] = SUPERVISE
    raw.update(extra)
    return raw


class FailingReads:
    """Make ``spool.take`` raise like a failing SQLite read, ``times`` times (None: for ever)."""

    def __init__(self, spool: Any, times: int | None) -> None:
        self.spool = spool
        self.left = times
        self.raised = 0
        self._take = spool.take
        spool.take = self.take

    async def take(self, n: int) -> list[SpoolEntry]:
        if self.left is None or self.left > 0:
            if self.left is not None:
                self.left -= 1
            self.raised += 1
            raise SpoolError(f"spool {self.spool.path}: read failed: disk I/O error (injected)")
        return await self._take(n)


def crash_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The restarts' records (the one that gives up is CRITICAL)."""
    crashed = [r for r in caplog.records if r.getMessage().startswith("task publisher crashed")]
    return [r for r in crashed if r.levelno == logging.ERROR]


async def test_publisher_crash_is_logged_restarted_and_loses_nothing(
    mosquitto: MosquittoServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sub = Subscriber(mosquitto, "sv-a1")
    await sub.register()
    sub.start()
    agent = RunningAgent(convert(config(mosquitto, tmp_path / "spool.db", "sv-a1"), AgentConfig, "t"))
    try:
        handles = await agent.start()
        await eventually(lambda: handles.publisher.stats.acknowledged_observations > 50, what="publishing")
        failing = FailingReads(handles.spool, times=2)
        await eventually(lambda: failing.raised == 2, what="two failed spool reads")
        # (a) each crash is logged as an error with its traceback, and counted.
        await eventually(lambda: len(crash_records(caplog)) == 2, what="two crash records")
        # (b) publishing resumes: live observations are acknowledged again.
        await agent.wait_live()
        await eventually(
            lambda: any(h.task_restarts == 2 for h in sub.health), what="task_restarts 2 in a health message"
        )
        handles = await agent.finish()
        produced = [o.id for o in agent.produced]
        await sub.wait_for(set(produced))
    finally:
        agent.stop.set()
        await sub.close()
    records = crash_records(caplog)
    assert all(r.levelno == logging.ERROR and r.exc_info is not None for r in records)
    assert all("disk I/O error (injected)" in r.getMessage() for r in records)
    assert handles.publisher.status("online").task_restarts == 2
    assert set(produced) <= set(sub.ids) and len(handles.spool) == 0


async def test_publisher_that_keeps_crashing_ends_the_agent(
    mosquitto: MosquittoServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    agent = RunningAgent(convert(config(mosquitto, tmp_path / "spool.db", "sv-a2"), AgentConfig, "t"))
    handles = await agent.start()
    await eventually(lambda: handles.publisher.stats.acknowledged_observations > 0, what="publishing")
    failing = FailingReads(handles.spool, times=None)
    assert agent.task is not None
    with pytest.raises(TaskFailedError) as info:
        await asyncio.wait_for(agent.task, 30)  # without stop: the agent ends by itself
    assert info.value.task == "publisher" and info.value.crashes == SUPERVISE["max_restarts"] + 1
    assert failing.raised == SUPERVISE["max_restarts"] + 1
    assert len(crash_records(caplog)) == SUPERVISE["max_restarts"]
    last = caplog.records[-1]
    assert last.levelno == logging.CRITICAL
    assert last.getMessage().startswith("agent exiting with an error: task publisher crashed 4 times within 60 s")
    assert "disk I/O error (injected)" in last.getMessage()
    assert agent.stop.is_set() is False  # the caller's event was not touched


def test_agent_run_exits_non_zero_when_a_task_keeps_crashing(
    mosquitto: MosquittoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_take(self: SqliteSpool, n: int) -> list[SpoolEntry]:
        raise SpoolError(f"spool {self.path}: read failed: disk I/O error (injected)")

    monkeypatch.setattr(SqliteSpool, "take", failing_take)
    conf = tmp_path / "agent.yaml"
    conf.write_text(msgspec.json.encode(config(mosquitto, tmp_path / "spool.db", "sv-a3")).decode())
    result = CliRunner().invoke(main, ["agent", "run", "-c", str(conf)])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("edgeprobe: task publisher crashed 4 times within 60 s, giving up"), result.output
    assert "disk I/O error (injected)" in last
