"""A lab topology: sites with coordinates, nodes in them, links between nodes (pure: no I/O).

A topology file (YAML) looks like::

    name: wan                      # the lab's name: namespaces are eplab-<name>-…
    subnet: 10.88.0.0/16           # where node addresses are picked unless a node gives one
    sites:
      nyc: {lat: 40.7128, lon: -74.0060, label: New York}
      fra: {lat: 50.1109, lon: 8.6821, label: Frankfurt}
    nodes:
      pop-nyc: {site: nyc, role: agent}
      r-nyc: {site: nyc, role: router}
      edge-fra: {site: fra, role: inference, address: 10.88.9.1}
    links:
      - {a: pop-nyc, b: r-nyc}                       # same site: no delay, a plain veth
      - {a: r-nyc, b: edge-fra, route_factor: 1.3}   # one-way delay = fibre floor × 1.3
      - {a: …, b: …, delay_ms: 40, jitter_ms: 1, loss_ratio: 0.001}

A link's one-way delay defaults to the straight-fibre delay of the great-circle distance between
its nodes' sites (:mod:`edgeprobe.probes.geo`: c / 1.468) times ``route_factor`` (default 1.0).
A given ``delay_ms`` may not be below that floor, nor ``route_factor`` below 1: the lab does not
let light go faster than it does. Packets are routed along the path of least delay; only
``router`` nodes forward.

Every problem is a :class:`~edgeprobe.configfile.ConfigError` naming the file, the key and the
reason. :func:`validate` takes the host's own networks (gathered at the edge, by the caller) so
that a lab address that would shadow a host network is refused: a lab never touches the host's
interfaces, addresses or routes.
"""

from __future__ import annotations

import heapq
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec

from edgeprobe.configfile import ConfigError, convert
from edgeprobe.probes.geo import FIBRE_KM_PER_MS, great_circle_km

PREFIX: Final = "eplab-"  # every namespace a lab makes starts with this (`lab down` finds them by it)
NAME_RE: Final = re.compile(r"^[a-z][a-z0-9]{0,15}$")  # a letter first: eplab-<digits>-… are the tests'
NODE_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
DEFAULT_NAME: Final = "lab"
DEFAULT_SUBNET: Final = "10.88.0.0/16"
# Lab addresses come from private ranges only (RFC 1918, and 100.64/10 shared address space).
PRIVATE_V4: Final = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)

Role = Literal["agent", "router", "inference", "http"]


class SiteSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)]
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)]
    label: Annotated[str, msgspec.Meta(max_length=64)] = ""


class NodeSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    site: str
    role: Role
    address: str | None = None
    label: Annotated[str, msgspec.Meta(max_length=64)] = ""


class LinkSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    a: str
    b: str
    delay_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] | None = None
    route_factor: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    jitter_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 0.0
    loss_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0


class TopologySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: str = DEFAULT_NAME
    subnet: str = DEFAULT_SUBNET
    sites: dict[str, Any]  # name → SiteSpec, converted one by one so an error names the entry
    nodes: dict[str, Any]  # name → NodeSpec, likewise
    links: list[LinkSpec] = []


@dataclass(frozen=True, slots=True)
class Site:
    name: str
    lat: float
    lon: float
    label: str


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    site: str
    role: Role
    address: str
    label: str


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    a: str
    b: str
    distance_km: float
    floor_ms: float  # one way, straight fibre
    route_factor: float  # delay_ms / floor_ms (1.0 when the floor is 0)
    delay_ms: float  # one way, each direction
    jitter_ms: float
    loss_ratio: float

    @property
    def emulated(self) -> bool:
        """Whether the link needs a delay line (else it is a plain veth pair)."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_ratio > 0

    def peer(self, node: str) -> str:
        return self.b if node == self.a else self.a


@dataclass(frozen=True, slots=True)
class Hop:
    """The first hop from one node towards another: out of ``link``, to ``via`` (a neighbour)."""

    link: int
    via: str


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    source: str
    sites: dict[str, Site]
    nodes: dict[str, Node]
    links: tuple[Link, ...]

    def node_ns(self, node: str) -> str:
        return node_namespace(self.name, node)

    def link_ns(self, link: Link) -> str:
        return f"{PREFIX}{self.name}-l{link.index}"

    def links_of(self, node: str) -> list[Link]:
        return [lk for lk in self.links if node in (lk.a, lk.b)]

    def distance_km(self, a: str, b: str) -> float:
        sa, sb = self.sites[self.nodes[a].site], self.sites[self.nodes[b].site]
        return great_circle_km(sa.lat, sa.lon, sb.lat, sb.lon)

    def path(self, a: str, b: str) -> list[Link] | None:
        """The links a packet from ``a`` to ``b`` takes (least total delay, then fewest hops)."""
        return _paths_from(self, a).get(b)

    def expected_rtt_ms(self, a: str, b: str) -> float | None:
        """Twice the configured one-way delays along the path (None: no path)."""
        p = self.path(a, b)
        return None if p is None else 2.0 * sum(lk.delay_ms for lk in p)

    def routes(self, node: str) -> dict[str, Hop]:
        """For every other node reachable from ``node``: the first hop towards it."""
        out: dict[str, Hop] = {}
        for dst, p in _paths_from(self, node).items():
            if dst != node and p:
                out[dst] = Hop(p[0].index, p[0].peer(node))
        return out


def node_namespace(lab: str, node: str) -> str:
    return f"{PREFIX}{lab}-n-{node}"


def one_way_floor_ms(distance_km: float) -> float:
    """Straight fibre, one way (half of :func:`edgeprobe.probes.geo.floor_rtt_ms`)."""
    return distance_km / FIBRE_KM_PER_MS


def _paths_from(topo: Topology, src: str) -> dict[str, list[Link]]:
    """Dijkstra over one-way delay (ties: fewer hops); only routers (and ``src``) forward."""
    best: dict[str, tuple[float, int]] = {src: (0.0, 0)}
    paths: dict[str, list[Link]] = {src: []}
    heap: list[tuple[float, int, str]] = [(0.0, 0, src)]
    done: set[str] = set()
    while heap:
        cost, hops, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        if node != src and topo.nodes[node].role != "router":
            continue  # a host receives, it does not forward
        for lk in topo.links_of(node):
            peer = lk.peer(node)
            cand = (cost + lk.delay_ms, hops + 1)
            if peer not in best or cand < best[peer]:
                best[peer] = cand
                paths[peer] = [*paths[node], lk]
                heapq.heappush(heap, (cand[0], cand[1], peer))
    return paths


def host_networks_problem(net: ipaddress.IPv4Network, host_networks: Mapping[str, Iterable[str]]) -> str | None:
    """Why ``net`` would touch a host interface's network (None: it would not)."""
    for ifname, cidrs in host_networks.items():
        for cidr in cidrs:
            try:
                hnet = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                continue
            if isinstance(hnet, ipaddress.IPv4Network) and hnet.overlaps(net) and not hnet.is_loopback:
                return f"overlaps {hnet} of the host's interface {ifname}: a lab must not shadow a host network"
    return None


def validate(raw: Any, source: str, host_networks: Mapping[str, Iterable[str]] | None = None) -> Topology:
    """A validated :class:`Topology` from a parsed YAML mapping, or :class:`ConfigError`.

    ``host_networks``: interface name → its networks (CIDR) on the host; lab addresses may not
    overlap them (loopback excepted).
    """
    spec = convert(raw, TopologySpec, source)
    hosts = host_networks or {}
    if not NAME_RE.match(spec.name):
        raise ConfigError(f"{source}: name: {spec.name!r}: expected a letter, then up to 15 letters or digits")
    try:
        subnet = ipaddress.IPv4Network(spec.subnet)
    except ValueError as err:
        raise ConfigError(f"{source}: subnet: {spec.subnet!r}: expected an IPv4 network (a.b.c.d/n): {err}") from None
    if not any(subnet.subnet_of(p) for p in PRIVATE_V4):
        raise ConfigError(f"{source}: subnet: {subnet} is not a private range (10/8, 172.16/12, 192.168/16, 100.64/10)")
    if (why := host_networks_problem(subnet, hosts)) is not None:
        raise ConfigError(f"{source}: subnet: {subnet} {why}")
    if not spec.sites:
        raise ConfigError(f"{source}: sites: at least one site is needed")
    sites: dict[str, Site] = {}
    for name, raw_site in spec.sites.items():
        s = convert(raw_site, SiteSpec, source, f"sites.{name}")
        sites[name] = Site(name, s.lat, s.lon, s.label or name)
    nodes = _nodes(spec, sites, subnet, hosts, source)
    links = _links(spec, sites, nodes, source)
    return Topology(spec.name, source, sites, nodes, links)


def _nodes(
    spec: TopologySpec,
    sites: dict[str, Site],
    subnet: ipaddress.IPv4Network,
    hosts: Mapping[str, Iterable[str]],
    source: str,
) -> dict[str, Node]:
    if not spec.nodes:
        raise ConfigError(f"{source}: nodes: at least one node is needed")
    taken: dict[ipaddress.IPv4Address, str] = {}
    given: dict[str, ipaddress.IPv4Address] = {}
    specs = {name: convert(raw, NodeSpec, source, f"nodes.{name}") for name, raw in spec.nodes.items()}
    for name, n in specs.items():
        key = f"nodes.{name}"
        if not NODE_RE.match(name):
            raise ConfigError(f"{source}: {key}: node names are 1-24 of a-z, 0-9 and '-', not starting with '-'")
        if n.site not in sites:
            raise ConfigError(
                f"{source}: {key}.site: unknown site {n.site!r}; the sites are: {', '.join(sorted(sites))}"
            )
        if n.address is None:
            continue
        try:
            addr = ipaddress.IPv4Address(n.address)
        except ValueError:
            raise ConfigError(f"{source}: {key}.address: {n.address!r} is not an IPv4 address") from None
        if not any(addr in p for p in PRIVATE_V4):
            raise ConfigError(f"{source}: {key}.address: {addr} is not in a private range (10/8, 172.16/12, …)")
        if (why := host_networks_problem(ipaddress.IPv4Network(f"{addr}/32"), hosts)) is not None:
            raise ConfigError(f"{source}: {key}.address: {addr} {why}")
        if addr in taken:
            raise ConfigError(f"{source}: {key}.address: {addr} is already the address of node {taken[addr]}")
        taken[addr] = name
        given[name] = addr
    free = (a for a in subnet.hosts() if a not in taken)
    nodes: dict[str, Node] = {}
    for name, n in specs.items():
        picked = given.get(name) or next(free, None)
        if picked is None:
            raise ConfigError(f"{source}: subnet: {subnet} has no free address left for node {name}")
        nodes[name] = Node(name, n.site, n.role, str(picked), n.label or name)
    return nodes


def _links(spec: TopologySpec, sites: dict[str, Site], nodes: dict[str, Node], source: str) -> tuple[Link, ...]:
    out: list[Link] = []
    pairs: dict[frozenset[str], int] = {}
    for i, ls in enumerate(spec.links):
        key = f"links[{i}]"
        for end in ("a", "b"):
            name = getattr(ls, end)
            if name not in nodes:
                raise ConfigError(
                    f"{source}: {key}.{end}: link to nowhere: no node {name!r}; "
                    f"the nodes are: {', '.join(sorted(nodes))}"
                )
        if ls.a == ls.b:
            raise ConfigError(f"{source}: {key}: a link from {ls.a} to itself")
        pair = frozenset((ls.a, ls.b))
        if pair in pairs:
            raise ConfigError(f"{source}: {key}: {ls.a}–{ls.b} are already linked by links[{pairs[pair]}]")
        pairs[pair] = i
        sa, sb = sites[nodes[ls.a].site], sites[nodes[ls.b].site]
        distance = great_circle_km(sa.lat, sa.lon, sb.lat, sb.lon)
        floor = one_way_floor_ms(distance)
        if ls.delay_ms is not None and ls.route_factor is not None:
            raise ConfigError(f"{source}: {key}: give delay_ms or route_factor, not both")
        if ls.route_factor is not None and ls.route_factor < 1.0:
            raise ConfigError(
                f"{source}: {key}.route_factor: {ls.route_factor} is below 1: no route is shorter than the great circle"
            )
        if ls.delay_ms is not None:
            if ls.delay_ms < floor - 1e-9:
                raise ConfigError(
                    f"{source}: {key}.delay_ms: {ls.delay_ms} ms is below the physical floor of {floor:.3f} ms one way "
                    f"({distance:.0f} km of straight fibre at c/1.468)"
                )
            delay, factor = ls.delay_ms, (ls.delay_ms / floor if floor > 0 else 1.0)
        else:
            factor = 1.0 if ls.route_factor is None else ls.route_factor
            delay = floor * factor
        out.append(Link(i, ls.a, ls.b, distance, floor, factor, delay, ls.jitter_ms, ls.loss_ratio))
    return tuple(out)
