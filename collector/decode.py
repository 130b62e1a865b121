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

Bounds (hostile or broken senders): ``started_at_ns`` (and a health message's ``at_ns``) must lie
in [2000-01-01, now + 1 day] (``bad_timestamp``: a broken agent clock is the usual cause);
``duration_ms`` and ``sched_lag_ms`` in [0, 1 day] and finite; ``seq`` in int64; ``id`` at most
128 characters; ``target`` at most 2048; ``job`` at most 256 (``bad_value``). Invalid UTF-8 and
nesting deeper than msgspec's limit are ``bad_json`` (inside one observation:
``bad_observation``, that observation alone). Integers beyond int64 and non-finite numbers in
result fields are not rejected: :mod:`edgeprobe.collector.lineproto` leaves those fields out and counts
them. Details and ids in rejects are one printable line (they go to logs).

Agents' health messages (``<prefix>/v1/<site>/<agent>/health``, :class:`edgeprobe.schema.AgentHealth`)
are decoded by :func:`decode_health` with the same whole-message checks.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from edgeprobe.probes.kind import AnyKind
from edgeprobe.schema import (
    BATCH_RE,
    NAME_RE,
    SUPPORTED_VERSIONS,
    AgentHealth,
    Envelope,
    Observation,
    RawEnvelope,
    parse_agent_topic,
    parse_obs_topic,
)

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
BAD_TIMESTAMP: Final = "bad_timestamp"

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
    BAD_VALUE: "a value out of range (negative or absurd duration, seq, empty id …)",
    BAD_TIMESTAMP: "timestamp before 2000-01-01 or more than a day in the future (agent clock?)",
}

# Accepted timestamps: from 2000-01-01T00:00:00Z to a day after the collector's clock.
MIN_TIMESTAMP_NS: Final = 946_684_800_000_000_000
MAX_FUTURE_NS: Final = 86_400 * 1_000_000_000
MAX_DURATION_MS: Final = 86_400_000.0  # one day: no probe runs that long
INT64_MAX: Final = 2**63 - 1
OUTCOME_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_ID_CHARS: Final = 128
MAX_TARGET_CHARS: Final = 2048
MAX_JOB_CHARS: Final = 256
MAX_DETAIL_CHARS: Final = 200
# What msgspec raises on input that is not (valid) JSON: malformed, invalid UTF-8 inside a string,
# or nested deeper than its recursion limit. Which of these it raises for invalid UTF-8 changed
# between releases (UnicodeDecodeError up to 0.19, DecodeError since), so only ValidationError (a
# DecodeError: valid JSON of the wrong shape) is told apart; everything else here is "not JSON".
_NOT_JSON: Final = (UnicodeDecodeError, RecursionError)
_JSON_ERRORS: Final = (msgspec.DecodeError, *_NOT_JSON)


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
    batch: str | None = None  # the message id to confirm to the agent (edgeprobe.schema.BATCH_RE), if valid
    bad_batch: bool = False  # it had one, not of that shape: it can't be confirmed


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


_ENVELOPE: Final = msgspec.json.Decoder(Envelope)
_RAW_ENVELOPE: Final = msgspec.json.Decoder(RawEnvelope)


def _printable(text: str) -> str:
    """One line with no control characters: details and ids go to logs."""
    text = " ".join(text.split())
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _short(text: str) -> str:
    text = _printable(text[: MAX_DETAIL_CHARS * 4])
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def _whole(reason: str, detail: str) -> Decoded:
    return Decoded(meta=None, rejects=[Reject(reason, _short(detail))])


def check_timestamp(name: str, value_ns: int, now_ns: int) -> str | None:
    """Why ``value_ns`` is not a plausible timestamp, or None."""
    if value_ns < MIN_TIMESTAMP_NS:
        return f"{name} {value_ns} is before 2000-01-01"
    if value_ns > now_ns + MAX_FUTURE_NS:
        return f"{name} {value_ns} is {(value_ns - now_ns) / 1e9:.0f} s ahead of the collector's clock"
    return None


# Half the Earth's circumference is 20,015 km; a floor or ratio beyond a million is no measurement.
MAX_PHYSICS_VALUE: Final = 1e6


def _check_duration(name: str, value: float | None) -> str | None:
    if value is None or (math.isfinite(value) and 0 <= value <= MAX_DURATION_MS):
        return None
    return f"{name} {value} is negative, non-finite or longer than a day"


def _check_values(obs: Observation) -> str | None:
    """What is out of range in an observation (timestamps aside), or None."""
    if not obs.id or len(obs.id) > MAX_ID_CHARS:
        return f"id empty or longer than {MAX_ID_CHARS} characters"
    if not 0 <= obs.seq <= INT64_MAX:
        return f"seq {obs.seq} out of range"
    problem = _check_duration("duration_ms", obs.duration_ms) or _check_duration("sched_lag_ms", obs.sched_lag_ms)
    if problem is not None:
        return problem
    for key in ("distance_km", "floor_rtt_ms", "inflation_ratio", "floor_ttft_ms"):
        value = getattr(obs, key)
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_PHYSICS_VALUE):
            return f"{key} {value} is negative, non-finite or absurd"
    if not OUTCOME_RE.match(obs.outcome):
        return f"outcome {obs.outcome[:40]!r} is not an outcome name"
    if not obs.target or len(obs.target) > MAX_TARGET_CHARS:
        return f"target empty or longer than {MAX_TARGET_CHARS} characters"
    if obs.job is not None and len(obs.job) > MAX_JOB_CHARS:
        return f"job longer than {MAX_JOB_CHARS} characters"
    return None


def _short_id(oid: object) -> str | None:
    """An observation id as it may appear in a log line (reject details only)."""
    return _printable(oid[:MAX_ID_CHARS]) if isinstance(oid, str) else None


def decode_observation(
    raw: bytes, kinds: Mapping[str, AnyKind], index: int = 0, *, now_ns: int | None = None
) -> Observation | Reject:
    """One observation of an envelope: validated and with its fields normalised, or a reject."""
    try:
        obs = msgspec.json.decode(raw, type=Observation)
    except _JSON_ERRORS as err:
        oid: Any = None
        try:
            loose = msgspec.json.decode(raw)
            oid = loose.get("id") if isinstance(loose, dict) else None
        except _JSON_ERRORS:
            pass
        return Reject(BAD_OBSERVATION, _short(str(err) or type(err).__name__), _short_id(oid), index)
    return check_observation(obs, kinds, index, now_ns=now_ns)


def check_observation(
    obs: Observation, kinds: Mapping[str, AnyKind], index: int = 0, *, now_ns: int | None = None
) -> Observation | Reject:
    """An observation of the v1 shape, validated and with its fields normalised, or a reject."""
    oid = _short_id(obs.id)
    kind = kinds.get(obs.kind)
    if kind is None:
        return Reject(UNKNOWN_KIND, _short(f"unknown kind {obs.kind!r}"), oid, index)
    problem = _check_values(obs)
    if problem is not None:
        return Reject(BAD_VALUE, _short(problem), oid, index)
    problem = check_timestamp("started_at_ns", obs.started_at_ns, time.time_ns() if now_ns is None else now_ns)
    if problem is not None:
        return Reject(BAD_TIMESTAMP, _short(problem), oid, index)
    if obs.fields:
        try:
            typed = msgspec.convert(obs.fields, kind.result_type)
        except msgspec.ValidationError as err:
            return Reject(BAD_FIELDS, _short(f"{obs.kind}: {err}"), oid, index)
        obs.fields = msgspec.to_builtins(typed)
    return obs


def _head(payload: bytes) -> _Head | Reject:
    """The schema version of a message, or the whole-message reject (JSON, shape, version)."""
    try:
        head = msgspec.json.decode(payload, type=_Head)
    except msgspec.ValidationError as err:
        try:  # msgspec stops at the first mismatch: tell broken JSON from JSON of another shape
            msgspec.json.decode(payload)
        except _JSON_ERRORS as syntax:
            return Reject(BAD_JSON, _short(str(syntax) or type(syntax).__name__))
        return Reject(BAD_ENVELOPE, _short(str(err)))
    except _JSON_ERRORS as err:
        return Reject(BAD_JSON, _short(str(err) or type(err).__name__))
    if head.v not in SUPPORTED_VERSIONS:
        return Reject(UNSUPPORTED_VERSION, f"unsupported schema version {head.v}")
    return head


def _check_sender(agent: str, site: str, topic_site: str, topic_agent: str) -> Reject | None:
    if not NAME_RE.match(agent) or not NAME_RE.match(site):
        return Reject(BAD_ENVELOPE, _short(f"bad agent or site name {agent[:40]!r}/{site[:40]!r}"))
    if site != topic_site:
        return Reject(TOPIC_MISMATCH, _short(f"topic names site {topic_site} but payload names {site[:40]}"))
    if agent != topic_agent:
        return Reject(TOPIC_MISMATCH, _short(f"topic names agent {topic_agent} but payload names {agent[:40]}"))
    return None


def _whole_reject(rej: Reject) -> Decoded:
    return Decoded(meta=None, rejects=[rej])


def decode_message(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    max_bytes: int,
    kinds: Mapping[str, AnyKind],
    now_ns: int | None = None,
) -> Decoded:
    """Decode one MQTT message from an agent. Never raises for bad input: it returns rejects.

    ``now_ns`` (default: the wall clock) bounds timestamps from the future.
    """
    if len(payload) > max_bytes:
        return _whole(TOO_LARGE, f"{len(payload)} bytes > limit {max_bytes}")
    names = parse_obs_topic(prefix, topic)
    if names is None:
        return _whole(BAD_TOPIC, f"not an observation topic: {topic[:100]!r}")
    topic_site, topic_agent = names
    # Parsed once: the common case (every observation of the v1 shape) decodes in one pass; only
    # what fails is parsed again, to classify it (whole message, then each observation alone).
    env: Envelope | RawEnvelope
    try:
        env = _ENVELOPE.decode(payload)
    except _JSON_ERRORS:
        try:
            env = _RAW_ENVELOPE.decode(payload)
        except msgspec.ValidationError as err:  # JSON, but not of the envelope's shape
            head = _head(payload)
            return _whole_reject(head) if isinstance(head, Reject) else _whole(BAD_ENVELOPE, str(err))
        except _JSON_ERRORS as err:
            head = _head(payload)  # broken JSON, or (skipped by _head) invalid UTF-8 or too deep
            return _whole_reject(head) if isinstance(head, Reject) else _whole(BAD_JSON, str(err) or type(err).__name__)
    if env.v not in SUPPORTED_VERSIONS:
        return _whole(UNSUPPORTED_VERSION, f"unsupported schema version {env.v}")
    bad_sender = _check_sender(env.agent, env.site, topic_site, topic_agent)
    if bad_sender is not None:
        return _whole_reject(bad_sender)

    now = time.time_ns() if now_ns is None else now_ns
    batch_ok = env.batch is None or BATCH_RE.match(env.batch) is not None
    meta = EnvelopeMeta(
        v=env.v,
        agent=env.agent,
        site=env.site,
        sent_at_ns=env.sent_at_ns,
        labels=env.labels,
        batch=env.batch if batch_ok else None,
        bad_batch=not batch_ok,
    )
    out = Decoded(meta=meta, total_observations=len(env.observations))
    results = (
        [check_observation(obs, kinds, i, now_ns=now) for i, obs in enumerate(env.observations)]
        if isinstance(env, Envelope)
        else [decode_observation(raw, kinds, i, now_ns=now) for i, raw in enumerate(env.observations)]
    )
    for res in results:
        if isinstance(res, Reject):
            out.rejects.append(res)
        else:
            out.observations.append(res)
    return out


# ---- agents' health messages ----------------------------------------------------------------------

# AgentHealth attributes that are not fields of the point: the tags, the timestamp, the version.
HEALTH_META_KEYS: Final = frozenset({"v", "agent", "site", "at_ns", "labels", "component"})


@dataclass(slots=True)
class DecodedHealth:
    """One agent health message: the tags and fields of its point, or why it was rejected."""

    agent: str | None = None
    site: str | None = None
    at_ns: int = 0
    source: str = "agent"
    labels: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    reject: Reject | None = None

    @property
    def ok(self) -> bool:
        return self.reject is None


def decode_health(
    topic: str, payload: bytes, *, prefix: str, max_bytes: int, now_ns: int | None = None
) -> DecodedHealth:
    """Decode an agent's health message (:class:`edgeprobe.schema.AgentHealth`). Never raises."""
    if len(payload) > max_bytes:
        return DecodedHealth(reject=Reject(TOO_LARGE, f"{len(payload)} bytes > limit {max_bytes}"))
    names = parse_agent_topic(prefix, topic)
    if names is None or names[2] != "health":
        return DecodedHealth(reject=Reject(BAD_TOPIC, _short(f"not a health topic: {topic[:100]!r}")))
    topic_site, topic_agent, _ = names
    head = _head(payload)
    if isinstance(head, Reject):
        return DecodedHealth(reject=head)
    try:
        health = msgspec.json.decode(payload, type=AgentHealth)
    except _NOT_JSON as err:
        return DecodedHealth(reject=Reject(BAD_JSON, _short(str(err) or type(err).__name__)))
    except msgspec.DecodeError as err:
        return DecodedHealth(reject=Reject(BAD_ENVELOPE, _short(str(err))))
    bad_sender = _check_sender(health.agent, health.site, topic_site, topic_agent)
    if bad_sender is not None:
        return DecodedHealth(reject=bad_sender)
    problem = check_timestamp("at_ns", health.at_ns, time.time_ns() if now_ns is None else now_ns)
    if problem is not None:
        return DecodedHealth(reject=Reject(BAD_TIMESTAMP, _short(problem)))
    values = msgspec.structs.asdict(health)
    fields = {k: v for k, v in values.items() if k not in HEALTH_META_KEYS and v is not None}
    component = getattr(health, "component", "agent")
    source = component if isinstance(component, str) and OUTCOME_RE.match(component) else "agent"
    return DecodedHealth(
        agent=health.agent,
        site=health.site,
        at_ns=health.at_ns,
        source=source,
        labels=dict(health.labels),
        fields=fields,
    )
