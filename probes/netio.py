"""One fresh TCP (+TLS) connection with per-phase timing, and a small HTTP/1.1 client on it.

Shared by the ``tcp``, ``http`` and ``inference`` probes.

Why both are hand-written (issue 11, item 9):

* **The timed connection.** A measuring tool must stamp each phase where it happens: DNS alone,
  the TCP handshake in the event loop's writability callback, the TLS handshake alone, and every
  read as its bytes reach the stream's buffer. The client libraries do not: aiohttp's client
  cannot tell TCP connect from TLS handshake apart and has no per-read event; httpx/httpcore's
  trace hooks fold DNS into ``connect_tcp``, mark the response body as one span (not each read),
  and fire from the awaiting task, an event-loop turn (~0.15 ms on a small VM) after the fact.
* **The HTTP/1.1 codec** (:func:`build_request`, :func:`parse_response_head`,
  :func:`body_framing`, :class:`ChunkedDecoder`; keep-alive is decided by the inference probe)
  was measured against h11 0.16, the maintained sans-IO codec, fed identical stamped reads
  (``python -m tests.benchmarks.bench_http_codec``, shared 2-CPU VM, medians of 21 interleaved
  repeats). Timing fidelity: equal, every stamp attributed to the read that carried its bytes
  with either. Correctness: equal on the captured aiohttp responses, 1xx, obsolete folding,
  HTTP/1.0, keep-alive vs close, cuts and an oversized head, at every split point; h11 refuses
  three responses RFC 9112 lets a client read: chunk extensions with whitespace before ``;``
  (``5 ; q=1``, §7.1.1), chunk lines ending in a bare LF (§2.2) and ``Transfer-Encoding: gzip,
  chunked`` (§6.1). CPU: h11 costs 2.8-3.8x as much as this codec per exchange (small response
  3.8x; 500-event SSE stream 3.2x, 1.3 ms against 4.3 ms) and 2.5-3.0x along the probe's whole
  read path, against a bar of 1.5x. So the codec stays; rerun the benchmark before revisiting.

Phases, as measured here (all with :func:`time.perf_counter_ns`):

* ``dns_ms`` — duration of ``loop.getaddrinfo`` (also for IP literals, where it is tiny).
* ``connect_ms`` — from just before ``connect()`` to the socket turning writable, stamped in the
  event loop's writability callback (not when the awaiting task resumes): the TCP handshake as the
  kernel reports it. Only the first address returned is tried.
* ``tls_ms`` — duration of the TLS handshake (``StreamWriter.start_tls``); ``None`` without TLS.
  The certificates the server sent are kept as DER (``ConnectTiming.peer_chain_der``), also when
  verification refuses them: parsing them is the caller's (:mod:`edgeprobe.probes.tlscert`).

These three are **durations of their own phase**, not cumulative. Whoever times a whole request
(the ``http`` probe) derives cumulative marks from the ``*_perf_ns`` values that
:class:`ResponseHead` and :class:`BodyPiece` carry: ``perf_counter_ns`` readings (not wall-clock
timestamps) of when the bytes arrived in the stream's buffer (the transport's ``data_received``,
after TLS decryption), not when the reading task resumed: on a small VM that turn of the event
loop is ~0.15 ms, measured against curl in the lab (``tests/benchmarks/truth.py``).

Layers, from pure to I/O:

* pure: :func:`build_request`, :func:`parse_status_line`, :func:`parse_headers`,
  :func:`find_head_end`, :func:`parse_response_head`, :func:`body_framing`,
  :class:`ChunkedDecoder` (feed bytes as they arrive, get body bytes back).
* I/O: :func:`resolve` (with the caller's :func:`check_address`), :func:`connect_socket`,
  :func:`open_connection` → :class:`Conn`, :meth:`Conn.send`, :func:`read_response_head`,
  :func:`iter_body` (an async iterator of :class:`BodyPiece`, one per socket read that carried body
  bytes, so a streaming consumer can timestamp every piece).

Every I/O function raises :class:`~edgeprobe.probes.outcome.ProbeFailure` for what goes wrong on the network,
with the foreign exception kept as ``__cause__``: ``socket.gaierror`` → ``dns_error``; connection
refused → ``refused``; unreachable → ``unreachable``; certificate or handshake failure →
``tls_error``; an address the caller's check refuses → ``policy_refused``; a phase that overruns
its budget → ``timeout`` naming the phase; a peer that does not speak HTTP/1.x, or closes or
resets the connection mid-response → ``protocol_error``. ``timeout_s`` arguments are the budget
of that one call; ``budget_s`` (where offered) is the figure a timeout's reason names instead: a
probe whose one ``timeout_s`` covers the whole run passes what is left of it as ``timeout_s`` and
its own setting as ``budget_s``, so the user reads the value they configured ("within 0.3 s"),
not the remainder after the earlier phases ("within 0.29 s"). The low-level
:meth:`Conn.read_some` alone leaves its builtin ``TimeoutError`` to the caller, who knows what was
awaited. The failures of :func:`open_connection` carry the :class:`ConnectTiming` measured so far
as ``partial``; the others carry none. Callers put their own typed result in ``partial`` before the failure reaches
:mod:`edgeprobe.probes.handler`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final, Literal, SupportsIndex

import msgspec

from edgeprobe.probes.context import AddressCheck
from edgeprobe.probes.outcome import Outcome, ProbeFailure, classify_exception

Family = Literal["auto", "ipv4", "ipv6"]

_FAMILIES: Final[dict[str, int]] = {"auto": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}

MAX_HEAD_BYTES: Final = 64 * 1024  # status line + headers; more is a protocol error
READ_SIZE: Final = 64 * 1024
_MAX_CHUNK_LINE_BYTES: Final = 4096
_MAX_TRAILER_BYTES: Final = 64 * 1024


# OpenSSL's reasons for a first record that is not TLS (plain HTTP text read as a record header).
PLAIN_TEXT_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


def _user_agent() -> str:
    try:
        return f"edgeprobe/{metadata.version('edgeprobe')}"
    except metadata.PackageNotFoundError:
        return "edgeprobe"


USER_AGENT: Final = _user_agent()


class HttpParseError(ValueError):
    """Bytes that are not valid HTTP/1.x where HTTP/1.x was expected (pure parsers raise this)."""


def _ms(ns: int) -> float:
    return round(ns / 1e6, 6)


def fmt_s(seconds: float) -> str:
    """A budget in seconds for a message: ``3``, ``0.5``, ``2.87``."""
    return f"{round(seconds, 2):g}"


def host_port(address: str, port: int) -> str:
    """``127.0.0.1:80`` or ``[::1]:80``."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _remaining_s(deadline_ns: int) -> float:
    return max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9)


def _named(timeout_s: float, budget_s: float | None) -> float:
    """The budget a timeout's reason names: the caller's ``budget_s`` when given (pure)."""
    return timeout_s if budget_s is None else budget_s


def _deadline_ns(timeout_s: float) -> int:
    return time.perf_counter_ns() + int(timeout_s * 1e9)


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Pure HTTP/1.1 pieces
# --------------------------------------------------------------------------------------------

# \A … \Z, not ^ … $: "$" also matches before a trailing newline.
_TOKEN_RE: Final = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_TOKEN_BYTES_RE: Final = re.compile(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_FIELD_VALUE_RE: Final = re.compile(r"\A[\t\x20-\x7e\x80-\xff]*\Z")  # HTAB, visible ASCII, SP, obs-text
_TARGET_RE: Final = re.compile(r"\A[\x21-\x7e]+\Z")  # visible ASCII, no spaces
_STATUS_RE: Final = re.compile(rb"\AHTTP/(\d)\.(\d) (\d{3})(?: (.*))?\Z", re.DOTALL)
_HEX_RE: Final = re.compile(rb"\A[0-9A-Fa-f]{1,16}\Z")

HEADER_NAME_PATTERN: Final = _TOKEN_RE.pattern  # for config validation
HEADER_VALUE_PATTERN: Final = _FIELD_VALUE_RE.pattern


def build_request(
    method: str,
    host_header: str,
    path: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 request.

    Default headers ``Host``, ``User-Agent``, ``Accept: */*`` and ``Connection: close`` are replaced
    by a caller header of the same name (case-insensitive); other caller headers follow in order.
    ``Content-Length`` is always computed here: it is set when there is a body, and as ``0`` for
    POST/PUT/PATCH without one. Raises :class:`ValueError` for a bad method, target or header.
    """
    if not _TOKEN_RE.match(method):
        raise ValueError(f"invalid HTTP method {method!r}")
    if not _TARGET_RE.match(path):
        raise ValueError(f"invalid request target {path!r}")
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    fields: list[tuple[str, str]] = [
        ("Host", host_header),
        ("User-Agent", USER_AGENT),
        ("Accept", "*/*"),
        ("Connection", "close"),
    ]
    for name, value in items:
        if not _TOKEN_RE.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if not _FIELD_VALUE_RE.match(value):
            raise ValueError(f"invalid value for header {name!r}: only latin-1 text without controls")
        lname = name.lower()
        if lname in ("content-length", "transfer-encoding"):
            continue  # framing is ours: a wrong one would desynchronise the exchange
        for i, (existing, _) in enumerate(fields):
            if existing.lower() == lname and i < 4:
                fields[i] = (name, value.strip())
                break
        else:
            fields.append((name, value.strip()))
    if body is not None:
        fields.append(("Content-Length", str(len(body))))
    elif method in ("POST", "PUT", "PATCH"):
        fields.append(("Content-Length", "0"))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    try:
        raw = head.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"request head is not latin-1 encodable: {exc.reason}") from exc
    return raw + (body or b"")


class StatusLine(msgspec.Struct, frozen=True):
    http_version: str  # "1.1", "1.0"
    status: int
    reason: str


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw[:limit].decode("latin-1")
    return repr(text + ("…" if len(raw) > limit else ""))


def parse_status_line(line: bytes) -> StatusLine:
    """``b"HTTP/1.1 200 OK"`` (CR/LF already removed) → StatusLine. Only HTTP/1.x is accepted."""
    m = _STATUS_RE.match(line)
    if m is None or m.group(1) != b"1":
        raise HttpParseError(f"not an HTTP/1.x status line: {_show(line)}")
    reason = (m.group(4) or b"").decode("latin-1").strip()
    return StatusLine(f"{m.group(1).decode()}.{m.group(2).decode()}", int(m.group(3)), reason)


def parse_headers(lines: Sequence[bytes]) -> list[tuple[str, str]]:
    """Header lines (CR/LF removed, no blank line) → ``[(name, value)]`` in order, duplicates kept.

    Names keep their case. An obsolete folded line (starting with SP/HT) continues the previous
    value, joined by one space.
    """
    out: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise HttpParseError(f"header continuation before any header: {_show(line)}")
            name, value = out[-1]
            out[-1] = (name, f"{value} {line.strip().decode('latin-1')}".strip())
            continue
        name_b, sep, value_b = line.partition(b":")
        if not sep or not _TOKEN_BYTES_RE.match(name_b):
            raise HttpParseError(f"malformed header line: {_show(line)}")
        out.append((name_b.decode("ascii"), value_b.strip(b" \t").decode("latin-1")))
    return out


def find_head_end(buf: bytes | bytearray) -> int | None:
    """Index just past the blank line ending a response head, or None if not there yet.

    Accepts CRLF line ends and, leniently, bare LF.
    """
    ends = []
    crlf = buf.find(b"\r\n\r\n")
    if crlf >= 0:
        ends.append(crlf + 4)
    lf = buf.find(b"\n\n")
    if lf >= 0:
        ends.append(lf + 2)
    lfcrlf = buf.find(b"\n\r\n")
    if lfcrlf >= 0:
        ends.append(lfcrlf + 3)
    return min(ends) if ends else None


def _split_lines(raw: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]


def parse_response_head(raw: bytes) -> tuple[StatusLine, list[tuple[str, str]]]:
    """A full response head (status line, headers, optional blank line) → status and headers."""
    lines = _split_lines(raw)
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise HttpParseError("empty response head")
    return parse_status_line(lines[0]), parse_headers(lines[1:])


class ResponseHead(msgspec.Struct, frozen=True, kw_only=True):
    http_version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    first_byte_perf_ns: int  # perf_counter_ns when the first response byte was read (1xx included)
    complete_perf_ns: int  # perf_counter_ns when the read completing the final head returned
    interim: int = 0  # 1xx responses skipped before this one

    def values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def get(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        found = self.values(name)
        return found[0] if found else None


class BodyFraming(msgspec.Struct, frozen=True):
    kind: Literal["none", "length", "chunked", "close"]
    length: int | None = None  # for "length"


def body_framing(method: str, status: int, headers: Sequence[tuple[str, str]]) -> BodyFraming:
    """How the response body is delimited (RFC 9112 §6.3), for a response to ``method``."""
    if method.upper() == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return BodyFraming("none")
    te = [c.strip().lower() for n, v in headers if n.lower() == "transfer-encoding" for c in v.split(",")]
    te = [c for c in te if c]
    if te:
        return BodyFraming("chunked") if te[-1] == "chunked" else BodyFraming("close")
    lengths = {
        c.strip() for n, v in headers if n.lower() == "content-length" for c in v.split(",") if c.strip()
    }
    if lengths:
        if len(lengths) != 1:
            raise HttpParseError(f"conflicting Content-Length values: {', '.join(sorted(lengths))}")
        (text,) = lengths
        if not text.isdigit() or not text.isascii() or len(text) > 18:
            raise HttpParseError(f"invalid Content-Length {text!r}")
        return BodyFraming("length", int(text))
    return BodyFraming("close")


class ChunkedDecoder:
    """Incremental decoder of a chunked body: :meth:`feed` bytes as they arrive, get body bytes back.

    Bytes may be split anywhere between calls. Chunk extensions are ignored, trailer fields are
    collected in :attr:`trailers`. After the last chunk, :attr:`done` is true and any further
    bytes are kept in :attr:`unused`. Malformed input raises :class:`HttpParseError`.
    """

    def __init__(self) -> None:
        self._state: Literal["size", "data", "data_end", "trailer", "done"] = "size"
        self._line = bytearray()
        self._remaining = 0
        self._trailer_bytes = 0
        self._saw_cr = False
        self.trailers: list[tuple[str, str]] = []
        self.unused = b""

    @property
    def done(self) -> bool:
        return self._state == "done"

    def _take_line(self, data: bytes, i: int) -> tuple[bytes | None, int]:
        """Accumulate up to and including LF; the line without CR/LF, or None if incomplete."""
        j = data.find(b"\n", i)
        if j < 0:
            self._line += data[i:]
            if len(self._line) > _MAX_CHUNK_LINE_BYTES:
                raise HttpParseError(f"chunk line longer than {_MAX_CHUNK_LINE_BYTES} bytes")
            return None, len(data)
        self._line += data[i:j]
        line = bytes(self._line)
        self._line.clear()
        if len(line) > _MAX_CHUNK_LINE_BYTES:
            raise HttpParseError(f"chunk line longer than {_MAX_CHUNK_LINE_BYTES} bytes")
        return (line[:-1] if line.endswith(b"\r") else line), j + 1

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == "data":
                take = min(self._remaining, n - i)
                out.append(data[i : i + take])
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data_end"
                    self._saw_cr = False
            elif state == "data_end":
                byte = data[i : i + 1]
                i += 1
                if byte == b"\r" and not self._saw_cr:
                    self._saw_cr = True
                elif byte == b"\n":
                    self._state = "size"
                else:
                    raise HttpParseError(f"expected CRLF after chunk data, got {_show(byte)}")
            elif state == "size":
                line, i = self._take_line(data, i)
                if line is None:
                    break
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX_RE.match(size_text):
                    raise HttpParseError(f"invalid chunk size line: {_show(line)}")
                size = int(size_text, 16)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining = size
                    self._state = "data"
            elif state == "trailer":
                line, i = self._take_line(data, i)
                if line is None:
                    break
                if line == b"":
                    self._state = "done"
                    continue
                self._trailer_bytes += len(line)
                if self._trailer_bytes > _MAX_TRAILER_BYTES:
                    raise HttpParseError(f"chunked trailer longer than {_MAX_TRAILER_BYTES} bytes")
                self.trailers.extend(parse_headers([line]))
            else:  # done
                self.unused += data[i:]
                break
        return out


# --------------------------------------------------------------------------------------------
# Connection establishment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """One address that a name resolved to, ready for :func:`connect_socket`."""

    host: str
    address: str  # the IP connected to, without brackets
    port: int
    family: int
    sockaddr: tuple[Any, ...]
    dns_ms: float


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def resolve(
    host: str,
    port: int,
    *,
    family: Family = "auto",
    timeout_s: float,
    check: AddressCheck | None = None,
    budget_s: float | None = None,
) -> Resolved:
    """Resolve ``host`` with ``getaddrinfo`` (timed) and keep the first address returned.

    ``check`` (a :attr:`ProbeContext.check_address <edgeprobe.probes.context.ProbeContext>`) vets
    that address before it is returned: a refusal is a ``policy_refused`` failure, and the caller
    connects to exactly the address that passed (no second lookup: no DNS rebinding in between).
    """
    loop = asyncio.get_running_loop()
    fam = _FAMILIES[family]
    t0 = time.perf_counter_ns()
    try:
        if is_ip_literal(host):
            # No lookup happens for a literal: answer in-line rather than paying a thread hop
            # (~1 ms) that curl's time_namelookup would not show either.
            infos = socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        else:
            async with asyncio.timeout(timeout_s):
                infos = await loop.getaddrinfo(host, port, family=fam, type=socket.SOCK_STREAM)
    except TimeoutError as exc:
        raise ProbeFailure(
            Outcome.TIMEOUT, f"no DNS answer for {host!r} within {fmt_s(_named(timeout_s, budget_s))} s"
        ) from exc
    except socket.gaierror as exc:
        raise ProbeFailure(Outcome.DNS_ERROR, f"cannot resolve {host!r}: {_strerror(exc)}") from exc
    dns_ms = _ms(time.perf_counter_ns() - t0)
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        what = {"ipv4": "IPv4 ", "ipv6": "IPv6 "}.get(family, "")
        raise ProbeFailure(Outcome.DNS_ERROR, f"no {what}address for {host!r}")
    fam_found, _, _, _, sockaddr = infos[0]
    address = str(sockaddr[0])
    if check is not None:
        await check_address(check, host, address, port)
    return Resolved(host=host, address=address, port=port, family=fam_found, sockaddr=sockaddr, dns_ms=dns_ms)


async def check_address(check: AddressCheck, host: str, address: str, port: int) -> None:
    """Ask ``check`` about ``address`` (what ``host`` resolved to); refused: ``policy_refused``."""
    why = await check(host, address, port)
    if why is not None:
        where = host_port(address, port) if port else address
        shown = where if host == address else f"{host} ({where})"
        raise ProbeFailure(Outcome.POLICY_REFUSED, f"not connecting to {shown}: {why}")


def _connect_failure(exc: OSError, where: str) -> ProbeFailure:
    if isinstance(exc, ConnectionRefusedError):
        return ProbeFailure(Outcome.REFUSED, f"connection refused by {where}")
    outcome, _ = classify_exception(exc)
    if outcome is Outcome.UNREACHABLE:
        return ProbeFailure(outcome, f"{where} unreachable: {_strerror(exc)}")
    if exc.errno == errno.ETIMEDOUT:
        return ProbeFailure(Outcome.TIMEOUT, f"no TCP handshake with {where}: {_strerror(exc)}")
    return ProbeFailure(outcome, f"cannot connect to {where}: {_strerror(exc)}")


async def _timed_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, sockaddr: Any) -> int:
    """Connect the non-blocking ``sock``; perf_counter_ns when the handshake was seen complete.

    The time is taken in the writability callback itself, not when the awaiting task resumes
    (a further event-loop turn: ~0.15 ms later on a small VM, measured against curl in the lab).
    """
    try:
        sock.connect(sockaddr)
        return time.perf_counter_ns()
    except (BlockingIOError, InterruptedError):
        pass
    done: asyncio.Future[int] = loop.create_future()

    def on_writable() -> None:
        if not done.done():
            done.set_result(time.perf_counter_ns())

    fd = sock.fileno()
    loop.add_writer(fd, on_writable)
    try:
        done_ns = await done
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return done_ns


async def connect_socket(
    resolved: Resolved, *, timeout_s: float, budget_s: float | None = None
) -> tuple[socket.socket, float]:
    """Open a TCP connection to ``resolved`` (timed handshake): the connected socket and connect_ms.

    The caller owns the socket and must close it.
    """
    loop = asyncio.get_running_loop()
    where = host_port(resolved.address, resolved.port)
    try:
        sock = socket.socket(resolved.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise ProbeFailure(classify_exception(exc)[0], f"cannot open a socket: {_strerror(exc)}") from exc
    try:
        sock.setblocking(False)
        t0 = time.perf_counter_ns()
        try:
            async with asyncio.timeout(timeout_s):
                done_ns = await _timed_connect(loop, sock, resolved.sockaddr)
        except TimeoutError as exc:
            raise ProbeFailure(
                Outcome.TIMEOUT, f"no TCP handshake with {where} within {fmt_s(_named(timeout_s, budget_s))} s"
            ) from exc
        except OSError as exc:
            raise _connect_failure(exc, where) from exc
        connect_ms = _ms(done_ns - t0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock, connect_ms


PEER_CHAIN_ATTR: Final = "edgeprobe_peer_chain_der"  # set on a verification error by _ChainKeepingSSLObject
_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER, for _ssl.Certificate.public_bytes


def peer_chain_der(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the peer sent, leaf first, DER-encoded, as received (not verified).

    ``ssl.SSLObject.get_unverified_chain`` is public from Python 3.13; on 3.10-3.12 the same
    OpenSSL call (``SSL_get_peer_cert_chain``) is a method of the private ``_ssl`` object the
    SSLObject wraps. Unlike ``getpeercert()`` it answers before the handshake completed, i.e. after
    a failed verification too. ``[]`` when neither is there or the chain cannot be read.
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return []
    try:
        chain = getter()
    except (ssl.SSLError, ValueError):
        return []
    out: list[bytes] = []
    for cert in chain or ():
        der = cert if isinstance(cert, bytes) else cert.public_bytes(_ENCODING_DER)
        if isinstance(der, bytes):
            out.append(der)
    return out


class _ChainKeepingSSLObject(ssl.SSLObject):
    """An SSLObject that hands the peer's chain to whoever sees its verification error.

    OpenSSL has the server's certificates when it refuses them, but once the handshake failed
    asyncio drops the SSLObject; the error it raises is the one object the caller gets, so the
    chain (:func:`peer_chain_der`) rides on it as ``PEER_CHAIN_ATTR``.
    """

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except ssl.SSLCertVerificationError as exc:
            setattr(exc, PEER_CHAIN_ATTR, peer_chain_der(self))
            raise


@functools.cache
def _default_ssl_context(verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.sslobject_class = _ChainKeepingSSLObject  # asyncio wraps with it: a refused certificate's chain is kept
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _tls_failure(exc: BaseException, where: str) -> ProbeFailure:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return ProbeFailure(Outcome.TLS_ERROR, f"certificate verify failed for {where}: {detail}")
    if isinstance(exc, ssl.CertificateError):
        return ProbeFailure(Outcome.TLS_ERROR, f"certificate error for {where}: {exc}")
    if isinstance(exc, ssl.SSLError):
        # What OpenSSL says when the first "record" is plain text such as "HTTP/1.1 400": an
        # http:// port asked for https://.
        hint = "; the server answered in plain HTTP? try http://" if exc.reason in PLAIN_TEXT_REASONS else ""
        return ProbeFailure(Outcome.TLS_ERROR, f"TLS handshake with {where} failed: {exc.reason or exc}{hint}")
    if isinstance(exc, ConnectionError):
        return ProbeFailure(Outcome.TLS_ERROR, f"connection closed by {where} during the TLS handshake")
    outcome, _ = classify_exception(exc)
    detail = _strerror(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
    return ProbeFailure(outcome, f"TLS handshake with {where} failed: {detail}")


class ConnectTiming(msgspec.Struct, kw_only=True):
    """Phase durations of :func:`open_connection` (None: not reached). See the module docstring."""

    port: int
    address: str | None = None
    dns_ms: float | None = None
    connect_ms: float | None = None
    tls_ms: float | None = None
    tls_version: str | None = None  # e.g. "TLSv1.3"
    tls_cipher: str | None = None  # the negotiated cipher suite, OpenSSL's name
    alpn: str | None = None  # the negotiated ALPN protocol, if any
    # The certificates the server sent, leaf first, DER (peer_chain_der): also after a failed
    # verification with the default context (with a caller's ssl_context: after a handshake only).
    peer_chain_der: list[bytes] = []


class BodyPiece(msgspec.Struct, frozen=True):
    data: bytes  # decoded body bytes (chunk framing removed)
    received_perf_ns: int  # perf_counter_ns when the socket read that carried them returned


class _StampedReader(asyncio.StreamReader):
    """A StreamReader that notes when its buffer last went from empty to holding data.

    ``feed_data`` runs in the transport's callback as the bytes arrive (after TLS decryption),
    so that time is when the bytes were there, not when the reading task got round to them (a
    further event-loop turn: ~0.15 ms on a small VM, measured against curl in the lab).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self.arrived_perf_ns = 0  # when the oldest unread byte arrived

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        was_empty = not self._buffer  # type: ignore[attr-defined]
        super().feed_data(data)
        if was_empty and self._buffer:  # type: ignore[attr-defined]
            self.arrived_perf_ns = time.perf_counter_ns()


async def _open_stream(sock: socket.socket) -> tuple[_StampedReader, asyncio.StreamWriter]:
    """``asyncio.open_connection(sock=sock)`` with a :class:`_StampedReader`."""
    loop = asyncio.get_running_loop()
    reader = _StampedReader(READ_SIZE)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class Conn:
    """A connected stream (TCP or TLS) with a push-back buffer; reads are timestamped."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        address: str,
        port: int,
        tls_version: str | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.address = address
        self.port = port
        self.tls_version = tls_version
        self._pending = b""
        self._pending_perf_ns = 0
        self._closed = False

    @property
    def where(self) -> str:
        return host_port(self.address, self.port)

    @property
    def reusable(self) -> bool:
        """Whether the connection looks open and idle, fit for another request (keep-alive).

        False once we closed it, the peer closed or reset it (seen without reading: asyncio
        records the EOF when it arrives), or bytes were pushed back. A peer can still close it
        while the next request is on its way; callers that reuse must handle that.
        """
        return (
            not self._closed
            and not self._pending
            and not self._writer.is_closing()
            and not self._reader.at_eof()
            and self._reader.exception() is None
        )

    def _io_failure(self, exc: BaseException, during: str) -> ProbeFailure:
        if isinstance(exc, ssl.SSLError):
            return ProbeFailure(
                Outcome.TLS_ERROR, f"TLS error from {self.where} while {during}: {exc.reason or exc}"
            )
        if isinstance(exc, ConnectionError):
            return ProbeFailure(
                Outcome.PROTOCOL_ERROR, f"connection to {self.where} lost while {during}: {_strerror(exc)}"
            )
        assert isinstance(exc, OSError)
        outcome, _ = classify_exception(exc)
        return ProbeFailure(outcome, f"{self.where}: {_strerror(exc)} while {during}")

    async def send(self, data: bytes, *, timeout_s: float, budget_s: float | None = None) -> None:
        """Write ``data`` and wait until it is handed to the kernel (or the budget runs out)."""
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(data)
                await self._writer.drain()
        except TimeoutError as exc:
            raise ProbeFailure(
                Outcome.TIMEOUT, f"request to {self.where} not sent within {fmt_s(_named(timeout_s, budget_s))} s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise self._io_failure(exc, "sending the request") from exc

    def unread(self, data: bytes, received_perf_ns: int) -> None:
        """Push bytes back to be returned first by the next read."""
        if data:
            self._pending = data + self._pending
            self._pending_perf_ns = received_perf_ns

    async def read_some(self, timeout_s: float | None, *, during: str) -> tuple[bytes, int]:
        """The next bytes available (``b""`` at EOF) and perf_counter_ns when they were read.

        Raises the builtin :class:`TimeoutError` when ``timeout_s`` runs out, for the caller to
        phrase; network errors become :class:`ProbeFailure`.
        """
        if self._pending:
            data, self._pending = self._pending, b""
            return data, self._pending_perf_ns
        try:
            async with asyncio.timeout(timeout_s):
                data = await self._reader.read(READ_SIZE)
        except TimeoutError:  # an OSError too: keep it apart
            raise
        except (OSError, ssl.SSLError) as exc:
            raise self._io_failure(exc, during) from exc
        now_ns = time.perf_counter_ns()
        if data and isinstance(self._reader, _StampedReader) and 0 < self._reader.arrived_perf_ns <= now_ns:
            stamp = self._reader.arrived_perf_ns
            # Bytes left behind (more than READ_SIZE arrived) arrived no later than now.
            self._reader.arrived_perf_ns = now_ns
            return data, stamp
        return data, now_ns

    async def aclose(self) -> None:
        """Close the connection; never raises for network reasons, waits at most 0.5 s."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            async with asyncio.timeout(0.5):
                await self._writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            self._writer.transport.abort()


async def open_connection(
    host: str,
    port: int,
    *,
    tls: bool,
    server_hostname: str | None = None,
    verify: bool = True,
    family: Family = "auto",
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
    check: AddressCheck | None = None,
    budget_s: float | None = None,
) -> tuple[Conn, ConnectTiming]:
    """Resolve, connect and (if ``tls``) handshake, each phase timed; ``timeout_s`` covers all three.

    ``server_hostname`` (SNI and certificate name) defaults to ``host``. ``ssl_context`` replaces
    the default one built from ``verify`` (system CAs, ALPN ``http/1.1``). ``check`` vets the
    resolved address before connecting (see :func:`resolve`). A timeout names ``budget_s`` (default
    ``timeout_s``), whichever phase ran out. On failure the
    :class:`ProbeFailure` carries the :class:`ConnectTiming` measured so far as ``partial``.
    """
    deadline = _deadline_ns(timeout_s)
    named_s = _named(timeout_s, budget_s)
    timing = ConnectTiming(port=port)
    try:
        resolved = await resolve(host, port, family=family, timeout_s=timeout_s, check=check, budget_s=named_s)
        timing.address, timing.dns_ms = resolved.address, resolved.dns_ms
        sock, timing.connect_ms = await connect_socket(resolved, timeout_s=_remaining_s(deadline), budget_s=named_s)
        try:
            reader, writer = await _open_stream(sock)
        except BaseException:
            sock.close()
            raise
        if tls:
            where = host_port(resolved.address, port)
            ctx = ssl_context or _default_ssl_context(verify)
            budget = _remaining_s(deadline)
            t0 = time.perf_counter_ns()
            try:
                async with asyncio.timeout(budget):
                    await writer.start_tls(ctx, server_hostname=server_hostname or host)
            except TimeoutError as exc:
                writer.close()
                raise ProbeFailure(
                    Outcome.TIMEOUT, f"no TLS handshake with {where} within {fmt_s(named_s)} s"
                ) from exc
            except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
                writer.close()
                timing.peer_chain_der = getattr(exc, PEER_CHAIN_ATTR, None) or []
                raise _tls_failure(exc, where) from exc
            except BaseException:
                writer.close()
                raise
            timing.tls_ms = _ms(time.perf_counter_ns() - t0)
            ssl_object = writer.get_extra_info("ssl_object")
            if isinstance(ssl_object, ssl.SSLObject):
                timing.tls_version = ssl_object.version()
                cipher = ssl_object.cipher()
                timing.tls_cipher = cipher[0] if cipher else None
                timing.alpn = ssl_object.selected_alpn_protocol()
                timing.peer_chain_der = peer_chain_der(ssl_object)
                if not timing.peer_chain_der and (leaf := ssl_object.getpeercert(binary_form=True)):
                    timing.peer_chain_der = [leaf]
    except ProbeFailure as failure:
        failure.partial = timing
        raise
    conn = Conn(reader, writer, address=resolved.address, port=port, tls_version=timing.tls_version)
    return conn, timing


# --------------------------------------------------------------------------------------------
# Reading a response
# --------------------------------------------------------------------------------------------


async def read_response_head(
    conn: Conn, *, timeout_s: float, max_head_bytes: int = MAX_HEAD_BYTES, budget_s: float | None = None
) -> ResponseHead:
    """Read the status line and headers of the next final response (1xx other than 101 skipped).

    Bytes read past the head stay in ``conn`` for :func:`iter_body`.
    """
    deadline = _deadline_ns(timeout_s)
    buf = bytearray()
    first_ns: int | None = None
    last_ns = 0
    interim = 0
    while True:
        end = find_head_end(buf)
        if end is not None:
            try:
                status, headers = parse_response_head(bytes(buf[:end]))
            except HttpParseError as exc:
                raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where}: {exc}") from exc
            if 100 <= status.status < 200 and status.status != 101:
                del buf[:end]
                interim += 1
                continue
            conn.unread(bytes(buf[end:]), last_ns)
            assert first_ns is not None
            return ResponseHead(
                http_version=status.http_version,
                status=status.status,
                reason=status.reason,
                headers=headers,
                first_byte_perf_ns=first_ns,
                complete_perf_ns=last_ns,
                interim=interim,
            )
        if len(buf) > max_head_bytes:
            raise ProbeFailure(
                Outcome.PROTOCOL_ERROR, f"{conn.where}: response head longer than {max_head_bytes} bytes"
            )
        try:
            data, last_ns = await conn.read_some(_remaining_s(deadline), during="reading the response head")
        except TimeoutError as exc:
            what = "no HTTP response" if first_ns is None else "HTTP response head not complete"
            raise ProbeFailure(
                Outcome.TIMEOUT, f"{what} from {conn.where} within {fmt_s(_named(timeout_s, budget_s))} s"
            ) from exc
        if not data:
            if not buf:
                reason = f"{conn.where} closed the connection without a response"
            else:
                reason = f"{conn.where} closed the connection inside the response head: {_show(bytes(buf))}"
            raise ProbeFailure(Outcome.PROTOCOL_ERROR, reason)
        if first_ns is None:
            first_ns = last_ns
        buf += data
        if not b"HTTP/".startswith(bytes(buf[:5])):
            raise ProbeFailure(
                Outcome.PROTOCOL_ERROR, f"{conn.where} did not answer with HTTP: {_show(bytes(buf))}"
            )


async def iter_body(
    conn: Conn,
    framing: BodyFraming,
    *,
    timeout_s: float,
    idle_timeout_s: float | None = None,
    budget_s: float | None = None,
) -> AsyncGenerator[BodyPiece, None]:
    """Yield the body as it arrives: one :class:`BodyPiece` per socket read carrying body bytes.

    ``timeout_s`` bounds the whole body, ``idle_timeout_s`` (optional) each wait for more bytes.
    A body cut short by the peer is a ``protocol_error``. Stop iterating early (``break``) to cap
    what is read; wrap in :func:`contextlib.aclosing` then.
    """
    if framing.kind == "none":
        return
    deadline = _deadline_ns(timeout_s)
    received = 0
    decoder = ChunkedDecoder() if framing.kind == "chunked" else None
    remaining = framing.length if framing.kind == "length" else None
    if remaining == 0:
        return
    while True:
        overall_s = _remaining_s(deadline)
        idle = idle_timeout_s is not None and idle_timeout_s < overall_s
        wait_s = idle_timeout_s if idle and idle_timeout_s is not None else overall_s
        try:
            data, at_ns = await conn.read_some(wait_s, during="reading the response body")
        except TimeoutError as exc:
            if idle:
                reason = f"no body bytes from {conn.where} for {fmt_s(wait_s)} s"
            else:
                reason = f"body from {conn.where} not complete within {fmt_s(_named(timeout_s, budget_s))} s"
            raise ProbeFailure(Outcome.TIMEOUT, f"{reason} ({received} bytes received)") from exc
        if not data:
            if framing.kind == "close":
                return
            if framing.kind == "length":
                cut = f"after {received} of {framing.length} body bytes"
            else:
                cut = f"inside the chunked body, after {received} body bytes"
            raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where} closed the connection {cut}")
        if decoder is not None:
            try:
                pieces = decoder.feed(data)
            except HttpParseError as exc:
                raise ProbeFailure(Outcome.PROTOCOL_ERROR, f"{conn.where}: {exc}") from exc
            body = b"".join(pieces)
            if body:
                received += len(body)
                yield BodyPiece(body, at_ns)
            if decoder.done:
                return
        elif remaining is not None:
            body = data[:remaining]
            remaining -= len(body)
            received += len(body)
            yield BodyPiece(body, at_ns)
            if remaining == 0:
                return
        else:
            received += len(data)
            yield BodyPiece(data, at_ns)
