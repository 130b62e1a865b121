"""The dns probe against a real DNS server started here: unbound on 127.0.0.1 (tests/support/unbound.py).

Nothing is sent anywhere else: every query names the local unbound (or a local UDP socket that
never answers) as its resolver, and unbound refuses names outside its zone without querying on.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from edgeprobe.configfile import convert
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation
from tests.support.unbound import Unbound

KIND = KINDS["dns"]
NAME = "www.edgeprobe.test"
RECORDS = [
    f"{NAME}. 300 IN A 192.0.2.10",
    f"{NAME}. 300 IN A 192.0.2.11",
    f"{NAME}. 60 IN AAAA 2001:db8::10",
]


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    server = Unbound(tmp_path_factory.mktemp("unbound"), records=list(RECORDS))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def silent_udp() -> Iterator[int]:
    """A UDP port on 127.0.0.1 with a socket bound that never answers (no ICMP unreachable either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
async def ctx() -> AsyncIterator[ProbeContext]:
    async with ProbeContext() as c:
        yield c


async def ask(ctx: ProbeContext, name: str, **options: Any) -> Observation:
    config = convert(options, KIND.config_type, "test")
    return await run_probe(KIND, name, config, ctx, seq=0)


async def test_a_records(unbound: Unbound, ctx: ProbeContext) -> None:
    obs = await ask(ctx, NAME, resolvers=[f"127.0.0.1:{unbound.port}"])
    assert obs.outcome == "ok", obs.reason
    f = obs.fields
    assert f["answers"] == "192.0.2.10\n192.0.2.11"
    assert (f["rcode"], f["rcodes"], f["outcomes"], f["ttl_min_s"]) == ("NOERROR", "NOERROR", "ok", 300)
    assert (f["rtype"], f["transport"], f["resolver_set"]) == ("A", "udp", f"127.0.0.1:{unbound.port}")
    assert f["resolvers_ok"] == f["resolvers_total"] == 1
    assert 0 < f["rtt_min_ms"] == f["rtts_ms"][0] < obs.duration_ms
    assert f["answers_changed"] is None  # a first run has nothing to compare with


async def test_aaaa_over_tcp(unbound: Unbound, ctx: ProbeContext) -> None:
    obs = await ask(ctx, NAME, resolvers=[f"127.0.0.1:{unbound.port}"], rtype="AAAA", transport="tcp")
    assert obs.outcome == "ok", obs.reason
    assert (obs.fields["answers"], obs.fields["ttl_min_s"], obs.fields["transport"]) == ("2001:db8::10", 60, "tcp")


async def test_nxdomain_is_an_answer(unbound: Unbound, ctx: ProbeContext) -> None:
    obs = await ask(ctx, "nope.edgeprobe.test", resolvers=[f"127.0.0.1:{unbound.port}"])
    assert obs.outcome == "ok", obs.reason
    assert (obs.fields["rcode"], obs.fields["answers"], obs.fields["answers_count"]) == ("NXDOMAIN", None, 0)


@pytest.mark.parametrize(("name", "rcode"), [("x.broken.edgeprobe.test", "SERVFAIL"), ("outside.example", "REFUSED")])
async def test_servfail_and_refused_are_dns_errors(unbound: Unbound, ctx: ProbeContext, name: str, rcode: str) -> None:
    obs = await ask(ctx, name, resolvers=[f"127.0.0.1:{unbound.port}"])
    assert obs.outcome == "dns_error"
    assert obs.reason == f"127.0.0.1:{unbound.port} answered {rcode}"
    assert obs.fields["rcodes"] == rcode and obs.fields["rtts_ms"][0] > 0  # the partial result is kept


async def test_a_change_of_the_answer_set_between_runs(unbound: Unbound, ctx: ProbeContext) -> None:
    name = "change.edgeprobe.test"
    resolvers = [f"127.0.0.1:{unbound.port}"]
    unbound.replace(f"{name}.", "A", [f"{name}. 30 IN A 192.0.2.20"])
    first = await ask(ctx, name, resolvers=resolvers)
    same = await ask(ctx, name, resolvers=resolvers)
    unbound.replace(f"{name}.", "A", [f"{name}. 30 IN A 192.0.2.21", f"{name}. 30 IN A 192.0.2.22"])
    changed = await ask(ctx, name, resolvers=resolvers)
    after = await ask(ctx, name, resolvers=resolvers)
    assert [o.fields["answers_changed"] for o in (first, same, changed, after)] == [None, False, True, False]
    assert changed.fields["answers"] == "192.0.2.21\n192.0.2.22"
    assert first.fields["answers_digest"] == same.fields["answers_digest"] != changed.fields["answers_digest"]
    async with ProbeContext() as other:  # the memory is the context's: a new one starts afresh
        assert (await ask(other, name, resolvers=resolvers)).fields["answers_changed"] is None


async def test_timeout_of_a_silent_resolver(ctx: ProbeContext, silent_udp: int) -> None:
    obs = await ask(ctx, NAME, resolvers=[f"127.0.0.1:{silent_udp}"], timeout_s=0.3)
    assert obs.outcome == "timeout"
    assert obs.reason == f"no answer from 127.0.0.1:{silent_udp} within 0.3 s"
    assert obs.fields["rtts_ms"] == [None] and obs.fields["resolvers_ok"] == 0
    assert obs.duration_ms < 1300  # within the probe's own timeout, not the handler's deadline


async def test_one_silent_resolver_of_two_is_data(unbound: Unbound, ctx: ProbeContext, silent_udp: int) -> None:
    good, bad = f"127.0.0.1:{unbound.port}", f"127.0.0.1:{silent_udp}"
    obs = await ask(ctx, NAME, resolvers=[good, bad], timeout_s=0.3)
    assert obs.outcome == "ok", obs.reason
    f = obs.fields
    assert (f["resolvers_ok"], f["resolvers_total"], f["outcomes"], f["rcodes"]) == (1, 2, "ok,timeout", "NOERROR,-")
    assert f["rtts_ms"][1] is None and f["errors"] == f"no answer from {bad} within 0.3 s"
    assert f["resolver_set"] == f"{good},{bad}"


async def test_dns_over_tls(unbound: Unbound, ctx: ProbeContext) -> None:
    resolver = f"tls://127.0.0.1:{unbound.tls_port}"
    obs = await ask(ctx, NAME, resolvers=[resolver], verify_tls=False)
    assert obs.outcome == "ok", obs.reason
    assert (obs.fields["transport"], obs.fields["answers"]) == ("tls", "192.0.2.10\n192.0.2.11")
    mixed = await ask(ctx, NAME, resolvers=[resolver, f"127.0.0.1:{unbound.port}"], verify_tls=False)
    assert mixed.outcome == "ok" and mixed.fields["transport"] == "mixed" and mixed.fields["answers_agree"] is True


async def test_dns_over_tls_checks_the_certificate(unbound: Unbound, ctx: ProbeContext) -> None:
    obs = await ask(ctx, NAME, resolvers=[f"tls://127.0.0.1:{unbound.tls_port}"])
    assert obs.outcome == "tls_error"
    assert "certificate verify failed" in (obs.reason or "")


async def test_a_refused_address_is_never_asked(unbound: Unbound) -> None:
    async def refuse(name: str, address: str, port: int) -> str | None:
        return "not allowed"

    async with ProbeContext() as owner:
        obs = await ask(owner.restricted(refuse), NAME, resolvers=[f"127.0.0.1:{unbound.port}"])
    assert obs.outcome == "policy_refused"
    assert obs.fields["rtts_ms"] == [None]


def test_cli_dns(unbound: Unbound) -> None:
    from click.testing import CliRunner

    from edgeprobe.cli import main

    result = CliRunner().invoke(main, ["dns", NAME, f"@127.0.0.1:{unbound.port}", "-t", "aaaa", "--tcp"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "2001:db8::10"
    assert lines[1].startswith(f";; 127.0.0.1:{unbound.port}: NOERROR in ")
    result = CliRunner().invoke(main, ["dns", "outside.example", f"@127.0.0.1:{unbound.port}", "--json"])
    assert result.exit_code == 1
    assert '"rcodes": "REFUSED"' in result.output


def test_cli_dns_usage() -> None:
    from click.testing import CliRunner

    from edgeprobe.cli import main

    result = CliRunner().invoke(main, ["dns", "www.example", "dns.google"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["dns", "www.example", "@dns.google"])
    assert result.exit_code == 2
    assert "expected a resolver" in result.output
