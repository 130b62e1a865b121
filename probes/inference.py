"""Inference probe: one streaming LLM request, timed the way the person waiting for it sees it.

One run = one request = one observation. The request goes to ``target`` (a base URL such as
``https://api.example.net`` or ``http://10.0.0.5:8000/v1``; the API's path is appended, see
:func:`request_path`) in one of the formats of :data:`edgeprobe.probes.llmstream.APIS`, and the streamed
answer is read incrementally with a timestamp per socket read (:mod:`edgeprobe.probes.netio`) and parsed by
:mod:`edgeprobe.probes.llmstream`, which defines the figures.

Clock (all :func:`time.perf_counter_ns`, all ``*_ms`` fields cumulative from the run's start,
except the three phase durations):

* The run starts just before the request is sent. On a new connection sending starts with the
  DNS lookup, so the start is taken before it, and ``dns_ms``, ``connect_ms``, ``tls_ms`` (phase
  durations, as the http probe measures them) are inside every later mark. ``setup_ms`` is when
  the request bytes were written (the handshakes plus the client's own work between them; near
  zero on a reused connection).
* ``ttfb_ms``: the first byte of the response (its status line and headers arrive with it).
* ``ttft_ms``: the first event with non-empty generated text (llmstream's content events).
* ``e2e_ms``: the last content event; ``stream_end_ms``: the end marker (or the end of the body).
* ``itl_*_ms``, ``tpot_ms``, ``tokens_per_s``, ``chunks``, ``output_tokens``: from
  :class:`edgeprobe.probes.llmstream.StreamFigures`.

Network versus server: with ``measure_net_rtt`` a separate TCP connection to the same host and
port is opened and closed just before the request; its handshake time is ``net_rtt_ms``, one
network round trip. ``server_ms = ttft_ms - setup_ms - net_rtt_ms``: what is left of the time to
first token once the connection set-up and the one round trip the request and the first token
need are taken away (queueing, prefill, the first decode step, and whatever sits between the TCP
endpoint and the model). See the README for its limits.

Connections: ``connection: new`` (default) opens a fresh connection for every run and closes it
(``Connection: close``). ``connection: reuse`` keeps it open afterwards in a pool owned by the
:class:`~edgeprobe.probes.context.ProbeContext`, and the next run to the same origin reuses it if it is
still open and was idle at most ``max_idle_s`` (``connection = "reused"``, no dns/connect/tls).
A reused connection that turns out to be closed before any response byte (the server's
keep-alive timeout racing our request) is replaced by a new one once, and the run is timed on it.

Failures are typed (:class:`~edgeprobe.probes.outcome.Outcome`), always with the partial result (which
carries ``model`` and ``api``): HTTP status outside 2xx → ``http_error`` with the provider's
message; no content before ``first_token_timeout_s`` → ``timeout`` ("no token within …");
the body not finished within ``timeout_s`` → ``timeout`` ("stream stalled after N content
chunk(s) …"); a complete body instead of a stream → ``not_streaming``; an error event in the
stream → ``stream_error``; the connection closed before the end marker → ``stream_cut``; events
that are not the API's JSON → ``malformed_stream``; a proper end without text → ``no_content``.

The API key is read at run time from the environment variable named by ``api_key_env`` (the
config never holds it), held as a :class:`~edgeprobe.configfile.Secret`, sent as the API expects
(``Authorization: Bearer`` or ``x-api-key``; ``api_key_header`` to name another header) and
removed from every reason and recorded string, in case a server echoes it. The kind declares the
variable (``env_vars``): an agent lets a remote request name only those its policy allows. A key in
the target URL's query (``?key=…``) is sent, but stored and published as ``REDACTED``
(``display_target``, :func:`edgeprobe.probes.http.redact_url`).

Every connection (the request's, ``net_rtt``'s, a kept one before reuse) goes only to an address the
caller's :attr:`ProbeContext.check_address <edgeprobe.probes.context.ProbeContext>` accepts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import aclosing
from http import HTTPStatus
from typing import Annotated, Any, Final, Literal

import msgspec

from edgeprobe.configfile import Secret
from edgeprobe.probes import geo, llmstream, netio
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.http import HeaderName, HeaderValue, Url, parse_url, redact_url
from edgeprobe.probes.kind import Figure, PolicyCost, ProbeKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.probes.text import num
from edgeprobe.schema import Observation

DEFAULT_PROMPT: Final = "Reply with one short sentence."
# Response headers that say what served a request (ids, server, CDN/proxy hops, region, cache)
# and the provider's own timing; recorded when present, into server_headers.
DEFAULT_RECORD_HEADERS: Final = (
    "x-request-id",
    "request-id",
    "cf-ray",
    "server",
    "via",
    "x-served-by",
    "x-cache",
    "x-amz-cf-pop",
    "x-amzn-requestid",
    "fly-request-id",
    "x-ms-region",
    "apim-request-id",
    "openai-processing-ms",
    "openai-version",
    "retry-after",
)
# Headers that carry credentials: not allowed in extra_headers, where the secret would sit in
# the config file. The key goes in an environment variable named by api_key_env.
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key"})
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"

NET_RTT_MAX_TIMEOUT_S: Final = 3.0  # budget of the net_rtt connection (resolve + handshake)
AFTER_END_GRACE_S: Final = 1.0  # how long the body may take to end after the end marker / error event
ERROR_BODY_MAX_BYTES: Final = 16 * 1024  # read at most this much of an error body
EXTRA_BODY_MAX_BYTES: Final = 64 * 1024  # extra_body as JSON, at most
# A streamed answer larger than this ends the run as a protocol_error (a hostile or broken server
# must not fill the agent's memory); ~300,000 tokens of OpenAI SSE, far beyond a probe's max_tokens.
STREAM_BODY_MAX_BYTES: Final = 64 << 20
ERROR_BODY_TIMEOUT_S: Final = 2.0  # and for at most this long
PROVIDER_MESSAGE_MAX_CHARS: Final = 200
HEADER_VALUE_MAX_CHARS: Final = 200
MAX_RECORD_HEADERS: Final = 32
CLOSE_SLACK_S: Final = 1.0  # closing connections at the end (each close waits at most 0.5 s)

Connection = Literal["new", "reuse"]


class InferenceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # required; an InfluxDB tag
    api: llmstream.Api = "openai-chat"
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)] = DEFAULT_PROMPT
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 16  # a probe costs money: keep it small
    include_usage: bool = True  # OpenAI stream_options.include_usage, TGI details
    api_key_env: Annotated[str, msgspec.Meta(pattern=ENV_NAME_PATTERN)] | None = None  # the NAME of the variable
    api_key_header: HeaderName | None = None  # send the key as-is in this header instead of the API's default
    extra_headers: dict[HeaderName, HeaderValue] = {}  # replace the defaults of the same name
    extra_body: dict[str, Any] = {}  # deep-merged into the request body last
    record_headers: tuple[HeaderName, ...] = DEFAULT_RECORD_HEADERS
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0  # the whole request, from the start
    first_token_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 15.0  # from the start; capped by timeout_s
    connection: Connection = "new"
    max_idle_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0  # reuse: older idle connections are closed
    measure_net_rtt: bool = True
    verify_tls: bool = True
    family: Literal["auto", "ipv4", "ipv6"] = "auto"

    def __post_init__(self) -> None:
        for name in self.extra_headers:
            if name.lower() in CREDENTIAL_HEADERS:
                raise ValueError(
                    f"extra_headers: {name!r} carries a credential, which must not sit in a config file; "
                    "put the key in an environment variable and name it in api_key_env "
                    "(and api_key_header for a header other than the API's usual one)"
                )
        if len(self.record_headers) > MAX_RECORD_HEADERS:
            raise ValueError(f"record_headers: at most {MAX_RECORD_HEADERS} header names")
        if protected := llmstream.protected_overrides(self.extra_body):
            raise ValueError(
                f"extra_body: may not set {', '.join(protected)}: they set what a request costs or "
                "measures (use max_tokens, model and prompt; n and streaming are fixed)"
            )
        if len(msgspec.json.encode(self.extra_body)) > EXTRA_BODY_MAX_BYTES:
            raise ValueError(f"extra_body: more than {EXTRA_BODY_MAX_BYTES} bytes as JSON")


class InferenceResult(msgspec.Struct, kw_only=True):
    model: str  # as configured (an InfluxDB tag)
    api: str  # llmstream.Api (an InfluxDB tag)
    address: str | None = None  # the IP the request went to
    port: int | None = None
    connection: str | None = None  # "new" | "reused"; None: no connection was made
    tls_version: str | None = None
    status: int | None = None
    # Phase durations of a new connection (None on a reused one).
    dns_ms: float | None = None
    connect_ms: float | None = None
    tls_ms: float | None = None
    # Cumulative from the run's start.
    setup_ms: float | None = None  # the request was written
    ttfb_ms: float | None = None  # first response byte
    ttft_ms: float | None = None  # first content event
    e2e_ms: float | None = None  # last content event
    stream_end_ms: float | None = None  # end marker, else end of the body
    # The stream.
    itl_p50_ms: float | None = None  # gaps between content events (chunk cadence)
    itl_p95_ms: float | None = None
    itl_max_ms: float | None = None
    tpot_ms: float | None = None  # (e2e - ttft) / (output_tokens - 1)
    chunks: int | None = None  # content events
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # "usage" (the server's report) | "chunks" (counted)
    prompt_tokens: int | None = None
    tokens_per_s: float | None = None  # (output_tokens - 1) / (e2e - ttft)
    finish_reason: str | None = None
    # Network versus server.
    net_rtt_ms: float | None = None  # TCP handshake on a separate connection just before the request
    server_ms: float | None = None  # ttft_ms - setup_ms - net_rtt_ms
    # The server's own durations (Ollama).
    load_ms: float | None = None
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    server_total_ms: float | None = None
    # Oddities and provenance.
    keepalive_events: int | None = None  # comments / pings in the stream
    malformed_events: int | None = None
    error_type: str | None = None  # the provider's error type (HTTP error body or error event)
    server_headers: str | None = None  # JSON object of the record_headers found, names lower-cased


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def check_target(target: str) -> str | None:
    try:
        parse_url(target)
    except ValueError as exc:
        return str(exc)
    return None


def max_run_s(config: InferenceConfig) -> float:
    rtt = min(config.timeout_s, NET_RTT_MAX_TIMEOUT_S) if config.measure_net_rtt else 0.0
    return config.timeout_s + rtt + CLOSE_SLACK_S


def request_path(base_target: str, api_path: str) -> str:
    """The request target: the base URL's path with ``api_path`` appended, its query kept.

    A base that already ends with the API's path is used as it is, and a base ending in ``/v1``
    (the OpenAI SDKs' ``base_url`` convention) is not doubled: ``/v1`` + ``/v1/chat/completions``
    is ``/v1/chat/completions``.
    """
    path, sep, query = base_target.partition("?")
    prefix = path.rstrip("/")
    if prefix.endswith(api_path):
        full = prefix
    elif prefix.endswith("/v1") and api_path.startswith("/v1/"):
        full = prefix + api_path[3:]
    else:
        full = prefix + api_path
    return full + sep + query


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_error(obj: Any) -> tuple[str | None, str | None]:
    if isinstance(obj, list) and obj:
        return _json_error(obj[0])
    if not isinstance(obj, dict):
        return None, None
    err = obj.get("error")
    etype: str | None = None
    message: str | None = None
    if isinstance(err, str):
        message = err
        etype = obj.get("error_type") if isinstance(obj.get("error_type"), str) else None
    elif isinstance(err, dict):
        for key in ("message", "msg", "detail", "error"):
            if isinstance(err.get(key), str):
                message = err[key]
                break
        for key in ("type", "code", "status"):
            if isinstance(err.get(key), str):
                etype = err[key]
                break
        if message is None:
            message = msgspec.json.encode(err).decode()
    elif isinstance(obj.get("message"), str):
        message = obj["message"]
        etype = obj.get("type") if isinstance(obj.get("type"), str) else None
    elif isinstance(obj.get("detail"), str):
        message = obj["detail"]
    elif isinstance(obj.get("detail"), list):  # FastAPI validation errors
        msgs: list[str] = [d["msg"] for d in obj["detail"] if isinstance(d, dict) and isinstance(d.get("msg"), str)]
        message = "; ".join(msgs) or None
    return etype, message


_TITLE_RE: Final = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG_RE: Final = re.compile(r"<[^>]+>")


def provider_error(body: bytes) -> tuple[str | None, str | None]:
    """(type, message) of an error response body, the message one line of at most 200 characters.

    JSON bodies: OpenAI/vLLM/Anthropic ``{"error": {"message", "type"}}``, Ollama/TGI
    ``{"error": "…"}``, ``{"message": …}``, FastAPI ``{"detail": …}``; JSON without an error
    gives (None, None). HTML: the page's title. Other text: its start.
    """
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None, None
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        obj = msgspec.UNSET
    if obj is not msgspec.UNSET:
        etype, message = _json_error(obj)
    else:
        etype = None
        m = _TITLE_RE.search(text)
        message = m.group(1) if m else (_TAG_RE.sub(" ", text) if text.startswith("<") else text)
    if message is not None:
        message = _clip(" ".join(message.split()), PROVIDER_MESSAGE_MAX_CHARS) or None
    if etype is not None:
        etype = _clip(" ".join(etype.split()), 64) or None
    return etype, message


def status_reason(status: int, reason_phrase: str, message: str | None) -> str:
    """``HTTP 429 Too Many Requests: <provider message>``."""
    phrase = reason_phrase
    if not phrase:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
    head = f"HTTP {status} {phrase}".rstrip()
    return f"{head}: {message}" if message else head


def record_headers(headers: list[tuple[str, str]], names: tuple[str, ...]) -> str | None:
    """The wanted headers found (first value of each, clipped), as one JSON object; None if none."""
    found = {n.lower(): v for n, v in reversed(headers)}  # the first value of a repeated header wins
    picked: dict[str, str] = {}
    for name in names:
        lname = name.lower()
        if lname in found and lname not in picked:
            picked[lname] = _clip(found[lname], HEADER_VALUE_MAX_CHARS)
    return msgspec.json.encode(picked).decode() if picked else None


REDACT_MIN_PREFIX_CHARS: Final = 4  # a clipped key's start at least this long is redacted too


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``.

    Texts from a server are clipped before they get here (``…`` at the end), which can cut an
    echoed key in two: its start (from :data:`REDACT_MIN_PREFIX_CHARS` characters) just before the
    cut is redacted as well, so no clipped key leaks in part.
    """
    if not secret:
        return text
    out = text.replace(secret, "***")
    body, ellipsis = (out[:-1], "…") if out.endswith("…") else (out, "")
    for n in range(min(len(secret) - 1, len(body)), REDACT_MIN_PREFIX_CHARS - 1, -1):
        if body.endswith(secret[:n]):
            return body[:-n] + "***" + ellipsis
    return out


def request_headers(config: InferenceConfig, key: str | None, *, keep_alive: bool) -> list[tuple[str, str]]:
    """The request's headers (besides Host, User-Agent and Content-Length, which netio adds)."""
    base = llmstream.request_headers(config.api, None if config.api_key_header else key)
    if config.api_key_header and key:
        base[config.api_key_header] = key
    merged: dict[str, tuple[str, str]] = {name.lower(): (name, value) for name, value in base.items()}
    for name, value in config.extra_headers.items():
        merged[name.lower()] = (name, value)
    merged["connection"] = ("Connection", "keep-alive" if keep_alive else "close")
    return list(merged.values())


def server_ms(ttft_ms: float | None, setup_ms: float | None, net_rtt_ms: float | None) -> float | None:
    """``ttft - setup - net_rtt``: not clamped at 0, so that averages stay unbiased."""
    if ttft_ms is None or setup_ms is None or net_rtt_ms is None:
        return None
    return round(ttft_ms - setup_ms - net_rtt_ms, 6)


# --------------------------------------------------------------------------------------------
# Kept-alive connections
# --------------------------------------------------------------------------------------------

PoolKey = tuple[str, int, bool, bool, str]


class ConnectionPool:
    """Idle kept-alive connections, at most one per origin. Owned by a ProbeContext, closed with it."""

    def __init__(self) -> None:
        self._idle: dict[PoolKey, tuple[netio.Conn, int]] = {}

    def __len__(self) -> int:
        return len(self._idle)

    async def take(self, key: PoolKey, max_idle_s: float) -> netio.Conn | None:
        """An idle connection to the origin that still looks open, or None."""
        found = self._idle.pop(key, None)
        if found is None:
            return None
        conn, since_ns = found
        if conn.reusable and time.perf_counter_ns() - since_ns <= max_idle_s * 1e9:
            return conn
        await conn.aclose()
        return None

    async def put(self, key: PoolKey, conn: netio.Conn) -> None:
        old = self._idle.pop(key, None)
        self._idle[key] = (conn, time.perf_counter_ns())
        if old is not None:
            await old[0].aclose()

    async def aclose(self) -> None:
        idle, self._idle = list(self._idle.values()), {}
        for conn, _ in idle:
            await conn.aclose()


POOL_KEY: Final = "edgeprobe.probes.inference.ConnectionPool"


async def _new_pool() -> ConnectionPool:
    return ConnectionPool()


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------

_PROBLEM_OUTCOME: Final = {
    llmstream.StreamProblem.ERROR_EVENT: Outcome.STREAM_ERROR,
    llmstream.StreamProblem.MALFORMED: Outcome.MALFORMED_STREAM,
    llmstream.StreamProblem.STREAM_CUT: Outcome.STREAM_CUT,
    llmstream.StreamProblem.NO_CONTENT: Outcome.NO_CONTENT,
}


def _ms(ns: int) -> float:
    return round(ns / 1e6, 6)


def _left_s(deadline_ns: int) -> float:
    return max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9)


class _Run:
    """What one run measured so far; :meth:`result` turns it into the (partial) result."""

    def __init__(self, config: InferenceConfig, port: int | None) -> None:
        self.model = config.model
        self.api = config.api
        self.port = port
        self.address: str | None = None
        self.connection: str | None = None
        self.timing: netio.ConnectTiming | None = None
        self.tls_version: str | None = None
        self.status: int | None = None
        self.setup_ms: float | None = None
        self.ttfb_ms: float | None = None
        self.net_rtt_ms: float | None = None
        self.error_type: str | None = None
        self.server_headers: str | None = None
        self.stats: llmstream.StreamStats | None = None

    def result(self, secret: str | None) -> InferenceResult:
        t = self.timing if self.connection == "new" else None
        out = InferenceResult(
            model=self.model,
            api=self.api,
            address=self.address or (t.address if t else None),
            port=self.port,
            connection=self.connection,
            tls_version=self.tls_version,
            status=self.status,
            dns_ms=t.dns_ms if t else None,
            connect_ms=t.connect_ms if t else None,
            tls_ms=t.tls_ms if t else None,
            setup_ms=self.setup_ms,
            ttfb_ms=self.ttfb_ms,
            net_rtt_ms=self.net_rtt_ms,
            error_type=self.error_type,
            server_headers=self.server_headers,
        )
        if self.stats is not None:
            f = self.stats.figures()
            out.ttft_ms, out.e2e_ms, out.stream_end_ms = f.ttft_ms, f.e2e_ms, f.stream_end_ms
            out.itl_p50_ms, out.itl_p95_ms, out.itl_max_ms = f.itl_p50_ms, f.itl_p95_ms, f.itl_max_ms
            out.tpot_ms, out.tokens_per_s = f.tpot_ms, f.tokens_per_s
            out.chunks, out.output_tokens, out.output_tokens_source = f.chunks, f.output_tokens, f.output_tokens_source
            out.prompt_tokens, out.finish_reason = f.prompt_tokens, f.finish_reason
            out.load_ms, out.prompt_eval_ms, out.eval_ms = f.load_ms, f.prompt_eval_ms, f.eval_ms
            out.server_total_ms = f.server_total_ms
            out.keepalive_events, out.malformed_events = f.keepalive_events, f.malformed_events
            out.error_type = f.error_type or out.error_type
            out.server_ms = server_ms(f.ttft_ms, self.setup_ms, self.net_rtt_ms)
        if secret:
            for name in ("error_type", "server_headers", "finish_reason"):
                value = getattr(out, name)
                if value is not None:
                    setattr(out, name, redact(value, secret))
        return out


def _api_key(config: InferenceConfig) -> Secret | None:
    name = config.api_key_env
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value:
        raise ProbeFailure(Outcome.ERROR, f"api_key_env: environment variable {name} is not set or is empty")
    if not re.match(netio.HEADER_VALUE_PATTERN, value) or value != value.strip():
        raise ProbeFailure(
            Outcome.ERROR,
            f"api_key_env: the value of {name} cannot be sent in an HTTP header "
            "(control characters, surrounding spaces or non-latin-1 text)",
        )
    return Secret(value)


async def probe(target: str, config: InferenceConfig, ctx: ProbeContext) -> InferenceResult:
    """Send one streaming request to ``target`` (a base URL) and time it. See the module docstring."""
    try:
        url = parse_url(target)
    except ValueError as exc:
        partial = InferenceResult(model=config.model, api=config.api)
        raise ProbeFailure(Outcome.ERROR, str(exc), partial=partial) from exc
    run = _Run(config, url.port)
    secret: str | None = None
    try:
        key = _api_key(config)
        secret = key.reveal() if key is not None else None
        await _measure(url, config, ctx, run, secret)
    except ProbeFailure as failure:
        reason = redact(failure.reason, secret)
        if reason != failure.reason:
            raise ProbeFailure(failure.outcome, reason, partial=run.result(secret)) from None
        raise ProbeFailure(failure.outcome, reason, partial=run.result(secret)) from failure
    return run.result(secret)


async def _net_rtt(
    name: str, host: str, port: int, config: InferenceConfig, ctx: ProbeContext
) -> float | None:
    """One TCP handshake on a connection of its own (closed at once): one network round trip.

    ``host`` is ``name`` or, next to a kept connection, the address that connection went to.
    """
    budget_s = min(config.timeout_s, NET_RTT_MAX_TIMEOUT_S)
    deadline = time.perf_counter_ns() + int(budget_s * 1e9)
    check = ctx.check_address
    try:
        resolved = await netio.resolve(host, port, family=config.family, timeout_s=budget_s)
        if check is not None:
            await netio.check_address(check, name, resolved.address, port)
        sock, connect_ms = await netio.connect_socket(resolved, timeout_s=_left_s(deadline))
    except ProbeFailure as failure:
        if failure.outcome is Outcome.POLICY_REFUSED:
            raise  # never contacted; nor will the request be
        return None  # the request itself will say what is wrong with the path
    sock.close()
    return connect_ms


async def _measure(url: Url, config: InferenceConfig, ctx: ProbeContext, run: _Run, secret: str | None) -> None:
    api = config.api
    api_path, body = llmstream.build_request_body(
        api, config.model, config.prompt, config.max_tokens, config.include_usage, config.extra_body
    )
    reuse = config.connection == "reuse"
    try:
        request = netio.build_request(
            "POST",
            url.host_header,
            request_path(url.target, api_path),
            request_headers(config, secret, keep_alive=reuse),
            msgspec.json.encode(body),
        )
    except ValueError as exc:
        raise ProbeFailure(Outcome.ERROR, f"cannot build the request: {exc}") from exc

    pool = await ctx.resource(POOL_KEY, _new_pool) if reuse else None
    pool_key: PoolKey = (url.host, url.port, url.tls, config.verify_tls, config.family)
    conn = await pool.take(pool_key, config.max_idle_s) if pool is not None else None
    if conn is not None and ctx.check_address is not None:
        # The pool is the context owner's, shared with runs nobody checked: vet a kept connection too.
        try:
            await netio.check_address(ctx.check_address, url.host, conn.address, url.port)
        except ProbeFailure:
            await conn.aclose()
            raise
    if config.measure_net_rtt:
        host = conn.address if conn is not None else url.host
        run.net_rtt_ms = await _net_rtt(url.host, host, url.port, config, ctx)

    ft_s = min(config.first_token_timeout_s, config.timeout_s)
    t_start = time.perf_counter_ns()
    deadline = t_start + int(config.timeout_s * 1e9)
    ft_deadline = t_start + int(ft_s * 1e9)
    keep = False
    try:
        while True:
            if conn is None:
                run.connection = "new"
                try:
                    conn, run.timing = await netio.open_connection(
                        url.host,
                        url.port,
                        tls=url.tls,
                        verify=config.verify_tls,
                        family=config.family,
                        timeout_s=_left_s(ft_deadline),
                        budget_s=ft_s,
                        check=ctx.check_address,
                    )
                except ProbeFailure as failure:
                    if isinstance(failure.partial, netio.ConnectTiming):
                        run.timing = failure.partial
                    raise
            else:
                run.connection = "reused"
            run.address, run.tls_version = conn.address, conn.tls_version
            t_send = time.perf_counter_ns()
            run.setup_ms = _ms(t_send - t_start)
            stale = await _send_and_wait(conn, request, ft_deadline, ft_s, reused=run.connection == "reused")
            if not stale:
                break
            # The server closed the kept-alive connection as our request went out: it was not
            # processed. Replace the connection once, and time the run on the new one.
            await conn.aclose()
            conn = None
            t_start = time.perf_counter_ns()

        head = await _read_head(conn, ft_deadline, ft_s)
        run.ttfb_ms = _ms(head.first_byte_perf_ns - t_start)
        run.status = head.status
        run.server_headers = record_headers(head.headers, config.record_headers)
        if not 200 <= head.status < 300:
            etype, message = await _error_body(conn, head, deadline)
            run.error_type = etype
            raise ProbeFailure(Outcome.HTTP_ERROR, status_reason(head.status, head.reason, message))
        problem = llmstream.check_content_type(api, head.get("content-type"))
        if problem is not None:
            etype, message = await _error_body(conn, head, deadline)
            run.error_type = etype
            reason = f"{problem}: the server answered with a complete body instead of a stream"
            raise ProbeFailure(Outcome.NOT_STREAMING, f"{reason}: {message}" if message else reason)
        try:
            framing = netio.body_framing("POST", head.status, head.headers)
        except netio.HttpParseError as exc:
            raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where}: {exc}") from exc

        stats = run.stats = llmstream.StreamStats(api)
        ended_by_framing = await _read_stream(
            conn, framing, llmstream.StreamParser(api), stats, t_start, ft_deadline, deadline, ft_s, config.timeout_s
        )
        stream_problem = stats.problem
        if stream_problem is not None:
            raise ProbeFailure(_PROBLEM_OUTCOME[stream_problem], stats.problem_reason() or stream_problem.value)
        keep = (
            pool is not None
            and ended_by_framing
            and head.http_version == "1.1"
            and "close" not in ",".join(head.values("connection")).lower()
        )
    finally:
        if conn is not None:
            if keep and pool is not None:
                await pool.put(pool_key, conn)
            else:
                await conn.aclose()


async def _send_and_wait(conn: netio.Conn, request: bytes, ft_deadline: int, ft_s: float, *, reused: bool) -> bool:
    """Send the request and wait for the first response bytes (left in ``conn`` for the parser).

    True when a reused connection turned out to be closed before any response byte.
    """
    try:
        await conn.send(request, timeout_s=_left_s(ft_deadline))
        data, at_ns = await conn.read_some(_left_s(ft_deadline), during="waiting for the response")
    except TimeoutError as exc:
        raise ProbeFailure(
            Outcome.TIMEOUT, f"no token within {netio.fmt_s(ft_s)} s: no response from {conn.where}"
        ) from exc
    except ProbeFailure as failure:
        if reused and failure.outcome is not Outcome.TIMEOUT:
            return True
        raise
    if not data:
        if reused:
            return True
        raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where} closed the connection without a response")
    conn.unread(data, at_ns)
    return False


async def _read_head(conn: netio.Conn, ft_deadline: int, ft_s: float) -> netio.ResponseHead:
    try:
        return await netio.read_response_head(conn, timeout_s=_left_s(ft_deadline))
    except ProbeFailure as failure:
        if failure.outcome is Outcome.TIMEOUT:
            raise ProbeFailure(
                Outcome.TIMEOUT, f"no token within {netio.fmt_s(ft_s)} s: response head from {conn.where} not complete"
            ) from failure
        raise


async def _error_body(conn: netio.Conn, head: netio.ResponseHead, deadline: int) -> tuple[str | None, str | None]:
    """The provider's error (type, message) from the start of the body; (None, None) if unreadable."""
    buf = bytearray()
    try:
        framing = netio.body_framing("POST", head.status, head.headers)
        budget = min(_left_s(deadline), ERROR_BODY_TIMEOUT_S)
        async with aclosing(netio.iter_body(conn, framing, timeout_s=budget)) as pieces:
            async for piece in pieces:
                buf += piece.data
                if len(buf) >= ERROR_BODY_MAX_BYTES:
                    break
    except (ProbeFailure, netio.HttpParseError):
        pass  # what arrived is enough for a message
    return provider_error(bytes(buf[:ERROR_BODY_MAX_BYTES]))


async def _read_stream(
    conn: netio.Conn,
    framing: netio.BodyFraming,
    parser: llmstream.StreamParser,
    stats: llmstream.StreamStats,
    t_start: int,
    ft_deadline: int,
    deadline: int,
    ft_s: float,
    timeout_s: float,
) -> bool:
    """Read the body into ``stats`` until it ends. True when it ended by its framing (reusable).

    Raises ``timeout`` for no content before ``ft_deadline`` and for a body not finished by
    ``deadline``, ``protocol_error`` past a bound (a line, an event, the whole body); returns (and
    lets the figures say what was wrong) for a cut or an error event.
    """
    last_read_ns = time.perf_counter_ns()
    body_bytes = 0
    end_grace: int | None = None
    body = netio.iter_body(conn, framing, timeout_s=_left_s(deadline), budget_s=timeout_s)
    async with aclosing(body):
        while True:
            if stats.done or stats.error_message is not None:
                # The end marker (or an error) came: the body should end now. Wait a little for
                # its framing to end, for the connection to be reusable; the figures are complete.
                if end_grace is None:
                    end_grace = min(deadline, time.perf_counter_ns() + int(AFTER_END_GRACE_S * 1e9))
                limit = end_grace
            else:
                limit = ft_deadline if stats.chunks == 0 else deadline
            try:
                async with asyncio.timeout(_left_s(limit)):
                    piece = await anext(body)
            except StopAsyncIteration:
                break
            except TimeoutError:
                if stats.done or stats.error_message is not None:
                    stats.end(time.perf_counter_ns() - t_start)
                    return False
                raise _stall(stats, last_read_ns, ft_s, timeout_s) from None
            except ProbeFailure as failure:
                now = time.perf_counter_ns()
                if stats.done or stats.error_message is not None:
                    stats.end(now - t_start)
                    return False
                if failure.outcome is Outcome.TIMEOUT:
                    raise _stall(stats, last_read_ns, ft_s, timeout_s) from failure
                if isinstance(failure.__cause__, netio.HttpParseError):
                    raise  # broken HTTP framing, not a stream problem
                # Closed or reset before the end marker: a cut, which the figures report.
                tail = parser.finish()
                stats.add_all(now - t_start, tail.events)
                stats.end(now - t_start, mid_event=tail.mid_event)
                return False
            last_read_ns = piece.received_perf_ns
            body_bytes += len(piece.data)
            if body_bytes > STREAM_BODY_MAX_BYTES:
                raise ProbeFailure(
                    Outcome.PROTOCOL_ERROR,
                    f"{conn.where}: the stream went past {STREAM_BODY_MAX_BYTES} bytes; abandoned",
                )
            try:
                events = parser.feed(piece.data)
            except llmstream.StreamLimitError as exc:
                raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where}: {exc}; abandoned") from exc
            stats.add_all(piece.received_perf_ns - t_start, events)
    end_ns = time.perf_counter_ns() - t_start
    tail = parser.finish()
    stats.add_all(end_ns, tail.events)
    stats.end(end_ns, mid_event=tail.mid_event)
    return framing.kind != "close"


def _stall(stats: llmstream.StreamStats, last_read_ns: int, ft_s: float, timeout_s: float) -> ProbeFailure:
    now = time.perf_counter_ns()
    quiet_s = (now - last_read_ns) / 1e9
    if stats.chunks == 0:
        extra = f", {stats.keepalive_events} keep-alive event(s)" if stats.keepalive_events else ""
        return ProbeFailure(
            Outcome.TIMEOUT,
            f"no token within {netio.fmt_s(ft_s)} s (response headers came, then no content{extra})",
        )
    return ProbeFailure(
        Outcome.TIMEOUT,
        f"stream stalled after {stats.chunks} content chunk(s): not finished within {netio.fmt_s(timeout_s)} s, "
        f"nothing received for the last {quiet_s:.1f} s",
    )


# --------------------------------------------------------------------------------------------
# The physical floor and the human view (pure)
# --------------------------------------------------------------------------------------------


def first_byte_round_trips(target: str, fields: Mapping[str, Any]) -> int:
    """Round trips this run's request needed before a first byte could come back: TCP and TLS
    handshakes on a new connection, then the request (see :func:`edgeprobe.probes.geo.first_byte_round_trips`)."""
    tls_version = fields.get("tls_version")
    return geo.first_byte_round_trips(
        "https" if target.startswith("https://") else "http",
        tls_version if isinstance(tls_version, str) else None,
        reused=fields.get("connection") == "reused",
    )


BAR_WIDTH: Final = 40


def phases(f: Mapping[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(phase, start, end) in ms from the run's start; None where the phase was not measured.

    dns, connect and tls follow each other from 0 (a new connection only); ``wait`` runs from the
    request being written to the first response byte, ``first token`` from there to the first
    content event, ``stream`` from there to the end marker (or the last content event).
    """
    out: list[tuple[str, float | None, float | None]] = []
    t = 0.0
    for name in ("dns", "connect", "tls"):
        dur = f.get(f"{name}_ms")
        if isinstance(dur, int | float):
            out.append((name, t, t + dur))
            t += dur
        else:
            out.append((name, None, None))

    def number(key: str) -> float | None:
        v = f.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    setup, ttfb, ttft = number("setup_ms"), number("ttfb_ms"), number("ttft_ms")
    end = number("stream_end_ms") if number("stream_end_ms") is not None else number("e2e_ms")
    out.append(("wait", setup, ttfb))
    out.append(("first token", ttfb, ttft))
    out.append(("stream", ttft, end))
    return out


def _bar(start: float, end: float, scale: float, width: int = BAR_WIDTH) -> str:
    if scale <= 0:
        return ""
    a = min(width - 1, int(start / scale * width))
    cells = (end - start) / scale * width
    if cells < 0.5:
        return " " * a + "▏"
    b = min(width, max(a + 1, round(end / scale * width)))
    return " " * a + "█" * (b - a)


def render(obs: Observation) -> list[str]:
    """Where it went, a timeline of the phases, the stream's cadence and the network/server split
    (from partial fields too)."""
    f = obs.fields
    where = f.get("address")
    where_text = f" → {where}:{f.get('port')}" if where else ""
    status = f.get("status")
    lines = [
        f"{obs.target}{where_text}"
        + (f"  {f['api']}" if f.get("api") else "")
        + (f"  model {f['model']}" if f.get("model") else "")
        + (f"  HTTP {status}" if status is not None else "")
        + (f"  connection {f['connection']}" if f.get("connection") else "")
        + (f"  {f.get('tls_version')}" if f.get("tls_version") else "")
    ]
    ttft = f.get("ttft_ms")
    lines.append(f"  time to first token: {ttft:.3f} ms" if isinstance(ttft, int | float) else "  no first token")
    timeline = phases(f)
    ends = [e for _, _, e in timeline if e is not None]
    scale = max(ends) if ends else 0.0
    if ends:  # the phases reached; none: the error line says why
        lines.append(f"  {'phase':<12} {'start ms':>10} {'took ms':>10}  |0{'':{BAR_WIDTH - 2}}| {num(scale, 1)} ms")
    for name, start, end in timeline if ends else ():
        if start is None or end is None:
            if f.get("connection") == "reused" and name in ("dns", "connect"):
                lines.append(f"  {name:<12} {'-':>10} {'-':>10}  (reused connection)")
            continue
        lines.append(f"  {name:<12} {start:>10.3f} {end - start:>10.3f}  {_bar(start, end, scale)}")
    if f.get("chunks") is not None:
        src = f.get("output_tokens_source")
        prompt = f", {f.get('prompt_tokens')} prompt" if f.get("prompt_tokens") is not None else ""
        finish = f"; finish {f.get('finish_reason')}" if f.get("finish_reason") else ""
        lines.append(
            f"  tokens: {num(f.get('output_tokens'), 0)} output ({src}) in {f.get('chunks')} chunk(s){prompt}{finish}"
        )
        lines.append(
            f"  itl p50/p95/max {num(f.get('itl_p50_ms'))}/{num(f.get('itl_p95_ms'))}/{num(f.get('itl_max_ms'))} ms"
            f"  tpot {num(f.get('tpot_ms'))} ms  {num(f.get('tokens_per_s'), 1)} tokens/s"
            f"  e2e {num(f.get('e2e_ms'))} ms"
        )
    if f.get("server_ms") is not None:
        lines.append(
            f"  network vs server: net_rtt {num(f.get('net_rtt_ms'))} ms, "
            f"server ≈ {num(f.get('server_ms'))} ms (ttft - setup - net_rtt)"
        )
    elif f.get("net_rtt_ms") is not None:
        lines.append(f"  network: net_rtt {num(f.get('net_rtt_ms'))} ms")
    server_keys = ("load_ms", "prompt_eval_ms", "eval_ms", "server_total_ms")
    reported = [(k, f.get(k)) for k in server_keys if f.get(k) is not None]
    if reported:
        lines.append("  server reports: " + "  ".join(f"{k} {num(v)}" for k, v in reported))
    headers = f.get("server_headers")
    if isinstance(headers, str):
        try:
            shown = json.loads(headers)
            lines.append("  served by: " + "  ".join(f"{k}={v}" for k, v in shown.items()))
        except (ValueError, AttributeError):
            lines.append(f"  served by: {headers}")
    return lines


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def render_summary(observations: list[Observation]) -> list[str]:
    """Totals and medians over several runs (``edgeprobe ttft --count N``)."""
    if not observations:
        return []
    target = observations[0].target
    ok = [o for o in observations if o.outcome == Outcome.OK]
    failed = Counter(o.outcome for o in observations if o.outcome != Outcome.OK)
    conns = Counter(str(o.fields.get("connection")) for o in observations if o.fields.get("connection"))
    conn_text = ", ".join(f"{n} {kind}" for kind, n in sorted(conns.items()))
    fail_text = f", {sum(failed.values())} failed ({', '.join(f'{k} {n}' for k, n in sorted(failed.items()))})"
    lines = [
        f"--- {len(observations)} requests to {target}: {len(ok)} ok"
        + (fail_text if failed else "")
        + (f"; connections: {conn_text}" if conn_text else "")
        + " ---"
    ]

    def series(key: str) -> list[float]:
        return [float(v) for o in ok if isinstance(v := o.fields.get(key), int | float)]

    ttft = sorted(series("ttft_ms"))
    if ttft:
        lines.append(f"ttft min/median/max = {ttft[0]:.3f}/{_median(ttft):.3f}/{ttft[-1]:.3f} ms")
    medians = [
        (label, _median(series(key)))
        for label, key in (
            ("ttfb", "ttfb_ms"),
            ("setup", "setup_ms"),
            ("itl_p50", "itl_p50_ms"),
            ("tpot", "tpot_ms"),
            ("e2e", "e2e_ms"),
            ("net_rtt", "net_rtt_ms"),
            ("server", "server_ms"),
        )
    ]
    shown = [f"{label} {v:.3f}" for label, v in medians if v is not None]
    if shown:
        lines.append("medians (ms): " + "  ".join(shown))
    return lines


KIND: Final = ProbeKind(
    name="inference",
    description="One streaming LLM request: time to first token, inter-token latency, tokens, network vs server",
    config_type=InferenceConfig,
    result_type=InferenceResult,
    run=probe,
    check_target=check_target,
    max_run_s=max_run_s,
    tag_fields=("model", "api"),
    target_label="url",
    display_target=redact_url,
    render=render,
    headline=Figure(field="ttft_ms", label="time to first token"),
    jitter=Figure(field="itl_p95_ms", label="inter-token p95"),
    fleet_field="ttft_ms",
    live=None,
    aliases=("ttft",),
    floor_field="net_rtt_ms",
    first_byte_round_trips=first_byte_round_trips,
    # Charged up front at the most a request can cost: max_tokens of output.
    policy_cost=lambda config: PolicyCost(packets=1, tokens=config.max_tokens),
    env_vars=lambda config: () if config.api_key_env is None else (config.api_key_env,),
    privilege=None,
    sub_points=None,
    prepare=None,
)
