"""The collector daemon: MQTT observations in, InfluxDB points out, nothing acknowledged early.

Delivery guarantee: **a message is acknowledged to the broker only after the points made from
it are committed to the collector's durable spool** (:mod:`edgeprobe.collector.spool`, SQLite WAL), and a
point leaves the spool only after InfluxDB accepted it, or refused it for good and it was
written to the dead-letter file. paho (under aiomqtt 2.x) would acknowledge QoS 1 messages as
soon as they arrive; the collector turns that off (paho's ``manual_ack``) and sends each PUBACK
itself. Acknowledging after the spool commit rather than after the InfluxDB write keeps the
broker's in-flight window (mosquitto ``max_inflight_messages``, 20 by default) moving while a
batch is being written or InfluxDB is down, and it is the same path in both cases.

Three tasks:

* the **consumer** keeps an MQTT session (persistent: ``clean_session=False``, so the broker
  queues QoS 1 messages while the collector is away, and re-sends the unacknowledged ones after
  a reconnect), subscribed to ``<prefix>/v1/+/+/obs`` and ``<prefix>/v1/+/+/health``. It takes
  the messages that have arrived as a group, turns each into lines (:mod:`edgeprobe.collector.decode`,
  :mod:`edgeprobe.collector.lineproto`), commits all the group's lines to the spool in one transaction,
  then confirms to each agent the ids (``batch``) of its messages now stored (one
  :class:`edgeprobe.schema.DeliveryAck` per agent on ``<prefix>/v1/<site>/<agent>/ack``, QoS 1, not
  retained: the agent keeps an observation until this arrives, so a broker that loses what it
  queued loses nothing), then acknowledges the group's messages to the broker in arrival order.
  Rejected messages are acknowledged and confirmed too (they are counted by reason and logged at
  most once per ``limits.log_interval_s`` per reason; re-sending them would not help).
  When the spool can't be written the session is dropped without acknowledging, and the
  broker re-sends after the reconnect. When the spool
  holds ``spool.max_bytes`` the consumer waits (the broker keeps the rest) until it drains.
  On any :class:`aiomqtt.MqttError` it reconnects with capped exponential backoff
  (:func:`edgeprobe.mqtt.run_session`).
* the **flusher** writes the oldest spooled lines in batches of up to ``influx.batch_max_lines``
  when that many are waiting or every ``influx.flush_interval_s``, then deletes them from the
  spool. Retryable write errors (unreachable, timeout, 5xx, 429) are retried with capped
  exponential backoff and jitter while the batch stays; errors about the destination rather
  than the data (401, 403, 404) are retried the same way, so the collector recovers once it is
  fixed. A batch that timed out is retried in halves, so one too large for ``influx.timeout_s``
  can't time out forever. When InfluxDB refuses the data (400, 413, 422) the batch is bisected until the refused lines
  are alone; those go to the dead-letter file with InfluxDB's reason and the rest is written.
  A refusal that names **field type conflicts** is remembered (:class:`edgeprobe.collector.conflicts.ConflictMemory`,
  bounded, each conflict forgotten after ``influx.conflict_recheck_s``): the lines of the batch that
  meet one, and of every later batch, go to the dead-letter file without being written (one fsync for
  all of a batch's), and the rest of the batch is written whole. So a sustained stream of such lines
  costs about one refused write per conflict per ``conflict_recheck_s``, not one write per line.
* the **health** task adds the collector's own ``edgeprobe_health`` point to the spool every
  ``health_interval_s`` (see :func:`health_fields`).

The three run under one :class:`edgeprobe.supervise.Supervisor` (``supervise`` in the config): a
task that crashes is logged with its traceback and restarted after a backoff, counted as
``task_restarts``; one that crashes more than ``supervise.max_restarts`` times within
``supervise.window_s`` ends the collector with :class:`edgeprobe.supervise.TaskFailedError` (the
process exits non-zero for its service manager to restart it).

Writes are idempotent by design: a point's key is its measurement, tags and timestamp (the
probe's start), so a message re-sent by the broker, or a batch written again after a crash
between the write and the spool delete, overwrites itself.

On ``stop``: stop taking messages, take and acknowledge what already arrived, add a last health
point, flush for at most ``limits.shutdown_flush_s``; what is left stays in the spool for the
next start, which drains it first.

On SIGHUP (``run_collector``'s ``reload``): the file is read and validated again; ``limits.*``,
``log.*`` and ``health_interval_s`` apply at once (:meth:`_Collector.reload`), any other change is
refused with one line naming the key(s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import aiomqtt

from edgeprobe.backoff import Backoff
from edgeprobe.collector.config import RELOADABLE_KEYS, CollectorConfig, collector_client_id
from edgeprobe.collector.conflicts import ConflictMemory, line_conflict
from edgeprobe.collector.decode import REASONS, EnvelopeMeta, decode_health
from edgeprobe.collector.influx import InfluxWriter, WriteError, make_writer
from edgeprobe.collector.ingest import ObsResult, process_chunk, process_obs, split, start_pool, worker_count
from edgeprobe.collector.lineproto import HEALTH_MEASUREMENT, encode_point
from edgeprobe.collector.spool import REASON_FIELD_TYPE_CONFLICT, DeadLetter, DeadLetters, Spool, SpoolError
from edgeprobe.configfile import ConfigError, changed_keys, describe_changes, needs_restart
from edgeprobe.mqtt import SESSION_LOST, TAKEOVER_SUSPECTED, ack, run_session
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.stats import percentile
from edgeprobe.schema import MAX_ACK_BATCHES, SCHEMA_VERSION, DeliveryAck, ack_topic, encode, parse_agent_topic
from edgeprobe.supervise import Supervisor

log = logging.getLogger("edgeprobe.collector")

P = ParamSpec("P")
T = TypeVar("T")

MAX_LOGGED_LINE_CHARS = 300
INTERNAL_ERROR = "internal_error"  # a rejected-counter key: processing a message raised (a bug)
MAX_GROUP_MESSAGES = 1000  # messages taken (and committed) together at most
CONFIRM_TIMEOUT_S = 10.0  # a confirmation (…/ack) the broker has not acknowledged by then ends the session
RECENT_WRITES = 1024  # write latencies and batch sizes kept for one health point at most
# A write waits until its oldest line is this old (or the batch is full): at a few hundred messages
# a second that is ~20 writes a second instead of one per message, for 50 ms of added delay.
WRITE_LINGER_S = 0.05
# Groups carrying less than this much payload are decoded in the consumer: handing them to a
# worker process would cost more than the work.
INLINE_MAX_BYTES = 16 * 1024


@dataclass
class CollectorStats:
    """Counters and gauges of one collector run; tests, logs and the health point read them."""

    started_at_ns: int = field(default_factory=time.time_ns)
    received_messages: int = 0  # MQTT messages, good or bad
    received_observations: int = 0  # observations in envelopes that decoded (good + rejected alone)
    accepted_observations: int = 0  # observations that became lines (and were spooled)
    received_health: int = 0  # agent health messages that became points
    acknowledged_messages: int = 0  # messages acknowledged after their spool commit
    spooled_lines: int = 0  # lines committed to the spool (observations, agent and own health)
    written_points: int = 0  # lines InfluxDB accepted
    writes: int = 0  # successful write requests
    rejected: Counter[str] = field(default_factory=Counter)  # by reason (edgeprobe.collector.decode.REASONS)
    omitted: Counter[str] = field(default_factory=Counter)  # parts of points left out (lineproto OMIT_*)
    write_retries: int = 0  # failed write attempts that were retried
    dead_lettered: int = 0  # lines InfluxDB refused permanently (in the dead-letter file)
    refused_writes: int = 0  # write requests InfluxDB refused for their data (400, 413, 422)
    conflict_dead_lettered: int = 0  # of dead_lettered: set aside for a remembered field type conflict, unwritten
    field_conflicts: int = 0  # field type conflicts remembered now (gauge)
    spool_errors: int = 0  # failed spool commits/reads/deletes and dead-letter writes
    backpressure_s: float = 0.0  # seconds the consumer waited because the spool was full
    connects: int = 0  # successful MQTT connect + subscribe
    connected: bool = False  # holding an MQTT session now (gauge)
    spool_lines: int = 0  # lines waiting in the spool (gauge)
    spool_bytes: int = 0  # their size (gauge)
    spool_oldest_at_ns: int | None = None  # when the oldest waiting line was received (gauge)
    spool_durable: bool = True  # False: spool.path is null (in memory)
    task_restarts: int = 0  # crashed tasks (consumer, flusher, health) restarted (edgeprobe.supervise)
    confirmed_batches: int = 0  # agents' messages confirmed as stored (their batch ids, on …/ack)
    confirmations_sent: int = 0  # …/ack messages published (one per agent per group)
    unconfirmable_messages: int = 0  # messages with a malformed batch id (stored, never confirmed)
    sessions_lost: int = 0  # reconnects that found no persistent session at the broker (queued messages lost)
    takeovers_suspected: int = 0  # streaks of connections lost right after connecting (client id in use)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received_messages": self.received_messages,
            "received_observations": self.received_observations,
            "accepted_observations": self.accepted_observations,
            "received_health": self.received_health,
            "acknowledged_messages": self.acknowledged_messages,
            "written_points": self.written_points,
            "rejected": dict(self.rejected),
            "omitted": dict(self.omitted),
            "write_retries": self.write_retries,
            "dead_lettered": self.dead_lettered,
            "sessions_lost": self.sessions_lost,
            "takeovers_suspected": self.takeovers_suspected,
            "refused_writes": self.refused_writes,
            "conflict_dead_lettered": self.conflict_dead_lettered,
            "field_conflicts": self.field_conflicts,
            "spool_errors": self.spool_errors,
            "connects": self.connects,
            "spool_lines": self.spool_lines,
            "task_restarts": self.task_restarts,
            "confirmed_batches": self.confirmed_batches,
            "unconfirmable_messages": self.unconfirmable_messages,
        }


def health_fields(
    stats: CollectorStats,
    latencies_ms: Sequence[float],
    batch_lines: Sequence[int],
    now_ns: int,
    uptime_s: float,
) -> dict[str, Any]:
    """The fields of the collector's ``edgeprobe_health`` point (pure).

    Counters are cumulative since the process started (``started_at_ns``); ``latencies_ms`` and
    ``batch_lines`` are the successful writes since the previous health point. Percentiles and
    batch figures are absent (not 0) when there was no write.
    """
    fields: dict[str, Any] = {
        "started_at_ns": stats.started_at_ns,
        "uptime_s": float(uptime_s),
        "received_messages": stats.received_messages,
        "received_observations": stats.received_observations,
        "accepted_observations": stats.accepted_observations,
        "received_health": stats.received_health,
        "acknowledged_messages": stats.acknowledged_messages,
        "spooled_lines": stats.spooled_lines,
        "written_points": stats.written_points,
        "writes": stats.writes,
        "write_retries": stats.write_retries,
        "dead_lettered": stats.dead_lettered,
        "refused_writes": stats.refused_writes,
        "conflict_dead_lettered": stats.conflict_dead_lettered,
        "field_conflicts": stats.field_conflicts,
        "rejected": sum(stats.rejected.values()),
        "omitted": sum(stats.omitted.values()),
        "spool_errors": stats.spool_errors,
        "backpressure_s": float(stats.backpressure_s),
        "connects": stats.connects,
        "connected": stats.connected,
        "spool_depth": stats.spool_lines,
        "spool_bytes": stats.spool_bytes,
        "spool_durable": stats.spool_durable,
        "task_restarts": stats.task_restarts,
        "confirmed_batches": stats.confirmed_batches,
        "confirmations_sent": stats.confirmations_sent,
        "unconfirmable_messages": stats.unconfirmable_messages,
    }
    for reason in (*REASONS, INTERNAL_ERROR):
        fields[f"rejected_{reason}"] = stats.rejected.get(reason, 0)
    # An empty spool has no backlog: its delay is 0, not unknown.
    fields["spool_oldest_age_s"] = (
        max(0.0, (now_ns - stats.spool_oldest_at_ns) / 1e9) if stats.spool_oldest_at_ns is not None else 0.0
    )
    if latencies_ms:
        ordered = sorted(latencies_ms)
        fields["write_latency_p50_ms"] = percentile(ordered, 50)
        fields["write_latency_p95_ms"] = percentile(ordered, 95)
        fields["write_latency_max_ms"] = float(ordered[-1])
    if batch_lines:
        fields["batch_lines_mean"] = sum(batch_lines) / len(batch_lines)
        fields["batch_lines_max"] = max(batch_lines)
        fields["batches"] = len(batch_lines)
    return fields


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


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class _Collector:
    def __init__(
        self,
        config: CollectorConfig,
        stats: CollectorStats,
        kinds: Mapping[str, AnyKind],
        spool: Spool,
        dead_letters: DeadLetters,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.stats = stats
        self.kinds = kinds
        self.spool = spool
        self.dead_letters = dead_letters
        self.executor = executor
        self.rlog = RateLimitedLog(log, config.limits.log_interval_s)
        self.reconfigured = asyncio.Event()  # set (and replaced) by each applied reload
        # The batch being written, split by bisection: (rows, seq through which the spool may be
        # cleared once these rows are written or dead-lettered).
        self.pending: deque[tuple[list[tuple[int, str]], int]] = deque()
        influx = config.influx
        self.conflicts = ConflictMemory(influx.conflict_memory_max, influx.conflict_recheck_s)
        self.wake = asyncio.Event()  # a full batch is waiting, or stopping
        self.drained = asyncio.Event()  # the flusher removed lines from the spool
        self.stopping = asyncio.Event()
        self.latencies_ms: deque[float] = deque(maxlen=RECENT_WRITES)
        self.batch_lines: deque[int] = deque(maxlen=RECENT_WRITES)
        self.started_monotonic = time.monotonic()
        self.last_write_monotonic: float | None = None  # the last successful write to InfluxDB
        self.on_ready: Callable[[], None] | None = None  # called once, at the first subscription
        self.supervisor: Supervisor | None = None  # restarts crashed tasks; counted in the health point
        self._to_confirm: dict[tuple[str, str], list[str]] = {}  # (site, agent) -> batch ids of this group
        self.pool: ProcessPoolExecutor | None = None  # decode + encode workers (edgeprobe.collector.ingest)
        self.workers = 0
        spool.row_lines = min(spool.row_lines, config.influx.batch_max_lines)  # a batch holds whole rows
        stats.spool_durable = spool.durable
        self._update_gauges()

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a spool call on the spool's single worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def _update_gauges(self) -> None:
        state = self.spool.state()
        self.stats.spool_lines = state.depth
        self.stats.spool_bytes = state.bytes
        self.stats.spool_oldest_at_ns = state.oldest_received_at_ns

    # ---- turning messages into lines (no I/O) -----------------------------------------------

    def process(self, topic: str, payload: bytes) -> list[str]:
        """The lines one message makes (maybe none). A bug here costs one message, not the collector."""
        self.stats.received_messages += 1
        try:
            names = parse_agent_topic(self.config.broker.topic_prefix, topic)
            if names is not None and names[2] == "health":
                return self._process_health(topic, payload)
            return self._process_obs(topic, payload)
        except Exception:  # the boundary between one message and the long-running loop
            self.stats.rejected[INTERNAL_ERROR] += 1
            if self.rlog.allow(INTERNAL_ERROR):
                log.exception("internal error while processing a message on %r", topic[:200])
            return []

    def _reject(self, topic: str, reason: str, detail: str, what: str, ident: str = "") -> None:
        self.stats.rejected[reason] += 1
        self.rlog.warning(f"reject:{reason}", "rejected %s%s on %r (%s): %s", what, ident, topic[:200], reason, detail)

    def _omitted(self, omitted: Mapping[str, int], site: str, agent: str) -> None:
        for reason, count in omitted.items():
            self.stats.omitted[reason] += count
            self.rlog.warning(
                f"omit:{reason}", "left %d part(s) out of points from %s/%s: %s", count, site, agent, reason
            )

    def _process_obs(self, topic: str, payload: bytes) -> list[str]:
        cfg = self.config
        result = process_obs(
            topic, payload, prefix=cfg.broker.topic_prefix, max_bytes=cfg.limits.max_message_bytes, kinds=self.kinds
        )
        return self._apply_obs(topic, result)

    def _apply_obs(self, topic: str, result: ObsResult) -> list[str]:
        """Count, log and note (batch id) what one observation message made; its lines."""
        stats = self.stats
        if result.error is not None:  # raised in a worker process (a bug): as process() does inline
            stats.rejected[INTERNAL_ERROR] += 1
            if self.rlog.allow(INTERNAL_ERROR):
                log.error("internal error while processing a message on %r:\n%s", topic[:200], result.error)
            return []
        stats.received_observations += result.total_observations
        for rej in result.rejects:
            what = "message" if rej.observation_id is None and rej.index is None else "observation"
            self._reject(topic, rej.reason, rej.detail, what, f" {rej.observation_id}" if rej.observation_id else "")
        meta = result.meta
        if meta is not None:
            self._note_batch(meta)
        if meta is None or not result.lines:
            return []
        stats.accepted_observations += len(result.lines)
        self._omitted(result.omitted, meta.site, meta.agent)
        return result.lines

    async def _lines_of(self, messages: Sequence[aiomqtt.Message]) -> list[str]:
        """The lines a group of messages makes, in arrival order; observation messages are decoded
        and encoded by the worker processes when there are any (the event loop stays free for the
        flusher and the broker meanwhile), health messages here."""
        items = [(m.topic.value, _payload_bytes(m.payload)) for m in messages]
        pool = self.pool
        health = self._is_health
        obs = [item for item in items if not health(item[0])]
        if pool is None or not obs or sum(len(payload) for _, payload in obs) < INLINE_MAX_BYTES:
            return [line for topic, payload in items for line in self.process(topic, payload)]
        cfg = self.config
        loop = asyncio.get_running_loop()
        parts = split(obs, self.workers)
        done = await asyncio.gather(
            *(
                loop.run_in_executor(pool, process_chunk, part, cfg.broker.topic_prefix, cfg.limits.max_message_bytes)
                for part in parts
            )
        )
        results = iter([r for part in done for r in part])
        lines: list[str] = []
        for topic, payload in items:
            if health(topic):
                lines.extend(self.process(topic, payload))
            else:
                self.stats.received_messages += 1
                lines.extend(self._apply_obs(topic, next(results)))
        return lines

    def _is_health(self, topic: str) -> bool:
        names = parse_agent_topic(self.config.broker.topic_prefix, topic)
        return names is not None and names[2] == "health"

    def _process_health(self, topic: str, payload: bytes) -> list[str]:
        cfg = self.config
        health = decode_health(topic, payload, prefix=cfg.broker.topic_prefix, max_bytes=cfg.limits.max_message_bytes)
        if health.reject is not None:
            self._reject(topic, health.reject.reason, health.reject.detail, "health message")
            return []
        assert health.agent is not None and health.site is not None
        enc = encode_point(
            HEALTH_MEASUREMENT,
            tags={"agent": health.agent, "site": health.site, "source": health.source},
            fields=health.fields,
            timestamp_ns=health.at_ns,
            labels=health.labels,
        )
        if enc is None:
            return []
        self.stats.received_health += 1
        self._omitted(Counter(enc.omitted), health.site, health.agent)
        return [enc.line]

    # ---- the spool -----------------------------------------------------------------------

    async def spool_append(self, lines: Sequence[str]) -> None:
        """Commit lines to the spool (raises SpoolError); wakes the flusher on a full batch."""
        try:
            await self._db(self.spool.append, list(lines))
        except SpoolError:
            self.stats.spool_errors += 1
            raise
        self.stats.spooled_lines += len(lines)
        self._update_gauges()
        self.wake.set()  # the flusher writes at once when no write is in flight (autocorking)

    def spool_full(self) -> bool:
        return self.spool.bytes >= self.config.spool.max_bytes

    async def wait_for_room(self, stop: asyncio.Event) -> bool:
        """Wait while the spool is full; False when ``stop`` was set meanwhile."""
        if not self.spool_full():
            return True
        t0 = time.monotonic()
        self.rlog.warning(
            "spool_full",
            "spool full (%d bytes >= spool.max_bytes %d): not taking messages until InfluxDB drains it",
            self.spool.bytes,
            self.config.spool.max_bytes,
        )
        try:
            while self.spool_full():
                if stop.is_set():
                    return False
                self.drained.clear()
                await _sleep_unless(self.drained, 1.0)
            return not stop.is_set()
        finally:
            self.stats.backpressure_s += time.monotonic() - t0

    # ---- consuming ----------------------------------------------------------------------

    def _note_batch(self, meta: EnvelopeMeta) -> None:
        """Remember an envelope's batch id, to confirm to its agent once the group is committed."""
        if meta.bad_batch:
            self.stats.unconfirmable_messages += 1
            self.rlog.warning(
                "bad_batch",
                "a message from %s/%s has a malformed batch id: stored, but it can't be confirmed",
                meta.site,
                meta.agent,
            )
        elif meta.batch is not None:
            self._to_confirm.setdefault((meta.site, meta.agent), []).append(meta.batch)

    async def take(self, client: aiomqtt.Client, messages: Sequence[aiomqtt.Message]) -> None:
        """Spool a group of messages in one commit, confirm them to their agents (``…/ack``), then
        acknowledge them to the broker in arrival order."""
        self._to_confirm = {}
        lines = await self._lines_of(messages)
        if lines:
            await self.spool_append(lines)
        confirm, self._to_confirm = self._to_confirm, {}
        if confirm:
            await self.confirm(client, confirm)
        for message in messages:
            ack(client, message)
        self.stats.acknowledged_messages += len(messages)

    async def confirm(self, client: aiomqtt.Client, batches: Mapping[tuple[str, str], list[str]]) -> None:
        """Tell each agent which of its messages are now durably stored: one :class:`DeliveryAck`
        per agent (QoS 1, not retained) on its own ``…/ack`` topic. Only after the spool commit;
        an MqttError here ends the session before the PUBACKs, so the broker re-sends the group and
        the confirmations go again."""
        prefix = self.config.broker.topic_prefix
        sends = []
        for (site, agent), ids in batches.items():
            for i in range(0, len(ids), MAX_ACK_BATCHES):
                chunk = ids[i : i + MAX_ACK_BATCHES]
                payload = encode(
                    DeliveryAck(
                        v=SCHEMA_VERSION,
                        agent=agent,
                        site=site,
                        collector=self.config.name,
                        at_ns=time.time_ns(),
                        batches=chunk,
                    )
                )
                sends.append(client.publish(ack_topic(prefix, site, agent), payload, qos=1, timeout=CONFIRM_TIMEOUT_S))
        await asyncio.gather(*sends)
        self.stats.confirmations_sent += len(sends)
        self.stats.confirmed_batches += sum(len(ids) for ids in batches.values())

    async def consume(self, stop: asyncio.Event) -> None:
        """Hold the MQTT session until ``stop`` is set, reconnecting as needed."""

        async def session(client: aiomqtt.Client) -> None:
            await self._session(client, stop)

        client_id, expect_session = collector_client_id(self.config)
        if client_id == self.config.default_client_id:
            log.warning(
                "MQTT client id %s is predictable (spool.path is null, no broker.client_id): another login "
                "could take this collector's persistent session over",
                client_id,
            )
        # Worker processes decode and encode (registry kinds only: a test's own kinds stay inline).
        self.workers = worker_count(self.config.workers) if self.kinds is _registry_kinds() else 0
        if self.workers:
            # Started from the event loop's thread (it blocks for the workers' imports, once): the
            # workers end with the thread that spawned them, and this one lives as long as the process.
            self.pool = start_pool(self.workers)
        try:
            await self._run_session(client_id, expect_session, session, stop)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None

    async def _run_session(
        self,
        client_id: str,
        expect_session: bool,
        session: Callable[[aiomqtt.Client], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        broker = self.config.broker
        await run_session(
            broker,
            client_id,
            session,
            stop=stop,
            name=f"MQTT broker {broker.url}",
            log=log,
            clean_session=False,  # persistent: the broker queues QoS 1 messages while we are away
            manual_ack=True,  # acknowledged after the spool commit (take)
            retry_on=(aiomqtt.MqttError, SpoolError),  # a failed commit drops the session unacknowledged
            report=self._report_retry,
            on_session_event=self._session_event,
            expect_session=expect_session,
        )

    def _session_event(self, event: str, line: str) -> None:
        """A lost persistent session or a suspected client-id takeover: counted, logged as an error."""
        if event == SESSION_LOST:
            self.stats.sessions_lost += 1
        elif event == TAKEOVER_SUSPECTED:
            self.stats.takeovers_suspected += 1
        log.error("%s", line)

    def _report_retry(self, err: Exception, line: str) -> None:
        if isinstance(err, SpoolError):
            log.error("%s; messages stay with the broker", line)
        else:
            self.rlog.warning("mqtt", "%s", line)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """One connection: subscribe (a refusal is an MqttError), then take messages until ``stop``."""
        filters = self.config.topic_filters
        qos: int = self.config.subscription.qos
        granted = await client.subscribe([(f, qos) for f in filters])
        _check_granted(granted, filters, qos)
        self.stats.connects += 1
        self.stats.connected = True
        try:
            log.info("subscribed to %s as %s", filters, client.identifier)
            if self.on_ready is not None:
                ready, self.on_ready = self.on_ready, None  # once
                ready()
            await self._pump(client, stop)
        finally:
            self.stats.connected = False

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        iterator = client.messages
        stopped = asyncio.create_task(stop.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(anext(iterator))
                await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # stopping
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await nxt
                    break
                group = [nxt.result()]  # raises the MqttError that ended the session
                while len(iterator) > 0 and len(group) < MAX_GROUP_MESSAGES:
                    group.append(await anext(iterator))
                if not await self.wait_for_room(stop):
                    return  # stopping with a full spool: the broker keeps the group
                await self.take(client, group)
            # Stopping: take what has already arrived (else the broker re-sends it next time).
            group = []
            while len(iterator) > 0:
                group.append(await anext(iterator))
            if group and not self.spool_full():
                await self.take(client, group)
        finally:
            stopped.cancel()

    # ---- the collector's own health ------------------------------------------------------

    def health_line(self) -> str | None:
        now_ns = time.time_ns()
        self._update_gauges()
        if self.supervisor is not None:
            self.stats.task_restarts = self.supervisor.restarts
        uptime_s = time.monotonic() - self.started_monotonic
        fields = health_fields(self.stats, list(self.latencies_ms), list(self.batch_lines), now_ns, uptime_s)
        self.latencies_ms.clear()
        self.batch_lines.clear()
        enc = encode_point(
            HEALTH_MEASUREMENT,
            tags={"source": "collector", "collector": self.config.name},
            fields=fields,
            timestamp_ns=now_ns,
        )
        return None if enc is None else enc.line

    async def add_health_point(self) -> None:
        line = self.health_line()
        if line is None:
            return
        try:
            await self.spool_append([line])
        except SpoolError as err:
            self.rlog.warning("health", "could not spool the collector's health point: %s", err)

    async def health_loop(self) -> None:
        """A health point every ``health_interval_s`` (null: none), read again after a reload."""
        while True:
            changed, interval_s = self.reconfigured, self.config.health_interval_s
            if interval_s is None:
                await changed.wait()
                continue
            await _sleep_unless(changed, interval_s)
            if not changed.is_set():
                await self.add_health_point()

    async def reload(self, source: str, loader: Callable[[], CollectorConfig]) -> None:
        """Re-read the config (SIGHUP). Applied when only :data:`RELOADABLE_KEYS` changed: the
        message size limit, the log rate limit and the shutdown flush from the next message or
        stop on, the summary and health intervals from now. Otherwise refused with one ERROR line
        naming the file, the keys and why; the configuration in force stays."""
        try:
            new = await asyncio.to_thread(loader)
        except ConfigError as err:
            log.error("reload refused: %s; the configuration in force stays", err)
            return
        changed = changed_keys(self.config, new)
        restart = needs_restart(changed, RELOADABLE_KEYS)
        if restart:
            log.error(
                "reload refused: %s: %s cannot change while the collector runs (restart it for that); "
                "the configuration in force stays",
                source,
                ", ".join(restart),
            )
            return
        if not changed:
            log.info("reload: %s: nothing changed", source)
            return
        old, self.config = self.config, new
        self.rlog._interval_s = new.limits.log_interval_s
        woken, self.reconfigured = self.reconfigured, asyncio.Event()
        woken.set()
        log.info("reload: %s: applied: %s", source, describe_changes(old, new, changed))

    async def summary_loop(self) -> None:
        """One INFO line every ``log.summary_interval_s`` (monotonic; 0: none; read again after a
        reload): messages and observations in, points written since the last line, the spool
        backlog and the age of the last successful write."""
        st = self.stats

        def totals() -> tuple[int, int, int]:
            return st.received_messages, st.received_observations, st.written_points

        last, t0 = totals(), time.monotonic()
        while True:
            changed, interval_s = self.reconfigured, self.config.log.summary_interval_s
            if interval_s <= 0:
                await changed.wait()
                last, t0 = totals(), time.monotonic()  # it was off: a fresh interval
                continue
            await _sleep_unless(changed, interval_s)
            if changed.is_set():
                continue
            now, t1 = totals(), time.monotonic()
            messages, observations, written = (n - p for n, p in zip(now, last, strict=True))
            wrote = self.last_write_monotonic
            log.info(
                "last %g s: %d messages, %d observations in, %d points written; spool backlog %d lines; %s",
                round(t1 - t0, 1),
                messages,
                observations,
                written,
                self.spool.depth,
                "no successful write yet" if wrote is None else f"last successful write {t1 - wrote:.0f} s ago",
            )
            last, t0 = now, t1

    # ---- flushing -----------------------------------------------------------------------

    async def flush_loop(self, writer: InfluxWriter) -> None:
        """Write the spool to InfluxDB until stopping and it is empty. Never raises WriteError."""
        influx = self.config.influx
        prepared = False
        backoff = Backoff(influx.retry_min_s, influx.retry_max_s)
        while True:
            if not self.pending:
                # Autocorking: nothing is in flight here, so what the spool holds is written (up to
                # batch_max_lines) once its oldest line has lingered WRITE_LINGER_S; while a write is
                # in flight, the next batch gathers.
                if self.spool.depth == 0 and not self.stopping.is_set():
                    self.wake.clear()
                    await _sleep_unless(self.wake, influx.flush_interval_s)
                await self._linger()
                if self.spool.depth == 0:
                    if self.stopping.is_set():
                        return
                    continue
                try:
                    rows = await self._db(self.spool.peek, influx.batch_max_lines)
                except SpoolError as err:
                    await self._spool_trouble(err, backoff)
                    continue
                if not rows:
                    continue
                self.conflicts.expire()  # only between batches: a batch's rounds see one memory
                self.stats.field_conflicts = len(self.conflicts)
                self.pending.append((rows, rows[-1][0]))
            if await self._set_aside_conflicts(backoff):
                continue
            chunk, through = self.pending[0]
            try:
                if not prepared:
                    await self._prepare(writer)
                    prepared = True
                t0 = time.perf_counter_ns()
                await writer.write([line for _, line in chunk])
                elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
            except WriteError as err:
                if err.data_error:
                    self.stats.refused_writes += 1
                    if self.conflicts.learn(err.conflicts, err.status):
                        self.stats.field_conflicts = len(self.conflicts)
                        if any(self.conflicts.match(line) for _, line in chunk):
                            continue  # the next round sets those lines aside and writes the rest
                    self.pending.popleft()
                    if len(chunk) == 1:
                        await self._dead_letter(chunk[0], through, err, backoff)
                    else:
                        self._halve(chunk, through)
                    continue
                self.stats.write_retries += 1
                if err.status == 404:
                    prepared = False  # e.g. the database was dropped: create it again first
                if err.timeout and len(chunk) > 1:
                    # Maybe the batch is too large to be written in influx.timeout_s: halve it (in
                    # order) so a size-induced timeout can't repeat forever.
                    self.pending.popleft()
                    self._halve(chunk, through)
                delay = backoff.next_delay_s()
                self.rlog.warning(
                    "write", "writing %d lines failed: %s; retrying in %.1f s", len(chunk), err.message, delay
                )
                await asyncio.sleep(delay)
                continue
            self.stats.writes += 1
            self.last_write_monotonic = time.monotonic()
            self.stats.written_points += len(chunk)
            self.latencies_ms.append(elapsed_ms)
            self.batch_lines.append(len(chunk))
            self.pending.popleft()
            await self._forget_through(through, backoff)
            backoff.reset()

    async def _linger(self) -> None:
        """Let a small batch wait until its oldest line is WRITE_LINGER_S old (not when stopping)."""
        depth, oldest = self.spool.depth, self.spool.oldest_at_ns
        if self.stopping.is_set() or oldest is None or not 0 < depth < self.config.influx.batch_max_lines:
            return
        wait_s = WRITE_LINGER_S - (time.time_ns() - oldest) / 1e9
        if wait_s > 0:
            await asyncio.sleep(min(wait_s, WRITE_LINGER_S))

    def _halve(self, chunk: list[tuple[int, str]], through: int) -> None:
        """Put ``chunk`` back as two halves, in order. A spool row holds several lines: the first
        half may clear the spool only through the rows it holds whole (a row split between the
        halves goes with the second), so no line still to write leaves the spool early."""
        mid = len(chunk) // 2
        first_through = chunk[mid - 1][0] if chunk[mid][0] != chunk[mid - 1][0] else chunk[mid][0] - 1
        self.pending.appendleft((chunk[mid:], through))
        self.pending.appendleft((chunk[:mid], first_through))

    async def _set_aside_conflicts(self, backoff: Backoff) -> bool:
        """Dead-letter the lines of the batch at hand that meet a remembered field type conflict,
        unwritten; True when there were any (the rest of the batch stays at hand)."""
        if not len(self.conflicts):
            return False
        rows, through = self.pending[0]
        letters: list[DeadLetter] = []
        rest: list[tuple[int, str]] = []
        for seq, line in rows:
            conflict = self.conflicts.match(line)
            if conflict is None:
                rest.append((seq, line))
                continue
            error = (
                f'field type conflict: input field "{conflict.field}" on measurement "{conflict.measurement}" '
                f"is type {conflict.incoming}, already exists as type {conflict.existing} "
                f"(as InfluxDB answered before: not written)"
            )
            status = self.conflicts.status(conflict.measurement, conflict.field)
            letters.append(
                DeadLetter(line, error, status, REASON_FIELD_TYPE_CONFLICT, conflict.measurement, conflict.field)
            )
        if not letters:
            return False
        await self._record_dead(letters, letters[0].error, backoff)
        self.stats.conflict_dead_lettered += len(letters)
        if rest:
            self.pending[0] = (rest, through)
        else:
            self.pending.popleft()
            await self._forget_through(through, backoff)
        return True

    async def _forget_through(self, seq: int, backoff: Backoff) -> None:
        """Delete written lines from the spool, retrying until it works (they are written already)."""
        while True:
            try:
                await self._db(self.spool.delete_through, seq)
            except SpoolError as err:
                await self._spool_trouble(err, backoff)
                continue
            self._update_gauges()
            self.drained.set()
            return

    async def _spool_trouble(self, err: Exception, backoff: Backoff) -> None:
        self.stats.spool_errors += 1
        delay = backoff.next_delay_s()
        self.rlog.warning("spool", "spool: %s; retrying in %.1f s", err, delay)
        await asyncio.sleep(delay)

    async def _prepare(self, writer: InfluxWriter) -> None:
        try:
            await writer.prepare()
        except WriteError as err:
            if err.retryable:
                raise
            # e.g. no admin rights for CREATE DATABASE, or a server without it: try writing anyway.
            log.warning("could not prepare the InfluxDB destination (%s); writing anyway", err.message)

    async def _dead_letter(self, row: tuple[int, str], through: int, err: WriteError, backoff: Backoff) -> None:
        """Record a refused line in the dead-letter file (durably), then clear the spool through ``through``."""
        named = {(c.measurement, c.field): c.existing for c in err.conflicts}
        conflict = line_conflict(row[1], lambda m, f: named.get((m, f))) if named else None
        letter = DeadLetter(row[1], err.message, err.status)
        if conflict is not None:  # (with the conflict memory off) say which field
            letter = DeadLetter(
                row[1], err.message, err.status, REASON_FIELD_TYPE_CONFLICT, conflict.measurement, conflict.field
            )
        await self._record_dead([letter], err.message, backoff)
        await self._forget_through(through, backoff)

    async def _record_dead(self, letters: Sequence[DeadLetter], why: str, backoff: Backoff) -> None:
        """Append to the dead-letter file (one fsync), retrying until it works; count and log."""
        while True:
            try:
                await self._db(self.dead_letters.append_many, letters)
                break
            except OSError as exc:
                await self._spool_trouble(
                    SpoolError(f"dead-letter file {self.dead_letters.path}: {exc.strerror or exc}"), backoff
                )
        self.stats.dead_lettered += len(letters)
        line = letters[0].line
        shown = line if len(line) <= MAX_LOGGED_LINE_CHARS else line[: MAX_LOGGED_LINE_CHARS - 1] + "…"
        where = f"kept in {self.dead_letters.path}" if self.dead_letters.path is not None else "dropped"
        self.rlog.warning(
            "dead_letter", "InfluxDB refused %d point(s) (%s), %s; the first: %r", len(letters), why, where, shown
        )


def _check_granted(granted: Sequence[Any], topics: str | Sequence[str], qos: int) -> None:
    """Raise MqttError when the broker refused a subscription (SUBACK 0x80 or a v5 failure code)."""
    names = [topics] if isinstance(topics, str) else list(topics)
    for i, code in enumerate(granted):
        topic = names[i] if i < len(names) else names[-1]
        value = int(getattr(code, "value", code))
        if getattr(code, "is_failure", value >= 0x80):
            raise aiomqtt.MqttError(f"the broker refused the subscription to {topic!r} ({code})")
        if value < qos:
            log.warning("the broker granted QoS %d for %r instead of %d", value, topic, qos)


def _registry_kinds() -> Mapping[str, AnyKind]:
    from edgeprobe.probes.registry import KINDS

    return KINDS


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
    on_ready: Callable[[], None] | None = None,
    reload: tuple[str, Callable[[], CollectorConfig]] | None = None,
) -> CollectorStats:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None); returns the counters.

    ``reload``: (the file's name, a loader of its validated config): SIGHUP (when the collector
    owns the signals) re-reads it (:meth:`_Collector.reload`).

    ``on_ready``, when given, is called once, at the first successful subscription (the spool is
    open by then).

    Cancelling the task stops at once, without the final flush (the spool keeps what was not
    written). ``kinds`` defaults to :data:`edgeprobe.probes.registry.KINDS`. Raises SpoolError when the
    spool can't be opened (e.g. another collector holds it).
    """
    if kinds is None:
        from edgeprobe.probes.registry import KINDS

        kinds = KINDS
    own_signals = stop is None
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    reload_requested = asyncio.Event()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    try:
        return await _run(
            config,
            stop,
            stats if stats is not None else CollectorStats(),
            kinds,
            on_ready,
            (reload, reload_requested) if reload is not None else None,
        )
    finally:
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


_Reload = tuple[tuple[str, Callable[[], CollectorConfig]], asyncio.Event]


async def _run(
    config: CollectorConfig,
    stop: asyncio.Event,
    stats: CollectorStats,
    kinds: Mapping[str, AnyKind],
    on_ready: Callable[[], None] | None = None,
    reload: _Reload | None = None,
) -> CollectorStats:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector-spool")
    spool = Spool(config.spool_path(), synchronous=config.spool.synchronous)
    try:
        await asyncio.get_running_loop().run_in_executor(executor, spool.open)
        try:
            await _serve(config, stop, stats, kinds, spool, executor, on_ready, reload)
        finally:
            await asyncio.get_running_loop().run_in_executor(executor, spool.close)
    finally:
        executor.shutdown(wait=True)
    log.info("collector %s stopped: %s", config.name, stats.as_dict())
    return stats


async def _serve(
    config: CollectorConfig,
    stop: asyncio.Event,
    stats: CollectorStats,
    kinds: Mapping[str, AnyKind],
    spool: Spool,
    executor: ThreadPoolExecutor,
    on_ready: Callable[[], None] | None = None,
    reload: _Reload | None = None,
) -> None:
    col = _Collector(config, stats, kinds, spool, DeadLetters(config.dead_letter_path()), executor)
    col.on_ready = on_ready
    log.info(
        "collector %s: MQTT %s → InfluxDB %s (api %s), spool %s",
        config.name,
        config.broker.url,
        config.influx.url,
        config.influx.api,
        spool,
    )
    if not spool.durable:
        log.warning("spool.path is null: the spool is in memory, a crash loses what was acknowledged and not written")
    if spool.depth:
        log.info("the spool holds %d lines from before: writing them first", spool.depth)
    # Every task runs under the supervisor: a crash is logged and the task restarted; one that
    # keeps crashing ends the collector with TaskFailedError (after the usual shutdown flush when
    # it is the consumer).
    sup = col.supervisor = Supervisor(config.supervise, log)
    async with make_writer(config.influx) as writer:
        consumer = asyncio.create_task(
            sup.run("consumer", lambda: col.consume(stop), stop=stop), name="collector-consume"
        )
        flusher = asyncio.create_task(
            sup.run("flusher", lambda: col.flush_loop(writer), stop=col.stopping), name="collector-flush"
        )
        # The health and summary loops run always: a reload may switch them on or off.
        health = asyncio.create_task(sup.run("health", col.health_loop), name="collector-health")
        summary = asyncio.create_task(sup.run("summary", col.summary_loop), name="collector-summary")
        tasks = {consumer, flusher, health, summary}
        if reload is not None:
            (source, loader), requested = reload

            async def reload_loop() -> None:
                while True:
                    await requested.wait()
                    requested.clear()
                    try:
                        await col.reload(source, loader)
                    except Exception:  # a bug here must not end the collector: say so, keep running
                        log.exception("reload of %s failed part-way; restart the collector to be sure", source)

            tasks.add(asyncio.create_task(reload_loop(), name="collector-reload"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if consumer not in done:  # a task the supervisor gave up on: surface it
                consumer.cancel()
                for task in done:
                    task.result()
            summary.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await summary
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
            if col.config.health_interval_s is not None:
                await col.add_health_point()
            col.stopping.set()
            col.wake.set()
            await asyncio.wait({flusher}, timeout=col.config.limits.shutdown_flush_s)
            if not flusher.done():
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                col._update_gauges()
                log.warning(
                    "stopping: %d lines not written within %.1f s stay in the spool %s for the next start",
                    spool.depth,
                    col.config.limits.shutdown_flush_s,
                    spool,
                )
            consumer.result()
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
