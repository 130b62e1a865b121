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
# Topic levels the fleet's own topics use where a site or agent name would stand
# (``<prefix>/v1/config/group/<name>``, ``<prefix>/v1/results/...``): an agent named ``group`` in a
# site named ``config`` would otherwise write group configuration. Refused as site and agent names.
RESERVED_NAMES: Final = frozenset({"config", "group", "results"})
# Message (batch) ids in envelopes and delivery acknowledgements, and how many one ack holds.
BATCH_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_ACK_BATCHES: Final = 10_000

FieldValue = bool | int | float | str | None | list[float | None]

# Tag keys the collector writes itself (plus "time", which InfluxDB refuses as a tag key), and the
# field keys every point may have. Labels may use neither (nor a kind's result field names).
RESERVED_TAG_KEYS: Final = frozenset({"agent", "site", "target", "outcome", "job", "kind", "time"})
BASE_FIELD_KEYS: Final = (
    "distance_km",
    "floor_rtt_ms",
    "inflation_ratio",
    "floor_ttft_ms",
    "id", "seq", "duration_ms", "sched_lag_ms", "overloaded", "reason")


class Observation(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str  # unique per observation (uuid4 hex)
    seq: int  # per-agent sequence number, starts at 0 on each agent start
    kind: str  # a key of edgeprobe.probes.registry.KINDS
    target: str  # as configured (host, host:port or URL)
    started_at_ns: int  # wall clock when the probe started: the InfluxDB timestamp
    duration_ms: float  # monotonic duration of the whole run
    outcome: str  # edgeprobe.probes.outcome.Outcome value
    reason: str | None = None  # why, when outcome != ok
    sched_lag_ms: float | None = None  # how late the scheduler started the run
    # Scheduled runs: True when sched_lag_ms exceeded the agent's overload threshold (the agent
    # could not keep up; timings may be inflated). None for ad-hoc runs.
    overloaded: bool | None = None
    job: str | None = None  # the agent job that produced it; None for ad-hoc runs
    labels: dict[str, str] = {}  # job labels, stored as tags
    # The physical floor (probes/geo.py), when both ends have coordinates. Additive to v1.
    distance_km: float | None = None  # great-circle distance agent → target
    floor_rtt_ms: float | None = None  # straight-fibre round trip over that distance
    inflation_ratio: float | None = None  # measured minimum RTT / floor_rtt_ms
    floor_ttft_ms: float | None = None  # inference: round trips a fresh request needs × floor_rtt_ms
    fields: dict[str, FieldValue] = {}


class Envelope(msgspec.Struct, kw_only=True):
    v: int
    agent: str
    site: str
    sent_at_ns: int
    labels: dict[str, str] = {}  # agent labels, stored as tags on every observation
    observations: list[Observation]
    # This message's id (BATCH_RE), unique per agent: the collector that stores the message
    # confirms it by this id on ``…/ack`` (:class:`DeliveryAck`). None: no confirmation asked
    # (``publish.delivery: broker``, or an agent before it). Additive to v1.
    batch: str | None = None


class RawEnvelope(msgspec.Struct, kw_only=True):
    """:class:`Envelope` with its observations left encoded: the agent sends spooled payloads as they
    are, and the collector decodes each observation on its own so one bad one stays alone."""

    v: int
    agent: str
    site: str
    sent_at_ns: int
    labels: dict[str, str] = {}
    observations: list[msgspec.Raw]
    batch: str | None = None


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Retained presence message on ``<prefix>/v1/<site>/<agent>/status`` (also the last will)."""

    v: int
    agent: str
    site: str
    state: str  # "online" | "offline"
    at_ns: int
    version: str | None = None
    kinds: list[str] = []  # the probe kinds this agent's build can run (capabilities; see icmp_permitted)
    # Additive: the kinds of the jobs it runs now (its file's and central ones). None: not reported.
    job_kinds: list[str] | None = None
    labels: dict[str, str] = {}
    latitude: float | None = None
    longitude: float | None = None
    queued: int | None = None
    dropped: int | None = None
    published: int | None = None
    memory_backlog: int | None = None  # additive: observations held in memory only (the disk refuses commits)
    quarantined: int | None = None  # additive: spooled rows that failed their checksum (spool lifetime)
    # The fleet (agent/control.py); additive to v1.
    heartbeat_at_ns: int | None = None  # wall clock of this status message (same as at_ns when online)
    icmp_permitted: bool | None = None  # the agent may open an ICMP socket (dgram or raw), IPv4
    raw_permitted: bool | None = None  # additive: the agent may open raw IP sockets (the trace kind)
    accepts_commands: bool | None = None
    accepts_config: bool | None = None
    refused: int | None = None  # commands/configs refused since start
    refusals: dict[str, int] = {}  # of those, by reason code (expired, replayed, policy_private, …)
    last_refusal: str | None = None  # the last reason, in words
    config_docs: list[str] = []  # central configuration documents in force (topic leaf names)
    config_error: str | None = None  # why the last central configuration was refused (the old one kept)
    overloaded: bool | None = None  # the scheduler started runs late recently (see sched_lag_ms)
    overloaded_runs: int | None = None  # runs flagged overloaded since the agent started
    task_restarts: int | None = None  # crashed tasks restarted since the agent started (edgeprobe.supervise)


class AgentHealth(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An agent's own health, published every ``publish.health_interval_s`` (default 30 s) on
    ``<prefix>/v1/<site>/<agent>/health`` at QoS 1, not retained. Additive to wire schema v1.

    The collector writes one point per message to measurement ``edgeprobe_health`` at ``at_ns``,
    tagged ``agent``, ``site``, ``source`` (from ``component``, here always ``"agent"``) and the agent
    ``labels``;
    every other attribute below is a field (names as here; ``None`` means not known, not zero).
    The ``agent``/``site`` in the payload must match the topic (else: rejected as spoofed).

    Counts are of *observations* unless the name says otherwise. Counters marked "process" are
    cumulative since ``started_at_ns`` (they restart from 0 when the agent restarts: use
    ``non_negative_difference`` in queries); counters marked "spool" are cumulative over the
    spool's lifetime and survive restarts (they are stored in the spool file).
    """

    v: int  # wire schema version (SCHEMA_VERSION)
    agent: str
    site: str
    at_ns: int  # wall clock when sampled: the InfluxDB timestamp
    started_at_ns: int  # wall clock when this agent process started
    component: str = "agent"
    version: str | None = None  # agent software version
    labels: dict[str, str] = {}  # agent labels, stored as tags
    uptime_s: float = 0.0  # monotonic seconds since the process started
    # The spool (durable queue between scheduler and broker), at sampling time.
    spool_durable: bool = False  # True: SQLite file; False: in-memory (spool.path: null)
    spool_depth: int = 0  # observations not yet delivered (in flight included)
    spool_bytes: int = 0  # their encoded size (msgspec JSON), bytes
    spool_oldest_age_s: float | None = None  # wall-clock age of the oldest waiting one; 0 when empty
    spool_in_flight: int = 0  # of spool_depth: sent, not yet acknowledged (PUBACK, or confirmation)
    spool_errors: int = 0  # process: failed spool writes/commits (disk full, I/O error)
    dropped_bytes_limit: int = 0  # spool: oldest dropped because spool.max_bytes was reached
    dropped_age_limit: int = 0  # spool: dropped because older than spool.max_age_s
    # Additive: the disk refusing commits, and rows damaged on it.
    dropped_memory_limit: int = 0  # spool: dropped from the in-memory backlog (over its bounds)
    memory_backlog: int = 0  # observations held in memory only, not (yet) in the spool file
    memory_backlog_bytes: int = 0  # their encoded size, bytes
    spool_quarantined: int = 0  # spool: rows that failed their checksum, set aside (never sent)
    # The publisher, process counters.
    produced: int = 0  # process: observations the scheduler produced (== put into the spool)
    published: int = 0  # process: observations sent to the broker (a re-send counts again)
    acknowledged: int = 0  # process: delivered, left the spool (collector confirmation; "broker": PUBACK)
    publish_failures: int = 0  # process: batches not acknowledged (timeout, lost connection)
    messages_published: int = 0  # process: MQTT obs messages acknowledged
    connects: int = 0  # process: successful broker connections (first one included)
    reconnects: int = 0  # process: connections after a lost one (connects - 1 when connected)
    connected: bool = False  # connected to the broker when sampled
    replay_throttled_s: float = 0.0  # process: seconds the publisher waited on publish.replay_max_per_s
    # The scheduler.
    skipped_slots: int = 0  # process: slots skipped because the previous run was still going
    probes_in_flight: int = 0  # probe runs in progress when sampled
    sched_lag_max_ms: float | None = None  # largest sched_lag_ms since the previous health message
    overloaded: bool = False  # the scheduler started a run late within the last 60 s
    overloaded_runs: int = 0  # process: runs flagged overloaded (started later than their threshold)
    # Delivery confirmations (publish.delivery "collector": an observation leaves the spool when a
    # collector confirms it stored it; ``acknowledged`` counts those then).
    unconfirmed: int = 0  # observations sent and waiting for a collector's confirmation (gauge)
    confirm_timeouts: int = 0  # process: waits that ended without a confirmation (all unconfirmed sent again)
    resent_unconfirmed: int = 0  # process: observations sent again for want of a confirmation (or on reconnect)
    bad_confirmations: int = 0  # process: …/ack messages refused (malformed, too large, for another agent)
    # Supervision (edgeprobe.supervise).
    task_restarts: int = 0  # process: crashed tasks (publisher, scheduler, control) restarted


class DeliveryAck(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A collector's confirmation on ``<prefix>/v1/<site>/<agent>/ack`` (QoS 1, not retained) that
    the messages with these ``batch`` ids are durably stored (committed to its spool, on their way
    to InfluxDB). The agent keeps an observation in its spool until this arrives for its message;
    it is sent by whichever collector took the message (shared subscriptions included). Additive
    to v1."""

    v: int
    agent: str
    site: str
    collector: str  # the collector's name (its config ``name``)
    at_ns: int  # wall clock when sent
    batches: list[str]  # ids of stored messages, in the order they arrived, at most MAX_ACK_BATCHES


class CommandReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An agent's answer to an ad-hoc request, on ``<prefix>/v1/results/<request_id>/<agent>``."""

    v: int
    request_id: str
    agent: str
    site: str
    at_ns: int
    status: str  # "ok" (observation holds the result, whatever its outcome) | "refused"
    code: str | None = None  # refusal code, stable (e.g. "expired", "policy_private")
    reason: str | None = None  # refusal reason, in words
    observation: Observation | None = None


def cmd_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/cmd"


def config_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/config"


def group_config_topic(prefix: str, name: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/config/group/{name}"


def result_topic(prefix: str, request_id: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/results/{request_id}/{agent}"


def ack_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/ack"


def obs_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/obs"


def status_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/status"


def health_topic(prefix: str, site: str, agent: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/{site}/{agent}/health"


def parse_agent_topic(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """(site, agent, leaf) of ``<prefix>/v1/<site>/<agent>/<leaf>``, or None when not of that shape.

    ``leaf`` is ``obs``, ``status`` or ``health`` for topics edgeprobe agents publish.
    """
    parts = topic.split("/")
    pre = prefix.split("/")
    if len(parts) != len(pre) + 4 or parts[: len(pre)] != pre:
        return None
    version, site, agent, leaf = parts[len(pre) :]
    if version != TOPIC_VERSION:
        return None
    return site, agent, leaf


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
