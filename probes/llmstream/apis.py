"""The streaming APIs the inference probe speaks, and how each frames its stream.

Shared by the other modules of :mod:`edgeprobe.probes.llmstream`.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias, get_args

Api: TypeAlias = Literal["openai-chat", "openai-completions", "ollama-chat", "ollama-generate", "tgi", "anthropic"]
APIS: Final[tuple[Api, ...]] = get_args(Api)
Framing: TypeAlias = Literal["sse", "ndjson"]

ERROR_MESSAGE_MAX_CHARS: Final = 300
_EXCERPT_CHARS: Final = 120


def check_api(api: str) -> Api:
    """``api`` as an :data:`Api`. Raises ValueError, naming the known APIs, when it is none of them."""
    for known in APIS:
        if api == known:
            return known
    raise ValueError(f"unknown API {api!r}; known: {', '.join(APIS)}")


def framing(api: Api) -> Framing:
    """How ``api`` frames its stream: Ollama uses NDJSON and the others use SSE."""
    return "ndjson" if api.startswith("ollama-") else "sse"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
