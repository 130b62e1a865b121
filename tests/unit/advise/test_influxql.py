"""The advisor's reader: queries as text, and answers captured from a real influxd 1.6
(data/influx16_answers.json, written by the synthetic points of tests/support/advise_data.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from edgeprobe.advise import influxql
from edgeprobe.advise.influxql import AdviseError
from edgeprobe.collector.config import InfluxConfig
from edgeprobe.configfile import Secret

ANSWERS = json.loads((Path(__file__).parent / "data" / "influx16_answers.json").read_text())


def test_queries_are_what_was_sent_to_the_captured_server() -> None:
    since = "100000w"
    assert influxql.inference_query(since, [("site", "=", "nyc")], 1000) == ANSWERS["inference_query"]
    # icmp/tcp are restricted by site/agent only: their points carry no inference tags
    assert (
        influxql.path_query("icmp", since, [("site", "=", "nyc"), ("tier", "=", "edge")], 1000) == ANSWERS["icmp_query"]
    )


def test_where_values_are_quoted_and_encoded() -> None:
    q = influxql.inference_query("1h", [("target", "!=", "it's C:\\temp"), ("tier", "=", ""), ("x", "=", "a\\")], 5)
    assert "\"target\" != 'it\\'s C:\\\\temp'" in q
    assert "\"x\" = '~ep~a%5C'" in q  # a value ending in a backslash is stored encoded
    assert "\"tier\" = '~ep~'" in q  # the empty value, as the collector stores it


@pytest.mark.parametrize("bad", ["", "site", "=x", "si te=x", "a;b=c", "x" * 65 + "=1"])
def test_where_refuses_what_is_not_tag_value(bad: str) -> None:
    with pytest.raises(AdviseError, match="--where"):
        influxql.parse_where([bad])


def test_where_parses() -> None:
    assert influxql.parse_where(["site=nyc", "target!=https://a=b/"]) == [
        ("site", "=", "nyc"),
        ("target", "!=", "https://a=b/"),
    ]


@pytest.mark.parametrize("since", ["24h", "30m", "7d", "2w", "90s"])
def test_since_accepts_durations(since: str) -> None:
    assert influxql.check_since(since) == since


@pytest.mark.parametrize("since", ["", "0h", "1y", "now()", "24h; DROP DATABASE x", "-1h", "1.5h"])
def test_since_refuses_the_rest(since: str) -> None:
    with pytest.raises(AdviseError, match="--since"):
        influxql.check_since(since)


def test_inference_answer_parses_with_tags_decoded() -> None:
    samples = influxql.parse_inference(ANSWERS["inference"])
    by_outcome = {s.outcome for s in samples}
    assert by_outcome == {"ok", "timeout"}
    odd = [s for s in samples if "odd" in s.target]
    assert odd and odd[0].target == "https://odd.example/v1?q=a b,c=\\"  # stored as ~ep~…%5C
    ok = [s for s in samples if s.outcome == "ok" and s.target == "https://ashburn.example.net/v1"]
    assert len(ok) == 3
    s = ok[0]
    assert s.site == "nyc" and s.tier == "regional"
    assert s.ttft_ms is not None and s.setup_ms is not None and s.net_rtt_ms is not None and s.server_ms is not None
    assert s.ttft_ms == pytest.approx(s.setup_ms + s.net_rtt_ms + s.server_ms, abs=0.01)
    assert s.dns_ms is None  # not measured: None, never 0
    timeouts = [s for s in samples if s.outcome == "timeout"]
    assert timeouts and all(t.ttft_ms is None for t in timeouts)


def test_icmp_answer_parses() -> None:
    paths = influxql.parse_paths("icmp", ANSWERS["icmp"])
    assert {p.target for p in paths} == {
        "nyc-ixp.example.net",
        "fra-ixp.example.net",
        "council-bluffs.example.net",
        "ashburn.example.net",
    }
    assert all(p.kind == "icmp" and p.rtt_ms is not None and p.outcome == "ok" for p in paths)


def test_statement_errors_become_one_line() -> None:
    with pytest.raises(AdviseError, match="database not found: nope") as err:
        influxql.parse_inference(ANSWERS["missing_database"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("answer", [None, [], {"results": 3}, "x"])
def test_not_a_result(answer: object) -> None:
    with pytest.raises(AdviseError, match="not a query result"):
        influxql.parse_inference(answer)


# ----- the HTTP call, against a stand-in server on loopback ------------------------------------------


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/query", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (401, b'{"error":"authorization failed"}', "HTTP 401: authorization failed (check the credentials)"),
        (500, b'{"error":"boom"}', "HTTP 500: boom"),
        (200, b"<html>not influx</html>", "not JSON"),
        (200, json.dumps(ANSWERS["missing_database"]).encode(), "database 'edgeprobe' not found"),
    ],
)
async def test_http_failures_are_one_line(status: int, body: bytes, needle: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body)

    runner, url = await _serve(handler)
    try:
        with pytest.raises(AdviseError) as err:
            await influxql.query(InfluxConfig(url=url), "SELECT 1")
    finally:
        await runner.cleanup()
    assert needle in str(err.value) and "\n" not in str(err.value)


async def test_request_carries_database_epoch_and_credentials_never_shown() -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(
            query=dict(request.query), form=dict(await request.post()), auth=request.headers.get("Authorization")
        )
        return web.Response(status=401, body=b'{"error":"authorization failed"}')

    runner, url = await _serve(handler)
    cfg = msgspec.convert(
        {"api": "v2", "url": url, "org": "o", "bucket": "b1", "token": "s3cr3t"}, InfluxConfig, dec_hook=_secret
    )
    try:
        with pytest.raises(AdviseError) as err:
            await influxql.query(cfg, 'SELECT "ttft_ms" FROM "edgeprobe_inference"')
    finally:
        await runner.cleanup()
    assert seen["query"] == {"db": "b1", "epoch": "ns"}  # v2: the bucket through the v1-compatible /query
    assert seen["form"] == {"q": 'SELECT "ttft_ms" FROM "edgeprobe_inference"'}
    assert seen["auth"] == "Token s3cr3t"
    assert "s3cr3t" not in str(err.value)


def _secret(typ: type, obj: Any) -> Any:
    return Secret(obj)
