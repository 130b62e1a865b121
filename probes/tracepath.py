"""A trace's replies turned into hops and a path, and hops annotated with AS and IXP (pure).

* :func:`aggregate`: the replies of every (TTL, query) into one :class:`Hop` per TTL; a TTL
  without any answer is a silent hop (``address`` None, loss 1.0), listed, never skipped.
* :func:`path_id`: a short stable hash of the ordered responding addresses, silent hops as ``*``.
* :func:`largest_step`: where along the path the round trip grows most (between the smallest RTTs
  of consecutive responding hops: the minimum is least disturbed by queues and by routers that
  generate ICMP slowly).
* :class:`AsnTable` reads pyasn's ``ipasn`` data file (``prefix/len<TAB>asn`` per line, ``;``
  comments; ``pyasn_util_download.py`` + ``pyasn_util_convert.py`` make one from a RouteViews or
  RIPE RIS dump), :class:`IxpTable` a PeeringDB export of the ``ix``, ``ixlan`` and ``ixpfx``
  objects (the JSON of ``/api/ix``, ``/api/ixlan``, ``/api/ixpfx``). Both with the standard library,
  from local files only: nothing is looked up on the network.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

SILENT: Final = "*"


@dataclass(frozen=True, slots=True)
class Sample:
    """One query's fate: who answered (None: nobody in time) and how."""

    ttl: int
    query: int  # 0, 1, … within the TTL
    responder: str | None = None
    rtt_ms: float | None = None
    icmp_type: int | None = None  # None: not ICMP (a TCP answer) or no answer
    icmp_code: int | None = None
    quoted_ttl: int | None = None
    mpls: str | None = None  # "label/tc/s/ttl" entries joined by "+", when the router sent them
    from_target: bool = False  # the destination itself answered (echo reply, port unreachable, SYN-ACK/RST)
    final: bool = False  # nothing lies beyond: the destination answered, or a router said unreachable


@dataclass(slots=True)
class Hop:
    ttl: int
    address: str | None  # the address that answered most often; None: silent
    addresses: list[str] = field(default_factory=list)  # every address that answered, most frequent first
    rtts_ms: list[float | None] = field(default_factory=list)  # per query, None unanswered
    loss_ratio: float = 1.0
    rtt_min_ms: float | None = None
    rtt_avg_ms: float | None = None
    rtt_max_ms: float | None = None
    quoted_ttl: int | None = None
    icmp: str | None = None  # "type/code" of the replies ("11/0" time exceeded); None: not ICMP
    mpls: str | None = None
    reached: bool = False  # the destination answered at this TTL
    asn: int | None = None
    ixp: str | None = None


def aggregate(samples: Iterable[Sample], *, queries: int, last_ttl: int, first_ttl: int = 1) -> list[Hop]:
    """One hop per TTL ``first_ttl``..``last_ttl`` from the samples (pure)."""
    by_ttl: dict[int, list[Sample]] = {}
    for s in samples:
        by_ttl.setdefault(s.ttl, []).append(s)
    hops: list[Hop] = []
    for ttl in range(first_ttl, last_ttl + 1):
        found = sorted(by_ttl.get(ttl, []), key=lambda s: s.query)
        rtts: list[float | None] = [None] * queries
        for s in found:
            if 0 <= s.query < queries and s.responder is not None:
                rtts[s.query] = s.rtt_ms
        answered = [s for s in found if s.responder is not None]
        counts = Counter(s.responder for s in answered if s.responder is not None)
        got = [r for r in rtts if r is not None]
        hop = Hop(ttl=ttl, address=counts.most_common(1)[0][0] if counts else None)
        hop.addresses = [a for a, _ in counts.most_common()]
        hop.rtts_ms = rtts
        hop.loss_ratio = round((queries - len(got)) / queries, 6) if queries else 1.0
        if got:
            hop.rtt_min_ms, hop.rtt_max_ms = min(got), max(got)
            hop.rtt_avg_ms = round(statistics.fmean(got), 6)
        if answered:
            first = answered[0]
            hop.quoted_ttl = first.quoted_ttl
            hop.icmp = None if first.icmp_type is None else f"{first.icmp_type}/{first.icmp_code}"
            hop.mpls = next((s.mpls for s in answered if s.mpls), None)
            hop.reached = any(s.from_target for s in answered)
        hops.append(hop)
    return hops


def path_id(hops: Sequence[Hop]) -> str:
    """A stable hash of the ordered responding addresses, silent hops as ``*`` (pure)."""
    text = ">".join(h.address or SILENT for h in hops)
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()[:16]


def largest_step(hops: Sequence[Hop]) -> tuple[int, float] | None:
    """(TTL of the hop after the step, step in ms) where the smallest RTT grows most from one
    responding hop to the next (the first hop's step is from 0); None without two answers (pure)."""
    best: tuple[int, float] | None = None
    before = 0.0
    for hop in hops:
        if hop.rtt_min_ms is None:
            continue
        step = hop.rtt_min_ms - before
        if best is None or step > best[1]:
            best = (hop.ttl, round(step, 6))
        before = hop.rtt_min_ms
    return best


def collapse(values: Iterable[Any]) -> list[Any]:
    """Consecutive duplicates and Nones dropped: an AS path from the hops' ASNs (pure)."""
    out: list[Any] = []
    for v in values:
        if v is not None and (not out or out[-1] != v):
            out.append(v)
    return out


# ---------------------------------------------------------------- AS and IXP tables


class _PrefixTable:
    """Longest-prefix match over IPv4 and IPv6 prefixes (dicts per prefix length)."""

    def __init__(self) -> None:
        self._by_len: dict[tuple[int, int], dict[int, Any]] = {}

    def add(self, prefix: str, value: Any) -> None:
        net = ipaddress.ip_network(prefix, strict=False)
        key = (net.version, net.prefixlen)
        self._by_len.setdefault(key, {})[int(net.network_address)] = value

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_len.values())

    def lookup(self, address: str) -> Any:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        bits = 32 if ip.version == 4 else 128
        n = int(ip)
        for version, length in sorted((k for k in self._by_len if k[0] == ip.version), key=lambda k: -k[1]):
            del version
            found = self._by_len[(ip.version, length)].get(n >> (bits - length) << (bits - length))
            if found is not None:
                return found
        return None


class AsnTable(_PrefixTable):
    """IP → origin AS from pyasn's ``ipasn`` text format (pure)."""

    @classmethod
    def parse(cls, text: str, *, source: str = "ipasn file") -> AsnTable:
        table = cls()
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith(";") or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{source}:{n}: expected 'prefix/len<TAB>asn', got {line[:80]!r}")
            prefix, asn = parts
            asn = asn.split(",")[0].split("_")[0]  # AS sets {a,b} / multi-origin: the first
            asn = asn.strip("{}")
            try:
                table.add(prefix, int(asn))
            except ValueError:
                raise ValueError(f"{source}:{n}: expected 'prefix/len<TAB>asn', got {line[:80]!r}") from None
        return table


def _rows(doc: Any) -> list[Mapping[str, Any]]:
    if isinstance(doc, Mapping) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    return [r for r in doc if isinstance(r, Mapping)] if isinstance(doc, list) else []


class IxpTable(_PrefixTable):
    """IP → IXP name from PeeringDB ``ix``/``ixlan``/``ixpfx`` objects (pure)."""

    @classmethod
    def parse(cls, documents: Sequence[str], *, source: str = "PeeringDB export") -> IxpTable:
        """Each document is JSON: an API response (``{"data": [...]}``) of ``/api/ix``,
        ``/api/ixlan`` or ``/api/ixpfx``, or one object ``{"ix": …, "ixlan": …, "ixpfx": …}``
        holding all three. Rows are told apart by their fields."""
        ix: dict[int, str] = {}
        ixlan: dict[int, int] = {}
        prefixes: list[tuple[int, str]] = []
        for text in documents:
            try:
                doc = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{source}: not JSON ({exc})") from None
            parts = [doc[k] for k in ("ix", "ixlan", "ixpfx") if isinstance(doc, Mapping) and k in doc] or [doc]
            for part in parts:
                for row in _rows(part):
                    if "prefix" in row and "ixlan_id" in row:
                        prefixes.append((int(row["ixlan_id"]), str(row["prefix"])))
                    elif "ix_id" in row and "id" in row and "asn" not in row:
                        ixlan[int(row["id"])] = int(row["ix_id"])
                    elif "name" in row and "id" in row and "ix_id" not in row:
                        ix[int(row["id"])] = str(row["name"])
        table = cls()
        for lan, prefix in prefixes:
            name = ix.get(ixlan.get(lan, -1))
            if name is not None:
                try:
                    table.add(prefix, name)
                except ValueError:
                    continue  # one malformed prefix does not spoil the export
        return table


def annotate(hops: Sequence[Hop], asns: AsnTable | None, ixps: IxpTable | None) -> None:
    """Set each responding hop's ``asn`` and ``ixp`` from the tables (pure)."""
    for hop in hops:
        if hop.address is None:
            continue
        if asns is not None:
            hop.asn = asns.lookup(hop.address)
        if ixps is not None:
            hop.ixp = ixps.lookup(hop.address)
