"""Collector config and the flusher's logic, without servers (a fake writer records the batches)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from collector.config import CollectorConfig, load_collector_config
from collector.influx import WriteError
from collector.service import CollectorStats, RateLimitedLog, _check_granted, _Collector
from probes.configfile import ConfigError, Secret, convert

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
            await asyncio.sleep(self.delay_s)
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


def make_collector(**influx: Any) -> tuple[_Collector, CollectorStats]:
    limits = influx.pop("limits", {})
    cfg = convert(
        {"influx": {"flush_interval_s": 0.01, "retry_min_s": 0.01, "retry_max_s": 0.02, **influx}, "limits": limits},
        CollectorConfig,
        "test",
    )
    stats = CollectorStats()
    return _Collector(cfg, stats, kinds={}), stats


async def run_flusher(col: _Collector, writer: FakeWriter) -> None:
    col.stopping.set()
    col.wake.set()
    await asyncio.wait_for(col.flush_loop(writer), 10)


async def test_bisection_isolates_bad_lines() -> None:
    col, stats = make_collector(batch_max_lines=100)
    lines = [f"m v={i}i {i}" for i in range(100)]
    lines[17] = "m bad=1 17"
    lines[80] = "m bad=2 80"
    col._enqueue(lines)
    writer = FakeWriter()
    await run_flusher(col, writer)
    assert stats.dead_lettered == 2 and stats.written_points == 98
    assert set(writer.written) == {line for line in lines if "bad" not in line}
    assert writer.calls[0] == 100 and max(writer.calls[1:]) <= 50
    assert stats.buffered_lines == 0 and writer.prepared == 1


async def test_retryable_errors_keep_the_batch() -> None:
    col, stats = make_collector(batch_max_lines=10)
    lines = [f"m v={i}i {i}" for i in range(25)]
    col._enqueue(lines)
    writer = FakeWriter(fail_times=3)
    await run_flusher(col, writer)
    assert writer.written == lines and stats.written_points == 25
    assert stats.write_retries == 3 and stats.dropped == 0 and stats.dead_lettered == 0
    assert writer.calls == [10, 10, 10, 10, 10, 5]


async def test_full_buffer_drops_the_oldest() -> None:
    col, stats = make_collector(batch_max_lines=10, limits={"max_buffered_lines": 20})
    col._enqueue([f"a{i}" for i in range(15)])
    col._enqueue([f"b{i}" for i in range(15)])
    assert stats.dropped == 10 and stats.buffered_lines == 20
    assert list(col.buffer) == [f"a{i}" for i in range(10, 15)] + [f"b{i}" for i in range(15)]


async def test_batches_are_cut_at_batch_max_lines() -> None:
    col, stats = make_collector(batch_max_lines=4)
    col._enqueue([f"l{i}" for i in range(10)])
    writer = FakeWriter()
    await run_flusher(col, writer)
    assert writer.calls == [4, 4, 2] and stats.written_points == 10


async def test_flush_after_the_interval_without_stopping() -> None:
    col, stats = make_collector(batch_max_lines=1000)
    writer = FakeWriter()
    task = asyncio.create_task(col.flush_loop(writer))
    col._enqueue(["one line"])
    for _ in range(200):
        if stats.written_points:
            break
        await asyncio.sleep(0.01)
    assert writer.written == ["one line"]
    col.stopping.set()
    col.wake.set()
    await asyncio.wait_for(task, 5)


def test_drop_unwritten_counts_everything() -> None:
    col, stats = make_collector(batch_max_lines=2)
    col._enqueue(["a", "b", "c"])
    col.pending.append(["x", "y"])
    col.pending_lines = 2
    assert col.drop_unwritten() == 5 and stats.dropped == 5 and stats.buffered_lines == 0


def test_ingest_counts_and_never_raises() -> None:
    col, stats = make_collector()
    col.ingest("edgeprobe/v1/pop1/a1/obs", b"garbage")
    col.ingest("edgeprobe/v1/pop1/a1/obs", b'{"v": 3}')
    assert stats.received_messages == 2
    assert stats.rejected == {"bad_json": 1, "unsupported_version": 1}


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
    assert caplog.records[0].filename == "test_collector_service.py"  # the caller, not the helper


def test_refused_subscription_raises(caplog: pytest.LogCaptureFixture) -> None:
    _check_granted([ReasonCode(PacketTypes.SUBACK, identifier=1)], "t/#", 1)
    _check_granted((1,), "t/#", 1)
    with pytest.raises(aiomqtt.MqttError, match="refused the subscription"):
        _check_granted([ReasonCode(PacketTypes.SUBACK, identifier=0x80)], "t/#", 1)
    with pytest.raises(aiomqtt.MqttError):
        _check_granted((0x80,), "t/#", 1)
    with caplog.at_level(logging.WARNING):
        _check_granted([ReasonCode(PacketTypes.SUBACK, identifier=0)], "t/#", 1)
    assert "granted QoS 0" in caplog.text
