"""MQTT for agent, collector and fleet: broker settings, the one client factory, the one session loop.

:class:`BrokerConfig` is plain data (loaded from the config files). :func:`make_client` is the only
place an ``aiomqtt.Client`` is built from it (address, credentials, TLS, keepalive, client id, last
will, paho's manual acknowledgement), and :func:`run_session` the only reconnect loop: connect, run
the caller's session body, and after a retryable error log one line and wait with the backoff
(:mod:`edgeprobe.backoff`). Callers keep only their session bodies: the agent's publisher (presence,
publishing, flushing at shutdown), its control channel (subscriptions) and the collector's consumer
(persistent session, manual acknowledgement); the fleet controller builds its short-lived clients
with :func:`make_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

import aiomqtt
import msgspec

from edgeprobe.backoff import Backoff
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


def make_client(
    broker: BrokerConfig,
    default_client_id: str,
    *,
    clean_session: bool,
    will: aiomqtt.Will | None = None,
    manual_ack: bool = False,
    max_queued_incoming: int = 0,
) -> aiomqtt.Client:
    """An (unconnected) client for ``broker``; ``broker.client_id`` wins over ``default_client_id``.

    ``manual_ack``: paho does not acknowledge QoS 1 messages when they arrive; the caller sends
    each PUBACK with :func:`ack` (RuntimeError when this aiomqtt/paho can't do that).
    ``max_queued_incoming``: received messages waiting to be read at most; more are dropped (and
    logged by aiomqtt). 0: no limit."""
    client = aiomqtt.Client(
        **broker.client_kwargs(default_client_id),
        clean_session=clean_session,
        will=will,
        max_queued_incoming_messages=max_queued_incoming,
    )
    if manual_ack:
        # aiomqtt 2.x has no option for it: this reaches into its (stable since 2.0) ``_client``.
        paho = getattr(client, "_client", None)
        if paho is None or not hasattr(paho, "manual_ack_set") or not hasattr(paho, "ack"):
            raise RuntimeError("this aiomqtt/paho version does not expose paho's manual acknowledgement")
        paho.manual_ack_set(True)
    return client


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Send the PUBACK of a QoS 1 message received by a ``manual_ack`` client (nothing for QoS 0).
    A lost connection makes it a no-op: the broker re-sends the message after the reconnect."""
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)


def _cause(err: BaseException) -> str:
    return str(err) or type(err).__name__


# A connection lost within FLAP_S of connecting, FLAP_COUNT times in a row: another client is most
# likely connecting with the same client id (each takes it over from the other; MQTT 3.1.1 gives no
# reason for the disconnect).
FLAP_S = 5.0
FLAP_COUNT = 3
SESSION_LOST = "session_lost"  # a persistent session was not present at the broker on a reconnect
TAKEOVER_SUSPECTED = "takeover_suspected"  # FLAP_COUNT connections in a row lost within FLAP_S


def _watch_session_present(client: aiomqtt.Client) -> list[bool | None]:
    """[session_present of the CONNACK], filled in when it arrives (None: not seen). aiomqtt 2.x
    ignores the CONNACK flags: this wraps paho's on_connect (``_client``, as :func:`make_client`)."""
    seen: list[bool | None] = [None]
    paho = getattr(client, "_client", None)
    original = getattr(paho, "on_connect", None)
    if paho is None or original is None:
        return seen

    def on_connect(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        seen[0] = bool(getattr(flags, "session_present", False))
        original(c, userdata, flags, reason_code, properties)

    paho.on_connect = on_connect
    return seen


async def run_session(
    broker: BrokerConfig,
    default_client_id: str,
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    stop: asyncio.Event,
    name: str,
    log: logging.Logger,
    clean_session: bool,
    will: Callable[[], aiomqtt.Will] | None = None,
    manual_ack: bool = False,
    retry_on: tuple[type[Exception], ...] = (aiomqtt.MqttError,),
    linger: Callable[[], Awaitable[float | None]] | None = None,
    report: Callable[[Exception, str], None] | None = None,
    rng: random.Random | None = None,
    on_session_event: Callable[[str, str], None] | None = None,
    expect_session: bool = False,
    max_queued_incoming: int = 0,
) -> Exception | None:
    """Hold an MQTT session until ``session`` returns, reconnecting after retryable errors.

    Each attempt builds a client (:func:`make_client`; ``will`` is called each time, so the last
    will says what is true then), connects, logs ``"<name> connected"`` and awaits
    ``session(client)``; when that returns, so does this (None). An exception of a ``retry_on``
    type ends the attempt: one line ``"<name> lost (<cause>); retrying in X s"`` ("unreachable"
    when it did not connect) goes to ``report(error, line)`` (default: ``log.warning``), then a
    :class:`~edgeprobe.backoff.Backoff` delay that ``stop`` cuts short. The backoff starts over
    after a session that stayed up longer than ``broker.reconnect_max_s`` (a broker that accepts
    and drops at once keeps backing off).

    Once ``stop`` is set no attempt starts, unless ``linger()`` (awaited before each) returns a
    deadline in event-loop time: attempts then go on until it, each one bounded by it (its
    TimeoutError counts as retryable) and so are the waits. An attempt that started before
    ``stop`` is left to ``session`` to end. Returns the last attempt's error when it gave up
    because of ``stop`` (None if none failed); other exceptions propagate.

    Client-id takeovers (any login may connect with any client id; the broker then drops the older
    connection): ``on_session_event(event, line)`` (default: ``log.error(line)``) is told
    :data:`SESSION_LOST` when a persistent session (``clean_session=False``) that this loop already
    held is not present on a reconnect (CONNACK session_present false: what the broker queued is
    gone: taken over by a clean client with the same id, expired, or a broker without persistence),
    and :data:`TAKEOVER_SUSPECTED` when :data:`FLAP_COUNT` connections in a row were lost within
    :data:`FLAP_S` of connecting. ``expect_session``: the broker should already hold this client's
    persistent session at the first connection too (it had one before this process started).
    ``max_queued_incoming``: as for :func:`make_client`.
    """
    loop = asyncio.get_running_loop()
    backoff = Backoff(broker.reconnect_min_s, broker.reconnect_max_s, rng)
    failures = 0  # attempts that did not connect, since the last connection
    error: Exception | None = None
    held_session = expect_session  # clean_session=False: the broker should hold our session
    short_lived = 0  # connections in a row lost within FLAP_S

    def session_event(event: str, line: str) -> None:
        if on_session_event is not None:
            on_session_event(event, line)
        else:
            log.error("%s", line)

    while True:
        until: float | None = None
        if stop.is_set():
            until = await linger() if linger is not None else None
            if until is None or loop.time() >= until:
                return error
        connected_at: float | None = None
        try:
            async with asyncio.timeout_at(until):  # None: not bounded
                client = make_client(
                    broker,
                    default_client_id,
                    clean_session=clean_session,
                    will=will() if will is not None else None,
                    manual_ack=manual_ack,
                    max_queued_incoming=max_queued_incoming,
                )
                present = _watch_session_present(client)
                async with client:
                    connected_at = time.monotonic()
                    if failures:
                        log.info("%s connected after %d failed attempt(s)", name, failures)
                    else:
                        log.info("%s connected", name)
                    failures = 0
                    if not clean_session:
                        if held_session and present[0] is False:
                            session_event(
                                SESSION_LOST,
                                f"{name}: the broker had no session for client id {client.identifier!r} on "
                                "reconnecting: what it queued while we were away is lost (another client took the "
                                "id over with a clean session, the session expired, or the broker lost its state)",
                            )
                        held_session = True
                    await session(client)
            return None
        except Exception as err:
            if not (isinstance(err, retry_on) or (until is not None and isinstance(err, TimeoutError))):
                raise
            error = failed = err
        if connected_at is None:
            failures += 1
        else:
            up_s = time.monotonic() - connected_at
            if up_s > broker.reconnect_max_s:
                backoff.reset()  # it had been up for a while: start over
            short_lived = short_lived + 1 if up_s < FLAP_S else 0
            if short_lived == FLAP_COUNT:
                session_event(
                    TAKEOVER_SUSPECTED,
                    f"{name}: lost {FLAP_COUNT} connections in a row within {FLAP_S:g} s of connecting: another "
                    "client may be using the same client id (each connection takes it over from the other)",
                )
        until = None
        if stop.is_set():
            until = await linger() if linger is not None else None
            if until is None or loop.time() >= until:
                return error
        delay = backoff.next_delay_s()
        what = "lost" if connected_at is not None else "unreachable"
        line = f"{name} {what} ({_cause(failed)}); retrying in {delay:.1f} s"
        if report is not None:
            report(failed, line)
        else:
            log.warning("%s", line)
        if until is not None:  # stopping: no event to wait for, only the deadline
            await asyncio.sleep(max(0.0, min(delay, until - loop.time())))
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
