"""The collector against real servers: mosquitto and influxd 1.6 (fixtures in conftest.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
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
import msgspec
import pytest

from edgeprobe.collector import decode as d
from edgeprobe.collector.config import CollectorConfig, InfluxConfig
from edgeprobe.collector.influx import V1Writer
from edgeprobe.collector.lineproto import decode_tag_value, encode_observation
from edgeprobe.collector.service import CollectorStats, run_collector
from edgeprobe.collector.spool import read_dead_letters
from edgeprobe.configfile import convert
from edgeprobe.localstack import InfluxServer, MosquittoServer
from edgeprobe.schema import AgentHealth, Observation, encode, health_topic, obs_topic
from tests.support.paths import GOLDEN
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration



async def query_rows(influxdb: InfluxServer, q: str, db: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(influxdb.rows, q, db)


async def eventually(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    await wait_for_async(check, timeout_s, what)


# ---- (a) tag values that line protocol can't carry as they are ----------------------------------

TORTURE = [
    "plain",
    "with space",
    "comma,here",
    "equals=here",
    "all , = of them ,=",
    'double "quotes"',
    "single 'quotes'",
    "back\\slash",
    "C:\\temp\\new",
    "trailing backslash\\",
    "\\",
    "\\\\",
    "double \\\\ backslash",
    "backslash before comma \\, and space \\  and equals \\=",
    "line\nbreak",
    "\n",
    "crlf\r\nhere",
    "tab\there",
    "Zürich – Ærø – 東京",
    "emoji 🚀🔥 ✓",
    "",
    " ",
    "~ep~looks encoded",
    "~ep~",
    "100% sure %0A",
    "x" * 1000 + " 1 kB",
    "ends with space ",
    ",",
    "=",
]


def _random_values(count: int) -> list[str]:
    rnd = random.Random(20240607)
    alphabet = [*"ab ,=\\\"'\n\r\t%~ep😀é", "~ep~"]
    return ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))) for _ in range(count)]


async def test_tag_values_round_trip_through_influxdb(influxdb: InfluxServer, influx_db: str) -> None:
    values = TORTURE + _random_values(200)
    base_ns = time.time_ns()
    lines = []
    for i, value in enumerate(values):
        o = Observation(
            id=f"t{i}",
            seq=i,
            kind="torture",
            target=value,
            started_at_ns=base_ns + i,
            duration_ms=1.0,
            outcome="ok",
            reason=value,  # a string field carrying the same text
            job="torture",
            labels={"label": value},
        )
        lines.append(encode_observation(o, agent="a1", site="s1", measurement="torture").line)
    cfg = convert({"url": influxdb.url, "database": influx_db}, InfluxConfig, "test")
    async with V1Writer(cfg) as writer:
        await writer.prepare()
        await writer.write(lines)
    rows = await query_rows(influxdb, 'SELECT "seq", "target", "label", "reason" FROM "torture"', influx_db)
    assert len(rows) == len(values)
    for row in rows:
        value = values[row["seq"]]
        assert decode_tag_value(row["target"]) == value, (row["target"], value)
        assert decode_tag_value(row["label"]) == value
        assert row["reason"] == value  # string fields need no reversible encoding


# ---- (b) a stream of good and bad messages through mosquitto ---------------------------------


def _golden_observations() -> list[dict[str, Any]]:
    out = []
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        out.extend(json.loads(path.read_text())["observations"])
    return out


class Fleet:
    """Makes fresh valid observations (from the golden samples) and envelopes for a test."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.templates = _golden_observations()
        self.seq = 0
        self.valid_ids: list[str] = []

    def obs(self, kind: str | None = None) -> dict[str, Any]:
        choices = [t for t in self.templates if kind is None or t["kind"] == kind]
        o = copy.deepcopy(choices[self.seq % len(choices)])
        o["id"] = uuid.uuid4().hex
        o["seq"] = self.seq
        o["started_at_ns"] = time.time_ns() + self.seq  # unique: each point its own timestamp
        self.seq += 1
        return o

    def envelope(self, observations: list[dict[str, Any]], agent: str = "a1", site: str = "pop1") -> bytes:
        env = {
            "v": 1,
            "agent": agent,
            "site": site,
            "sent_at_ns": time.time_ns(),
            "labels": {"tier": "pop"},
            "observations": observations,
        }
        return json.dumps(env).encode()

    def topic(self, agent: str = "a1", site: str = "pop1") -> str:
        return obs_topic(self.prefix, site, agent)


def collector_config(
    mosquitto: MosquittoServer,
    influxdb: InfluxServer,
    db: str,
    state_dir: Path,
    health_interval_s: float | None = None,
    **influx: Any,
) -> CollectorConfig:
    return convert(
        {
            "name": f"c-{db}",
            "broker": {"url": mosquitto.url, "topic_prefix": f"it-{db}", "reconnect_min_s": 0.1},
            "influx": {"url": influxdb.url, "database": db, "flush_interval_s": 0.1, **influx},
            "limits": {"max_message_bytes": 16 * 1024, "log_interval_s": 60},
            "spool": {"path": str(state_dir / "spool.sqlite"), "synchronous": "normal"},
            "health_interval_s": health_interval_s,
        },
        CollectorConfig,
        "test",
    )


async def stored_ids(influxdb: InfluxServer, db: str) -> Counter[str]:
    rows = await query_rows(influxdb, 'SELECT "id" FROM /^edgeprobe_/', db)
    return Counter(r["id"] for r in rows)


async def test_garbage_stream(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    cfg = collector_config(mosquitto, influxdb, influx_db, tmp_path)
    fleet = Fleet(cfg.broker.topic_prefix)
    stats = CollectorStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
    try:
        await eventually(lambda: stats.connects >= 1, what="collector subscribed")
        expected_rejects: Counter[str] = Counter()
        messages: list[tuple[str, bytes]] = []

        def good(n: int) -> None:
            messages.append((fleet.topic(), fleet.envelope([fleet.obs() for _ in range(n)])))
            fleet.valid_ids.extend(json.loads(messages[-1][1])["observations"][i]["id"] for i in range(n))

        good(3)
        messages.append((fleet.topic(), b"\x00\xff garbage \x80"))
        expected_rejects[d.BAD_JSON] += 1
        good(1)
        truncated = fleet.envelope([fleet.obs(), fleet.obs()])
        messages.append((fleet.topic(), truncated[: len(truncated) - 17]))
        expected_rejects[d.BAD_JSON] += 1
        wrong_version = json.loads(fleet.envelope([fleet.obs()]))
        wrong_version["v"] = 7
        messages.append((fleet.topic(), json.dumps(wrong_version).encode()))
        expected_rejects[d.UNSUPPORTED_VERSION] += 1
        messages.append((fleet.topic(), fleet.envelope([fleet.obs() for _ in range(50)])))  # > 16 KiB
        assert len(messages[-1][1]) > cfg.limits.max_message_bytes
        expected_rejects[d.TOO_LARGE] += 1
        messages.append((fleet.topic(agent="a1"), fleet.envelope([fleet.obs()], agent="a2")))  # spoofed
        expected_rejects[d.TOPIC_MISMATCH] += 1
        messages.append((fleet.topic(), b'{"v": 1, "agent": "a1"}'))
        expected_rejects[d.BAD_ENVELOPE] += 1
        # one envelope, good observations around bad ones
        mixed = [fleet.obs("icmp"), fleet.obs("tcp"), fleet.obs("http"), fleet.obs("tcp"), fleet.obs("icmp")]
        mixed[1]["fields"]["sent"] = "three"
        mixed[3]["kind"] = "teleport"
        del mixed[4]["id"]
        expected_rejects.update([d.BAD_FIELDS, d.UNKNOWN_KIND, d.BAD_OBSERVATION])
        fleet.valid_ids.extend([mixed[0]["id"], mixed[2]["id"]])
        messages.append((fleet.topic(), fleet.envelope(mixed)))
        # another agent of another site
        messages.append((fleet.topic("b7", "pop2"), fleet.envelope([fleet.obs()], "b7", "pop2")))
        fleet.valid_ids.append(json.loads(messages[-1][1])["observations"][0]["id"])
        # a redelivered envelope must not be stored twice
        messages.append(messages[0])

        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            for topic, payload in messages:
                await pub.publish(topic, payload, qos=1)

            await eventually(lambda: stats.received_messages == len(messages), what="all messages received")
            await eventually(lambda: stats.written_points >= len(fleet.valid_ids) + 3, what="points written")
            assert not task.done()  # still running after all that

            # ... and still working
            good(2)
            await pub.publish(*messages[-1], qos=1)
        await eventually(lambda: stats.written_points >= len(fleet.valid_ids) + 3, what="later points written")

        ids = await stored_ids(influxdb, influx_db)
        assert set(ids) == set(fleet.valid_ids)
        assert max(ids.values()) == 1  # exactly once, the redelivered envelope included
        assert stats.rejected == expected_rejects
        assert stats.received_messages == len(messages)
        assert stats.accepted_observations == len(fleet.valid_ids) + 3
        assert stats.dead_lettered == 0 and stats.write_retries == 0

        rows = await query_rows(influxdb, "SELECT * FROM edgeprobe_icmp", influx_db)
        assert rows and all(r["tier"] == "pop" and r["site"] == "pop1" for r in rows)
        assert {r["family"] for r in rows} == {"ipv4", None}  # None: a timeout without a result
        fields = await asyncio.to_thread(influxdb.query, "SHOW FIELD KEYS", influx_db)
        types = {(s["name"], k): t for s in fields["results"][0]["series"] for k, t in s["values"]}
        assert types[("edgeprobe_icmp", "loss_ratio")] == "float"  # JSON 0.0 / 1 / 0.5 alike
        assert types[("edgeprobe_icmp", "rtt_min_ms")] == "float"  # JSON 11 in the minimal sample
        assert types[("edgeprobe_icmp", "sent")] == "integer"
        assert types[("edgeprobe_http", "body_truncated")] == "boolean"
        assert types[("edgeprobe_http", "id")] == "string"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# ---- (c) a point InfluxDB refuses doesn't take the batch down with it -------------------------


async def test_field_type_conflict_is_bisected(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    # dns_ms already exists as a string (in the shard of "now": field types are per shard in 1.x),
    # so a tcp point that carries dns_ms as a float is refused.
    line = f'edgeprobe_tcp,agent=x dns_ms="earlier" {time.time_ns()}'
    await asyncio.to_thread(influxdb.write, line, influx_db)
    cfg = collector_config(mosquitto, influxdb, influx_db, tmp_path, flush_interval_s=0.5)
    fleet = Fleet(cfg.broker.topic_prefix)
    observations = []
    for _ in range(5):
        observations += [fleet.obs("icmp"), fleet.obs("http"), fleet.obs("tcp")]
    bad = observations[4 * 3 - 1]
    for o in observations:
        if o["kind"] == "tcp" and o is not bad:
            o["fields"]["dns_ms"] = None
    bad["fields"]["dns_ms"] = 1.25
    good_ids = [o["id"] for o in observations if o is not bad]

    stats = CollectorStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
    try:
        await eventually(lambda: stats.connects >= 1, what="collector subscribed")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            await pub.publish(fleet.topic(), fleet.envelope(observations), qos=1)
        await eventually(lambda: stats.written_points + stats.dead_lettered == len(observations), what="flush")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert stats.dead_lettered == 1 and stats.written_points == len(observations) - 1
    assert stats.write_retries == 0
    ids = await stored_ids(influxdb, influx_db)
    assert set(ids) == set(good_ids) and max(ids.values()) == 1
    # the refused point is kept, with InfluxDB's reason, in the dead-letter file
    (record,) = read_dead_letters(cfg.dead_letter_path())
    assert record["status"] == 400 and record["reason"] == "field_type_conflict"
    assert record["measurement"] == "edgeprobe_tcp" and record["field"] == "dns_ms"
    assert "field type conflict" in str(record["error"])
    assert f'id="{bad["id"]}"' in str(record["line"]) and str(record["time"]).endswith("Z")


# ---- health: the agents' and the collector's own ------------------------------------------------


async def test_health_points(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    cfg = collector_config(mosquitto, influxdb, influx_db, tmp_path, health_interval_s=0.2)
    prefix = cfg.broker.topic_prefix
    now = time.time_ns()
    health = AgentHealth(
        v=1,
        agent="a1",
        site="pop1",
        at_ns=now,
        started_at_ns=now - 5 * 10**9,
        labels={"tier": "pop"},
        spool_depth=42,
        spool_oldest_age_s=3.5,
        dropped_bytes_limit=0,
        connected=True,
    )
    stats = CollectorStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
    try:
        await eventually(lambda: stats.connects >= 1, what="collector subscribed")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            await pub.publish(health_topic(prefix, "pop1", "a1"), encode(health), qos=1)
            spoofed = msgspec.structs.replace(health, agent="a2", at_ns=now + 1)
            await pub.publish(health_topic(prefix, "pop1", "a1"), encode(spoofed), qos=1)
        await eventually(lambda: stats.received_health == 1 and stats.written_points >= 3, what="health written")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert stats.rejected == {"topic_mismatch": 1}
    rows = await query_rows(influxdb, "SELECT * FROM edgeprobe_health WHERE source = 'agent'", influx_db)
    assert len(rows) == 1
    row = rows[0]
    assert (row["agent"], row["site"], row["tier"]) == ("a1", "pop1", "pop")
    assert row["spool_depth"] == 42 and row["spool_oldest_age_s"] == 3.5 and row["connected"] is True
    rows = await query_rows(influxdb, "SELECT * FROM edgeprobe_health WHERE source = 'collector'", influx_db)
    assert len(rows) >= 2 and all(r["collector"] == cfg.name for r in rows)
    last = rows[-1]  # the one written on stop
    assert last["received_messages"] == 2 and last["received_health"] == 1 and last["rejected_topic_mismatch"] == 1
    assert last["acknowledged_messages"] == 2 and last["connected"] in (True, False)
    assert any(r.get("write_latency_p50_ms") is not None for r in rows)


# ---- the collector rides out InfluxDB and broker outages ----------------------------------------


async def test_influxdb_outage_is_retried(
    mosquitto: MosquittoServer, fresh_influxdb: InfluxServer, tmp_path: Path
) -> None:
    db = "outage"
    cfg = collector_config(mosquitto, fresh_influxdb, db, tmp_path, timeout_s=0.3, retry_min_s=0.1, retry_max_s=0.3)
    fleet = Fleet(cfg.broker.topic_prefix)
    stats = CollectorStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
    envelopes = [[fleet.obs() for _ in range(3)] for _ in range(4)]
    try:
        await eventually(lambda: stats.connects >= 1, what="subscribed")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{db}") as pub:
            await pub.publish(fleet.topic(), fleet.envelope(envelopes[0]), qos=1)
            await eventually(lambda: stats.written_points == 3, what="points before the outage")
            fresh_influxdb.pause()  # accepts connections, answers nothing: every write times out
            for env in envelopes[1:]:
                await pub.publish(fleet.topic(), fleet.envelope(env), qos=1)
            await eventually(lambda: stats.write_retries >= 3, what="retries")
            assert stats.written_points == 3 and stats.spool_lines == 9
            fresh_influxdb.resume()
        await eventually(lambda: stats.written_points == 12, what="points written after the outage")
    finally:
        if fresh_influxdb.paused:
            fresh_influxdb.resume()
        stop.set()
        await asyncio.wait_for(task, 30)
    ids = await stored_ids(fresh_influxdb, db)
    assert set(ids) == {o["id"] for env in envelopes for o in env} and max(ids.values()) == 1
    assert stats.dead_lettered == 0


async def test_broker_restart_reconnects_with_persistent_session(
    fresh_mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    cfg = collector_config(fresh_mosquitto, influxdb, influx_db, tmp_path)
    fleet = Fleet(cfg.broker.topic_prefix)
    stats = CollectorStats()
    collector_stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=collector_stop, stats=stats))
    sent: list[str] = []

    async def publish(n: int) -> None:
        obs = [fleet.obs() for _ in range(n)]
        sent.extend(o["id"] for o in obs)
        async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port, identifier="pub-restart") as pub:
            await pub.publish(fleet.topic(), fleet.envelope(obs), qos=1)

    try:
        await eventually(lambda: stats.connects == 1, what="first connect")
        await publish(2)
        await eventually(lambda: stats.written_points == 2, what="first points")
        await fresh_mosquitto.arestart()
        await eventually(lambda: stats.connects >= 2, what="reconnect")
        await publish(3)
        await eventually(lambda: stats.written_points == 5, what="points after the restart")

        # While the collector is away the broker keeps its session and queues for it.
        collector_stop.set()
        await asyncio.wait_for(task, 30)
        await publish(4)
        collector_stop = asyncio.Event()
        task = asyncio.create_task(run_collector(cfg, stop=collector_stop, stats=stats))
        await eventually(lambda: stats.written_points == 9, what="points queued by the broker")
    finally:
        collector_stop.set()
        await asyncio.wait_for(task, 30)
    ids = await stored_ids(influxdb, influx_db)
    assert set(ids) == set(sent) and max(ids.values()) == 1


async def test_sigterm_stops_with_a_final_flush(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    # Nothing would be written before stopping: a large batch and a long flush interval.
    cfg = collector_config(mosquitto, influxdb, influx_db, tmp_path, flush_interval_s=600, batch_max_lines=10_000)
    fleet = Fleet(cfg.broker.topic_prefix)
    observations = [fleet.obs() for _ in range(7)]
    stats = CollectorStats()
    task = asyncio.create_task(run_collector(cfg, stats=stats))  # no stop event: signals stop it
    try:
        await eventually(lambda: stats.connects >= 1, what="collector subscribed")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            await pub.publish(fleet.topic(), fleet.envelope(observations), qos=1)
        await eventually(lambda: stats.spool_lines == 7, what="lines buffered")
        assert stats.written_points == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 30) is stats
    finally:
        if not task.done():
            task.cancel()
    assert stats.written_points == 7 and stats.spool_lines == 0
    ids = await stored_ids(influxdb, influx_db)
    assert set(ids) == {o["id"] for o in observations}
    # the handlers are gone again: SIGTERM has its default meaning outside run_collector
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.Handlers.SIG_DFL)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def test_cli_ready_file_once_subscribed(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    """``collector run --ready-file``: the file (holding the pid) appears once the collector is
    subscribed, so a message published right after it is taken; a leftover is not mistaken for it,
    and it is gone after a clean stop. A path that can't be written is refused at once."""
    conf = tmp_path / "collector.yaml"
    conf.write_text(
        json.dumps(  # JSON is YAML
            {
                "name": f"c-{influx_db}",
                "broker": {"url": mosquitto.url, "topic_prefix": f"it-{influx_db}", "client_id": f"cli-{influx_db}"},
                "influx": {"url": influxdb.url, "database": influx_db, "flush_interval_s": 0.1},
                "spool": {"path": str(tmp_path / "spool.sqlite")},
            }
        )
    )
    exe = str(Path(sys.executable).with_name("edgeprobe"))
    unwritable = str(tmp_path / "no-such-dir" / "ready")
    argv = [exe, "collector", "run", "-c", str(conf), "--ready-file"]
    bad = subprocess.run([*argv, unwritable], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--ready-file" in bad.stderr, bad.stderr

    ready, log_path = tmp_path / "collector.ready", tmp_path / "collector.log"
    ready.write_text("left by a killed run\n")
    fleet = Fleet(f"it-{influx_db}")
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*argv, str(ready)], stderr=log)
    try:
        await wait_for_async(
            lambda: _text(ready),
            30,
            lambda: f"the collector's ready file; its log:\n{log_path.read_text()[-3000:]}",
            until=lambda text: text == f"{proc.pid}\n",
        )
        observation = fleet.obs()
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            await pub.publish(fleet.topic(), fleet.envelope([observation]), qos=1)
        await wait_for_async(
            lambda: stored_ids(influxdb, influx_db), 20, "the observation in InfluxDB", until=lambda ids: len(ids) > 0
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert set(await stored_ids(influxdb, influx_db)) == {observation["id"]}
    assert not ready.exists()  # removed when the collector stops
