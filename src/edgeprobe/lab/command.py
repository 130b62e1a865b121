"""``edgeprobe lab up FILE | down [NAME] | exec NODE -- CMD… | ls``: the WAN lab from the command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from edgeprobe.configfile import ConfigError, read_yaml
from edgeprobe.lab import build
from edgeprobe.lab.netns import LabError, host_networks, lab_problem
from edgeprobe.lab.topology import Topology, validate
from edgeprobe.termtext import term_safe


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"edgeprobe lab: {term_safe(message, None)}", err=True)
    sys.exit(code)


def load_topology(path: str) -> Topology:
    """Read and validate a topology file against this host's networks (ConfigError on problems)."""
    return validate(read_yaml(path), path, host_networks())


def up_report(topo: Topology, result: build.UpResult) -> list[str]:
    """What ``lab up`` prints: the mode and its measured accuracy, the nodes, the links (pure)."""
    emulated = sum(lk.emulated for lk in topo.links)
    lines = [f"lab {topo.name} is up from {topo.source}: {len(topo.nodes)} nodes, {len(topo.links)} links"]
    if result.accuracy is not None:
        lines.append(result.accuracy.sentence(result.mode))
    elif emulated:
        lines.append(f"links: {result.mode} (not measured)")
    lines.append(f"{'node':<16} {'role':<10} {'site':<22} address")
    for n in topo.nodes.values():
        lines.append(f"{n.name:<16} {n.role:<10} {topo.sites[n.site].label:<22} {n.address}")
    measured = {c.link: c for c in result.checks}
    lines.append(f"{'link':<34} {'km':>7} {'floor ms':>9} {'factor':>6} {'delay ms':>9} {'rtt ms':>8} {'ping ms':>8}")
    lines.append("(ping ms: measured across the link right now, where the link is its ends' route)")
    for lk in topo.links:
        c = measured.get(lk.index)
        ping = "-" if c is None or c.measured_avg_ms is None else f"{c.measured_avg_ms:.3f}"
        lines.append(
            f"{lk.a + ' – ' + lk.b:<34} {lk.distance_km:>7.0f} {lk.floor_ms:>9.3f} {lk.route_factor:>6.2f} "
            f"{lk.delay_ms:>9.3f} {2 * lk.delay_ms:>8.3f} {ping:>8}"
        )
    lines.append(f"inside: edgeprobe lab exec --lab {topo.name} NODE -- CMD …   remove: edgeprobe lab down {topo.name}")
    return lines


@click.group("lab")
def lab_group() -> None:
    """A WAN lab on this host: sites, nodes and links as network namespaces (needs root).

    Link delays default to the straight-fibre floor of the sites' great-circle distance; the
    kernel's netem carries them where it exists, else edgeprobe's userspace link emulator.
    """


@lab_group.command("up")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--link", "mode", type=click.Choice(list(build.MODES)), default="auto", show_default=True,
    help="What carries the delays: netem if the kernel has it (auto), or the userspace emulator.",
)  # fmt: skip
def lab_up(file: str, mode: str) -> None:
    """Build the topology in FILE (YAML: name, subnet, sites, nodes, links)."""
    if (why := lab_problem()) is not None:
        _fail(why)
    try:
        topo = load_topology(file)
    except ConfigError as err:
        _fail(str(err), 2)
    try:
        result = build.up(topo, mode)
    except LabError as err:
        _fail(str(err))
    for line in up_report(topo, result):
        click.echo(line)


@lab_group.command("down")
@click.argument("name", required=False)
def lab_down(name: str | None) -> None:
    """Remove lab NAME (default: every lab), also what a crashed run left: processes, links, namespaces."""
    if (why := lab_problem()) is not None:
        _fail(why)
    removed = build.down(name)
    if not removed:
        click.echo("no lab namespaces found: nothing to remove" if name is None else f"no lab {name!r} found")
        return
    click.echo(f"removed {len(removed)} namespaces (and every process and link inside them)")


def _only_lab(name: str | None) -> str:
    labs = build.labs_up()
    if name is not None:
        return name
    if len(labs) == 1:
        return next(iter(labs))
    _fail("no lab is up" if not labs else f"several labs are up ({', '.join(sorted(labs))}): give --lab NAME")
    raise AssertionError  # unreachable: _fail exits


@lab_group.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--lab", "name", help="The lab (default: the only one up).")
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(name: str | None, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE's namespace: edgeprobe lab exec NODE -- ping 10.88.0.2"""
    if (why := lab_problem()) is not None:
        _fail(why)
    argv = list(command[1:] if command and command[0] == "--" else command)
    try:
        args = build.exec_args(_only_lab(name), node, argv)
    except LabError as err:
        _fail(str(err))
    os.execvp(args[0], args)


@lab_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: lab name → mode, nodes, links.")
def lab_ls(as_json: bool) -> None:
    """The labs up on this host, their nodes (role, site, address, namespace) and links."""
    labs = build.labs_up()
    out: dict[str, Any] = {}
    for name, nss in sorted(labs.items()):
        state = build.read_state(name)
        out[name] = state if state is not None else {"namespaces": sorted(nss), "note": "no state file (crashed?)"}
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    if not out:
        click.echo("no lab is up")
        return
    for name, state in out.items():
        for line in _ls_lines(name, state):
            click.echo(term_safe(line, None))


def _ls_lines(name: str, state: dict[str, Any]) -> list[str]:
    if "nodes" not in state:
        return [f"lab {name}: {len(state['namespaces'])} namespaces, {state['note']}; edgeprobe lab down {name}"]
    lines = [f"lab {name} (from {state.get('source')}, links: {state.get('mode')})"]
    for n in state["nodes"].values():
        lines.append(f"  {n['name']:<16} {n['role']:<10} {n['site']:<10} {n['address']:<15} {n['namespace']}")
    for lk in state["links"]:
        lines.append(
            f"  link {lk['a']} – {lk['b']}: {lk['distance_km']:.0f} km, {lk['delay_ms']:.3f} ms one way"
            + ("" if lk["emulated"] else " (plain veth)")
        )
    return lines
