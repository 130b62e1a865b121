"""Streaming LLM responses, pure: framing, per-API interpretation, the figures, request bodies.

The inference probe reads bytes off the socket and hands them over here, with the monotonic
time they arrived. Nothing in this package does I/O or reads a clock.

Three layers, each usable on its own, and the requests, one module each:

1. Framing, :mod:`~edgeprobe.probes.llmstream.decoders`: :class:`SSEDecoder` (OpenAI, TGI,
   Anthropic) and :class:`NDJSONDecoder` (Ollama) take bytes split at any boundary and return
   complete framed items.
2. Interpretation, :mod:`~edgeprobe.probes.llmstream.interpretation`: :func:`interpret` (or one
   of :data:`INTERPRETERS`) turns one framed item of a given API into a :class:`StreamEvent`.
   :class:`StreamParser` chains layers 1 and 2 for one API.
3. Figures, :mod:`~edgeprobe.probes.llmstream.figures`: :class:`StreamStats` takes
   ``(t_ns, StreamEvent)`` pairs and computes :class:`StreamFigures` (TTFT, E2E, ITL, TPOT,
   tokens; the definitions are in that module) and the :class:`StreamProblem` if there is one.

Requests, :mod:`~edgeprobe.probes.llmstream.request`: the body, headers and expected response
Content-Type of a streaming request to each API. The APIs themselves and how each frames its
stream are in :mod:`~edgeprobe.probes.llmstream.apis`.

Every public name of the submodules is re-exported here; callers import from this package.
"""

from __future__ import annotations

from edgeprobe.probes.llmstream.apis import APIS, ERROR_MESSAGE_MAX_CHARS, Api, Framing, check_api, framing
from edgeprobe.probes.llmstream.decoders import (
    MAX_EVENT_BYTES,
    MAX_LINE_BYTES,
    Framed,
    NDJSONDecoder,
    NDJSONLine,
    NDJSONTail,
    SSEComment,
    SSEDecoder,
    SSEEvent,
    SSETail,
    StreamLimitError,
)
from edgeprobe.probes.llmstream.figures import StreamFigures, StreamProblem, StreamStats
from edgeprobe.probes.llmstream.interpretation import (
    END_MARKERS,
    INTERPRETERS,
    KEEPALIVE_EVENT,
    EventKind,
    ObjectHandler,
    StreamEvent,
    StreamParser,
    StreamTail,
    interpret,
    interpret_anthropic,
    interpret_ollama_chat,
    interpret_ollama_generate,
    interpret_openai_chat,
    interpret_openai_completions,
    interpret_tgi,
)
from edgeprobe.probes.llmstream.request import (
    ANTHROPIC_VERSION,
    PROTECTED_BODY_FIELDS,
    STREAM_CONTENT_TYPES,
    auth_headers,
    build_request_body,
    check_content_type,
    protected_overrides,
    request_headers,
)

__all__ = [
    "ANTHROPIC_VERSION",
    "APIS",
    "END_MARKERS",
    "ERROR_MESSAGE_MAX_CHARS",
    "INTERPRETERS",
    "KEEPALIVE_EVENT",
    "MAX_EVENT_BYTES",
    "MAX_LINE_BYTES",
    "PROTECTED_BODY_FIELDS",
    "STREAM_CONTENT_TYPES",
    "Api",
    "EventKind",
    "Framed",
    "Framing",
    "NDJSONDecoder",
    "NDJSONLine",
    "NDJSONTail",
    "ObjectHandler",
    "SSEComment",
    "SSEDecoder",
    "SSEEvent",
    "SSETail",
    "StreamEvent",
    "StreamFigures",
    "StreamLimitError",
    "StreamParser",
    "StreamProblem",
    "StreamStats",
    "StreamTail",
    "auth_headers",
    "build_request_body",
    "check_api",
    "check_content_type",
    "framing",
    "interpret",
    "interpret_anthropic",
    "interpret_ollama_chat",
    "interpret_ollama_generate",
    "interpret_openai_chat",
    "interpret_openai_completions",
    "interpret_tgi",
    "protected_overrides",
    "request_headers",
]
