"""SIGHUP reloads the config of a real ``edgeprobe agent run`` / ``collector run`` child process.

A good reload changes what runs (a new job's observations appear, a removed job's stop; a lower
message size limit rejects what it accepted before, the summary line starts); a bad one (not
valid, or changing a key that needs a restart) is refused with one line naming the file and the
key, and what ran keeps running. Sequence numbers go on without repeating and nothing is lost.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edgeprobe.localstack import InfluxServer, MosquittoServer
from edgeprobe.schema import Envelope, Observation
from tests.integration.test_collector import Fleet, stored_ids
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

EXE = str(Path(sys.executable).with_name("edgeprobe"))


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _job(name: str, target: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "icmp",
        "targets": [target],
        "interval_s": 0.2,
        "options": {"count": 1, "timeout_s": 0.1},
    }


def _agent_file(mosquitto: MosquittoServer, tmp_path: Path, jobs: list[dict[str, Any]], **extra: Any) -> str:
    doc: dict[str, Any] = {
        "agent": {"id": "rl-a1", "site": "lab", "shutdown_grace_s": 2.0},
        "broker": {"url": mosquitto.url, "topic_prefix": "rl"},
        "publish": {"flush_interval_s": 0.1, "delivery": "broker"},
        "spool": {"path": str(tmp_path / "spool.db")},
        "log": {"summary_interval_s": 0},
        "jobs": jobs,
    }
    for key, value in extra.items():
        doc[key] = {**doc.get(key, {}), **value}
    return json.dumps(doc)  # JSON is YAML


class Observed:
    """Every observation the agent publishes under the test's prefix, in arrival order."""

    def __init__(self, mosquitto: MosquittoServer) -> None:
        self.mosquitto = mosquitto
        self.seen: list[Observation] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(self.mosquitto.host, self.mosquitto.port) as client:
            await client.subscribe("rl/v1/lab/rl-a1/obs", qos=1)
            self.ready.set()
            async for msg in client.messages:
                env = msgspec.json.decode(bytes(msg.payload), type=Envelope)  # type: ignore[arg-type]
                self.seen.extend(env.observations)

    def of(self, job: str) -> list[Observation]:
        return [o for o in self.seen if o.job == job]


def test_agent_sighup_swaps_jobs_refuses_bad_files_and_keeps_the_sequence(
    mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    conf, ready, log_path = tmp_path / "agent.yaml", tmp_path / "agent.ready", tmp_path / "agent.log"
    conf.write_text(_agent_file(mosquitto, tmp_path, [_job("keep", "127.0.0.1"), _job("gone", "127.0.0.2")]))

    def log_lines(pattern: str) -> list[str]:
        return [line for line in _text(log_path).splitlines() if re.search(pattern, line)]

    def what(name: str) -> Any:
        return lambda: f"{name}; the agent's log:\n{_text(log_path)[-3000:]}"

    async def scenario() -> tuple[Observed, int]:
        observed = Observed(mosquitto)
        watcher = asyncio.create_task(observed.run())
        await asyncio.wait_for(observed.ready.wait(), 10)
        with log_path.open("wb") as log:
            proc = subprocess.Popen([EXE, "agent", "run", "-c", str(conf), "--ready-file", str(ready)], stderr=log)
        try:
            await wait_for_async(ready.exists, 30, what("the agent's ready file"))
            await wait_for_async(
                lambda: len(observed.of("keep")) >= 3 and len(observed.of("gone")) >= 3, 20, what("both jobs running")
            )

            # A good reload: 'gone' removed, 'new' added, 'keep' as it was; the summary line on.
            conf.write_text(
                _agent_file(
                    mosquitto,
                    tmp_path,
                    [_job("keep", "127.0.0.1"), _job("new", "127.0.0.3")],
                    log={"summary_interval_s": 0.5},
                )
            )
            proc.send_signal(signal.SIGHUP)
            await wait_for_async(lambda: log_lines(r"reload: .*: applied"), 20, what("the applied reload"))
            await wait_for_async(lambda: len(observed.of("new")) >= 5, 20, what("the new job's observations"))
            await wait_for_async(lambda: log_lines(r"last [0-9.]+ s: \d+ observations produced"), 20, what("a summary"))

            # Bad reloads: not valid; a key that needs a restart. Each is refused with one line.
            good = conf.read_text()
            conf.write_text(good.replace('"interval_s": 0.2', '"interval_s": "often"', 1))
            proc.send_signal(signal.SIGHUP)
            await wait_for_async(lambda: log_lines("reload refused"), 20, what("the first refusal"))
            conf.write_text(good.replace('"rl-a1"', '"rl-other"').replace('"url": "mqtt', '"url": "mqtts'))
            proc.send_signal(signal.SIGHUP)
            await wait_for_async(lambda: len(log_lines("reload refused")) == 2, 20, what("the second refusal"))
            # What ran keeps running: more of 'keep' and 'new' after both refusals.
            counts = len(observed.of("keep")), len(observed.of("new"))
            await wait_for_async(
                lambda: len(observed.of("keep")) >= counts[0] + 3 and len(observed.of("new")) >= counts[1] + 3,
                20,
                what("the jobs still running after the refusals"),
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0, _text(log_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stopped = log_lines(r"agent stopped: \d+ produced")
        assert stopped, _text(log_path)
        produced = int(re.search(r"agent stopped: (\d+) produced", stopped[0]).group(1))  # type: ignore[union-attr]
        await wait_for_async(lambda: len(observed.seen) >= produced, 10, what(f"all {produced} observations"))
        watcher.cancel()
        return observed, produced

    observed, produced = asyncio.run(scenario())
    log = _text(log_path)
    # The removed job stopped before the new one started; the kept one ran throughout.
    assert max(o.started_at_ns for o in observed.of("gone")) < min(o.started_at_ns for o in observed.of("new"))
    # One sequence across the reload, never repeated, and nothing lost: 0 … produced-1, each once.
    seqs = [o.seq for o in observed.seen]
    assert sorted(seqs) == list(range(produced)), (len(seqs), produced)
    assert len({o.id for o in observed.seen}) == produced
    assert "0 dropped, 0 left undelivered" in log
    applied = [line for line in log.splitlines() if "reload: " in line and "applied" in line]
    assert len(applied) == 1 and str(conf) in applied[0]
    assert "jobs +new (icmp, 1 target(s)), -gone" in applied[0] and "log.summary_interval_s 0 → 0.5" in applied[0]
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 2
    assert str(conf) in refused[0] and "jobs[0].interval_s" in refused[0]
    assert str(conf) in refused[1] and "agent.id, broker.url cannot change while the agent runs" in refused[1]


async def test_collector_sighup_applies_limits_log_and_health_and_refuses_the_rest(
    mosquitto: MosquittoServer, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    prefix = f"rl-{influx_db}"
    base: dict[str, Any] = {
        "name": f"c-{influx_db}",
        "broker": {"url": mosquitto.url, "topic_prefix": prefix, "client_id": f"rl-{influx_db}"},
        "influx": {"url": influxdb.url, "database": influx_db, "flush_interval_s": 0.1},
        "spool": {"path": str(tmp_path / "spool.sqlite")},
        "limits": {"max_message_bytes": 1024 * 1024, "log_interval_s": 0.1},
        "log": {"summary_interval_s": 0},
        "health_interval_s": None,
    }
    conf, ready, log_path = tmp_path / "collector.yaml", tmp_path / "collector.ready", tmp_path / "collector.log"
    conf.write_text(json.dumps(base))
    fleet = Fleet(prefix)

    def log_lines(pattern: str) -> list[str]:
        return [line for line in _text(log_path).splitlines() if re.search(pattern, line)]

    def what(name: str) -> Any:
        return lambda: f"{name}; the collector's log:\n{_text(log_path)[-3000:]}"

    def big() -> tuple[bytes, set[str]]:
        observations = [fleet.obs("icmp") for _ in range(12)]
        payload = fleet.envelope(observations)
        assert 4096 < len(payload) < 1024 * 1024
        return payload, {o["id"] for o in observations}

    async def health_points() -> int:
        rows = await asyncio.to_thread(
            influxdb.rows, 'SELECT "uptime_s" FROM "edgeprobe_health" WHERE "source" = \'collector\'', influx_db
        )
        return len(rows)

    with log_path.open("wb") as log:
        proc = subprocess.Popen([EXE, "collector", "run", "-c", str(conf), "--ready-file", str(ready)], stderr=log)
    try:
        await wait_for_async(ready.exists, 30, what("the collector's ready file"))
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{influx_db}") as pub:
            first, first_ids = big()
            await pub.publish(fleet.topic(), first, qos=1)
            await wait_for_async(
                lambda: stored_ids(influxdb, influx_db),
                20,
                what("the first message"),
                until=lambda ids: set(ids) >= first_ids,
            )
            assert await health_points() == 0  # health_interval_s: null

            # A good reload: a smaller message limit, the summary line and health points on.
            conf.write_text(
                json.dumps(
                    {
                        **base,
                        "limits": {"max_message_bytes": 4096, "log_interval_s": 0.1},
                        "log": {"summary_interval_s": 0.3},
                        "health_interval_s": 0.3,
                    }
                )
            )
            good = conf.read_text()
            proc.send_signal(signal.SIGHUP)
            await wait_for_async(lambda: log_lines("reload: .*: applied"), 20, what("the applied reload"))
            second, second_ids = big()
            await pub.publish(fleet.topic(), second, qos=1)
            await wait_for_async(lambda: log_lines("too_large"), 20, what("the larger message rejected"))
            await wait_for_async(lambda: log_lines(r"last [0-9.]+ s: \d+ messages"), 20, what("a summary line"))
            await wait_for_async(health_points, 20, what("the collector's health points"), until=lambda n: n >= 2)

            # Bad reloads: a key that needs a restart; a file that is not valid.
            conf.write_text(json.dumps({**base, "influx": {**base["influx"], "database": "elsewhere"}}))
            proc.send_signal(signal.SIGHUP)
            await wait_for_async(lambda: log_lines("reload refused"), 20, what("the first refusal"))
            conf.write_text(good.replace('"health_interval_s": 0.3', '"health_interval_s": -1'))
            proc.send_signal(signal.SIGHUP)
            await wait_for_async(lambda: len(log_lines("reload refused")) == 2, 20, what("the second refusal"))
            # The configuration in force stays: small messages land in the same database, big ones don't.
            third = [fleet.obs("tcp")]
            await pub.publish(fleet.topic(), fleet.envelope(third), qos=1)
            await wait_for_async(
                lambda: stored_ids(influxdb, influx_db),
                20,
                what("the small message after the refusals"),
                until=lambda ids: third[0]["id"] in ids,
            )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, _text(log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ids = await stored_ids(influxdb, influx_db)
    assert not (set(ids) & second_ids)  # refused under the new limit, not written
    log = _text(log_path)
    applied = [line for line in log.splitlines() if "reload: " in line and "applied" in line]
    assert len(applied) == 1 and str(conf) in applied[0], log
    assert "limits.max_message_bytes 1048576 → 4096" in applied[0]
    assert "log.summary_interval_s 0 → 0.3" in applied[0] and "health_interval_s null → 0.3" in applied[0]
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 2
    assert str(conf) in refused[0] and "influx.database cannot change while the collector runs" in refused[0]
    assert str(conf) in refused[1] and "health_interval_s" in refused[1]
