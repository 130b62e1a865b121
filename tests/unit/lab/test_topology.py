"""The lab's topology model: defaults from physics, and every refusal naming file, key and reason."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from edgeprobe.configfile import ConfigError, read_yaml
from edgeprobe.lab.build import lab_of_namespace, parse_ping_summary
from edgeprobe.lab.netns import privilege_problem
from edgeprobe.lab.topology import node_namespace, one_way_floor_ms, validate
from edgeprobe.probes.geo import floor_rtt_ms, great_circle_km

EXAMPLE = Path(__file__).resolve().parents[3] / "src" / "edgeprobe" / "examples" / "lab-three-sites.yaml"
NYC, CHI, FRA = (40.7128, -74.0060), (41.8781, -87.6298), (50.1109, 8.6821)
HOST = {"lo": ["127.0.0.0/8"], "eth0": ["172.17.0.0/16"]}


def base() -> dict[str, Any]:
    return {
        "name": "t",
        "sites": {
            "nyc": {"lat": NYC[0], "lon": NYC[1]},
            "chi": {"lat": CHI[0], "lon": CHI[1]},
            "fra": {"lat": FRA[0], "lon": FRA[1]},
        },
        "nodes": {
            "a": {"site": "nyc", "role": "agent"},
            "r": {"site": "nyc", "role": "router"},
            "c": {"site": "chi", "role": "inference"},
            "f": {"site": "fra", "role": "http"},
        },
        "links": [{"a": "a", "b": "r"}, {"a": "r", "b": "c"}, {"a": "r", "b": "f", "route_factor": 1.5}],
    }


def refused(raw: dict[str, Any], host: dict[str, list[str]] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        validate(raw, "topo.yaml", host)
    return str(err.value)


def test_the_shipped_example_validates() -> None:
    topo = validate(read_yaml(EXAMPLE), str(EXAMPLE), HOST)
    assert topo.name == "tri" and len(topo.nodes) == 6 and len(topo.links) == 6
    assert [lk.emulated for lk in topo.links] == [False, False, False, True, True, True]


def test_delay_defaults_to_the_fibre_floor_times_the_route_factor() -> None:
    topo = validate(base(), "topo.yaml", HOST)
    same_site, to_chi, to_fra = topo.links
    assert same_site.delay_ms == 0 and not same_site.emulated  # a plain veth
    km = great_circle_km(*NYC, *CHI)
    assert to_chi.distance_km == pytest.approx(km)
    assert to_chi.delay_ms == pytest.approx(floor_rtt_ms(km) / 2) == pytest.approx(one_way_floor_ms(km))
    assert 5.5 < to_chi.delay_ms < 5.7  # ≈ 1144 km at 204 km/ms
    assert to_fra.route_factor == 1.5
    assert to_fra.delay_ms == pytest.approx(1.5 * one_way_floor_ms(great_circle_km(*NYC, *FRA)))


def test_routes_follow_the_least_delay_and_only_routers_forward() -> None:
    topo = validate(base(), "topo.yaml", HOST)
    assert [lk.index for lk in topo.path("a", "f") or []] == [0, 2]
    assert topo.expected_rtt_ms("a", "c") == pytest.approx(2 * topo.links[1].delay_ms)
    routes = topo.routes("a")
    assert {d: (h.link, h.via) for d, h in routes.items()} == {"r": (0, "r"), "c": (0, "r"), "f": (0, "r")}
    raw = base()
    raw["nodes"]["r"]["role"] = "agent"  # a host does not forward: c and f are out of a's reach
    assert validate(raw, "topo.yaml", HOST).path("a", "c") is None


def test_a_shorter_path_through_routers_wins() -> None:
    topo = validate(read_yaml(EXAMPLE), str(EXAMPLE), HOST)
    # Chicago–Frankfurt direct is 1.2 × 6964 km; via New York it is 1144 + 6203 km at 1.0.
    path = topo.path("h-chi", "h-fra") or []
    assert [(lk.a, lk.b) for lk in path] == [
        ("h-chi", "r-chi"),
        ("r-nyc", "r-chi"),
        ("r-nyc", "r-fra"),
        ("h-fra", "r-fra"),
    ]
    assert topo.expected_rtt_ms("h-chi", "h-fra") == pytest.approx(2 * (path[1].delay_ms + path[2].delay_ms))


def test_addresses_are_picked_from_the_subnet_skipping_given_ones() -> None:
    raw = base()
    raw["nodes"]["c"]["address"] = "10.88.0.1"
    topo = validate(raw, "topo.yaml", HOST)
    assert [n.address for n in topo.nodes.values()] == ["10.88.0.2", "10.88.0.3", "10.88.0.1", "10.88.0.4"]
    assert node_namespace("t", "a") == topo.node_ns("a") == "eplab-t-n-a"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r["nodes"]["c"].update(site="sfo"), "topo.yaml: nodes.c.site: unknown site 'sfo'; the sites are"),
        (lambda r: r["links"].append({"a": "a", "b": "zz"}), "topo.yaml: links[3].b: link to nowhere: no node 'zz'"),
        (
            lambda r: r["links"][1].update(delay_ms=5.0),
            "topo.yaml: links[1].delay_ms: 5.0 ms is below the physical floor of 5.603 ms one way (1144 km",
        ),
        (
            lambda r: r["links"][1].update(route_factor=0.9),
            "topo.yaml: links[1].route_factor: 0.9 is below 1: no route is shorter than the great circle",
        ),
        (
            lambda r: (r["nodes"]["a"].update(address="10.88.5.5"), r["nodes"]["f"].update(address="10.88.5.5")),
            "topo.yaml: nodes.f.address: 10.88.5.5 is already the address of node a",
        ),
        (
            lambda r: r["nodes"]["a"].update(address="172.17.0.9"),
            "topo.yaml: nodes.a.address: 172.17.0.9 overlaps 172.17.0.0/16 of the host's interface eth0",
        ),
        (
            lambda r: r.update(subnet="172.17.128.0/17"),
            "topo.yaml: subnet: 172.17.128.0/17 overlaps 172.17.0.0/16 of the host's interface eth0",
        ),
        (
            lambda r: r["nodes"]["a"].update(address="8.8.8.8"),
            "topo.yaml: nodes.a.address: 8.8.8.8 is not in a private",
        ),
        (lambda r: r["nodes"]["a"].update(netns="host"), "topo.yaml: nodes.a.netns: unknown key; expected one of"),
        (lambda r: r["links"].append({"a": "c", "b": "c"}), "topo.yaml: links[3]: a link from c to itself"),
        (lambda r: r["links"].append({"a": "r", "b": "a"}), "topo.yaml: links[3]: r–a are already linked by links[0]"),
        (
            lambda r: r["links"][1].update(delay_ms=9, route_factor=2),
            "topo.yaml: links[1]: give delay_ms or route_factor, not both",
        ),
        (lambda r: r.update(name="Lab-1"), "topo.yaml: name: 'Lab-1': expected a letter"),
        (lambda r: r.update(name="42"), "topo.yaml: name: '42': expected a letter"),  # eplab-<digits>: the tests'
        (lambda r: r["sites"]["nyc"].update(lat=91), "topo.yaml: sites.nyc.lat: expected"),
        (lambda r: r["links"][1].update(loss_ratio=2), "topo.yaml: links[1].loss_ratio: expected"),
    ],
)
def test_bad_topologies_are_refused_naming_file_key_and_reason(change: Any, expected: str) -> None:
    raw = copy.deepcopy(base())
    change(raw)
    message = refused(raw, HOST)
    assert message.startswith(expected), message


def test_a_delay_at_the_floor_or_above_is_accepted() -> None:
    raw = base()
    floor = one_way_floor_ms(great_circle_km(*NYC, *CHI))
    raw["links"][1]["delay_ms"] = round(floor + 0.001, 3)
    topo = validate(raw, "topo.yaml", HOST)
    assert topo.links[1].route_factor == pytest.approx(1.0, abs=1e-3)


def test_lab_namespaces_are_told_from_the_tests_and_others() -> None:
    assert lab_of_namespace("eplab-demo-n-pop-nyc") == "demo"
    assert lab_of_namespace("eplab-demo-l12") == "demo"
    assert lab_of_namespace("eplab-4194305-1-a") is None  # tests/support/netlab.py's
    assert lab_of_namespace("epD-123-1-r1") is None
    assert lab_of_namespace("other") is None


# Captured: iputils ping 20240117 -q through a lab link of 30.373 ms each way.
PING_Q = """PING 10.88.0.6 (10.88.0.6) 56(84) bytes of data.

--- 10.88.0.6 ping statistics ---
20 packets transmitted, 20 received, 0% packet loss, time 206ms
rtt min/avg/max/mdev = 60.797/60.850/60.960/0.042 ms
"""
PING_LOST = """PING 10.88.0.9 (10.88.0.9) 56(84) bytes of data.

--- 10.88.0.9 ping statistics ---
3 packets transmitted, 0 received, 100% packet loss, time 2041ms
"""


def test_ping_summaries_are_parsed() -> None:
    assert parse_ping_summary(PING_Q) == (60.797, 60.85)
    assert parse_ping_summary(PING_LOST) is None


@pytest.mark.parametrize(
    ("capeff", "ok"),
    [("000001fffeffffff", True), ("0000000000000000", False), ("0000000000001000", False), ("0000000000201000", True)],
)
def test_privilege_is_read_from_the_effective_capabilities(capeff: str, ok: bool) -> None:
    status = f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\n"
    assert (privilege_problem(status) is None) is ok
    if not ok:
        assert (
            privilege_problem(status) == "needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
        )
