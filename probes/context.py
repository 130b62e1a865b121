"""Resources shared by many probe runs (one ICMP socket per family, say), owned by the caller.

``ProbeContext`` is an async context manager: whoever runs probes opens one, passes it to
every run, and closing it closes every resource that a probe created through it.

``check_address`` (optional) is how whoever runs a probe vets where it goes without the probes
knowing why: an async callable ``(name, address, port) -> str | None`` (``name`` as the probe was
given it, ``address`` the IP it resolved to, ``port`` 0 for ICMP), called after resolving and
before connecting or sending, for every connection a probe opens (each redirect hop included).
A string is the refusal's reason and ends the run as ``policy_refused``; the probe then never
connects. The probe connects to exactly the address that was checked (no second lookup). The
agent sets it for requests that come from its controller (:mod:`edgeprobe.agent.policy`);
:meth:`ProbeContext.restricted` gives such a view, sharing the owner's resources.

``progress`` (optional) is how a live view (the CLI's ``ping``, ``tcp``) sees a run as it happens
without a second implementation of the probe: a kind that repeats (echoes, connection attempts)
calls it with a :class:`Step` once it knows where it goes (``seq`` None) and once per reply or
attempt, as each ends. ``request_stop()`` (the CLI's Ctrl-C) asks such a run to send nothing more
and return what it measured so far, a normal result; :meth:`ProbeContext.pause` is how a probe
waits between sends so that a stop ends the wait, and :meth:`ProbeContext.on_stop` how a run
without a task of its own to wake (the ICMP engine sends from its socket's timer) hears of it.
Neither is set by the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeAlias, TypeVar, cast


class Closeable(Protocol):
    async def aclose(self) -> None: ...


R = TypeVar("R", bound=Closeable)

AddressCheck: TypeAlias = Callable[[str, str, int], Awaitable[str | None]]
"""``(name, address, port)`` → None to go ahead, or why not (see the module docstring)."""


@dataclass(frozen=True, kw_only=True)
class Step:
    """One reply or attempt of a run as it ends (or, with ``seq`` None, the run's start)."""

    target: str  # as the probe was given it
    address: str  # the IP address it goes to
    seq: int | None  # 1, 2, … in send order; None: the start (resolved, about to send)
    time_ms: float | None = None  # the measured time; None: no answer (see ``error``)
    ttl: int | None = None  # the reply's IP TTL / hop limit, where known
    error: str | None = None  # why there was no answer (an ICMP error, refused, no reply in time)
    detail: str | None = None  # at the start: how it is sent (e.g. "dgram ICMP socket, 56 data bytes")


ProgressHook: TypeAlias = Callable[[Step], None]


def _nothing() -> None:
    return None


class ProbeContext:
    def __init__(self, *, check_address: AddressCheck | None = None, progress: ProgressHook | None = None) -> None:
        self._resources: dict[object, Closeable] = {}
        self._closed = False
        self._owner: ProbeContext | None = None
        self.check_address = check_address
        self.progress = progress
        self._stop = asyncio.Event()
        self._on_stop: dict[object, Callable[[], None]] = {}

    def report(self, step: Step) -> None:
        """Hand ``step`` to the progress hook, if any."""
        if self.progress is not None:
            self.progress(step)

    def request_stop(self) -> None:
        """Ask the runs using this context to send nothing more and return what they measured."""
        self._stop.set()
        callbacks, self._on_stop = self._on_stop, {}
        for callback in callbacks.values():
            callback()

    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once when a stop is requested (at once when one was); returns what
        takes it back. Cheaper than a task waiting on :meth:`stopped` for a run that has no task
        of its own to wake (the ICMP engine)."""
        if self._stop.is_set():
            callback()
            return _nothing
        key = object()
        self._on_stop[key] = callback

        def take_back() -> None:
            self._on_stop.pop(key, None)

        return take_back

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    async def stopped(self) -> None:
        """Return once a stop is requested."""
        await self._stop.wait()

    async def pause(self, delay_s: float) -> bool:
        """Wait ``delay_s`` seconds, less if a stop is requested; True when one was."""
        if not self._stop.is_set() and delay_s > 0:
            try:
                async with asyncio.timeout(delay_s):
                    await self._stop.wait()
            except TimeoutError:
                pass
        return self._stop.is_set()

    def restricted(self, check_address: AddressCheck) -> ProbeContext:
        """A view of this context whose probes vet every address with ``check_address``.

        It shares this context's resources (sockets, connection pools); closing the view closes
        nothing, closing this context closes them all.
        """
        view = ProbeContext(check_address=check_address)
        view._owner = self._owner or self
        return view

    async def resource(self, key: object, factory: Callable[[], Awaitable[R]]) -> R:
        """Return the resource stored under ``key``, creating it with ``factory`` on first use."""
        if self._owner is not None:
            return await self._owner.resource(key, factory)
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
        if self._owner is not None:
            return  # a view: its owner closes the resources
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
