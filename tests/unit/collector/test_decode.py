"""Message decoding: every reject class, one bad observation among good ones, golden v1 samples."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgeprobe.collector import decode as d
from edgeprobe.collector.decode import decode_message
from edgeprobe.collector.lineproto import encode_batch
from edgeprobe.probes.kind import AnyKind, ProbeKind
from tests.support.paths import GOLDEN

PREFIX = "edgeprobe"
TOPIC = "edgeprobe/v1/pop1/a1/obs"
MAX = 64 * 1024


class PingResult(msgspec.Struct, kw_only=True):
    sent: int
    received: int
    loss_ratio: float
    rtt_avg_ms: float | None = None
    family: str = "ipv4"
    rtts_ms: list[float | None] = []


class NoConfig(msgspec.Struct, frozen=True, kw_only=True):
    pass


async def _never(target: str, config: Any, ctx: Any) -> Any:
    raise AssertionError("not run")


KINDS: dict[str, AnyKind] = {
    "ping": ProbeKind(
        name="ping",
        description="fake",
        config_type=NoConfig,
        result_type=PingResult,
        run=_never,
        check_target=lambda t: None,
        max_run_s=lambda c: 1.0,
        tag_fields=("family",),
    )
}


def good_obs(i: int = 0, **kw: Any) -> dict[str, Any]:
    o: dict[str, Any] = {
        "id": f"id{i}",
        "seq": i,
        "kind": "ping",
        "target": "192.0.2.1",
        "started_at_ns": 1_700_000_000_000_000_000 + i,
        "duration_ms": 10.5,
        "outcome": "ok",
        "fields": {"sent": 3, "received": 3, "loss_ratio": 0, "rtt_avg_ms": 5, "rtts_ms": [5, 5, None]},
    }
    o.update(kw)
    return o


def envelope(observations: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "v": 1,
        "agent": "a1",
        "site": "pop1",
        "sent_at_ns": 1_700_000_000_500_000_000,
        "labels": {"tier": "pop"},
        "observations": observations,
    }
    e.update(kw)
    return e


def dec(payload: bytes | dict[str, Any], topic: str = TOPIC, max_bytes: int = MAX) -> d.Decoded:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return decode_message(topic, raw, prefix=PREFIX, max_bytes=max_bytes, kinds=KINDS)


def reasons(decoded: d.Decoded) -> list[str]:
    return [r.reason for r in decoded.rejects]


def test_good_envelope() -> None:
    out = dec(envelope([good_obs(0), good_obs(1)]))
    assert out.ok and out.rejects == [] and out.total_observations == 2
    assert out.meta is not None and out.meta.agent == "a1" and out.meta.labels == {"tier": "pop"}
    fields = out.observations[0].fields
    # declared floats become floats even when the JSON had integers
    assert isinstance(fields["loss_ratio"], float) and isinstance(fields["rtt_avg_ms"], float)
    assert isinstance(fields["sent"], int) and not isinstance(fields["sent"], bool)
    assert fields["rtts_ms"] == [5.0, 5.0, None] and fields["family"] == "ipv4"  # default filled in


def test_too_large_is_rejected_before_parsing() -> None:
    out = dec(b"x" * (MAX + 1))  # not JSON either: the size is checked first
    assert not out.ok and reasons(out) == [d.TOO_LARGE]
    assert "bytes" in out.rejects[0].detail


@pytest.mark.parametrize("payload", [b"", b"not json", b'{"v": 1, "agent": "a1"', b"\xff\xfe", b"[1, 2"])
def test_not_json(payload: bytes) -> None:
    out = dec(payload)
    assert reasons(out) == [d.BAD_JSON]
    assert out.rejects[0].detail  # msgspec's message


def test_truncated_envelope() -> None:
    raw = json.dumps(envelope([good_obs()])).encode()
    out = dec(raw[: len(raw) // 2])
    assert reasons(out) == [d.BAD_JSON] and "truncated" in out.rejects[0].detail


def test_unsupported_version() -> None:
    out = dec(envelope([good_obs()], v=7))
    assert reasons(out) == [d.UNSUPPORTED_VERSION]
    assert out.rejects[0].detail == "unsupported schema version 7"


def test_future_version_with_another_shape_is_still_a_version_reject() -> None:
    out = dec({"v": 2, "something": "else"})
    assert reasons(out) == [d.UNSUPPORTED_VERSION]


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2, 3],
        {"v": "1"},
        {"agent": "a1"},
        {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1},  # no observations
        {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": {}},
        {"v": 1, "agent": "a/1", "site": "pop1", "sent_at_ns": 1, "observations": []},
    ],
)
def test_bad_envelope(payload: Any) -> None:
    assert reasons(dec(payload)) == [d.BAD_ENVELOPE]


@pytest.mark.parametrize(
    "topic",
    ["edgeprobe/v1/pop1/a1/status", "edgeprobe/v2/pop1/a1/obs", "other/v1/pop1/a1/obs", "edgeprobe/v1/a1/obs", ""],
)
def test_not_an_obs_topic(topic: str) -> None:
    assert reasons(dec(envelope([good_obs()]), topic=topic)) == [d.BAD_TOPIC]


def test_spoofed_agent() -> None:
    out = dec(envelope([good_obs()], agent="a2"))
    assert reasons(out) == [d.TOPIC_MISMATCH]
    assert out.rejects[0].detail == "topic names agent a1 but payload names a2"


def test_spoofed_site() -> None:
    out = dec(envelope([good_obs()], site="pop9"))
    assert reasons(out) == [d.TOPIC_MISMATCH] and "site pop1" in out.rejects[0].detail


BAD_OBSERVATIONS: list[tuple[str, dict[str, Any]]] = [
    (d.BAD_OBSERVATION, {k: v for k, v in good_obs(9).items() if k != "id"}),  # missing id
    (d.BAD_OBSERVATION, good_obs(9, seq="nine")),
    (d.BAD_OBSERVATION, good_obs(9, fields={"sent": {"nested": 1}})),
    (d.UNKNOWN_KIND, good_obs(9, kind="teleport")),
    (d.BAD_VALUE, good_obs(9, duration_ms=-1.0)),
    (d.BAD_VALUE, good_obs(9, sched_lag_ms=-0.5)),
    (d.BAD_VALUE, good_obs(9, id="")),
    (d.BAD_VALUE, good_obs(9, seq=-1)),
    (d.BAD_TIMESTAMP, good_obs(9, started_at_ns=0)),
    (d.BAD_TIMESTAMP, good_obs(9, started_at_ns=2**63 - 1)),
    (d.BAD_TIMESTAMP, good_obs(9, started_at_ns=2**64)),
    (d.BAD_VALUE, good_obs(9, outcome="Not An Outcome")),
    (d.BAD_VALUE, good_obs(9, target="")),
    (d.BAD_FIELDS, good_obs(9, fields={"sent": "three", "received": 3, "loss_ratio": 0.0})),
    (d.BAD_FIELDS, good_obs(9, fields={"sent": 3, "received": 3, "loss_ratio": 0.0, "rtt_avg_ms": "x"})),
    (d.BAD_FIELDS, good_obs(9, fields={"sent": 3})),  # required result fields missing
    (d.BAD_FIELDS, good_obs(9, fields={"sent": 3.5, "received": 3, "loss_ratio": 0.0})),  # int field
]


@pytest.mark.parametrize(("reason", "bad"), BAD_OBSERVATIONS)
def test_one_bad_observation_is_rejected_alone(reason: str, bad: dict[str, Any]) -> None:
    out = dec(envelope([good_obs(0), bad, good_obs(1)]))
    assert out.ok and out.total_observations == 3
    assert [o.id for o in out.observations] == ["id0", "id1"]
    assert reasons(out) == [reason]
    rej = out.rejects[0]
    assert rej.index == 1 and rej.detail
    if bad.get("id"):
        assert rej.observation_id == "id9"


def test_failure_without_fields_is_kept() -> None:
    out = dec(envelope([good_obs(0, outcome="timeout", reason="no answer", fields={})]))
    assert out.rejects == [] and out.observations[0].fields == {}


def test_unknown_observation_keys_and_result_fields_are_ignored() -> None:
    o = good_obs(0, future_key=1)
    o["fields"]["future_field"] = 1.5
    out = dec(envelope([o], future_envelope_key=True))
    assert out.rejects == [] and "future_field" not in out.observations[0].fields


def test_all_reasons_are_documented() -> None:
    for name in ("TOO_LARGE", "BAD_TOPIC", "BAD_JSON", "UNSUPPORTED_VERSION", "BAD_ENVELOPE", "TOPIC_MISMATCH"):
        assert getattr(d, name) in d.REASONS
    for reason, _ in BAD_OBSERVATIONS:
        assert reason in d.REASONS


def test_long_details_are_shortened() -> None:
    out = dec(envelope([good_obs(0, kind="k" * 5000)]))
    assert len(out.rejects[0].detail) <= d.MAX_DETAIL_CHARS


# ---- golden v1 samples with the real registry ---------------------------------------------------


def golden_files() -> list[Path]:
    files = sorted(GOLDEN.glob("obs_v1_*.json"))
    assert files, "golden samples missing"
    return files


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.name)
def test_golden_v1_samples_decode(path: Path) -> None:
    from edgeprobe.probes.registry import KINDS as REAL_KINDS

    raw = path.read_bytes()
    doc = json.loads(raw)
    topic = f"{PREFIX}/v1/{doc['site']}/{doc['agent']}/obs"
    out = decode_message(topic, raw, prefix=PREFIX, max_bytes=1024 * 1024, kinds=REAL_KINDS)
    assert out.rejects == [], out.rejects
    assert len(out.observations) == len(doc["observations"])
    assert out.meta is not None
    batch = encode_batch(
        out.observations, agent=out.meta.agent, site=out.meta.site, kinds=REAL_KINDS, agent_labels=out.meta.labels
    )
    assert len(batch.lines) == len(doc["observations"]) and not batch.omitted
    for obs, line in zip(doc["observations"], batch.lines, strict=True):
        kind = REAL_KINDS[obs["kind"]]
        assert line.startswith(kind.measurement + ",")
        assert f'id="{obs["id"]}"' in line and line.endswith(f" {obs['started_at_ns']}")
        # a field declared float is written as a float whatever the JSON number looked like
        float_fields = {
            f.name
            for f in msgspec.structs.fields(kind.result_type)
            if f.type in (float, float | None) and f.name not in kind.tag_fields
        }
        for name, value in obs.get("fields", {}).items():
            if name in float_fields and value is not None:
                assert f",{name}={float(value)!r}" in line, (name, line)


def test_golden_samples_mixed_with_garbage() -> None:
    """A golden envelope with one observation broken still delivers the others."""
    from edgeprobe.probes.registry import KINDS as REAL_KINDS

    doc = json.loads((GOLDEN / "obs_v1_tcp_ok_and_refused.json").read_text())
    broken = copy.deepcopy(doc)
    broken["observations"][0]["fields"]["sent"] = "lots"
    raw = json.dumps(broken).encode()
    topic = f"{PREFIX}/v1/{doc['site']}/{doc['agent']}/obs"
    out = decode_message(topic, raw, prefix=PREFIX, max_bytes=1024 * 1024, kinds=REAL_KINDS)
    assert reasons(out) == [d.BAD_FIELDS]
    assert [o.id for o in out.observations] == [doc["observations"][1]["id"]]
