"""Typed probe outcomes.

A probe either returns its typed result (outcome ``ok``) or raises :class:`ProbeFailure`
carrying an :class:`Outcome`, a human reason and, when some of the measurement happened,
a partial result. Loss is data: a failed ICMP run still reports ``sent``/``received``.
:func:`classify_exception` maps a foreign exception (OS, DNS, TLS, timeout) to an outcome; the
handler and the I/O below the kinds (netio, the ICMP socket) share it.
"""

from __future__ import annotations

import errno
import socket
import ssl
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"  # no answer within the deadline
    REFUSED = "refused"  # TCP RST / ECONNREFUSED
    UNREACHABLE = "unreachable"  # ICMP unreachable, no route, EHOSTUNREACH/ENETUNREACH
    DNS_ERROR = "dns_error"  # name did not resolve
    TLS_ERROR = "tls_error"  # handshake or certificate failure
    HTTP_ERROR = "http_error"  # the server answered with a status the probe treats as failure
    PROTOCOL_ERROR = "protocol_error"  # the peer spoke, but not the protocol we expected
    PERMISSION_DENIED = "permission_denied"  # e.g. no raw socket and no ICMP datagram socket
    # Streamed responses (the inference probe): the server answered 2xx, but the stream was not right.
    NOT_STREAMING = "not_streaming"  # a complete body (e.g. JSON) where a stream was asked for
    STREAM_ERROR = "stream_error"  # the provider reported an error inside the stream
    STREAM_CUT = "stream_cut"  # the stream ended (connection closed) before its end marker
    MALFORMED_STREAM = "malformed_stream"  # events that are not the API's JSON
    NO_CONTENT = "no_content"  # the stream ended properly but carried no generated text
    # Whoever ran the probe refused an address it resolved to or was redirected to (the agent's
    # policy, through ProbeContext.check_address): nothing was sent there.
    POLICY_REFUSED = "policy_refused"
    CANCELLED = "cancelled"  # stopped by shutdown before it finished
    ERROR = "error"  # anything else; the reason says what


class ProbeFailure(Exception):
    """Raised by a probe to report a typed failure. ``partial`` is the result measured so far."""

    def __init__(self, outcome: Outcome, reason: str, partial: Any = None) -> None:
        super().__init__(f"{outcome.value}: {reason}")
        self.outcome = outcome
        self.reason = reason
        self.partial = partial


_ERRNO_OUTCOME: dict[int, Outcome] = {
    errno.ECONNREFUSED: Outcome.REFUSED,
    errno.EHOSTUNREACH: Outcome.UNREACHABLE,
    errno.ENETUNREACH: Outcome.UNREACHABLE,
    errno.EADDRNOTAVAIL: Outcome.UNREACHABLE,
    errno.ETIMEDOUT: Outcome.TIMEOUT,
    errno.EACCES: Outcome.PERMISSION_DENIED,
    errno.EPERM: Outcome.PERMISSION_DENIED,
}


def classify_exception(exc: BaseException) -> tuple[Outcome, str]:
    """Map a foreign exception to an outcome and a one-line reason (pure)."""
    if isinstance(exc, ProbeFailure):
        return exc.outcome, exc.reason
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT, str(exc) or "timed out"
    if isinstance(exc, socket.gaierror):
        return Outcome.DNS_ERROR, f"name resolution failed: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return Outcome.TLS_ERROR, f"TLS: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_OUTCOME.get(exc.errno, Outcome.ERROR), exc.strerror or str(exc)
    return Outcome.ERROR, f"{type(exc).__name__}: {exc}"
