"""``edgeprobe watch``: the live table of ``edgeprobe demo`` for any running fleet, read from the broker.

Read-only: it subscribes to ``<prefix>/v1/+/+/obs`` at QoS 0 on a clean session under a client id
of its own (never ``broker.client_id``, which would take another client's session over), with no
last will, and publishes nothing. QoS 0 means the broker keeps nothing for it: the agents'
spools and the collectors' confirmations do not notice it.

What arrives is checked exactly as the collector checks it (:func:`edgeprobe.collector.decode.decode_message`:
the size before parsing, the topic, JSON, the schema version and shape, that the payload names the
topic's site and agent, then each observation's kind, values and timestamps): a bad message or
observation is counted by reason and shown below the table, never fatal. Bounded: a message up to
:data:`MAX_MESSAGE_BYTES`, at most :data:`MAX_QUEUED` messages waiting to be read (beyond that the
client drops them; counted below the table), at most :data:`edgeprobe.livetable.MAX_ROWS` rows. Every cell is
terminal-safe (:mod:`edgeprobe.livetable`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import aiomqtt
import msgspec
from rich.console import Console, Group
from rich.live import Live

from edgeprobe.collector.decode import decode_message
from edgeprobe.livetable import View
from edgeprobe.mqtt import BrokerConfig, run_session
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import TOPIC_VERSION
from edgeprobe.termtext import term_safe

log = logging.getLogger("edgeprobe.watch")

MAX_MESSAGE_BYTES: Final = 1024 * 1024  # the collector's default limits.max_message_bytes
MAX_QUEUED: Final = 256  # messages received and not yet read (≤ 256 MiB); more are dropped and counted


@dataclass
class WatchStats:
    messages: int = 0
    observations: int = 0  # shown (or counted beyond the row limit)
    filtered: int = 0  # observations of agents that --where left out
    agents: set[str] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)  # by the collector's reject reason
    dropped: int = 0  # messages the client dropped: more than MAX_QUEUED waiting to be read

    def footer(self, dropped_rows: int) -> str:
        """One line under the table (pure): what was seen and what was skipped, and why."""
        text = f"{self.observations} observation(s) from {len(self.agents)} agent(s) in {self.messages} message(s)"
        if self.filtered:
            text += f"; {self.filtered} of other agents (--where)"
        if self.skipped:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} invalid ({reasons})"
        if dropped_rows:
            text += f"; {dropped_rows} beyond the row limit not shown"
        if self.dropped:
            text += f"; {self.dropped} message(s) dropped (they came faster than they could be read)"
        return text + "."


def obs_filter(prefix: str) -> str:
    return f"{prefix}/{TOPIC_VERSION}/+/+/obs"


def take(
    view: View,
    stats: WatchStats,
    prefix: str,
    topic: str,
    payload: bytes,
    where: Mapping[str, str] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> None:
    """Add one MQTT message's valid observations to ``view`` (pure; never raises for bad input).
    ``where``: only agents whose labels (and ``site``/``agent``) match all of it."""
    stats.messages += 1
    decoded = decode_message(topic, payload, prefix=prefix, max_bytes=max_bytes, kinds=KINDS)
    for reject in decoded.rejects:
        stats.skipped[reject.reason] += 1
    meta = decoded.meta
    if meta is None:
        return
    if where:
        have = {**meta.labels, "site": meta.site, "agent": meta.agent}
        if not all(have.get(k) == v for k, v in where.items()):
            stats.filtered += len(decoded.observations)
            return
    who = f"{meta.site}/{meta.agent}"
    stats.agents.add(who)
    for obs in decoded.observations:
        view.add(obs, who)
        stats.observations += 1


class BrokerUnreachable(Exception):
    """The first connection failed (a wrong URL or credentials): nothing to watch."""


async def watch(
    broker: BrokerConfig,
    view: View,
    stats: WatchStats,
    *,
    stop: asyncio.Event,
    where: Mapping[str, str] | None = None,
    max_observations: int | None = None,
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Feed ``view`` until ``stop`` (set here too after ``max_observations``). Reconnects after a
    lost connection (the shared MQTT session loop); raises :class:`BrokerUnreachable` when the
    first connection fails."""
    topic = obs_filter(broker.topic_prefix)
    connected = False

    async def session(client: aiomqtt.Client) -> None:
        nonlocal connected
        connected = True
        await client.subscribe(topic, qos=0)
        if on_subscribed is not None:
            on_subscribed()
        messages = client.messages.__aiter__()
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                nxt = asyncio.ensure_future(messages.__anext__())
                done, _ = await asyncio.wait({nxt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                msg = nxt.result()
                payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
                take(view, stats, broker.topic_prefix, str(msg.topic), bytes(payload), where)
                if max_observations is not None and stats.observations >= max_observations:
                    stop.set()
        finally:
            stop_wait.cancel()

    def report(err: Exception, line: str) -> None:
        if not connected:
            stop.set()
            raise BrokerUnreachable(term_safe(f"broker {broker.url}: {err}", 500))
        log.warning("%s", term_safe(line, 500))

    class CountDrops(logging.Filter):
        """aiomqtt's warning for each message beyond MAX_QUEUED: counted, not printed over the table."""

        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Message queue is full"):
                stats.dropped += 1
                return False
            return True

    mqtt_log, drops = logging.getLogger("mqtt"), CountDrops()
    mqtt_log.addFilter(drops)
    try:
        await run_session(
            msgspec.structs.replace(broker, client_id=None),  # never someone else's session
            f"edgeprobe-watch-{uuid.uuid4().hex[:12]}",
            session,
            stop=stop,
            name="watch",
            log=log,
            clean_session=True,
            report=report,
            max_queued_incoming=MAX_QUEUED,
        )
    finally:
        mqtt_log.removeFilter(drops)


async def run_watch(
    broker: BrokerConfig,
    console: Console,
    *,
    where: Mapping[str, str] | None = None,
    duration_s: float | None = None,
    max_observations: int | None = None,
    live: bool = True,
) -> int:
    """``edgeprobe watch``: redraw the table (``live``) or print it once at the end; stop at
    Ctrl-C/SIGTERM, after ``duration_s`` or ``max_observations``. One line on stderr once
    subscribed. Exit status: 0, or 1 when the broker could not be reached."""
    import signal
    import sys

    view, stats, stop = View(show_agent=True), WatchStats(), asyncio.Event()
    topic = obs_filter(broker.topic_prefix)
    header = term_safe(f"edgeprobe watch: {broker.url} {topic} (read-only)" + ("; Ctrl-C stops" if live else ""), 500)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)

    def subscribed() -> None:
        print(term_safe(f"edgeprobe watch: subscribed to {topic} at {broker.url}", 500), file=sys.stderr, flush=True)

    def screen() -> Group:
        return view.render(header, stats.footer(view.dropped))

    task = asyncio.create_task(
        watch(broker, view, stats, stop=stop, where=where, max_observations=max_observations, on_subscribed=subscribed)
    )
    try:
        if live:
            with Live(screen(), console=console, refresh_per_second=4) as shown:
                while not task.done():
                    await asyncio.wait({task}, timeout=0.25)
                    shown.update(screen())
        await task
    except BrokerUnreachable as err:
        print(f"edgeprobe watch: {err}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if not live:
        console.print(screen())
    return 0
