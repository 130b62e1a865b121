"""Requests: the body, headers and expected response Content-Type of a streaming request per API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from edgeprobe.probes.llmstream.apis import Api, Framing, check_api, framing


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``. Nested mappings are merged, and everything else is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Body fields that set what a request costs or what it measures: how many tokens may be generated
# and how many completions, the input, the model (a tag on every point) and streaming itself.
# ``extra_body`` may not set them at the top level nor where an API nests them (Ollama's
# ``options``, TGI's ``parameters``): the target policy charges ``max_tokens`` per request, so an
# override such as ``{"max_tokens": 12800000}`` would spend what the policy never allowed.
PROTECTED_BODY_FIELDS: Final = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "max_new_tokens",
        "num_predict",
        "n",
        "best_of",
        "stream",
        "model",
        "messages",
        "prompt",
        "inputs",
    }
)
_NESTED_PARAMETER_KEYS: Final = ("options", "parameters")


def protected_overrides(extra: Mapping[str, Any]) -> list[str]:
    """The keys of ``extra`` (dotted) that would override a protected body field (pure)."""
    found = [key for key in extra if key in PROTECTED_BODY_FIELDS]
    for outer in _NESTED_PARAMETER_KEYS:
        inner = extra.get(outer)
        if isinstance(inner, Mapping):
            found += [f"{outer}.{key}" for key in inner if key in PROTECTED_BODY_FIELDS]
    return found


def build_request_body(
    api: Api,
    model: str,
    prompt: str,
    max_tokens: int,
    include_usage: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a streaming request for ``api``. ``extra`` is deep-merged last; it may
    not touch :data:`PROTECTED_BODY_FIELDS` (ValueError).

    ``include_usage`` asks OpenAI-style servers for the usage chunk (``stream_options``) and TGI
    for ``details`` (generated_tokens, finish_reason). Ollama and Anthropic always report usage.
    """
    api = check_api(api)
    if extra and (protected := protected_overrides(extra)):
        raise ValueError(f"extra_body may not set {', '.join(protected)}")
    messages = [{"role": "user", "content": prompt}]
    path: str
    body: dict[str, Any]
    if api == "openai-chat":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    elif api == "openai-completions":
        path = "/v1/completions"
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    elif api == "ollama-chat":
        path = "/api/chat"
        body = {"model": model, "messages": messages, "stream": True, "options": {"num_predict": max_tokens}}
    elif api == "ollama-generate":
        path = "/api/generate"
        body = {"model": model, "prompt": prompt, "stream": True, "options": {"num_predict": max_tokens}}
    elif api == "tgi":
        path = "/generate_stream"
        parameters: dict[str, Any] = {"max_new_tokens": max_tokens}
        if include_usage:
            parameters["details"] = True
        body = {"inputs": prompt, "parameters": parameters}
    else:
        path = "/v1/messages"
        body = {"model": model, "max_tokens": max_tokens, "messages": messages, "stream": True}
    if include_usage and api in ("openai-chat", "openai-completions"):
        body["stream_options"] = {"include_usage": True}
    if extra:
        body = _merge(body, extra)
    return path, body


ANTHROPIC_VERSION: Final = "2023-06-01"


def auth_headers(api: Api, key: str | None) -> dict[str, str]:
    """Credentials for ``api``: ``x-api-key`` plus ``anthropic-version`` for Anthropic, Bearer otherwise.

    Without a key there is no credential header, but Anthropic's version header is still sent.
    """
    api = check_api(api)
    if api == "anthropic":
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        return headers
    return {"authorization": f"Bearer {key}"} if key else {}


STREAM_CONTENT_TYPES: Final[Mapping[Framing, tuple[str, ...]]] = {
    "sse": ("text/event-stream",),
    "ndjson": ("application/x-ndjson", "application/jsonl", "application/json-seq"),
}


def request_headers(api: Api, key: str | None) -> dict[str, str]:
    """Content-Type, Accept and credentials for a streaming request to ``api``."""
    accept = STREAM_CONTENT_TYPES[framing(check_api(api))][0]
    return {"content-type": "application/json", "accept": accept, **auth_headers(api, key)}


def check_content_type(api: Api, content_type: str | None) -> str | None:
    """None when ``content_type`` is the streaming type ``api`` should answer with, else what is wrong.

    A server that answers ``application/json`` to a streaming request either ignored ``stream`` or
    sent an error body. Neither is a stream, and timing it as one would be wrong.
    """
    wanted = STREAM_CONTENT_TYPES[framing(check_api(api))]
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in wanted:
        return None
    shown = content_type if content_type else "no Content-Type"
    return f"expected a {wanted[0]} stream, got {shown}"
