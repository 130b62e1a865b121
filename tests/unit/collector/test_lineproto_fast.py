"""The fast path of encode_batch writes exactly what encode_observation writes, and the golden v1
samples still make the line protocol the collector wrote before the fast path and the one-pass
decoder existed (tests/golden/lineproto/*.lp, made by the earlier code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprobe.collector.decode import decode_message
from edgeprobe.collector.ingest import process_chunk, process_obs, split
from edgeprobe.collector.lineproto import Batch, encode_batch, encode_observation
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
PREFIX = "edgeprobe"


def _reference(
    observations: list[Observation], agent: str, site: str, kinds: dict[str, AnyKind] | Any, labels: Any
) -> Batch:
    """encode_batch as it was: encode_observation for every observation."""
    batch = Batch()
    for obs in observations:
        kind = kinds[obs.kind]
        enc = encode_observation(
            obs, agent=agent, site=site, measurement=kind.measurement, tag_fields=kind.tag_fields, agent_labels=labels
        )
        batch.lines.append(enc.line)
        batch.omitted.update(enc.omitted)
    return batch


def _golden() -> list[tuple[Path, bytes, str]]:
    out = []
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        raw = path.read_bytes()
        doc = json.loads(raw)
        out.append((path, raw, f"{PREFIX}/v1/{doc['site']}/{doc['agent']}/obs"))
    assert out
    return out


def test_golden_samples_make_the_same_line_protocol_as_before() -> None:
    for path, raw, topic in _golden():
        expected = (GOLDEN / "lineproto" / f"{path.stem}.lp").read_text().splitlines()
        result = process_obs(topic, raw, prefix=PREFIX, max_bytes=1 << 20, kinds=KINDS)
        assert not result.rejects and not result.omitted and result.error is None
        assert result.lines == expected, path.name


def test_worker_chunks_match_inline_in_order() -> None:
    items = [(topic, raw) for _, raw, topic in _golden()] + [("edgeprobe/v1/x/y/obs", b"not json")]
    inline = [process_obs(t, p, prefix=PREFIX, max_bytes=1 << 20, kinds=KINDS) for t, p in items]
    chunked = [r for part in split(items, 3) for r in process_chunk(part, PREFIX, 1 << 20)]
    assert [(r.lines, r.rejects, r.meta) for r in chunked] == [(r.lines, r.rejects, r.meta) for r in inline]
    assert [len(p) for p in split(items, 4)] == [2, 2, 1, 1]


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.floats(allow_nan=False), max_size=2),
)
_keys = st.one_of(
    st.sampled_from(["agent", "id", "seq", "reason", "time", "family", "sent", "a b", "x,y", "k=v", "tier", "job"]),
    st.text(max_size=6),
)
_texts = st.one_of(st.sampled_from(["", "a\\", "C:\\temp", "~ep~x", "a b,c=d", 'q"uote', "l\nf"]), st.text(max_size=6))


@settings(max_examples=300, deadline=None)
@given(
    golden_index=st.integers(min_value=0, max_value=20),
    extra_fields=st.dictionaries(_keys, _values, max_size=4),
    agent_labels=st.dictionaries(_keys, _texts, max_size=3),
    job_labels=st.dictionaries(_keys, _texts, max_size=2),
    target=_texts,
    reason=st.one_of(st.none(), _texts),
    duration_ms=st.floats(allow_nan=True, allow_infinity=True),
)
def test_fast_path_equals_the_general_encoder(
    golden_index: int,
    extra_fields: dict[str, Any],
    agent_labels: dict[str, str],
    job_labels: dict[str, str],
    target: str,
    reason: str | None,
    duration_ms: float,
) -> None:
    observations: list[Observation] = []
    for _, raw, topic in _golden():
        decoded = decode_message(topic, raw, prefix=PREFIX, max_bytes=1 << 20, kinds=KINDS)
        observations.extend(decoded.observations)
    base = observations[golden_index % len(observations)]
    obs = msgspec.structs.replace(
        base,
        fields={**base.fields, **extra_fields},
        labels=job_labels,
        target=target or base.target,
        reason=reason,
        duration_ms=duration_ms,
    )
    for obs_ in (base, obs):
        fast = encode_batch([obs_], agent="a1", site="s1", kinds=KINDS, agent_labels=agent_labels)
        ref = _reference([obs_], "a1", "s1", KINDS, agent_labels)
        assert fast.lines == ref.lines
        assert fast.omitted == ref.omitted
