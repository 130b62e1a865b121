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

Environment variables override keys (values are strings): see :data:`COLLECTOR_ENV`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from probes import configfile
from probes.broker import BROKER_ENV, BrokerConfig
from probes.configfile import Secret
from probes.schema import NAME_RE

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
    qos: Literal[0, 1, 2] = 1
    shared_group: str | None = None  # MQTT shared subscription: $share/<group>/<topic>

    def __post_init__(self) -> None:
        if self.topic is not None and (not self.topic or self.topic.startswith("$share/")):
            raise ValueError(f"topic: expected a topic filter (use shared_group for $share), got {self.topic!r}")
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
    # Lines held in memory while InfluxDB is unreachable; beyond that the oldest are dropped.
    max_buffered_lines: Annotated[int, msgspec.Meta(ge=1)] = 200_000
    shutdown_flush_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0  # last flush on stop
    log_interval_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 10.0  # per-reason log rate limit


class CollectorConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: str = "collector"
    broker: BrokerConfig = BrokerConfig()
    subscription: SubscriptionConfig = SubscriptionConfig()
    influx: InfluxConfig = InfluxConfig()
    limits: LimitsConfig = LimitsConfig()

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name: expected letters, digits, '.', '_' or '-', got {self.name!r}")
        if self.limits.max_buffered_lines < self.influx.batch_max_lines:
            raise ValueError("limits: max_buffered_lines must be >= influx.batch_max_lines")

    @property
    def default_client_id(self) -> str:
        return f"edgeprobe-collector-{self.name}"

    @property
    def topic_filter(self) -> str:
        """The filter to subscribe to, with the ``$share/<group>/`` prefix when shared."""
        topic = self.subscription.topic or f"{self.broker.topic_prefix}/v1/+/+/obs"
        if self.subscription.shared_group:
            return f"$share/{self.subscription.shared_group}/{topic}"
        return topic


def load_collector_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> CollectorConfig:
    """Read and validate ``collector.yaml``; EDGEPROBE_* variables override keys. Raises ConfigError."""
    return configfile.load(path, CollectorConfig, COLLECTOR_ENV, environ)
