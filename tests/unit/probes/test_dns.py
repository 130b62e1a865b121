"""The dns kind's pure parts, on responses captured from a real unbound (1.17.1, tests/support/unbound.py)."""

from __future__ import annotations

import msgspec
import pytest

from edgeprobe.probes import dns as dnsprobe
from edgeprobe.probes.dns import (
    Answer,
    Asked,
    DnsConfig,
    DnsResult,
    Resolver,
    check_target,
    digest,
    parse_resolv_conf,
    parse_resolver,
    read_wire,
    summarize,
)
from edgeprobe.probes.outcome import Outcome
from edgeprobe.schema import Observation

# Captured with dns.query.udp from unbound serving www.edgeprobe.test (two A, one AAAA) and a CNAME.
A_TWO = bytes.fromhex(
    "64a68580000100020000000103777777096564676570726f626504746573740000010001c00c000100010000012c0004c000020b"
    "c00c000100010000012c0004c000020a00002904d0000000000000"
)
NXDOMAIN = bytes.fromhex(
    "151485830001000000000001046e6f7065096564676570726f62650474657374000001000100002904d0000000000000"
)
CNAME = bytes.fromhex(
    "c21e8580000100010000000105616c696173096564676570726f626504746573740000050001c00c0005000100000078000603777777"
    "c01200002904d0000000000000"
)
SERVFAIL = bytes.fromhex(
    "9a438182000100000000000101780662726f6b656e096564676570726f62650474657374000001000100002904d0000000000000"
)


def test_read_wire_sorts_answers_and_takes_the_smallest_ttl() -> None:
    assert read_wire(A_TWO, "A") == Answer(
        rcode="NOERROR", answers=["192.0.2.10", "192.0.2.11"], ttl_min_s=300, truncated=False
    )
    assert read_wire(A_TWO, "AAAA").answers == []  # only records of the asked type


def test_read_wire_nxdomain_servfail_cname() -> None:
    assert read_wire(NXDOMAIN, "A") == Answer(rcode="NXDOMAIN", answers=[], ttl_min_s=None, truncated=False)
    assert read_wire(SERVFAIL, "A").rcode == "SERVFAIL"
    assert read_wire(CNAME, "CNAME") == Answer(
        rcode="NOERROR", answers=["www.edgeprobe.test."], ttl_min_s=120, truncated=False
    )


@pytest.mark.parametrize(
    ("text", "shown", "address", "port", "transport"),
    [
        ("9.9.9.9", "9.9.9.9:53", "9.9.9.9", 53, "udp"),
        ("127.0.0.1:5353", "127.0.0.1:5353", "127.0.0.1", 5353, "udp"),
        ("::1", "[::1]:53", "::1", 53, "udp"),
        ("[2001:db8::1]:5300", "[2001:db8::1]:5300", "2001:db8::1", 5300, "udp"),
        ("tls://1.1.1.1", "tls://1.1.1.1:853", "1.1.1.1", 853, "tls"),
        ("TLS://[::1]:8853", "tls://[::1]:8853", "::1", 8853, "tls"),
    ],
)
def test_parse_resolver(text: str, shown: str, address: str, port: int, transport: str) -> None:
    assert parse_resolver(text, "udp") == Resolver(text=shown, address=address, port=port, transport=transport)  # type: ignore[arg-type]


def test_parse_resolver_default_transport() -> None:
    assert parse_resolver("127.0.0.1", "tcp").transport == "tcp"


@pytest.mark.parametrize("text", ["dns.google", "1.2.3.4:0", "1.2.3.4:70000", "[::1", "[::1]x", "https://1.1.1.1", ""])
def test_parse_resolver_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a resolver"):
        parse_resolver(text, "udp")


def test_config_rejects_a_resolver_name_at_load() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"resolvers": ["dns.google"]}, DnsConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"rtype": "ANY"}, DnsConfig)


def test_parse_resolv_conf() -> None:
    text = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
    text += "nameserver ::1 # x\noptions ndots:1\n"
    assert parse_resolv_conf(text) == ["10.0.0.2", "::1"]


@pytest.mark.parametrize("target", ["example.net", "example.net.", "_dns._udp.example.net", "a-b.example"])
def test_check_target_accepts(target: str) -> None:
    assert check_target(target) is None


@pytest.mark.parametrize("target", ["", " example.net", "exa mple.net", "example.net@1.1.1.1", "a" * 64 + ".net"])
def test_check_target_rejects(target: str) -> None:
    assert check_target(target) is not None


def _asked(
    resolver: str, rcode: str | None, answers: list[str], rtt: float | None, changed: bool | None = None
) -> Asked:
    r = parse_resolver(resolver, "udp")
    if rcode is None:
        return Asked(r, outcome=Outcome.TIMEOUT, reason=f"no answer from {r.text}")
    ok = rcode in ("NOERROR", "NXDOMAIN")
    return Asked(
        r,
        outcome=Outcome.OK if ok else Outcome.DNS_ERROR,
        reason=None if ok else f"{r.text} answered {rcode}",
        rtt_ms=rtt,
        answer=Answer(rcode=rcode, answers=answers, ttl_min_s=60 if answers else None, truncated=False),
        changed=changed,
    )


def test_summarize_over_ok_resolvers_only() -> None:
    result = DnsResult(rtype="A", transport="udp", resolver_set="x")
    asked = [
        _asked("127.0.0.1:1", "NOERROR", ["192.0.2.2", "192.0.2.1"], 3.0, changed=False),
        _asked("127.0.0.1:2", None, [], None),
        _asked("127.0.0.1:3", "SERVFAIL", [], 0.5),
        _asked("127.0.0.1:4", "NOERROR", ["192.0.2.3"], 1.0, changed=True),
    ]
    summarize(result, asked, max_answers=2)
    assert (result.resolvers_total, result.resolvers_ok) == (4, 2)
    assert (result.rtt_min_ms, result.rtt_median_ms, result.rtt_max_ms) == (1.0, 2.0, 3.0)
    assert result.rtts_ms == [3.0, None, 0.5, 1.0]  # the SERVFAIL's time is kept per resolver, not in the summary
    assert result.ttls_min_s == [60.0, None, None, 60.0]
    assert result.rcodes == "NOERROR,-,SERVFAIL,NOERROR"
    assert result.outcomes == "ok,timeout,dns_error,ok"
    assert result.errors == "no answer from 127.0.0.1:2; 127.0.0.1:3 answered SERVFAIL"
    assert result.answers == "192.0.2.1\n192.0.2.2"  # the union, sorted, bounded
    assert result.answers_count == 3
    assert result.answers_digest == digest("NOERROR", ["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    assert result.answers_agree is False
    assert result.answers_changed is True
    assert result.rcode == "NOERROR"


def test_summarize_nothing_answered_leaves_figures_unmeasured() -> None:
    result = DnsResult(rtype="A", transport="udp", resolver_set="x")
    summarize(result, [_asked("127.0.0.1:2", None, [], None)], max_answers=8)
    assert result.resolvers_ok == 0
    assert result.rtt_min_ms is None and result.answers is None and result.answers_changed is None
    assert result.rtts_ms == [None]


def test_answers_are_cut() -> None:
    long = "x" * 1000
    assert len(dnsprobe.bounded([long], 5)) == dnsprobe.MAX_ANSWER_CHARS


def test_digest_includes_the_rcode() -> None:
    assert digest("NOERROR", []) != digest("NXDOMAIN", [])
    assert digest("NOERROR", ["b", "a"]) == digest("NOERROR", ["a", "b", "a"])


def test_render_from_partial_fields() -> None:
    obs = Observation(
        id="x", seq=0, kind="dns", target="www.example", started_at_ns=0, duration_ms=1.0, outcome="ok",
        fields={
            "rtype": "A", "transport": "udp", "resolver_set": "127.0.0.1:53,127.0.0.1:54", "resolvers_total": 2,
            "resolvers_ok": 1, "rtt_min_ms": 1.5, "answers": "192.0.2.1", "answers_count": 1,
            "rtts_ms": [1.5, None], "ttls_min_s": [300.0, None], "rcodes": "NOERROR,-", "outcomes": "ok,timeout",
            "answers_changed": True,
        },
    )  # fmt: skip
    assert dnsprobe.render(obs) == [
        "192.0.2.1",
        ";; 127.0.0.1:53: NOERROR in 1.500 ms, ttl 300 s",
        ";; 127.0.0.1:54: timeout",
        ";; www.example A over udp: 1/2 resolvers ok, fastest 1.500 ms; answers changed",
    ]
    assert dnsprobe.render(Observation(
        id="x", seq=0, kind="dns", target="w", started_at_ns=0, duration_ms=1.0, outcome="error", fields={}
    )) == [";; w: no resolver asked"]  # fmt: skip
