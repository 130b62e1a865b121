"""A broker crash loses nothing: end-to-end delivery confirmations (``…/ack``), real processes.

agent (in-process, ICMP to ten loopback addresses every 0.1 s, about 100 observations/s, SQLite
spool) → mosquitto **without persistence** → collector (in-process, SQLite spool) → influxd.
The collector is stopped, so the broker queues what the agent sends for the collector's
persistent session (and acknowledges it to the agent); then the broker is SIGKILLed and restarted
empty: sessions and queues gone, as with a broker without persistence or killed before its
autosave. The collector comes back, and every produced id is counted in InfluxDB.

- ``publish.delivery: collector`` (the default): the agent kept everything the collector had not
  confirmed, sends it again after the reconnect (or the confirmation timeout), and InfluxDB ends
  up with every produced id exactly once.
- ``publish.delivery: broker`` (an observation leaves the spool at the broker's PUBACK; the only
  behaviour before the confirmations existed) loses what the broker had queued: the same
  scenario shows the fault the test above guards against.

And two collectors on one shared subscription: each confirms what it stored.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edgeprobe.agent.config import AgentConfig
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import CollectorStats, run_collector
from edgeprobe.configfile import convert
from edgeprobe.localstack import InfluxServer, MosquittoServer, free_port
from tests.e2e.test_agent_faults import BROKER_CONFIG, DRAIN_TIMEOUT_S, RunningAgent, agent_dict, eventually
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

QUEUED_AT_KILL = 200  # observations the broker holds for the stopped collector when it is killed
CONFIRM_TIMEOUT_S = 3.0  # the agent's publish.confirm_timeout_s: sends again after 3-6 s without one


class Collector:
    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.stats = CollectorStats()
        self.task: asyncio.Task[CollectorStats] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self.stop.clear()
        self.stats = CollectorStats()
        self.task = asyncio.create_task(run_collector(self.cfg, stop=self.stop, stats=self.stats, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 30)  # subscribed

    async def finish(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)


async def crash_scenario(
    influxdb: InfluxServer, db: str, tmp_path: Path, delivery: str
) -> tuple[set[str], Counter[str], dict[str, Any]]:
    """Run the scenario of the module docstring; return (produced ids, ids stored with their point
    counts, figures)."""
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG, persistence=False) as broker:
        collector = Collector(
            convert(
                {
                    "name": f"crash-{db}",
                    "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                    "influx": {"api": "v1", "url": influxdb.url, "database": db, "flush_interval_s": 0.2},
                    "spool": {"path": str(tmp_path / "collector-spool.sqlite")},
                },
                CollectorConfig,
                "t",
            )
        )
        await collector.start()
        spool = tmp_path / "agent-spool.db"
        raw = agent_dict(broker, spool, f"bc-{delivery}", delivery=delivery, confirm_timeout_s=CONFIRM_TIMEOUT_S)
        agent = RunningAgent(convert(raw, AgentConfig, "t"))
        try:
            handles = await agent.start()
            stats = handles.publisher.stats
            await eventually(lambda: stats.acknowledged_observations > 50, what="delivering")
            await collector.finish()  # its persistent session stays: the broker queues for it
            at_stop = stats.broker_acknowledged
            await eventually(
                lambda: stats.broker_acknowledged >= at_stop + QUEUED_AT_KILL,
                what=f"{QUEUED_AT_KILL} observations acknowledged by the broker while the collector is away",
            )
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGKILL)
            queued_at_kill = stats.broker_acknowledged - at_stop
            unconfirmed_at_kill = stats.unconfirmed
            await broker.astop(keep_state=True)  # reaps the killed process; nothing was persisted
            await broker.astart()
            await collector.start()
            held = len(handles.spool)
            delivered = stats.acknowledged_observations
            # Everything from before the kill is delivered and the agent delivers live again.
            await eventually(
                lambda: stats.acknowledged_observations > delivered + held, DRAIN_TIMEOUT_S, "live delivery"
            )
            handles = await agent.finish()
            produced = {o.id for o in agent.produced}
            await collector.finish()  # flushes its spool to InfluxDB (limits.shutdown_flush_s)
        finally:
            agent.stop.set()
            collector.stop.set()

    def stored_ids() -> Counter[str]:
        return Counter(r["id"] for r in influxdb.rows('SELECT "id" FROM "edgeprobe_icmp"', db))

    if delivery == "collector":
        stored = await wait_for_async(
            lambda: asyncio.to_thread(stored_ids),
            DRAIN_TIMEOUT_S,
            f"the {len(produced)} produced ids in InfluxDB",
            until=lambda ids: produced <= set(ids),
            interval_s=0.3,
        )
    else:  # some are lost: nothing to wait for beyond the collector's flush at its stop
        assert collector.stats.spool_lines == 0, "the collector stopped with points not written"
        stored = await asyncio.to_thread(stored_ids)
    figures = {
        "queued_at_kill": queued_at_kill,
        "unconfirmed_at_kill": unconfirmed_at_kill,
        "resent": handles.publisher.stats.resent_unconfirmed,
        "confirm_timeouts": handles.publisher.stats.confirm_timeouts,
        "left_in_spool": len(handles.spool),
    }
    return produced, stored, figures


async def test_broker_killed_without_persistence_loses_nothing(
    influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    produced, stored, fig = await crash_scenario(influxdb, influx_db, tmp_path, "collector")
    lost = produced - set(stored)
    copies = max(stored.values(), default=0)
    print(
        f"\nbroker SIGKILLed (no persistence) with {fig['queued_at_kill']} observations queued for the stopped "
        f"collector ({fig['unconfirmed_at_kill']} unconfirmed at the agent): produced {len(produced)}, "
        f"stored {len(stored)}, lost {len(lost)}, max copies {copies}; sent again {fig['resent']} "
        f"(confirmation timeouts {fig['confirm_timeouts']})"
    )
    assert fig["queued_at_kill"] >= QUEUED_AT_KILL and fig["unconfirmed_at_kill"] > 0
    assert not lost, f"{len(lost)} observations lost"
    assert set(stored) == produced and copies == 1
    assert fig["resent"] >= fig["unconfirmed_at_kill"] and fig["left_in_spool"] == 0


async def test_with_delivery_broker_the_same_crash_loses_what_the_broker_held(
    influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    produced, stored, fig = await crash_scenario(influxdb, influx_db, tmp_path, "broker")
    lost = produced - set(stored)
    print(
        f"\ndelivery broker, broker SIGKILLed with {fig['queued_at_kill']} queued: produced {len(produced)}, "
        f"stored {len(stored)}, lost {len(lost)}"
    )
    assert len(lost) >= QUEUED_AT_KILL  # what only the broker had: gone with it


async def test_two_collectors_on_a_shared_subscription_each_confirm_what_they_stored(
    influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    """``$share/…``: an agent's messages are spread over the collectors; whichever stored a message
    confirms it, so nothing waits for a timeout and nothing is sent again."""
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        collectors = [
            Collector(
                convert(
                    {
                        "name": f"shared-{i}-{influx_db}",
                        "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                        "subscription": {"shared_group": "edgeprobe-collectors"},
                        "influx": {"api": "v1", "url": influxdb.url, "database": influx_db, "flush_interval_s": 0.2},
                        "spool": {"path": str(tmp_path / f"collector-{i}.sqlite")},
                    },
                    CollectorConfig,
                    "t",
                )
            )
            for i in range(2)
        ]
        for c in collectors:
            await c.start()
        spool = tmp_path / "agent-spool.db"
        raw = agent_dict(broker, spool, "bc-shared", delivery="collector", batch_max_observations=20)
        agent = RunningAgent(convert(raw, AgentConfig, "t"))
        try:
            handles = await agent.start()
            stats = handles.publisher.stats
            await eventually(
                lambda: all(c.stats.confirmed_batches >= 5 for c in collectors), what="both collectors confirming"
            )
            handles = await agent.finish()
            produced = {o.id for o in agent.produced}
        finally:
            agent.stop.set()
            for c in collectors:
                await c.finish()
    stored = Counter(r["id"] for r in influxdb.rows('SELECT "id" FROM "edgeprobe_icmp"', influx_db))
    confirmed = [c.stats.confirmed_batches for c in collectors]
    print(
        f"\nshared subscription: {stats.published_messages} messages, confirmed {confirmed} by the two collectors; "
        f"produced {len(produced)}, stored {len(stored)}; sent again {stats.resent_unconfirmed}"
    )
    assert sum(confirmed) == stats.published_messages and min(confirmed) > 0
    assert stats.confirm_timeouts == 0 and stats.resent_unconfirmed == 0 and stats.bad_confirmations == 0
    assert set(stored) == produced and max(stored.values()) == 1 and len(handles.spool) == 0
