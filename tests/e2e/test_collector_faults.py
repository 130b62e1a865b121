"""Fault injection on the real mosquitto and influxd: nothing lost, nothing duplicated.

A steady publisher (plain aiomqtt, QoS 1, envelopes of observations with known ids) feeds the
collector while a fault is injected and removed; then the ids stored in InfluxDB are counted
against the ids the broker acknowledged to the publisher.

The default suite runs short outages (``OUTAGE_S``, 2 s). The long versions::

    EDGEPROBE_FAULT_OUTAGE_S=60 EDGEPROBE_FAULT_RESTART_S=10 \\
        .venv/bin/pytest -s tests/e2e/test_collector_faults.py

(``-s`` shows the figures each scenario prints.)
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import CollectorStats, run_collector
from edgeprobe.configfile import convert
from edgeprobe.localstack import InfluxServer, MosquittoServer
from edgeprobe.schema import obs_topic
from tests.support.paths import GOLDEN, REPO
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

OUTAGE_S = float(os.environ.get("EDGEPROBE_FAULT_OUTAGE_S", "2"))
RESTART_S = float(os.environ.get("EDGEPROBE_FAULT_RESTART_S", "2"))
KILLS = int(os.environ.get("EDGEPROBE_FAULT_KILLS", "3"))
# mosquitto keeps at most 1000 messages per offline client by default and drops the rest: a
# collector away for long would lose data at the broker. Production brokers need this too.
BROKER_CONFIG = ["max_queued_messages 1000000", "max_inflight_messages 20"]


def _templates() -> list[dict[str, Any]]:
    out = []
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        out.extend(json.loads(path.read_text())["observations"])
    return out


class SteadyPublisher:
    """Publishes an envelope of ``per_message`` observations every ``interval_s`` at QoS 1.

    ``published`` holds the ids of observations whose message the broker acknowledged.
    """

    def __init__(self, broker: MosquittoServer, prefix: str, per_message: int = 5, interval_s: float = 0.02) -> None:
        self.broker = broker
        self.topic = obs_topic(prefix, "pop1", "a1")
        self.per_message = per_message
        self.interval_s = interval_s
        self.templates = _templates()
        self.seq = 0
        self.base_ns = time.time_ns()
        self.published: list[str] = []
        self.messages = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _obs(self) -> dict[str, Any]:
        o = copy.deepcopy(self.templates[self.seq % len(self.templates)])
        o["id"] = uuid.uuid4().hex
        o["seq"] = self.seq
        o["started_at_ns"] = self.base_ns + self.seq * 1000  # unique per point
        self.seq += 1
        return o

    async def _run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"pub-{uuid.uuid4().hex[:8]}") as c:
            while not self.stop.is_set():
                obs = [self._obs() for _ in range(self.per_message)]
                env = {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": time.time_ns(), "observations": obs}
                await c.publish(self.topic, json.dumps(env).encode(), qos=1)
                self.published.extend(o["id"] for o in obs)
                self.messages += 1
                await asyncio.sleep(self.interval_s)  # the publisher's pace: the steady stream

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


async def stored_ids(influxdb: InfluxServer, db: str) -> Counter[str]:
    rows = await asyncio.to_thread(influxdb.rows, 'SELECT "id" FROM /^edgeprobe_/', db)
    return Counter(r["id"] for r in rows)


async def wait_for_ids(influxdb: InfluxServer, db: str, want: set[str], timeout_s: float) -> tuple[Counter[str], float]:
    """Poll InfluxDB until it holds every id in ``want``; returns the ids and the seconds it took."""
    t0 = time.monotonic()
    last: Counter[str] = Counter()

    async def ids() -> Counter[str]:
        nonlocal last
        last = await stored_ids(influxdb, db)
        return last

    got = await wait_for_async(
        ids,
        timeout_s,
        lambda: f"all {len(want)} published ids in InfluxDB ({len(want - set(last))} still missing)",
        until=lambda stored: want <= set(stored),
        interval_s=0.25,
    )
    return got, time.monotonic() - t0


def verdict(name: str, published: list[str], ids: Counter[str], drain_s: float, extra: str = "") -> None:
    lost = set(published) - set(ids)
    dup = sum(c - 1 for c in ids.values() if c > 1)
    unexpected = set(ids) - set(published)
    print(
        f"\n{name}: published {len(published)} observations, stored {len(ids)}, lost {len(lost)}, "
        f"duplicated {dup}, unexpected {len(unexpected)}; drained {drain_s:.1f} s after the stream ended{extra}"
    )
    assert not lost, f"{len(lost)} observations lost"
    assert dup == 0 and not unexpected


async def eventually(
    check: Callable[[], bool], timeout_s: float = 30.0, what: str | Callable[[], str] = "condition"
) -> None:
    await wait_for_async(check, timeout_s, what)


def config_dict(
    broker: MosquittoServer, influx: InfluxServer, db: str, tmp: Path, **influx_extra: Any
) -> dict[str, Any]:
    return {
        "name": f"faults-{db}",
        "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "influx": {
            "url": influx.url,
            "database": db,
            "flush_interval_s": 0.2,
            "timeout_s": 1.0,
            "retry_min_s": 0.1,
            "retry_max_s": 1.0,
            **influx_extra,
        },
        "spool": {"path": str(tmp / "spool.sqlite")},
        "health_interval_s": 0.5,
        "limits": {"shutdown_flush_s": 5},
    }


# ---- the broker's queue for an offline collector ---------------------------------------------------


async def test_max_queued_messages_limits_what_the_broker_keeps(tmp_path: Path) -> None:
    """Why BROKER_CONFIG (and the README) raise mosquitto's per-client queue limit."""
    async with MosquittoServer(extra_config=["max_queued_messages 5"]) as broker:
        async with aiomqtt.Client(broker.host, broker.port, identifier="offline-sub", clean_session=False) as sub:
            await sub.subscribe("q/#", qos=1)
        async with aiomqtt.Client(broker.host, broker.port, identifier="pub") as pub:
            for i in range(20):
                await pub.publish("q/x", str(i).encode(), qos=1)
        got: list[bytes] = []
        async with aiomqtt.Client(broker.host, broker.port, identifier="offline-sub", clean_session=False) as sub:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    async for message in sub.messages:
                        got.append(bytes(message.payload))  # type: ignore[arg-type]
    assert len(got) == 5  # the other 15 were dropped by the broker (the default is 1000)


# ---- InfluxDB down ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stopped", "paused"])
async def test_influxdb_outage_loses_nothing(fresh_influxdb: InfluxServer, tmp_path: Path, how: str) -> None:
    db = "faults"
    async with MosquittoServer(extra_config=BROKER_CONFIG) as broker:
        await asyncio.to_thread(fresh_influxdb.create_database, db)
        cfg = convert(config_dict(broker, fresh_influxdb, db, tmp_path), CollectorConfig, "test")
        stats = CollectorStats()
        stop = asyncio.Event()
        task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
        pub = SteadyPublisher(broker, cfg.broker.topic_prefix)
        try:
            await eventually(lambda: stats.connects >= 1, what="collector subscribed")
            pub.start()
            await eventually(lambda: stats.written_points > 50, what="points before the outage")
            if how == "stopped":
                await fresh_influxdb.astop(keep_state=True)
            else:
                fresh_influxdb.pause()
            t0 = time.monotonic()
            await asyncio.sleep(OUTAGE_S)  # the outage: the scenario
            max_depth = stats.spool_lines
            if how == "stopped":
                await fresh_influxdb.astart()
            else:
                fresh_influxdb.resume()
            outage_s = time.monotonic() - t0
            writes = stats.writes
            await eventually(lambda: stats.writes > writes, what="a write after the outage (the stream still on)")
            await pub.finish()
            ids, drain_s = await wait_for_ids(fresh_influxdb, db, set(pub.published), 60 + OUTAGE_S)
        finally:
            if fresh_influxdb.paused:
                fresh_influxdb.resume()
            stop.set()
            await asyncio.wait_for(task, 60)
        verdict(
            f"InfluxDB {how} {outage_s:.1f} s",
            pub.published,
            ids,
            drain_s,
            f"; spool peaked at >= {max_depth} lines; {stats.write_retries} write retries",
        )
        assert stats.write_retries > 0 and max_depth > 0
        assert stats.spool_lines == 0 and stats.dead_lettered == 0
        # The outage shows in the collector's own health points (what Grafana would plot).
        rows = await asyncio.to_thread(
            fresh_influxdb.rows,
            "SELECT max(spool_depth), max(write_retries), max(spool_oldest_age_s) FROM edgeprobe_health "
            "WHERE source = 'collector'",
            db,
        )
        assert rows and rows[0]["max"] > 0 and rows[0]["max_1"] > 0 and rows[0]["max_2"] >= OUTAGE_S * 0.5


# ---- the spool refuses a commit: nothing is acknowledged, the broker sends again ---------------------


async def test_failed_spool_commits_are_not_acknowledged(
    influxdb: InfluxServer, influx_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic proof of ack-after-commit: with paho acknowledging on receipt, the messages
    of the failed commits would be gone; here the broker re-sends them after the reconnect."""
    from edgeprobe.collector import spool as spool_mod

    real_append = spool_mod.Spool.append
    failures = {"left": 3}

    def flaky_append(self: spool_mod.Spool, lines: Any, received_at_ns: int | None = None) -> None:
        if failures["left"] > 0 and any("edgeprobe_health" not in line for line in lines):
            failures["left"] -= 1
            raise spool_mod.SpoolError("spool: disk I/O error (injected)")
        real_append(self, lines, received_at_ns)

    monkeypatch.setattr(spool_mod.Spool, "append", flaky_append)
    async with MosquittoServer(extra_config=BROKER_CONFIG) as broker:
        cfg = convert(config_dict(broker, influxdb, influx_db, tmp_path), CollectorConfig, "test")
        stats = CollectorStats()
        stop = asyncio.Event()
        task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
        pub = SteadyPublisher(broker, cfg.broker.topic_prefix, interval_s=0.05)
        try:
            await eventually(lambda: stats.connects >= 1, what="collector subscribed")
            pub.start()
            await eventually(lambda: failures["left"] == 0 and stats.connects >= 4, what="three failed commits")
            acknowledged = stats.acknowledged_messages
            await eventually(
                lambda: stats.acknowledged_messages > acknowledged, what="a commit after the failures (stream still on)"
            )
            await pub.finish()
            ids, drain_s = await wait_for_ids(influxdb, influx_db, set(pub.published), 30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        verdict("three failed spool commits", pub.published, ids, drain_s, f"; {stats.connects} sessions")
        assert stats.spool_errors >= 3 and stats.received_messages > pub.messages  # re-sent by the broker


# ---- the collector killed -------------------------------------------------------------------------


COLLECTOR_RUN = [sys.executable, "-m", "edgeprobe.cli", "collector", "run"]


class CollectorProcess:
    """``edgeprobe collector run`` as a child process (so it can be SIGKILLed)."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.config_path = tmp / "collector.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp / "collector.log"
        self.ready_path = tmp / "collector.ready"  # --ready-file: the pid of a subscribed collector
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*COLLECTOR_RUN, "-c", str(self.config_path), "--ready-file", str(self.ready_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def _ready_pid(self) -> str:
        try:
            return self.ready_path.read_text()
        except FileNotFoundError:
            return ""

    async def wait_ready(self) -> None:
        """Until this start's collector is subscribed (its ready file holds its pid, not a killed one's)."""
        assert self.proc is not None
        pid = f"{self.proc.pid}\n"
        await eventually(
            lambda: self._ready_pid() == pid, 30, lambda: f"collector start #{self.starts} ready:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


async def test_collector_sigkill_loses_nothing(influxdb: InfluxServer, influx_db: str, tmp_path: Path) -> None:
    """SIGKILL mid-stream, KILLS times, restart after RESTART_S: what the broker was told is safe is."""
    async with MosquittoServer(extra_config=BROKER_CONFIG) as broker:
        col = CollectorProcess(config_dict(broker, influxdb, influx_db, tmp_path), tmp_path)
        pub = SteadyPublisher(broker, "edgeprobe", per_message=5, interval_s=0.005)
        try:
            col.start()
            await col.wait_ready()
            pub.start()
            for _ in range(KILLS):
                await asyncio.sleep(1.0)  # the scenario: killed after a second of the stream
                col.kill()
                await asyncio.sleep(RESTART_S)  # the scenario: down for RESTART_S
                col.start()
                await col.wait_ready()
            await asyncio.sleep(1.0)  # the scenario: a second of the stream after the last restart
            await pub.finish()
            ids, drain_s = await wait_for_ids(influxdb, influx_db, set(pub.published), 60 + RESTART_S)
        finally:
            if pub.task is not None and not pub.task.done():
                pub.task.cancel()
            code = col.terminate()
        assert code == 0, col.log_tail()
        verdict(
            f"collector SIGKILLed {KILLS} times, restarted after {RESTART_S:g} s each time",
            pub.published,
            ids,
            drain_s,
            f"; {pub.messages} messages",
        )


async def test_collector_killed_while_influxdb_is_down(fresh_influxdb: InfluxServer, tmp_path: Path) -> None:
    """What the spool holds survives a SIGKILL and is written once InfluxDB is back."""
    db = "faults"
    async with MosquittoServer(extra_config=BROKER_CONFIG) as broker:
        await asyncio.to_thread(fresh_influxdb.create_database, db)
        col = CollectorProcess(config_dict(broker, fresh_influxdb, db, tmp_path), tmp_path)
        pub = SteadyPublisher(broker, "edgeprobe")
        try:
            col.start()
            await col.wait_ready()
            pub.start()
            before = await wait_for_async(
                lambda: stored_ids(fresh_influxdb, db), 30, "points in InfluxDB before the outage", until=len
            )
            await fresh_influxdb.astop(keep_state=True)
            await asyncio.sleep(OUTAGE_S / 2)  # the scenario: InfluxDB down, the spool fills
            col.kill()  # the spool holds everything since InfluxDB went down
            await asyncio.sleep(RESTART_S)  # the scenario: the collector down for RESTART_S
            col.start()
            await col.wait_ready()
            await asyncio.sleep(OUTAGE_S / 2)  # the scenario: the rest of the InfluxDB outage
            await fresh_influxdb.astart()
            await wait_for_async(
                lambda: stored_ids(fresh_influxdb, db),
                30,
                "new points in InfluxDB after the outage (the stream still on)",
                until=lambda ids: len(ids) > len(before),
            )
            await pub.finish()
            ids, drain_s = await wait_for_ids(fresh_influxdb, db, set(pub.published), 60 + OUTAGE_S)
        finally:
            if pub.task is not None and not pub.task.done():
                pub.task.cancel()
            code = col.terminate()
        assert code == 0, col.log_tail()
        assert "lines from before: writing them first" in col.log_path.read_text()
        verdict("collector SIGKILLed while InfluxDB was down", pub.published, ids, drain_s)
