"""The one list of probe kinds. Config validation, the CLI, the agent and the collector draw on it.

Each entry is a kind's ``KIND``: everything the rest of edgeprobe knows about a kind is there (see
:mod:`edgeprobe.probes.kind`). A kind is listed here explicitly; importing its module registers nothing.
"""

from __future__ import annotations

from edgeprobe.probes import dns, http, icmp, inference, tcp
from edgeprobe.probes.kind import AnyKind

KINDS: dict[str, AnyKind] = {k.name: k for k in (icmp.KIND, tcp.KIND, http.KIND, inference.KIND, dns.KIND)}


def get_kind(name: str) -> AnyKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown probe kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None
