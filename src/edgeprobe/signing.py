"""Signed controller messages (commands and central configuration): Ed25519.

Why Ed25519 and not an HMAC key: with a shared HMAC key every agent could sign commands, so one
compromised agent would command the whole fleet. With Ed25519 agents hold only the controller's
*public* key; the private key stays with whoever runs ``edgeprobe fleet``.

Wire form (JSON)::

    {"v": 1, "payload": "<the signed JSON document, as a string>", "sig": "<base64 Ed25519 signature>"}

The signature covers ``b"edgeprobe-signed-v1\\0" + purpose + b"\\0" + payload`` (``purpose`` is
``"cmd"`` or ``"config"``), so a signed config can't be passed off as a command. Every signed
document carries ``issued_at_ns``, ``expires_at_ns`` and a random ``nonce`` (see :class:`Signed`);
what the receiver does with them (expiry, replay cache) is in :class:`Verifier`.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeprobe.files import write_new_file

SIGNED_VERSION: Final = 1
MAX_CLOCK_SKEW_S: Final = 30.0  # issued_at_ns may be this far in the future (clocks differ)

T = TypeVar("T", bound="Signed")


class Signed(msgspec.Struct, kw_only=True):
    """Base of every signed document."""

    issued_at_ns: int
    expires_at_ns: int
    nonce: str


class SignedMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    v: int
    payload: str
    sig: str


class SignatureError(Exception):
    """Why a signed message was refused. ``code`` is short and stable (counted in the status)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _context(purpose: str, payload: bytes) -> bytes:
    return b"edgeprobe-signed-v1\0" + purpose.encode() + b"\0" + payload


def new_nonce() -> str:
    return secrets.token_hex(16)


def generate_key(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str], *, replace: bool = False
) -> None:
    """Write a new controller key pair (PEM): the private key 0600, the public key 0644.

    Refuses (:class:`FileExistsError`, nothing written) when either file exists, unless ``replace``;
    see :func:`edgeprobe.files.write_new_file` for how the files are created.
    """
    if not replace:
        for path in (private_path, public_path):
            if Path(path).is_symlink() or Path(path).exists():
                raise FileExistsError(17, "exists; use --force to replace it", str(path))
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_new_file(private_path, priv, mode=0o600, replace=replace)
    write_new_file(public_path, pub, mode=0o644, replace=replace)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: expected an Ed25519 private key (edgeprobe fleet keygen writes one)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: expected an Ed25519 public key (edgeprobe fleet keygen writes one)")
    return key


def sign(doc: Signed, purpose: str, key: Ed25519PrivateKey) -> bytes:
    """The wire bytes of ``doc`` signed with ``key`` for ``purpose``."""
    payload = msgspec.json.encode(doc)
    sig = key.sign(_context(purpose, payload))
    return msgspec.json.encode(
        SignedMessage(v=SIGNED_VERSION, payload=payload.decode(), sig=base64.b64encode(sig).decode())
    )


def stamp(ttl_s: float, now_ns: int | None = None) -> dict[str, Any]:
    """issued_at_ns / expires_at_ns / nonce for a new document valid ``ttl_s`` seconds."""
    now = time.time_ns() if now_ns is None else now_ns
    return {"issued_at_ns": now, "expires_at_ns": now + round(ttl_s * 1e9), "nonce": new_nonce()}


class Verifier:
    """Checks signature, expiry and (for commands) replay.

    The replay cache holds each accepted nonce until its document expires, and documents may not
    live longer than ``max_ttl_s`` from now, so the cache is bounded by what can arrive within
    ``max_ttl_s`` (and additionally by ``max_nonces``: when full, new documents are refused rather
    than old nonces forgotten).
    """

    def __init__(self, key: Ed25519PublicKey, *, max_ttl_s: float, max_nonces: int = 100_000) -> None:
        self.key = key
        self.max_ttl_s = max_ttl_s
        self.max_nonces = max_nonces
        self._seen: dict[str, int] = {}  # nonce -> expires_at_ns

    def _purge(self, now_ns: int) -> None:
        for nonce in [n for n, exp in self._seen.items() if exp <= now_ns]:
            del self._seen[nonce]

    def open(self, raw: bytes, purpose: str, doc_type: type[T], *, replay: bool, now_ns: int | None = None) -> T:
        """The verified document, or :class:`SignatureError` with the reason."""
        now = time.time_ns() if now_ns is None else now_ns
        try:
            msg = msgspec.json.decode(raw, type=SignedMessage)
        except msgspec.DecodeError as err:
            raise SignatureError("unsigned", f"not a signed message: {err}") from None
        if msg.v != SIGNED_VERSION:
            raise SignatureError("unsigned", f"unsupported signed-message version {msg.v}")
        payload = msg.payload.encode()
        try:
            sig = base64.b64decode(msg.sig, validate=True)
            self.key.verify(sig, _context(purpose, payload))
        except (InvalidSignature, ValueError):
            raise SignatureError(
                "bad_signature", "signature does not verify (tampered, or not the controller key)"
            ) from None
        try:
            doc = msgspec.json.decode(payload, type=doc_type)
        except msgspec.DecodeError as err:  # signed by the controller but malformed: report it
            raise SignatureError("malformed", f"signed document is malformed: {err}") from None
        if doc.expires_at_ns <= now:
            raise SignatureError("expired", f"expired {(now - doc.expires_at_ns) / 1e9:.1f} s ago")
        if doc.issued_at_ns > now + MAX_CLOCK_SKEW_S * 1e9:
            raise SignatureError("future", "issued in the future (clock skew above 30 s?)")
        if doc.expires_at_ns - now > self.max_ttl_s * 1e9:
            raise SignatureError("ttl_too_long", f"expires more than {self.max_ttl_s:g} s from now")
        if replay:
            self._purge(now)
            if doc.nonce in self._seen:
                raise SignatureError("replayed", f"nonce {doc.nonce} was already used")
            if len(self._seen) >= self.max_nonces:
                raise SignatureError("busy", "too many recent commands (replay cache full)")
            self._seen[doc.nonce] = doc.expires_at_ns
        return doc
