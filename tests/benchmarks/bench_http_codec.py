"""The HTTP/1.1 codec of probes/netio.py against h11, by measurement (issue 11, item 9). On demand.

    .venv/bin/python -m tests.benchmarks.bench_http_codec [--quick]

Both codecs are fed the same reads: a list of ``(bytes, stamp)`` pairs, then end of stream. Each
is driven at two layers:

* ``codec``: the pure parsers alone (netio's :func:`find_head_end`, :func:`parse_response_head`,
  :func:`body_framing`, :class:`ChunkedDecoder`, driven the way netio drives them; h11's
  ``Connection.receive_data`` / ``next_event``).
* ``netio path``: what the probe runs: netio's real :func:`read_response_head` and
  :func:`iter_body` on a :class:`ScriptedConn` (a :class:`netio.Conn` whose reads come from the
  script), against the same loop written over h11 (read, ``receive_data``, drain the events).

Tables:

(a) correctness: the captured responses of tests/unit/probes/test_netio_parse.py and edge cases,
    each read whole, split at every byte into two reads (where small enough) and one byte a read,
    checked against what a measuring client must report; request bytes compared too.
(b) CPU per exchange (request serialised, response parsed, body decoded): a small response, and a
    streamed SSE body of 500 events, one HTTP chunk a read; median of repeats, the two codecs
    interleaved in each repeat, and the h11/current ratio of each repeat's pair.
(c) timing fidelity: every body byte must come out stamped with the read that carried it, the
    first-byte stamp must be the first read's, and each SSE event (llmstream's decoder fed the
    pieces) must carry the stamp of the read that completed it.

h11 is a test-only dependency here (``openai`` pulls it in). Where it is not importable:
``python3 -m pip install --target /tmp/h11lib h11``; this benchmark then finds it there.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import itertools
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

try:
    import h11
except ImportError:  # not in the venv: a scratch install, see the module docstring
    sys.path.insert(0, "/tmp/h11lib")
    import h11

from edgeprobe.probes import netio
from edgeprobe.probes.llmstream import SSEDecoder, SSEEvent
from edgeprobe.probes.outcome import ProbeFailure
from tests.benchmarks.perf_common import Row, table
from tests.support.paths import STREAMS
from tests.unit.probes.test_netio_parse import (
    AIOHTTP_503,
    AIOHTTP_CHUNKED,
    AIOHTTP_CHUNKED_BODY,
    AIOHTTP_REDIRECT,
    AIOHTTP_TEXT,
    CHUNKED_EXT_TRAILER,
)

Reads = list[tuple[bytes, int]]
HOST = "127.0.0.1:8080"
TARGET = "/v1/chat/completions"


class Failed(Exception):
    """The codec refused the response (protocol error, cut, oversized head)."""


@dataclass
class Exchange:
    """What one codec made of one response."""

    status: int | None = None
    version: str | None = None
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    interim: int = 0
    first_byte_ns: int | None = None
    head_ns: int | None = None
    pieces: Reads = field(default_factory=list)
    trailers: list[tuple[str, str]] | None = None  # None: this layer does not hand trailers out
    keep_alive: bool = False
    error: str | None = None

    @property
    def body(self) -> bytes:
        return b"".join(p for p, _ in self.pieces)

    def outcome(self) -> tuple[Any, ...]:
        """Everything but the stamps and trailers (for comparing one layer with the other)."""
        if self.error is not None:
            return ("error",)
        return (self.status, self.version, self.reason, self.headers, self.interim, self.body, self.keep_alive)


# --------------------------------------------------------------------------------------------
# The two codecs, pure: feed(data, stamp) per read (b"" is the end of the stream); True when done
# --------------------------------------------------------------------------------------------


def request_fields(headers: Sequence[tuple[str, str]], body: bytes | None, method: str) -> list[tuple[str, str]]:
    """The header fields netio.build_request writes (defaults, caller's, Content-Length), for h11."""
    fields = [("Host", HOST), ("User-Agent", netio.USER_AGENT), ("Accept", "*/*"), ("Connection", "close")]
    for name, value in headers:
        for i, (existing, _) in enumerate(fields[:4]):
            if existing.lower() == name.lower():
                fields[i] = (name, value)
                break
        else:
            fields.append((name, value))
    if body is not None:
        fields.append(("Content-Length", str(len(body))))
    elif method in ("POST", "PUT", "PATCH"):
        fields.append(("Content-Length", "0"))
    return fields


def _keep(ex: Exchange, asked: bool, ended_by_framing: bool, connection: str) -> bool:
    # inference.py's decision: we asked, the body ended by its framing, HTTP/1.1, no "close".
    return asked and ended_by_framing and ex.version == "1.1" and "close" not in connection.lower()


class CurrentCodec:
    """netio's pure pieces, driven as read_response_head and iter_body drive them (without awaits)."""

    def __init__(self, method: str, headers: Sequence[tuple[str, str]], body: bytes | None) -> None:
        self.method = method
        self.asked = any(n.lower() == "connection" and v == "keep-alive" for n, v in headers)
        self.request = netio.build_request(method, HOST, TARGET, headers, body)
        self.ex = Exchange()
        self.buf = bytearray()
        self.framing: netio.BodyFraming | None = None
        self.decoder: netio.ChunkedDecoder | None = None
        self.remaining: int | None = None

    def _done(self) -> bool:
        assert self.framing is not None
        conn = ",".join(v for n, v in self.ex.headers if n.lower() == "connection")
        self.ex.keep_alive = _keep(self.ex, self.asked, self.framing.kind != "close", conn)
        return True

    def feed(self, data: bytes, at: int) -> bool:
        ex = self.ex
        try:
            if self.framing is None:
                if not data:
                    raise Failed("closed in the head")
                if ex.first_byte_ns is None:
                    ex.first_byte_ns = at
                self.buf += data
                if not b"HTTP/".startswith(bytes(self.buf[:5])):
                    raise Failed("not HTTP")
                while True:
                    end = netio.find_head_end(self.buf)
                    if end is None:
                        if len(self.buf) > netio.MAX_HEAD_BYTES:
                            raise Failed("head too long")
                        return False
                    status, headers = netio.parse_response_head(bytes(self.buf[:end]))
                    if 100 <= status.status < 200 and status.status != 101:
                        del self.buf[:end]
                        ex.interim += 1
                        continue
                    break
                ex.status, ex.version, ex.reason, ex.headers = (
                    status.status,
                    status.http_version,
                    status.reason,
                    headers,
                )
                ex.head_ns = at
                self.framing = netio.body_framing(self.method, status.status, headers)
                data = bytes(self.buf[end:])
                if self.framing.kind == "none" or self.framing.length == 0:
                    return self._done()
                if self.framing.kind == "chunked":
                    self.decoder = netio.ChunkedDecoder()
                self.remaining = self.framing.length
                if not data:
                    return False
            elif not data:
                if self.framing.kind == "close":
                    return self._done()
                raise Failed("closed in the body")
            if self.decoder is not None:
                body = b"".join(self.decoder.feed(data))
                if body:
                    ex.pieces.append((body, at))
                if self.decoder.done:
                    ex.trailers = self.decoder.trailers
                    return self._done()
            elif self.remaining is not None:
                body = data[: self.remaining]
                self.remaining -= len(body)
                ex.pieces.append((body, at))
                if self.remaining == 0:
                    return self._done()
            else:
                ex.pieces.append((data, at))
            return False
        except netio.HttpParseError as exc:
            raise Failed(str(exc)) from exc


class H11Codec:
    """h11 as a client: the request through ``send``, the response through ``receive_data``."""

    def __init__(self, method: str, headers: Sequence[tuple[str, str]], body: bytes | None) -> None:
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=netio.MAX_HEAD_BYTES)
        req = self.conn.send(h11.Request(method=method, target=TARGET, headers=request_fields(headers, body, method)))
        if body:
            req += self.conn.send(h11.Data(data=body))
        self.request = req + self.conn.send(h11.EndOfMessage())
        self.ex = Exchange()

    def feed(self, data: bytes, at: int) -> bool:
        ex = self.ex
        if data and ex.first_byte_ns is None:
            ex.first_byte_ns = at
        conn = self.conn
        try:
            conn.receive_data(data)
            parts: list[bytes] = []
            done = False
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    break
                if isinstance(ev, h11.Data):
                    parts.append(ev.data)
                elif isinstance(ev, h11.Response):
                    ex.status, ex.version, ex.reason = ev.status_code, ev.http_version.decode(), ev.reason.decode()
                    ex.headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in ev.headers.raw_items()]
                    ex.head_ns = at
                elif isinstance(ev, h11.InformationalResponse):
                    ex.interim += 1
                elif isinstance(ev, h11.EndOfMessage):
                    ex.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in ev.headers.raw_items()]
                    done = True
                    break
            if parts:
                ex.pieces.append((b"".join(parts), at))
        except h11.RemoteProtocolError as exc:
            raise Failed(str(exc)) from exc
        if done:
            ex.keep_alive = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        elif not data:
            raise Failed("end of stream before the end of the response")
        return done


Codec = type[CurrentCodec] | type[H11Codec]


def run_codec(
    codec: Codec, method: str, headers: Sequence[tuple[str, str]], body: bytes | None, reads: Reads
) -> Exchange:
    c = codec(method, headers, body)
    eof_ns = reads[-1][1] + 1 if reads else 1
    try:
        for data, at in [*reads, (b"", eof_ns)]:
            if c.feed(data, at):
                break
    except Failed as exc:
        c.ex.error = str(exc) or type(exc).__name__
    return c.ex


# --------------------------------------------------------------------------------------------
# The netio path: the real async functions on scripted reads, and the same loop over h11
# --------------------------------------------------------------------------------------------


class ScriptedConn(netio.Conn):
    """A :class:`netio.Conn` whose reads return the scripted ``(bytes, stamp)`` pairs, then EOF."""

    def __init__(self, reads: Reads) -> None:  # no socket: only what the readers use
        self.address, self.port = "127.0.0.1", 8080
        self._pending = b""
        self._pending_perf_ns = 0
        self._closed = False
        self._reads = iter(reads)
        self._eof = (b"", reads[-1][1] + 1 if reads else 1)

    async def read_some(self, timeout_s: float | None, *, during: str) -> tuple[bytes, int]:
        if self._pending:
            data, self._pending = self._pending, b""
            return data, self._pending_perf_ns
        return next(self._reads, self._eof)


async def netio_current(method: str, headers: Sequence[tuple[str, str]], body: bytes | None, reads: Reads) -> Exchange:
    netio.build_request(method, HOST, TARGET, headers, body)
    asked = any(n.lower() == "connection" and v == "keep-alive" for n, v in headers)
    conn = ScriptedConn(reads)
    ex = Exchange()
    try:
        head = await netio.read_response_head(conn, timeout_s=5.0)
        ex.status, ex.version, ex.reason, ex.headers = head.status, head.http_version, head.reason, head.headers
        ex.interim, ex.first_byte_ns, ex.head_ns = head.interim, head.first_byte_perf_ns, head.complete_perf_ns
        framing = netio.body_framing(method, head.status, head.headers)
        async for piece in netio.iter_body(conn, framing, timeout_s=5.0):
            ex.pieces.append((piece.data, piece.received_perf_ns))
        ex.keep_alive = _keep(ex, asked, framing.kind != "close", ",".join(head.values("connection")))
    except (ProbeFailure, netio.HttpParseError) as exc:
        ex.error = str(exc)
    return ex


async def netio_h11(method: str, headers: Sequence[tuple[str, str]], body: bytes | None, reads: Reads) -> Exchange:
    c = H11Codec(method, headers, body)
    conn = ScriptedConn(reads)
    try:
        while True:
            data, at = await conn.read_some(5.0, during="reading the response")
            if c.feed(data, at):
                break
    except Failed as exc:
        c.ex.error = str(exc)
    return c.ex


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def chunked(chunks: Sequence[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"


def sse_events(n: int) -> list[bytes]:
    """``n`` content events of the golden OpenAI stream (cycled), then its finish, usage and [DONE]."""
    events = [e + b"\n\n" for e in (STREAMS / "openai-chat-usage.sse").read_bytes().split(b"\n\n") if e.strip()]
    content = [e for e in events if b'"content":"' in e and b'"content":""' not in e]
    tail = [e for e in events if e not in content and b'"role"' not in e]
    return [events[0], *(content[i % len(content)] for i in range(n)), *tail]


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
    b"Cache-Control: no-cache\r\nx-request-id: req_7f3a\r\n\r\n"
)


def sse_response(n: int) -> tuple[bytes, list[int], bytes]:
    """The wire bytes, where each event's HTTP chunk ends, and the body."""
    wire, ends = bytearray(SSE_HEAD), []
    events = sse_events(n)
    for e in events:
        wire += b"%x\r\n%s\r\n" % (len(e), e)
        ends.append(len(wire))
    wire += b"0\r\n\r\n"
    ends[-1] = len(wire)
    return bytes(wire), ends, b"".join(events)


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    status: int | None  # None: the codec must refuse the response
    body: bytes = b""
    method: str = "GET"
    keep_alive_asked: bool = False
    keep_alive: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # must appear, in this order
    trailers: tuple[tuple[str, str], ...] = ()
    interim: int = 0
    read_size: int = 1 << 30
    splits: str = "every"  # "every" byte, "random" cut points, "none"
    note: str = ""

    def request_headers(self) -> list[tuple[str, str]]:
        return [("Connection", "keep-alive")] if self.keep_alive_asked else []

    def reads(self) -> Reads:
        return cut(self.raw, range(self.read_size, len(self.raw), self.read_size))


def cut(raw: bytes, points: Sequence[int] | range) -> Reads:
    edges = [0, *points, len(raw)]
    return [(raw[a:b], 1000 * (i + 1)) for i, (a, b) in enumerate(itertools.pairwise(edges)) if b > a]


def cases() -> list[Case]:
    text_ka = AIOHTTP_TEXT.replace(b"Connection: close\r\n", b"")
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n"
    gz = _gzip(b"hello")
    sse, _, sse_body = sse_response(500)
    return [
        Case(
            "captured 200 text",
            AIOHTTP_TEXT,
            200,
            b"hello edgeprobe\n",
            headers=(("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close")),
        ),
        Case("captured 200 chunked", AIOHTTP_CHUNKED, 200, AIOHTTP_CHUNKED_BODY),
        Case("captured 302", AIOHTTP_REDIRECT, 302, b"302: Found", headers=(("Location", "/text"),)),
        Case("captured 503 (POST)", AIOHTTP_503, 503, b"down for maintenance\n", method="POST"),
        Case("keep-alive: 1.1, no close", text_ka, 200, b"hello edgeprobe\n", keep_alive_asked=True, keep_alive=True),
        Case("keep-alive asked, server close", AIOHTTP_TEXT, 200, b"hello edgeprobe\n", keep_alive_asked=True),
        Case(
            "chunk extensions + trailers",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_EXT_TRAILER,
            200,
            b"Wikipedia",
            keep_alive_asked=True,
            keep_alive=True,
            trailers=(("Expires", "never"), ("X-Sum", "9")),
            note="RFC 9112 §7.1.1: BWS allowed around ';'",
        ),
        Case(
            "chunk extension without BWS",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;name=value\r\nWiki\r\n0\r\n\r\n",
            200,
            b"Wiki",
        ),
        Case(
            "obsolete line folding",
            b"HTTP/1.1 200 OK\r\nX-Long: first\r\n\t second\r\nContent-Length: 2\r\n\r\nok",
            200,
            b"ok",
            headers=(("X-Long", "first second"), ("Content-Length", "2")),
        ),
        Case(
            "1xx: 100 + 103 then 200",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            200,
            b"ok",
            interim=2,
        ),
        Case(
            "HTTP/1.0, bare LF, read to close",
            b"HTTP/1.0 200 OK\nServer: old\n\nuntil the end",
            200,
            b"until the end",
            keep_alive_asked=True,
            headers=(("Server", "old"),),
        ),
        Case(
            "HTTP/1.0 + Connection: keep-alive",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            200,
            b"ok",
            keep_alive_asked=True,
            note="both: 1.0 is never reused",
        ),
        Case(
            "204, keep-alive",
            b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n",
            204,
            keep_alive_asked=True,
            keep_alive=True,
        ),
        Case(
            "HEAD with Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n",
            200,
            method="HEAD",
            keep_alive_asked=True,
            keep_alive=True,
        ),
        Case("status line without reason", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", 200),
        Case(
            "duplicate headers kept",
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
            200,
            headers=(("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")),
        ),
        Case("oversized head (200 KB)", big, None, read_size=netio.READ_SIZE, splits="none"),
        Case("cut: Content-Length 16, 6 sent", b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\nhello ", None),
        Case("cut: inside chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", None),
        Case(
            "conflicting Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", None
        ),
        Case("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n", None),
        Case(
            "chunked with bare LF",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
            200,
            b"abc",
            note="RFC 9112 §2.2: a recipient MAY accept LF",
        ),
        Case(
            "Transfer-Encoding: gzip, chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked([gz]),
            200,
            gz,
            note="RFC 9112 §6.1: chunked last = chunked framing",
        ),
        Case(
            "SSE, 500 events, chunked",
            sse,
            200,
            sse_body,
            method="POST",
            keep_alive_asked=True,
            keep_alive=True,
            splits="random",
        ),
    ]


def verdict(case: Case, ex: Exchange) -> str | None:
    """None when ``ex`` is what a measuring client must report for ``case``; else what differs."""
    if case.status is None:
        return None if ex.error is not None else f"accepted (status {ex.status})"
    if ex.error is not None:
        return f"refused: {ex.error[:60]}"
    wrong = []
    if ex.status != case.status:
        wrong.append(f"status {ex.status}")
    if ex.body != case.body:
        wrong.append("body")
    if ex.keep_alive != case.keep_alive:
        wrong.append(f"keep_alive={ex.keep_alive}")
    if ex.interim != case.interim:
        wrong.append(f"interim={ex.interim}")
    if case.trailers and ex.trailers is not None and ex.trailers != list(case.trailers):
        wrong.append(f"trailers {ex.trailers}")
    names = {n.lower() for n, _ in case.headers}
    if case.headers and [(n, v) for n, v in ex.headers if n.lower() in names] != list(case.headers):
        wrong.append("headers")
    return ", ".join(wrong) or None


def split_reads(case: Case, rng: random.Random) -> list[Reads]:
    raw = case.raw
    if case.splits == "none":
        return []
    if case.splits == "random":
        return [cut(raw, sorted(rng.sample(range(1, len(raw)), k))) for k in (1, 2, 10, 100, 1000) for _ in range(20)]
    out = [cut(raw, [k]) for k in range(1, len(raw))]
    out.append(cut(raw, range(1, len(raw))))  # one byte a read
    return out


RunFn = Callable[[str, Sequence[tuple[str, str]], bytes | None, Reads], Exchange]


def correctness(rng_seed: int = 11) -> tuple[list[Row], dict[str, int]]:
    loop = asyncio.new_event_loop()

    def sync(fn: Any) -> RunFn:
        return lambda m, h, b, r: loop.run_until_complete(fn(m, h, b, r))

    impls: dict[str, RunFn] = {
        "current": sync(netio_current),
        "h11": sync(netio_h11),
    }
    pure: dict[str, RunFn] = {
        "current": lambda m, h, b, r: run_codec(CurrentCodec, m, h, b, r),
        "h11": lambda m, h, b, r: run_codec(H11Codec, m, h, b, r),
    }
    rows: list[Row] = []
    disagree = {"current": 0, "h11": 0}
    for case in cases():
        row: Row = {"case": case.name}
        rng = random.Random(rng_seed)
        splits = split_reads(case, rng)
        for name, fn in impls.items():
            hdrs = case.request_headers()
            whole = fn(case.method, hdrs, None, case.reads())
            pure_whole = pure[name](case.method, hdrs, None, case.reads())
            bad = verdict(case, whole) or verdict(case, pure_whole)  # trailers: the codec layer only
            failed_splits = sum(
                1
                for r in splits
                if verdict(case, fn(case.method, hdrs, None, r))
                or verdict(case, pure[name](case.method, hdrs, None, r))
            )
            if pure_whole.outcome() != whole.outcome():
                disagree[name] += 1  # the pure driver of the CPU table must behave as the netio path does
            row[name] = "ok" if bad is None else bad
            row[f"{name}_splits"] = f"{len(splits) - failed_splits}/{len(splits)}" if splits else "-"
        row["note"] = case.note
        rows.append(row)
    loop.close()
    for method, hdrs, body in (("GET", [], None), ("POST", [("Connection", "keep-alive"), ("X-Trace", "1")], b"{}")):
        same = netio.build_request(method, HOST, TARGET, hdrs, body) == H11Codec(method, hdrs, body).request
        rows.append(
            {
                "case": f"request bytes: {method}",
                "current": "ok",
                "h11": "identical" if same else "differ",
                "current_splits": "-",
                "h11_splits": "-",
                "note": "",
            }
        )
    return rows, disagree


# --------------------------------------------------------------------------------------------
# (c) timing fidelity
# --------------------------------------------------------------------------------------------


def body_origins(raw: bytes, head_end: int, is_chunked: bool) -> list[int]:
    """For each body byte, the offset in ``raw`` of the byte that carried it (whole-buffer parse)."""
    if not is_chunked:
        return list(range(head_end, len(raw)))
    out: list[int] = []
    i = head_end
    while True:
        eol = raw.index(b"\n", i)
        size = int(raw[i:eol].split(b";")[0].strip(), 16)
        if size == 0:
            return out
        start = eol + 1
        out.extend(range(start, start + size))
        i = start + size + (2 if raw[start + size : start + size + 2] == b"\r\n" else 1)


def stamp_at(reads: Reads) -> list[int]:
    return [at for data, at in reads for _ in data]


def sse_stamps(ex: Exchange) -> list[int]:
    dec, out = SSEDecoder(), list[int]()
    for data, at in ex.pieces:
        out += [at for item in dec.feed(data) if isinstance(item, SSEEvent)]
    return out


def fidelity(seed: int = 7) -> list[Row]:
    rng = random.Random(seed)
    sse, _, _ = sse_response(500)
    wanted = {c.name: c for c in cases()}
    scenarios: list[tuple[str, Case, list[Reads]]] = [
        ("SSE 500, one event a read", wanted["SSE, 500 events, chunked"], []),
        ("SSE 500, random reads", wanted["SSE, 500 events, chunked"], []),
        ("captured chunked, every split", wanted["captured 200 chunked"], []),
        ("1xx then 200, every split", wanted["1xx: 100 + 103 then 200"], []),
        ("captured text, every split", wanted["captured 200 text"], []),
    ]
    _, ends, _ = sse_response(500)
    scenarios[0][2].append(cut(sse, [len(SSE_HEAD), *ends[:-1]]))
    for _ in range(50):
        scenarios[1][2].append(cut(sse, sorted(rng.sample(range(1, len(sse)), rng.choice((5, 50, 500, 3000))))))
    for _, case, lst in scenarios[2:]:
        lst.extend(split_reads(case, rng))
    rows: list[Row] = []
    loop = asyncio.new_event_loop()
    for label, case, reads_list in scenarios:
        head_end = _final_head_end(case.raw)
        origins = body_origins(case.raw, head_end, b"chunked" in case.raw[:head_end].lower())
        row: Row = {"scenario": label, "runs": len(reads_list)}
        for name, fn in (("current", netio_current), ("h11", netio_h11)):
            checked = wrong = 0
            for reads in reads_list:
                ex = loop.run_until_complete(fn(case.method, case.request_headers(), None, reads))
                stamps = stamp_at(reads)
                want = [reads[0][1], stamps[head_end - 1]]
                got = [ex.first_byte_ns, ex.head_ns]
                pos = 0
                for data, at in ex.pieces:
                    want += [stamps[origins[pos + k]] for k in range(len(data))]
                    got += [at] * len(data)
                    pos += len(data)
                if b"event-stream" in case.raw[:head_end]:
                    ev_ends = [origins[i] for i, b in enumerate(case.body) if case.body[i - 1 : i + 1] == b"\n\n"]
                    want += [stamps[o] for o in ev_ends]
                    got += sse_stamps(ex)
                checked += len(want)
                wrong += sum(1 for w, g in zip(want, got, strict=False) if w != g) + abs(len(want) - len(got))
            row[f"{name}_checked"] = checked
            row[f"{name}_wrong"] = wrong
        rows.append(row)
    loop.close()
    return rows


def _final_head_end(raw: bytes) -> int:
    start = 0
    while True:
        end = netio.find_head_end(raw[start:])
        assert end is not None
        status = int(raw[start + 9 : start + 12])
        if not 100 <= status < 200:
            return start + end
        start += end


# --------------------------------------------------------------------------------------------
# (b) CPU
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    method: str
    headers: list[tuple[str, str]]
    body: bytes | None
    reads: Reads


def workloads() -> list[Workload]:
    sse, ends, _ = sse_response(500)
    post = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Reply with one short sentence."}],'
        b'"max_tokens":16,"stream":true,"stream_options":{"include_usage":true}}'
    )
    auth = [
        ("Authorization", "Bearer sk-0123456789abcdef"),
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("Connection", "keep-alive"),
    ]
    return [
        Workload("small: captured 200 text, 1 read", "GET", [], None, cut(AIOHTTP_TEXT, [])),
        Workload("small: captured chunked, 1 read", "GET", [], None, cut(AIOHTTP_CHUNKED, [])),
        Workload("SSE 500 events, 1 event a read", "POST", auth, post, cut(sse, [len(SSE_HEAD), *ends[:-1]])),
        Workload(
            "SSE 500 events, 64 KiB reads",
            "POST",
            auth,
            post,
            cut(sse, range(netio.READ_SIZE, len(sse), netio.READ_SIZE)),
        ),
    ]


def _time_pure(codec: Codec, w: Workload, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        run_codec(codec, w.method, w.headers, w.body, w.reads)
    return (time.perf_counter_ns() - t0) / n / 1e3


def _time_async(fn: Any, w: Workload, n: int, *, loop: asyncio.AbstractEventLoop) -> float:
    async def many() -> int:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            await fn(w.method, w.headers, w.body, w.reads)
        return time.perf_counter_ns() - t0

    return loop.run_until_complete(many()) / n / 1e3


def cpu(repeats: int, target_s: float) -> list[Row]:
    rows: list[Row] = []
    loop = asyncio.new_event_loop()
    for w in workloads():
        for layer in ("codec", "netio path"):
            if layer == "codec":
                a = functools.partial(_time_pure, CurrentCodec, w)
                b = functools.partial(_time_pure, H11Codec, w)
            else:
                a = functools.partial(_time_async, netio_current, w, loop=loop)
                b = functools.partial(_time_async, netio_h11, w, loop=loop)
            per = max(a(3), b(3))  # warm up, and size the loops
            n = max(3, int(target_s * 1e6 / per))
            cur, new, ratio = [], [], []
            for i in range(repeats):  # side by side, alternating which goes first
                if i % 2 == 0:
                    x = a(n)
                    y = b(n)
                else:
                    y = b(n)
                    x = a(n)
                cur.append(x)
                new.append(y)
                ratio.append(y / x)
            rows.append(
                {
                    "workload": w.name,
                    "layer": layer,
                    "loops": n,
                    "current_us": statistics.median(cur),
                    "h11_us": statistics.median(new),
                    "ratio": statistics.median(ratio),
                    "ratio_min": min(ratio),
                    "ratio_max": max(ratio),
                }
            )
    loop.close()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter loops")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 21)
    target_s = 0.05 if args.quick else 0.2
    print(
        f"h11 {metadata.version('h11')}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start"
    )
    rows, disagree = correctness()
    print(
        table(
            "(a) correctness: whole response / splits that came out right (two reads at every byte, "
            "one byte a read; SSE: random cuts)",
            [
                ("case", "case"),
                ("current", "current"),
                ("current_splits", "splits"),
                ("h11", "h11"),
                ("h11_splits", "splits"),
                ("note", "note"),
            ],
            rows,
        )
    )
    print(f"   pure drivers that disagreed with their netio path: current {disagree['current']}, h11 {disagree['h11']}")
    print()
    print(
        table(
            "(c) timing fidelity: stamps checked (first byte, head, every body byte, every SSE event) / wrong",
            [
                ("scenario", "scenario"),
                ("runs", "runs"),
                ("current_checked", "current checked"),
                ("current_wrong", "wrong"),
                ("h11_checked", "h11 checked"),
                ("h11_wrong", "wrong"),
            ],
            fidelity(),
        )
    )
    print()
    print(
        table(
            f"(b) CPU per exchange (request + response), µs, median of {repeats} interleaved repeats; "
            "ratio = h11 / current per repeat",
            [
                ("workload", "workload"),
                ("layer", "layer"),
                ("loops", "loops"),
                ("current_us", "current µs"),
                ("h11_us", "h11 µs"),
                ("ratio", "× median"),
                ("ratio_min", "min"),
                ("ratio_max", "max"),
            ],
            cpu(repeats, target_s),
        )
    )
    print(f"   load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
