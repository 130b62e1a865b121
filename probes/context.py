"""Resources shared by many probe runs (one ICMP socket per family, say), owned by the caller.

``ProbeContext`` is an async context manager: whoever runs probes opens one, passes it to
every run, and closing it closes every resource that a probe created through it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol, TypeVar, cast


class Closeable(Protocol):
    async def aclose(self) -> None: ...


R = TypeVar("R", bound=Closeable)


class ProbeContext:
    def __init__(self) -> None:
        self._resources: dict[object, Closeable] = {}
        self._closed = False

    async def resource(self, key: object, factory: Callable[[], Awaitable[R]]) -> R:
        """Return the resource stored under ``key``, creating it with ``factory`` on first use."""
        if self._closed:
            raise RuntimeError("ProbeContext is closed")
        found = self._resources.get(key)
        if found is None:
            found = await factory()
            # Another task may have created it while we awaited: keep the first, close ours.
            existing = self._resources.get(key)
            if existing is not None:
                await found.aclose()
                return cast(R, existing)
            self._resources[key] = found
        return cast(R, found)

    async def aclose(self) -> None:
        self._closed = True
        resources, self._resources = list(self._resources.values()), {}
        for res in resources:
            await res.aclose()

    async def __aenter__(self) -> ProbeContext:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
