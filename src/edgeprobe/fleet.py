"""The controller side of the fleet (``edgeprobe fleet …``): presence, ad-hoc requests, central config.

Reads retained statuses, picks agents, publishes signed commands and configuration documents
(:mod:`edgeprobe.signing`, :mod:`edgeprobe.agent.control`) and collects replies. Pure selection/summary
functions are separate from the MQTT I/O so they can be tested alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeprobe.agent.control import AdhocCommand, ConfigDocument
from edgeprobe.configfile import ConfigError, convert, load, read_yaml
from edgeprobe.mqtt import BROKER_ENV, BrokerConfig, make_client
from edgeprobe.probes.registry import find_kind, get_kind, kind_names
from edgeprobe.schema import (
    NAME_RE,
    RESERVED_NAMES,
    TOPIC_VERSION,
    CommandReply,
    Status,
    cmd_topic,
    config_topic,
    group_config_topic,
    parse_agent_topic,
    result_topic,
)
from edgeprobe.signing import sign, stamp
from edgeprobe.termtext import term_safe

log = logging.getLogger("edgeprobe.fleet")

KEY_ENV = "EDGEPROBE_CONTROLLER_KEY_FILE"


def primary_field(kind: str) -> str | None:
    """The one number of a kind that the live table and the summary show (its ``fleet_field``);
    None for a kind this build does not know."""
    k = find_kind(kind)
    return k.fleet_field if k is not None else None


class FleetFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The controller's settings file (``--config``): the broker (as in the agent file) and the key."""

    broker: BrokerConfig = BrokerConfig()
    key_file: str | None = None  # the controller's Ed25519 private key (PEM)


def load_fleet_file(path: str | None, environ: Mapping[str, str] | None = None) -> FleetFile:
    if path is None:
        env = os.environ if environ is None else environ
        given = {BROKER_ENV[k].split(".", 1)[1]: v for k, v in env.items() if k in BROKER_ENV}
        return FleetFile(broker=convert(given, BrokerConfig, "environment", prefix="broker"))
    return load(path, FleetFile, BROKER_ENV, environ)


# ---------------------------------------------------------------------- presence


def parse_where(items: Iterable[str]) -> dict[str, str]:
    """``["tier=pop", "site=fra1"]`` → dict; ValueError on a malformed item (pure)."""
    where: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--where: expected label=value, got {item!r}")
        where[key] = value
    return where


def matches(status: Status, where: Mapping[str, str]) -> bool:
    have = {**status.labels, "site": status.site, "agent": status.agent}
    return all(have.get(k) == v for k, v in where.items())


def select_agents(statuses: Iterable[Status], where: Mapping[str, str], limit: int | None) -> list[Status]:
    """Online agents matching ``where``, at most ``limit``, spread across sites: one per site in
    turn (sites and agents in name order) (pure)."""
    by_site: dict[str, list[Status]] = {}
    for s in sorted(statuses, key=lambda s: (s.site, s.agent)):
        if s.state == "online" and matches(s, where):
            by_site.setdefault(s.site, []).append(s)
    chosen: list[Status] = []
    queues = list(by_site.values())
    while queues and (limit is None or len(chosen) < limit):
        for q in list(queues):
            if limit is not None and len(chosen) >= limit:
                break
            chosen.append(q.pop(0))
            if not q:
                queues.remove(q)
    return chosen


# What the controller reads from the broker is bounded: an agent (or whoever has its login) writes
# these messages, so a status is input to validate, not a record to trust.
MAX_STATUS_BYTES = 64 * 1024  # a real status is well under 4 KiB
MAX_STATUSES = 10_000  # status messages read per scan; more are counted and not read
MAX_SCAN_BYTES = 32 * 1024 * 1024  # status bytes read per scan
MAX_TEXT_CHARS = 256  # any string in a status (version, reasons, label keys and values, kinds …)
MAX_ITEMS = 64  # labels, kinds, refusals, config_docs
MAX_REPLY_BYTES = 1024 * 1024  # one reply to an ad-hoc request (the observation of one run)


class StatusRejected(Exception):
    """Why a status message was skipped. ``code`` is short and stable (counted)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _check_text(name: str, value: str | None) -> None:
    if value is not None and len(value) > MAX_TEXT_CHARS:
        raise StatusRejected("too_long", f"{name}: longer than {MAX_TEXT_CHARS} characters")


def check_status(prefix: str, topic: str, payload: bytes) -> Status:
    """The status in ``payload`` received on ``topic``, validated and bounded (pure), or
    :class:`StatusRejected`.

    The agent's identity is the topic's (the broker's ACL binds an agent's login to its own
    ``<site>/<agent>`` topics); the payload must name the same site and agent, so a compromised
    agent can neither list a fake agent nor overwrite what another one says.
    """
    if len(payload) > MAX_STATUS_BYTES:
        raise StatusRejected("too_large", f"{len(payload)} bytes, more than {MAX_STATUS_BYTES}")
    parsed = parse_agent_topic(prefix, topic)
    if parsed is None or parsed[2] != "status":
        raise StatusRejected("bad_topic", "not a status topic")
    site, agent, _ = parsed
    for what, name in (("site", site), ("agent", agent)):
        if not NAME_RE.match(name) or name in RESERVED_NAMES:
            raise StatusRejected("bad_topic", f"topic {what} is not a valid name")
    try:
        status = msgspec.json.decode(payload, type=Status)
    except msgspec.DecodeError as err:
        raise StatusRejected("malformed", f"not a status message: {str(err)[:200]}") from None
    if status.site != site or status.agent != agent:
        raise StatusRejected("spoofed", "the status names another site/agent than its topic")
    if status.state not in ("online", "offline"):
        raise StatusRejected("malformed", "state: expected online or offline")
    for name in ("version", "last_refusal", "config_error"):
        _check_text(name, getattr(status, name))
    for name, items in (
        ("labels", status.labels),
        ("kinds", status.kinds),
        ("job_kinds", status.job_kinds or []),
        ("refusals", status.refusals),
        ("config_docs", status.config_docs),
    ):
        if len(items) > MAX_ITEMS:
            raise StatusRejected("too_long", f"{name}: more than {MAX_ITEMS} items")
        for item in items:
            _check_text(name, item)
    for key, value in status.labels.items():
        _check_text(f"labels.{key}", value)
    return status


@dataclass
class StatusScan:
    """What one read of the retained statuses found: valid statuses and what was skipped."""

    statuses: list[Status]
    skipped: Counter[str] = field(default_factory=Counter)  # by StatusRejected code
    truncated: bool = False  # a bound (MAX_STATUSES, MAX_SCAN_BYTES) stopped the read early


async def scan_statuses(broker: BrokerConfig, *, quiet_s: float = 0.5, max_s: float = 5.0) -> StatusScan:
    """Every retained agent status on the broker (read until no new one came for ``quiet_s``),
    each validated (:func:`check_status`); a bad one is skipped and counted, never fatal."""
    prefix = broker.topic_prefix
    topic = f"{prefix}/{TOPIC_VERSION}/+/+/status"
    found: dict[tuple[str, str], Status] = {}
    skipped: Counter[str] = Counter()
    truncated = False
    count = total = 0
    async with make_client(broker, f"edgeprobe-fleet-{uuid.uuid4().hex[:12]}", clean_session=True) as client:
        await client.subscribe(topic, qos=1)
        deadline = time.monotonic() + max_s
        it = client.messages.__aiter__()
        while True:
            left = min(quiet_s, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(it.__anext__(), left)
            except TimeoutError:
                break
            payload = msg.payload
            if not isinstance(payload, bytes | bytearray) or not payload:
                continue
            count += 1
            total += len(payload)
            if count > MAX_STATUSES or total > MAX_SCAN_BYTES:
                truncated = True
                break
            try:
                status = check_status(prefix, str(msg.topic), bytes(payload))
            except StatusRejected as rej:
                skipped[rej.code] += 1
                log.warning(
                    "skipped a status message on %s: %s: %s",
                    term_safe(str(msg.topic), 200),
                    rej.code,
                    term_safe(rej.reason, 300),
                )
                continue
            found[(status.site, status.agent)] = status
    if truncated:
        log.warning("stopped reading statuses at %d messages / %d bytes", MAX_STATUSES, MAX_SCAN_BYTES)
    return StatusScan(sorted(found.values(), key=lambda s: (s.site, s.agent)), skipped, truncated)


async def read_statuses(broker: BrokerConfig, *, quiet_s: float = 0.5, max_s: float = 5.0) -> list[Status]:
    """The valid statuses of :func:`scan_statuses`."""
    return (await scan_statuses(broker, quiet_s=quiet_s, max_s=max_s)).statuses


def age_s(status: Status, now_ns: int | None = None) -> float:
    now = time.time_ns() if now_ns is None else now_ns
    at = status.heartbeat_at_ns or status.at_ns
    return max(0.0, (now - at) / 1e9)


def missing_privileges(status: Status) -> dict[str, str]:
    """The agent's kinds it cannot run for want of a privilege it reports lacking, each with the
    note a listing shows (``{"icmp": "no perm"}``) (pure)."""
    out: dict[str, str] = {}
    for name in status.kinds:
        kind = find_kind(name)
        need = kind.privilege if kind is not None else None
        if need is not None and getattr(status, need.status_field, None) is False:
            out[name] = need.missing_note
    return out


def status_row(status: Status, now_ns: int | None = None) -> dict[str, Any]:
    """One agent as the ``fleet ls --json`` object (pure); the keys are documented in docs/fleet.md."""
    lacking = missing_privileges(status)
    return {
        "agent": status.agent,
        "site": status.site,
        "state": status.state,
        "age_s": round(age_s(status, now_ns), 1),
        "version": status.version,
        "labels": status.labels,
        "job_kinds": status.job_kinds,
        "kinds": status.kinds,
        "can_run": [k for k in status.kinds if k not in lacking],
        "cannot_run": lacking,
        "icmp_permitted": status.icmp_permitted,
        "latitude": status.latitude,
        "longitude": status.longitude,
        "queued": status.queued,
        "accepts_commands": bool(status.accepts_commands),
        "accepts_config": bool(status.accepts_config),
        "refused": status.refused,
        "refusals": status.refusals,
        "config_docs": status.config_docs,
        "config_error": status.config_error,
    }


# ---------------------------------------------------------------------- ad-hoc requests


# Refusal codes about the request itself (its signature, freshness, shape) or the agent's state,
# not about what the agent's policy allows; every other code is a policy decision.
REQUEST_REFUSAL_CODES = frozenset(
    {
        "unsigned", "bad_signature", "malformed", "expired", "future", "ttl_too_long", "replayed",
        "busy", "replay_state_error", "bad_request", "wrong_agent",
    }
)  # fmt: skip


def refusal_words(code: str | None) -> str:
    """How ``fleet probe`` names a reply with status ``refused`` (never the word "refused", which
    a TCP probe uses for a reset): ``denied by policy (policy_denied)``, ``request rejected (expired)``."""
    shown = code or "no code"
    if code in REQUEST_REFUSAL_CODES:
        return f"request rejected ({shown})"
    return f"denied by policy ({shown})"


@dataclass
class ProbeRun:
    request_id: str
    kind: str
    target: str
    asked: list[Status]
    replies: dict[str, CommandReply] = field(default_factory=dict)  # agent -> reply
    skipped: Counter[str] = field(default_factory=Counter)  # replies not taken, by reason
    # Online agents that matched but whose status says they do not accept commands (not asked).
    not_accepting: list[Status] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [s.agent for s in self.asked if s.agent not in self.replies]

    def denied(self) -> dict[str, CommandReply]:
        """Agents whose policy (or checks) turned the request down (reply status ``refused``)."""
        return {a: r for a, r in self.replies.items() if r.status != "ok" or r.observation is None}

    def failed(self) -> dict[str, CommandReply]:
        """Agents that ran the probe and measured a failure (outcome other than ``ok``)."""
        return {
            a: r
            for a, r in self.replies.items()
            if r.status == "ok" and r.observation is not None and r.observation.outcome != "ok"
        }

    @property
    def all_ok(self) -> bool:
        """Someone was asked, and every agent asked answered and measured ``ok``."""
        return bool(self.asked) and not self.missing and not self.denied() and not self.failed()

    def values(self) -> list[float]:
        """The primary value of every answered, measured reply."""
        key = primary_field(self.kind) or ""
        out: list[float] = []
        for r in self.replies.values():
            v = r.observation.fields.get(key) if r.observation is not None else None
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.append(float(v))
        return out

    def summary(self) -> dict[str, Any]:
        vals = self.values()
        return {
            "field": primary_field(self.kind),
            "asked": len(self.asked),
            "answered": len(self.replies),
            "measured": len(vals),
            "denied": len(self.denied()),
            "failed": len(self.failed()),
            "min": min(vals) if vals else None,
            "median": statistics.median(vals) if vals else None,
            "max": max(vals) if vals else None,
            "missing": self.missing,
            "not_accepting": [s.agent for s in self.not_accepting],
        }


def make_command(
    request_id: str, agent: str, kind: str, target: str, options: dict[str, Any], ttl_s: float
) -> AdhocCommand:
    return AdhocCommand(
        **stamp(ttl_s),
        request_id=request_id,
        agent=agent,
        kind=kind,
        target=target,
        options=options,
    )


def check_request(kind: str, target: str, options: dict[str, Any]) -> None:
    """The checks an agent will make, made first here for a clear error (ConfigError)."""
    k = find_kind(kind)  # its name or an alias (ping, ttft)
    if k is None:
        raise ConfigError(f"unknown probe kind {kind!r}; expected one of: {kind_names()}")
    convert(options, k.config_type, "command line", prefix="options")
    problem = k.check_target(target)
    if problem is not None:
        raise ConfigError(problem)


async def fleet_probe(
    broker: BrokerConfig,
    key: Ed25519PrivateKey,
    kind: str,
    target: str,
    options: dict[str, Any],
    *,
    where: Mapping[str, str] | None = None,
    limit: int | None = None,
    timeout_s: float = 15.0,
    ttl_s: float = 60.0,
    statuses: list[Status] | None = None,
    on_reply: Callable[[ProbeRun, CommandReply], None] | None = None,
    on_asked: Callable[[ProbeRun], None] | None = None,
) -> ProbeRun:
    """Ask the selected agents to run one probe now; collect replies until all answered or timeout."""
    check_request(kind, target, options)
    kind = get_kind(kind).name  # an alias goes out as the kind's own name (agents of any version know it)
    if statuses is None:
        statuses = await read_statuses(broker)
    accepting = [s for s in statuses if s.accepts_commands is True]
    chosen = select_agents(accepting, where or {}, limit)
    not_accepting = select_agents([s for s in statuses if s.accepts_commands is not True], where or {}, None)
    run = ProbeRun(request_id=uuid.uuid4().hex, kind=kind, target=target, asked=chosen, not_accepting=not_accepting)
    if on_asked is not None:
        on_asked(run)
    if not chosen:
        return run
    prefix = broker.topic_prefix
    async with make_client(broker, f"edgeprobe-fleet-{run.request_id[:12]}", clean_session=True) as client:
        await client.subscribe(result_topic(prefix, run.request_id, "+"), qos=1)
        for s in chosen:
            cmd = make_command(run.request_id, s.agent, kind, target, options, ttl_s)
            await client.publish(cmd_topic(prefix, s.site, s.agent), sign(cmd, "cmd", key), qos=1)
        asked = {s.agent: s.site for s in chosen}
        deadline = time.monotonic() + timeout_s
        it = client.messages.__aiter__()
        while len(run.replies) < len(chosen):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(it.__anext__(), left)
            except TimeoutError:
                break
            payload = msg.payload
            if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_REPLY_BYTES:
                run.skipped["too_large"] += 1
                continue
            try:
                reply = msgspec.json.decode(bytes(payload), type=CommandReply)
            except msgspec.DecodeError:
                run.skipped["malformed"] += 1
                continue
            # The topic's last level is the agent (the broker's ACL ties it to the agent's login).
            agent = str(msg.topic).rsplit("/", 1)[-1]
            if agent not in asked or reply.agent != agent or reply.request_id != run.request_id:
                run.skipped["spoofed"] += 1
                continue
            if reply.site != asked[agent]:
                run.skipped["spoofed"] += 1
                continue
            run.replies[agent] = reply
            if on_reply is not None:
                on_reply(run, reply)
    return run


# ---------------------------------------------------------------------- central configuration


class MeshRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: str  # the group document's name (topic level): one document per rule
    where: dict[str, str] = {}
    kind: str
    targets: str | list[Any]  # a target group's name, or the targets themselves
    interval_s: Annotated[float, msgspec.Meta(gt=0)]
    options: dict[str, Any] = {}
    labels: dict[str, str] = {}


class AgentDoc(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    site: str
    jobs: list[dict[str, Any]] = []


class MeshFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 7 * 86_400.0
    groups: dict[str, list[Any]] = {}  # target groups: name -> targets
    rules: list[MeshRule] = []
    agents: dict[str, AgentDoc] = {}  # per-agent documents: agent id -> jobs


def mesh_documents(mesh: MeshFile, prefix: str, source: str, now_ns: int | None = None) -> list[ConfigDocument]:
    """The configuration documents a mesh file stands for (pure but for nonces)."""
    docs: list[ConfigDocument] = []
    for i, rule in enumerate(mesh.rules):
        if not NAME_RE.match(rule.name):
            raise ConfigError(f"{source}: rules[{i}].name: expected letters, digits, '.', '_' or '-'")
        if isinstance(rule.targets, str):
            if rule.targets not in mesh.groups:
                raise ConfigError(f"{source}: rules[{i}].targets: no target group {rule.targets!r} in groups")
            targets = list(mesh.groups[rule.targets])
        else:
            targets = list(rule.targets)
        known = find_kind(rule.kind)  # an alias goes out as the kind's own name
        kind = known.name if known is not None else rule.kind
        job = {"name": rule.name, "kind": kind, "targets": targets, "interval_s": rule.interval_s}
        if rule.options:
            job["options"] = dict(rule.options)
        if rule.labels:
            job["labels"] = dict(rule.labels)
        topic = group_config_topic(prefix, rule.name)
        docs.append(ConfigDocument(**stamp(mesh.ttl_s, now_ns), topic=topic, where=dict(rule.where), jobs=[job]))
    for agent, doc in mesh.agents.items():
        if not NAME_RE.match(agent) or not NAME_RE.match(doc.site):
            raise ConfigError(f"{source}: agents.{agent}: bad agent id or site")
        topic = config_topic(prefix, doc.site, agent)
        docs.append(ConfigDocument(**stamp(mesh.ttl_s, now_ns), topic=topic, jobs=list(doc.jobs)))
    names = [d.topic for d in docs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: two rules have the same name")
    return docs


def load_mesh(path: str) -> MeshFile:
    return convert(read_yaml(path), MeshFile, path)


async def publish_documents(broker: BrokerConfig, key: Ed25519PrivateKey, docs: list[ConfigDocument]) -> None:
    """Publish signed documents, retained, at QoS 1."""
    async with make_client(broker, f"edgeprobe-fleet-{uuid.uuid4().hex[:12]}", clean_session=True) as client:
        for doc in docs:
            await client.publish(doc.topic, sign(doc, "config", key), qos=1, retain=True)


def validate_documents(docs: list[ConfigDocument], source: str) -> None:
    """Check each document's jobs the way agents will (kinds, options, targets, intervals)."""
    from edgeprobe.agent.config import AgentConfig, AgentIdentity, JobConfig, build_jobs

    for doc in docs:
        jobs = [convert(j, JobConfig, f"{source}: {doc.topic}", prefix="jobs") for j in doc.jobs]
        build_jobs(AgentConfig(agent=AgentIdentity(id="check", site="check"), jobs=jobs), f"{source}: {doc.topic}")
