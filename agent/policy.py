"""The agent's target policy (the ``policy:`` section of its LOCAL file): what remote requests may do.

Nothing from the broker can change it. It applies to every job that comes from the controller:
ad-hoc requests (:meth:`TargetPolicy.admit`, per request) and central configuration documents
(:meth:`TargetPolicy.job_problems` and :meth:`TargetPolicy.rate_problem` when a document is
applied: one refused target refuses the whole document, and the configuration in force stays).
The owner's own file jobs are exempt unless ``apply_to_file_jobs: true`` (then their targets and
packets are checked at start, and their connections at run time, like central jobs).

What holds:

* **Addresses.** By default a remote job may not aim at private, loopback, link-local, multicast,
  reserved or otherwise non-global addresses. Names are resolved and *every* address they resolve
  to is checked; old IPv4 spellings (``127.1``, ``0x7f.1``, ``2130706433``, ``017.0.0.1``) are read
  as the address the system's resolver would make of them. An IPv6 address that carries an IPv4
  address (:func:`embedded_ipv4`: IPv4-mapped ``::ffff:a.b.c.d``, IPv4-translated, IPv4-compatible,
  NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) is refused when the IPv4 one is denied or
  not global. ``deny_cidrs`` refuses an address or the IPv4 address it carries; ``allow_cidrs``
  admits an address itself (or, for an IPv4-mapped one, its IPv4 address: the same host);
  ``allow_hosts`` admits exact names whatever they resolve to.
* **At connect time too.** The agent runs remote jobs with a
  :attr:`ProbeContext.check_address <edgeprobe.probes.context.ProbeContext>` built here
  (:meth:`TargetPolicy.address_check`): every connection a probe opens, each redirect hop
  included, is checked after resolving and before connecting, and the probe connects to exactly
  the address that was checked. A name whose DNS answer changes after admission (DNS rebinding),
  or a redirect to a refused address, ends the run as ``policy_refused`` without contact.
* **Caps.** Ad-hoc: requests per target per minute (counted per resolved address, so every
  spelling of one address shares its count), packets per request, concurrent requests, and a model
  token budget per hour. What one request costs is its kind's ``policy_cost`` (ICMP and TCP:
  ``count`` packets; an inference request is charged its ``max_tokens`` up front, the most it can
  cost). Central: every job's packets per run (``max_packets_per_request``) and the runs per second
  all central documents together impose, ``sum(targets / interval_s)`` over their jobs
  (``max_central_runs_per_s``).
* **Secrets.** A remote job may read only the environment variables listed in ``api_key_envs``
  (a kind declares what it reads: ``env_vars``). The agent's own credentials
  (:func:`agent_secret_env`: ``EDGEPROBE_BROKER_*``, ``EDGEPROBE_INFLUX_*``,
  ``EDGEPROBE_CONTROLLER_*`` and every variable the agent's config loading reads) are never
  readable by any job, the file's included (refused in ``agent/config.py``'s ``build_jobs``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Final, Protocol
from urllib.parse import urlsplit

import msgspec

from edgeprobe.mqtt import BROKER_ENV
from edgeprobe.probes.context import AddressCheck
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.registry import get_kind

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[list[str]]]

AGENT_SECRET_ENV_PREFIXES: Final = ("EDGEPROBE_BROKER_", "EDGEPROBE_INFLUX_", "EDGEPROBE_CONTROLLER_")
AGENT_CONFIG_ENV: Final = frozenset(BROKER_ENV)  # what load_agent_config reads from the environment
ENV_NAME_RE: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_LISTED_PROBLEMS: Final = 10  # a refused document's reason names at most this many problems


def agent_secret_env(name: str) -> bool:
    """Whether the environment variable ``name`` holds (or may hold) the agent's own credentials."""
    upper = name.upper()
    return upper in AGENT_CONFIG_ENV or upper.startswith(AGENT_SECRET_ENV_PREFIXES)


class PolicyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    allow_cidrs: list[str] = []  # e.g. ["10.20.0.0/16", "127.0.0.0/8", "::1/128"]
    allow_hosts: list[str] = []  # exact names allowed whatever they resolve to (case-insensitive)
    deny_cidrs: list[str] = []  # refused even if global
    max_requests_per_target_per_min: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 6
    max_packets_per_request: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    max_concurrent_requests: Annotated[int, msgspec.Meta(ge=0, le=1_000)] = 4
    inference_tokens_per_hour: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] = 2000
    # Runs per second all central documents together may impose: sum over their jobs of
    # targets / interval_s. 2/s is e.g. 60 targets every 30 s; with max_packets_per_request 10 it
    # bounds what the controller can make this agent send at 20 packets/s. 0: no central jobs.
    max_central_runs_per_s: Annotated[float, msgspec.Meta(ge=0, le=100_000)] = 2.0
    apply_to_file_jobs: bool = False  # also check this file's own jobs (targets, packets, connections)
    api_key_envs: list[str] = []  # environment variables remote requests may name (api_key_env)

    def __post_init__(self) -> None:
        for key in ("allow_cidrs", "deny_cidrs"):
            for i, cidr in enumerate(getattr(self, key)):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"{key}[{i}]: expected a CIDR like 10.0.0.0/8, got {cidr!r}") from None
        for i, name in enumerate(self.api_key_envs):
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"api_key_envs[{i}]: expected an environment variable name, got {name!r}")
            if agent_secret_env(name):
                raise ValueError(
                    f"api_key_envs[{i}]: {name} holds this agent's own credentials; no request may read it"
                )


class PolicyRefusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class PolicedJob(Protocol):
    """What the policy looks at in a job (``edgeprobe.agent.config.Job`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> AnyKind: ...
    @property
    def targets(self) -> tuple[str, ...]: ...
    @property
    def interval_s(self) -> float: ...
    @property
    def config(self) -> Any: ...


def target_host(target: str) -> str:
    """The host part of a target: ``host``, ``host:port``, ``[v6]:port``, a bare IPv6 or a URL (pure)."""
    if "://" in target:
        try:
            host = urlsplit(target).hostname
        except ValueError:
            host = None
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


_LEGACY_PART_RE: Final = re.compile(r"\A(?:0[xX][0-9A-Fa-f]*|0[0-7]*|[1-9][0-9]*)\Z")


def legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``inet_aton`` (and so the system's resolver) reads in ``host``, or None (pure).

    One to four parts, each decimal, octal (leading ``0``) or hex (``0x``); the last part fills the
    bytes left: ``127.1`` is 127.0.0.1, ``0x7f.1`` too, ``2130706433`` too, ``017.0.0.1`` is 15.0.0.1.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_LEGACY_PART_RE.match(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p[:2] in ("0x", "0X"):
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    last_bits = 8 * (4 - len(head))
    if any(v > 255 for v in head) or last >= 1 << last_bits:
        return None
    n = 0
    for v in head:
        n = (n << 8) | v
    return ipaddress.IPv4Address((n << last_bits) | last)


def parse_address(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one (a zone ``%eth0`` dropped, old IPv4 forms read), else None."""
    text = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return legacy_ipv4(text)


_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED: Final = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
_NAT64: Final = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/96"))
_6TO4: Final = ipaddress.IPv6Network("2002::/16")
_TEREDO: Final = ipaddress.IPv6Network("2001::/32")


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries towards its destination, or None (pure).

    IPv4-mapped ``::ffff:a.b.c.d`` (the same host, on a dual-stack socket), IPv4-translated
    ``::ffff:0:a.b.c.d`` (RFC 6145), IPv4-compatible ``::a.b.c.d`` (deprecated; not ``::`` or
    ``::1``), NAT64 ``64:ff9b::a.b.c.d`` (RFC 6052) and the local-use ``64:ff9b:1::/96`` form
    (RFC 8215), 6to4 ``2002:aabb:ccdd::/48`` (RFC 3056) and Teredo ``2001:0::/32`` (the client's
    address, stored inverted, RFC 4380). An IPv4 address carries none.
    """
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    n = int(addr)
    low32 = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if addr in _MAPPED or addr in _TRANSLATED or any(addr in net for net in _NAT64):
        return low32
    if addr in _COMPATIBLE:
        return low32 if n > 1 else None
    if addr in _6TO4:
        return ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)
    if addr in _TEREDO:
        return ipaddress.IPv4Address((n & 0xFFFFFFFF) ^ 0xFFFFFFFF)
    return None


def same_host_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped IPv6 address is (the same host), or None (pure)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr in _MAPPED:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def classify(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public unicast address, or None when it is (pure).

    An IPv6 address carrying an IPv4 one (:func:`embedded_ipv4`) is what its IPv4 address is when
    that is not global; otherwise, what the IPv6 address itself is (an IPv4-mapped one: what its
    IPv4 address is).
    """
    inner = embedded_ipv4(addr)
    if inner is not None:
        why = classify(inner)
        if why is not None or same_host_ipv4(addr) is not None:
            return why
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(addr, f"is_{name}"):
            return name
    if not addr.is_global:
        return "reserved"
    return None


def rate_key(addr: IPAddress) -> str:
    """The one name of an address in the per-target rate count: IPv4-mapped forms count as IPv4."""
    return str(same_host_ipv4(addr) or addr)


async def system_resolve(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _listed(problems: list[str]) -> str:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


class TargetPolicy:
    """Admission of remote requests: :meth:`admit` (then :meth:`release`) for ad-hoc ones,
    :meth:`job_problems` and :meth:`rate_problem` for central jobs, :meth:`address_check` for
    the connections of both."""

    def __init__(self, cfg: PolicyConfig, resolve: Resolver = system_resolve) -> None:
        self.resolve = resolve
        self.update(cfg)
        self._recent: dict[str, deque[float]] = {}  # address -> monotonic times of admitted requests
        self._tokens: deque[tuple[float, int]] = deque()  # (monotonic, tokens charged)
        self.active = 0

    def update(self, cfg: PolicyConfig) -> None:
        """Take new rules (a reload of the agent's file). What was admitted stays counted (requests
        per target in the last minute, tokens in the last hour, requests running), and every
        :meth:`address_check` made before applies the new rules from its next connection on."""
        self.cfg = cfg
        self._allow = [ipaddress.ip_network(c, strict=False) for c in cfg.allow_cidrs]
        self._deny = [ipaddress.ip_network(c, strict=False) for c in cfg.deny_cidrs]
        self._hosts = {h.lower().rstrip(".") for h in cfg.allow_hosts}

    def tokens_used_last_hour(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        while self._tokens and self._tokens[0][0] <= now - 3600:
            self._tokens.popleft()
        return sum(n for _, n in self._tokens)

    # ------------------------------------------------------------------ addresses

    def check_address(self, addr: IPAddress) -> None:
        inner = embedded_ipv4(addr)
        for a in (addr, inner):
            if a is not None and any(a in net for net in self._deny):
                via = "" if a is addr else f" (it carries {a})"
                raise PolicyRefusal("policy_denied", f"{addr}{via} is in a denied range (policy.deny_cidrs)")
        same = same_host_ipv4(addr)
        if any(a is not None and any(a in net for net in self._allow) for a in (addr, same)):
            return
        why = classify(addr)
        if why is not None:
            via = f" ({addr} carries {inner})" if inner is not None and classify(inner) == why else ""
            raise PolicyRefusal(
                f"policy_{why}",
                f"{addr} is a {why.replace('_', '-')} address{via}; not allowed by this agent's policy",
            )

    def _allowed_name(self, name: str) -> bool:
        return name.lower().rstrip(".") in self._hosts

    async def check_target(self, target: str) -> list[IPAddress]:
        """Refuse a target whose host is, or resolves to, an address the policy refuses.

        Returns the addresses checked ([] for an ``allow_hosts`` name that does not resolve).
        """
        host = target_host(target).lower().rstrip(".")
        if not host or any(c.isspace() or not c.isprintable() for c in host):
            raise PolicyRefusal("bad_target", f"no usable host in {target!r}")
        literal = parse_address(host)
        if literal is not None:
            self.check_address(literal)
            return [literal]
        allowed = host in self._hosts
        try:
            names = await self.resolve(host)
        except OSError as err:
            if allowed:
                return []
            raise PolicyRefusal("dns_error", f"cannot resolve {host!r}: {err}") from None
        addrs = [a for a in (parse_address(n) for n in names) if a is not None]
        if not addrs and not allowed:
            raise PolicyRefusal("dns_error", f"{host!r} resolves to no address")
        if not allowed:
            for a in addrs:
                self.check_address(a)
        return addrs

    def address_check(self) -> AddressCheck:
        """The check a probe makes before each connection (see ``ProbeContext.check_address``)."""

        async def check(name: str, address: str, port: int) -> str | None:
            if self._allowed_name(name):
                return None
            addr = parse_address(address)
            if addr is None:
                return f"bad_target: {address!r} is not an IP address"
            try:
                self.check_address(addr)
            except PolicyRefusal as ref:
                return f"{ref.code}: {ref.reason}"
            return None

        return check

    # ------------------------------------------------------------------ what a job may read and cost

    def check_env(self, kind: AnyKind, config: Any) -> None:
        """Refuse a remote job that would read an environment variable the owner did not list."""
        for name in kind.reads_env(config):
            if agent_secret_env(name):
                raise PolicyRefusal(
                    "env_reserved",
                    f"{name} holds this agent's own credentials; no request may read it (api_key_env)",
                )
            if name not in self.cfg.api_key_envs:
                raise PolicyRefusal(
                    "env_not_allowed",
                    f"{name} is not in policy.api_key_envs; a remote request may read only the "
                    "environment variables listed there (api_key_env)",
                )

    def check_packets(self, kind: AnyKind, config: Any) -> int:
        packets = kind.policy_cost(config).packets
        if packets > self.cfg.max_packets_per_request:
            raise PolicyRefusal(
                "too_many_packets",
                f"count {packets} above policy.max_packets_per_request ({self.cfg.max_packets_per_request})",
            )
        return packets

    # ------------------------------------------------------------------ central (and file) jobs

    async def job_problems(self, jobs: Sequence[PolicedJob], *, remote: bool = True) -> list[str]:
        """What the policy refuses in ``jobs``, one line each (``job 'x' (tcp) target '…': code: why``).

        Every target of every job is checked (names resolved, 16 at a time), with each job's packets
        per run and, for ``remote`` jobs, the environment variables it reads. [] when all is well.
        """
        problems: list[str] = []
        gate = asyncio.Semaphore(16)

        async def target_problem(job: PolicedJob, target: str) -> str | None:
            async with gate:
                try:
                    await self.check_target(target)
                except PolicyRefusal as ref:
                    return f"job {job.name!r} ({job.kind.name}) target {job.kind.shown_target(target)!r}: " + (
                        f"{ref.code}: {ref.reason}"
                    )
            return None

        for job in jobs:
            checks = [self.check_packets, *([self.check_env] if remote else [])]
            for check in checks:
                try:
                    check(job.kind, job.config)
                except PolicyRefusal as ref:
                    problems.append(f"job {job.name!r} ({job.kind.name}): {ref.code}: {ref.reason}")
            found = await asyncio.gather(*(target_problem(job, t) for t in job.targets))
            problems.extend(p for p in found if p is not None)
        return problems

    @staticmethod
    def runs_per_s(jobs: Sequence[PolicedJob]) -> float:
        """The runs per second ``jobs`` make: the sum over them of targets / interval_s."""
        return sum(len(job.targets) / job.interval_s for job in jobs)

    def rate_problem(self, jobs: Sequence[PolicedJob]) -> str | None:
        """Why ``jobs`` (all central jobs together) run too often for the policy, or None."""
        rate = self.runs_per_s(jobs)
        cap = self.cfg.max_central_runs_per_s
        if rate > cap * (1 + 1e-9):
            return (
                f"too_many_runs: central jobs would make {rate:.3g} runs/s (targets / interval_s, summed), "
                f"above policy.max_central_runs_per_s ({cap:g})"
            )
        return None

    async def central_refusal(self, jobs: Sequence[PolicedJob], all_central: Sequence[PolicedJob]) -> str | None:
        """Why a central document with ``jobs`` (``all_central``: every central job once it applies)
        must be refused, or None."""
        problems = await self.job_problems(jobs)
        rate = self.rate_problem(all_central)
        if rate is not None:
            problems.append(rate)
        return f"refused by this agent's policy: {_listed(problems)}" if problems else None

    async def file_refusal(self, jobs: Sequence[PolicedJob]) -> str | None:
        """Why the file's own ``jobs`` break the policy (with ``apply_to_file_jobs``), or None."""
        problems = await self.job_problems(jobs, remote=False)
        if not problems:
            return None
        return f"policy.apply_to_file_jobs: the file's jobs break this agent's policy: {_listed(problems)}"

    # ------------------------------------------------------------------ ad-hoc requests

    async def admit(self, kind: str, target: str, config: Any) -> None:
        """Refuse (:class:`PolicyRefusal`) or take a slot; the caller must :meth:`release` after."""
        cfg = self.cfg
        if self.active >= cfg.max_concurrent_requests:
            raise PolicyRefusal(
                "too_many_requests", f"{self.active} ad-hoc requests running (policy.max_concurrent_requests)"
            )
        k = get_kind(kind)
        self.check_packets(k, config)
        self.check_env(k, config)
        addrs = await self.check_target(target)
        now = time.monotonic()
        keys = sorted({rate_key(a) for a in addrs}) or [target_host(target).lower().rstrip(".")]
        if len(self._recent) > 10_000:  # forget targets not asked for within the minute
            for h in [h for h, d in self._recent.items() if not d or d[-1] <= now - 60]:
                del self._recent[h]
        counts = [self._recent.setdefault(key, deque()) for key in keys]
        for key, recent in zip(keys, counts, strict=True):
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= cfg.max_requests_per_target_per_min:
                raise PolicyRefusal(
                    "rate_limited",
                    f"{len(recent)} requests to {key} in the last minute (policy.max_requests_per_target_per_min)",
                )
        tokens = k.policy_cost(config).tokens
        if tokens:
            used = self.tokens_used_last_hour(now)
            if used + tokens > cfg.inference_tokens_per_hour:
                raise PolicyRefusal(
                    "token_budget",
                    f"inference token budget spent: {used} of {cfg.inference_tokens_per_hour} tokens in the last hour "
                    f"(this request may use {tokens})",
                )
            self._tokens.append((now, tokens))
        for recent in counts:
            recent.append(now)
        self.active += 1

    def release(self) -> None:
        self.active -= 1
