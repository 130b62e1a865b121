"""Collector config and the flusher's logic, without servers (a fake writer records the batches)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgeprobe.backoff import Backoff
from edgeprobe.collector.config import CollectorConfig, default_state_dir, load_collector_config
from edgeprobe.collector.influx import WriteError
from edgeprobe.collector.service import (
    CollectorStats,
    RateLimitedLog,
    _check_granted,
    _Collector,
    health_fields,
)
from edgeprobe.collector.spool import DeadLetters, Spool, read_dead_letters
from edgeprobe.configfile import ConfigError, Secret, convert
from tests.support.wait import wait_for_async

# ---- config --------------------------------------------------------------------------------------


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    cfg = load_collector_config(write_yaml(tmp_path, ""), environ={})
    assert cfg.name == "collector" and cfg.default_client_id == "edgeprobe-collector-collector"
    assert cfg.topic_filter == "edgeprobe/v1/+/+/obs" and cfg.subscription.qos == 1
    assert cfg.influx.api == "v1" and cfg.influx.database == "edgeprobe" and cfg.influx.gzip
    assert cfg.influx.batch_max_lines == 5000 and cfg.influx.flush_interval_s == 1.0
    assert cfg.limits.max_message_bytes == 1024 * 1024
    assert cfg.broker.client_kwargs(cfg.default_client_id)["identifier"] == "edgeprobe-collector-collector"
    assert cfg.health_topic_filter == "edgeprobe/v1/+/+/health" and cfg.health_interval_s == 10.0
    assert cfg.topic_filters == ["edgeprobe/v1/+/+/obs", "edgeprobe/v1/+/+/health"]
    assert cfg.spool.synchronous == "full" and cfg.spool.max_bytes == 1024**3
    spool_path, dead_path = cfg.spool_path({"STATE_DIRECTORY": "/st"}), cfg.dead_letter_path({"STATE_DIRECTORY": "/st"})
    assert spool_path == Path("/st/collector-collector.spool.sqlite")
    assert dead_path == Path("/st/collector-collector.dead-letter.jsonl")


def test_state_dir_and_spool_paths(tmp_path: Path) -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/srv/a:/srv/b"}) == Path("/srv/a")
    if os.geteuid() != 0:
        assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/edgeprobe")
    cfg = load_collector_config(write_yaml(tmp_path, f"name: c9\nspool:\n  path: {tmp_path}/s/spool.db\n"), {})
    assert cfg.spool_path() == tmp_path / "s" / "spool.db"
    assert cfg.dead_letter_path() == tmp_path / "s" / "collector-c9.dead-letter.jsonl"
    cfg = load_collector_config(write_yaml(tmp_path, "subscription:\n  health: false\n"), {})
    assert cfg.topic_filters == ["edgeprobe/v1/+/+/obs"] and cfg.health_topic_filter is None
    cfg = load_collector_config(write_yaml(tmp_path, "name: c2\nspool:\n  path: '{state_dir}/x/{name}.db'\n"), {})
    assert cfg.spool_path({"STATE_DIRECTORY": "/st"}) == Path("/st/x/c2.db")
    assert cfg.dead_letter_path({"STATE_DIRECTORY": "/st"}) == Path("/st/x/collector-c2.dead-letter.jsonl")
    # in memory: no file, and refused points are only logged unless a dead-letter path is given
    cfg = load_collector_config(write_yaml(tmp_path, "spool:\n  path: null\n"), {})
    assert cfg.spool_path() is None and cfg.dead_letter_path() is None
    cfg = load_collector_config(write_yaml(tmp_path, "spool:\n  path: null\n  dead_letter_path: /d/dl\n"), {})
    assert cfg.dead_letter_path() == Path("/d/dl")


def test_env_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "name: c1\nbroker:\n  topic_prefix: fleet\nsubscription:\n  shared_group: g1\n")
    env = {
        "EDGEPROBE_BROKER_URL": "mqtts://broker.example:8883",
        "EDGEPROBE_BROKER_PASSWORD": "mqtt-secret",
        "EDGEPROBE_BROKER_USERNAME": "c1",
        "EDGEPROBE_INFLUX_API": "v2",
        "EDGEPROBE_INFLUX_URL": "https://influx.example",
        "EDGEPROBE_INFLUX_ORG": "ops",
        "EDGEPROBE_INFLUX_BUCKET": "edge",
        "EDGEPROBE_INFLUX_TOKEN": "influx-secret",
    }
    cfg = load_collector_config(path, environ=env)
    assert cfg.broker.url == "mqtts://broker.example:8883" and cfg.broker.password == Secret("mqtt-secret")
    assert cfg.influx.api == "v2" and cfg.influx.org == "ops" and cfg.influx.bucket == "edge"
    assert cfg.influx.token == Secret("influx-secret")
    assert cfg.topic_filter == "$share/g1/fleet/v1/+/+/obs"
    assert cfg.health_topic_filter == "$share/g1/fleet/v1/+/+/health"
    assert "secret" not in repr(cfg)


def test_v1_with_token_and_database_from_env(tmp_path: Path) -> None:
    env = {"EDGEPROBE_INFLUX_TOKEN": "t", "EDGEPROBE_INFLUX_DATABASE": "metrics"}
    cfg = load_collector_config(write_yaml(tmp_path, ""), environ=env)
    assert cfg.influx.database == "metrics" and cfg.influx.token == Secret("t")


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("influx:\n  url: ftp://x\n", "influx.url: expected an http:// or https:// URL"),
        ("influx:\n  url: http://u:p@x\n", "influx.url: put credentials"),
        ("influx:\n  api: v3\n", "influx.api"),
        ("influx:\n  api: v2\n  token: t\n  bucket: b\n", "influx.org: required with api v2"),
        ("influx:\n  api: v2\n  org: o\n  token: t\n", "influx.bucket: required with api v2"),
        ("influx:\n  api: v2\n  org: o\n  bucket: b\n", "influx.token: required with api v2"),
        ("influx:\n  token: t\n  username: u\n", "influx.token: use either token or username/password"),
        ("influx:\n  password: p\n", "influx.username: required with password"),
        ("influx:\n  batch_max_lines: 0\n", "influx.batch_max_lines"),
        ("influx:\n  flush_intervall_s: 1\n", "influx.flush_intervall_s: unknown key"),
        ("subscription:\n  qos: 3\n", "subscription.qos"),
        ("subscription:\n  qos: 2\n", "subscription.qos"),
        ("subscription:\n  health_topic: $share/x/y\n", "subscription.health_topic"),
        ("spool:\n  max_bytes: 10\n", "spool.max_bytes"),
        ("spool:\n  synchronous: off\n", "spool.synchronous"),
        ("spool:\n  path: ' '\n", "spool.path"),
        ("spool:\n  path: '/x/{agent}.db'\n", "spool.path: only {state_dir}"),
        ("spool:\n  path: '{spool_dir}/x.db'\n", "spool.path: {spool_dir}"),
        ("spool:\n  dead_letter_path: '/x/{'\n", "spool.dead_letter_path"),
        ("health_interval_s: 0\n", "health_interval_s"),
        ("limits:\n  max_buffered_lines: 5\n", "limits.max_buffered_lines: unknown key"),
        ("subscription:\n  shared_group: a/b\n", "subscription.shared_group"),
        ("limits:\n  max_message_bytes: 10\n", "limits.max_message_bytes"),
        ("name: has space\n", "name: expected letters"),
        ("broker:\n  url: http://x\n", "broker.url"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_collector_config(write_yaml(tmp_path, yaml), environ={})
    assert message in str(info.value), str(info.value)


# ---- the spool ----------------------------------------------------------------------------------


def test_spool_is_a_durable_fifo(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    with Spool(path) as spool:
        assert spool.depth == 0 and spool.state().oldest_received_at_ns is None
        spool.append(["a", "bé"], received_at_ns=10)
        spool.append(["c"], received_at_ns=20)
        assert spool.depth == 3 and spool.bytes >= 1 + 3 + 1  # lines of one append share a row (+ framing)
        rows = spool.peek(2)
        assert [line for _, line in rows] == ["a", "bé"]
        assert spool.delete_through(rows[-1][0]) == 2
        assert spool.depth == 1 and spool.state().oldest_received_at_ns == 20
        spool.append(["d"], received_at_ns=30)
    # a new process finds what was left, in order, with the same counts
    with Spool(path) as spool:
        assert spool.depth == 2 and spool.bytes == 2 and spool.state().oldest_received_at_ns == 20
        assert [line for _, line in spool.peek(10)] == ["c", "d"]
        seqs = [seq for seq, _ in spool.peek(10)]
        spool.delete_through(seqs[-1])
        spool.append(["e"])
        assert spool.peek(10)[0][0] > seqs[-1]  # seq never reused
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def test_spool_in_memory() -> None:
    with Spool(None) as spool:
        assert not spool.durable and str(spool) == "(in memory)"
        spool.append(["a", "b"])
        assert [line for _, line in spool.peek(5)] == ["a", "b"]
    DeadLetters(None).append("m f=1 1", "refused")  # records nothing, raises nothing


def test_spool_is_locked_to_one_process(tmp_path: Path) -> None:
    from edgeprobe.collector.spool import SpoolLockedError

    with Spool(tmp_path / "s.sqlite"), pytest.raises(SpoolLockedError, match="in use"):
        Spool(tmp_path / "s.sqlite").open()
    with Spool(tmp_path / "s.sqlite"):  # released on close
        pass


def test_spool_open_errors_are_spool_errors(tmp_path: Path) -> None:
    from edgeprobe.collector.spool import SpoolError

    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError):
        Spool(tmp_path / "file" / "spool.sqlite").open()
    (tmp_path / "garbage.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError):
        Spool(tmp_path / "garbage.sqlite").open()


def test_dead_letters_are_json_lines(tmp_path: Path) -> None:
    dl = DeadLetters(tmp_path / "dl" / "dead.jsonl")
    dl.append('m,t=a f="x\ny" 1', "HTTP 400: bad", 400, at_ns=1_700_000_000_123_456_789)
    dl.append("m f=1 2", "HTTP 413: too large", 413)
    records = read_dead_letters(dl.path)
    assert records[0] == {
        "time": "2023-11-14T22:13:20.123456789Z",
        "at_ns": 1_700_000_000_123_456_789,
        "reason": "refused",
        "error": "HTTP 400: bad",
        "status": 400,
        "line": 'm,t=a f="x\ny" 1',
    }
    assert records[1]["status"] == 413 and records[1]["reason"] == "too_large"
    assert len(dl.path.read_text().splitlines()) == 2


# ---- flusher -------------------------------------------------------------------------------------


class FakeWriter:
    """Refuses batches holding a 'bad' line (400), or fails retryably ``fail_times`` times."""

    def __init__(self, fail_times: int = 0, delay_s: float = 0.0) -> None:
        self.fail_times = fail_times
        self.delay_s = delay_s
        self.written: list[str] = []
        self.calls: list[int] = []
        self.prepared = 0

    async def prepare(self) -> None:
        self.prepared += 1

    async def write(self, lines: Sequence[str]) -> None:
        self.calls.append(len(lines))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow InfluxDB: the delay is the scenario
        if self.fail_times > 0:
            self.fail_times -= 1
            raise WriteError("HTTP 503: busy", retryable=True, status=503)
        if any("bad" in line for line in lines):
            self.written.extend(line for line in lines if "bad" not in line)  # 1.x writes the rest
            raise WriteError("HTTP 400: partial write: field type conflict", retryable=False, status=400)
        self.written.extend(lines)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture
def make_collector(tmp_path: Path, executor: ThreadPoolExecutor) -> Iterator[Any]:
    spools: list[Spool] = []

    def make(**influx: Any) -> tuple[_Collector, CollectorStats]:
        limits = influx.pop("limits", {})
        spool_cfg = {"path": str(tmp_path / "spool.sqlite"), **influx.pop("spool", {})}
        cfg = convert(
            {
                "influx": {"flush_interval_s": 0.01, "retry_min_s": 0.01, "retry_max_s": 0.02, **influx},
                "limits": limits,
                "spool": spool_cfg,
            },
            CollectorConfig,
            "test",
        )
        spool = Spool(cfg.spool_path()).open()
        spools.append(spool)
        stats = CollectorStats()
        col = _Collector(cfg, stats, {}, spool, DeadLetters(cfg.dead_letter_path()), executor)
        return col, stats

    yield make
    for spool in spools:
        spool.close()


async def run_flusher(col: _Collector, writer: FakeWriter) -> None:
    col.stopping.set()
    col.wake.set()
    await asyncio.wait_for(col.flush_loop(writer), 10)


async def test_bisection_dead_letters_only_the_bad_lines(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=100)
    lines = [f"m v={i}i {i}" for i in range(100)]
    lines[17] = "m bad=1 17"
    lines[80] = "m bad=2 80"
    await col.spool_append(lines)
    writer = FakeWriter()
    await run_flusher(col, writer)
    assert stats.dead_lettered == 2 and stats.written_points == 98
    assert set(writer.written) == {line for line in lines if "bad" not in line}
    assert writer.calls[0] == 100 and max(writer.calls[1:]) <= 50
    assert stats.spool_lines == 0 and col.spool.depth == 0 and writer.prepared == 1
    records = read_dead_letters(col.dead_letters.path)
    assert [r["line"] for r in records] == ["m bad=1 17", "m bad=2 80"]
    assert all(r["status"] == 400 and r["reason"] == "field_type_conflict" for r in records)
    assert all("field type conflict" in str(r["error"]) for r in records)


async def test_retryable_errors_keep_the_batch(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=10)
    lines = [f"m v={i}i {i}" for i in range(25)]
    await col.spool_append(lines)
    writer = FakeWriter(fail_times=3)
    await run_flusher(col, writer)
    assert writer.written == lines and stats.written_points == 25
    assert stats.write_retries == 3 and stats.dead_lettered == 0
    assert writer.calls == [10, 10, 10, 10, 10, 5]
    assert stats.writes == 3 and list(col.batch_lines) == [10, 10, 5] and len(col.latencies_ms) == 3


async def test_a_batch_that_times_out_is_retried_in_halves(make_collector: Any) -> None:
    class SlowForLargeBatches(FakeWriter):
        async def write(self, lines: Sequence[str]) -> None:
            self.calls.append(len(lines))
            if len(lines) > 30:
                raise WriteError("POST /write: timed out", retryable=True, timeout=True)
            self.written.extend(lines)

    col, stats = make_collector(batch_max_lines=100)
    lines = [f"m v={i}i {i}" for i in range(100)]
    await col.spool_append(lines)
    writer = SlowForLargeBatches()
    await run_flusher(col, writer)
    assert writer.written == lines  # all of it, in order
    assert writer.calls == [100, 50, 25, 25, 50, 25, 25] and stats.write_retries == 3


async def test_batches_are_cut_at_batch_max_lines(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=4)
    await col.spool_append([f"l{i}" for i in range(10)])
    writer = FakeWriter()
    await run_flusher(col, writer)
    assert writer.calls == [4, 4, 2] and stats.written_points == 10


async def test_flush_after_the_interval_without_stopping(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=1000)
    writer = FakeWriter()
    task = asyncio.create_task(col.flush_loop(writer))
    await col.spool_append(["one line"])
    await wait_for_async(lambda: stats.written_points, 5, "the line written after flush_interval_s")
    assert writer.written == ["one line"]
    col.stopping.set()
    col.wake.set()
    await asyncio.wait_for(task, 5)


async def test_unwritten_lines_stay_in_the_spool_for_the_next_start(make_collector: Any, tmp_path: Path) -> None:
    col, stats = make_collector(batch_max_lines=2)
    await col.spool_append(["a", "b", "c"])
    writer = FakeWriter(fail_times=1_000_000)
    task = asyncio.create_task(col.flush_loop(writer))
    await wait_for_async(lambda: stats.write_retries >= 2, 5, "two failed writes")
    task.cancel()  # as on a stop that did not finish within shutdown_flush_s, or a crash
    with pytest.raises(asyncio.CancelledError):
        await task
    col.spool.close()
    col2, stats2 = make_collector(batch_max_lines=2)
    assert col2.spool.depth == 3 and stats2.spool_lines == 3
    writer2 = FakeWriter()
    await run_flusher(col2, writer2)
    assert writer2.written == ["a", "b", "c"] and col2.spool.depth == 0


async def test_a_full_spool_holds_the_consumer_back(make_collector: Any, caplog: pytest.LogCaptureFixture) -> None:
    col, stats = make_collector(batch_max_lines=10, spool={"max_bytes": 1024 * 1024})
    await col.spool_append(["x" * 1024] * 1024)
    assert col.spool_full()
    stop = asyncio.Event()
    waiter = asyncio.create_task(col.wait_for_room(stop))
    # Its warning says it found the spool full and is waiting (not returning at once).
    await wait_for_async(lambda: "spool full" in caplog.text, 5, "the consumer's 'spool full' warning")
    assert not waiter.done()
    rows = col.spool.peek(10)
    await col._forget_through(rows[-1][0], Backoff(0.01, 0.01))
    assert await asyncio.wait_for(waiter, 5) is True and stats.backpressure_s > 0
    await col.spool_append(["x" * 1024] * 10)
    stop.set()
    assert await col.wait_for_room(stop) is False


@dataclass
class FakeMessage:
    topic: Any
    payload: bytes
    qos: int
    mid: int


class FakePaho:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.acks: list[tuple[int, int, int]] = []  # (mid, qos, spool depth when acknowledged)

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append((mid, qos, self.spool.depth))


class FakeClient:
    def __init__(self, spool: Spool) -> None:
        self._client = FakePaho(spool)


def _message(topic: str, payload: bytes, mid: int, qos: int = 1) -> Any:
    import aiomqtt

    return FakeMessage(aiomqtt.Topic(topic), payload, qos, mid)


def _envelope(n: int, agent: str = "a1") -> bytes:
    import json

    now = time.time_ns()
    obs = [
        {
            "id": f"o{i}",
            "seq": i,
            "kind": "icmp",
            "target": "127.0.0.1",
            "started_at_ns": now + i,
            "duration_ms": 1.0,
            "outcome": "timeout",
        }
        for i in range(n)
    ]
    return json.dumps({"v": 1, "agent": agent, "site": "pop1", "sent_at_ns": now, "observations": obs}).encode()


async def test_messages_are_acknowledged_only_after_the_spool_commit(make_collector: Any) -> None:
    from edgeprobe.probes.registry import KINDS

    col, stats = make_collector()
    col.kinds = KINDS
    client = FakeClient(col.spool)
    topic = "edgeprobe/v1/pop1/a1/obs"
    group = [
        _message(topic, _envelope(3), mid=7),
        _message(topic, b"garbage", mid=8),  # rejected: acknowledged too, nothing to keep
        _message(topic, _envelope(2), mid=9, qos=0),  # QoS 0: nothing to acknowledge
        _message(topic, _envelope(1, agent="spoof"), mid=10),
    ]
    await col.take(client, group)  # type: ignore[arg-type]
    assert client._client.acks == [(7, 1, 5), (8, 1, 5), (10, 1, 5)]  # all 5 lines committed first
    assert stats.acknowledged_messages == 4 and stats.spooled_lines == 5
    assert stats.rejected == {"bad_json": 1, "topic_mismatch": 1}


async def test_no_acknowledgement_when_the_spool_fails(make_collector: Any) -> None:
    from edgeprobe.collector.spool import SpoolError
    from edgeprobe.probes.registry import KINDS

    col, stats = make_collector()
    col.kinds = KINDS
    client = FakeClient(col.spool)
    col.spool.close()  # every spool call now fails
    with pytest.raises(SpoolError):
        await col.take(client, [_message("edgeprobe/v1/pop1/a1/obs", _envelope(2), mid=3)])  # type: ignore[list-item]
    assert client._client.acks == [] and stats.acknowledged_messages == 0 and stats.spool_errors == 1


def test_process_counts_and_never_raises(make_collector: Any) -> None:
    col, stats = make_collector()
    assert col.process("edgeprobe/v1/pop1/a1/obs", b"garbage") == []
    assert col.process("edgeprobe/v1/pop1/a1/obs", b'{"v": 3}') == []
    assert col.process("edgeprobe/v1/pop1/a1/health", b"[[[") == []
    col.kinds = None  # type: ignore[assignment]  # a bug: processing raises
    assert col.process("edgeprobe/v1/pop1/a1/obs", _envelope(1)) == []
    assert stats.received_messages == 4
    assert stats.rejected == {"bad_json": 2, "unsupported_version": 1, "internal_error": 1}


def test_agent_health_becomes_a_point(make_collector: Any) -> None:
    import json

    col, stats = make_collector()
    now = time.time_ns()
    payload = {
        "v": 1,
        "agent": "a1",
        "site": "pop1",
        "at_ns": now,
        "started_at_ns": now - 10**9,
        "labels": {"tier": "edge", "source": "clash"},
        "spool_depth": 12,
        "spool_oldest_age_s": 1.5,
        "connected": True,
        "version": "0.1.0",
        "future_field": 1,
    }
    lines = col.process("edgeprobe/v1/pop1/a1/health", json.dumps(payload).encode())
    assert len(lines) == 1 and stats.received_health == 1
    line = lines[0]
    assert line.startswith("edgeprobe_health,agent=a1,site=pop1,source=agent,tier=edge ")
    assert "spool_depth=12i" in line and "spool_oldest_age_s=1.5" in line and "connected=true" in line
    assert 'version="0.1.0"' in line and line.endswith(f" {now}") and "future_field" not in line
    assert stats.omitted == {"label_clash": 1}
    # spoofed, and from a broken clock
    assert col.process("edgeprobe/v1/pop1/a2/health", json.dumps(payload).encode()) == []
    payload["at_ns"] = 10**9
    assert col.process("edgeprobe/v1/pop1/a1/health", json.dumps(payload).encode()) == []
    assert stats.rejected == {"topic_mismatch": 1, "bad_timestamp": 1}


def test_health_fields() -> None:
    stats = CollectorStats(started_at_ns=5, received_messages=10, written_points=7, dead_lettered=1)
    stats.rejected.update({"bad_json": 2, "topic_mismatch": 1})
    stats.spool_lines, stats.spool_bytes, stats.spool_oldest_at_ns = 3, 300, 1_000_000_000
    f = health_fields(stats, [5.0, 1.0, 3.0, 2.0, 4.0], [10, 20], now_ns=3_500_000_000, uptime_s=12.0)
    assert f["received_messages"] == 10 and f["written_points"] == 7 and f["dead_lettered"] == 1
    assert f["rejected"] == 3 and f["rejected_bad_json"] == 2 and f["rejected_too_large"] == 0
    assert f["rejected_internal_error"] == 0
    assert f["write_latency_p50_ms"] == 3.0 and f["write_latency_p95_ms"] == pytest.approx(4.8)
    assert f["write_latency_max_ms"] == 5.0
    assert f["batch_lines_mean"] == 15.0 and f["batch_lines_max"] == 20 and f["batches"] == 2
    assert f["spool_depth"] == 3 and f["spool_bytes"] == 300 and f["spool_oldest_age_s"] == 2.5
    assert f["started_at_ns"] == 5 and f["uptime_s"] == 12.0
    empty = health_fields(CollectorStats(), [], [], now_ns=1, uptime_s=0.0)
    assert "write_latency_p50_ms" not in empty and empty["spool_oldest_age_s"] == 0.0  # no backlog: no delay
    assert "batch_lines_mean" not in empty  # not measured: absent, never 0
    # field types are stable whatever the values (InfluxDB refuses a type change)
    assert all(isinstance(f[k], float) for k in ("uptime_s", "backpressure_s", "write_latency_p50_ms"))
    assert isinstance(empty["uptime_s"], float) and isinstance(empty["backpressure_s"], float)


def test_collector_health_line(make_collector: Any) -> None:
    col, _ = make_collector()
    col.latencies_ms.extend([1.0, 2.0])
    line = col.health_line()
    assert line is not None and line.startswith("edgeprobe_health,collector=collector,source=collector ")
    assert "write_latency_p50_ms=1.5" in line
    assert not col.latencies_ms  # a window per health point


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rlog = RateLimitedLog(logging.getLogger("test.rl"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.rl"):
        assert rlog.warning("k", "first %s", 1)
        assert not rlog.warning("k", "second")
        assert not rlog.warning("k", "third")
        assert rlog.warning("other", "other key")
        now[0] = 10.5
        assert rlog.warning("k", "fourth %s", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "first 1",
        "other key",
        "fourth 4 (2 more like this suppressed)",
    ]
    assert caplog.records[0].filename == Path(__file__).name  # the caller, not the helper


def test_refused_subscription_raises(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(aiomqtt.MqttError, match="'b/#'"):
        _check_granted((1, 0x80), ["a/#", "b/#"], 1)
    _check_granted([ReasonCode(PacketTypes.SUBACK, identifier=1)], "t/#", 1)
    _check_granted((1,), "t/#", 1)
    with pytest.raises(aiomqtt.MqttError, match="refused the subscription"):
        _check_granted([ReasonCode(PacketTypes.SUBACK, identifier=0x80)], "t/#", 1)
    with pytest.raises(aiomqtt.MqttError):
        _check_granted((0x80,), "t/#", 1)
    with caplog.at_level(logging.WARNING):
        _check_granted([ReasonCode(PacketTypes.SUBACK, identifier=0)], "t/#", 1)
    assert "granted QoS 0" in caplog.text
