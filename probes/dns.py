"""DNS probe: ask one or more resolvers for one name and record type, timed per resolver, like ``dig``.

The target is the name to query. ``resolvers`` lists who is asked, each ``ip[:port]`` (IPv6 as
``[::1]:53`` or bare ``::1``) or ``tls://ip[:port]`` (DNS over TLS, port 853 by default, whatever
``transport`` says); empty means the ``nameserver`` lines of ``/etc/resolv.conf``. Every resolver
is asked once, all at the same time, each bounded by ``timeout_s``. Resolvers are IP addresses:
no lookup happens before the query, and each address passes the caller's check
(:attr:`ProbeContext.check_address <edgeprobe.probes.context.ProbeContext>`) before it is sent
anything.

Per resolver: the query time from sending the query to having its answer (for ``tcp`` and
``tls`` a fresh connection each time: the TCP and TLS handshakes are included), the rcode
(``NOERROR``, ``NXDOMAIN``, ``SERVFAIL`` …), the records of the asked type in the answer section
(as text, sorted, de-duplicated), the smallest TTL there, and an outcome. An answer is an answer
whatever it says about the name: ``NOERROR`` (records or none) and ``NXDOMAIN`` are ``ok``;
``SERVFAIL``, ``REFUSED`` and every other rcode are ``dns_error``; no answer in time is
``timeout``; a reply that is not DNS ``protocol_error``; DoT handshake or certificate failures
``tls_error``. The wire schema's field values are scalars or lists of numbers, so the
per-resolver figures are parallel to ``resolver_set`` (the resolvers, comma-separated, in order):
``rtts_ms`` and ``ttls_min_s`` (lists, None for none), ``rcodes`` and ``outcomes`` (comma-separated,
``-`` for none), ``errors`` (the failed ones' reasons).

Summary: ``resolvers_ok`` of ``resolvers_total``; ``rtt_min_ms``/``rtt_median_ms``/``rtt_max_ms``
over the resolvers that answered ``ok``; ``rcode`` the one most of them gave; ``answers`` the union
of their answer sets (sorted, one a line, at most ``max_answers``, each cut at
:data:`MAX_ANSWER_CHARS`; ``answers_count`` before the bound), ``answers_digest`` a hash of the
rcode and the whole union, ``answers_agree`` whether they all gave the same; ``ttl_min_s`` the
smallest TTL. ``answers_changed`` compares each resolver's answer set (with its rcode) with the one
it gave in the previous run of the same name and type in the same
:class:`~edgeprobe.probes.context.ProbeContext` (an agent keeps one for its lifetime): ``True``
when any differs, ``False`` when all were compared and none did, ``None`` when nothing could be
compared (a first run, or no resolver answered).

The run is ``ok`` when at least one resolver answered ``ok``; otherwise it fails with the outcome
most resolvers failed with, every per-resolver result kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import ssl
import statistics
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import msgspec

from edgeprobe.probes import netio
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import Figure, PolicyCost, ProbeKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure, classify_exception
from edgeprobe.probes.text import num
from edgeprobe.schema import Observation

RType = Literal["A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "CAA", "HTTPS", "SVCB", "DS", "DNSKEY"]
Transport = Literal["udp", "tcp", "tls"]

MAX_RESOLVERS: Final = 16
MAX_ANSWER_CHARS: Final = 256  # one answer's text is cut here (a TXT record may be 64 KiB)
EDNS_PAYLOAD: Final = 1232  # the DNS Flag Day 2020 UDP size
RESOLV_CONF: Final = Path("/etc/resolv.conf")
MEMORY_KEY: Final = "edgeprobe.probes.dns.AnswerMemory"
MEMORY_MAX_ENTRIES: Final = 10_000  # (name, type, resolver) answer sets remembered per context

_RESOLVER_RE: Final = re.compile(r"\A(?:tls://)?(?:[0-9.]+|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+)(?::[0-9]{1,5})?\Z")
ResolverText = Annotated[str, msgspec.Meta(pattern=_RESOLVER_RE.pattern, max_length=64)]


class DnsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    # "ip[:port]" or "tls://ip[:port]"; empty: the nameservers of /etc/resolv.conf
    resolvers: Annotated[list[ResolverText], msgspec.Meta(max_length=MAX_RESOLVERS)] = []
    rtype: RType = "A"
    transport: Transport = "udp"  # for resolvers not written tls://
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0  # per resolver (they are asked at once)
    max_answers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32  # answers kept per resolver and in the union
    verify_tls: bool = True  # DoT: check the resolver's certificate
    tls_server_name: str | None = None  # DoT: SNI and the name checked; None: the resolver's IP


class DnsResult(msgspec.Struct, kw_only=True):
    rtype: str
    transport: str  # "udp", "tcp", "tls", or "mixed" when tls:// resolvers sit beside others
    resolver_set: str  # the resolvers asked, normalised, comma-separated, in order (a tag: it is configuration)
    resolvers_total: int = 0
    resolvers_ok: int = 0  # resolvers that answered NOERROR or NXDOMAIN
    rtt_min_ms: float | None = None  # over the resolvers that answered ok
    rtt_median_ms: float | None = None
    rtt_max_ms: float | None = None
    rcode: str | None = None  # the rcode most ok resolvers gave
    answers: str | None = None  # the union of the ok resolvers' answers, sorted, one a line, bounded
    answers_count: int | None = None  # answers in that union before the bound
    answers_digest: str | None = None  # hash of rcode and the whole union
    answers_agree: bool | None = None  # every ok resolver gave the same rcode and answer set
    answers_changed: bool | None = None  # some resolver's answer differs from its previous one (same context)
    ttl_min_s: int | None = None  # the smallest TTL in the ok resolvers' answer sections
    # Per resolver, in resolver_set order (lists of numbers; texts comma-separated, "-" for none):
    rtts_ms: list[float | None] = []  # query time of each resolver that answered (any rcode); None: none
    ttls_min_s: list[float | None] = []  # smallest TTL of each answer section; None: no records
    rcodes: str | None = None  # "NOERROR,NXDOMAIN,-"
    outcomes: str | None = None  # "ok,timeout"
    errors: str | None = None  # the reasons of the resolvers that failed, "; "-separated


# ----- pure parts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolver:
    text: str  # normalised: "tls://" when DoT, brackets around IPv6, the port always
    address: str
    port: int
    transport: Transport


def parse_resolver(text: str, default: Transport) -> Resolver:
    """``"ip[:port]"`` / ``"tls://ip[:port]"`` → :class:`Resolver`; :class:`ValueError` otherwise (pure)."""
    usage = f"expected a resolver as ip[:port] or tls://ip[:port], got {text!r}"
    rest = text.strip()
    transport: Transport = default
    if rest.lower().startswith("tls://"):
        transport, rest = "tls", rest[len("tls://") :]
    port_text = ""
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise ValueError(usage)
        port_text = tail[1:]
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host = rest  # IPv4 without a port, or a bare IPv6 address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(usage) from None
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(usage)
        port = int(port_text)
    else:
        port = 853 if transport == "tls" else 53
    shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return Resolver(
        text=("tls://" if transport == "tls" else "") + shown, address=str(ip), port=port, transport=transport
    )


def parse_resolv_conf(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order (pure); scoped IPv6 ones are skipped."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and "%" not in words[1]:
            try:
                found.append(str(ipaddress.ip_address(words[1])))
            except ValueError:
                continue
    return found


def check_target(target: str) -> str | None:
    """A name that can be asked (``example.net``, ``example.net.``), else what is wrong (pure)."""
    if not target or target != target.strip() or any(c.isspace() for c in target) or "@" in target:
        return f"expected a DNS name such as example.net, got {target!r}"
    try:
        dns.name.from_text(target)
    except dns.exception.DNSException as exc:
        return f"not a DNS name: {target!r} ({exc})"
    return None


@dataclass(frozen=True, slots=True)
class Answer:
    """What one DNS response says (pure, from :func:`read_answer`)."""

    rcode: str
    answers: list[str]  # every record of the asked type, as text, sorted, de-duplicated
    ttl_min_s: int | None
    truncated: bool  # the TC flag (UDP): the answer did not fit


def read_answer(response: dns.message.Message, rtype: str) -> Answer:
    """The rcode, the records of type ``rtype`` and the smallest TTL of a response (pure)."""
    wanted = dns.rdatatype.from_text(rtype)
    texts: set[str] = set()
    ttls: list[int] = []
    for rrset in response.answer:
        ttls.append(int(rrset.ttl))
        if rrset.rdtype == wanted:
            texts.update(rdata.to_text() for rdata in rrset)
    return Answer(
        rcode=dns.rcode.to_text(response.rcode()),
        answers=sorted(texts),
        ttl_min_s=min(ttls) if ttls else None,
        truncated=bool(response.flags & dns.flags.TC),
    )


def read_wire(wire: bytes, rtype: str) -> Answer:
    """:func:`read_answer` of a response as it came off the wire (pure)."""
    return read_answer(dns.message.from_wire(wire), rtype)


def bounded(answers: list[str], limit: int) -> str:
    """At most ``limit`` answers, each cut at :data:`MAX_ANSWER_CHARS` characters, one a line (pure)."""
    return "\n".join(a if len(a) <= MAX_ANSWER_CHARS else a[: MAX_ANSWER_CHARS - 1] + "…" for a in answers[:limit])


def digest(rcode: str | None, answers: list[str]) -> str:
    """A short stable hash of an rcode and an answer set (pure)."""
    text = "\n".join([rcode or "", *sorted(set(answers))])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def is_answer(rcode: str) -> bool:
    """NOERROR (with records or none) and NXDOMAIN are answers about the name; others are failures."""
    return rcode in ("NOERROR", "NXDOMAIN")


@dataclass(slots=True)
class Asked:
    """One resolver's part of a run (pure data; :func:`summarize` turns a list of them into fields)."""

    resolver: Resolver
    outcome: Outcome = Outcome.OK
    reason: str | None = None
    rtt_ms: float | None = None
    answer: Answer | None = None
    changed: bool | None = None  # versus this resolver's previous answer in the same context


def summarize(result: DnsResult, asked: list[Asked], max_answers: int) -> None:
    """Fill ``result`` from every resolver's part, in order (pure)."""
    ok = [a for a in asked if a.outcome == Outcome.OK and a.answer is not None]
    result.resolvers_total, result.resolvers_ok = len(asked), len(ok)
    result.rtts_ms = [a.rtt_ms for a in asked]
    result.ttls_min_s = [
        None if a.answer is None or a.answer.ttl_min_s is None else float(a.answer.ttl_min_s) for a in asked
    ]
    result.rcodes = ",".join("-" if a.answer is None else a.answer.rcode for a in asked)
    result.outcomes = ",".join(a.outcome.value for a in asked)
    reasons = [a.reason for a in asked if a.outcome != Outcome.OK and a.reason]
    result.errors = "; ".join(reasons)[:1024] if reasons else None
    rtts = sorted(a.rtt_ms for a in ok if a.rtt_ms is not None)
    if rtts:
        result.rtt_min_ms, result.rtt_max_ms = rtts[0], rtts[-1]
        result.rtt_median_ms = round(statistics.median(rtts), 6)
    answers = [a.answer for a in ok if a.answer is not None]
    if not answers:
        return
    result.rcode = Counter(x.rcode for x in answers).most_common(1)[0][0]
    union = sorted({text for x in answers for text in x.answers})
    result.answers, result.answers_count = bounded(union, max_answers) or None, len(union)
    result.answers_digest = digest(result.rcode, union)
    result.answers_agree = len({digest(x.rcode, x.answers) for x in answers}) == 1
    ttls = [x.ttl_min_s for x in answers if x.ttl_min_s is not None]
    result.ttl_min_s = min(ttls) if ttls else None
    flags = [a.changed for a in ok if a.changed is not None]
    result.answers_changed = any(flags) if flags else None


def transport_of(resolvers: list[Resolver]) -> str:
    kinds = {r.transport for r in resolvers}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# ----- memory across runs ------------------------------------------------------------------------


class AnswerMemory:
    """The last answer digest per (name, type, resolver), kept by a ProbeContext across runs."""

    def __init__(self, max_entries: int = MEMORY_MAX_ENTRIES) -> None:
        self._last: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._max = max_entries

    def swap(self, key: tuple[str, str, str], value: str) -> str | None:
        """Remember ``value`` under ``key`` and return what was there before (None: nothing)."""
        before = self._last.pop(key, None)
        self._last[key] = value
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        return before

    async def aclose(self) -> None:
        self._last.clear()


async def _new_memory() -> AnswerMemory:
    return AnswerMemory()


# ----- the probe ---------------------------------------------------------------------------------


def _tls_context(config: DnsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not config.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["dot"])
    return context


async def _query(query: dns.message.Message, resolver: Resolver, config: DnsConfig) -> dns.message.Message:
    t = config.timeout_s
    if resolver.transport == "udp":
        return await dns.asyncquery.udp(query, resolver.address, timeout=t, port=resolver.port)
    if resolver.transport == "tcp":
        return await dns.asyncquery.tcp(query, resolver.address, timeout=t, port=resolver.port)
    return await dns.asyncquery.tls(
        query,
        resolver.address,
        timeout=t,
        port=resolver.port,
        ssl_context=_tls_context(config),
        server_hostname=config.tls_server_name or resolver.address,
    )


def _failure(exc: BaseException, resolver: Resolver, timeout_s: float) -> tuple[Outcome, str]:
    if isinstance(exc, dns.exception.Timeout | TimeoutError):
        return Outcome.TIMEOUT, f"no answer from {resolver.text} within {netio.fmt_s(timeout_s)} s"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return Outcome.TLS_ERROR, f"{resolver.text}: TLS: {exc}"
    if isinstance(exc, dns.exception.DNSException | EOFError):
        return Outcome.PROTOCOL_ERROR, f"{resolver.text}: not a DNS answer: {type(exc).__name__}: {exc}"
    outcome, reason = classify_exception(exc)
    return outcome, f"{resolver.text}: {reason}"


async def _ask(name: str, resolver: Resolver, config: DnsConfig, ctx: ProbeContext) -> Asked:
    """Ask one resolver; every failure is its own typed outcome."""
    out = Asked(resolver)
    if ctx.check_address is not None:
        try:
            await netio.check_address(ctx.check_address, resolver.address, resolver.address, resolver.port)
        except ProbeFailure as refused:
            out.outcome, out.reason = refused.outcome, refused.reason
            return out
    query = dns.message.make_query(name, config.rtype, use_edns=0, payload=EDNS_PAYLOAD)
    t0 = time.perf_counter_ns()
    try:
        async with asyncio.timeout(config.timeout_s):
            response = await _query(query, resolver, config)
    except Exception as exc:  # translated here: one resolver's failure never ends the others
        out.outcome, out.reason = _failure(exc, resolver, config.timeout_s)
        return out
    out.rtt_ms = round((time.perf_counter_ns() - t0) / 1e6, 6)
    out.answer = answer = read_answer(response, config.rtype)
    if not is_answer(answer.rcode):
        out.outcome, out.reason = Outcome.DNS_ERROR, f"{resolver.text} answered {answer.rcode}"
        return out
    memory = await ctx.resource(MEMORY_KEY, _new_memory)
    now = digest(answer.rcode, answer.answers)
    before = memory.swap((name.lower().rstrip(".") + ".", config.rtype, resolver.text), now)
    out.changed = None if before is None else before != now
    return out


async def _system_resolvers() -> list[str]:
    try:
        text = await asyncio.to_thread(RESOLV_CONF.read_text, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ProbeFailure(Outcome.ERROR, f"no resolvers given and {RESOLV_CONF} unreadable: {exc}") from exc
    found = parse_resolv_conf(text)[:MAX_RESOLVERS]
    if not found:
        raise ProbeFailure(Outcome.ERROR, f"no resolvers given and no nameserver in {RESOLV_CONF}")
    return found


async def probe(target: str, config: DnsConfig, ctx: ProbeContext) -> DnsResult:
    """Ask every resolver of ``config`` for ``target``'s records of type ``config.rtype``."""
    problem = check_target(target)
    if problem is not None:
        raise ProbeFailure(Outcome.ERROR, problem)
    texts = list(config.resolvers) or await _system_resolvers()
    try:
        resolvers = [parse_resolver(t, config.transport) for t in texts]
    except ValueError as exc:
        raise ProbeFailure(Outcome.ERROR, str(exc)) from exc
    result = DnsResult(
        rtype=config.rtype, transport=transport_of(resolvers), resolver_set=",".join(r.text for r in resolvers)
    )
    asked = list(await asyncio.gather(*(_ask(target, r, config, ctx) for r in resolvers)))
    summarize(result, asked, config.max_answers)
    if result.resolvers_ok == 0:
        common = Counter(a.outcome for a in asked).most_common(1)[0][0]
        first = next(a for a in asked if a.outcome == common)
        more = len(asked) - 1
        reason = (first.reason or common.value) + (f" (and {more} more resolver{'s' * (more > 1)})" if more else "")
        raise ProbeFailure(common, reason, partial=result)
    return result


def max_run_s(config: DnsConfig) -> float:
    """The resolvers are asked at once, each bounded by ``timeout_s``."""
    return config.timeout_s


def policy_cost(config: DnsConfig) -> PolicyCost:
    """One query per resolver (the system's count as one when none are given)."""
    return PolicyCost(packets=max(1, len(config.resolvers)))


def render(obs: Observation) -> list[str]:
    """Like ``dig +short``: the answers, one a line, then one ``;;`` line per resolver (pure)."""
    f = obs.fields
    answers = f.get("answers")
    lines = str(answers).split("\n") if answers else []
    count = f.get("answers_count")
    if isinstance(count, int) and count > len(lines):
        lines.append(f";; … and {count - len(lines)} more")
    names = str(f.get("resolver_set") or "").split(",") if f.get("resolver_set") else []
    rcodes = str(f.get("rcodes") or "").split(",")
    outcomes = str(f.get("outcomes") or "").split(",")
    rtts = f.get("rtts_ms")
    ttls = f.get("ttls_min_s")
    for i, name in enumerate(names):
        rtt = rtts[i] if isinstance(rtts, list) and i < len(rtts) else None
        ttl = ttls[i] if isinstance(ttls, list) and i < len(ttls) else None
        rcode = rcodes[i] if i < len(rcodes) else "-"
        outcome = outcomes[i] if i < len(outcomes) else "-"
        if rtt is None:
            lines.append(f";; {name}: {outcome}")
        else:
            lines.append(f";; {name}: {rcode} in {num(rtt)} ms" + ("" if ttl is None else f", ttl {ttl:.0f} s"))
    if f.get("errors"):
        lines.append(f";; errors: {f.get('errors')}")
    if not f.get("resolvers_total"):
        lines.append(f";; {obs.target}: no resolver asked")
    else:
        changed = f.get("answers_changed")
        note = "" if changed is None else "; answers changed" if changed else "; answers unchanged"
        lines.append(
            f";; {obs.target} {f.get('rtype')} over {f.get('transport')}: {f.get('resolvers_ok')}/"
            f"{f.get('resolvers_total')} resolvers ok, fastest {num(f.get('rtt_min_ms'))} ms{note}"
        )
    return lines


KIND: Final = ProbeKind(
    name="dns",
    description="DNS query time, rcode, answers and TTL per resolver (UDP, TCP, DoT), with answer-change tracking",
    config_type=DnsConfig,
    result_type=DnsResult,
    run=probe,
    check_target=check_target,
    max_run_s=max_run_s,
    tag_fields=("rtype", "transport", "resolver_set"),
    target_label="target",
    display_target=None,
    render=render,
    headline=Figure(field="rtt_min_ms", label="query"),
    jitter=None,
    fleet_field="rtt_min_ms",
    live=None,
    aliases=(),
    floor_field=None,  # the resolvers are not where the name points: no physical floor to compare
    first_byte_round_trips=None,
    policy_cost=policy_cost,
    env_vars=None,
    privilege=None,
    sub_points=None,
    prepare=None,
)
