"""The collector daemon: MQTT observations in, InfluxDB points out.

Two tasks share an in-memory buffer of line-protocol lines:

* the **consumer** keeps an MQTT session (persistent: ``clean_session=False``, so the broker queues
  QoS 1 messages while the collector is away), subscribes to ``<prefix>/v1/+/+/obs`` and turns
  every message into lines (:mod:`collector.decode`, :mod:`collector.lineproto`). Bad messages and
  bad observations are counted by reason and logged at most once per ``limits.log_interval_s`` per
  reason. On any :class:`aiomqtt.MqttError` it reconnects with capped exponential backoff
  (``broker.reconnect_min_s`` … ``broker.reconnect_max_s``).
* the **flusher** writes batches of up to ``influx.batch_max_lines`` when that many are buffered or
  every ``influx.flush_interval_s``. Retryable write errors (unreachable, timeout, 5xx, 429) are
  retried with capped backoff while the batch is kept; errors about the destination rather than the
  data (401, 403, 404) are retried the same way, so the collector recovers once it is fixed. When
  InfluxDB refuses the data (400, 413) the batch is bisected until the refused lines are alone; those
  are logged with InfluxDB's reason and counted (``dead_lettered``) and the rest is written.

The buffer is bounded (``limits.max_buffered_lines``): past it the oldest lines are dropped and
counted (``dropped``). A durable spool is future work; so is acknowledging MQTT messages only
after they are written (paho acknowledges QoS 1 messages on receipt).

On ``stop``: stop consuming, process what was already received, flush for at most
``limits.shutdown_flush_s``, disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from collector.config import CollectorConfig
from collector.decode import decode_message
from collector.influx import InfluxWriter, WriteError, make_writer
from collector.lineproto import encode_batch
from probes.kind import AnyKind

log = logging.getLogger("edgeprobe.collector")

MAX_LOGGED_LINE_CHARS = 300
INTERNAL_ERROR = "internal_error"  # a rejected-counter key: processing a message raised (a bug)


@dataclass
class CollectorStats:
    """Counters of one collector run; tests and the status output read them."""

    received_messages: int = 0  # MQTT messages, good or bad
    received_observations: int = 0  # observations in envelopes that decoded (good + rejected alone)
    accepted_observations: int = 0  # observations that became lines
    written_points: int = 0  # lines InfluxDB accepted
    rejected: Counter[str] = field(default_factory=Counter)  # by reason (collector.decode.REASONS)
    omitted: Counter[str] = field(default_factory=Counter)  # parts of points left out (lineproto OMIT_*)
    write_retries: int = 0  # failed write attempts that were retried
    dead_lettered: int = 0  # lines InfluxDB refused permanently (logged)
    dropped: int = 0  # lines dropped: buffer full, or not flushed within shutdown_flush_s
    connects: int = 0  # successful MQTT connect + subscribe
    buffered_lines: int = 0  # lines waiting to be written (gauge)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received_messages": self.received_messages,
            "received_observations": self.received_observations,
            "accepted_observations": self.accepted_observations,
            "written_points": self.written_points,
            "rejected": dict(self.rejected),
            "omitted": dict(self.omitted),
            "write_retries": self.write_retries,
            "dead_lettered": self.dead_lettered,
            "dropped": self.dropped,
            "connects": self.connects,
            "buffered_lines": self.buffered_lines,
        }


class RateLimitedLog:
    """At most one record per key per ``interval_s``; the next one says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> bool:
        """Whether a record for ``key`` may be emitted now (counts it as suppressed otherwise)."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] += 1
            return False
        self._last[key] = now
        return True

    def log(self, level: int, key: str, msg: str, *args: object, stacklevel: int = 2) -> bool:
        if not self.allow(key):
            return False
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d more like this suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args, stacklevel=stacklevel)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args, stacklevel=3)

    @property
    def suppressed(self) -> dict[str, int]:
        return dict(self._suppressed)


def _backoff(delay: float, maximum: float) -> float:
    return min(delay * 2, maximum)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class _Collector:
    def __init__(self, config: CollectorConfig, stats: CollectorStats, kinds: Mapping[str, AnyKind]) -> None:
        self.config = config
        self.stats = stats
        self.kinds = kinds
        self.rlog = RateLimitedLog(log, config.limits.log_interval_s)
        self.buffer: deque[str] = deque()
        self.pending: deque[list[str]] = deque()  # the batch being written, split by bisection
        self.pending_lines = 0
        self.wake = asyncio.Event()  # a full batch is waiting, or stopping
        self.stopping = asyncio.Event()

    # ---- consuming ----------------------------------------------------------------------

    def ingest(self, topic: str, payload: bytes) -> None:
        """Decode one message and buffer its lines. A bug here costs one message, not the collector."""
        try:
            self._ingest(topic, payload)
        except Exception:  # the boundary between one message and the long-running loop
            self.stats.rejected[INTERNAL_ERROR] += 1
            if self.rlog.allow(INTERNAL_ERROR):
                log.exception("internal error while processing a message on %r", topic[:200])

    def _ingest(self, topic: str, payload: bytes) -> None:
        stats, cfg = self.stats, self.config
        stats.received_messages += 1
        decoded = decode_message(
            topic,
            payload,
            prefix=cfg.broker.topic_prefix,
            max_bytes=cfg.limits.max_message_bytes,
            kinds=self.kinds,
        )
        stats.received_observations += decoded.total_observations
        for rej in decoded.rejects:
            stats.rejected[rej.reason] += 1
            what = "message" if rej.observation_id is None and rej.index is None else "observation"
            ident = f" {rej.observation_id}" if rej.observation_id else ""
            self.rlog.warning(
                f"reject:{rej.reason}",
                "rejected %s%s on %r (%s): %s",
                what,
                ident,
                topic[:200],
                rej.reason,
                rej.detail,
            )
        meta = decoded.meta
        if meta is None or not decoded.observations:
            return
        batch = encode_batch(
            decoded.observations, agent=meta.agent, site=meta.site, kinds=self.kinds, agent_labels=meta.labels
        )
        stats.accepted_observations += len(batch.lines)
        for reason, count in batch.omitted.items():
            stats.omitted[reason] += count
            self.rlog.warning(
                f"omit:{reason}",
                "left %d part(s) out of points from %s/%s: %s",
                count,
                meta.site,
                meta.agent,
                reason,
            )
        self._enqueue(batch.lines)

    def _enqueue(self, lines: list[str]) -> None:
        self.buffer.extend(lines)
        overflow = len(self.buffer) + self.pending_lines - self.config.limits.max_buffered_lines
        if overflow > 0:
            overflow = min(overflow, len(self.buffer))
            for _ in range(overflow):
                self.buffer.popleft()
            self.stats.dropped += overflow
            self.rlog.warning(
                "dropped",
                "buffer full (%d lines): dropped the %d oldest",
                self.config.limits.max_buffered_lines,
                overflow,
            )
        self._update_gauge()
        if len(self.buffer) >= self.config.influx.batch_max_lines:
            self.wake.set()

    def _update_gauge(self) -> None:
        self.stats.buffered_lines = len(self.buffer) + self.pending_lines

    async def consume(self, stop: asyncio.Event) -> None:
        """Hold the MQTT session until ``stop`` is set, reconnecting as needed."""
        broker = self.config.broker
        kwargs = broker.client_kwargs(self.config.default_client_id)
        delay = broker.reconnect_min_s
        while not stop.is_set():
            connected_at: float | None = None
            try:
                async with aiomqtt.Client(**kwargs, clean_session=False) as client:
                    granted = await client.subscribe(self.config.topic_filter, qos=self.config.subscription.qos)
                    _check_granted(granted, self.config.topic_filter, self.config.subscription.qos)
                    connected_at = time.monotonic()
                    self.stats.connects += 1
                    log.info(
                        "connected to %s as %s, subscribed to %s",
                        broker.url,
                        kwargs["identifier"],
                        self.config.topic_filter,
                    )
                    await self._pump(client, stop)
            except aiomqtt.MqttError as exc:
                if stop.is_set():
                    break
                if connected_at is not None and time.monotonic() - connected_at > broker.reconnect_max_s:
                    delay = broker.reconnect_min_s  # it had been up for a while: start over
                self.rlog.warning("mqtt", "MQTT broker %s: %s; reconnecting in %.1f s", broker.url, exc, delay)
                await _sleep_unless(stop, delay)
                delay = _backoff(delay, broker.reconnect_max_s)

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        async def read() -> None:
            async for message in client.messages:
                self.ingest(message.topic.value, _payload_bytes(message.payload))

        reader = asyncio.create_task(read())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        if reader.cancelled():
            # Stopping: what the client already received was acknowledged, so process it now.
            iterator = client.messages
            while len(iterator) > 0:
                message = await anext(iterator)
                self.ingest(message.topic.value, _payload_bytes(message.payload))
        else:
            reader.result()  # raises the MqttError that ended the iteration

    # ---- flushing -----------------------------------------------------------------------

    async def flush_loop(self, writer: InfluxWriter) -> None:
        """Write batches until stopping and everything is written. Never raises WriteError."""
        influx = self.config.influx
        prepared = False
        delay = influx.retry_min_s
        while True:
            if not self.pending:
                if len(self.buffer) < influx.batch_max_lines and not self.stopping.is_set():
                    self.wake.clear()
                    await _sleep_unless(self.wake, influx.flush_interval_s)
                if not self.buffer:
                    if self.stopping.is_set():
                        return
                    continue
                count = min(influx.batch_max_lines, len(self.buffer))
                self.pending.append([self.buffer.popleft() for _ in range(count)])
                self.pending_lines = count
            chunk = self.pending[0]
            try:
                if not prepared:
                    await self._prepare(writer)
                    prepared = True
                await writer.write(chunk)
            except WriteError as err:
                if err.data_error:
                    self.pending.popleft()
                    if len(chunk) == 1:
                        self._dead_letter(chunk[0], err)
                    else:
                        mid = len(chunk) // 2
                        self.pending.appendleft(chunk[mid:])
                        self.pending.appendleft(chunk[:mid])
                    continue
                self.stats.write_retries += 1
                if err.status == 404:
                    prepared = False  # e.g. the database was dropped: create it again first
                self.rlog.warning(
                    "write", "writing %d lines failed: %s; retrying in %.1f s", len(chunk), err.message, delay
                )
                await asyncio.sleep(delay)
                delay = _backoff(delay, influx.retry_max_s)
                continue
            self.pending.popleft()
            self.pending_lines -= len(chunk)
            self.stats.written_points += len(chunk)
            self._update_gauge()
            delay = influx.retry_min_s

    async def _prepare(self, writer: InfluxWriter) -> None:
        try:
            await writer.prepare()
        except WriteError as err:
            if err.retryable:
                raise
            # e.g. no admin rights for CREATE DATABASE, or a server without it: try writing anyway.
            log.warning("could not prepare the InfluxDB destination (%s); writing anyway", err.message)

    def _dead_letter(self, line: str, err: WriteError) -> None:
        self.pending_lines -= 1
        self.stats.dead_lettered += 1
        self._update_gauge()
        shown = line if len(line) <= MAX_LOGGED_LINE_CHARS else line[: MAX_LOGGED_LINE_CHARS - 1] + "…"
        self.rlog.warning("dead_letter", "InfluxDB refused a point (%s): %s", err.message, shown)

    def drop_unwritten(self) -> int:
        lost = len(self.buffer) + sum(len(c) for c in self.pending)
        self.buffer.clear()
        self.pending.clear()
        self.pending_lines = 0
        self.stats.dropped += lost
        self._update_gauge()
        return lost


def _check_granted(granted: Sequence[Any], topic: str, qos: int) -> None:
    """Raise MqttError when the broker refused the subscription (SUBACK 0x80 or a v5 failure code)."""
    for code in granted:
        value = int(getattr(code, "value", code))
        if getattr(code, "is_failure", value >= 0x80):
            raise aiomqtt.MqttError(f"the broker refused the subscription to {topic!r} ({code})")
        if value < qos:
            log.warning("the broker granted QoS %d for %r instead of %d", value, topic, qos)


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


async def run_collector(
    config: CollectorConfig,
    *,
    stop: asyncio.Event | None = None,
    stats: CollectorStats | None = None,
    kinds: Mapping[str, AnyKind] | None = None,
) -> CollectorStats:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None); returns the counters.

    Cancelling the task stops at once, without the final flush. ``kinds`` defaults to
    :data:`probes.registry.KINDS`.
    """
    if kinds is None:
        from probes.registry import KINDS

        kinds = KINDS
    own_signals = stop is None
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        return await _run(config, stop, stats if stats is not None else CollectorStats(), kinds)
    finally:
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _run(
    config: CollectorConfig, stop: asyncio.Event, stats: CollectorStats, kinds: Mapping[str, AnyKind]
) -> CollectorStats:
    col = _Collector(config, stats, kinds)
    log.info(
        "collector %s: MQTT %s → InfluxDB %s (api %s)",
        config.name,
        config.broker.url,
        config.influx.url,
        config.influx.api,
    )
    async with make_writer(config.influx) as writer:
        consumer = asyncio.create_task(col.consume(stop), name="collector-consume")
        flusher = asyncio.create_task(col.flush_loop(writer), name="collector-flush")
        try:
            await asyncio.wait({consumer, flusher}, return_when=asyncio.FIRST_COMPLETED)
            if flusher.done():  # only on a bug: surface it
                consumer.cancel()
                flusher.result()
            col.stopping.set()
            col.wake.set()
            await asyncio.wait({flusher}, timeout=config.limits.shutdown_flush_s)
            if not flusher.done():
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                lost = col.drop_unwritten()
                log.error(
                    "stopping: %d lines not written within %.1f s, dropped",
                    lost,
                    config.limits.shutdown_flush_s,
                )
            consumer.result()
        finally:
            for task in (consumer, flusher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(consumer, flusher, return_exceptions=True)
    log.info("collector %s stopped: %s", config.name, stats.as_dict())
    return stats
