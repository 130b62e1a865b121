"""Text from elsewhere (an agent's status, a server's reason, a reply) made safe to show in a terminal.

Every CLI output path that shows text it did not write itself passes it through :func:`term_safe`:
``fleet ls``, ``fleet probe``, and the ad-hoc renderers (``edgeprobe ping/tcp/http/ttft``), where a
server's text (a reason, a header, a model name) is shown. A terminal interprets C0 and C1 control
characters and escape sequences (ESC … : window title, clipboard (OSC 52), screen clear, hyperlinks
(OSC 8), cursor moves that overwrite earlier lines), and bidirectional overrides reorder what is
shown. None of them reaches the terminal: each such character is replaced by a visible escape
(``\\x1b``, ``\\u202e``), so an escape sequence becomes inert printable text and an operator still
sees that something odd was sent. Text is also clipped to a length.

Bottom layer: standard library only.
"""

from __future__ import annotations

import re
from typing import Final

# C0 (incl. TAB, LF, CR: a cell or a line has none), DEL, C1; bidi embeddings, overrides,
# isolates and marks; line/paragraph separators; the BOM/zero-width no-break space.
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")
DEFAULT_MAX_CHARS: Final = 1024
ELLIPSIS: Final = "…"


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def term_safe(value: object, max_chars: int | None = DEFAULT_MAX_CHARS) -> str:
    """``str(value)`` with every control character, escape sequence start and bidi control escaped
    (visible, inert), clipped to ``max_chars`` characters (``…`` marks a clipped text; None: no limit)."""
    text = value if isinstance(value, str) else str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
        clipped = True
    else:
        clipped = False
    out = _UNSAFE.sub(_escape, text)
    return out + ELLIPSIS if clipped else out


def is_term_safe(text: str) -> bool:
    """True when ``text`` holds nothing :func:`term_safe` would escape."""
    return _UNSAFE.search(text) is None


def json_safe(text: str) -> str:
    """JSON text (``json.dumps(..., ensure_ascii=False)``) with the characters :func:`term_safe`
    escapes written as ``\\uXXXX`` escapes: the same JSON value, nothing a terminal acts on. (They
    can only occur inside JSON strings, where such an escape is valid.)"""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
