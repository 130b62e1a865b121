"""Typed probe outcomes.

A probe either returns its typed result (outcome ``ok``) or raises :class:`ProbeFailure`
carrying an :class:`Outcome`, a human reason and, when some of the measurement happened,
a partial result. Loss is data: a failed ICMP run still reports ``sent``/``received``.
"""

from __future__ import annotations

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
    CANCELLED = "cancelled"  # stopped by shutdown before it finished
    ERROR = "error"  # anything else; the reason says what


class ProbeFailure(Exception):
    """Raised by a probe to report a typed failure. ``partial`` is the result measured so far."""

    def __init__(self, outcome: Outcome, reason: str, partial: Any = None) -> None:
        super().__init__(f"{outcome.value}: {reason}")
        self.outcome = outcome
        self.reason = reason
        self.partial = partial
