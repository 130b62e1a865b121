"""The ``overloaded`` flag: on the wire (MQTT schema) and in InfluxDB, absent for ad-hoc runs."""

from __future__ import annotations

import msgspec

from edgeprobe.collector.lineproto import encode_observation
from edgeprobe.schema import Observation, encode


def obs(**kw: object) -> Observation:
    base: dict[str, object] = dict(
        id="abc", seq=1, kind="icmp", target="127.0.0.1", started_at_ns=1, duration_ms=2.0, outcome="ok"
    )
    return Observation(**(base | kw))  # type: ignore[arg-type]


def test_overloaded_on_the_wire() -> None:
    assert b"overloaded" not in encode(obs())  # ad-hoc runs: not sent at all
    flagged = encode(obs(sched_lag_ms=80.0, overloaded=True))
    assert b'"overloaded":true' in flagged
    assert msgspec.json.decode(flagged, type=Observation).overloaded is True
    assert msgspec.json.decode(encode(obs(sched_lag_ms=1.0, overloaded=False)), type=Observation).overloaded is False


def test_overloaded_in_line_protocol() -> None:
    def line(o: Observation) -> str:
        return encode_observation(o, agent="a", site="s", measurement="edgeprobe_icmp").line

    assert "overloaded" not in line(obs())
    assert "overloaded=true" in line(obs(sched_lag_ms=80.0, overloaded=True))
    assert "overloaded=false" in line(obs(sched_lag_ms=1.0, overloaded=False))


def test_a_result_field_cannot_shadow_overloaded() -> None:
    encoded = encode_observation(
        obs(overloaded=False, fields={"overloaded": 1.0}), agent="a", site="s", measurement="edgeprobe_icmp"
    )
    assert "overloaded=false" in encoded.line and "overloaded=1" not in encoded.line
