"""Line protocol encoding: escaping, field typing, what is left out and why."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.collector.lineproto import (
    OMIT_BAD_KEY,
    OMIT_FIELD_CLASH,
    OMIT_INT_RANGE,
    OMIT_LABEL_CLASH,
    OMIT_NONFINITE,
    OMIT_UNKNOWN_KIND,
    TAG_MARKER,
    decode_tag_value,
    encode_batch,
    encode_observation,
    encode_tag_value,
    escape_field_string,
    escape_measurement,
    escape_tag_value,
    format_field_value,
)
from edgeprobe.probes.kind import AnyKind, ProbeKind
from edgeprobe.schema import Observation


class FakeResult(msgspec.Struct, kw_only=True):
    sent: int
    loss_ratio: float
    family: str | None = None
    rtts_ms: list[float | None] = []


class FakeConfig(msgspec.Struct, frozen=True, kw_only=True):
    pass


async def _never(target: str, config: Any, ctx: Any) -> Any:
    raise AssertionError("not run in these tests")


def fake_kind(name: str, tag_fields: tuple[str, ...] = ()) -> AnyKind:
    return ProbeKind(
        name=name,
        description="fake",
        config_type=FakeConfig,
        result_type=FakeResult,
        run=_never,
        check_target=lambda t: None,
        max_run_s=lambda c: 1.0,
        tag_fields=tag_fields,
    )


def obs(**kw: Any) -> Observation:
    base: dict[str, Any] = {
        "id": "abc123",
        "seq": 7,
        "kind": "fake",
        "target": "example.net",
        "started_at_ns": 1_700_000_000_123_456_789,
        "duration_ms": 12.5,
        "outcome": "ok",
    }
    base.update(kw)
    return Observation(**base)


def encode(o: Observation, **kw: Any) -> tuple[str, tuple[str, ...]]:
    args: dict[str, Any] = {"agent": "a1", "site": "s1", "measurement": "edgeprobe_fake"}
    args.update(kw)
    enc = encode_observation(o, **args)
    return enc.line, enc.omitted


def test_minimal_line() -> None:
    line, omitted = encode(obs())
    assert line == (
        "edgeprobe_fake,agent=a1,outcome=ok,site=s1,target=example.net "
        'id="abc123",seq=7i,duration_ms=12.5 1700000000123456789'
    )
    assert omitted == ()


def test_full_line_with_fields_tags_labels() -> None:
    o = obs(
        outcome="timeout",
        reason='no "answer" in 1 s',
        sched_lag_ms=0.25,
        job="ping-core",
        labels={"path": "transit", "tier": "edge"},
        fields={"sent": 3, "loss_ratio": 1.0, "family": "ipv4", "ok": False, "rtts_ms": [1.0, None], "x": None},
    )
    line, omitted = encode(o, tag_fields=("family",), agent_labels={"tier": "pop", "region": "eu"})
    assert line == (
        "edgeprobe_fake,agent=a1,family=ipv4,job=ping-core,outcome=timeout,path=transit,region=eu,"
        "site=s1,target=example.net,tier=edge "
        'id="abc123",seq=7i,duration_ms=12.5,sched_lag_ms=0.25,reason="no \\"answer\\" in 1 s",'
        "sent=3i,loss_ratio=1.0,ok=false 1700000000123456789"
    )
    assert omitted == ()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (0, "0i"),
        (-42, "-42i"),
        (2**63 - 1, "9223372036854775807i"),
        (5.0, "5.0"),  # a float is never written like an integer
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1e16, "1e+16"),
        (1e-7, "1e-07"),
        (0.1, "0.1"),
        ("plain", '"plain"'),
        ('q"uote', '"q\\"uote"'),
        ("back\\slash\\", '"back\\\\slash\\\\"'),
        ("line\nbreak\ttab", '"line\nbreak\ttab"'),  # InfluxDB 1.6 stores raw newlines in strings
        ("", '""'),
        (None, None),
        ([1.0, None], None),
    ],
)
def test_field_values(value: Any, text: str | None) -> None:
    assert format_field_value(value) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_floats_raise(value: float) -> None:
    with pytest.raises(ValueError):
        format_field_value(value)


def test_int_out_of_range_raises() -> None:
    with pytest.raises(OverflowError):
        format_field_value(2**63)


def test_nonfinite_and_huge_fields_are_left_out_and_counted() -> None:
    o = obs(fields={"a": math.nan, "b": math.inf, "c": 2**64, "d": 1.5})
    line, omitted = encode(o)
    assert ",a=" not in line and ",b=" not in line and ",c=" not in line
    assert ",d=1.5 " in line
    assert sorted(omitted) == sorted([OMIT_NONFINITE, OMIT_NONFINITE, OMIT_INT_RANGE])


def test_nonfinite_duration_is_left_out() -> None:
    line, omitted = encode(obs(duration_ms=math.inf))
    assert "duration_ms" not in line and omitted == (OMIT_NONFINITE,)


def test_duration_always_float() -> None:
    # an int in an Observation built by hand still goes out as a float
    line, _ = encode(obs(duration_ms=5, sched_lag_ms=0))
    assert "duration_ms=5.0," in line and "sched_lag_ms=0.0 " in line


def test_labels_never_shadow_reserved_tags_or_fields() -> None:
    o = obs(labels={"target": "evil", "id": "x", "sent": "y", "ok": "fine"}, fields={"sent": 1})
    line, omitted = encode(o, agent_labels={"agent": "evil", "site": "evil", "time": "t"})
    assert "agent=a1," in line and "site=s1," in line and "target=example.net" in line
    assert "evil" not in line and 'id="abc123"' in line and "sent=1i" in line
    assert ",ok=fine" in line
    assert omitted.count(OMIT_LABEL_CLASH) == 6


def test_job_label_overrides_agent_label() -> None:
    line, omitted = encode(obs(labels={"tier": "job"}), agent_labels={"tier": "agent"})
    assert ",tier=job " in line and omitted == ()


def test_bad_label_keys_are_left_out() -> None:
    line, omitted = encode(obs(labels={"a\nb": "v", "c\\": "v", "": "v", "fine key": "v"}))
    assert omitted.count(OMIT_BAD_KEY) == 3
    assert ",fine\\ key=v" in line


def test_result_fields_clashing_with_base_fields_are_left_out() -> None:
    line, omitted = encode(obs(fields={"id": "other", "seq": 1, "target": "x", "reason": "r"}))
    assert 'id="abc123",seq=7i' in line and "other" not in line and "reason" not in line
    assert omitted.count(OMIT_FIELD_CLASH) == 4


def test_tag_fields_become_tags_not_fields() -> None:
    line, _ = encode(obs(fields={"family": "ipv6", "sent": 1}), tag_fields=("family",))
    assert ",family=ipv6," in line and 'family="' not in line
    line, _ = encode(obs(fields={"family": None, "sent": 1}), tag_fields=("family",))
    assert "family" not in line


def test_timestamp_is_started_at_ns() -> None:
    line, _ = encode(obs(started_at_ns=1))
    assert line.endswith(" 1")


# ---- tags -----------------------------------------------------------------------------------

TAG_TABLE = [
    # value, stored in InfluxDB (encode_tag_value), line-protocol text (escape_tag_value)
    ("plain", "plain", "plain"),
    ("with space", "with space", "with\\ space"),
    ("a,b", "a,b", "a\\,b"),
    ("k=v", "k=v", "k\\=v"),
    ('quo"te', 'quo"te', 'quo"te'),
    ("tab\there", "tab\there", "tab\there"),
    ("Zürich ✓ 🚀", "Zürich ✓ 🚀", "Zürich\\ ✓\\ 🚀"),
    ("C:\\temp", "C:\\temp", "C:\\temp"),  # a backslash before an ordinary character is literal
    ("%41", "%41", "%41"),  # percent signs are only encoded together with the marker
    ("~ep", "~ep", "~ep"),
    ("x~ep~", "x~ep~", "x~ep~"),
    # unrepresentable as-is: marker + percent-encoding
    ("", "~ep~", "~ep~"),
    ("line\nbreak", "~ep~line%0Abreak", "~ep~line%0Abreak"),
    ("cr\rx", "~ep~cr%0Dx", "~ep~cr%0Dx"),
    ("ends\\", "~ep~ends%5C", "~ep~ends%5C"),
    ("a\\\\b", "~ep~a%5C%5Cb", "~ep~a%5C%5Cb"),
    ("a\\,b", "~ep~a%5C,b", "~ep~a%5C\\,b"),
    ("a\\ b", "~ep~a%5C b", "~ep~a%5C\\ b"),
    ("a\\=b", "~ep~a%5C=b", "~ep~a%5C\\=b"),
    ("~ep~x", "~ep~~ep~x", "~ep~~ep~x"),
    ("50%\n", "~ep~50%25%0A", "~ep~50%25%0A"),
]


@pytest.mark.parametrize(("value", "stored", "text"), TAG_TABLE)
def test_tag_table(value: str, stored: str, text: str) -> None:
    assert encode_tag_value(value) == stored
    assert escape_tag_value(value) == text
    assert decode_tag_value(stored) == value


@given(st.text())
def test_tag_encoding_round_trips(value: str) -> None:
    stored = encode_tag_value(value)
    assert decode_tag_value(stored) == value
    assert stored  # never empty
    assert "\n" not in stored and "\r" not in stored and not stored.endswith("\\")
    if not stored.startswith(TAG_MARKER):
        assert stored == value


def test_decode_of_unmarked_values_is_identity() -> None:
    assert decode_tag_value("50%25") == "50%25"


def test_measurement_and_field_key_escaping() -> None:
    assert escape_measurement("a b,c=d") == "a\\ b\\,c=d"
    o = obs(fields={"a b": 1, "c,d=e": 2})
    line, _ = encode(o, measurement="m x")
    assert line.startswith("m\\ x,")
    assert ",a\\ b=1i,c\\,d\\=e=2i " in line


def test_field_string_escaping() -> None:
    assert escape_field_string('\\"') == '"\\\\\\""'


def test_encode_batch_skips_unknown_kinds() -> None:
    kinds = {"fake": fake_kind("fake", ("family",))}
    batch = encode_batch(
        [obs(), obs(kind="nope"), obs(id="def", fields={"family": "ipv4", "sent": 1, "loss_ratio": 0.0})],
        agent="a1",
        site="s1",
        kinds=kinds,
        agent_labels={"tier": "pop"},
    )
    assert len(batch.lines) == 2
    assert batch.omitted == {OMIT_UNKNOWN_KIND: 1}
    assert all(line.startswith("edgeprobe_fake,") and ",tier=pop " in line for line in batch.lines)
    assert ",family=ipv4," in batch.lines[1]
