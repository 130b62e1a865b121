"""The agent's target policy for ad-hoc requests (the ``policy:`` section of its LOCAL file).

Nothing from the broker can change it. By default an ad-hoc request may not aim at private,
loopback, link-local, multicast, reserved or otherwise non-global addresses; names are resolved
and *every* address they resolve to is checked. ``allow_cidrs`` / ``allow_hosts`` open exceptions.
Caps: requests per target per minute, packets per request, concurrent ad-hoc requests, and a
model token budget per hour. What one request costs is its kind's ``policy_cost`` (ICMP and TCP:
``count`` packets; an inference request is charged its ``max_tokens`` up front, the most it can
cost).

Limit: the probe resolves the name again when it runs; a name whose DNS answer changes between
the check and the probe (DNS rebinding) is not caught.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec

from edgeprobe.probes.registry import get_kind

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[list[str]]]


class PolicyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    allow_cidrs: list[str] = []  # e.g. ["10.20.0.0/16", "127.0.0.0/8", "::1/128"]
    allow_hosts: list[str] = []  # exact names allowed whatever they resolve to (case-insensitive)
    deny_cidrs: list[str] = []  # refused even if global
    max_requests_per_target_per_min: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 6
    max_packets_per_request: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    max_concurrent_requests: Annotated[int, msgspec.Meta(ge=0, le=1_000)] = 4
    inference_tokens_per_hour: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] = 2000

    def __post_init__(self) -> None:
        for key in ("allow_cidrs", "deny_cidrs"):
            for i, cidr in enumerate(getattr(self, key)):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"{key}[{i}]: expected a CIDR like 10.0.0.0/8, got {cidr!r}") from None


class PolicyRefusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def target_host(target: str) -> str:
    """The host part of a target: ``host``, ``host:port``, ``[v6]:port``, a bare IPv6 or a URL (pure)."""
    if "://" in target:
        host = urlsplit(target).hostname
        if not host:
            raise PolicyRefusal("bad_target", f"no host in {target!r}")
        return host
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise PolicyRefusal("bad_target", f"unbalanced '[' in {target!r}")
        return target[1:end]
    if target.count(":") == 1:
        return target.split(":", 1)[0]
    return target


def classify(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public unicast address, or None when it is (pure)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return classify(addr.ipv4_mapped)
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(addr, f"is_{name}"):
            return name
    if not addr.is_global:
        return "reserved"
    return None


async def system_resolve(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class TargetPolicy:
    """Admission of ad-hoc requests. Use :meth:`admit` then release the returned ticket."""

    def __init__(self, cfg: PolicyConfig, resolve: Resolver = system_resolve) -> None:
        self.cfg = cfg
        self.resolve = resolve
        self._allow = [ipaddress.ip_network(c, strict=False) for c in cfg.allow_cidrs]
        self._deny = [ipaddress.ip_network(c, strict=False) for c in cfg.deny_cidrs]
        self._hosts = {h.lower().rstrip(".") for h in cfg.allow_hosts}
        self._recent: dict[str, deque[float]] = {}  # host -> monotonic times of admitted requests
        self._tokens: deque[tuple[float, int]] = deque()  # (monotonic, tokens charged)
        self.active = 0

    def tokens_used_last_hour(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        while self._tokens and self._tokens[0][0] <= now - 3600:
            self._tokens.popleft()
        return sum(n for _, n in self._tokens)

    def check_address(self, addr: IPAddress) -> None:
        if any(addr in net for net in self._deny):
            raise PolicyRefusal("policy_denied", f"{addr} is in a denied range (policy.deny_cidrs)")
        if any(addr in net for net in self._allow):
            return
        why = classify(addr)
        if why is not None:
            raise PolicyRefusal(
                f"policy_{why}", f"{addr} is a {why.replace('_', '-')} address; not allowed by this agent's policy"
            )

    async def check_target(self, target: str) -> None:
        host = target_host(target).lower().rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            self.check_address(literal)
            return
        if host in self._hosts:
            return
        try:
            addrs = await self.resolve(host)
        except OSError as err:
            raise PolicyRefusal("dns_error", f"cannot resolve {host!r}: {err}") from None
        if not addrs:
            raise PolicyRefusal("dns_error", f"{host!r} resolves to no address")
        for a in addrs:
            self.check_address(ipaddress.ip_address(a.split("%", 1)[0]))

    async def admit(self, kind: str, target: str, config: Any) -> None:
        """Refuse (:class:`PolicyRefusal`) or take a slot; the caller must :meth:`release` after."""
        cfg = self.cfg
        if self.active >= cfg.max_concurrent_requests:
            raise PolicyRefusal(
                "too_many_requests", f"{self.active} ad-hoc requests running (policy.max_concurrent_requests)"
            )
        cost = get_kind(kind).policy_cost(config)
        packets = cost.packets
        if packets > cfg.max_packets_per_request:
            raise PolicyRefusal(
                "too_many_packets",
                f"count {packets} above policy.max_packets_per_request ({cfg.max_packets_per_request})",
            )
        await self.check_target(target)
        now = time.monotonic()
        host = target_host(target).lower()
        if len(self._recent) > 10_000:  # forget targets not asked for within the minute
            for h in [h for h, d in self._recent.items() if not d or d[-1] <= now - 60]:
                del self._recent[h]
        recent = self._recent.setdefault(host, deque())
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if len(recent) >= cfg.max_requests_per_target_per_min:
            raise PolicyRefusal(
                "rate_limited",
                f"{len(recent)} requests to {host} in the last minute (policy.max_requests_per_target_per_min)",
            )
        tokens = cost.tokens
        if tokens:
            used = self.tokens_used_last_hour(now)
            if used + tokens > cfg.inference_tokens_per_hour:
                raise PolicyRefusal(
                    "token_budget",
                    f"inference token budget spent: {used} of {cfg.inference_tokens_per_hour} tokens in the last hour "
                    f"(this request may use {tokens})",
                )
            self._tokens.append((now, tokens))
        recent.append(now)
        self.active += 1

    def release(self) -> None:
        self.active -= 1
