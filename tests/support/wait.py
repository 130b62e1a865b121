"""Waiting on a signal instead of sleeping: poll a predicate until it holds, or fail saying what.

Tests wait on something real (a status message, a counter, a row in InfluxDB, a ready file), never
for a fixed time that is too long on a fast machine and too short on a loaded one::

    wait_for(lambda: ready_file.exists(), 30, "the collector's ready file")
    rows = await wait_for_async(lambda: asyncio.to_thread(query), 20, "rows in InfluxDB", until=enough)

The predicate's value is returned once it is truthy (or once ``until(value)`` is true), so a wait
can hand over what it found. On timeout it raises AssertionError naming WHAT it waited for and
the last value seen (``what`` may be a callable, evaluated only then, e.g. to add a log tail).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

POLL_INTERVAL_S = 0.02
_MAX_SHOWN_CHARS = 300


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 1] + "…"


def _timed_out(what: str | Callable[[], str], timeout_s: float, last: object, polls: int) -> AssertionError:
    name = what() if callable(what) else what
    return AssertionError(
        f"timed out after {timeout_s:g} s waiting for {name} (last value seen: {_shown(last)}, {polls} polls)"
    )


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[T], object] = bool,
    interval_s: float = POLL_INTERVAL_S,
) -> T:
    """Call ``predicate`` every ``interval_s`` until its value satisfies ``until`` (truthy by default);
    return that value. Raises AssertionError after ``timeout_s`` (the predicate runs at least once)."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while True:
        value = predicate()
        polls += 1
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s, value, polls)
        time.sleep(interval_s)


@overload
async def wait_for_async(
    predicate: Callable[[], Awaitable[T]],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[T], object] = ...,
    interval_s: float = ...,
) -> T: ...


@overload
async def wait_for_async(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[T], object] = ...,
    interval_s: float = ...,
) -> T: ...


async def wait_for_async(
    predicate: Callable[[], Any],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    until: Callable[[Any], object] = bool,
    interval_s: float = POLL_INTERVAL_S,
) -> Any:
    """:func:`wait_for` for the event loop: the predicate may return an awaitable (e.g.
    ``asyncio.to_thread(query)``), and between polls the loop runs everything else."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while True:
        result: Any = predicate()
        if inspect.isawaitable(result):
            result = await result
        polls += 1
        if until(result):
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s, result, polls)
        await asyncio.sleep(interval_s)
