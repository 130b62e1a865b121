"""Fault injection on the agent side, on a real mosquitto: nothing spooled is ever lost.

Each scenario runs an agent producing steadily (ICMP to ten loopback addresses every 0.1 s,
about 100 observations/s) with its SQLite spool, injects a fault, restores, waits for the drain
and counts the ids a persistent subscriber received against the agent's own record (``tap``
in-process; for the killed agent, the spool's commit log).

- broker stopped (``stop(keep_state=True)``, then ``astart()`` on the same port with its
  sessions) — also end to end through the collector into InfluxDB, counted exactly;
- agent killed with SIGKILL while it holds a backlog, then restarted;
- broker frozen with SIGSTOP (the TCP connection stays up, nothing answers: the agent must time
  out on the PUBACK, reconnect after SIGCONT, and re-send).

MQTT at QoS 1 is at least once: a message the broker received but whose PUBACK the agent never
saw (the connection died first) is sent again, so the subscriber may count an id twice. The
tests accept a duplicate only when it is such a re-send (the publisher's ``on_release`` saw
it go back to the spool, or it was in the killed agent's spool) and print how many there were;
InfluxDB stores it once (the end-to-end variant counts exactly).

The default suite runs short outages (``EDGEPROBE_FAULT_OUTAGE_S``, 3 s). The long versions::

    EDGEPROBE_FAULT_OUTAGE_S=60 .venv/bin/pytest -s tests/e2e/test_agent_faults.py

(``-s`` shows the figures each scenario prints.)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.daemon import AgentHandles, run_agent
from edgeprobe.agent.spool import SpoolEntry, inspect_spool
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import run_collector
from edgeprobe.configfile import convert
from edgeprobe.localstack import InfluxServer, MosquittoServer, free_port
from edgeprobe.schema import AgentHealth, Envelope, Observation
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

OUTAGE_S = float(os.environ.get("EDGEPROBE_FAULT_OUTAGE_S", "3"))
BROKER_CONFIG = ["max_queued_messages 1000000", "max_inflight_messages 20"]
TARGETS = [f"127.0.0.{i}" for i in range(1, 11)]
DRAIN_TIMEOUT_S = 60 + OUTAGE_S


def agent_dict(broker: MosquittoServer, spool: Path, agent_id: str = "f-a1", **publish: Any) -> dict[str, Any]:
    return {
        "agent": {"id": agent_id, "site": "lab", "shutdown_grace_s": 1.0},
        "broker": {
            "url": broker.url,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            "connect_timeout_s": 2,
            "keepalive_s": 5,
        },
        "publish": {
            "flush_interval_s": 0.2,
            "ack_timeout_s": 1.5,
            "health_interval_s": 0.5,
            "flush_timeout_s": 10,
            # The subscriber below is no collector (no confirmations on …/ack): observations leave
            # the spool on the broker's PUBACK, except where a test passes delivery="collector".
            "delivery": "broker",
            **publish,
        },
        "spool": {"path": str(spool)},
        "jobs": [
            {"kind": "icmp", "targets": TARGETS, "interval_s": 0.1, "options": {"count": 1, "timeout_s": 0.05}}
        ],
    }


class Subscriber:
    """A persistent-session subscriber counting every observation id it receives, in order.

    An agent re-send is a new message (a new envelope, ``sent_at_ns`` included); a message that
    arrives twice byte for byte was re-delivered by the broker itself and is counted apart.
    """

    def __init__(self, broker: MosquittoServer, agent_id: str) -> None:
        self.broker = broker
        self.agent_id = agent_id
        self.identifier = f"fault-sub-{agent_id}"
        self.ids: list[str] = []
        self.seq_of: dict[str, int] = {}
        self.health: list[AgentHealth] = []
        self.redelivered = 0  # messages received twice byte for byte (broker → subscriber re-delivery)
        self.unreadable = 0  # obs messages that do not decode (a collector rejects them whole)
        self._payloads: set[bytes] = set()
        self.task: asyncio.Task[None] | None = None

    async def register(self) -> None:
        """Create the persistent session: from now on the broker queues for it."""
        async with aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=self.identifier, clean_session=False
        ) as client:
            await client.subscribe(f"edgeprobe/v1/lab/{self.agent_id}/#", qos=1)

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    identifier=self.identifier,
                    clean_session=False,
                    keepalive=5,
                    timeout=2,
                ) as client:
                    await client.subscribe(f"edgeprobe/v1/lab/{self.agent_id}/#", qos=1)
                    async for msg in client.messages:
                        payload = bytes(msg.payload)  # type: ignore[arg-type]
                        topic = str(msg.topic)
                        if topic.endswith("/obs"):
                            digest = hashlib.sha256(payload).digest()
                            if digest in self._payloads:
                                # The same message again: the broker re-delivering to us (its
                                # PUBACK from us was lost with the restart), not an agent re-send.
                                self.redelivered += 1
                                continue
                            self._payloads.add(digest)
                            try:
                                envelope = msgspec.json.decode(payload, type=Envelope)
                            except msgspec.DecodeError:
                                self.unreadable += 1  # every observation in it is lost
                                continue
                            for o in envelope.observations:
                                self.ids.append(o.id)
                                self.seq_of[o.id] = o.seq
                        elif topic.endswith("/health"):
                            self.health.append(msgspec.json.decode(payload, type=AgentHealth))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)  # retry pace while the broker is down

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def wait_for(self, want: set[str], timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        t0 = time.monotonic()
        await wait_for_async(
            lambda: want <= set(self.ids),
            timeout_s,
            lambda: f"all {len(want)} ids at the subscriber ({len(want - set(self.ids))} still missing)",
            interval_s=0.1,
        )
        return time.monotonic() - t0

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def ids_of(entries: list[SpoolEntry]) -> list[str]:
    return [msgspec.json.decode(e.payload, type=Observation).id for e in entries]


async def eventually(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    await wait_for_async(check, timeout_s, what)


class RunningAgent:
    """An in-process agent with a record of what it produced and what it had to re-send."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.produced: list[Observation] = []
        self.released: set[str] = set()
        self.stop = asyncio.Event()
        self.handles: AgentHandles | None = None
        self.task: asyncio.Task[AgentHandles] | None = None
        self.max_depth = 0
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> AgentHandles:
        started: asyncio.Future[AgentHandles] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(
            run_agent(
                self.cfg, build_jobs(self.cfg, "t"), stop=self.stop, started=started, tap=self.produced.append
            )
        )
        self.handles = await started
        self.handles.publisher.on_release = lambda entries: self.released.update(ids_of(entries))
        self._watch = asyncio.create_task(self._watch_depth())
        return self.handles

    async def _watch_depth(self) -> None:
        while True:
            assert self.handles is not None
            self.max_depth = max(self.max_depth, len(self.handles.spool))
            await asyncio.sleep(0.05)  # a sample of the spool depth every 50 ms: a measurement

    async def wait_drained(self, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Seconds until the spool holds no more than one flush interval's worth."""
        assert self.handles is not None
        t0 = time.monotonic()
        await eventually(lambda: self.handles is not None and len(self.handles.spool) < 100, timeout_s, "drain")
        return time.monotonic() - t0

    async def wait_live(self, timeout_s: float = 30.0) -> None:
        """Until an observation produced from now on is acknowledged: the backlog is gone and the
        agent delivers live again (the spool is FIFO, so more acks than it holds now means that)."""
        assert self.handles is not None
        stats, held = self.handles.publisher.stats, len(self.handles.spool)
        acknowledged = stats.acknowledged_observations
        await eventually(
            lambda: stats.acknowledged_observations > acknowledged + held, timeout_s, "live observations acknowledged"
        )

    async def finish(self) -> AgentHandles:
        self.stop.set()
        assert self.task is not None and self._watch is not None
        handles = await asyncio.wait_for(self.task, 30)
        self._watch.cancel()
        return handles


def check_delivery(
    name: str, produced: list[str], sub: Subscriber, resent: set[str], extra: str = "", only_produced: bool = False
) -> None:
    received = [i for i in sub.ids if i in set(produced)] if only_produced else sub.ids
    counts = Counter(received)
    lost = set(produced) - set(counts)
    dups = {i: c for i, c in counts.items() if c > 1}
    unexplained = set(dups) - resent
    unexpected = set(counts) - set(produced)
    print(
        f"\n{name}: produced {len(produced)}, received {len(counts)} distinct, lost {len(lost)}, "
        f"received twice {len(dups)} (all re-sends of unacknowledged batches: {not unexplained}), "
        f"unexpected {len(unexpected)}, messages re-delivered by the broker {sub.redelivered}{extra}"
    )
    assert not lost, f"{len(lost)} observations lost"
    assert not unexpected
    assert not unexplained, f"{len(unexplained)} duplicates that were never re-sent"


# ---- (a) broker stopped -----------------------------------------------------------------------------


async def test_broker_down_then_back_loses_nothing(tmp_path: Path) -> None:
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        sub = Subscriber(broker, "f-a1")
        await sub.register()
        sub.start()
        cfg = convert(agent_dict(broker, tmp_path / "spool.db"), AgentConfig, "t")
        agent = RunningAgent(cfg)
        try:
            handles = await agent.start()
            await eventually(lambda: handles.publisher.stats.acknowledged_observations > 50, what="publishing")
            await broker.astop(keep_state=True)
            t_down = time.monotonic()
            await asyncio.sleep(OUTAGE_S)  # the outage: the scenario
            backlog = len(handles.spool)
            await broker.astart()
            down_s = time.monotonic() - t_down
            drain_s = await agent.wait_drained()
            await agent.wait_live()
            handles = await agent.finish()
            produced = [o.id for o in agent.produced]
            await sub.wait_for(set(produced))
        finally:
            await sub.close()
            if not agent.stop.is_set():
                agent.stop.set()
    stats = handles.publisher.stats
    check_delivery(
        f"broker down {down_s:.1f} s",
        produced,
        sub,
        agent.released,
        f"; backlog {backlog} at restart (max spool depth {agent.max_depth}), drained in {drain_s:.1f} s "
        f"(replay at most {cfg.publish.replay_max_per_s:g}/s, throttled {stats.replay_throttled_s:.1f} s), "
        f"publish failures {stats.publish_failures}, reconnects {stats.reconnects}",
    )
    assert backlog > 0 and stats.reconnects >= 1
    assert handles.spool.dropped == 0 and len(handles.spool) == 0
    # Health: the first message after the reconnect shows the backlog and its age.
    after = [h for h in sub.health if h.reconnects >= 1]
    assert after, "no health message after the reconnect"
    assert after[0].spool_depth > 0 and (after[0].spool_oldest_age_s or 0) >= OUTAGE_S / 2
    last = sub.health[-1]
    assert last.spool_durable and last.produced > 0 and last.acknowledged > 0 and last.dropped_bytes_limit == 0


# ---- (c) broker frozen (SIGSTOP): the connection stays up, nothing answers ------------------------------


async def test_broker_frozen_then_thawed_loses_nothing(tmp_path: Path) -> None:
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        sub = Subscriber(broker, "f-a3")
        await sub.register()
        sub.start()
        cfg = convert(agent_dict(broker, tmp_path / "spool.db", "f-a3"), AgentConfig, "t")
        agent = RunningAgent(cfg)
        try:
            handles = await agent.start()
            await eventually(lambda: handles.publisher.stats.acknowledged_observations > 50, what="publishing")
            failures_before = handles.publisher.stats.publish_failures
            broker.pause()
            t_pause = time.monotonic()
            try:
                await asyncio.sleep(OUTAGE_S)  # the freeze: the scenario
                detected = handles.publisher.stats.publish_failures > failures_before
                backlog = len(handles.spool)
            finally:
                broker.resume()
            frozen_s = time.monotonic() - t_pause
            drain_s = await agent.wait_drained()
            await agent.wait_live()
            handles = await agent.finish()
            produced = [o.id for o in agent.produced]
            await sub.wait_for(set(produced))
        finally:
            await sub.close()
            if not agent.stop.is_set():
                agent.stop.set()
    stats = handles.publisher.stats
    check_delivery(
        f"broker frozen {frozen_s:.1f} s",
        produced,
        sub,
        agent.released,
        f"; backlog {backlog} at thaw, drained in {drain_s:.1f} s, "
        f"publish failures {stats.publish_failures}, reconnects {stats.reconnects}",
    )
    assert detected, "no PUBACK timeout while the broker was frozen"
    assert stats.reconnects >= 1 and handles.spool.dropped == 0 and len(handles.spool) == 0


# ---- (b) agent killed with SIGKILL, restarted ----------------------------------------------------------


def spool_ids(path: Path) -> list[str]:
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT payload FROM spool ORDER BY rowid").fetchall()
    return [msgspec.json.decode(bytes(p), type=Observation).id for (p,) in rows]


async def test_agent_killed_loses_only_what_was_in_flight(tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    commit_log = tmp_path / "committed.ids"
    conf = tmp_path / "agent.yaml"
    exe = str(Path(sys.executable).with_name("edgeprobe"))
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        raw = agent_dict(broker, spool, "f-a2")
        raw["spool"]["commit_log"] = str(commit_log)
        cfg_commit_max = 1000  # spool.commit_max_observations: at most one group can miss the log
        conf.write_text(msgspec.json.encode(raw).decode())  # JSON is YAML
        sub = Subscriber(broker, "f-a2")
        await sub.register()
        sub.start()
        log1, log2 = (tmp_path / "run1.log").open("wb"), (tmp_path / "run2.log").open("wb")
        proc = await asyncio.create_subprocess_exec(exe, "agent", "run", "-c", str(conf), stderr=log1)
        try:
            await eventually(lambda: len(sub.ids) > 50, what="first run publishing")
            # The broker goes away so the agent builds a backlog, then the agent is killed.
            await broker.astop(keep_state=True)
            await asyncio.sleep(OUTAGE_S)  # the outage: the scenario
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed_at_ns = time.time_ns()
            committed_1 = commit_log.read_text().split()
            in_spool_at_kill = spool_ids(spool)
            info = inspect_spool(spool)
            await broker.astart()
            received_before_restart = len(sub.ids)
            proc = await asyncio.create_subprocess_exec(exe, "agent", "run", "-c", str(conf), stderr=log2)
            t_restart = time.monotonic()
            await sub.wait_for(set(committed_1))
            replay_s = time.monotonic() - t_restart
            # The second run delivers its own observations too: its health says it acknowledged more
            # than the backlog it started with (health follows the acknowledged obs on one connection).
            backlog_at_restart = len(in_spool_at_kill)
            await eventually(
                lambda: any(h.started_at_ns > killed_at_ns and h.acknowledged > backlog_at_restart for h in sub.health),
                what="the restarted agent delivering its own observations",
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            committed = commit_log.read_text().split()
            await sub.wait_for(set(committed))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log1.close()
            log2.close()
            await sub.close()
    assert info.in_use_by_pid is None and info.depth == len(in_spool_at_kill) > 0
    # Nothing the first run had committed to its spool is lost; duplicates only among what was
    # still in the spool at the kill (sent, PUBACK maybe received, delete not yet committed).
    run1 = set(committed_1)
    check_delivery(
        f"agent killed after {OUTAGE_S:g} s without broker",
        committed,
        sub,
        set(in_spool_at_kill),
        f"; {len(in_spool_at_kill)} in its spool at the kill, replayed in {replay_s:.1f} s after the restart",
        only_produced=True,
    )
    # Lost at the kill: first-run observations never committed. Their seqs can only be the last ones.
    seqs1 = sorted(sub.seq_of[i] for i in run1)
    received_run1_seqs = {sub.seq_of[i] for i in sub.ids[:received_before_restart]} | set(seqs1)
    missing = set(range(max(seqs1) + 1)) - received_run1_seqs
    extra = set(sub.ids) - set(committed)
    print(
        f"first run: {len(run1)} committed, highest committed seq {max(seqs1)}, lower seqs never committed "
        f"(in flight at the kill) {len(missing)}; received but not in the commit log {len(extra)}"
    )
    # A run that started before the last committed one may still have been in flight (one per target).
    assert all(s > max(seqs1) - len(TARGETS) for s in missing), f"lost long before the kill: {sorted(missing)[:10]}"
    assert len(extra) <= cfg_commit_max, "more received than the kill can explain"
    # The restarted agent sent its backlog first: every old id before any new one.
    # (The first run's spool may hold a group the commit log missed at the kill: old, not new.)
    backlog = set(in_spool_at_kill)
    new = [n for n, i in enumerate(sub.ids) if n >= received_before_restart and i not in run1 and i not in backlog]
    old = [n for n, i in enumerate(sub.ids) if n >= received_before_restart and i in backlog]
    assert old and new and max(old) < min(new), "the restarted agent did not drain its spool first"


# ---- end to end: broker stopped, counted in InfluxDB ---------------------------------------------------


async def test_broker_down_end_to_end_exactly_once_in_influxdb(
    influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        ccfg = convert(
            {
                "name": f"agent-faults-{influx_db}",
                "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
                "influx": {"api": "v1", "url": influxdb.url, "database": influx_db, "flush_interval_s": 0.2},
                "spool": {"path": str(tmp_path / "collector-spool.sqlite")},
            },
            CollectorConfig,
            "t",
        )
        collector_stop, collector_ready = asyncio.Event(), asyncio.Event()
        collector = asyncio.create_task(run_collector(ccfg, stop=collector_stop, on_ready=collector_ready.set))
        await asyncio.wait_for(collector_ready.wait(), 20)  # subscribed (persistent session) before the agent publishes
        cfg = convert(
            agent_dict(broker, tmp_path / "agent-spool.db", "f-a4", delivery="collector"), AgentConfig, "t"
        )
        agent = RunningAgent(cfg)
        try:
            handles = await agent.start()
            await eventually(lambda: handles.publisher.stats.acknowledged_observations > 50, what="publishing")
            await broker.astop(keep_state=True)
            await asyncio.sleep(OUTAGE_S)  # the outage: the scenario
            await broker.astart()
            await agent.wait_drained()
            await agent.wait_live()
            handles = await agent.finish()
            produced = {o.id for o in agent.produced}

            def stored_ids() -> Counter[str]:
                return Counter(r["id"] for r in influxdb.rows('SELECT "id" FROM "edgeprobe_icmp"', influx_db))

            stored = await wait_for_async(
                lambda: asyncio.to_thread(stored_ids),
                DRAIN_TIMEOUT_S,
                f"the {len(produced)} produced ids in InfluxDB",
                until=lambda ids: produced <= set(ids),
                interval_s=0.3,
            )
        finally:
            collector_stop.set()
            agent.stop.set()
            await asyncio.wait_for(collector, 30)
    copies = max(stored.values(), default=0)
    print(
        f"\nend to end, broker down {OUTAGE_S:g} s: produced {len(produced)}, points in InfluxDB {sum(stored.values())}"
        f", distinct ids {len(stored)}, max copies of one id {copies}, re-sent by the agent {len(agent.released)}"
    )
    assert set(stored) == produced and copies == 1


# ---- (d) one spooled row damaged on the disk ------------------------------------------------------------


def corrupt_payload_in_file(path: Path, obs_id: str) -> None:
    """Change one byte of one spooled observation, in the SQLite file itself (the agent is stopped):
    its leading '{' becomes '[', so it is no longer a JSON object."""
    assert not path.with_name(path.name + "-wal").exists() or path.with_name(path.name + "-wal").stat().st_size == 0
    data = path.read_bytes()
    needle = b'{"id":"' + obs_id.encode()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the observation is in the file once"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"[", at)
    finally:
        os.close(fd)


async def test_one_corrupted_spooled_row_is_quarantined_the_rest_delivered(tmp_path: Path) -> None:
    """Measured before: one changed byte in one spooled payload made the whole message it went out
    in unreadable (a collector rejects it as bad JSON): ~500 observations lost, the agent unaware."""
    spool_path = tmp_path / "spool.db"
    async with MosquittoServer(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        sub = Subscriber(broker, "f-a4")
        await sub.register()
        cfg = convert(agent_dict(broker, spool_path, "f-a4", flush_timeout_s=0.5), AgentConfig, "t")
        await broker.astop(keep_state=True)
        first = RunningAgent(cfg)  # no broker: everything it produces stays in its spool
        await first.start()
        await eventually(lambda: len(first.produced) >= 300, what="300 observations spooled")
        await first.finish()
        spooled = spool_ids(spool_path)
        assert len(spooled) == len(first.produced) >= 300
        victim = spooled[len(spooled) // 2]
        corrupt_payload_in_file(spool_path, victim)

        await broker.astart()
        sub.start()
        second = RunningAgent(cfg)
        try:
            handles = await second.start()
            wanted = set(spooled) - {victim}
            await sub.wait_for(wanted, 30)
            await second.wait_live()
            await eventually(lambda: any(h.spool_quarantined == 1 for h in sub.health), what="health counting it")
            handles = await second.finish()
            produced = [o.id for o in second.produced]
            await sub.wait_for(set(produced), 30)
        finally:
            await sub.close()
            if not second.stop.is_set():
                second.stop.set()
    info = inspect_spool(spool_path)
    check_delivery(
        "one spooled row corrupted",
        [i for i in spooled if i != victim] + produced,
        sub,
        second.released,
        f"; {len(spooled)} spooled, 1 corrupted on disk: quarantined {info.quarantined_total}, "
        f"unreadable messages {sub.unreadable}",
    )
    assert victim not in sub.ids and sub.unreadable == 0
    assert handles.spool.stats().quarantined == 1 and info.quarantined_total == 1 and info.quarantine_rows == 1
    assert info.depth == 0
