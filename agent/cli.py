"""The ``edgeprobe`` command: ad-hoc probes, the agent daemon and the collector.

Exit codes: 0 the target answered; 1 the probe ran and the target failed (timeout, refused,
dns error, HTTP error, …); 2 bad usage or config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from probes.configfile import ConfigError, convert
from probes.context import ProbeContext
from probes.handler import run_probe
from probes.outcome import Outcome
from probes.registry import KINDS
from probes.schema import Observation

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_adhoc(kind_name: str, target: str, options: dict[str, Any], as_json: bool) -> int:
    from agent import render

    kind = KINDS[kind_name]
    given = {k: v for k, v in options.items() if v is not None}
    try:
        config = convert(given, kind.config_type, "command line")
    except ConfigError as err:
        click.echo(f"edgeprobe {kind_name}: {err}", err=True)
        return EXIT_USAGE
    problem = kind.check_target(target)
    if problem is not None:
        click.echo(f"edgeprobe {kind_name}: {problem}", err=True)
        return EXIT_USAGE

    async def go() -> Observation:
        async with ProbeContext() as ctx:
            return await run_probe(kind, target, config, ctx, seq=0)

    obs = asyncio.run(go())
    if as_json:
        click.echo(json.dumps(render.as_json_obj(obs), ensure_ascii=False))
        failure = render.error_line(obs)
        if failure:
            click.echo(failure, err=True)
    else:
        for line in render.render(obs):
            click.echo(line, err=line.startswith("edgeprobe "))
    return EXIT_OK if obs.outcome == Outcome.OK else EXIT_FAILED


def _finish(code: int) -> None:
    sys.exit(code)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="edgeprobe")
def main() -> None:
    """edgeprobe: what latency users at the edge really get."""


@main.command()
@click.argument("target")
@click.option("-c", "--count", type=int, help="Echo requests to send.")
@click.option("-i", "--interval", "interval_s", type=float, help="Seconds between requests.")
@click.option("-s", "--size", "size_bytes", type=int, help="Payload bytes per request.")
@click.option("-W", "--timeout", "timeout_s", type=float, help="Seconds to wait for each reply.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@click.option(
    "--socket", "socket_kind", type=click.Choice(["auto", "raw", "dgram"]), help="ICMP socket kind."
)
@json_option
def ping(target: str, as_json: bool, socket_kind: str | None, **options: Any) -> None:
    """ICMP echo: per-packet RTTs, loss and jitter, like ping."""
    options["socket"] = socket_kind
    _finish(_run_adhoc("icmp", target, options, as_json))


@main.command()
@click.argument("target", metavar="HOST:PORT")
@click.option("-c", "--count", type=int, help="Connections to open.")
@click.option("-i", "--interval", "interval_s", type=float, help="Seconds between connections.")
@click.option("-W", "--timeout", "timeout_s", type=float, help="Seconds to wait for each handshake.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@json_option
def tcp(target: str, as_json: bool, **options: Any) -> None:
    """TCP connect: DNS time and handshake time, repeated."""
    _finish(_run_adhoc("tcp", target, options, as_json))


def _headers(values: tuple[str, ...]) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for raw in values:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected 'Name: value', got {raw!r}", param_hint="-H")
        out[name.strip()] = value.strip()
    return out


@main.command()
@click.argument("url")
@click.option("-X", "--method", help="HTTP method.")
@click.option("-H", "--header", "header", multiple=True, help="Extra header 'Name: value' (repeatable).")
@click.option("-d", "--data", "body", help="Request body.")
@click.option("-L", "--follow", "follow_redirects", is_flag=True, default=None, help="Follow redirects.")
@click.option("-k", "--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
@click.option("-W", "--timeout", "timeout_s", type=float, help="Seconds for the whole request.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@json_option
def http(url: str, as_json: bool, header: tuple[str, ...], insecure: bool, **options: Any) -> None:
    """HTTP request with curl-like phases: dns, connect, tls, first byte, total."""
    options["headers"] = _headers(header)
    if insecure:
        options["verify_tls"] = False
    _finish(_run_adhoc("http", url, options, as_json))


config_option = click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file."
)
log_option = click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True
)


def _load_or_exit(loader: Callable[[str], Any], path: str) -> Any:
    try:
        return loader(path)
    except ConfigError as err:
        click.echo(f"edgeprobe: config error: {err}", err=True)
        sys.exit(EXIT_USAGE)


@main.group()
def agent() -> None:
    """The measurement agent daemon."""


@agent.command("run")
@config_option
@log_option
def agent_run(config_path: str, log_level: str) -> None:
    """Run the agent: probe on schedule, publish to MQTT. Stops cleanly on SIGTERM/SIGINT."""
    from agent.config import load_agent_config
    from agent.daemon import run_agent

    cfg, jobs = _load_or_exit(load_agent_config, config_path)
    setup_logging(log_level)
    asyncio.run(run_agent(cfg, jobs))


@agent.command("check")
@config_option
def agent_check(config_path: str) -> None:
    """Validate an agent config file and list its jobs."""
    from agent.config import load_agent_config

    cfg, jobs = _load_or_exit(load_agent_config, config_path)
    click.echo(f"{config_path}: ok: agent {cfg.agent.id} at {cfg.agent.site}, broker {cfg.broker.url}")
    for job in jobs:
        click.echo(f"  {job.name}: {job.kind.name} every {job.interval_s:g} s → {', '.join(job.targets)}")


@main.group()
def collector() -> None:
    """The collector: MQTT in, InfluxDB out."""


@collector.command("run")
@config_option
@log_option
def collector_run(config_path: str, log_level: str) -> None:
    """Run the collector. Stops cleanly on SIGTERM/SIGINT."""
    from collector.config import load_collector_config
    from collector.service import run_collector

    cfg = _load_or_exit(load_collector_config, config_path)
    setup_logging(log_level)
    asyncio.run(run_collector(cfg))


@main.command()
@click.option(
    "--duration", "duration_s", type=float, help="Stop after this many seconds (default: run until Ctrl-C)."
)
@click.option("--interval", "interval_s", type=float, default=5.0, show_default=True, help="Probe interval.")
def demo(duration_s: float | None, interval_s: float) -> None:
    """Run the whole pipeline locally (mosquitto, InfluxDB, collector, agent) with a live view."""
    from agent.demo import main as demo_main

    sys.exit(demo_main(duration_s, interval_s))


if __name__ == "__main__":  # pragma: no cover
    main()
