"""Probes ask ``ProbeContext.check_address`` before every connection (issue 12, item 12), and keep
credentials in a target's query out of what they record (item 17). Local servers on 127.0.0.1 and
127.0.0.2 only; the agent's policy (allow 127.0.0.1/32) is the check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
from aiohttp import web

from edgeprobe.agent.policy import PolicyConfig, TargetPolicy
from edgeprobe.collector.lineproto import encode_observation
from edgeprobe.probes import http, icmp, inference, tcp
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe
from edgeprobe.probes.outcome import Outcome
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation, encode
from tests.support.paths import REPO
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

STREAM = (REPO / "tests" / "golden" / "streams" / "openai-chat-usage.sse").read_bytes()
SECRET = "q-SECRET-4d1f09a7c2b8"


def only_127_0_0_1() -> ProbeContext:
    """What the agent gives remote requests: its policy's check, here allowing 127.0.0.1 alone."""
    return ProbeContext().restricted(TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.1/32"])).address_check())


class Seen:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0


@asynccontextmanager
async def http_server(host: str, seen: Seen, redirect_to: str | None = None) -> AsyncIterator[str]:
    """An HTTP server on ``host`` that records every request; it redirects (302) when asked to, and
    answers POSTs with a streamed OpenAI chat answer."""

    async def any_request(request: web.Request) -> web.StreamResponse:
        seen.requests.append((request.path_qs, dict(request.headers), await request.read()))
        if redirect_to is not None:
            raise web.HTTPFound(redirect_to)
        if request.method == "POST":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(STREAM)
            await resp.write_eof()
            return resp
        return web.Response(text="hello\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def tcp_listener(host: str, seen: Seen) -> AsyncIterator[int]:
    class Count(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            seen.connections += 1  # in the loop's accept callback: in the order of the backlog
            transport.close()

    server = await asyncio.get_running_loop().create_server(Count, host, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------- redirects (item 12)


async def test_a_redirect_to_a_refused_address_is_not_followed() -> None:
    allowed, refused = Seen(), Seen()
    async with (
        http_server("127.0.0.2", refused) as refused_url,
        http_server("127.0.0.1", allowed, redirect_to=f"{refused_url}/inside") as allowed_url,
    ):
        config = http.HttpConfig(follow_redirects=True, timeout_s=5)
        obs = await run_probe(http.KIND, f"{allowed_url}/start", config, only_127_0_0_1(), seq=0)
        assert obs.outcome == Outcome.POLICY_REFUSED.value == "policy_refused", obs
        assert obs.reason is not None
        assert "127.0.0.2" in obs.reason and "policy_loopback" in obs.reason, obs.reason
        assert [r[0] for r in allowed.requests] == ["/start"]
        assert refused.requests == [], "the refused server saw a request"
        assert obs.fields["status"] is None  # the refused hop: never asked

        # the test's own control: unchecked, the same redirect reaches the second server
        async with ProbeContext() as free:
            obs = await run_probe(http.KIND, f"{allowed_url}/start", config, free, seq=1)
        assert obs.outcome == "ok" and obs.fields["redirects"] == 1
        assert [r[0] for r in refused.requests] == ["/inside"]


async def test_redirects_between_allowed_addresses_are_followed() -> None:
    first, second = Seen(), Seen()
    async with (
        http_server("127.0.0.1", second) as second_url,
        http_server("127.0.0.1", first, redirect_to=f"{second_url}/b") as first_url,
    ):
        obs = await run_probe(
            http.KIND, f"{first_url}/a", http.HttpConfig(follow_redirects=True), only_127_0_0_1(), seq=0
        )
    assert obs.outcome == "ok" and obs.fields["redirects"] == 1, obs
    assert [r[0] for r in second.requests] == ["/b"]


# ---------------------------------------------------------------------- every kind asks first


async def test_tcp_never_connects_to_a_refused_address() -> None:
    seen = Seen()
    async with tcp_listener("127.0.0.2", seen) as port:
        config = tcp.TcpConfig(count=2, interval_s=0.01)
        obs = await run_probe(tcp.KIND, f"127.0.0.2:{port}", config, only_127_0_0_1(), seq=0)
        assert obs.outcome == "policy_refused" and "policy_loopback" in (obs.reason or ""), obs
        async with ProbeContext() as free:  # control: the listener does count connections
            assert (await run_probe(tcp.KIND, f"127.0.0.2:{port}", tcp.TcpConfig(count=1), free, seq=1)).outcome == "ok"
        # accepted in order: once the control's connection is counted, an earlier one would be too
        await wait_for_async(lambda: seen.connections, 5, "the control connection accepted")
        assert seen.connections == 1


async def test_icmp_sends_no_echo_to_a_refused_address() -> None:
    """Checked before any ICMP socket is opened or echo sent (so this needs no ICMP permission)."""
    obs = await run_probe(icmp.KIND, "127.0.0.2", icmp.IcmpConfig(count=1), only_127_0_0_1(), seq=0)
    assert obs.outcome == "policy_refused" and "policy_loopback" in (obs.reason or ""), obs


async def test_inference_never_connects_to_a_refused_address() -> None:
    seen = Seen()
    async with http_server("127.0.0.2", seen) as url:
        config = inference.InferenceConfig(model="m", max_tokens=4, timeout_s=3)
        obs = await run_probe(inference.KIND, f"{url}/v1", config, only_127_0_0_1(), seq=0)
    assert obs.outcome == "policy_refused" and "policy_loopback" in (obs.reason or ""), obs
    assert seen.requests == []


async def test_a_kept_connection_is_checked_before_reuse() -> None:
    """The connection pool belongs to the context's owner and is shared with unchecked runs (the
    owner's file jobs): a connection one of them opened is not reused by a checked run."""
    seen = Seen()
    async with http_server("127.0.0.2", seen) as url, ProbeContext() as owner:
        config = inference.InferenceConfig(
            model="m", max_tokens=4, timeout_s=3, connection="reuse", measure_net_rtt=False
        )
        first = await run_probe(inference.KIND, f"{url}/v1", config, owner, seq=0)
        assert first.outcome == "ok" and len(seen.requests) == 1, first
        view = owner.restricted(TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.1/32"])).address_check())
        second = await run_probe(inference.KIND, f"{url}/v1", config, view, seq=1)
        assert second.outcome == "policy_refused", second
        assert len(seen.requests) == 1


# ---------------------------------------------------------------------- credentials in the query (item 17)


def line_protocol(obs: Observation) -> str:
    kind = KINDS[obs.kind]
    return encode_observation(obs, agent="a", site="s", measurement=kind.measurement, tag_fields=kind.tag_fields).line


@pytest.mark.parametrize("param", ["api_key", "Token", "X-Amz-Signature", "sig"])
async def test_a_key_in_the_query_is_sent_but_not_recorded(param: str) -> None:
    seen = Seen()
    async with http_server("127.0.0.1", seen) as url, ProbeContext() as ctx:
        target = f"{url}/text?region=eu&{param}={SECRET}"
        obs = await run_probe(http.KIND, target, http.HttpConfig(), ctx, seq=0)
    assert obs.outcome == "ok", obs
    assert seen.requests[0][0] == f"/text?region=eu&{param}={SECRET}"  # the request still sends it
    assert obs.target == f"{url}/text?region=eu&{param}=REDACTED"
    assert SECRET not in encode(obs).decode()  # what goes to MQTT
    assert SECRET not in line_protocol(obs)  # what goes to InfluxDB


async def test_an_inference_base_url_key_is_sent_but_not_recorded() -> None:
    seen = Seen()
    async with http_server("127.0.0.1", seen) as url, ProbeContext() as ctx:
        config = inference.InferenceConfig(model="m", max_tokens=4, timeout_s=3)
        obs = await run_probe(inference.KIND, f"{url}/v1beta?key={SECRET}", config, ctx, seq=0)
    assert obs.outcome == "ok", obs
    assert seen.requests[0][0].endswith(f"?key={SECRET}")
    assert obs.target == f"{url}/v1beta?key=REDACTED"
    assert SECRET not in encode(obs).decode() and SECRET not in line_protocol(obs)


async def test_a_failure_reason_quoting_the_url_does_not_carry_the_key() -> None:
    """A redirect loop's reason names the next location; a server that echoes our query there does
    not get the key into the reason."""
    seen = Seen()
    async with http_server("127.0.0.1", seen, redirect_to=f"/again?token={SECRET}") as url, ProbeContext() as ctx:
        config = http.HttpConfig(follow_redirects=True, max_redirects=1)
        obs = await run_probe(http.KIND, f"{url}/start?token={SECRET}", config, ctx, seq=0)
    assert obs.outcome == "http_error" and "redirects" in (obs.reason or ""), obs
    assert SECRET not in msgspec.json.encode(obs).decode()
