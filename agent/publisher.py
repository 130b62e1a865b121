"""Publishing observations to the broker: batches at QoS 1, presence, health (the session body).

The reconnect loop is :func:`edgeprobe.mqtt.run_session`; this module holds the session body.
Observations are taken from the spool (agent/spool.py) oldest first, each message with an id of
its own (``batch``). With ``publish.delivery: collector`` (the default) they are deleted from the
spool only when a collector confirms it stored them (:class:`edgeprobe.schema.DeliveryAck` on
``…/ack``, read by :meth:`Publisher.confirm`); the broker's PUBACK only moves a message into the
window of unconfirmed ones (``publish.max_unconfirmed``), which is given back to the spool and
sent again, oldest first, on every reconnect and when no confirmation came within the wait
(``publish.confirm_timeout_s``, doubling with the shared backoff). So a broker that loses what it
queued loses no data. With ``delivery: broker`` the PUBACK deletes them. Either way a failed or
interrupted publish releases what was not acknowledged, so a reconnect re-sends it first (at
least once; the collector's writes are idempotent by timestamp and tags). Publishing is paced
by a token bucket (``publish.replay_max_per_s``), so a backlog after an outage goes out in order
at a bounded rate.

Batching is autocorking (as TCP's): a message leaves when it is full
(``publish.batch_max_observations``), or when nothing is in flight (no message waits for its
confirmation) and its oldest observation has lingered :data:`AUTOCORK_LINGER_S` (0.2 s), or when
that one has waited ``publish.flush_interval_s``. An idle agent sends an observation 0.2 s after
it is spooled; a busy one sends what completed while the previous message was in flight, together.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import msgspec

from edgeprobe import __version__
from edgeprobe.agent.config import AUTOCORK_LINGER_S, AgentConfig
from edgeprobe.agent.spool import Spool, SpoolEntry
from edgeprobe.backoff import Backoff
from edgeprobe.mqtt import run_session
from edgeprobe.probes.registry import find_kind
from edgeprobe.probes.wake import grid_delay_s
from edgeprobe.schema import (
    MAX_ACK_BATCHES,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    AgentHealth,
    DeliveryAck,
    Envelope,
    RawEnvelope,
    Status,
    ack_topic,
    encode,
    health_topic,
    obs_topic,
    status_topic,
)

log = logging.getLogger("edgeprobe.agent.publisher")

VERSION = __version__
MAX_MESSAGE_BYTES = 512 * 1024  # a batch is split below this (collectors accept 1 MiB by default)

# Both of the agent's MQTT connections use clean sessions, so their client ids need not survive a
# restart: a random part made once per process keeps them unguessable. Any broker login may
# connect with any client id, and the broker then drops the older connection: with a predictable
# id (``edgeprobe-agent-<id>``) one stolen login could knock every agent off in turn.
_PROCESS_TOKEN = secrets.token_hex(8)


def agent_client_ids(cfg: AgentConfig) -> tuple[str, str]:
    """(publisher's, control channel's) MQTT client ids: ``broker.client_id`` when set, else
    ``edgeprobe-agent-<id>-<random>``; the control channel's is the same with ``-control``, so
    the two connections never take each other's place."""
    base = cfg.broker.client_id or f"edgeprobe-agent-{cfg.agent.id}-{_PROCESS_TOKEN}"
    return base, f"{base}-control"


MAX_CONFIRM_BYTES = 1024 * 1024  # a larger …/ack message is refused unread
BATCH_FIELD_BYTES = 80  # room kept under MAX_MESSAGE_BYTES for ',"batch":"<id>"'
CONFIRM_MAX_WAIT_S = 600.0  # the wait for confirmations doubles up to this
BAD_CONFIRM_LOG_S = 60.0  # a refused …/ack is logged at most this often


@dataclass
class PublisherStats:
    published_observations: int = 0  # sent (a re-send counts again)
    # Delivered: deleted from the spool (delivery "collector": confirmed by a collector; "broker": PUBACK).
    acknowledged_observations: int = 0
    broker_acknowledged: int = 0  # PUBACK received (a re-send counts again)
    unconfirmed: int = 0  # gauge: sent, waiting for a collector's confirmation
    confirm_timeouts: int = 0  # times nothing was confirmed within the wait: all unconfirmed sent again
    resent_unconfirmed: int = 0  # observations sent again (confirmation timeout or reconnect)
    bad_confirmations: int = 0  # …/ack messages refused (malformed, too large, not for this agent)
    unknown_confirmations: int = 0  # batch ids confirmed that were not waiting (late, or sent again meanwhile)
    published_messages: int = 0  # obs messages acknowledged
    publish_failures: int = 0  # batches not (fully) acknowledged
    connects: int = 0
    reconnects: int = 0
    connected: bool = False
    replay_throttled_s: float = 0.0


@dataclass
class _Sent:
    """A message sent with delivery "collector", waiting for a collector's confirmation."""

    entries: list[SpoolEntry]
    at: float  # loop time when it was sent


@dataclass
class ProbeCounters:
    """What the scheduler side reports into the health message (see :class:`AgentHealth`)."""

    produced: int = 0
    skipped_slots: int = 0
    in_flight: int = 0
    sched_lag_max_ms: float | None = None
    overloaded: bool = False  # the scheduler started a run late within the last OVERLOAD_HOLD_S
    overloaded_runs: int = 0  # runs flagged overloaded since start


def icmp_permitted() -> bool:
    """Whether this process may open an IPv4 ICMP socket (unprivileged dgram or raw); sends nothing."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return True
        except OSError:
            continue
    return False


def raw_permitted() -> bool:
    """Whether this process may open raw IPv4 sockets (CAP_NET_RAW: the trace kind); sends nothing."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError:
        return False
    return True


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; starts full (pure given ``now``)."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self._at: float | None = None

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens (going into debt if need be); return how long to wait before using them."""
        if self._at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate_per_s)


def encode_batches(envelope_base: Envelope, observations: Sequence[bytes], max_bytes: int) -> list[tuple[bytes, int]]:
    """Encode encoded observations into envelopes, each under ``max_bytes`` when it holds more than
    one; return (payload, number of observations) in order (pure)."""
    env = RawEnvelope(
        v=envelope_base.v,
        agent=envelope_base.agent,
        site=envelope_base.site,
        sent_at_ns=envelope_base.sent_at_ns,
        labels=envelope_base.labels,
        observations=[msgspec.Raw(o) for o in observations],
    )
    payload = encode(env)
    if len(payload) <= max_bytes or len(observations) == 1:
        return [(payload, len(observations))]
    half = len(observations) // 2
    return encode_batches(envelope_base, observations[:half], max_bytes) + encode_batches(
        envelope_base, observations[half:], max_bytes
    )


class Publisher:
    def __init__(
        self,
        cfg: AgentConfig,
        spool: Spool,
        kinds: list[str],
        probe_counters: Callable[[bool], ProbeCounters] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.kinds = kinds
        self.probe_counters = probe_counters
        self.stats = PublisherStats()
        ident = cfg.agent
        prefix = cfg.broker.topic_prefix
        self.obs_topic = obs_topic(prefix, ident.site, ident.id)
        self.status_topic = status_topic(prefix, ident.site, ident.id)
        self.health_topic = health_topic(prefix, ident.site, ident.id)
        self.ack_topic = ack_topic(prefix, ident.site, ident.id)
        # delivery "collector": observations stay in the spool until a collector confirms them.
        self.confirming = cfg.publish.delivery == "collector"
        self._batch_prefix = secrets.token_hex(4)  # batch ids: "<random>-<n>", unique per agent
        self._batch_n = 0
        self._unconfirmed: dict[str, _Sent] = {}  # batch id -> what it carried, in the order sent
        self.started_at_ns = time.time_ns()
        self._started_mono = time.monotonic()
        self._rng = random.Random()
        confirm_s = 2 * cfg.publish.confirm_timeout_s  # Backoff draws from [c/2, c]: at least confirm_timeout_s
        self._confirm_backoff = Backoff(confirm_s, max(confirm_s, CONFIRM_MAX_WAIT_S), self._rng)
        self._confirm_wait_s = self._confirm_backoff.next_delay_s()
        self._bad_confirm_logged_at: float | None = None
        pub = cfg.publish
        self._bucket = TokenBucket(pub.replay_max_per_s, max(float(pub.batch_max_observations), pub.replay_max_per_s))
        # Called with what a failed publish gives back to the spool (tests, debugging).
        self.on_release: Callable[[list[SpoolEntry]], None] | None = None
        # Called after each connection's "online" status is published (daemon.py: on_ready).
        self.on_online: Callable[[], None] | None = None
        self._flush_deadline: float | None = None
        # Extra status fields (agent/control.py: refusals, central config), and a way to ask for
        # the status to be republished now rather than at the next status_interval_s.
        self.status_extra: Callable[[], dict[str, Any]] | None = None
        self.icmp_permitted = icmp_permitted()
        self.raw_permitted = raw_permitted()
        # Restarts of the agent's crashed tasks (daemon.py: its edgeprobe.supervise.Supervisor).
        self.task_restarts: Callable[[], int] | None = None
        self._status_due = False

    def request_status(self) -> None:
        """Republish the retained status soon (something in it changed)."""
        self._status_due = True
        self.spool.changed.set()  # wakes the pump

    def job_kinds(self) -> list[str]:
        """The kinds of the file's jobs (an alias as its kind's own name); the control channel
        replaces this with the file's plus the central jobs' (``status_extra``)."""
        out: set[str] = set()
        for job in self.cfg.jobs:
            k = find_kind(job.kind)
            out.add(k.name if k is not None else job.kind)
        return sorted(out)

    def status(self, state: str) -> Status:
        ident = self.cfg.agent
        spool = self.spool.stats()
        probes = self.probe_counters(False) if self.probe_counters is not None else ProbeCounters()
        now_ns = time.time_ns()
        status = Status(
            v=SCHEMA_VERSION,
            agent=ident.id,
            site=ident.site,
            state=state,
            at_ns=now_ns,
            heartbeat_at_ns=now_ns,
            icmp_permitted=self.icmp_permitted,
            raw_permitted=self.raw_permitted,
            version=VERSION,
            kinds=self.kinds,
            job_kinds=self.job_kinds(),
            labels=dict(ident.labels),
            latitude=ident.latitude,
            longitude=ident.longitude,
            queued=spool.depth,
            dropped=spool.dropped_bytes_limit + spool.dropped_age_limit + spool.dropped_memory_limit,
            published=self.stats.acknowledged_observations,
            memory_backlog=spool.memory_backlog,
            quarantined=spool.quarantined,
            overloaded=probes.overloaded,
            overloaded_runs=probes.overloaded_runs,
            task_restarts=self.task_restarts() if self.task_restarts is not None else None,
        )
        if self.status_extra is not None:
            status = msgspec.structs.replace(status, **self.status_extra())
        return status

    def health(self) -> AgentHealth:
        ident = self.cfg.agent
        spool = self.spool.stats()
        probes = self.probe_counters(True) if self.probe_counters is not None else ProbeCounters()
        now_ns = time.time_ns()
        return AgentHealth(
            v=SCHEMA_VERSION,
            agent=ident.id,
            site=ident.site,
            at_ns=now_ns,
            started_at_ns=self.started_at_ns,
            version=VERSION,
            labels=dict(ident.labels),
            uptime_s=round(time.monotonic() - self._started_mono, 3),
            spool_durable=spool.durable,
            spool_depth=spool.depth,
            spool_bytes=spool.bytes,
            # An empty spool has no backlog: its delivery delay is 0, not unknown.
            spool_oldest_age_s=spool.oldest_age_s(now_ns) if spool.depth else 0.0,
            spool_in_flight=spool.in_flight,
            spool_errors=spool.errors,
            dropped_bytes_limit=spool.dropped_bytes_limit,
            dropped_age_limit=spool.dropped_age_limit,
            dropped_memory_limit=spool.dropped_memory_limit,
            memory_backlog=spool.memory_backlog,
            memory_backlog_bytes=spool.memory_backlog_bytes,
            spool_quarantined=spool.quarantined,
            produced=probes.produced,
            published=self.stats.published_observations,
            acknowledged=self.stats.acknowledged_observations,
            publish_failures=self.stats.publish_failures,
            messages_published=self.stats.published_messages,
            connects=self.stats.connects,
            reconnects=self.stats.reconnects,
            connected=self.stats.connected,
            replay_throttled_s=round(self.stats.replay_throttled_s, 3),
            skipped_slots=probes.skipped_slots,
            probes_in_flight=probes.in_flight,
            sched_lag_max_ms=probes.sched_lag_max_ms,
            overloaded=probes.overloaded,
            overloaded_runs=probes.overloaded_runs,
            unconfirmed=self.stats.unconfirmed,
            confirm_timeouts=self.stats.confirm_timeouts,
            resent_unconfirmed=self.stats.resent_unconfirmed,
            bad_confirmations=self.stats.bad_confirmations,
            task_restarts=self.task_restarts() if self.task_restarts is not None else 0,
        )

    def _will(self) -> aiomqtt.Will:
        """The last will: "offline" as of this connection, retained like every status."""
        return aiomqtt.Will(self.status_topic, encode(self.status("offline")), qos=1, retain=True)

    def _left(self) -> str:
        n = len(self.spool)
        where = "kept in the spool for the next start" if self.spool.durable else "lost (in-memory spool)"
        return f"{n} observation(s) not delivered, {where}" if n else "nothing left to deliver"

    async def _publish_status(self, client: aiomqtt.Client, state: str) -> None:
        await client.publish(
            self.status_topic, encode(self.status(state)), qos=1, retain=True, timeout=self.cfg.publish.ack_timeout_s
        )

    def _shutdown_deadline(self) -> float:
        """When flushing at shutdown ends (set the first time someone asks after ``stop``)."""
        if self._flush_deadline is None:
            self._flush_deadline = asyncio.get_running_loop().time() + self.cfg.publish.flush_timeout_s
        return self._flush_deadline

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """One connection: presence, then publish until stopped and flushed (or an MqttError)."""
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self.stats.connected = True
        reader: asyncio.Task[None] | None = None
        try:
            if self.confirming:
                # Confirmations sent while we were away are lost (clean session): send again.
                self._send_again("the connection was lost before they were confirmed")
                await client.subscribe(self.ack_topic, qos=1, timeout=self.cfg.publish.ack_timeout_s)
                reader = asyncio.create_task(self._read_confirmations(client), name="confirmations")
            backlog = self.spool.available()
            if backlog:
                log.info(
                    "sending %d spooled observation(s), oldest first, at most %g/s",
                    backlog,
                    self.cfg.publish.replay_max_per_s,
                )
            await self._publish_status(client, "online")
            if self.on_online is not None:
                self.on_online()
            await self._pump(client, stop, reader)
            await self._publish_status(client, "offline")
        finally:
            self.stats.connected = False
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _linger(self) -> float | None:
        """Once stopped: until when to keep (re)connecting, None when there is nothing left to send."""
        await self.spool.flush()  # what the scheduler produced last
        return self._shutdown_deadline() if self.spool.available() or self._unconfirmed else None

    def _report_retry(self, err: Exception, line: str) -> None:
        spool = self.spool.stats()
        log.warning(
            "%s (%d spooled, %d dropped so far)", line, spool.depth, spool.dropped_bytes_limit + spool.dropped_age_limit
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set and the spool is flushed; once stopped, keep trying
        (reconnecting if need be) for at most ``publish.flush_timeout_s``."""
        broker = self.cfg.broker
        self._flush_deadline = None

        async def session(client: aiomqtt.Client) -> None:
            await self._session(client, stop)

        error = await run_session(
            broker,
            agent_client_ids(self.cfg)[0],
            session,
            stop=stop,
            name=f"broker {broker.url}",
            log=log,
            clean_session=True,
            will=self._will,
            linger=self._linger,
            report=self._report_retry,
            rng=self._rng,
        )
        if error is not None:
            log.warning("stopping without broker (%s): %s", str(error) or "flush timeout", self._left())

    # ---- confirmations from the collector (delivery "collector") ---------------------------

    def _new_batch_id(self) -> str:
        self._batch_n += 1
        return f"{self._batch_prefix}-{self._batch_n}"

    def _room(self) -> int:
        """Observations that may still be sent before confirmations must free the window."""
        if not self.confirming:
            return self.cfg.publish.batch_max_observations
        return max(0, self.cfg.publish.max_unconfirmed - self.stats.unconfirmed)

    def _confirm_deadline(self) -> float | None:
        """Loop time by which the oldest unconfirmed message must be confirmed (None: none waits)."""
        for sent in self._unconfirmed.values():
            return sent.at + self._confirm_wait_s
        return None

    def _forget(self, batch: str) -> list[SpoolEntry] | None:
        sent = self._unconfirmed.pop(batch, None)
        if sent is None:
            return None
        self.stats.unconfirmed -= len(sent.entries)
        return sent.entries

    def _send_again(self, why: str) -> None:
        """Give back everything sent and not confirmed (go-back-N): taken again, oldest first."""
        if not self._unconfirmed:
            return
        entries = [e for sent in self._unconfirmed.values() for e in sent.entries]
        messages = len(self._unconfirmed)
        self._unconfirmed.clear()
        self.stats.unconfirmed = 0
        self.stats.resent_unconfirmed += len(entries)
        self.spool.release(entries)
        if self.on_release is not None:
            self.on_release(entries)
        log.warning(
            "%d observation(s) in %d message(s) not confirmed by a collector (%s): sending them again, oldest first",
            len(entries),
            messages,
            why,
        )

    def confirm(self, payload: bytes) -> None:
        """Handle a message on our ``…/ack`` topic: delete what a collector confirmed it stored."""
        ack = self._decode_confirmation(payload)
        if ack is None:
            return
        done: list[SpoolEntry] = []
        for batch in ack.batches:
            entries = self._forget(batch)
            if entries is None:
                self.stats.unknown_confirmations += 1  # late (sent again meanwhile) or a duplicate
                continue
            done.extend(entries)
        if done:
            self.spool.ack(done)
            self.stats.acknowledged_observations += len(done)
            self._confirm_backoff.reset()
            self._confirm_wait_s = self._confirm_backoff.next_delay_s()
            self.spool.changed.set()  # wakes the pump: a confirmation freed room in the window

    def _decode_confirmation(self, payload: bytes) -> DeliveryAck | None:
        """A valid confirmation for this agent, or None (counted, logged at most once a minute)."""
        ident = self.cfg.agent
        why: str
        if len(payload) > MAX_CONFIRM_BYTES:
            why = f"{len(payload)} bytes > {MAX_CONFIRM_BYTES}"
        else:
            try:
                ack = msgspec.json.decode(payload, type=DeliveryAck)
            except msgspec.DecodeError as err:
                why = f"not a delivery confirmation ({err})"
            else:
                if ack.v not in SUPPORTED_VERSIONS:
                    why = f"unsupported version {ack.v}"
                elif ack.agent != ident.id or ack.site != ident.site:
                    why = f"addressed to {ack.site!r}/{ack.agent!r}"
                elif len(ack.batches) > MAX_ACK_BATCHES:
                    why = f"{len(ack.batches)} ids > {MAX_ACK_BATCHES}"
                else:
                    return ack
        self.stats.bad_confirmations += 1
        now = time.monotonic()
        if self._bad_confirm_logged_at is None or now - self._bad_confirm_logged_at >= BAD_CONFIRM_LOG_S:
            self._bad_confirm_logged_at = now
            shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in why[:300])
            log.warning(
                "refused a message on %s: %s (%d refused so far)", self.ack_topic, shown, self.stats.bad_confirmations
            )
        return None

    async def _read_confirmations(self, client: aiomqtt.Client) -> None:
        """Hand every message on our ``…/ack`` topic to :meth:`confirm`; returns when the connection ends."""
        try:
            async for message in client.messages:
                if message.topic.matches(self.ack_topic):
                    payload = message.payload
                    self.confirm(payload if isinstance(payload, bytes) else bytes(str(payload or ""), "utf-8"))
        except aiomqtt.MqttError:
            return

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event, reader: asyncio.Task[None] | None) -> None:
        """:meth:`_pump_loop`, woken by the spool's change flag, which the stop and the end of the
        confirmations reader set as well (as a confirmation and a status request do)."""
        wake = self.spool.changed
        stop_watch = asyncio.ensure_future(stop.wait())
        stop_watch.add_done_callback(lambda _: wake.set())
        if reader is not None:
            reader.add_done_callback(lambda _: wake.set())
        try:
            await self._pump_loop(client, stop, reader)
        finally:
            stop_watch.cancel()

    async def _pump_loop(self, client: aiomqtt.Client, stop: asyncio.Event, reader: asyncio.Task[None] | None) -> None:
        pub = self.cfg.publish
        loop = asyncio.get_running_loop()
        next_status = loop.time() + pub.status_interval_s
        next_health = loop.time()  # one right after connecting, then every health_interval_s
        flush_ns = round(pub.flush_interval_s * 1e9)
        linger_ns = min(flush_ns, round(AUTOCORK_LINGER_S * 1e9))
        while True:
            if reader is not None and reader.done():
                reader.result()  # a bug in it: raise
                raise aiomqtt.MqttError("connection lost (the confirmations stopped)")
            now = loop.time()
            if now >= next_health:
                await client.publish(self.health_topic, encode(self.health()), qos=1, timeout=pub.ack_timeout_s)
                next_health = now + pub.health_interval_s
            deadline = self._confirm_deadline()
            if deadline is not None and now >= deadline:
                self.stats.confirm_timeouts += 1
                waited, self._confirm_wait_s = self._confirm_wait_s, self._confirm_backoff.next_delay_s()
                self._send_again(f"none within {waited:.0f} s")
                continue
            available = self.spool.available()
            room = self._room()
            if stop.is_set():
                await self.spool.flush()  # what the scheduler produced last becomes available
                available = self.spool.available()
                if not (available or self._unconfirmed) or loop.time() >= self._shutdown_deadline():
                    if available or self._unconfirmed:
                        log.warning("flush timeout at shutdown: %s", self._left())
                    return
                if available and room > 0:
                    await self._publish_batch(client)
                    continue
                wait_s = self._shutdown_deadline() - now  # waiting for confirmations
            else:
                if now >= next_status or self._status_due:
                    self._status_due = False
                    await self._publish_status(client, "online")
                    next_status = now + pub.status_interval_s
                oldest = self.spool.oldest_available_at_ns()
                # Enqueue times are wall-clock stamps: after a backward clock step the oldest looks
                # younger than zero; a step may make a batch leave early, never hold it back.
                waited_ns = None if oldest is None else time.time_ns() - oldest
                # Autocorking: a batch leaves when it is full, or when nothing is in flight (no
                # message waits for a collector's confirmation: a PUBACK is awaited right here) and
                # its oldest observation has lingered AUTOCORK_LINGER_S, or when that one has waited
                # flush_interval_s. Under load, what completes while one is in flight goes together.
                if (
                    available
                    and room > 0
                    and (
                        available >= pub.batch_max_observations
                        or (not self._unconfirmed and (waited_ns is None or waited_ns >= linger_ns))
                        or waited_ns is None
                        or waited_ns >= flush_ns
                        or waited_ns < 0
                    )
                ):
                    await self._publish_batch(client)
                    continue
                wait_s = min(next_status, next_health) - now
                if available and room > 0 and waited_ns is not None:
                    due_ns = linger_ns if not self._unconfirmed else flush_ns
                    wait_s = min(wait_s, max(0.0, (due_ns - waited_ns) / 1e9))
            if deadline is not None:
                wait_s = min(wait_s, deadline - now)
            # The spool's change flag is the one wake-up for every source (see _pump); it is cleared
            # here, after the checks above with no await between, so nothing set since is missed.
            await self.spool.wait_changed(grid_delay_s(max(0.0, wait_s)))

    async def _publish_batch(self, client: aiomqtt.Client) -> None:
        pub = self.cfg.publish
        n = min(self.spool.available(), pub.batch_max_observations, self._room())
        if n <= 0:
            return
        delay = self._bucket.reserve(n, asyncio.get_running_loop().time())
        if delay > 0:
            self.stats.replay_throttled_s += delay
            await asyncio.sleep(delay)
        entries = await self.spool.take(n)
        if not entries:
            return
        ident = self.cfg.agent
        base = Envelope(
            v=SCHEMA_VERSION,
            agent=ident.id,
            site=ident.site,
            sent_at_ns=time.time_ns(),
            labels=dict(ident.labels),
            observations=[],
        )
        limit = MAX_MESSAGE_BYTES - (BATCH_FIELD_BYTES if self.confirming else 0)
        messages: list[tuple[bytes, list[SpoolEntry], str | None]] = []
        done = 0
        for payload, count in encode_batches(base, [e.payload for e in entries], limit):
            part = entries[done : done + count]
            done += count
            batch = None
            if self.confirming:
                batch = self._new_batch_id()
                payload = encode(
                    RawEnvelope(
                        v=base.v,
                        agent=base.agent,
                        site=base.site,
                        sent_at_ns=base.sent_at_ns,
                        labels=base.labels,
                        observations=[msgspec.Raw(e.payload) for e in part],
                        batch=batch,
                    )
                )
            messages.append((payload, part, batch))
        sent = 0  # messages handed to the broker and acknowledged (PUBACK)
        registered: set[str] = set()
        loop = asyncio.get_running_loop()
        try:
            for payload, part, batch in messages:
                if batch is not None:
                    registered.add(batch)
                    # Registered before the publish: the confirmation may come before our PUBACK does.
                    self._unconfirmed[batch] = _Sent(part, loop.time())
                    self.stats.unconfirmed += len(part)
                self.stats.published_observations += len(part)
                await client.publish(self.obs_topic, payload, qos=1, timeout=pub.ack_timeout_s)
                sent += 1
                self.stats.published_messages += 1
                self.stats.broker_acknowledged += len(part)
                if batch is None:
                    self.spool.ack(part)
                    self.stats.acknowledged_observations += len(part)
        except BaseException:
            # What the broker did not acknowledge goes back, first in line (it may have arrived
            # anyway, PUBACK lost: delivered twice, which the collector's idempotent writes absorb).
            self.stats.publish_failures += 1
            rest: list[SpoolEntry] = []
            for _, part, batch in messages[sent:]:
                if batch is None or batch not in registered or self._forget(batch) is not None:
                    rest.extend(part)  # (a registered one: unless a collector confirmed it meanwhile)
            self.spool.release(rest)
            if self.on_release is not None:
                self.on_release(rest)
            raise
