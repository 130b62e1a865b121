"""A bounded in-memory queue of observations waiting for the broker.

When full, the oldest observation is dropped and counted (the durable spool replaces this in a
later step). A batch taken out and not acknowledged goes back to the front, in order.
"""

from __future__ import annotations

import asyncio
from collections import deque

from probes.schema import Observation


class Outbox:
    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = max_items
        self._items: deque[tuple[float, Observation]] = deque()
        self._changed = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, obs: Observation, now: float | None = None) -> None:
        self._items.append((asyncio.get_running_loop().time() if now is None else now, obs))
        self._trim()
        self._changed.set()

    def _trim(self) -> None:
        while len(self._items) > self.max_items:
            self._items.popleft()
            self.dropped += 1

    def oldest_enqueued_at(self) -> float | None:
        return self._items[0][0] if self._items else None

    def take(self, n: int) -> list[tuple[float, Observation]]:
        out: list[tuple[float, Observation]] = []
        while self._items and len(out) < n:
            out.append(self._items.popleft())
        return out

    def put_back(self, batch: list[tuple[float, Observation]]) -> None:
        """Return an unacknowledged batch to the front; if that overflows, the oldest go (counted)."""
        self._items.extendleft(reversed(batch))
        self._trim()
        if self._items:
            self._changed.set()

    async def wait_changed(self, timeout_s: float | None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass
