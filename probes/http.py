"""HTTP(S) probe: one request on a fresh connection, timed phase by phase like ``curl -w``.

Fields of :class:`HttpResult`, all in milliseconds from :func:`time.perf_counter_ns`:

* **durations of one phase** (of the final hop when redirects are followed):
  ``dns_ms`` (getaddrinfo), ``connect_ms`` (TCP handshake), ``tls_ms`` (TLS handshake; None for
  ``http://``).
* **cumulative from the probe's start** (curl's ``time_starttransfer`` / ``time_total``):
  ``ttfb_ms`` — until the first byte of the final response arrived; ``total_ms`` — until the last
  byte of its body arrived (or the one reaching ``max_body_bytes``). Arrival is when the bytes
  reached the stream's buffer (see :mod:`edgeprobe.probes.netio`), not when the probe's task got round to
  them. With redirects followed, both include the earlier
  hops, whose share is ``redirect_ms`` (curl's ``time_redirect``); ``ttfb_ms - redirect_ms`` is the
  final hop's own time to first byte.

``timeout_s`` bounds the whole run, redirects included; each phase waits at most for what is left of
it. A phase that was not reached is None, never 0. Redirects are not followed by default; a 3xx then
is the answer, and by default 2xx and 3xx are accepted (``expect_status`` to change that). With
``follow_redirects``, every hop's address goes through the caller's check
(:attr:`ProbeContext.check_address <edgeprobe.probes.context.ProbeContext>`) before it is
connected to: a refused hop ends the run as ``policy_refused`` and is never contacted. An
unexpected status is ``http_error`` with every field measured. The connection is never reused
(``connection`` is always ``"new"``); the request says ``Connection: close``.

For https, the final hop's TLS cipher and the facts of the certificates the server sent
(``cert_*``, ``chain_*``: subject, issuer, SANs, expiry, chain length; see
:mod:`edgeprobe.probes.tlscert`) are recorded whether or not verification is on, and are kept in
the partial result when verification refuses the certificate (``tls_error``): an expired
certificate still says when it expired. Python's ``ssl`` module does not expose a stapled OCSP
response (no ``SSL_get_tlsext_status_ocsp_resp``, no status request), so stapling is not recorded.

The target is sent as given but stored and published (the observation's ``target``, a tag) with
the values of credential-like query parameters replaced by ``REDACTED`` (:func:`redact_url`).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Final, Literal
from urllib.parse import quote, unquote_plus, urljoin, urlsplit

import msgspec

from edgeprobe.probes import netio, tlscert
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import REDACTED, Figure, PolicyCost, ProbeKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.probes.text import num
from edgeprobe.schema import Observation

REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})

HeaderName = Annotated[str, msgspec.Meta(pattern=netio.HEADER_NAME_PATTERN)]
HeaderValue = Annotated[str, msgspec.Meta(pattern=netio.HEADER_VALUE_PATTERN)]


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    method: Annotated[str, msgspec.Meta(pattern=netio.HEADER_NAME_PATTERN)] = "GET"
    headers: dict[HeaderName, HeaderValue] = {}  # replace the defaults of the same name (Host too)
    body: str | None = None  # sent UTF-8 encoded, with Content-Length
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0  # the whole run, redirects included
    follow_redirects: bool = False
    max_redirects: Annotated[int, msgspec.Meta(ge=0, le=50)] = 5
    expect_status: list[Annotated[int, msgspec.Meta(ge=100, le=599)]] | None = None  # None: 200..399
    verify_tls: bool = True
    family: Literal["auto", "ipv4", "ipv6"] = "auto"
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0)] = 10 * 1024 * 1024  # read no more than this


class HttpResult(msgspec.Struct, kw_only=True):
    address: str | None = None  # the IP connected to (final hop)
    port: int | None = None
    status: int | None = None
    http_version: str | None = None  # "1.1"
    dns_ms: float | None = None  # duration (final hop)
    connect_ms: float | None = None  # duration (final hop)
    tls_ms: float | None = None  # duration (final hop); None for http://
    ttfb_ms: float | None = None  # cumulative from the probe's start
    total_ms: float | None = None  # cumulative from the probe's start
    bytes: int | None = None  # body bytes received (after de-chunking), at most max_body_bytes
    body_truncated: bool | None = None  # True when reading stopped at max_body_bytes
    redirects: int = 0  # redirects followed
    redirect_ms: float | None = None  # time spent on the hops before the final one; None without
    tls_version: str | None = None  # e.g. "TLSv1.3"
    tls_cipher: str | None = None  # e.g. "TLS_AES_256_GCM_SHA384" (OpenSSL's name)
    # The certificates the server sent (final hop; also when verification refused them, and with
    # verify_tls: false); see edgeprobe.probes.tlscert. None for http:// and when none was received.
    cert_subject_cn: str | None = None
    cert_issuer_cn: str | None = None
    cert_issuer_o: str | None = None
    cert_sans: str | None = None  # comma-separated, the first tlscert.MAX_SANS
    cert_sans_count: int | None = None  # all of them (more than listed: cut)
    cert_not_after_at_ns: int | None = None  # the leaf's notAfter, ns since the epoch
    cert_expiry_days: float | None = None  # leaf notAfter - now, negative once expired
    chain_expiry_days: float | None = None  # the earliest notAfter among the certificates sent, - now
    chain_certs: int | None = None  # certificates the server sent, leaf included
    connection: str = "new"
    # A redirect's Location when it was not followed (a 3xx answer; the CLI suggests -L), with
    # credential-like query values replaced as in the target. None otherwise.
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Url:
    """A checked http(s) URL, split into what the client needs."""

    text: str
    tls: bool
    host: str  # ASCII (IDNA), IPv6 without brackets
    port: int
    target: str  # path and query, percent-encoded: the request target
    host_header: str  # host[:port], IPv6 in brackets, port only when not the scheme's default


_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"


def parse_url(url: str) -> Url:
    """Check and split an http(s) URL; :class:`ValueError` says what is wrong, for a person."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError(f"a URL must not contain spaces or control characters, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from exc
    netloc = parts.netloc.rpartition("@")[2]
    if netloc.count(":") > 1 and not netloc.startswith("["):
        raise ValueError(f"an IPv6 address in a URL goes in brackets: http://[::1]:8080/, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        port_text = netloc.rpartition("]")[2].rpartition(":")[2]
        if port_text.isdigit():
            raise ValueError(f"invalid port in {url!r}: {port_text} is out of range, expected 1..65535") from exc
        raise ValueError(f"invalid port {port_text!r} in {url!r}: expected a number 1..65535") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"credentials in the URL would be published with every result; "
            f"send an Authorization header instead: {url.split('@', 1)[-1]!r}"
        )
    if port == 0:
        raise ValueError(f"invalid port in {url!r}: expected 1..65535")
    tls = scheme == "https"
    default_port = 443 if tls else 80
    port = port or default_port
    if ":" in host:
        host_text = f"[{host}]"
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"invalid host name {host!r} in {url!r}") from exc
        host_text = host
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_PATH_SAFE + "?")
    host_header = host_text if port == default_port else f"{host_text}:{port}"
    return Url(text=url, tls=tls, host=host, port=port, target=target, host_header=host_header)


# Query (and fragment) parameters whose value is a credential: ``key=…``, ``api_key=…``,
# ``X-Amz-Signature=…``. A name matches when, lower-cased with "-" read as "_", it is one of these
# or ends in "_" + one of these (private_token, client_secret, x_amz_signature).
CREDENTIAL_PARAMS: Final = frozenset(
    {"key", "api_key", "apikey", "token", "access_token", "auth", "password", "secret", "sig", "signature"}
)
_PARAM_SPLIT_RE: Final = re.compile(r"([&;])")


def is_credential_param(name: str) -> bool:
    """Whether a query parameter named ``name`` (as written, maybe percent-encoded) carries a credential."""
    norm = unquote_plus(name).strip().lower().replace("-", "_")
    return norm in CREDENTIAL_PARAMS or any(norm.endswith("_" + c) for c in CREDENTIAL_PARAMS)


def _redact_params(text: str) -> str:
    parts = _PARAM_SPLIT_RE.split(text)
    for i in range(0, len(parts), 2):  # even indexes are parameters, odd ones the separators
        name, sep, value = parts[i].partition("=")
        if sep and value and is_credential_param(name):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def redact_url(url: str) -> str:
    """``url`` with the values of credential-like query and fragment parameters replaced (pure).

    What a result stores and publishes as its target (``display_target``); the request itself still
    sends them. Everything else is kept character for character.
    """
    rest, hash_, fragment = url.partition("#")
    base, qmark, query = rest.partition("?")
    if qmark:
        query = _redact_params(query)
    if hash_:
        fragment = _redact_params(fragment)
    return base + qmark + query + hash_ + fragment


def check_target(target: str) -> str | None:
    try:
        parse_url(target)
    except ValueError as exc:
        return str(exc)
    return None


def status_accepted(status: int, expect_status: list[int] | None) -> bool:
    return 200 <= status < 400 if expect_status is None else status in expect_status


def _ms(ns: int) -> float:
    return round(ns / 1e6, 6)


class _Hop:
    """What one request/response exchange measured so far."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.timing: netio.ConnectTiming | None = None
        self.status: int | None = None
        self.reason = ""
        self.http_version: str | None = None
        self.location: str | None = None
        self.ttfb_ms: float | None = None
        self.total_ms: float | None = None
        self.bytes: int | None = None
        self.truncated: bool | None = None


def _result(hop: _Hop, redirects: int, redirect_ms: float | None) -> HttpResult:
    """The result of the hop so far; built once the hop is over (parsing certificates takes CPU time
    that must not fall inside a measured phase)."""
    t = hop.timing
    c = tlscert.cert_facts(t.peer_chain_der, time.time_ns()) if t else None
    return HttpResult(
        address=t.address if t else None,
        port=hop.port,
        status=hop.status,
        http_version=hop.http_version,
        dns_ms=t.dns_ms if t else None,
        connect_ms=t.connect_ms if t else None,
        tls_ms=t.tls_ms if t else None,
        ttfb_ms=hop.ttfb_ms,
        total_ms=hop.total_ms,
        bytes=hop.bytes,
        body_truncated=hop.truncated,
        redirects=redirects,
        redirect_ms=redirect_ms,
        location=redact_url(hop.location) if hop.location and hop.status in REDIRECT_STATUSES else None,
        tls_version=t.tls_version if t else None,
        tls_cipher=t.tls_cipher if t else None,
        cert_subject_cn=c.subject_cn if c else None,
        cert_issuer_cn=c.issuer_cn if c else None,
        cert_issuer_o=c.issuer_o if c else None,
        cert_sans=c.sans if c else None,
        cert_sans_count=c.sans_count if c else None,
        cert_not_after_at_ns=c.not_after_at_ns if c else None,
        cert_expiry_days=c.expiry_days if c else None,
        chain_expiry_days=c.chain_expiry_days if c else None,
        chain_certs=c.chain_certs if c else None,
    )


async def _exchange(
    hop: _Hop,
    url: Url,
    method: str,
    body: bytes | None,
    config: HttpConfig,
    ctx: ProbeContext,
    t0: int,
    deadline_ns: int,
) -> None:
    def left_s() -> float:
        return max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9)

    try:
        request = netio.build_request(method, url.host_header, url.target, config.headers, body)
    except ValueError as exc:
        raise ProbeFailure(Outcome.ERROR, f"cannot build the request: {exc}") from exc
    try:
        conn, hop.timing = await netio.open_connection(
            url.host,
            url.port,
            tls=url.tls,
            verify=config.verify_tls,
            family=config.family,
            timeout_s=left_s(),
            budget_s=config.timeout_s,
            check=ctx.check_address,  # every hop: a redirect goes nowhere the caller refuses
        )
    except ProbeFailure as failure:
        if isinstance(failure.partial, netio.ConnectTiming):
            hop.timing = failure.partial
        raise
    try:
        await conn.send(request, timeout_s=left_s(), budget_s=config.timeout_s)
        head = await netio.read_response_head(conn, timeout_s=left_s(), budget_s=config.timeout_s)
        hop.ttfb_ms = _ms(head.first_byte_perf_ns - t0)
        hop.status, hop.http_version, hop.location = head.status, head.http_version, head.get("Location")
        hop.reason = head.reason
        try:
            framing = netio.body_framing(method, head.status, head.headers)
        except netio.HttpParseError as exc:
            raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where}: {exc}") from exc
        hop.bytes, hop.truncated = 0, False
        last_ns = head.complete_perf_ns  # when the last byte we used arrived (curl's time_total)
        async with aclosing(netio.iter_body(conn, framing, timeout_s=left_s(), budget_s=config.timeout_s)) as pieces:
            async for piece in pieces:
                room = config.max_body_bytes - hop.bytes
                hop.bytes += min(room, len(piece.data))
                last_ns = max(last_ns, piece.received_perf_ns)
                if len(piece.data) > room:
                    hop.truncated = True
                    break
        hop.total_ms = _ms(last_ns - t0)
    finally:
        await conn.aclose()


async def probe(target: str, config: HttpConfig, ctx: ProbeContext) -> HttpResult:
    """Request ``target`` once (plus redirects if asked) and time every phase."""
    t0 = time.perf_counter_ns()
    deadline_ns = t0 + int(config.timeout_s * 1e9)
    try:
        url = parse_url(target)
    except ValueError as exc:
        raise ProbeFailure(Outcome.ERROR, str(exc)) from exc
    method = config.method
    body = None if config.body is None else config.body.encode("utf-8")
    redirects = 0
    redirect_ms: float | None = None
    while True:
        hop = _Hop(url.port)
        try:
            await _exchange(hop, url, method, body, config, ctx, t0, deadline_ns)
        except ProbeFailure as failure:
            failure.partial = _result(hop, redirects, redirect_ms)
            raise
        assert hop.status is not None
        if not (config.follow_redirects and hop.status in REDIRECT_STATUSES and hop.location):
            break
        if redirects >= config.max_redirects:
            raise ProbeFailure(
                Outcome.HTTP_ERROR,
                f"more than {config.max_redirects} redirects (the next to {redact_url(hop.location)!r})",
                partial=_result(hop, redirects, redirect_ms),
            )
        try:
            url = parse_url(urljoin(url.text, hop.location))
        except ValueError as exc:
            raise ProbeFailure(
                Outcome.HTTP_ERROR,
                f"redirect to an unusable location: {exc}",
                partial=_result(hop, redirects, redirect_ms),
            ) from exc
        if (hop.status == 303 and method != "HEAD") or (hop.status in (301, 302) and method == "POST"):
            method, body = "GET", None  # what browsers and curl do
        redirects += 1
        redirect_ms = _ms(time.perf_counter_ns() - t0)
    result = _result(hop, redirects, redirect_ms)
    if not status_accepted(hop.status, config.expect_status):
        reason = hop.reason
        if not reason:
            try:
                reason = HTTPStatus(hop.status).phrase
            except ValueError:
                reason = ""
        raise ProbeFailure(Outcome.HTTP_ERROR, f"HTTP {hop.status} {reason}".rstrip(), partial=result)
    return result


PHASES: Final = (
    ("dns", "dns_ms", "name lookup"),
    ("connect", "connect_ms", "TCP handshake"),
    ("tls", "tls_ms", "TLS handshake"),
    ("ttfb", "ttfb_ms", "first byte (cumulative)"),
    ("total", "total_ms", "last byte (cumulative)"),
)


def render(obs: Observation) -> list[str]:
    """Status line, then one line per phase like ``curl -w`` (from partial fields too) (pure)."""
    f = obs.fields
    status, address, size = f.get("status"), f.get("address"), f.get("bytes")
    lines = [
        obs.target
        + (f" → {address}" if address else "")
        + (f"  status {status}" if status is not None else "")
        + (f"  {size} bytes" if size is not None else "")
        + (f"  {f.get('tls_version')}" if f.get("tls_version") else "")
    ]
    for name, key, meaning in PHASES:  # only the phases reached: a failed run shows how far it got
        if f.get(key) is not None:
            lines.append(f"  {name:<8} {num(f.get(key)):>10} ms   {meaning}")
    lines += cert_lines(f)
    if f.get("location"):
        lines.append(f"  redirect to {f['location']} (not followed; -L follows redirects)")
    return lines


def cert_lines(f: Mapping[str, Any]) -> list[str]:
    """The certificate's lines of :func:`render`: none without certificate facts (pure)."""
    days = f.get("cert_expiry_days")
    if days is None:
        return []

    def when(d: float) -> str:
        return f"expires in {d:.1f} days" if d >= 0 else f"EXPIRED {-d:.1f} days ago"

    issuer = f.get("cert_issuer_cn") or "?"
    if f.get("cert_issuer_o"):
        issuer += f" ({f['cert_issuer_o']})"
    chain = f.get("chain_expiry_days")
    lines = [
        f"  cert     {f.get('cert_subject_cn') or '-'}  issued by {issuer}  {when(days)}"
        + (f"; chain of {f.get('chain_certs')}: earliest {when(chain)}" if chain is not None else "")
    ]
    if f.get("cert_sans"):
        more = (f.get("cert_sans_count") or 0) - len(str(f["cert_sans"]).split(","))
        lines.append(f"  sans     {f['cert_sans']}" + (f" (+{more} more)" if more > 0 else ""))
    return lines


def render_summary(observations: list[Observation]) -> list[str]:
    """Totals and min/median/max over several requests (``edgeprobe http --count N``) (pure)."""
    if not observations:
        return []
    ok = [o for o in observations if o.outcome == Outcome.OK]
    failed = Counter(o.outcome for o in observations if o.outcome != Outcome.OK)
    failures = ", ".join(f"{k} {n}" for k, n in sorted(failed.items()))
    lines = [
        f"--- {len(observations)} requests to {observations[0].target}: {len(ok)} ok"
        + (f", {sum(failed.values())} failed ({failures})" if failed else "")
        + " ---"
    ]
    for name, key, _ in PHASES:
        values = sorted(float(v) for o in ok if isinstance(v := o.fields.get(key), int | float))
        if values:
            lines.append(
                f"{name:<8} min/median/max = {values[0]:.3f}/{statistics.median(values):.3f}/{values[-1]:.3f} ms"
            )
    return lines


KIND: Final = ProbeKind(
    name="http",
    description="One HTTP(S) request on a fresh connection, with dns/connect/tls/ttfb/total timings",
    config_type=HttpConfig,
    result_type=HttpResult,
    run=probe,
    check_target=check_target,
    max_run_s=lambda config: config.timeout_s,
    tag_fields=(),
    target_label="url",
    display_target=redact_url,
    render=render,
    headline=Figure(field="ttfb_ms", label="first byte"),
    jitter=None,  # one request per run: no series to vary
    fleet_field="total_ms",
    live=None,
    aliases=(),
    floor_field="connect_ms",
    first_byte_round_trips=None,
    policy_cost=lambda config: PolicyCost(packets=1),
    env_vars=None,
    privilege=None,
    sub_points=None,
    prepare=None,
)
