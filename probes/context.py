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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol, TypeAlias, TypeVar, cast


class Closeable(Protocol):
    async def aclose(self) -> None: ...


R = TypeVar("R", bound=Closeable)

AddressCheck: TypeAlias = Callable[[str, str, int], Awaitable[str | None]]
"""``(name, address, port)`` → None to go ahead, or why not (see the module docstring)."""


class ProbeContext:
    def __init__(self, *, check_address: AddressCheck | None = None) -> None:
        self._resources: dict[object, Closeable] = {}
        self._closed = False
        self._owner: ProbeContext | None = None
        self.check_address = check_address

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
