"""The pure HTTP/1.1 pieces of edgeprobe.probes.netio, on bytes captured from real servers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.probes import netio
from edgeprobe.probes.netio import (
    BodyFraming,
    ChunkedDecoder,
    HttpParseError,
    body_framing,
    build_request,
    find_head_end,
    parse_headers,
    parse_response_head,
    parse_status_line,
)

# Captured from aiohttp 3.14.5 (web.Response / StreamResponse with enable_chunked_encoding /
# HTTPFound / status=503), read raw from the socket after a GET with Connection: close.
AIOHTTP_TEXT = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n"
    b"Date: Fri, 27 Nov 2026 08:09:05 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n"
    b"Connection: close\r\n\r\nhello edgeprobe\n"
)
AIOHTTP_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
    b"Date: Fri, 27 Nov 2026 08:09:05 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n"
    b"Connection: close\r\n\r\n"
    b"c\r\nfirst chunk\n\r\n1e\r\nsecond, longer chunk of bytes\n\r\n1\r\nx\r\n0\r\n\r\n"
)
AIOHTTP_CHUNKED_BODY = b"first chunk\nsecond, longer chunk of bytes\nx"
AIOHTTP_REDIRECT = (
    b"HTTP/1.1 302 Found\r\nContent-Type: text/plain; charset=utf-8\r\nLocation: /text\r\n"
    b"Content-Length: 10\r\nDate: Fri, 27 Nov 2026 08:09:05 GMT\r\n"
    b"Server: Python/3.11 aiohttp/3.14.5\r\nConnection: close\r\n\r\n302: Found"
)
AIOHTTP_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 21\r\nDate: Fri, 27 Nov 2026 08:09:05 GMT\r\n"
    b"Server: Python/3.11 aiohttp/3.14.5\r\nConnection: close\r\n\r\ndown for maintenance\n"
)
# RFC 9112 §7.1 shapes that aiohttp does not produce: chunk extensions and a trailer section.
CHUNKED_EXT_TRAILER = b"4;name=value\r\nWiki\r\n5 ; q=1\r\npedia\r\n0\r\nExpires: never\r\nX-Sum: 9\r\n\r\n"


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    end = find_head_end(raw)
    assert end is not None
    return raw[:end], raw[end:]


# ---- status line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "version", "status", "reason"),
    [
        (b"HTTP/1.1 200 OK", "1.1", 200, "OK"),
        (b"HTTP/1.1 503 Service Unavailable", "1.1", 503, "Service Unavailable"),
        (b"HTTP/1.0 404 Not Found", "1.0", 404, "Not Found"),
        (b"HTTP/1.1 200", "1.1", 200, ""),
        (b"HTTP/1.1 204 ", "1.1", 204, ""),
        (b"HTTP/1.1 418 I'm a teapot", "1.1", 418, "I'm a teapot"),
    ],
)
def test_parse_status_line(line: bytes, version: str, status: int, reason: str) -> None:
    parsed = parse_status_line(line)
    assert (parsed.http_version, parsed.status, parsed.reason) == (version, status, reason)


@pytest.mark.parametrize(
    "line",
    [
        b"SSH-2.0-OpenSSH_9.6",
        b"HTTP/2 200",
        b"HTTP/2.0 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1  200 OK",
        b"http/1.1 200 OK",
        b"",
    ],
)
def test_parse_status_line_rejects(line: bytes) -> None:
    with pytest.raises(HttpParseError, match=r"not an HTTP/1\.x status line"):
        parse_status_line(line)


# ---- headers -------------------------------------------------------------------------------


def test_parse_headers_of_captured_response() -> None:
    head, _ = split_head(AIOHTTP_TEXT)
    status, headers = parse_response_head(head)
    assert status.status == 200
    assert headers == [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", "16"),
        ("Date", "Fri, 27 Nov 2026 08:09:05 GMT"),
        ("Server", "Python/3.11 aiohttp/3.14.5"),
        ("Connection", "close"),
    ]


def test_parse_headers_keeps_duplicates_and_folds() -> None:
    lines = [
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
        b"X-Long: first",
        b"\t second",
        b"X-Empty:",
        b"X-Ws:  v  ",
    ]
    assert parse_headers(lines) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Long", "first second"),
        ("X-Empty", ""),
        ("X-Ws", "v"),
    ]


@pytest.mark.parametrize("line", [b"No Colon Here", b"Bad Name: x", b"Name : x", b": empty name", b" folded"])
def test_parse_headers_rejects(line: bytes) -> None:
    with pytest.raises(HttpParseError):
        parse_headers([line])


def test_find_head_end() -> None:
    head, rest = split_head(AIOHTTP_TEXT)
    assert rest == b"hello edgeprobe\n"
    assert head.endswith(b"Connection: close\r\n\r\n")
    assert find_head_end(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n") is None
    assert find_head_end(b"HTTP/1.0 200 OK\nServer: x\n\nbody") == len(b"HTTP/1.0 200 OK\nServer: x\n\n")
    # the first blank line ends the head, even when the body contains another one
    assert find_head_end(b"HTTP/1.1 200 OK\r\n\r\nbody\n\nmore") == len(b"HTTP/1.1 200 OK\r\n\r\n")


def test_parse_response_head_bare_lf() -> None:
    status, headers = parse_response_head(b"HTTP/1.0 200 OK\nServer: old\n\n")
    assert status.http_version == "1.0"
    assert headers == [("Server", "old")]


def test_response_head_accessors() -> None:
    head, _ = split_head(AIOHTTP_REDIRECT)
    status, headers = parse_response_head(head)
    rh = netio.ResponseHead(
        http_version=status.http_version,
        status=status.status,
        reason=status.reason,
        headers=headers,
        first_byte_perf_ns=1,
        complete_perf_ns=2,
    )
    assert rh.get("location") == "/text"
    assert rh.get("LOCATION") == "/text"
    assert rh.get("X-Missing") is None
    assert rh.values("content-length") == ["10"]


# ---- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "method", "framing"),
    [
        (AIOHTTP_TEXT, "GET", BodyFraming("length", 16)),
        (AIOHTTP_TEXT, "HEAD", BodyFraming("none")),
        (AIOHTTP_CHUNKED, "GET", BodyFraming("chunked")),
        (AIOHTTP_REDIRECT, "GET", BodyFraming("length", 10)),
        (AIOHTTP_503, "POST", BodyFraming("length", 21)),
    ],
)
def test_body_framing_of_captured(raw: bytes, method: str, framing: BodyFraming) -> None:
    head, _ = split_head(raw)
    status, headers = parse_response_head(head)
    assert body_framing(method, status.status, headers) == framing


@pytest.mark.parametrize(
    ("status", "headers", "framing"),
    [
        (204, [("Content-Length", "5")], BodyFraming("none")),
        (304, [("Transfer-Encoding", "chunked")], BodyFraming("none")),
        (200, [], BodyFraming("close")),
        (200, [("Transfer-Encoding", "gzip, chunked")], BodyFraming("chunked")),
        (200, [("Transfer-Encoding", "gzip")], BodyFraming("close")),
        (200, [("Transfer-Encoding", "chunked"), ("Content-Length", "5")], BodyFraming("chunked")),
        (200, [("Content-Length", "7, 7")], BodyFraming("length", 7)),
        (200, [("Content-Length", "0")], BodyFraming("length", 0)),
    ],
)
def test_body_framing_rules(status: int, headers: list[tuple[str, str]], framing: BodyFraming) -> None:
    assert body_framing("GET", status, headers) == framing


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "-1")],
        [("Content-Length", "0x10")],
        [("Content-Length", "١٢")],  # non-ASCII digits
    ],
)
def test_body_framing_rejects_bad_length(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(HttpParseError, match="Content-Length"):
        body_framing("GET", 200, headers)


# ---- chunked decoding ----------------------------------------------------------------------


def decode_in_parts(parts: list[bytes]) -> tuple[bytes, ChunkedDecoder]:
    dec = ChunkedDecoder()
    out = b"".join(b"".join(dec.feed(p)) for p in parts)
    return out, dec


def test_chunked_captured_whole() -> None:
    _, body = split_head(AIOHTTP_CHUNKED)
    out, dec = decode_in_parts([body])
    assert out == AIOHTTP_CHUNKED_BODY
    assert dec.done
    assert dec.unused == b""
    assert dec.trailers == []


def test_chunked_captured_split_at_every_boundary() -> None:
    _, body = split_head(AIOHTTP_CHUNKED)
    for cut in range(len(body) + 1):
        out, dec = decode_in_parts([body[:cut], body[cut:]])
        assert out == AIOHTTP_CHUNKED_BODY, cut
        assert dec.done, cut
    for a in range(len(body) + 1):
        for b in range(a, len(body) + 1):
            out, dec = decode_in_parts([body[:a], body[a:b], body[b:]])
            assert out == AIOHTTP_CHUNKED_BODY, (a, b)
            assert dec.done


def test_chunked_one_byte_at_a_time() -> None:
    _, body = split_head(AIOHTTP_CHUNKED)
    out, dec = decode_in_parts([body[i : i + 1] for i in range(len(body))])
    assert out == AIOHTTP_CHUNKED_BODY
    assert dec.done


def test_chunked_not_done_until_last_crlf() -> None:
    _, body = split_head(AIOHTTP_CHUNKED)
    out, dec = decode_in_parts([body[:-1]])
    assert out == AIOHTTP_CHUNKED_BODY
    assert not dec.done
    dec.feed(body[-1:])
    assert dec.done


def test_chunked_extensions_trailers_and_unused() -> None:
    for cut in range(len(CHUNKED_EXT_TRAILER) + 1):
        out, dec = decode_in_parts([CHUNKED_EXT_TRAILER[:cut], CHUNKED_EXT_TRAILER[cut:] + b"NEXT"])
        assert out == b"Wikipedia"
        assert dec.done
        assert dec.trailers == [("Expires", "never"), ("X-Sum", "9")]
        assert dec.unused == b"NEXT"


def test_chunked_accepts_bare_lf() -> None:
    out, dec = decode_in_parts([b"3\nabc\n0\n\n"])
    assert out == b"abc"
    assert dec.done


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"zz\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"-1\r\n", "invalid chunk size"),
        (b"3\r\nabcX\r\n", "expected CRLF after chunk data"),
        (b"3\r\nabc\r\r", "expected CRLF after chunk data"),
        (b"1" * 5000, "chunk line longer"),
        (b"0\r\nBad Trailer\r\n\r\n", "malformed header line"),
    ],
)
def test_chunked_rejects(data: bytes, match: str) -> None:
    with pytest.raises(HttpParseError, match=match):
        ChunkedDecoder().feed(data)


def encode_chunked(chunks: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_chunked_roundtrip_any_split(chunks: list[bytes], cuts: list[int]) -> None:
    wire = encode_chunked(chunks)
    points = sorted({min(c, len(wire)) for c in cuts})
    parts = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    out, dec = decode_in_parts(parts)
    assert out == b"".join(chunks)
    assert dec.done


# ---- requests ------------------------------------------------------------------------------


def test_build_request_get() -> None:
    raw = build_request("GET", "127.0.0.1:8080", "/text?a=1", {}, None)
    assert raw == (
        b"GET /text?a=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        + f"User-Agent: {netio.USER_AGENT}\r\n".encode()
        + b"Accept: */*\r\nConnection: close\r\n\r\n"
    )


def test_build_request_header_overrides_and_body() -> None:
    raw = build_request(
        "POST",
        "example.net",
        "/v1/chat",
        {"host": "vhost.example", "USER-AGENT": "probe/9", "X-Trace": "1", "Content-Length": "999"},
        b'{"a": 1}',
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b'{"a": 1}'
    assert head.split(b"\r\n") == [
        b"POST /v1/chat HTTP/1.1",
        b"host: vhost.example",
        b"USER-AGENT: probe/9",
        b"Accept: */*",
        b"Connection: close",
        b"X-Trace: 1",
        b"Content-Length: 8",
    ]


def test_build_request_empty_post_has_zero_length() -> None:
    assert b"\r\nContent-Length: 0\r\n" in build_request("POST", "h", "/", {}, None)
    assert b"Content-Length" not in build_request("GET", "h", "/", {}, None)


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GE T", "/", {}),
        ("GET", "/a b", {}),
        ("GET", "", {}),
        ("GET", "/", {"X-A": "x\r\nEvil: 1"}),
        ("GET", "/", {"X-A": "x\n"}),
        ("GET", "/", {"Bad Name": "x"}),
        ("GET", "/", {"X-A": "snow ☃"}),
        ("GET", "/", {"X-A": "nul \x00"}),
    ],
)
def test_build_request_rejects(method: str, path: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        build_request(method, "h", path, headers, None)


def test_fmt_s_and_host_port() -> None:
    assert netio.fmt_s(3.0) == "3"
    assert netio.fmt_s(0.4981) == "0.5"
    assert netio.fmt_s(9.999) == "10"
    assert netio.host_port("::1", 443) == "[::1]:443"
    assert netio.host_port("127.0.0.1", 80) == "127.0.0.1:80"
