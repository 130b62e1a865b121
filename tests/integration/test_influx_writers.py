"""The two InfluxDB writers against small recording HTTP servers on 127.0.0.1.

Both must send the same line protocol; errors must come out as WriteError with the right
``retryable`` and never show a credential.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web

from edgeprobe.collector.config import InfluxConfig
from edgeprobe.collector.influx import GZIP_LEVEL, V1Writer, V2Writer, WriteError, make_writer
from edgeprobe.configfile import convert

LINES = [
    'edgeprobe_tcp,agent=a1,outcome=ok,site=s1,target=example.net:443 id="x1",seq=1i,duration_ms=5.0 1',
    'edgeprobe_tcp,agent=a1,outcome=ok,site=s1,target=with\\ space id="x2",seq=2i,duration_ms=1e+16 2',
    'edgeprobe_http,agent=a1,outcome=ok,site=s1,target=Zürich\\,🚀 id="x3",reason="a\\"b\nc",seq=3i 3',
]
SECRET = "s3cr3t-value"


@dataclass
class Recorded:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes  # aiohttp's server gunzips bodies sent with Content-Encoding: gzip


@dataclass
class Recorder:
    url: str
    requests: list[Recorded] = field(default_factory=list)
    respond: Callable[[web.Request], web.Response] = lambda r: web.Response(status=204)


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder(url="")

    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        if raw[:2] == b"\x1f\x8b":  # not unpacked by the server
            raw = gzip.decompress(raw)
        rec.requests.append(Recorded(request.path, dict(request.query), dict(request.headers), raw))
        return rec.respond(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


def influx(**kw: Any) -> InfluxConfig:
    return convert(kw, InfluxConfig, "test")


def v1(url: str, **kw: Any) -> InfluxConfig:
    return influx(api="v1", url=url, database="edge db", create_database=False, **kw)


def v2(url: str, **kw: Any) -> InfluxConfig:
    return influx(api="v2", url=url, org="my org", bucket="edge/bucket", token=SECRET, **kw)


async def test_v1_and_v2_send_the_same_line_protocol(recorder: Recorder) -> None:
    async with V1Writer(v1(recorder.url, retention_policy="weekly")) as w1:
        await w1.write(LINES)
    async with V2Writer(v2(recorder.url)) as w2:
        await w2.write(LINES)
    assert [r.path for r in recorder.requests] == ["/write", "/api/v2/write"]
    r1, r2 = recorder.requests
    assert r1.body == r2.body == "\n".join(LINES).encode()
    assert r1.headers["Content-Encoding"] == r2.headers["Content-Encoding"] == "gzip"
    assert int(r1.headers["Content-Length"]) == len(gzip.compress(r1.body, compresslevel=GZIP_LEVEL))
    assert r1.query == {"db": "edge db", "rp": "weekly", "precision": "ns"}
    assert r2.query == {"org": "my org", "bucket": "edge/bucket", "precision": "ns"}
    assert r2.headers["Authorization"] == f"Token {SECRET}"
    assert "Authorization" not in r1.headers


async def test_without_gzip(recorder: Recorder) -> None:
    async with V1Writer(v1(recorder.url, gzip=False)) as w1:
        await w1.write(LINES)
    async with V2Writer(v2(recorder.url, gzip=False)) as w2:
        await w2.write(LINES)
    r1, r2 = recorder.requests
    assert "Content-Encoding" not in r1.headers and "Content-Encoding" not in r2.headers
    assert r1.body == r2.body == "\n".join(LINES).encode()


async def test_v1_basic_auth(recorder: Recorder) -> None:
    async with V1Writer(v1(recorder.url, username="writer", password=SECRET)) as w:
        await w.write(LINES[:1])
    auth = recorder.requests[0].headers["Authorization"]
    assert auth == "Basic " + base64.b64encode(f"writer:{SECRET}".encode()).decode()
    assert SECRET not in str(recorder.requests[0].query)


async def test_v1_token_auth(recorder: Recorder) -> None:
    async with V1Writer(v1(recorder.url, token=SECRET)) as w:
        await w.write(LINES[:1])
    assert recorder.requests[0].headers["Authorization"] == f"Token {SECRET}"


async def test_v1_create_database(recorder: Recorder) -> None:
    recorder.respond = lambda r: web.json_response({"results": [{"statement_id": 0}]})
    async with V1Writer(influx(url=recorder.url, database='we"ird')) as w:
        await w.prepare()
    req = recorder.requests[0]
    assert req.path == "/query"
    assert req.body == b"q=CREATE+DATABASE+%22we%5C%22ird%22"


async def test_v1_create_database_error_inside_200(recorder: Recorder) -> None:
    recorder.respond = lambda r: web.json_response({"results": [{"statement_id": 0, "error": "nope"}]})
    async with V1Writer(influx(url=recorder.url)) as w:
        with pytest.raises(WriteError) as info:
            await w.prepare()
    assert not info.value.retryable and "nope" in info.value.message


async def test_empty_write_sends_nothing(recorder: Recorder) -> None:
    async with make_writer(v1(recorder.url)) as w:
        await w.write([])
    assert recorder.requests == []


def _error_response(status: int, body: dict[str, Any]) -> Callable[[web.Request], web.Response]:
    return lambda r: web.json_response(body, status=status)


ERRORS = [
    (400, {"error": "unable to parse 'bad line': invalid field format"}, False, "unable to parse 'bad line'"),
    (400, {"code": "invalid", "message": "field type conflict"}, False, "field type conflict"),
    (401, {"error": "authorization failed"}, False, "authorization failed"),
    (404, {"error": 'database not found: "x"'}, False, "database not found"),
    (413, {"error": "Request Entity Too Large"}, False, "Too Large"),
    (429, {"message": "slow down"}, True, "slow down"),
    (500, {"error": "engine: cache-max-memory-size exceeded"}, True, "cache-max-memory-size"),
    (503, {"message": "unavailable"}, True, "unavailable"),
]


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize(("status", "body", "retryable", "text"), ERRORS)
async def test_http_errors(
    recorder: Recorder, api: str, status: int, body: dict[str, Any], retryable: bool, text: str
) -> None:
    recorder.respond = _error_response(status, body)
    cfg = v1(recorder.url, token=SECRET) if api == "v1" else v2(recorder.url)
    async with make_writer(cfg) as w:
        with pytest.raises(WriteError) as info:
            await w.write(LINES)
    err = info.value
    assert err.status == status and err.retryable is retryable
    assert text in err.message and f"HTTP {status}" in err.message
    assert err.data_error is (status in (400, 413))
    assert err.__cause__ is not None or api == "v1"
    assert SECRET not in str(err) and SECRET not in repr(err)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("api", ["v1", "v2"])
async def test_connection_refused_is_retryable(api: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    cfg = v1(url, password=SECRET, username="u") if api == "v1" else v2(url)
    async with make_writer(cfg) as w:
        with pytest.raises(WriteError) as info:
            await w.write(LINES)
    err = info.value
    assert err.retryable and err.status is None and err.__cause__ is not None
    assert SECRET not in str(err)


@pytest.mark.parametrize("api", ["v1", "v2"])
async def test_timeout_is_retryable(api: str) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        cfg = v1(url, timeout_s=0.2) if api == "v1" else v2(url, timeout_s=0.2)
        async with make_writer(cfg) as w:
            with pytest.raises(WriteError) as info:
                await w.write(LINES)
        assert info.value.retryable and "timed out" in info.value.message
    finally:
        release.set()
        await runner.cleanup()


def test_config_repr_masks_secrets() -> None:
    cfg = v2("http://127.0.0.1:1")
    assert SECRET not in repr(cfg) and SECRET not in str(msgspec.structs.asdict(cfg))
