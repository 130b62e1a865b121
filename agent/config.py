"""The agent's config file (YAML), validated on load.

Defaults live in the structs below (and in each probe kind's config struct). Errors name the
file, the key and what was expected; unknown keys are rejected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import msgspec

from edgeprobe.agent.policy import AGENT_SECRET_ENV_PREFIXES, PolicyConfig, agent_secret_env
from edgeprobe.configfile import ConfigError, LogConfig, convert, load
from edgeprobe.mqtt import BROKER_ENV, BrokerConfig
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.registry import KINDS, find_kind, kind_names
from edgeprobe.schema import BASE_FIELD_KEYS, NAME_RE, RESERVED_NAMES, RESERVED_TAG_KEYS
from edgeprobe.supervise import SuperviseConfig


def _reserved_label_keys() -> frozenset[str]:
    """Keys a label may not take: the collector's own tags and fields, and every kind's result names."""
    names: set[str] = set(RESERVED_TAG_KEYS) | set(BASE_FIELD_KEYS)
    for kind in KINDS.values():
        names.update(kind.result_type.__struct_fields__)
        names.update(kind.tag_fields)
    return frozenset(names)


RESERVED_LABEL_KEYS = _reserved_label_keys()
LABEL_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


MAX_LABELS: Final = 64  # per label set; each label is a tag on every point the agent writes


def _check_labels(labels: Mapping[str, str], where: str) -> None:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{where}: {len(labels)} labels; at most {MAX_LABELS} (each becomes an InfluxDB tag)")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise ValueError(f"{where}: expected label keys like 'tier' or 'pop_name', got {key!r}")
        if key in RESERVED_LABEL_KEYS:
            raise ValueError(f"{where}: label {key!r} is reserved: it names a tag or field edgeprobe writes itself")
        if not value:
            raise ValueError(f"{where}: label {key!r} has an empty value")


class AgentIdentity(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    id: str
    site: str
    latitude: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    longitude: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    labels: dict[str, str] = {}
    max_concurrent_probes: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 512
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 3.0

    def __post_init__(self) -> None:
        for key in ("id", "site"):
            if not NAME_RE.match(getattr(self, key)):
                raise ValueError(
                    f"{key}: expected letters, digits, '.', '_' or '-' (it becomes an MQTT topic level), "
                    f"got {getattr(self, key)!r}"
                )
            if getattr(self, key) in RESERVED_NAMES:
                raise ValueError(f"{key}: {getattr(self, key)!r} is reserved (a level of edgeprobe's own topics)")
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("longitude: latitude and longitude go together")
        _check_labels(self.labels, "labels")


class PublishConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    batch_max_observations: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 500
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    status_interval_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    flush_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 5.0  # at shutdown
    # Observations per second at most (token bucket, one second of burst): a backlog after an
    # outage goes out in order at this rate, so a fleet reconnecting at once does not flatten
    # the broker. Must exceed what the jobs produce (checked at load).
    replay_max_per_s: Annotated[float, msgspec.Meta(gt=0, le=10_000_000)] = 2000.0
    ack_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0  # no PUBACK by then: reconnect
    health_interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 30.0  # …/health messages
    # When an observation leaves the spool. "collector": once a collector confirms it stored it
    # (…/ack, after its durable commit), so a broker that crashes with messages queued loses
    # nothing; "broker": on the broker's PUBACK (a broker without an edgeprobe collector).
    delivery: Literal["collector", "broker"] = "collector"
    # No confirmation within this (the first wait is drawn from [1, 2] × it, doubling while none
    # comes, up to 10 min): what was sent and not confirmed is sent again, oldest first. Also on
    # every reconnect.
    confirm_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # Observations sent and not yet confirmed at most; then sending waits for confirmations.
    max_unconfirmed: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 20_000


DEFAULT_SPOOL_PATH = "/var/lib/edgeprobe/{agent}/spool.db"

# With nothing in flight, the publisher lets a batch wait this long for company (at most
# publish.flush_interval_s): at 100 observations a second an agent sends ~5 messages a second, not
# 100 (each costs CPU at both ends), for at most 0.2 s of added delay. An observation leaves no
# sooner, so the spool's group commit waits as long by default: committing sooner buys fsyncs,
# not freshness (measured 2026-12-05, 1,000 ICMP targets / 10 s: 0.05 s commits cost ~20 % more
# agent CPU than 0.25 s ones; docs/performance.md).
AUTOCORK_LINGER_S: Final = 0.2


class SpoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where observations wait for the broker (agent/spool.py). ``path: null``: in memory only."""

    path: str | None = DEFAULT_SPOOL_PATH  # "{agent}" becomes the agent id
    max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**40)] = 256 * 1024 * 1024
    max_age_s: Annotated[float, msgspec.Meta(gt=0, le=366 * 86_400)] = 7 * 86_400.0
    # Group commit: an observation is durable once the commit of its group ran.
    commit_interval_s: Annotated[float, msgspec.Meta(gt=0, le=10)] = AUTOCORK_LINGER_S
    commit_max_observations: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    # full: every commit is fsynced (survives power loss); normal: survives a process crash only.
    synchronous: Literal["full", "normal"] = "full"
    commit_log: str | None = None  # debugging/tests: append every committed observation id here
    # While the disk refuses commits (full, I/O errors) observations wait in memory, bounded by
    # both (the oldest dropped and counted beyond); the publisher sends from there meanwhile.
    memory_max_observations: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 20_000
    memory_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**34)] = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.path is not None and not self.path.strip():
            raise ValueError("path: expected a file path, or null for an in-memory spool")

    def resolved_path(self, agent_id: str) -> str | None:
        return None if self.path is None else self.path.replace("{agent}", agent_id)


class TargetSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A target with where it is (for the physical floor) and labels of its own (e.g. tier: edge)."""

    target: str
    latitude: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    longitude: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    labels: dict[str, str] = {}

    def __post_init__(self) -> None:
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("longitude: latitude and longitude go together")


class JobConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    kind: str
    targets: Annotated[list[str | TargetSpec], msgspec.Meta(min_length=1)]
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)]
    name: str | None = None
    options: dict[str, Any] = {}
    labels: dict[str, str] = {}


class ControlConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Commands and central configuration from the broker (agent/control.py), Ed25519-signed."""

    public_key_file: str | None = None  # the controller's public key (PEM); required to accept anything
    accept_commands: bool = False  # ad-hoc requests (edgeprobe fleet probe)
    accept_config: bool = False  # central configuration (edgeprobe fleet apply)
    max_command_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0
    max_config_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=366 * 86_400)] = 30 * 86_400.0

    def __post_init__(self) -> None:
        if (self.accept_commands or self.accept_config) and not self.public_key_file:
            raise ValueError("public_key_file: required when accept_commands or accept_config is on")


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    agent: AgentIdentity
    broker: BrokerConfig = BrokerConfig()
    publish: PublishConfig = PublishConfig()
    spool: SpoolConfig = SpoolConfig()
    jobs: list[JobConfig] = []
    control: ControlConfig = ControlConfig()
    policy: PolicyConfig = PolicyConfig()  # remote requests (ad-hoc and central); never taken from the broker
    supervise: SuperviseConfig = SuperviseConfig()  # restarting crashed tasks (edgeprobe.supervise)
    log: LogConfig = LogConfig()  # the one-line summary every log.summary_interval_s


@dataclass(frozen=True, kw_only=True)
class Job:
    """A validated job: its kind resolved and its options typed."""

    name: str
    kind: AnyKind
    targets: tuple[str, ...]
    interval_s: float
    config: Any
    labels: dict[str, str]
    # Per target: coordinates (latitude, longitude) and labels, when the config gave them.
    target_at: dict[str, tuple[float, float]] = field(default_factory=dict)
    target_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def labels_for(self, target: str) -> dict[str, str]:
        extra = self.target_labels.get(target)
        return {**self.labels, **extra} if extra else self.labels


def build_jobs(cfg: AgentConfig, source: str) -> list[Job]:
    jobs: list[Job] = []
    seen: set[str] = set()
    for i, job in enumerate(cfg.jobs):
        where = f"jobs[{i}]"
        kind = find_kind(job.kind)  # its name or an alias (ping, ttft)
        if kind is None:
            raise ConfigError(
                f"{source}: {where}.kind: unknown probe kind {job.kind!r}; expected one of: {kind_names()}"
            )
        options = convert(job.options, kind.config_type, source, prefix=f"{where}.options")
        for var in kind.reads_env(options):
            if agent_secret_env(var):
                raise ConfigError(
                    f"{source}: {where}.options: reads the environment variable {var}, which holds this agent's "
                    f"own credentials ({', '.join(p + '*' for p in AGENT_SECRET_ENV_PREFIXES)} and what the agent's "
                    "config loading reads): no probe may send it; put the key in a variable of its own"
                )
        targets: list[str] = []
        target_at: dict[str, tuple[float, float]] = {}
        target_labels: dict[str, dict[str, str]] = {}
        for t, entry in enumerate(job.targets):
            target = entry if isinstance(entry, str) else entry.target
            problem = kind.check_target(target)
            if problem is not None:
                raise ConfigError(f"{source}: {where}.targets[{t}]: {problem}")
            targets.append(target)
            if isinstance(entry, TargetSpec):
                if entry.latitude is not None and entry.longitude is not None:
                    target_at[target] = (entry.latitude, entry.longitude)
                if entry.labels:
                    try:
                        _check_labels(entry.labels, "labels")
                    except ValueError as err:
                        raise ConfigError(f"{source}: {where}.targets[{t}].{err}") from None
                    target_labels[target] = dict(entry.labels)
        if len(set(targets)) != len(targets):
            raise ConfigError(f"{source}: {where}.targets: a target is listed twice")
        try:
            _check_labels(job.labels, "labels")
        except ValueError as err:
            raise ConfigError(f"{source}: {where}.{err}") from None
        run_s = kind.max_run_s(options)
        if job.interval_s < run_s:
            raise ConfigError(
                f"{source}: {where}.interval_s: {job.interval_s:g} s is shorter than one run may take "
                f"({run_s:g} s with these options); raise interval_s or lower count/timeout_s"
            )
        name = job.name or (job.kind if sum(j.kind == job.kind for j in cfg.jobs) == 1 else f"{job.kind}-{i}")
        if not NAME_RE.match(name):
            raise ConfigError(f"{source}: {where}.name: expected letters, digits, '.', '_' or '-', got {name!r}")
        if name in seen:
            raise ConfigError(f"{source}: {where}.name: job name {name!r} is used twice")
        seen.add(name)
        jobs.append(
            Job(
                name=name,
                kind=kind,
                targets=tuple(targets),
                interval_s=job.interval_s,
                config=options,
                labels=dict(job.labels),
                target_at=target_at,
                target_labels=target_labels,
            )
        )
    check_replay_rate(cfg, jobs, source)
    return jobs


def check_replay_rate(cfg: AgentConfig, jobs: list[Job], source: str) -> None:
    """A backlog can only drain if publishing may go faster than the jobs produce."""
    produced_per_s = sum(len(job.targets) / job.interval_s for job in jobs)
    if produced_per_s >= cfg.publish.replay_max_per_s:
        raise ConfigError(
            f"{source}: publish.replay_max_per_s: {cfg.publish.replay_max_per_s:g}/s is not above what the jobs "
            f"produce ({produced_per_s:g} observations/s): a backlog would never drain; raise it"
        )


def load_agent_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> tuple[AgentConfig, list[Job]]:
    cfg = load(path, AgentConfig, BROKER_ENV, environ)
    return cfg, build_jobs(cfg, str(path))


# What a reload (SIGHUP) changes while the agent runs. Everything else is tied to what the agent
# set up at start (its identity and labels on every message, the broker sessions, the spool file,
# the controller's key, the publisher's pace, the supervisor) and needs a restart: a reload that
# changes any of it is refused whole, naming those keys.
RELOADABLE_KEYS: Final = (
    "jobs",
    "policy",
    "log",
    "agent.max_concurrent_probes",
    "agent.shutdown_grace_s",
    "agent.latitude",
    "agent.longitude",
)


def job_changes(old: list[Job], new: list[Job]) -> list[str]:
    """What a reload does to the jobs, by name (pure): ``+name (kind, N targets)`` added,
    ``-name`` removed, ``~name`` changed (kind, targets, interval, options or labels)."""
    before = {j.name: j for j in old}
    after = {j.name: j for j in new}
    out = [f"+{j.name} ({j.kind.name}, {len(j.targets)} target(s))" for j in new if j.name not in before]
    out += [f"-{j.name}" for j in old if j.name not in after]
    out += [f"~{j.name}" for j in new if j.name in before and before[j.name] != j]
    return out
