"""A sustained field type conflict on the real mosquitto and influxd 1.6 (issue 12, item 6).

``duration_ms`` of ``edgeprobe_tcp`` is first written as an integer; then a stream where one
observation in five is a tcp one (its ``duration_ms`` a float, so InfluxDB refuses it) goes through
the real collector. Without the conflict memory (``influx.conflict_memory_max: 0``, the behaviour
before) every refused line is found by bisection, several refused writes each; with it, InfluxDB's
answer is remembered and the later tcp lines are dead-lettered without a write. The figures are
printed (``-s``); the assertions are generous bounds. Then the measurement is dropped (the schema
fixed) and ``edgeprobe collector dead-letters replay`` lands the refused points.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import CollectorStats, run_collector
from edgeprobe.collector.spool import read_dead_letters
from edgeprobe.configfile import convert
from edgeprobe.localstack import InfluxServer, MosquittoServer
from edgeprobe.schema import obs_topic
from tests.support.paths import GOLDEN, REPO
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

PER_MESSAGE = 50
BAD_EVERY = 5  # one observation in five is a tcp one: 20 %
CLI = [sys.executable, "-m", "edgeprobe.cli", "collector", "dead-letters"]


def _template(kind: str) -> dict[str, Any]:
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        for obs in json.loads(path.read_text())["observations"]:
            if obs["kind"] == kind and obs["outcome"] == "ok":
                return dict(obs)
    raise AssertionError(f"no ok {kind} observation in {GOLDEN}")


def _stream(count: int, base_ns: int) -> tuple[list[dict[str, Any]], set[str], set[str]]:
    icmp, tcp = _template("icmp"), _template("tcp")
    observations: list[dict[str, Any]] = []
    good: set[str] = set()
    bad: set[str] = set()
    for i in range(count):
        o = copy.deepcopy(tcp if i % BAD_EVERY == BAD_EVERY - 1 else icmp)
        o["id"] = uuid.uuid4().hex
        o["seq"] = i
        o["started_at_ns"] = base_ns + i * 1000
        (bad if o["kind"] == "tcp" else good).add(o["id"])
        observations.append(o)
    return observations, good, bad


def _config(broker: MosquittoServer, influx: InfluxServer, db: str, tmp: Path, memory_max: int) -> dict[str, Any]:
    return {
        "name": f"conflicts-{tmp.name[-20:]}-{memory_max}",
        "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "influx": {
            "url": influx.url,
            "database": db,
            "batch_max_lines": 500,
            "flush_interval_s": 0.1,
            "retry_min_s": 0.1,
            "retry_max_s": 1.0,
            "conflict_memory_max": memory_max,
        },
        "spool": {"path": str(tmp / "spool.sqlite")},
        "health_interval_s": None,
    }


async def _run_stream(
    broker: MosquittoServer, influx: InfluxServer, db: str, tmp: Path, count: int, memory_max: int
) -> dict[str, Any]:
    tmp.mkdir()
    raw = _config(broker, influx, db, tmp, memory_max)
    (tmp / "collector.yaml").write_text(json.dumps(raw))
    cfg = convert(raw, CollectorConfig, "test")
    observations, good, bad = _stream(count, time.time_ns())
    stats = CollectorStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(cfg, stop=stop, stats=stats))
    try:
        await wait_for_async(lambda: stats.connects >= 1, 30, "collector subscribed")
        topic = obs_topic(cfg.broker.topic_prefix, "pop1", "a1")
        t0 = time.monotonic()
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"pub-{uuid.uuid4().hex[:8]}") as pub:
            for i in range(0, count, PER_MESSAGE):
                env = {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": time.time_ns()}
                env["observations"] = observations[i : i + PER_MESSAGE]
                await pub.publish(topic, json.dumps(env).encode(), qos=1)
        await wait_for_async(
            lambda: stats.written_points >= len(good) and stats.dead_lettered >= len(bad),
            120,
            lambda: f"{len(good)} points written and {len(bad)} dead-lettered ({stats.as_dict()})",
        )
        elapsed_s = time.monotonic() - t0
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return {
        "config": tmp / "collector.yaml",
        "dead_letters": cfg.dead_letter_path(),
        "good": good,
        "bad": bad,
        "stats": stats,
        "elapsed_s": elapsed_s,
        "good_per_s": len(good) / elapsed_s,
        "requests": stats.writes + stats.refused_writes + stats.write_retries,
        "refused_per_bad": stats.refused_writes / len(bad),
    }


async def _ids(influx: InfluxServer, db: str, measurement: str) -> set[str]:
    rows = await asyncio.to_thread(influx.rows, f'SELECT "id" FROM "{measurement}"', db)
    return {r["id"] for r in rows if r.get("id") is not None}


def _id_of(line: str) -> str:
    m = re.search(r'[ ,]id="([0-9a-f]+)"', line)
    assert m is not None, line
    return m.group(1)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


async def test_sustained_field_type_conflict_is_set_aside_and_replayed(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    # The conflict: duration_ms of edgeprobe_tcp exists as an integer (in the shard of "now").
    await asyncio.to_thread(influxdb.write, f"edgeprobe_tcp,agent=x duration_ms=1i {time.time_ns()}", influx_db)

    before = await _run_stream(mosquitto, influxdb, influx_db, tmp_path / "before", 250, memory_max=0)
    after = await _run_stream(mosquitto, influxdb, influx_db, tmp_path / "after", 2500, memory_max=1000)
    for name, run in (("before (bisection only)", before), ("after (conflict memory)", after)):
        s = run["stats"]
        print(
            f"\n{name}: {len(run['good'])} good + {len(run['bad'])} conflicting points in {run['elapsed_s']:.2f} s: "
            f"{run['good_per_s']:.0f} good points/s; {run['requests']} HTTP writes ({s.writes} ok, "
            f"{s.refused_writes} refused) = {run['requests'] / len(run['bad']):.3f} per conflicting line; "
            f"{s.conflict_dead_lettered} set aside unwritten"
        )

    # Before: every conflicting line cost refused writes of its own.
    assert before["refused_per_bad"] >= 1
    # After: a handful of writes for the whole stream; the good points flow in full batches.
    s = after["stats"]
    assert after["refused_per_bad"] < 0.05 and after["requests"] / len(after["bad"]) < 0.25
    assert s.conflict_dead_lettered >= len(after["bad"]) - 50 and s.field_conflicts == 1
    assert after["good_per_s"] > before["good_per_s"]

    # Every good point stored once, every conflicting one dead-lettered with its reason.
    stored = await _ids(influxdb, influx_db, "edgeprobe_icmp")
    assert after["good"] <= stored and before["good"] <= stored
    assert s.written_points == len(after["good"]) and s.dead_lettered == len(after["bad"])
    records = read_dead_letters(after["dead_letters"])
    assert {_id_of(str(r["line"])) for r in records} == after["bad"]
    assert {(r["reason"], r["measurement"], r["field"]) for r in records} == {
        ("field_type_conflict", "edgeprobe_tcp", "duration_ms")
    }
    assert not await _ids(influxdb, influx_db, "edgeprobe_tcp") & after["bad"]

    # The operator's view.
    ls = _cli("ls", "-c", str(after["config"]), "--json")
    assert ls.returncode == 0, ls.stderr
    summary = json.loads(ls.stdout)
    assert summary["records"] == len(after["bad"]) and summary["groups"][0]["count"] == len(after["bad"])
    assert summary["groups"][0]["measurement"] == "edgeprobe_tcp" and summary["groups"][0]["field"] == "duration_ms"

    # Replaying before the schema is fixed: refused again, everything stays.
    again = _cli("replay", "-c", str(after["config"]), "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["written"] == 0 and result["refused_again"] == len(after["bad"]) and result["writes"] <= 3
    assert len(read_dead_letters(after["dead_letters"])) == len(after["bad"])

    # The schema fixed: the measurement dropped. A dry run changes nothing; the replay lands them all.
    await asyncio.to_thread(influxdb.query, "DROP MEASUREMENT edgeprobe_tcp", influx_db)
    dry = _cli("replay", "-c", str(after["config"]), "--reason", "field_type_conflict", "--dry-run")
    assert dry.returncode == 0 and f"would replay {len(after['bad'])}" in dry.stdout, dry.stdout + dry.stderr
    assert len(read_dead_letters(after["dead_letters"])) == len(after["bad"])
    done = _cli("replay", "-c", str(after["config"]), "--reason", "field_type_conflict", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    print(f"\nreplay after DROP MEASUREMENT: {result}")
    assert result["written"] == len(after["bad"]) and result["removed"] == len(after["bad"])
    assert await _ids(influxdb, influx_db, "edgeprobe_tcp") == after["bad"]
    assert read_dead_letters(after["dead_letters"]) == []
    # Idempotent: a second replay finds nothing to do.
    twice = _cli("replay", "-c", str(after["config"]), "--json")
    assert twice.returncode == 0 and json.loads(twice.stdout)["selected"] == 0
