"""Facts of the certificates a TLS server sent (pure): what the http probe records for https.

:func:`cert_facts` parses the chain as the server sent it (leaf first, DER, from
:attr:`edgeprobe.probes.netio.ConnectTiming.peer_chain_der`) with ``cryptography.x509``. It works
on whatever was received, verified or not: with ``verify_tls: false`` and after a failed
verification alike (an expired certificate is exactly when these facts are wanted).

* ``subject_cn``, ``issuer_cn``, ``issuer_o``: the leaf's subject common name and its issuer's
  common name and organisation (the first of each; at most :data:`MAX_NAME_CHARS` characters).
* ``sans``: the leaf's subject alternative names, comma-separated, at most :data:`MAX_SANS` of
  them in certificate order: DNS names and IP addresses as they are, e-mail addresses as
  ``email:…``, URIs as ``URI:…`` (other kinds are not listed); ``sans_count`` is how many there
  are in all (more than listed: the list was cut). A string, not a list: InfluxDB fields are scalars.
* ``not_after_at_ns``: the leaf's notAfter in ns since the Unix epoch; None beyond what an int64 of
  ns holds (after 2262-04-11, e.g. RFC 5280's "no expiry" 9999-12-31), ``expiry_days`` still says.
* ``expiry_days``: (leaf notAfter − now) in days, negative once expired.
* ``chain_expiry_days``: the same for the earliest notAfter among the certificates the server sent
  (what blackbox_exporter's ``probe_ssl_earliest_cert_expiry`` looks at): an intermediate about to
  expire shows here first. The trust anchor the client completes the chain with is not counted.
* ``chain_certs``: how many certificates the server sent, leaf included.

A certificate that does not parse is skipped (a leaf that does not parse: no facts at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

MAX_SANS: Final = 20
MAX_NAME_CHARS: Final = 256
NS_PER_DAY: Final = 86_400 * 10**9
INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class CertFacts:
    subject_cn: str | None
    issuer_cn: str | None
    issuer_o: str | None
    sans: str | None
    sans_count: int
    not_after_at_ns: int | None
    expiry_days: float
    chain_expiry_days: float
    chain_certs: int


def _first(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    for attr in name.get_attributes_for_oid(oid):
        value = attr.value
        text = value if isinstance(value, str) else value.decode("latin-1")
        return text[:MAX_NAME_CHARS]
    return None


def _san_texts(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except ValueError:  # a malformed extension: no names rather than no facts
        return []
    out: list[str] = []
    for general in ext.value:
        if isinstance(general, x509.DNSName):
            out.append(general.value)
        elif isinstance(general, x509.IPAddress):
            out.append(str(general.value))
        elif isinstance(general, x509.RFC822Name):
            out.append(f"email:{general.value}")
        elif isinstance(general, x509.UniformResourceIdentifier):
            out.append(f"URI:{general.value}")
    return out


def _not_after_s(cert: x509.Certificate) -> int:
    return math.floor(cert.not_valid_after_utc.timestamp())  # whole seconds: X.509 times are


def _days(not_after_s: int, now_ns: int) -> float:
    return round((not_after_s * 10**9 - now_ns) / NS_PER_DAY, 6)


def parse_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    """The certificates of ``chain_der`` that parse, in order."""
    out: list[x509.Certificate] = []
    for der in chain_der:
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue
    return out


def cert_facts(chain_der: Sequence[bytes], now_ns: int) -> CertFacts | None:
    """What the chain says (see the module docstring); None without a parseable leaf."""
    if not chain_der:
        return None
    try:
        leaf = x509.load_der_x509_certificate(chain_der[0])
    except ValueError:
        return None
    chain = [leaf, *parse_chain(chain_der[1:])]
    sans = _san_texts(leaf)
    leaf_after_s = _not_after_s(leaf)
    leaf_after_ns = leaf_after_s * 10**9
    return CertFacts(
        subject_cn=_first(leaf.subject, NameOID.COMMON_NAME),
        issuer_cn=_first(leaf.issuer, NameOID.COMMON_NAME),
        issuer_o=_first(leaf.issuer, NameOID.ORGANIZATION_NAME),
        sans=",".join(sans[:MAX_SANS]) or None,
        sans_count=len(sans),
        not_after_at_ns=leaf_after_ns if -INT64_MAX <= leaf_after_ns <= INT64_MAX else None,
        expiry_days=_days(leaf_after_s, now_ns),
        chain_expiry_days=_days(min(_not_after_s(c) for c in chain), now_ns),
        chain_certs=len(chain_der),
    )
