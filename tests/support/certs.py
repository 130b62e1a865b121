"""Certificates made by the tests (``cryptography``): a CA, leaves it signs, self-signed ones.

Every certificate is real X.509 (EC P-256, SHA-256), valid from ``not_before`` to ``not_after``
as given, so expired and soon-expiring ones can be served by a local TLS server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Made:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def name(cn: str | None, org: str | None = None) -> x509.Name:
    attrs = []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def make_cert(
    subject: x509.Name,
    *,
    not_after: dt.datetime,
    not_before: dt.datetime | None = None,
    issuer: Made | None = None,  # None: self-signed
    sans: list[str] | None = None,  # "DNS:…", "IP:…", "email:…", "URI:…"
    ca: bool = False,
) -> Made:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or not_after - dt.timedelta(days=90))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        names: list[x509.GeneralName] = []
        for san in sans:
            kind, _, value = san.partition(":")
            if kind == "DNS":
                names.append(x509.DNSName(value))
            elif kind == "IP":
                names.append(x509.IPAddress(ipaddress.ip_address(value)))
            elif kind == "email":
                names.append(x509.RFC822Name(value))
            elif kind == "URI":
                names.append(x509.UniformResourceIdentifier(value))
            else:
                raise ValueError(san)
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Made(cert, key)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


LOOPBACK_SANS = ["IP:127.0.0.1", "IP:::1", "DNS:localhost"]


def server_context(tmp: Path, *chain: Made) -> ssl.SSLContext:
    """A server-side SSLContext sending ``chain`` (leaf first; its key is the leaf's)."""
    cert_file, key_file = tmp / "chain.pem", tmp / "key.pem"
    cert_file.write_bytes(b"".join(m.pem for m in chain))
    key_file.write_bytes(chain[0].key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
