"""MQTT broker connection settings shared by agent and collector.

Plain data only: this module does not import an MQTT library. ``client_kwargs`` returns the
keyword arguments that ``aiomqtt.Client`` takes, so both sides build clients the same way.
"""

from __future__ import annotations

import ssl
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec

from edgeprobe.configfile import Secret

BROKER_ENV = {
    "EDGEPROBE_BROKER_URL": "broker.url",
    "EDGEPROBE_BROKER_USERNAME": "broker.username",
    "EDGEPROBE_BROKER_PASSWORD": "broker.password",
}


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """(tls, host, port) of ``mqtt://host[:port]`` or ``mqtts://host[:port]``; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"expected an mqtt:// or mqtts:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host in the broker URL, got {url!r}")
    if parts.username or parts.password:
        raise ValueError("put broker credentials in username/password (or EDGEPROBE_BROKER_*), not the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"expected mqtt[s]://host[:port] with nothing after it, got {url!r}")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"bad port in broker URL {url!r}") from err
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port if port is not None else (8883 if tls else 1883)


class BrokerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: Secret | None = None
    client_id: str | None = None  # default: derived from the agent id / collector name
    topic_prefix: str = "edgeprobe"
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 0.5
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure: bool = False  # skip server verification: for labs only

    def __post_init__(self) -> None:
        try:
            parse_broker_url(self.url)
        except ValueError as err:
            raise ValueError(f"url: {err}") from None
        if (
            not self.topic_prefix
            or any(c in self.topic_prefix for c in "+#")
            or self.topic_prefix.strip("/") != self.topic_prefix
        ):
            raise ValueError(
                f"topic_prefix: expected a topic prefix without '+', '#' or outer '/', got {self.topic_prefix!r}"
            )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_min_s")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_key_file: tls_cert_file and tls_key_file go together")

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.url)[0]

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.tls_cert_file and self.tls_key_file:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx

    def client_kwargs(self, default_client_id: str) -> dict[str, Any]:
        """Keyword arguments for ``aiomqtt.Client`` (the password is revealed only here)."""
        _, host, port = parse_broker_url(self.url)
        return {
            "hostname": host,
            "port": port,
            "username": self.username,
            "password": self.password.reveal() if self.password is not None else None,
            "identifier": self.client_id or default_client_id,
            "keepalive": self.keepalive_s,
            "timeout": self.connect_timeout_s,
            "tls_context": self.tls_context(),
        }
