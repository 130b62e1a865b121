"""Hostile input: the decoder and the line-protocol encoder fuzzed with hypothesis.

Properties: nothing raises; every rejection has a known reason and a detail; every line the
encoder makes is accepted by a strict reference parser (``lpcheck``), reads back as what went in,
and (integration) is accepted by the real influxd in a batch, so no input can break a batch.

``EDGEPROBE_FUZZ_SCALE=20 .venv/bin/pytest tests/unit/collector/test_fuzz.py`` runs 20 times as many
examples.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edgeprobe.collector import decode as d
from edgeprobe.collector.decode import decode_health, decode_message
from edgeprobe.collector.lineproto import (
    HEALTH_MEASUREMENT,
    MAX_SERIES_KEY_BYTES,
    decode_tag_value,
    encode_batch,
    encode_observation,
    encode_point,
)
from edgeprobe.localstack import InfluxServer
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation
from tests.support.lpcheck import LineProtocolError, parse_line
from tests.support.paths import GOLDEN

PREFIX = "edgeprobe"
TOPIC = "edgeprobe/v1/pop1/a1/obs"
NOW_NS = 1_800_000_000_000_000_000  # a fixed "now" (2027-01-15) for the pure tests
MAX_BYTES = 256 * 1024
REAL_NOW_NS = time.time_ns()
SCALE = int(os.environ.get("EDGEPROBE_FUZZ_SCALE", "1"))  # for what goes to the real influxd

SPECIALS = ["\\", ",", "=", " ", '"', "'", "\n", "\r", "\t", "\x00", "\x7f", "%", "~ep~", "#", "é", "😀", "\u2028"]
hostile_text = st.one_of(
    st.lists(st.sampled_from([*SPECIALS, "a", "b"]), max_size=12).map("".join),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=30),  # every code point but surrogates
)
hostile_key = st.one_of(hostile_text, st.sampled_from(["time", "_field", "_measurement", "agent", "id", "target"]))
hostile_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**63 - 1, 2**63, -(2**63), 1e308, -1e308, 5e-324, -0.0]),
)
json_scalar = st.one_of(st.none(), st.booleans(), hostile_number, hostile_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=20,
)


def _templates() -> list[dict[str, Any]]:
    out = []
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        out.extend(json.loads(path.read_text())["observations"])
    return out


TEMPLATES = _templates()


def check_decoded(decoded: d.Decoded) -> None:
    """The invariants of any decode: reasons known, details given, good observations encodable."""
    for rej in decoded.rejects:
        assert rej.reason in d.REASONS, rej
        assert rej.detail and "\n" not in rej.detail and len(rej.detail) <= d.MAX_DETAIL_CHARS
    if decoded.meta is None:
        assert len(decoded.rejects) == 1
        return
    assert len(decoded.observations) + len(decoded.rejects) == decoded.total_observations
    for obs in decoded.observations:
        assert d.MIN_TIMESTAMP_NS <= obs.started_at_ns <= NOW_NS + d.MAX_FUTURE_NS
        assert math.isfinite(obs.duration_ms) and 0 <= obs.duration_ms <= d.MAX_DURATION_MS
    batch = encode_batch(
        decoded.observations,
        agent=decoded.meta.agent,
        site=decoded.meta.site,
        kinds=KINDS,
        agent_labels=decoded.meta.labels,
    )
    for line, obs in zip(batch.lines, decoded.observations, strict=True):
        point = parse_line(line)
        assert point.fields["id"] == obs.id and point.timestamp_ns == obs.started_at_ns
        assert decode_tag_value(point.tags["target"]) == obs.target


def decode(payload: bytes, topic: str = TOPIC) -> d.Decoded:
    return decode_message(topic, payload, prefix=PREFIX, max_bytes=MAX_BYTES, kinds=KINDS, now_ns=NOW_NS)


# ---- the decoder ------------------------------------------------------------------------------------


@given(st.binary(max_size=4096))
@example(b"\xff\xfe")
@example(b'{"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [{"id": "\xff"}]}')
def test_random_bytes_never_crash(payload: bytes) -> None:
    out = decode(payload)
    check_decoded(out)
    assert not out.observations
    health = decode_health(TOPIC.replace("/obs", "/health"), payload, prefix=PREFIX, max_bytes=MAX_BYTES)
    assert health.reject is not None and health.reject.reason in d.REASONS


def _mutated_envelope(draw: st.DrawFn) -> bytes:
    observations = []
    for _ in range(draw(st.integers(1, 4))):
        o = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
        o["id"] = uuid.uuid4().hex
        o["started_at_ns"] = NOW_NS - draw(st.integers(0, 10**12))
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.sampled_from(["set", "delete", "set_field", "set_label", "extra"]))
            if action == "set":
                o[draw(st.sampled_from(sorted(o)))] = draw(json_value)
            elif action == "delete":
                o.pop(draw(st.sampled_from(sorted(o))), None)
            elif action == "set_field":
                fields = o.setdefault("fields", {})
                if isinstance(fields, dict):
                    fields[draw(st.sampled_from([*sorted(fields), "sent", "rtt_avg_ms", "status", "x"]))] = draw(
                        json_value
                    )
            elif action == "set_label":
                labels = o.setdefault("labels", {})
                if isinstance(labels, dict):
                    labels[draw(hostile_key)] = draw(hostile_text)
            else:
                o[draw(hostile_text)] = draw(json_value)
        observations.append(o)
    env: dict[str, Any] = {
        "v": 1,
        "agent": "a1",
        "site": "pop1",
        "sent_at_ns": NOW_NS,
        "labels": draw(st.dictionaries(hostile_key, hostile_text, max_size=3)),
        "observations": observations,
    }
    if draw(st.booleans()):
        env[draw(st.sampled_from(["v", "agent", "site", "labels", "observations", "sent_at_ns"]))] = draw(json_value)
    text = json.dumps(env, allow_nan=True)
    if draw(st.booleans()):  # duplicated keys (json.dumps can't make them)
        text = text.replace('"id": ', '"id": "dup", "id": ', 1)
    if draw(st.booleans()):  # a byte that is not UTF-8 somewhere in a string
        text = text.replace('"id": "', '"id": "\udcff', 1)
    return text.encode("utf-8", "surrogateescape")


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> bytes:
    return _mutated_envelope(draw)


@settings(max_examples=400 * SCALE, deadline=None)
@given(mutated_envelopes())
def test_mutated_envelopes(payload: bytes) -> None:
    check_decoded(decode(payload))


@pytest.mark.parametrize("where", ["top", "envelope", "observation", "fields"])
def test_deep_nesting_is_bad_json_not_a_crash(where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    obs = {**TEMPLATES[0], "started_at_ns": NOW_NS}
    if where == "top":
        text = deep
    elif where == "envelope":
        text = json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": []})
        text = text[:-1] + f', "extra": {deep}}}'
    elif where == "observation":
        text = json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [obs]})
        text = text.replace('"id": ', f'"extra": {deep}, "id": ', 1)
    else:
        text = json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [obs]})
        text = text.replace('"fields": {', f'"fields": {{"deep": {deep}, ', 1)
    out = decode_message(TOPIC, text.encode(), prefix=PREFIX, max_bytes=10**7, kinds=KINDS, now_ns=NOW_NS)
    check_decoded(out)
    assert out.rejects and out.rejects[0].reason in (d.BAD_JSON, d.BAD_OBSERVATION, d.BAD_ENVELOPE, d.BAD_FIELDS)


def test_invalid_utf8_is_rejected_with_a_reason() -> None:
    obs = {**TEMPLATES[0], "started_at_ns": NOW_NS}
    env = {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "labels": {"k": "v"}, "observations": [obs, obs]}
    text = json.dumps(env).encode()
    # in the envelope: the whole message; in one observation: that observation alone
    assert [r.reason for r in decode(text.replace(b'"k": "v', b'"k": "\xc3\x28')).rejects] == [d.BAD_JSON]
    out = decode(text.replace(b'"id": "', b'"id": "\xc3\x28', 1))
    assert [r.reason for r in out.rejects] == [d.BAD_OBSERVATION] and len(out.observations) == 1
    out = decode(text.replace(b'"id": "', b'"id": "\\ud800', 1))  # a lone surrogate escape: malformed JSON
    assert [r.reason for r in out.rejects] == [d.BAD_JSON]


@pytest.mark.parametrize(
    ("started_at_ns", "ok"),
    [
        (d.MIN_TIMESTAMP_NS - 1, False),
        (d.MIN_TIMESTAMP_NS, True),
        (NOW_NS + d.MAX_FUTURE_NS, True),
        (NOW_NS + d.MAX_FUTURE_NS + 1, False),
        (0, False),
        (-1, False),
        (2**63 - 1, False),
    ],
)
def test_timestamp_bounds(started_at_ns: int, ok: bool) -> None:
    obs = {**TEMPLATES[0], "started_at_ns": started_at_ns}
    out = decode(json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [obs]}).encode())
    assert (len(out.observations) == 1) == ok
    if not ok:
        assert [r.reason for r in out.rejects] == [d.BAD_TIMESTAMP] and "started_at_ns" in out.rejects[0].detail


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("duration_ms", -0.001),
        ("duration_ms", 86_400_001.0),
        ("duration_ms", 1e308),
        ("sched_lag_ms", -1),
        ("sched_lag_ms", 1e300),
        ("seq", 2**64),
        ("id", "x" * 129),
        ("job", "j" * 257),
        ("target", "t" * 2049),
        ("target", ""),
        ("outcome", "OK; DROP"),
    ],
)
def test_absurd_values_are_bad_values(key: str, value: Any) -> None:
    obs = {**TEMPLATES[0], "started_at_ns": NOW_NS, key: value}
    out = decode(json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [obs]}).encode())
    assert [r.reason for r in out.rejects] == [d.BAD_VALUE], out.rejects


def test_huge_numbers_in_json_are_not_a_crash() -> None:
    obs = {**TEMPLATES[0], "started_at_ns": NOW_NS}
    text = json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [obs]})
    out = decode(text.replace('"duration_ms": ', '"duration_ms": 1e999999, "x": ', 1).encode())
    check_decoded(out)
    out = decode(text.replace('"seq": ', '"seq": 1' + "0" * 5000 + ', "y": ', 1).encode())
    check_decoded(out)
    assert out.rejects


def test_missing_and_extra_fields() -> None:
    obs = {**TEMPLATES[0], "started_at_ns": NOW_NS, "from_the_future": {"a": [1, 2]}}
    del obs["duration_ms"]
    out = decode(json.dumps({"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [obs]}).encode())
    assert [r.reason for r in out.rejects] == [d.BAD_OBSERVATION] and "duration_ms" in out.rejects[0].detail
    env = {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "observations": [], "new_key": 1}
    assert decode(json.dumps(env).encode()).ok  # an additive change of the schema


@settings(max_examples=200 * SCALE, deadline=None)
@given(
    agent=st.sampled_from(["a1", "a2", "a/1", ""]),
    site=st.sampled_from(["pop1", "pop2"]),
    at_ns=st.integers(-(2**63), 2**64),
    extra=st.dictionaries(st.sampled_from(["spool_depth", "uptime_s", "connected", "labels", "v"]), json_value),
)
def test_health_messages_never_crash(agent: str, site: str, at_ns: int, extra: dict[str, Any]) -> None:
    payload = {"v": 1, "agent": agent, "site": site, "at_ns": at_ns, "started_at_ns": 1, **extra}
    out = decode_health(
        "edgeprobe/v1/pop1/a1/health", json.dumps(payload).encode(), prefix=PREFIX, max_bytes=MAX_BYTES, now_ns=NOW_NS
    )
    if out.reject is not None:
        assert out.reject.reason in d.REASONS and out.reject.detail
        return
    assert agent == "a1" and site == "pop1" and d.MIN_TIMESTAMP_NS <= out.at_ns <= NOW_NS + d.MAX_FUTURE_NS
    enc = encode_point(
        HEALTH_MEASUREMENT,
        tags={"agent": "a1", "site": "pop1", "source": out.source},
        fields=out.fields,
        timestamp_ns=out.at_ns,
        labels=out.labels,
    )
    assert enc is not None
    parse_line(enc.line)


# ---- the encoder --------------------------------------------------------------------------------------


@st.composite
def hostile_observations(draw: st.DrawFn) -> tuple[Observation, dict[str, str]]:
    obs = Observation(
        id=draw(hostile_text.filter(bool)),
        seq=draw(st.integers(0, 2**63 - 1)),
        kind="icmp",
        target=draw(hostile_text),
        started_at_ns=draw(st.integers(d.MIN_TIMESTAMP_NS, NOW_NS)),
        duration_ms=draw(st.floats(allow_nan=True, allow_infinity=True)),
        outcome=draw(st.sampled_from(["ok", "timeout"])),
        reason=draw(st.none() | hostile_text),
        sched_lag_ms=draw(st.none() | st.floats(allow_nan=True, allow_infinity=True)),
        job=draw(st.none() | hostile_text),
        labels=draw(st.dictionaries(hostile_key, hostile_text, max_size=4)),
        fields=draw(st.dictionaries(hostile_key, json_scalar | st.lists(hostile_number, max_size=3), max_size=6)),
    )
    agent_labels = draw(st.dictionaries(hostile_key, hostile_text, max_size=3))
    return obs, agent_labels


@settings(max_examples=500 * SCALE, deadline=None)
@given(hostile_observations(), st.sampled_from([(), ("family",), ("family", "time", "target")]))
def test_every_encoded_line_is_valid_and_reads_back(
    case: tuple[Observation, dict[str, str]], tag_fields: tuple[str, ...]
) -> None:
    obs, agent_labels = case
    enc = encode_observation(
        obs, agent="a1", site="pop1", measurement="edgeprobe_icmp", tag_fields=tag_fields, agent_labels=agent_labels
    )
    try:
        point = parse_line(enc.line)
    except LineProtocolError as err:
        raise AssertionError(f"{err}: {enc.line!r}") from None
    tags = {k: decode_tag_value(v) for k, v in point.tags.items()}
    assert tags["agent"] == "a1" and tags["site"] == "pop1" and tags["target"] == obs.target
    assert point.fields["id"] == obs.id and point.fields["seq"] == obs.seq
    assert point.timestamp_ns == obs.started_at_ns
    if obs.job is not None:
        assert tags["job"] == obs.job
    if obs.reason is not None:
        assert point.fields["reason"] == obs.reason
    if math.isfinite(obs.duration_ms):
        assert point.fields["duration_ms"] == obs.duration_ms
    labels = {**agent_labels, **obs.labels}
    for key, value in labels.items():
        if key in point.tags and key not in ("agent", "site", "target", "outcome", "job"):
            assert tags[key] == value  # a label that made it is stored exactly
    for key, value in obs.fields.items():
        if key in point.fields and key not in ("id", "seq", "duration_ms", "sched_lag_ms", "reason"):
            if isinstance(value, float):
                assert point.fields[key] == value
            elif not isinstance(value, list):
                assert point.fields[key] == value, (key, value)


@settings(max_examples=50 * SCALE, deadline=None)
@given(
    st.lists(
        st.builds(lambda chunk, n: (chunk or "x") * n, hostile_text, st.integers(100, 4000)).filter(
            lambda v: len(v) >= 2000
        ),
        max_size=14,
    )
)
def test_series_key_stays_under_influxdb_limit(values: list[str]) -> None:
    obs = Observation(id="x", seq=0, kind="icmp", target="t", started_at_ns=NOW_NS, duration_ms=1.0, outcome="ok")
    labels = {f"label{i}": v for i, v in enumerate(values)}
    enc = encode_observation(obs, agent="a", site="s", measurement="edgeprobe_icmp", agent_labels=labels)
    point = parse_line(enc.line)
    key = enc.line[: enc.line.index(" id=")]
    assert len(key.encode()) <= MAX_SERIES_KEY_BYTES
    assert {"agent", "site", "target", "outcome"} <= set(point.tags)
    assert enc.omitted.count("key_too_long") == len(values) - (len(point.tags) - 4)


def test_reference_parser_rejects_what_influxdb_would() -> None:
    good = 'm,a=1,b=x\\ y f=1.0,g=2i,h="q\\"\\\\",t=true 1'
    assert parse_line(good).fields == {"f": 1.0, "g": 2, "h": 'q"\\', "t": True}
    for bad in [
        "m f=1.0",  # no timestamp
        "m,a=1 f=1 1",  # an integer token stored as float: type depends on the parser
        "m,a=x\\ f=1.0 1",  # ends in an escaped space, no fields
        "m,a= f=1.0 1",  # empty tag value
        "m,a=x\\\\y f=1.0 1",  # ambiguous double backslash
        "m,b=1,a=2 f=1.0 1",  # unsorted tags
        "m,time=1 f=1.0 1",
        "m time=1.0 1",
        "m,a=x\ny f=1.0 1",
        "#m f=1.0 1",
        'm f="x\\y" 1',
        "m f=nan 1",
        "m f=9223372036854775808i 1",
        "m f=1.0,f=2.0 1",
        "m,a=1,a=2 f=1.0 1",
    ]:
        with pytest.raises(LineProtocolError):
            parse_line(bad)


# ---- through the real influxd -------------------------------------------------------------------------


def _hostile_envelope_obs(draw: st.DrawFn, seq: int) -> dict[str, Any]:
    o = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
    o["id"] = draw(hostile_text.filter(lambda s: 0 < len(s) <= d.MAX_ID_CHARS))
    o["seq"] = seq
    o["target"] = draw(hostile_text.filter(lambda s: 0 < len(s) <= d.MAX_TARGET_CHARS))
    o["started_at_ns"] = REAL_NOW_NS - 10**9 * seq
    o["reason"] = draw(st.none() | hostile_text)
    o["job"] = draw(st.none() | hostile_text.filter(lambda s: len(s) <= d.MAX_JOB_CHARS))
    o["labels"] = draw(st.dictionaries(hostile_key, hostile_text, max_size=3))
    fields = o.get("fields", {})
    for key in list(fields):
        if isinstance(fields[key], int | float) and not isinstance(fields[key], bool) and draw(st.booleans()):
            fields[key] = draw(hostile_number.filter(lambda v: not isinstance(v, float) or math.isfinite(v)))
        elif isinstance(fields[key], str) and draw(st.booleans()):
            fields[key] = draw(hostile_text)
    return o


@st.composite
def hostile_batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    return [_hostile_envelope_obs(draw, i) for i in range(draw(st.integers(1, 12)))]


@pytest.mark.integration
@settings(max_examples=40 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=hostile_batches(), agent_labels=st.dictionaries(hostile_key, hostile_text, max_size=3))
def test_hostile_batches_are_accepted_by_influxd(
    influxdb: InfluxServer, batch: list[dict[str, Any]], agent_labels: dict[str, str]
) -> None:
    env = {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "labels": agent_labels, "observations": batch}
    decoded = decode_message(TOPIC, json.dumps(env).encode(), prefix=PREFIX, max_bytes=10**7, kinds=KINDS)
    check_decoded_loose(decoded)
    assume(decoded.meta is not None and decoded.observations)
    assert decoded.meta is not None
    lines = encode_batch(decoded.observations, agent="a1", site="pop1", kinds=KINDS, agent_labels=agent_labels).lines
    for line in lines:
        parse_line(line)
    db = f"fuzz_{uuid.uuid4().hex[:10]}"  # a database per example: no field-type history
    influxdb.create_database(db)
    try:
        influxdb.write("\n".join(lines), db)  # raises unless 204
        rows = influxdb.rows('SELECT "id", "seq" FROM /^edgeprobe_/', db)
        assert sorted(r["seq"] for r in rows) == sorted(o.seq for o in decoded.observations)
        assert {r["id"] for r in rows} == {o.id for o in decoded.observations}
    finally:
        influxdb.drop_database(db)


def check_decoded_loose(decoded: d.Decoded) -> None:
    for rej in decoded.rejects:
        assert rej.reason in d.REASONS and rej.detail


def test_malformed_text_is_bad_json_whatever_the_codec_raises() -> None:
    # Asserts edgeprobe's own classification, not which exception subtype msgspec picks for it
    # (that changed between msgspec releases): invalid UTF-8 or a lone surrogate anywhere in the
    # envelope's own keys is "not JSON", a valid document of the wrong shape is a bad envelope.
    env = {"v": 1, "agent": "a1", "site": "pop1", "sent_at_ns": 1, "labels": {}, "observations": []}
    text = json.dumps(env).encode()
    broken = (text.replace(b'"a1"', b'"a\xff"'), text.replace(b'"a1"', b'"\\ud800"'), b'{"v": 1, "agent": "\xc3\x28"')
    for bad in broken:
        assert [r.reason for r in decode(bad).rejects] == [d.BAD_JSON], bad
    wrong_shape = json.dumps({**env, "observations": 3}).encode()
    assert [r.reason for r in decode(wrong_shape).rejects] == [d.BAD_ENVELOPE]
