"""edgeprobe.mqtt.run_session, the one reconnect loop, against a real mosquitto (stopped and restarted)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiomqtt
import pytest

from edgeprobe.localstack import MosquittoServer
from edgeprobe.mqtt import BrokerConfig, run_session
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

log = logging.getLogger("test.mqtt_session")


def broker(server: MosquittoServer, min_s: float = 0.05, max_s: float = 0.2) -> BrokerConfig:
    return BrokerConfig(url=server.url, reconnect_min_s=min_s, reconnect_max_s=max_s, connect_timeout_s=2.0)


def lines(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name and word in r.getMessage()]


async def test_unreachable_then_connected_then_lost_then_back(
    fresh_mosquitto: MosquittoServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker down at start, up, restarted mid-session: one line per failure, the session body
    runs once per connection, and the loop returns when the body does."""
    caplog.set_level(logging.INFO, logger=log.name)
    await fresh_mosquitto.astop(keep_state=True)
    stop = asyncio.Event()
    sessions: list[str] = []

    async def session(client: aiomqtt.Client) -> None:
        sessions.append(client.identifier)
        if len(sessions) == 1:
            async for _ in client.messages:  # until the broker goes away: MqttError
                pass
        await stop.wait()

    task = asyncio.create_task(
        run_session(
            broker(fresh_mosquitto), "t-session", session, stop=stop, name="test broker", log=log, clean_session=True
        )
    )
    await wait_for_async(lambda: len(lines(caplog, "unreachable")) >= 2, 10, "two 'unreachable' lines")
    assert sessions == []
    await fresh_mosquitto.astart()
    await wait_for_async(lambda: len(sessions) == 1, 10, "the first session")
    assert any("connected after" in line and "failed attempt(s)" in line for line in lines(caplog, "connected"))
    await fresh_mosquitto.astop(keep_state=True)
    await wait_for_async(lambda: lines(caplog, "test broker lost ("), 10, "a 'lost' line")
    await fresh_mosquitto.astart()
    await wait_for_async(lambda: len(sessions) == 2, 10, "the second session")
    assert sessions == ["t-session", "t-session"]
    assert all("retrying in" in line for line in lines(caplog, "unreachable") + lines(caplog, " lost ("))
    stop.set()
    assert await asyncio.wait_for(task, 10) is None  # the body returned: no error to report


async def test_stop_cuts_the_backoff_short_and_returns_the_last_error(mosquitto: MosquittoServer) -> None:
    stop = asyncio.Event()
    reports: list[tuple[Exception, str]] = []

    async def session(client: aiomqtt.Client) -> None:
        raise aiomqtt.MqttError("dropped on purpose")

    task = asyncio.create_task(
        run_session(
            broker(mosquitto, min_s=60.0, max_s=60.0),
            "t-stop",
            session,
            stop=stop,
            name="test broker",
            log=log,
            clean_session=True,
            report=lambda err, line: reports.append((err, line)),
        )
    )
    await wait_for_async(lambda: reports, 10, "the report of the first failure")
    err, line = reports[0]
    assert str(err) == "dropped on purpose" and line.startswith("test broker lost (dropped on purpose); retrying in ")
    t0 = time.monotonic()
    stop.set()
    result = await asyncio.wait_for(task, 5)  # not the 30-60 s delay
    assert time.monotonic() - t0 < 2.0 and result is err and len(reports) == 1


async def test_errors_not_to_retry_propagate(mosquitto: MosquittoServer) -> None:
    attempts = 0

    async def session(client: aiomqtt.Client) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("a bug, not a broker")

    with pytest.raises(ValueError, match="a bug"):
        await run_session(
            broker(mosquitto), "t-bug", session, stop=asyncio.Event(), name="t", log=log, clean_session=True
        )
    assert attempts == 1


async def test_retry_on_extends_what_is_retried(mosquitto: MosquittoServer) -> None:
    stop = asyncio.Event()
    attempts = 0

    async def session(client: aiomqtt.Client) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise OSError("disk full")
        await client.publish("t/retry", b"x", qos=1)

    result = await asyncio.wait_for(
        run_session(
            broker(mosquitto),
            "t-retry",
            session,
            stop=stop,
            name="t",
            log=log,
            clean_session=True,
            retry_on=(aiomqtt.MqttError, OSError),
        ),
        10,
    )
    assert result is None and attempts == 3


async def test_linger_keeps_trying_after_stop_until_its_deadline(fresh_mosquitto: MosquittoServer) -> None:
    """The publisher's shutdown flush: stopped, broker down, something left to send."""
    await fresh_mosquitto.astop(keep_state=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop.set()
    deadline = loop.time() + 1.0
    lingered = 0
    wills = 0

    async def linger() -> float:
        nonlocal lingered
        lingered += 1
        return deadline

    def will() -> aiomqtt.Will:
        nonlocal wills
        wills += 1
        return aiomqtt.Will("t/will", b"offline", qos=1, retain=False)

    async def session(client: aiomqtt.Client) -> None:
        raise AssertionError("the broker is down")

    error = await asyncio.wait_for(
        run_session(
            broker(fresh_mosquitto),
            "t-linger",
            session,
            stop=stop,
            name="t",
            log=log,
            clean_session=True,
            will=will,
            linger=linger,
        ),
        10,
    )
    assert isinstance(error, aiomqtt.MqttError | TimeoutError)
    assert loop.time() >= deadline - 0.05  # kept trying until the deadline, not longer than the wait above
    assert lingered >= 2 and wills >= 2  # asked before each attempt; a will built for each client


async def test_no_attempt_once_stopped_without_linger(mosquitto: MosquittoServer) -> None:
    stop = asyncio.Event()
    stop.set()

    async def session(client: aiomqtt.Client) -> None:
        raise AssertionError("no session after stop")

    async def nothing_left() -> None:
        return None

    base = broker(mosquitto)
    assert await run_session(base, "t-n", session, stop=stop, name="t", log=log, clean_session=True) is None
    assert (
        await run_session(base, "t-n", session, stop=stop, name="t", log=log, clean_session=True, linger=nothing_left)
        is None
    )
