"""MQTT message → validated observations, or reasons why not (pure).

A message is checked as a whole first: size (before parsing), topic, JSON, schema version,
envelope shape, and whether the topic's site/agent match the payload's. Then every observation is
decoded on its own, so one bad observation is rejected alone and its valid neighbours still land.
An observation's ``fields`` are validated against its kind's result struct
(``kinds[kind].result_type``) with ``msgspec.convert`` and turned back into plain values: a field
the struct declares ``float`` is a float even when the JSON said ``5``, so InfluxDB field types stay
stable. Fields the struct doesn't know (from a newer agent) are dropped.

Every reject has a short ``reason`` class (the keys of :data:`REASONS`, used as counter names) and
a one-line ``detail`` for the log.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from probes.kind import AnyKind
from probes.schema import NAME_RE, SUPPORTED_VERSIONS, Observation, parse_obs_topic

# Whole-message rejects.
TOO_LARGE: Final = "too_large"
BAD_TOPIC: Final = "bad_topic"
BAD_JSON: Final = "bad_json"
UNSUPPORTED_VERSION: Final = "unsupported_version"
BAD_ENVELOPE: Final = "bad_envelope"
TOPIC_MISMATCH: Final = "topic_mismatch"
# Single-observation rejects.
BAD_OBSERVATION: Final = "bad_observation"
UNKNOWN_KIND: Final = "unknown_kind"
BAD_FIELDS: Final = "bad_fields"
BAD_VALUE: Final = "bad_value"

REASONS: Final = {
    TOO_LARGE: "message larger than limits.max_message_bytes (not parsed)",
    BAD_TOPIC: "not an observation topic <prefix>/v1/<site>/<agent>/obs",
    BAD_JSON: "not JSON, or truncated",
    UNSUPPORTED_VERSION: "schema version 'v' not supported by this collector",
    BAD_ENVELOPE: "JSON, but not a v1 envelope",
    TOPIC_MISMATCH: "topic names another site/agent than the payload",
    BAD_OBSERVATION: "observation not of the v1 shape (missing or mistyped key)",
    UNKNOWN_KIND: "probe kind unknown to this collector",
    BAD_FIELDS: "fields don't match the kind's result type",
    BAD_VALUE: "a value out of range (negative duration, bad timestamp …)",
}

# InfluxDB's timestamp range (ns); 0 and earlier means a broken clock.
MAX_TIMESTAMP_NS: Final = 9223372036854775806
INT64_MAX: Final = 2**63 - 1
OUTCOME_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_TARGET_CHARS: Final = 2048
MAX_DETAIL_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str  # a key of REASONS
    detail: str  # one line for the log
    observation_id: str | None = None  # for single-observation rejects when the id is known
    index: int | None = None  # position in the envelope's observations


@dataclass(frozen=True, slots=True)
class EnvelopeMeta:
    v: int
    agent: str
    site: str
    sent_at_ns: int
    labels: dict[str, str]


@dataclass(slots=True)
class Decoded:
    meta: EnvelopeMeta | None  # None when the whole message was rejected
    observations: list[Observation] = field(default_factory=list)  # validated, fields normalised
    rejects: list[Reject] = field(default_factory=list)
    total_observations: int = 0  # good + rejected individually

    @property
    def ok(self) -> bool:
        return self.meta is not None

    def reject_counts(self) -> Counter[str]:
        return Counter(r.reason for r in self.rejects)


class _Head(msgspec.Struct):
    v: int


class _RawEnvelope(msgspec.Struct, kw_only=True):
    v: int
    agent: str
    site: str
    sent_at_ns: int
    labels: dict[str, str] = {}
    observations: list[msgspec.Raw]


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def _whole(reason: str, detail: str) -> Decoded:
    return Decoded(meta=None, rejects=[Reject(reason, _short(detail))])


def _check_values(obs: Observation) -> str | None:
    """What is out of range in an observation, or None."""
    if not obs.id:
        return "empty id"
    if not 0 <= obs.seq <= INT64_MAX:
        return f"seq {obs.seq} out of range"
    if not 0 < obs.started_at_ns <= MAX_TIMESTAMP_NS:
        return f"started_at_ns {obs.started_at_ns} out of range"
    if not math.isfinite(obs.duration_ms) or obs.duration_ms < 0:
        return f"negative or non-finite duration_ms {obs.duration_ms}"
    if obs.sched_lag_ms is not None and (not math.isfinite(obs.sched_lag_ms) or obs.sched_lag_ms < 0):
        return f"negative or non-finite sched_lag_ms {obs.sched_lag_ms}"
    if not OUTCOME_RE.match(obs.outcome):
        return f"outcome {obs.outcome[:40]!r} is not an outcome name"
    if not obs.target or len(obs.target) > MAX_TARGET_CHARS:
        return f"target empty or longer than {MAX_TARGET_CHARS} characters"
    return None


def decode_observation(raw: bytes, kinds: Mapping[str, AnyKind], index: int = 0) -> Observation | Reject:
    """One observation of an envelope: validated and with its fields normalised, or a reject."""
    try:
        obs = msgspec.json.decode(raw, type=Observation)
    except msgspec.DecodeError as err:
        oid: Any = None
        try:
            loose = msgspec.json.decode(raw)
            oid = loose.get("id") if isinstance(loose, dict) else None
        except msgspec.DecodeError:
            pass
        return Reject(BAD_OBSERVATION, _short(str(err)), oid if isinstance(oid, str) else None, index)
    kind = kinds.get(obs.kind)
    if kind is None:
        return Reject(UNKNOWN_KIND, _short(f"unknown kind {obs.kind!r}"), obs.id, index)
    problem = _check_values(obs)
    if problem is not None:
        return Reject(BAD_VALUE, _short(problem), obs.id, index)
    if obs.fields:
        try:
            typed = msgspec.convert(obs.fields, kind.result_type)
        except msgspec.ValidationError as err:
            return Reject(BAD_FIELDS, _short(f"{obs.kind}: {err}"), obs.id, index)
        obs.fields = msgspec.to_builtins(typed)
    return obs


def decode_message(topic: str, payload: bytes, *, prefix: str, max_bytes: int, kinds: Mapping[str, AnyKind]) -> Decoded:
    """Decode one MQTT message from an agent. Never raises for bad input: it returns rejects."""
    if len(payload) > max_bytes:
        return _whole(TOO_LARGE, f"{len(payload)} bytes > limit {max_bytes}")
    names = parse_obs_topic(prefix, topic)
    if names is None:
        return _whole(BAD_TOPIC, f"not an observation topic: {topic[:100]!r}")
    topic_site, topic_agent = names
    try:
        head = msgspec.json.decode(payload, type=_Head)
    except msgspec.ValidationError as err:
        try:  # msgspec stops at the first mismatch: tell broken JSON from JSON of another shape
            msgspec.json.decode(payload)
        except msgspec.DecodeError as syntax:
            return _whole(BAD_JSON, str(syntax))
        return _whole(BAD_ENVELOPE, str(err))
    except msgspec.DecodeError as err:
        return _whole(BAD_JSON, str(err))
    if head.v not in SUPPORTED_VERSIONS:
        return _whole(UNSUPPORTED_VERSION, f"unsupported schema version {head.v}")
    try:
        env = msgspec.json.decode(payload, type=_RawEnvelope)
    except msgspec.DecodeError as err:
        return _whole(BAD_ENVELOPE, str(err))
    if not NAME_RE.match(env.agent) or not NAME_RE.match(env.site):
        return _whole(BAD_ENVELOPE, f"bad agent or site name {env.agent[:40]!r}/{env.site[:40]!r}")
    if env.site != topic_site:
        return _whole(TOPIC_MISMATCH, f"topic names site {topic_site} but payload names {env.site}")
    if env.agent != topic_agent:
        return _whole(TOPIC_MISMATCH, f"topic names agent {topic_agent} but payload names {env.agent}")

    meta = EnvelopeMeta(v=env.v, agent=env.agent, site=env.site, sent_at_ns=env.sent_at_ns, labels=env.labels)
    out = Decoded(meta=meta, total_observations=len(env.observations))
    for i, raw in enumerate(env.observations):
        res = decode_observation(raw, kinds, i)
        if isinstance(res, Reject):
            out.rejects.append(res)
        else:
            out.observations.append(res)
    return out
