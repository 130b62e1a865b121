"""The one list of probe kinds. Config validation, the CLI, the agent and the collector draw on it.

Each entry is a kind's ``KIND``: everything the rest of edgeprobe knows about a kind is there (see
:mod:`edgeprobe.probes.kind`). A kind is listed here explicitly; importing its module registers nothing.
"""

from __future__ import annotations

from edgeprobe.probes import dns, http, icmp, inference, tcp, trace
from edgeprobe.probes.kind import AnyKind

KINDS: dict[str, AnyKind] = {k.name: k for k in (icmp.KIND, tcp.KIND, http.KIND, inference.KIND, dns.KIND, trace.KIND)}


# Every name a kind answers to: its own and its aliases (the CLI's names: ping for icmp, ttft for
# inference). An alias taken twice, or one that is another kind's name, is an error at import.
NAMES: dict[str, AnyKind] = dict(KINDS)
for _kind in KINDS.values():
    for _alias in _kind.aliases:
        if _alias in NAMES:
            raise RuntimeError(f"probe kind alias {_alias!r} of {_kind.name!r} is already {NAMES[_alias].name!r}")
        NAMES[_alias] = _kind


def kind_names() -> str:
    """The names a user may give, for messages: ``http, icmp (ping), inference (ttft), tcp``."""
    kinds = sorted(KINDS.values(), key=lambda k: k.name)
    return ", ".join(k.name + (f" ({', '.join(k.aliases)})" if k.aliases else "") for k in kinds)


def find_kind(name: str) -> AnyKind | None:
    """The kind called ``name`` or one of its aliases; None if none is."""
    return NAMES.get(name)


def get_kind(name: str) -> AnyKind:
    """The kind called ``name`` or one of its aliases; KeyError naming the known ones."""
    kind = NAMES.get(name)
    if kind is None:
        raise KeyError(f"unknown probe kind {name!r}; known kinds: {kind_names()}")
    return kind
