"""Field type conflicts: InfluxDB's answers (captured), the line classifier, the bounded memory."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.collector.conflicts import (
    ConflictMemory,
    FieldConflict,
    conflicts_in,
    line_conflict,
    line_fields,
    line_measurement,
)
from edgeprobe.collector.lineproto import encode_point

# Bodies captured from the real influxd 1.6 (tests/conftest.py's server) for:
#   m,t=a x=1i 1000  then  m,t=a x=1.5 2000 / m,t=a x="s" 2000 / two conflicting lines in one batch /
#   m\ sp\,c,t=a x=1.5 (escaped measurement) / m,t=a x\ y\=z\,q=1.5 (escaped field key)
V16_FLOAT = (
    b'{"error":"partial write: field type conflict: input field \\"x\\" on measurement \\"m\\" '
    b'is type float, already exists as type integer dropped=1"}\n'
)
V16_STRING = (
    b'{"error":"partial write: field type conflict: input field \\"x\\" on measurement \\"m\\" '
    b'is type string, already exists as type integer dropped=1"}\n'
)
V16_TWO = (
    b'{"error":"partial write: field type conflict: input field \\"x\\" on measurement \\"m\\" '
    b'is type float, already exists as type integer dropped=2"}\n'
)
V16_ESCAPED_MEASUREMENT = (
    b'{"error":"partial write: field type conflict: input field \\"x\\" on measurement \\"m sp,c\\" '
    b'is type float, already exists as type integer dropped=1"}\n'
)
V16_ESCAPED_FIELD = (
    b'{"error":"partial write: field type conflict: input field \\"x y=z,q\\" on measurement \\"m\\" '
    b'is type float, already exists as type integer dropped=1"}\n'
)
# 1.8 adds the database and retention policy (from a 1.8 user's log).
V18 = (
    '{"error":"partial write: field type conflict: input field \\"temp_cpu\\" on measurement \\"usg\\" '
    'is type integer, already exists as type float dropped=1 for database: unpoller for retention policy: autogen"}'
)
# 2.7: HTTP 422 (from a 2.7.11 user's report).
V27 = (
    '{"code":"unprocessable entity","message":"failure writing points to database: partial write: field type '
    'conflict: input field \\"value\\" on measurement \\"vhfdata.nearest.vts.channel\\" is type string, '
    'already exists as type float dropped=10"}'
)
# 3.x Core/Enterprise: HTTP 400 with the refused lines.
V3 = json.dumps(
    {
        "error": "partial write of line protocol occurred",
        "data": [
            {
                "original_line": "edgeprobe_tcp,agent=a duration_ms=1.5 1700000000000000000",
                "line_number": 2,
                "error_message": "invalid column type for column 'duration_ms', expected "
                "iox::column_type::field::integer, got iox::column_type::field::float",
            },
            {
                "original_line": "cpu v=1u 1",
                "line_number": 3,
                "error_message": "invalid column type for "
                "column 'v', expected iox::column_type::field::float, got iox::column_type::field::uinteger",
            },
            {"original_line": "bad line", "line_number": 4, "error_message": "No fields were provided"},
        ],
    }
)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (V16_FLOAT, [FieldConflict("m", "x", "integer", "float")]),
        (V16_STRING, [FieldConflict("m", "x", "integer", "string")]),
        (V16_TWO, [FieldConflict("m", "x", "integer", "float")]),
        (V16_ESCAPED_MEASUREMENT, [FieldConflict("m sp,c", "x", "integer", "float")]),
        (V16_ESCAPED_FIELD, [FieldConflict("m", "x y=z,q", "integer", "float")]),
        (V18, [FieldConflict("usg", "temp_cpu", "float", "integer")]),
        (V27, [FieldConflict("vhfdata.nearest.vts.channel", "value", "float", "string")]),
        (
            V3,
            [
                FieldConflict("edgeprobe_tcp", "duration_ms", "integer", "float"),
                FieldConflict("cpu", "v", "float", "unsigned"),
            ],
        ),
    ],
)
def test_conflicts_in_answers(answer: str | bytes, expected: list[FieldConflict]) -> None:
    assert list(conflicts_in(answer)) == expected


@pytest.mark.parametrize(
    "answer",
    [
        None,
        b"",
        b'{"error":"unable to parse \'m x=\': missing field value"}',
        b'{"error":"partial write: points beyond retention policy dropped=1"}',
        b"<html>502 Bad Gateway</html>",
        b"[" * 100_000 + b"]" * 100_000,  # absurd nesting
        b'{"data": {"original_line": 5, "error_message": []}}',
        b'{"data": [1, "x", null]}',
        b"\xff\xfe garbage",
    ],
)
def test_answers_without_conflicts(answer: bytes | None) -> None:
    assert conflicts_in(answer) == ()


def test_plain_text_answer_and_bounds() -> None:
    text = 'field type conflict: input field "x" on measurement "m" is type float, already exists as type integer'
    assert conflicts_in(text) == (FieldConflict("m", "x", "integer", "float"),)
    huge = 'input field "' + "x" * 70_000 + '" on measurement "m" is type float, already exists as type integer'
    assert conflicts_in(huge) == ()  # too long a name is not remembered


def test_line_fields_reads_escapes_and_types() -> None:
    line = 'm\\ sp\\,c,t\\ k=a\\ b\\,c,u=v x\\ y\\=z\\,q=1.5,s="a, b=c \\"q\\" \\\\",i=-3i,n=4u,b=T,f=1e3 12'
    assert line_fields(line) == (
        "m sp,c",
        {"x y=z,q": "float", "s": "string", "i": "integer", "n": "unsigned", "b": "boolean", "f": "float"},
    )
    assert line_measurement(line) == "m sp,c"
    assert line_measurement("cpu,host=a v=1 2") == "cpu" and line_measurement("cpu v=1") == "cpu"
    assert line_fields("cpu v=1") == ("cpu", {"v": "float"})  # no timestamp
    for bad in ("", " v=1 1", "cpu", "cpu,t=a", 'cpu s="open', "cpu v= 1", "cpu =1 1"):
        assert line_fields(bad) is None, bad


@given(
    measurement=st.text(min_size=1, max_size=20).filter(lambda s: "\n" not in s and "\r" not in s and "\\" not in s),
    field=st.text(min_size=1, max_size=20).filter(
        lambda s: "\n" not in s and "\r" not in s and "\\" not in s and s not in ("time", "_field", "_measurement")
    ),
    value=st.one_of(
        st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.text(), st.booleans()
    ),
)
def test_line_fields_reads_what_the_encoder_writes(measurement: str, field: str, value: object) -> None:
    enc = encode_point(measurement, tags={"t": "x y"}, fields={field: value, "z": 1}, timestamp_ns=5)
    assert enc is not None
    kind = {bool: "boolean", int: "integer", float: "float", str: "string"}[type(value)]
    assert line_fields(enc.line) == (measurement, {field: kind, "z": "integer"} if field != "z" else {"z": kind})


def test_line_conflict_is_pure() -> None:
    known = {("m", "x"): "integer", ("m", "s"): "string"}.get

    def lookup(m: str, f: str) -> str | None:
        return known((m, f))

    assert line_conflict("m,t=a x=1.5 1", lookup) == FieldConflict("m", "x", "integer", "float")
    assert line_conflict("m,t=a x=1i 1", lookup) is None  # the stored type: fine
    assert line_conflict('m s="ok",y=1.5 1', lookup) is None
    assert line_conflict("n x=1.5 1", lookup) is None  # another measurement
    assert line_conflict("garbage", lookup) is None


def test_memory_matches_only_conflicting_lines() -> None:
    memory = ConflictMemory(10, 60.0, clock=lambda: 0.0)
    assert memory.match("m x=1.5 1") is None  # nothing learned
    assert memory.learn(conflicts_in(V16_FLOAT)) == 1 and len(memory) == 1
    assert memory.match("m,t=a x=1.5 1") == FieldConflict("m", "x", "integer", "float")
    assert memory.match('m,t=a x="s" 1') == FieldConflict("m", "x", "integer", "string")
    assert memory.match("m,t=a x=2i 1") is None and memory.match("mm x=1.5 1") is None
    assert memory.match("m,t=a y=1.5 1") is None


def test_memory_expires_and_is_bounded() -> None:
    now = [0.0]
    memory = ConflictMemory(3, 300.0, clock=lambda: now[0])
    memory.learn([FieldConflict("m", f"f{i}", "integer") for i in range(5)])
    assert len(memory) == 3 and memory.evicted == 2
    assert [c.field for c in memory.snapshot()] == ["f2", "f3", "f4"]  # the oldest learned went first
    now[0] = 200.0
    memory.learn([FieldConflict("m", "f2", "integer")])  # renewed
    now[0] = 350.0
    memory.expire()
    assert [c.field for c in memory.snapshot()] == ["f2"] and memory.expired == 2
    assert memory.match("m f3=1.5 1") is None  # forgotten: the next such line is written (a probe)
    now[0] = 501.0
    memory.expire()
    assert len(memory) == 0 and memory.match("m f2=1.5 1") is None


def test_memory_off() -> None:
    memory = ConflictMemory(0, 300.0)
    assert memory.learn([FieldConflict("m", "x", "integer")]) == 0 and len(memory) == 0
