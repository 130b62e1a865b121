"""Publishing observations to the broker: batches at QoS 1, retained presence, reconnect loop.

The connection is an async context manager (aiomqtt); this module owns the reconnect loop.
A batch leaves the outbox only when the broker has acknowledged it (PUBACK); a failed or
interrupted publish puts it back at the front, so a reconnect re-sends it (at least once; the
collector's writes are idempotent by timestamp and tags).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import aiomqtt

from agent.config import AgentConfig
from agent.outbox import Outbox
from probes.schema import (
    SCHEMA_VERSION,
    Envelope,
    Observation,
    Status,
    encode,
    obs_topic,
    status_topic,
)

log = logging.getLogger("edgeprobe.agent.publisher")

VERSION = "0.1.0"
MAX_MESSAGE_BYTES = 512 * 1024  # a batch is split below this (collectors accept 1 MiB by default)


@dataclass
class PublisherStats:
    published_observations: int = 0
    published_messages: int = 0
    publish_failures: int = 0
    connects: int = 0
    connected: bool = False


def backoff_s(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter in its upper half (pure given ``rng``)."""
    cap = min(max_s, min_s * 2.0 ** min(attempt, 30))
    return cap / 2 + rng.random() * cap / 2


def encode_batches(envelope_base: Envelope, observations: list[Observation], max_bytes: int) -> list[bytes]:
    """Encode observations into one or more envelopes, each under ``max_bytes`` (pure)."""
    env = Envelope(
        v=envelope_base.v,
        agent=envelope_base.agent,
        site=envelope_base.site,
        sent_at_ns=envelope_base.sent_at_ns,
        labels=envelope_base.labels,
        observations=observations,
    )
    payload = encode(env)
    if len(payload) <= max_bytes or len(observations) == 1:
        return [payload]
    half = len(observations) // 2
    return encode_batches(envelope_base, observations[:half], max_bytes) + encode_batches(
        envelope_base, observations[half:], max_bytes
    )


class Publisher:
    def __init__(self, cfg: AgentConfig, outbox: Outbox, kinds: list[str]) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.kinds = kinds
        self.stats = PublisherStats()
        ident = cfg.agent
        prefix = cfg.broker.topic_prefix
        self.obs_topic = obs_topic(prefix, ident.site, ident.id)
        self.status_topic = status_topic(prefix, ident.site, ident.id)
        self._rng = random.Random()

    def status(self, state: str) -> Status:
        ident = self.cfg.agent
        return Status(
            v=SCHEMA_VERSION,
            agent=ident.id,
            site=ident.site,
            state=state,
            at_ns=time.time_ns(),
            version=VERSION,
            kinds=self.kinds,
            labels=dict(ident.labels),
            latitude=ident.latitude,
            longitude=ident.longitude,
            queued=len(self.outbox),
            dropped=self.outbox.dropped,
            published=self.stats.published_observations,
        )

    def _client(self) -> aiomqtt.Client:
        will = aiomqtt.Will(self.status_topic, encode(self.status("offline")), qos=1, retain=True)
        return aiomqtt.Client(
            **self.cfg.broker.client_kwargs(f"edgeprobe-agent-{self.cfg.agent.id}"),
            will=will,
            clean_session=True,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set and the outbox is flushed (or the flush timeout ends)."""
        attempt = 0
        broker = self.cfg.broker
        while True:
            try:
                async with self._client() as client:
                    self.stats.connects += 1
                    self.stats.connected = True
                    if attempt:
                        log.info("connected to broker %s after %d failed attempt(s)", broker.url, attempt)
                    else:
                        log.info("connected to broker %s", broker.url)
                    attempt = 0
                    await client.publish(self.status_topic, encode(self.status("online")), qos=1, retain=True)
                    await self._pump(client, stop)
                    await client.publish(
                        self.status_topic, encode(self.status("offline")), qos=1, retain=True
                    )
                    self.stats.connected = False
                    return
            except aiomqtt.MqttError as err:
                self.stats.connected = False
                if stop.is_set():
                    log.warning(
                        "stopping without broker (%s): %d observation(s) not delivered", err, len(self.outbox)
                    )
                    return
                delay = backoff_s(attempt, broker.reconnect_min_s, broker.reconnect_max_s, self._rng)
                attempt += 1
                log.warning(
                    "broker %s unreachable or lost (%s); retrying in %.1f s (%d queued, %d dropped so far)",
                    broker.url,
                    err,
                    delay,
                    len(self.outbox),
                    self.outbox.dropped,
                )
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                if stop.is_set() and not len(self.outbox):
                    return
                if stop.is_set():
                    # One last attempt to flush what is queued, bounded by the flush timeout.
                    try:
                        async with asyncio.timeout(self.cfg.publish.flush_timeout_s):
                            async with self._client() as client:
                                await self._pump(client, stop)
                                await client.publish(
                                    self.status_topic, encode(self.status("offline")), qos=1, retain=True
                                )
                    except (aiomqtt.MqttError, TimeoutError) as last:
                        log.warning(
                            "gave up flushing at shutdown (%s): %d not delivered", last, len(self.outbox)
                        )
                    return

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        pub = self.cfg.publish
        loop = asyncio.get_running_loop()
        next_status = loop.time() + pub.status_interval_s
        flush_deadline: float | None = None
        while True:
            if stop.is_set():
                flush_deadline = flush_deadline or loop.time() + pub.flush_timeout_s
                if not len(self.outbox) or loop.time() >= flush_deadline:
                    if len(self.outbox):
                        log.warning(
                            "flush timeout at shutdown: %d observation(s) not delivered", len(self.outbox)
                        )
                    return
                await self._publish_batch(client)
                continue
            now = loop.time()
            if now >= next_status:
                await client.publish(self.status_topic, encode(self.status("online")), qos=1, retain=True)
                next_status = now + pub.status_interval_s
            oldest = self.outbox.oldest_enqueued_at()
            if oldest is not None and (
                len(self.outbox) >= pub.batch_max_observations or now - oldest >= pub.flush_interval_s
            ):
                await self._publish_batch(client)
                continue
            wait_s = next_status - now
            if oldest is not None:
                wait_s = min(wait_s, oldest + pub.flush_interval_s - now)
            stop_wait = asyncio.ensure_future(stop.wait())
            changed = asyncio.ensure_future(self.outbox.wait_changed(max(0.0, wait_s)))
            try:
                await asyncio.wait({stop_wait, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
                changed.cancel()

    async def _publish_batch(self, client: aiomqtt.Client) -> None:
        batch = self.outbox.take(self.cfg.publish.batch_max_observations)
        if not batch:
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
        observations = [obs for _, obs in batch]
        try:
            for payload in encode_batches(base, observations, MAX_MESSAGE_BYTES):
                await client.publish(self.obs_topic, payload, qos=1)
                self.stats.published_messages += 1
        except BaseException:
            # Not acknowledged as a whole: all of it goes back (a part may be delivered twice,
            # which the collector's idempotent writes absorb).
            self.stats.publish_failures += 1
            self.outbox.put_back(batch)
            raise
        self.stats.published_observations += len(observations)
