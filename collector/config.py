"""The collector's config file (``collector.yaml``), validated into :class:`CollectorConfig`.

Example::

    name: pop-collector-1
    broker:
      url: mqtts://broker.example.net:8883
      username: collector
      password: ...            # or EDGEPROBE_BROKER_PASSWORD
    subscription:
      qos: 1                   # topic defaults to <broker.topic_prefix>/v1/+/+/obs
    influx:
      api: v1                  # v1: /write (InfluxDB 1.x, 3.x v1-compat); v2: /api/v2/write
      url: http://127.0.0.1:8086
      database: edgeprobe
    limits:
      max_message_bytes: 1048576
    spool:
      path: /var/lib/edgeprobe/collector-pop-collector-1.spool.sqlite   # the default for root
    health_interval_s: 10

Environment variables override keys (values are strings): see :data:`COLLECTOR_ENV`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

import msgspec

from edgeprobe import configfile
from edgeprobe.configfile import LogConfig, Secret
from edgeprobe.mqtt import BROKER_ENV, BrokerConfig
from edgeprobe.schema import NAME_RE
from edgeprobe.supervise import SuperviseConfig

INFLUX_ENV = {
    "EDGEPROBE_INFLUX_URL": "influx.url",
    "EDGEPROBE_INFLUX_API": "influx.api",
    "EDGEPROBE_INFLUX_DATABASE": "influx.database",
    "EDGEPROBE_INFLUX_USERNAME": "influx.username",
    "EDGEPROBE_INFLUX_PASSWORD": "influx.password",
    "EDGEPROBE_INFLUX_TOKEN": "influx.token",
    "EDGEPROBE_INFLUX_ORG": "influx.org",
    "EDGEPROBE_INFLUX_BUCKET": "influx.bucket",
}
COLLECTOR_ENV = {**BROKER_ENV, **INFLUX_ENV}


def check_http_url(url: str) -> None:
    """ValueError unless ``url`` is ``http[s]://host[:port][/path]`` without credentials or query."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host in the URL, got {url!r}")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password/token (or EDGEPROBE_INFLUX_*), not the URL")
    if parts.query or parts.fragment:
        raise ValueError(f"expected no query or fragment in the URL, got {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as err:
        raise ValueError(f"bad port in URL {url!r}") from err


class SubscriptionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    topic: str | None = None  # default: <broker.topic_prefix>/v1/+/+/obs
    # Agents' own health messages; default <broker.topic_prefix>/v1/+/+/health. Off: health: false.
    health: bool = True
    health_topic: str | None = None
    # 1: at least once, acknowledged after the spool commit. 0: at most once (the broker keeps
    # nothing). QoS 2 is not offered: paho completes its first half (PUBREC) before the collector
    # sees the message, so a crash in between would lose it.
    qos: Literal[0, 1] = 1
    shared_group: str | None = None  # MQTT shared subscription: $share/<group>/<topic>

    def __post_init__(self) -> None:
        for key, value in (("topic", self.topic), ("health_topic", self.health_topic)):
            if value is not None and (not value or value.startswith("$share/")):
                raise ValueError(f"{key}: expected a topic filter (use shared_group for $share), got {value!r}")
        if self.shared_group is not None and (not self.shared_group or any(c in self.shared_group for c in "/+#")):
            raise ValueError(f"shared_group: expected a name without '/', '+' or '#', got {self.shared_group!r}")


class InfluxConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    api: Literal["v1", "v2"] = "v1"
    url: str = "http://127.0.0.1:8086"
    # v1 (/write): InfluxDB 1.x, or 3.x through its v1-compatible API with a token.
    database: str = "edgeprobe"
    retention_policy: str | None = None
    username: str | None = None
    password: Secret | None = None
    token: Secret | None = None  # v1: "Authorization: Token …"; v2: required
    create_database: bool = True  # v1: CREATE DATABASE at start (a no-op when it exists)
    # v2 (/api/v2/write)
    org: str | None = None
    bucket: str | None = None
    # batching and retries
    batch_max_lines: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 5000
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    gzip: bool = True
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    retry_min_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 0.5
    retry_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # Field type conflicts InfluxDB reported are remembered per (measurement, field): lines that
    # would meet one are dead-lettered without a write. Each is forgotten (and probed again by the
    # next such line) after conflict_recheck_s; at most conflict_memory_max are kept (0: off).
    conflict_recheck_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    conflict_memory_max: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1000

    def __post_init__(self) -> None:
        try:
            check_http_url(self.url)
        except ValueError as err:
            raise ValueError(f"url: {err}") from None
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s: must be >= retry_min_s")
        if self.api == "v1":
            if not self.database or any(c in self.database for c in "\n\r"):
                raise ValueError(f"database: expected a database name, got {self.database!r}")
            if self.token is not None and (self.username is not None or self.password is not None):
                raise ValueError("token: use either token or username/password, not both")
            if self.password is not None and self.username is None:
                raise ValueError("username: required with password")
            if self.org is not None or self.bucket is not None:
                raise ValueError("api: org and bucket are for api v2; with v1 use database")
        else:
            if not self.org:
                raise ValueError("org: required with api v2")
            if not self.bucket:
                raise ValueError("bucket: required with api v2")
            if self.token is None:
                raise ValueError("token: required with api v2")
            if self.username is not None or self.password is not None:
                raise ValueError("username: api v2 authenticates with token only")


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    # On stop, try this long to write what the spool holds; the rest waits in it for the next start.
    shutdown_flush_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    log_interval_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 10.0  # per-reason log rate limit


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the collector keeps its spool and dead-letter file unless the config says otherwise.

    ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else ``/var/lib/edgeprobe`` for root,
    else ``$XDG_STATE_HOME/edgeprobe`` (``~/.local/state/edgeprobe``).
    """
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edgeprobe")
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgeprobe"


DEFAULT_SPOOL_PATH = "{state_dir}/collector-{name}.spool.sqlite"
DEFAULT_DEAD_LETTER_PATH = "{spool_dir}/collector-{name}.dead-letter.jsonl"
_PATH_PLACEHOLDERS = {"state_dir": "/s", "spool_dir": "/d", "name": "n"}


class SpoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The collector's durable queue (SQLite, WAL) between MQTT and InfluxDB, and its dead letters.

    Paths may use ``{state_dir}`` (:func:`default_state_dir`), ``{name}`` (the collector's name)
    and, in ``dead_letter_path``, ``{spool_dir}`` (the spool file's directory).
    """

    # null: in memory (not durable: a crash loses what was acknowledged and not yet written).
    path: str | None = DEFAULT_SPOOL_PATH
    # Points InfluxDB refused for good (400), one JSON object a line. null, or the default while the
    # spool is in memory: only logged and counted.
    dead_letter_path: str | None = DEFAULT_DEAD_LETTER_PATH
    # When the spool holds this much line protocol, the collector stops taking messages (they stay
    # with the broker) until InfluxDB has drained it below the limit.
    max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 1024 * 1024 * 1024
    # full: a commit survives power loss (fsync per commit); normal: survives a crash of the
    # collector but maybe not of the machine (SQLite WAL with synchronous=NORMAL).
    synchronous: Literal["full", "normal"] = "full"

    def __post_init__(self) -> None:
        for key, value in (("path", self.path), ("dead_letter_path", self.dead_letter_path)):
            if value is None:
                continue
            if not value.strip() or "\0" in value:
                raise ValueError(f"{key}: expected a file path, got {value!r}")
            try:
                value.format(**_PATH_PLACEHOLDERS)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"{key}: only {{state_dir}}, {{spool_dir}} and {{name}} may appear in braces, got {value!r}"
                ) from err
            if key == "path" and "{spool_dir}" in value:
                raise ValueError("path: {spool_dir} is the directory of this path; use {state_dir}")


class CollectorConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: str = "collector"
    broker: BrokerConfig = BrokerConfig()
    subscription: SubscriptionConfig = SubscriptionConfig()
    influx: InfluxConfig = InfluxConfig()
    limits: LimitsConfig = LimitsConfig()
    spool: SpoolConfig = SpoolConfig()
    supervise: SuperviseConfig = SuperviseConfig()  # restarting crashed tasks (edgeprobe.supervise)
    log: LogConfig = LogConfig()  # the one-line summary every log.summary_interval_s
    # The collector's own health point (measurement edgeprobe_health, source=collector); null: off.
    health_interval_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = 10.0
    # Processes that decode messages and encode their lines (edgeprobe.collector.ingest); null: one
    # per core; 0 or 1: none, the consumer does it itself.
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name: expected letters, digits, '.', '_' or '-', got {self.name!r}")

    @property
    def default_client_id(self) -> str:
        return f"edgeprobe-collector-{self.name}"

    def _shared(self, topic: str) -> str:
        if self.subscription.shared_group:
            return f"$share/{self.subscription.shared_group}/{topic}"
        return topic

    @property
    def topic_filter(self) -> str:
        """The observation filter to subscribe to, with the ``$share/<group>/`` prefix when shared."""
        return self._shared(self.subscription.topic or f"{self.broker.topic_prefix}/v1/+/+/obs")

    @property
    def health_topic_filter(self) -> str | None:
        """The agents' health filter (None when ``subscription.health`` is off)."""
        if not self.subscription.health:
            return None
        return self._shared(self.subscription.health_topic or f"{self.broker.topic_prefix}/v1/+/+/health")

    @property
    def topic_filters(self) -> list[str]:
        return [t for t in (self.topic_filter, self.health_topic_filter) if t is not None]

    def spool_path(self, environ: Mapping[str, str] | None = None) -> Path | None:
        """The spool file, or None for a spool in memory (``spool.path: null``)."""
        if self.spool.path is None:
            return None
        text = self.spool.path.format(state_dir=default_state_dir(environ), spool_dir="", name=self.name)
        return Path(text).expanduser()

    def dead_letter_path(self, environ: Mapping[str, str] | None = None) -> Path | None:
        """The dead-letter file, or None when refused points are only logged."""
        template = self.spool.dead_letter_path
        if template is None:
            return None
        spool = self.spool_path(environ)
        if spool is None and "{spool_dir}" in template:
            return None
        spool_dir = spool.parent if spool is not None else ""
        text = template.format(state_dir=default_state_dir(environ), spool_dir=spool_dir, name=self.name)
        return Path(text).expanduser()


# What a reload (SIGHUP) changes while the collector runs; a reload that changes any other key is
# refused whole, naming it (the broker session and subscription, InfluxDB, the spool and the
# supervisor are set up at start: restart the collector for those).
RELOADABLE_KEYS: Final = ("limits", "log", "health_interval_s")


def load_collector_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> CollectorConfig:
    """Read and validate ``collector.yaml``; EDGEPROBE_* variables override keys. Raises ConfigError."""
    return configfile.load(path, CollectorConfig, COLLECTOR_ENV, environ)


CLIENT_ID_FILE = "collector-{name}.client-id"


def collector_client_id(config: CollectorConfig, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(MQTT client id, whether the broker should already hold its persistent session).

    ``broker.client_id`` when set (keep it unguessable). Otherwise
    ``edgeprobe-collector-<name>-<random>``: the random part is made once and kept in
    ``collector-<name>.client-id`` beside the spool (mode 0600), so the id survives restarts (the
    persistent session with it) but no other login can guess it and take the session over (any
    login may connect with any client id; the broker then drops the older connection and, for a
    clean session, the queued messages). The second value is True when that file already existed
    (this collector connected before). With ``spool.path: null`` there is no state directory: the
    predictable ``edgeprobe-collector-<name>``, with a warning in the log.
    """
    if config.broker.client_id:
        return config.broker.client_id, False
    spool = config.spool_path(environ)
    if spool is None:
        return config.default_client_id, False
    path = spool.parent / CLIENT_ID_FILE.format(name=config.name)
    try:
        text = path.read_text(encoding="ascii").strip()
        if text and all(c in "0123456789abcdef" for c in text) and len(text) <= 64:
            return f"{config.default_client_id}-{text}", True
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as err:
        raise OSError(f"{path}: cannot read the collector's client id: {err}") from None
    import secrets

    from edgeprobe.files import write_new_file

    suffix = secrets.token_hex(12)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_new_file(path, (suffix + "\n").encode(), mode=0o600, replace=True)
    return f"{config.default_client_id}-{suffix}", False
