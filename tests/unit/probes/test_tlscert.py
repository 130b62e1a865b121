"""Certificate facts (probes/tlscert.py) of certificates made here: expired, expiring, SANs, self-signed."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from edgeprobe.probes import http, tlscert
from edgeprobe.schema import Observation
from tests.support.certs import make_cert, name, now

NOW = now()
NOW_NS = int(NOW.timestamp()) * 10**9


def test_no_chain_or_garbage_gives_no_facts() -> None:
    assert tlscert.cert_facts([], NOW_NS) is None
    assert tlscert.cert_facts([b"not a certificate"], NOW_NS) is None


def test_self_signed_with_sans() -> None:
    leaf = make_cert(
        name("edge.example", "Edge Org"),
        not_after=NOW + dt.timedelta(days=30),
        sans=["DNS:edge.example", "DNS:*.edge.example", "IP:127.0.0.1", "IP:::1", "email:ops@example.net",
              "URI:https://example.net/"],
    )  # fmt: skip
    f = tlscert.cert_facts([leaf.der], NOW_NS)
    assert f is not None
    assert (f.subject_cn, f.issuer_cn, f.issuer_o) == ("edge.example", "edge.example", "Edge Org")
    assert f.sans == "edge.example,*.edge.example,127.0.0.1,::1,email:ops@example.net,URI:https://example.net/"
    assert f.sans_count == 6
    assert f.expiry_days == 30.0 and f.chain_expiry_days == 30.0
    assert f.not_after_at_ns == NOW_NS + 30 * 86_400 * 10**9
    assert f.chain_certs == 1


def test_expired_is_negative() -> None:
    leaf = make_cert(name("old.example"), not_after=NOW - dt.timedelta(days=2, hours=12))
    f = tlscert.cert_facts([leaf.der], NOW_NS)
    assert f is not None
    assert f.expiry_days == -2.5
    assert f.sans is None and f.sans_count == 0 and f.issuer_o is None


def test_chain_expiry_is_the_earliest_the_server_sent() -> None:
    ca = make_cert(name("Test Root", "Test Trust"), not_after=NOW + dt.timedelta(days=3650), ca=True)
    inter = make_cert(
        name("Test Intermediate", "Test Trust"), not_after=NOW + dt.timedelta(days=3), issuer=ca, ca=True
    )
    leaf = make_cert(name("svc.example"), not_after=NOW + dt.timedelta(days=60), issuer=inter, sans=["DNS:svc.example"])
    f = tlscert.cert_facts([leaf.der, inter.der], NOW_NS + 86_400 * 10**9 // 4)  # six hours later
    assert f is not None
    assert (f.subject_cn, f.issuer_cn, f.issuer_o) == ("svc.example", "Test Intermediate", "Test Trust")
    assert f.expiry_days == 59.75
    assert f.chain_expiry_days == 2.75  # the intermediate, expiring in 3 days
    assert f.chain_certs == 2
    # an unparseable certificate after the leaf is counted as sent, not as expiring
    f2 = tlscert.cert_facts([leaf.der, b"junk", inter.der], NOW_NS)
    assert f2 is not None and (f2.chain_certs, f2.chain_expiry_days) == (3, 3.0)


def test_sans_are_bounded() -> None:
    sans = [f"DNS:host{i}.example" for i in range(tlscert.MAX_SANS + 5)]
    leaf = make_cert(name(None, "No CN Org"), not_after=NOW + dt.timedelta(days=1), sans=sans)
    f = tlscert.cert_facts([leaf.der], NOW_NS)
    assert f is not None
    assert f.subject_cn is None and f.issuer_o == "No CN Org"
    assert f.sans is not None and f.sans.split(",") == [s[4:] for s in sans[: tlscert.MAX_SANS]]
    assert f.sans_count == tlscert.MAX_SANS + 5


def test_no_expiry_date_beyond_int64_ns() -> None:
    # RFC 5280 4.1.2.5: 99991231235959Z means "no well-defined expiration date"
    leaf = make_cert(name("forever"), not_after=dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
    f = tlscert.cert_facts([leaf.der], NOW_NS)
    assert f is not None
    assert f.not_after_at_ns is None  # would not fit InfluxDB's int64
    assert f.expiry_days > 2_900_000


@pytest.mark.parametrize(
    ("days", "words"), [(3.25, "expires in 3.2 days"), (-2.0, "EXPIRED 2.0 days ago")]
)  # fmt: skip
def test_render_shows_the_certificate(days: float, words: str) -> None:
    fields = {
        "status": None,
        "cert_subject_cn": "svc.example",
        "cert_issuer_cn": "Test Intermediate",
        "cert_issuer_o": "Test Trust",
        "cert_sans": "a.example,b.example",
        "cert_sans_count": 5,
        "cert_expiry_days": days,
        "chain_expiry_days": days,
        "chain_certs": 2,
    }
    obs = Observation(
        id="x", seq=0, kind="http", target="https://svc.example/", started_at_ns=0, duration_ms=1.0,
        outcome="tls_error", fields=fields,
    )  # fmt: skip
    text = "\n".join(http.render(obs))
    assert "svc.example  issued by Test Intermediate (Test Trust)  " + words in text
    assert "sans     a.example,b.example (+3 more)" in text
    assert "cert" not in "\n".join(http.render(msgspec.structs.replace(obs, fields={})))
