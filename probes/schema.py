"""The wire schema shared by agent and collector (MQTT payloads), version 1.

An agent publishes an :class:`Envelope` of many :class:`Observation` s as JSON on
``<prefix>/v1/<site>/<agent>/obs``. ``v`` is the schema version: a collector accepts the
versions in :data:`SUPPORTED_VERSIONS` and rejects others with a reason. Within a version,
changes are additive only (new optional fields); golden samples of every version stay in
``tests/golden/`` and must keep decoding.

``fields`` is the probe kind's typed result, as plain JSON (the result struct's field names:
``rtt_avg_ms``, ``connect_ms`` …). Values are numbers, strings, booleans, null (not measured)
or lists of numbers/nulls (per-packet series; nulls are lost packets).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})
TOPIC_VERSION: Final = "v1"

# Agent ids and sites appear in MQTT topics: no '/', '+', '#', spaces or control characters.
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

FieldValue = bool | int | float | str | None | list[float | None]

# Tag keys the collector writes itself (plus "time", which InfluxDB refuses as a tag key), and the
# field keys every point may have. Labels may use neither (nor a kind's result field names).
RESERVED_TAG_KEYS: Final = frozenset({"agent", "site", "target", "outcome", "job", "kind", "time"})
BASE_FIELD_KEYS: Final = ("id", "seq", "duration_ms", "sched_lag_ms", "reason")


class Observation(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str  # unique per observation (uuid4 hex)
    seq: int  # per-agent sequence number, starts at 0 on each agent start
    kind: str  # a key of probes.registry.KINDS
    target: str  # as configured (host, host:port or URL)
    started_at_ns: int  # wall clock when the probe started: the InfluxDB timestamp
    duration_ms: float  # monotonic duration of the whole run
    outcome: str  # probes.outcome.Outcome value
    reason: str | None = None  # why, when outcome != ok
    sched_lag_ms: float | None = None  # how late the scheduler started the run
    job: str | None = None  # the agent job that produced it; None for ad-hoc runs
    labels: dict[str, str] = {}  # job labels, stored as tags
    fields: dict[str, FieldValue] = {}


class Envelope(msgspec.Struct, kw_only=True):
    v: int
    agent: str
    site: str
    sent_at_ns: int
    labels: dict[str, str] = {}  # agent labels, stored as tags on every observation
    observations: list[Observation]


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Retained presence message on ``<prefix>/v1/<site>/<agent>/status`` (also the last will)."""

    v: int
    agent: str
    site: str
    state: str  # "online" | "offline"
    at_ns: int
    version: str | None = None
    kinds: list[str] = []
    labels: dict[str, str] = {}
    latitude: float | None = None
    longitude: float | None = None
    queued: int | None = None
    dropped: int | None = None
    published: int | None = None


def obs_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/obs"


def status_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/status"


def parse_obs_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(site, agent) of an observation topic, or None when the topic is not one."""
    parts = topic.split("/")
    pre = prefix.split("/")
    if len(parts) != len(pre) + 4 or parts[: len(pre)] != pre:
        return None
    version, site, agent, leaf = parts[len(pre) :]
    if version != TOPIC_VERSION or leaf != "obs":
        return None
    return site, agent


_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)
