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

from edgeprobe import __version__
from edgeprobe.advise import model as advise_model  # the advisor's defaults (light: no I/O, no rich)
from edgeprobe.configfile import ConfigError, convert
from edgeprobe.lab.command import lab_group
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe
from edgeprobe.probes.outcome import Outcome
from edgeprobe.probes.registry import KINDS, NAMES
from edgeprobe.schema import Observation
from edgeprobe.termtext import json_safe, term_safe

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# The names of options that a command gives under another name than the config field's.
RENAMED_OPTIONS = {"verify_tls": "-k/--insecure", "headers": "-H/--header", "extra_headers": "-H/--header"}
_BOUND_WORDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _unit(field: str) -> str:
    for suffix, unit in (("_s", " s"), ("_ms", " ms"), ("_bytes", " bytes")):
        if field.endswith(suffix):
            return unit
    return ""


def bounds_text(config_type: type, field: str) -> str | None:
    """``≥ 0.001 s and ≤ 60 s``: the range the config struct allows for ``field``; None without one."""
    import msgspec

    info = msgspec.inspect.type_info(config_type)
    for f in getattr(info, "fields", ()):
        if f.name != field:
            continue
        t = f.type
        if isinstance(t, msgspec.inspect.UnionType):
            t = next((x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)), t)
        found = [(sym, getattr(t, attr, None)) for attr, sym in _BOUND_WORDS]
        shown = [f"{sym} {v:g}{_unit(field)}" for sym, v in found if v is not None]
        return " and ".join(shown) or None
    return None


def _option_flag(field: str) -> str:
    """The flag the user typed for config ``field`` (``-W/--timeout``), from the running command."""
    if field in RENAMED_OPTIONS:
        return RENAMED_OPTIONS[field]
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else ():
        if isinstance(param, click.Option) and param.name == field:
            return "/".join(param.opts)
    return field


def option_error(err: ConfigError, config_type: type, given: dict[str, Any]) -> str:
    """A config error as the user's flags say it: ``-W/--timeout must be ≥ 0.001 s and ≤ 60 s, got 0``."""
    import re

    found = re.search(r"at `\$\.(?:options\.)?(\w+)", str(err.__cause__ or err))
    if found is None or found.group(1) not in given:
        return str(err)
    field = found.group(1)
    flag, value = _option_flag(field), given[field]
    bounds = bounds_text(config_type, field)
    if bounds is not None and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{flag} must be {bounds}, got {value:g}"
    return f"{flag}: {str(err.__cause__ or err).split(' - at ')[0]}, got {value!r}"


def _adhoc_config(command: str, kind_name: str, target: str, options: dict[str, Any]) -> Any:
    """The kind's config from the options the user gave (the struct's defaults for the rest), or
    None after printing a one-line usage error (bad option or target)."""
    kind = KINDS[kind_name]
    given = {k: v for k, v in options.items() if v is not None}
    try:
        config = convert(given, kind.config_type, "command line")
    except ConfigError as err:
        click.echo(term_safe(f"edgeprobe {command}: {option_error(err, kind.config_type, given)}"), err=True)
        return None
    problem = kind.check_target(target)
    if problem is not None:
        click.echo(term_safe(f"edgeprobe {command}: {problem}"), err=True)
        return None
    return config


def _show_json(obs: Observation, extra: dict[str, Any] | None = None, command: str | None = None) -> None:
    from edgeprobe import render

    click.echo(json_safe(json.dumps({**render.as_json_obj(obs), **(extra or {})}, ensure_ascii=False)))
    failure = render.error_line(obs, command)
    if failure:
        click.echo(failure, err=True)


def _run_adhoc(kind_name: str, target: str, options: dict[str, Any], as_json: bool) -> int:
    from edgeprobe import render

    kind = KINDS[kind_name]
    config = _adhoc_config(kind_name, kind_name, target, options)
    if config is None:
        return EXIT_USAGE

    async def go() -> Observation:
        async with ProbeContext() as ctx:
            return await run_probe(kind, target, config, ctx, seq=0)

    obs = asyncio.run(go())
    if as_json:
        _show_json(obs)
    else:
        for line in render.render(obs):
            click.echo(line, err=line.startswith("edgeprobe "))
    return EXIT_OK if obs.outcome == Outcome.OK else EXIT_FAILED


EXIT_INTERRUPTED = 130  # a second Ctrl-C: given up without a summary, as a shell reports SIGINT


class _Interrupt:
    """Ctrl-C while runs are under way: the first asks them to stop and report what they measured
    (``ProbeContext.request_stop``), a second cancels ``task``. Outside the main thread (no signal
    handlers there) it does nothing."""

    def __init__(self, ctx: ProbeContext | None = None) -> None:
        self.ctx = ctx
        self.task: asyncio.Task[Any] | None = None
        self.count = 0
        self.on_first: Callable[[], None] | None = None

    def _fire(self) -> None:
        self.count += 1
        if self.count == 1:
            if self.ctx is not None:
                self.ctx.request_stop()
            if self.on_first is not None:
                self.on_first()
        elif self.task is not None:
            self.task.cancel()

    def __enter__(self) -> _Interrupt:
        import signal

        self.task = asyncio.current_task()
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._fire)
        except (RuntimeError, ValueError):  # not the main thread
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        except (RuntimeError, ValueError):
            pass

    @property
    def interrupted(self) -> bool:
        return self.count > 0


def _echo_safe(line: str, err: bool = False) -> None:
    from edgeprobe import render

    click.echo(term_safe(line, render.MAX_LINE_CHARS), err=err)


def _run_live(
    command: str, kind_name: str, targets: tuple[str, ...], options: dict[str, Any], as_json: bool, quiet: bool
) -> int:
    """Run a repeating kind (ping, tcp) against each target at once, showing each reply or attempt
    as it comes (``ProbeContext.progress``), then the summary; Ctrl-C ends the runs early with the
    summary of what they measured. Exit 0 when every target answered at least once (like ping and
    fping, an interrupted run too), else 1."""
    from edgeprobe import render
    from edgeprobe.probes.context import Step

    kind = KINDS[kind_name]
    live = kind.live
    assert live is not None
    configs = [_adhoc_config(command, kind_name, t, options) for t in targets]
    if any(c is None for c in configs):
        return EXIT_USAGE
    several = len(targets) > 1

    def show(step: Step) -> None:
        if as_json or (quiet and step.seq is not None) or (several and step.seq is None):
            return
        line = live.step(step)
        _echo_safe(f"{step.target} : {line.strip()}" if several else line)

    async def go() -> tuple[list[Observation], bool]:
        async with ProbeContext(progress=show) as ctx:
            with _Interrupt(ctx) as interrupt:
                pairs = enumerate(zip(targets, configs, strict=True))
                runs = [run_probe(kind, t, c, ctx, seq=i) for i, (t, c) in pairs]
                return list(await asyncio.gather(*runs)), interrupt.interrupted

    try:
        done, interrupted = asyncio.run(go())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED
    for obs in done:
        if as_json:
            _show_json(obs, {"interrupted": True} if interrupted else None, command)
            continue
        if several:
            _echo_safe(live.one_line(obs), err=False)
            continue
        if interrupted:
            click.echo("")  # ping's blank line after ^C
        for line in live.summary(obs):
            _echo_safe(line)
        err = render.error_line(obs, command)
        if err:
            click.echo(err, err=True)
    return EXIT_OK if all(o.outcome == Outcome.OK for o in done) else EXIT_FAILED


def _finish(code: int) -> None:
    sys.exit(code)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="edgeprobe")
def main() -> None:
    """edgeprobe: what latency users at the edge really get."""


def _dv(kind_name: str, field: str) -> Any:
    """The kind's default for ``field`` (from its config struct: the one source of defaults)."""
    import msgspec

    for f in msgspec.structs.fields(KINDS[kind_name].config_type):
        if f.name == field:
            return f.default
    raise KeyError(field)


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("-c", "--count", type=int, default=_dv("icmp", "count"), show_default=True, help="Echo requests to send.")
@click.option(
    "-i", "--interval", "interval_s", type=float, default=_dv("icmp", "interval_s"), show_default=True,
    help="Seconds between requests.",
)  # fmt: skip
@click.option(
    "-s", "--size", "size_bytes", type=int, default=_dv("icmp", "size_bytes"), show_default=True,
    help="Payload bytes per request.",
)  # fmt: skip
@click.option(
    "-W", "--timeout", "timeout_s", type=float, default=_dv("icmp", "timeout_s"), show_default=True,
    help="Seconds to wait for each reply.",
)  # fmt: skip
@click.option(
    "-t", "--ttl", type=int, show_default="system default", help="IP TTL (IPv4) / hop limit (IPv6) of the echoes."
)
@click.option("-q", "--quiet", is_flag=True, help="Only the first line and the summary.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@click.option(
    "--socket", "socket_kind", type=click.Choice(["auto", "raw", "dgram"]), default=_dv("icmp", "socket"),
    show_default=True,
    help="ICMP socket kind.",
)  # fmt: skip
@json_option
def ping(targets: tuple[str, ...], as_json: bool, quiet: bool, socket_kind: str | None, **options: Any) -> None:
    """ICMP echo, like ping: one line per reply as it comes, then loss, RTT and jitter.

    Several targets are pinged at once (like fping): one summary line each. Ctrl-C stops and
    prints the statistics of what was sent; the exit code is 0 if every target replied at least
    once, else 1 (like ping). --json prints one object per target (with "interrupted": true after
    Ctrl-C)."""
    options["socket"] = socket_kind
    _finish(_run_live("ping", "icmp", targets, options, as_json, quiet))


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="HOST:PORT...")
@click.option("-c", "--count", type=int, default=_dv("tcp", "count"), show_default=True, help="Connections to open.")
@click.option(
    "-i", "--interval", "interval_s", type=float, default=_dv("tcp", "interval_s"), show_default=True,
    help="Seconds between connection starts.",
)  # fmt: skip
@click.option(
    "-W", "--timeout", "timeout_s", type=float, default=_dv("tcp", "timeout_s"), show_default=True,
    help="Seconds to wait for each handshake.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="Only the first line and the summary.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@json_option
def tcp(targets: tuple[str, ...], as_json: bool, quiet: bool, **options: Any) -> None:
    """TCP connect: DNS time, then one line per handshake as it completes, then the summary.

    Ctrl-C stops and prints the summary of the attempts made (exit 0 if one connected)."""
    _finish(_run_live("tcp", "tcp", targets, options, as_json, quiet))


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
@click.option(
    "-W", "--timeout", "timeout_s", type=float, default=_dv("http", "timeout_s"), show_default=True,
    help="Seconds for the whole request.",
)  # fmt: skip
@click.option("-c", "--count", type=click.IntRange(1, 100_000), default=1, show_default=True, help="Requests.")
@click.option(
    "-i", "--interval", "interval_s", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
    help="Seconds between one request's end and the next one's start.",
)  # fmt: skip
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@json_option
def http(
    url: str, as_json: bool, header: tuple[str, ...], insecure: bool, count: int, interval_s: float, **options: Any
) -> None:
    """HTTP request with curl-like phases: dns, connect, tls, first byte, total.

    With --count N, N requests (each on a fresh connection), each printed as it ends, then
    min/median/max. Ctrl-C stops and summarizes the requests that ended."""
    from edgeprobe.probes.http import render_summary

    options["headers"] = _headers(header)
    if insecure:
        options["verify_tls"] = False
    config = _adhoc_config("http", "http", url, options)
    if config is None:
        _finish(EXIT_USAGE)
    _finish(_run_repeated("http", "http", url, config, count, interval_s, as_json, render_summary))


@main.command("dns")
@click.argument("name")
@click.argument("servers", nargs=-1, metavar="[@RESOLVER]...")
@click.option("-t", "--type", "rtype", help="Record type: A (default), AAAA, CNAME, MX, NS, PTR, SOA, SRV, TXT …")
@click.option("--tcp", "transport", flag_value="tcp", help="Ask over TCP.")
@click.option("--tls", "transport", flag_value="tls", help="Ask over DNS over TLS (port 853 unless given).")
@click.option("-W", "--timeout", "timeout_s", type=float, help="Seconds to wait for each resolver (default 2).")
@click.option("-k", "--insecure", is_flag=True, help="DoT: do not verify the resolver's certificate.")
@click.option("--tls-name", "tls_server_name", help="DoT: the name sent (SNI) and checked in the certificate.")
@json_option
def dns_query(
    name: str, servers: tuple[str, ...], rtype: str | None, insecure: bool, as_json: bool, **options: Any
) -> None:
    """DNS query time per resolver, like dig +short: NAME [@IP[:PORT] | @tls://IP[:PORT] …].

    Without a resolver, the nameservers of /etc/resolv.conf are asked."""
    from edgeprobe.probes.dns import parse_resolver

    for server in servers:
        try:
            if not server.startswith("@"):
                raise ValueError(f"expected @RESOLVER (e.g. @9.9.9.9, @tls://1.1.1.1), got {server!r}")
            parse_resolver(server[1:], "udp")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="RESOLVER") from None
    options["resolvers"] = [s[1:] for s in servers] or None
    options["rtype"] = rtype.upper() if rtype else None
    if insecure:
        options["verify_tls"] = False
    _finish(_run_adhoc("dns", name, options, as_json))


@main.command("trace")
@click.argument("target")
@click.option(
    "-M", "--method", type=click.Choice(["icmp", "udp", "tcp"]), default=_dv("trace", "method"), show_default=True,
    help="Probe packets: ICMP echo, UDP, or TCP SYN (for paths that drop ICMP).",
)  # fmt: skip
@click.option("-p", "--port", type=int, help="udp/tcp destination port (default 33434 / 80).")
@click.option("-q", "--queries", type=int, default=_dv("trace", "queries"), show_default=True, help="Probes per hop.")
@click.option("-m", "--max-hops", "max_hops", type=int, default=_dv("trace", "max_hops"), show_default=True)
@click.option("-f", "--first-ttl", "first_ttl", type=int, default=_dv("trace", "first_ttl"), show_default=True)
@click.option(
    "-w", "--timeout", "timeout_s", type=float, default=_dv("trace", "timeout_s"), show_default=True,
    help="Seconds to wait for each probe.",
)  # fmt: skip
@click.option("-N", "--in-flight", "in_flight", type=int, default=_dv("trace", "in_flight"), show_default=True)
@click.option("--gap-limit", type=int, default=_dv("trace", "gap_limit"), show_default=True)
@click.option("--classic", is_flag=True, help="Classic traceroute: the flow changes per probe (ECMP may mix paths).")
@click.option("--asn-file", type=click.Path(dir_okay=False), help="pyasn ipasn file: each hop's AS.")
@click.option("--ixp-file", "ixp_files", multiple=True, type=click.Path(dir_okay=False), help="PeeringDB JSON export.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@click.option("-c", "--cycles", type=int, default=1, show_default=True, help="Repeat; >1 shows a live mtr-style table.")
@json_option
def trace_cmd(
    target: str, classic: bool, ixp_files: tuple[str, ...], cycles: int, as_json: bool, **options: Any
) -> None:
    """The path hop by hop, like traceroute -n (one line per hop: TTL, address, AS/IXP, RTTs, loss).

    Every probe keeps the flow that load balancers hash (Paris traceroute). Needs CAP_NET_RAW.
    --cycles N runs N traces and shows an mtr-style table that fills in as they come; --json gives
    one object per trace with "hops" as a list of objects."""
    if classic:
        options["paris"] = False
    options["ixp_files"] = list(ixp_files) or None
    if cycles < 1:
        raise click.BadParameter("must be at least 1", param_hint="--cycles")
    _finish(_run_trace(target, options, cycles, as_json))


def _run_trace(target: str, options: dict[str, Any], cycles: int, as_json: bool) -> int:
    from edgeprobe import render
    from edgeprobe.probes import trace
    from edgeprobe.probes.text import num

    kind = KINDS["trace"]
    config = _adhoc_config("trace", "trace", target, options)
    if config is None:
        return EXIT_USAGE
    done: list[Observation] = []

    def table() -> Any:
        from rich.table import Table
        from rich.text import Text

        grid = Table(title=Text(f"edgeprobe trace {target}: {len(done)} of {cycles} cycles"), title_justify="left")
        for name in ("ttl", "host", "loss%", "snt", "last", "avg", "best", "wrst", "stdev"):
            grid.add_column(name, justify="left" if name == "host" else "right")
        for row in trace.mtr_rows(done):
            hosts = Text(term_safe(" ".join(row["addresses"]) or "???"))
            loss = "-" if row["loss_ratio"] is None else f"{100 * row['loss_ratio']:.1f}"
            cells = [num(row[k], 3) for k in ("last_ms", "avg_ms", "best_ms", "worst_ms", "stdev_ms")]
            grid.add_row(str(row["ttl"]), hosts, loss, str(row["sent"]), *cells)
        return grid

    async def go() -> bool:
        async with ProbeContext() as ctx:
            with _Interrupt(ctx) as interrupt:
                live = None
                if cycles > 1 and not as_json:
                    from rich.console import Console
                    from rich.live import Live

                    live = Live(table(), console=Console(), auto_refresh=False)
                    live.start()
                try:
                    for i in range(cycles):
                        if interrupt.interrupted:
                            break
                        obs = await run_probe(kind, target, config, ctx, seq=i)
                        done.append(obs)
                        if as_json:
                            _show_json(obs, {"hops": trace.hops_of(obs.fields)}, "trace")
                        elif live is not None:
                            live.update(table(), refresh=True)
                finally:
                    if live is not None:
                        live.stop()
                return interrupt.interrupted

    try:
        asyncio.run(go())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED
    if not as_json and cycles == 1 and done:
        for line in render.render(done[0], "trace"):
            click.echo(line, err=line.startswith("edgeprobe "))
    elif not as_json:
        for obs in done:
            err = render.error_line(obs, "trace")
            if err:
                click.echo(err, err=True)
    return EXIT_OK if done and all(o.outcome == Outcome.OK for o in done) else EXIT_FAILED


def _run_ttft(url: str, options: dict[str, Any], count: int, interval_s: float, as_json: bool) -> int:
    import os

    from edgeprobe.probes import inference

    config = _adhoc_config("ttft", inference.KIND.name, url, options)
    if config is None:
        return EXIT_USAGE
    if config.api_key_env is not None and not os.environ.get(config.api_key_env):
        click.echo(
            f"edgeprobe ttft: --api-key-env: environment variable {config.api_key_env} is not set or is empty", err=True
        )
        return EXIT_USAGE
    return _run_repeated("ttft", inference.KIND.name, url, config, count, interval_s, as_json, inference.render_summary)


def _run_repeated(
    command: str,
    kind_name: str,
    target: str,
    config: Any,
    count: int,
    interval_s: float,
    as_json: bool,
    summarize: Callable[[list[Observation]], list[str]],
) -> int:
    """``count`` runs one after another (``interval_s`` from one's end to the next one's start, on
    one ProbeContext), each shown as it ends, then ``summarize`` of them all when more than one.
    Ctrl-C abandons the run under way (not a measurement) and summarizes those that ended: exit 0
    then if one of them succeeded (like ping), else 1. Uninterrupted: 0 only if all succeeded."""
    from edgeprobe import render

    kind = KINDS[kind_name]
    done: list[Observation] = []

    def show(obs: Observation, i: int) -> None:
        if as_json:
            _show_json(obs, command=command)
            return
        if count > 1:
            click.echo(f"request {i + 1}/{count}")
        for line in render.render(obs, command):
            click.echo(line, err=line.startswith("edgeprobe "))

    async def go() -> bool:
        async with ProbeContext() as ctx:
            with _Interrupt(ctx) as interrupt:
                current: asyncio.Task[Observation] | None = None

                def abandon() -> None:
                    if current is not None:
                        current.cancel()

                interrupt.on_first = abandon
                for i in range(count):
                    if i and await ctx.pause(interval_s):
                        break
                    current = asyncio.ensure_future(run_probe(kind, target, config, ctx, seq=i))
                    try:
                        obs = await current
                    except asyncio.CancelledError:
                        if not interrupt.interrupted or interrupt.count > 1:
                            raise
                        break
                    done.append(obs)
                    show(obs, i)
                return interrupt.interrupted

    try:
        interrupted = asyncio.run(go())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED
    if interrupted and not as_json:
        click.echo(f"interrupted after {len(done)} of {count} requests", err=True)
    if (count > 1 or interrupted) and not as_json:
        for line in summarize(done):
            _echo_safe(line)
    if interrupted:
        return EXIT_OK if any(o.outcome == Outcome.OK for o in done) else EXIT_FAILED
    return EXIT_OK if all(o.outcome == Outcome.OK for o in done) else EXIT_FAILED


API_CHOICES = ("openai-chat", "openai-completions", "ollama-chat", "ollama-generate", "tgi", "anthropic")


@main.command()
@click.argument("url")
@click.option("-m", "--model", required=True, help="Model name (sent in the request; stored as a tag).")
@click.option(
    "--api", type=click.Choice(API_CHOICES), default=_dv("inference", "api"), show_default=True, help="Wire format."
)
@click.option("-c", "--count", type=click.IntRange(1, 100_000), default=1, show_default=True, help="Requests.")
@click.option(
    "-i", "--interval", "interval_s", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
    help="Seconds between one request's end and the next one's start.",
)  # fmt: skip
@click.option("-p", "--prompt", help="Prompt text (default: a one-sentence request).")
@click.option(
    "--max-tokens", type=int, default=_dv("inference", "max_tokens"), show_default=True,
    help="Largest answer asked for, in tokens.",
)  # fmt: skip
@click.option("--api-key-env", help="Name of the environment variable that holds the API key.")
@click.option("--api-key-header", help="Send the key in this header as-is (default: the API's own).")
@click.option("-H", "--header", "header", multiple=True, help="Extra header 'Name: value' (repeatable).")
@click.option(
    "--connection", type=click.Choice(["new", "reuse"]), default="reuse", show_default=True,
    help="reuse: one kept-alive connection for all requests; new: a fresh connection for each.",
)  # fmt: skip
@click.option("--no-usage", is_flag=True, help="Do not ask for the usage report (stream_options / details).")
@click.option("--no-net-rtt", is_flag=True, help="Skip the separate TCP connect that measures net_rtt_ms.")
@click.option("-k", "--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
@click.option(
    "-W", "--timeout", "timeout_s", type=float, default=_dv("inference", "timeout_s"), show_default=True,
    help="Seconds for each whole request.",
)  # fmt: skip
@click.option(
    "--first-token-timeout", "first_token_timeout_s", type=float, default=_dv("inference", "first_token_timeout_s"),
    show_default=True, help="Seconds to the first token.",
)  # fmt: skip
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@json_option
def ttft(
    url: str,
    as_json: bool,
    count: int,
    interval_s: float,
    header: tuple[str, ...],
    no_usage: bool,
    no_net_rtt: bool,
    insecure: bool,
    **options: Any,
) -> None:
    """Streaming LLM request: time to first token, token cadence, network vs server.

    URL is the endpoint's base (http://host:8000 or https://api.example.net/v1); the API's
    path is appended. With --count N, N requests (on one kept-alive connection unless
    --connection new), each printed, then a summary. --json prints one object per request.
    """
    options["extra_headers"] = _headers(header)
    if no_usage:
        options["include_usage"] = False
    if no_net_rtt:
        options["measure_net_rtt"] = False
    if insecure:
        options["verify_tls"] = False
    _finish(_run_ttft(url, options, count, interval_s, as_json))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free).")
@click.option("--ttft-ms", type=float, help="Time to first token (default 200).")
@click.option("--token-interval-ms", type=float, help="Time between tokens (default 20).")
@click.option("--jitter-ms", type=float, help="Uniform ± jitter on every send time (default 0).")
@click.option("--tokens", type=int, help="Tokens per answer, unless the request asks for fewer (default 32).")
@click.option("--load-ms", type=float, help="Share of the TTFT that Ollama answers report as load_duration.")
@click.option("--seed", type=int, help="Seed for the jitter (default: unpredictable).")
@click.option("--model-suffix", help="Appended to the model name it reports (edgeprobe-responder-<suffix>).")
@click.option(
    "--fail", type=click.Choice(["429", "500", "json", "cut", "silent", "error-event"]),
    help="Answer every request with this failure (per request: header x-edgeprobe-fail).",
)  # fmt: skip
@click.option(
    "--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True
)
def responder(host: str, port: int, log_level: str, **options: Any) -> None:
    """A streaming endpoint with known timing to probe against (not a language model).

    Speaks OpenAI chat/completions SSE, Ollama NDJSON, TGI and Anthropic streams. Headers
    x-edgeprobe-ttft-ms, -token-interval-ms, -jitter-ms, -tokens, -load-ms and -fail override
    the settings per request.
    """
    from edgeprobe.responder import ResponderSettings, model_name, serve_responder

    given = {k: v for k, v in options.items() if v is not None}
    try:
        settings = convert(given, ResponderSettings, "command line")
    except ConfigError as err:
        click.echo(f"edgeprobe responder: {err}", err=True)
        sys.exit(EXIT_USAGE)
    setup_logging(log_level)

    async def serve() -> None:
        # edgeprobe.responder.run_responder, but saying where it listens once it does (port 0: any)
        async with serve_responder(host, port, settings) as running:
            s = settings
            click.echo(
                f"edgeprobe responder on {running.url} (model {model_name(s)}, not a language model): "
                f"ttft {s.ttft_ms:g} ms, {s.token_interval_ms:g} ms per token ± {s.jitter_ms:g} ms, "
                f"{s.tokens} tokens" + (f", failing with {s.fail}" if s.fail else ""),
                err=True,
            )
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as err:
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"edgeprobe responder: cannot listen on {shown}:{port}: {err.strerror or err}", err=True)
        sys.exit(EXIT_FAILED)


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


def _ready_file(path: str | None) -> Callable[[], None] | None:
    """The ``on_ready`` of ``--ready-file``: writes PATH (our pid) atomically. Removes a leftover
    now (a killed run's file must not look ready) and fails now if PATH can't be written."""
    if path is None:
        return None
    import os
    from pathlib import Path

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.unlink(missing_ok=True)
        tmp.write_text("")
    except OSError as err:
        click.echo(f"edgeprobe: --ready-file {path}: {err.strerror or err}", err=True)
        sys.exit(EXIT_USAGE)

    def write() -> None:
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(target)  # atomic: a reader sees no file or all of it

    return write


def _remove_ready_file(path: str | None) -> None:
    if path is not None:
        from pathlib import Path

        for p in (Path(path), Path(path).with_name(f".{Path(path).name}.tmp")):
            p.unlink(missing_ok=True)


@main.group()
def agent() -> None:
    """The measurement agent daemon."""


@agent.command("run")
@config_option
@log_option
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Write this file (atomically; it holds the pid) once the agent is ready: its spool open, "
    "connected to the broker with its online status published, and its control channel (if on) "
    "subscribed. Removed when the agent stops. For supervisors and scripts that wait for the agent.",
)
def agent_run(config_path: str, log_level: str, ready_file: str | None) -> None:
    """Run the agent: probe on schedule, publish to MQTT. Stops cleanly on SIGTERM/SIGINT;
    SIGHUP reloads the config file (validated first: a bad one is refused and logged, the
    running configuration stays)."""
    from edgeprobe.agent.config import load_agent_config
    from edgeprobe.agent.daemon import run_agent
    from edgeprobe.agent.spool import SpoolError
    from edgeprobe.supervise import TaskFailedError

    cfg, jobs = _load_or_exit(load_agent_config, config_path)
    setup_logging(log_level)
    try:
        reload = (config_path, lambda: load_agent_config(config_path))  # on SIGHUP
        asyncio.run(run_agent(cfg, jobs, on_ready=_ready_file(ready_file), reload=reload))
    except SpoolError as err:
        click.echo(f"edgeprobe: spool error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except TaskFailedError as err:  # logged (each crash with its traceback); the service manager restarts us
        click.echo(f"edgeprobe: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except ConfigError as err:  # policy.apply_to_file_jobs refuses the file's jobs
        click.echo(f"edgeprobe: config error: {config_path}: {err}", err=True)
        sys.exit(EXIT_USAGE)
    finally:
        _remove_ready_file(ready_file)


@agent.command("check")
@config_option
def agent_check(config_path: str) -> None:
    """Validate an agent config file and list its jobs."""
    from edgeprobe.agent.config import load_agent_config

    cfg, jobs = _load_or_exit(load_agent_config, config_path)
    click.echo(f"{config_path}: ok: agent {cfg.agent.id} at {cfg.agent.site}, broker {cfg.broker.url}")
    spool_path = cfg.spool.resolved_path(cfg.agent.id)
    click.echo(f"  spool: {spool_path or 'in memory (spool.path: null)'}")
    for job in jobs:
        click.echo(f"  {job.name}: {job.kind.name} every {job.interval_s:g} s → {', '.join(job.targets)}")


@agent.command("spool")
@config_option
@json_option
def agent_spool(config_path: str, as_json: bool) -> None:
    """Show the agent's spool: depth, oldest entry, drop counts (safe while the agent runs)."""
    from edgeprobe.agent.config import load_agent_config
    from edgeprobe.agent.spool import SpoolError, inspect_spool, spool_lines

    cfg, _ = _load_or_exit(load_agent_config, config_path)
    path = cfg.spool.resolved_path(cfg.agent.id)
    if path is None:
        click.echo(f"{config_path}: spool.path is null: the spool is in memory, inside the running agent only")
        return
    try:
        info = inspect_spool(path)
    except SpoolError as err:
        click.echo(f"edgeprobe: {err}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        import dataclasses

        limits = {"max_bytes": cfg.spool.max_bytes, "max_age_s": cfg.spool.max_age_s}
        click.echo(json.dumps({**dataclasses.asdict(info), **limits}))
        return
    for line in spool_lines(info, cfg.spool.max_bytes, cfg.spool.max_age_s):
        click.echo(line)


@main.group()
def collector() -> None:
    """The collector: MQTT in, InfluxDB out."""


@collector.command("run")
@config_option
@log_option
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Write this file (atomically; it holds the pid) once the collector is ready: its spool open "
    "and subscribed to the broker. Removed when the collector stops. For supervisors and scripts "
    "that wait for the collector.",
)
def collector_run(config_path: str, log_level: str, ready_file: str | None) -> None:
    """Run the collector. Stops cleanly on SIGTERM/SIGINT; SIGHUP reloads limits.*, log.* and
    health_interval_s from the config file (any other change is refused and logged)."""
    from edgeprobe.collector.config import load_collector_config
    from edgeprobe.collector.service import run_collector
    from edgeprobe.collector.spool import SpoolError as CollectorSpoolError
    from edgeprobe.supervise import TaskFailedError

    cfg = _load_or_exit(load_collector_config, config_path)
    setup_logging(log_level)
    try:
        reload = (config_path, lambda: load_collector_config(config_path))  # on SIGHUP
        asyncio.run(run_collector(cfg, on_ready=_ready_file(ready_file), reload=reload))
    except CollectorSpoolError as err:  # can't open the spool (in use, unwritable, corrupt)
        click.echo(f"edgeprobe: collector spool error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except TaskFailedError as err:  # logged (each crash with its traceback); the service manager restarts us
        click.echo(f"edgeprobe: {err}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        _remove_ready_file(ready_file)


@collector.command("check")
@config_option
def collector_check(config_path: str) -> None:
    """Validate a collector config file and summarize it (broker, InfluxDB, spool, subscription)."""
    from edgeprobe.collector.config import load_collector_config

    cfg = _load_or_exit(load_collector_config, config_path)
    influx = cfg.influx
    click.echo(f"{term_safe(config_path)}: ok: collector {cfg.name}, broker {term_safe(cfg.broker.url)}")
    if influx.api == "v1":
        where = f"database {term_safe(influx.database)}"
        if influx.retention_policy is not None:
            where += f", retention policy {term_safe(influx.retention_policy)}"
    else:
        where = f"org {term_safe(influx.org)}, bucket {term_safe(influx.bucket)}"
    click.echo(f"  influx: api {influx.api} at {term_safe(influx.url)}, {where}")
    spool_path = cfg.spool_path()
    click.echo(f"  spool: {term_safe(spool_path) if spool_path else 'in memory (spool.path: null)'}")
    dead = cfg.dead_letter_path()
    click.echo(f"  dead letters: {term_safe(dead) if dead else 'logged and counted only'}")
    sub = cfg.subscription
    click.echo(f"  subscription: {', '.join(term_safe(t) for t in cfg.topic_filters)} (QoS {sub.qos})")


@collector.group("dead-letters")
def collector_dead_letters() -> None:
    """The points InfluxDB refused for good: list them, replay them once the schema is fixed."""


def _dead_letter_path_or_exit(config_path: str) -> Any:
    from edgeprobe.collector.config import load_collector_config

    cfg = _load_or_exit(load_collector_config, config_path)
    path = cfg.dead_letter_path()
    if path is None:
        click.echo(f"{config_path}: no dead-letter file (spool.dead_letter_path is null, or the spool is in memory)")
        sys.exit(EXIT_OK)
    return cfg, path


@collector_dead_letters.command("ls")
@config_option
@json_option
def collector_dead_letters_ls(config_path: str, as_json: bool) -> None:
    """Count the dead letters by reason, measurement and field, with the oldest and newest of each."""
    from edgeprobe.collector.deadletters import summarize

    _, path = _dead_letter_path_or_exit(config_path)
    try:
        summary = summarize(path)
    except OSError as err:
        click.echo(f"edgeprobe: {term_safe(path, 4096)}: {term_safe(err.strerror or err, 4096)}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json_safe(json.dumps(summary.as_dict(), ensure_ascii=False)))
        return
    info = summary.as_dict()
    if not summary.exists:
        click.echo(f"{term_safe(path, 4096)}: no dead letters (no file yet)")
        return
    click.echo(
        f"{term_safe(path, 4096)}: {summary.records} dead letter(s), {summary.bytes} bytes"
        f"{f', {summary.unreadable} unreadable line(s)' if summary.unreadable else ''}; "
        f"oldest {info['oldest'] or '-'}, newest {info['newest'] or '-'}"
    )
    if summary.groups:
        click.echo(f"  {'COUNT':>8}  {'REASON':<20} {'MEASUREMENT':<24} {'FIELD':<20} OLDEST / NEWEST")
    for group in summary.sorted_groups():
        g = group.as_dict()
        click.echo(
            f"  {group.count:>8}  {term_safe(group.reason, 20):<20} {term_safe(group.measurement or '-', 60):<24} "
            f"{term_safe(group.field or '-', 60):<20} {g['oldest'] or '-'} / {g['newest'] or '-'}"
        )


@collector_dead_letters.command("replay")
@config_option
@click.option(
    "--reason",
    type=click.Choice(["field_type_conflict", "too_large", "refused"]),
    help="Replay only the dead letters of this reason (default: all).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed; write and remove nothing.")
@json_option
def collector_dead_letters_replay(config_path: str, reason: str | None, dry_run: bool, as_json: bool) -> None:
    """Write the dead letters to InfluxDB again (after the schema was fixed) and remove the ones it
    takes from the file. Idempotent; lines refused again stay. Safe while the collector runs."""
    from edgeprobe.collector.deadletters import ReplayBusyError, replay
    from edgeprobe.collector.influx import WriteError, make_writer

    cfg, path = _dead_letter_path_or_exit(config_path)

    async def run() -> Any:
        async with make_writer(cfg.influx) as writer:
            if not dry_run:
                try:
                    await writer.prepare()
                except WriteError as err:
                    if err.retryable:
                        raise
            return await replay(
                path, writer, reason=reason, dry_run=dry_run, batch_lines=cfg.influx.batch_max_lines
            )

    try:
        result = asyncio.run(run())
    except (OSError, ReplayBusyError) as err:
        click.echo(f"edgeprobe: {term_safe(path, 4096)}: {term_safe(err, 4096)}", err=True)
        sys.exit(EXIT_FAILED)
    except WriteError as err:
        click.echo(f"edgeprobe: {term_safe(err.message, 4096)}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json_safe(json.dumps(result.as_dict(), ensure_ascii=False)))
    elif dry_run:
        click.echo(f"{term_safe(path, 4096)}: would replay {result.selected} dead letter(s) (dry run: nothing written)")
    else:
        click.echo(
            f"{term_safe(path, 4096)}: replayed {result.selected} dead letter(s): {result.written} written and removed "
            f"from the file ({result.removed} record(s)), {result.refused} refused again (kept), "
            f"{result.writes} write request(s)"
        )
    if result.error is not None:
        click.echo(f"edgeprobe: replay stopped early: {term_safe(result.error, 4096)}", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@click.option(
    "--duration", "duration_s", type=float, help="Stop after this many seconds (default: run until Ctrl-C)."
)
@click.option(
    "--interval", "interval_s", type=click.FloatRange(min=4.0), default=5.0, show_default=True, help="Probe interval."
)
@click.option(
    "--keep", "keep_dir", metavar="DIR",
    help="Keep mosquitto's and InfluxDB's data in DIR, on the same ports every run; print how to see it in Grafana.",
)  # fmt: skip
@click.option(
    "--summary-json", "summary_json", metavar="FILE", type=click.Path(dir_okay=False),
    help="WAN lab demo: write the per-PoP summary (distances, RTTs, TTFTs, ratios) to FILE as JSON.",
)  # fmt: skip
@click.option("--loopback", is_flag=True, help="The loopback demo even as root (no WAN lab).")
@click.option("--lab-name", default="demo", show_default=True, hidden=True, help="The WAN lab's name (tests).")
def demo(
    duration_s: float | None,
    interval_s: float,
    keep_dir: str | None,
    summary_json: str | None,
    loopback: bool,
    lab_name: str,
) -> None:
    """Run the whole pipeline locally with a live view: as root on a WAN lab of network namespaces
    (PoPs in New York, Chicago, Frankfurt; edge, regional and central inference endpoints at real
    distances), else on loopback (mosquitto, InfluxDB, collector, agent)."""
    from edgeprobe.labdemo import main as demo_main

    sys.exit(demo_main(duration_s, interval_s, keep_dir, summary_json, lab_name, loopback=loopback))


main.add_command(lab_group)  # edgeprobe lab up/down/exec/ls (src/edgeprobe/lab/command.py)


# ---------------------------------------------------------------------- the fleet (agent/fleet.py)


def _fleet_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--broker", "broker_url", help="Broker URL (overrides the config file / EDGEPROBE_BROKER_URL).")(f)
    return click.option(
        "--config",
        "fleet_config",
        type=click.Path(dir_okay=False),
        help="Controller settings: YAML with 'broker:' (as in the agent file) and 'key_file:'.",
    )(f)


def _fleet_broker(fleet_config: str | None, broker_url: str | None) -> Any:
    import msgspec

    from edgeprobe.fleet import load_fleet_file

    try:
        ff = load_fleet_file(fleet_config)
    except ConfigError as err:
        click.echo(f"edgeprobe fleet: config error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    if broker_url:
        try:
            ff = msgspec.structs.replace(ff, broker=msgspec.structs.replace(ff.broker, url=broker_url))
        except ValueError as err:
            click.echo(f"edgeprobe fleet: --broker: {err}", err=True)
            sys.exit(EXIT_USAGE)
    return ff


def _fleet_key(ff: Any, key_path: str | None) -> Any:
    import os

    from edgeprobe.fleet import KEY_ENV
    from edgeprobe.signing import load_private_key

    path = key_path or os.environ.get(KEY_ENV) or ff.key_file
    if not path:
        click.echo(f"edgeprobe fleet: no controller key: give --key, set {KEY_ENV} or key_file", err=True)
        sys.exit(EXIT_USAGE)
    try:
        return load_private_key(path)
    except (OSError, ValueError) as err:
        click.echo(f"edgeprobe fleet: controller key {path}: {err}", err=True)
        sys.exit(EXIT_USAGE)


def _where(items: tuple[str, ...]) -> dict[str, str]:
    from edgeprobe.fleet import parse_where

    try:
        return parse_where(items)
    except ValueError as err:
        click.echo(f"edgeprobe fleet: {err}", err=True)
        sys.exit(EXIT_USAGE)


where_option = click.option("--where", multiple=True, metavar="LABEL=VALUE", help="Only agents with this label.")
key_option = click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False),
    help="Controller private key (or EDGEPROBE_CONTROLLER_KEY_FILE).",
)


@main.group()
def fleet() -> None:
    """The fleet: presence, ad-hoc measurements across agents, central configuration."""


@fleet.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False))
@click.argument("public_key", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace existing key files (agents must get the new public key).")
def fleet_keygen(private_key: str, public_key: str, force: bool) -> None:
    """Write a new controller Ed25519 key pair (agents get the public one: control.public_key_file).

    The private key is created 0600 and never written through a symlink; existing files are
    kept unless --force.
    """
    from edgeprobe.signing import generate_key

    try:
        generate_key(private_key, public_key, replace=force)
    except FileExistsError as err:
        click.echo(f"edgeprobe fleet keygen: {err.filename}: {err.strerror}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        click.echo(f"edgeprobe fleet keygen: {err.filename}: {err.strerror or err}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"wrote {private_key} (keep it secret) and {public_key} (for the agents)")


def _can_run_cell(row: dict[str, Any]) -> str:
    """What an agent can run: ``all`` (every kind this CLI knows), ``all but icmp (no perm)`` when
    it reports lacking a kind's privilege, else its kinds, each such one marked ``icmp(no perm)``."""
    lacking = row["cannot_run"]
    if set(row["kinds"]) >= set(KINDS):
        if not lacking:
            return "all"
        return "all but " + ", ".join(f"{name} ({note})" for name, note in sorted(lacking.items()))
    return ",".join(f"{name}({lacking[name]})" if name in lacking else name for name in row["kinds"])


def _accepts_cell(row: dict[str, Any]) -> str:
    """``cmd,cfg`` (ad-hoc commands, central configuration), one of them, or ``-``."""
    parts = [short for what, short in (("commands", "cmd"), ("config", "cfg")) if row[f"accepts_{what}"]]
    return ",".join(parts) or "-"


@fleet.command("ls")
@_fleet_options
@where_option
@json_option
@click.option("--stale-after", "stale_s", type=float, default=120.0, show_default=True, help="Seconds.")
def fleet_ls(
    fleet_config: str | None, broker_url: str | None, where: tuple[str, ...], as_json: bool, stale_s: float
) -> None:
    """List agents from their retained status messages."""
    import aiomqtt

    from edgeprobe.fleet import age_s, matches, scan_statuses, status_row

    ff = _fleet_broker(fleet_config, broker_url)
    sel = _where(where)
    try:
        scan = asyncio.run(scan_statuses(ff.broker))
    except aiomqtt.MqttError as err:
        click.echo(f"edgeprobe fleet: broker {ff.broker.url}: {err}", err=True)
        sys.exit(EXIT_FAILED)
    statuses = [s for s in scan.statuses if matches(s, sel)]
    if scan.skipped or scan.truncated:
        counts = ", ".join(f"{code} {n}" for code, n in sorted(scan.skipped.items()))
        click.echo(
            f"edgeprobe fleet: skipped {sum(scan.skipped.values())} invalid status message(s)"
            + (f" ({counts})" if counts else "")
            + ("; stopped at the read limit" if scan.truncated else ""),
            err=True,
        )
    rows = [status_row(s) for s in statuses]
    for row, s in zip(rows, statuses, strict=True):
        if s.state == "online" and age_s(s) > stale_s:
            row["state"] = "stale"
    if as_json:  # a JSON array of status_row objects (docs/fleet.md), nothing else on stdout
        click.echo(json_safe(json.dumps(rows, ensure_ascii=False)))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def cell(value: object, style: str = "") -> Text:
        """Agent-written text, terminal-safe and never read as rich markup."""
        return Text(term_safe(value, 200), style=style)

    table = Table()
    for header in ("agent", "site", "state", "age", "labels", "jobs", "can run", "accepts", "refused", "config"):
        short = header in ("state", "age", "accepts", "refused")
        table.add_column(header, no_wrap=short, overflow="fold")  # wrapped, never clipped
    for row in rows:
        style = {"online": "green", "offline": "red", "stale": "yellow"}.get(row["state"], "")
        table.add_row(
            cell(row["agent"]),
            cell(row["site"]),
            cell(row["state"], style),
            f"{row['age_s']:.0f} s",
            cell(",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))),
            cell("?" if row["job_kinds"] is None else ",".join(row["job_kinds"]) or "-"),
            cell(_can_run_cell(row)),
            _accepts_cell(row),
            str(row["refused"] or 0),
            cell(("error: " + row["config_error"]) if row["config_error"] else ",".join(row["config_docs"])),
        )
    Console().print(table)
    click.echo(f"{len(rows)} agent(s), {sum(r['state'] == 'online' for r in rows)} online")


def _parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            click.echo(f"edgeprobe fleet: -o: expected option=value, got {item!r}", err=True)
            sys.exit(EXIT_USAGE)
        out[key] = yaml.safe_load(value) if value else ""
    return out


# The ad-hoc commands' flags that `fleet probe` takes too: config field -> the flag as typed.
FLEET_PROBE_FLAGS = {
    "count": "-c/--count",
    "interval_s": "-i/--interval",
    "size_bytes": "-s/--size",
    "timeout_s": "-W/--probe-timeout",
    "ttl": "-t/--ttl",
    "family": "-4/-6",
}


def _fleet_probe_options(kind_name: str, opts: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``-o`` options plus the ad-hoc flags given, checked against the kind (exit 2 on a clash or a
    flag the kind does not take)."""
    from edgeprobe.probes.registry import get_kind

    kind = get_kind(kind_name)
    out = dict(opts)
    for field, value in flags.items():
        if value is None:
            continue
        flag = FLEET_PROBE_FLAGS[field]
        if field not in kind.config_type.__struct_fields__:
            click.echo(f"edgeprobe fleet probe: {flag} is not an option of {kind.name}", err=True)
            sys.exit(EXIT_USAGE)
        if field in out:
            click.echo(f"edgeprobe fleet probe: {flag} and -o {field}= both given", err=True)
            sys.exit(EXIT_USAGE)
        out[field] = value
    return out


@fleet.command("probe")
@click.argument("kind", type=click.Choice(sorted(NAMES)), metavar="KIND")
@click.argument("target")
@click.option("-o", "--option", "options", multiple=True, metavar="NAME=VALUE", help="Probe option (e.g. -o count=3).")
@click.option("-c", "--count", type=int, help="As ping/tcp -c (the kind's default otherwise).")
@click.option("-i", "--interval", "interval_s", type=float, help="As ping/tcp -i: seconds between sends.")
@click.option("-s", "--size", "size_bytes", type=int, help="As ping -s: payload bytes.")
@click.option("-W", "--probe-timeout", "timeout_s", type=float, help="As the ad-hoc commands' -W/--timeout.")
@click.option("-t", "--ttl", type=int, help="As ping -t: IP TTL / hop limit.")
@click.option("-4", "family", flag_value="ipv4", help="IPv4 only.")
@click.option("-6", "family", flag_value="ipv6", help="IPv6 only.")
@where_option
@click.option("--agents", "limit", type=click.IntRange(min=1), help="At most this many agents (spread across sites).")
@click.option(
    "--timeout", "wait_s", type=float, default=15.0, show_default=True, help="Seconds to wait for answers."
)
@key_option
@_fleet_options
@json_option
def fleet_probe(
    kind: str,
    target: str,
    options: tuple[str, ...],
    where: tuple[str, ...],
    limit: int | None,
    wait_s: float,
    key_path: str | None,
    fleet_config: str | None,
    broker_url: str | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Run one probe now from many agents; results stream in as they answer.

    KIND is a probe kind or its command's name: icmp or ping, tcp, http, inference or ttft, ….
    The ad-hoc commands' flags (-c, -i, -s, -W, -t, -4/-6) set the same options as -o does."""

    from edgeprobe.fleet import ProbeRun, check_request, primary_field, refusal_words
    from edgeprobe.probes.registry import get_kind
    from edgeprobe.schema import CommandReply

    timeout_s = wait_s
    kind = get_kind(kind).name
    given_flags = {k: v for k, v in flags.items() if v is not None}
    opts = _fleet_probe_options(kind, _parse_options(options), given_flags)
    try:
        check_request(kind, target, opts)
    except ConfigError as err:
        click.echo(f"edgeprobe fleet probe: {option_error(err, get_kind(kind).config_type, given_flags)}", err=True)
        sys.exit(EXIT_USAGE)
    ff = _fleet_broker(fleet_config, broker_url)
    key = _fleet_key(ff, key_path)
    sel = _where(where)
    field_name = primary_field(kind) or ""

    def reply_cells(r: CommandReply) -> tuple[str, str, str]:
        if r.status != "ok" or r.observation is None:
            return refusal_words(r.code), "-", r.reason or ""
        v = r.observation.fields.get(field_name)
        return r.observation.outcome, f"{v:.2f}" if isinstance(v, float) else "-", r.observation.reason or ""

    if as_json:
        run = _run_fleet_probe(ff, key, kind, target, opts, sel, limit, timeout_s, None, None)
    else:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.table import Table

        console = Console()
        progress = Progress(TextColumn("answered"), BarColumn(), MofNCompleteColumn())
        task = progress.add_task("answered", total=0)
        rows: list[tuple[str, ...]] = []

        from rich.text import Text

        def render() -> Group:
            table = Table("agent", "site", "outcome", field_name, "reason", title=Text(term_safe(f"{kind} {target}")))
            for row in rows:  # an agent's text: terminal-safe, never rich markup
                table.add_row(*(Text(term_safe(c, 300)) for c in row))
            return Group(table, progress)

        live = Live(render(), console=console, refresh_per_second=8)

        def asked(run: ProbeRun) -> None:
            progress.update(task, total=len(run.asked))
            live.update(render())

        def replied(run: ProbeRun, r: CommandReply) -> None:
            rows.append((r.agent, r.site, *reply_cells(r)))
            progress.update(task, completed=len(run.replies))
            live.update(render())

        with live:
            run = _run_fleet_probe(ff, key, kind, target, opts, sel, limit, timeout_s, asked, replied)
    summary = run.summary()
    if run.not_accepting:
        names = ", ".join(term_safe(s.agent, 200) for s in run.not_accepting)
        click.echo(f"skipped {len(run.not_accepting)} agent(s) that do not accept commands: {names}", err=True)
    if as_json:
        replies = [msgspec_builtins(r) for r in run.replies.values()]
        out = {"request_id": run.request_id, "replies": replies, "summary": summary}
        click.echo(json_safe(json.dumps(out, ensure_ascii=False)))
    else:
        if not run.asked:
            click.echo("no online agent that accepts commands matches", err=True)
        if summary["measured"]:
            click.echo(
                f"{field_name}: min {summary['min']:.2f}  median {summary['median']:.2f}  max {summary['max']:.2f}"
                f"  ({summary['measured']} of {summary['asked']} agents)"
            )
        if run.skipped:
            counts = ", ".join(f"{code} {n}" for code, n in sorted(run.skipped.items()))
            click.echo(f"edgeprobe fleet: skipped {sum(run.skipped.values())} invalid reply(ies) ({counts})", err=True)
    # What went wrong, one line per agent, last (stderr: --json keeps stdout for the JSON).
    for agent_id, r in sorted(run.denied().items()):
        why = f": {r.reason}" if r.reason else ""
        click.echo(term_safe(f"{agent_id}: {refusal_words(r.code)}{why}", 400), err=True)
    for agent_id, r in sorted(run.failed().items()):
        obs = r.observation
        assert obs is not None
        why = f": {obs.reason}" if obs.reason else ""
        click.echo(term_safe(f"{agent_id}: failed: {obs.outcome}{why}", 400), err=True)
    for agent_id in summary["missing"]:
        click.echo(f"{term_safe(agent_id, 200)}: no answer within {timeout_s:g} s", err=True)
    sys.exit(EXIT_OK if run.all_ok else EXIT_FAILED)


def msgspec_builtins(obj: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(obj)


def _run_fleet_probe(
    ff: Any,
    key: Any,
    kind: str,
    target: str,
    opts: dict[str, Any],
    sel: dict[str, str],
    limit: int | None,
    timeout_s: float,
    asked: Any,
    replied: Any,
) -> Any:
    import aiomqtt

    from edgeprobe.fleet import fleet_probe

    try:
        return asyncio.run(
            fleet_probe(
                ff.broker,
                key,
                kind,
                target,
                opts,
                where=sel,
                limit=limit,
                timeout_s=timeout_s,
                on_asked=asked,
                on_reply=replied,
            )
        )
    except aiomqtt.MqttError as err:
        click.echo(f"edgeprobe fleet: broker {ff.broker.url}: {err}", err=True)
        sys.exit(EXIT_FAILED)


@fleet.command("apply")
@click.argument("mesh_path", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Validate and show the documents; publish nothing.")
@key_option
@_fleet_options
def fleet_apply(
    mesh_path: str, dry_run: bool, key_path: str | None, fleet_config: str | None, broker_url: str | None
) -> None:
    """Publish central configuration (retained, signed) from a mesh file."""
    import aiomqtt

    from edgeprobe.fleet import load_mesh, mesh_documents, publish_documents, validate_documents

    ff = _fleet_broker(fleet_config, broker_url)
    try:
        docs = mesh_documents(load_mesh(mesh_path), ff.broker.topic_prefix, mesh_path)
        validate_documents(docs, mesh_path)
    except ConfigError as err:
        click.echo(f"edgeprobe fleet apply: {err}", err=True)
        sys.exit(EXIT_USAGE)
    for doc in docs:
        where = ",".join(f"{k}={v}" for k, v in doc.where.items()) or "-"
        click.echo(f"{doc.topic}: where {where}: {len(doc.jobs)} job(s)")
    if dry_run:
        return
    key = _fleet_key(ff, key_path)
    try:
        asyncio.run(publish_documents(ff.broker, key, docs))
    except aiomqtt.MqttError as err:
        click.echo(f"edgeprobe fleet: broker {ff.broker.url}: {err}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"published {len(docs)} document(s)")


@fleet.command("clear")
@click.option("--group", "groups", multiple=True, metavar="NAME", help="A group document (a mesh rule's name).")
@click.option("--agent", "agents", multiple=True, metavar="SITE/AGENT", help="A per-agent document.")
@click.option("--ttl", "ttl_s", type=float, default=7 * 86_400.0, show_default=True, help="Seconds.")
@key_option
@_fleet_options
def fleet_clear(
    groups: tuple[str, ...],
    agents: tuple[str, ...],
    ttl_s: float,
    key_path: str | None,
    fleet_config: str | None,
    broker_url: str | None,
) -> None:
    """Replace central configuration documents with signed empty ones (their jobs stop)."""
    import aiomqtt

    from edgeprobe.agent.control import ConfigDocument
    from edgeprobe.fleet import publish_documents
    from edgeprobe.schema import NAME_RE, config_topic, group_config_topic
    from edgeprobe.signing import stamp

    ff = _fleet_broker(fleet_config, broker_url)
    prefix = ff.broker.topic_prefix
    topics = [group_config_topic(prefix, g) for g in groups]
    for item in agents:
        site, _, agent_id = item.partition("/")
        if not NAME_RE.match(site) or not NAME_RE.match(agent_id):
            click.echo(f"edgeprobe fleet clear: --agent: expected SITE/AGENT, got {item!r}", err=True)
            sys.exit(EXIT_USAGE)
        topics.append(config_topic(prefix, site, agent_id))
    if not topics or not all(NAME_RE.match(g) for g in groups):
        click.echo("edgeprobe fleet clear: give --group NAME or --agent SITE/AGENT", err=True)
        sys.exit(EXIT_USAGE)
    key = _fleet_key(ff, key_path)
    docs = [ConfigDocument(**stamp(ttl_s), topic=t) for t in topics]
    try:
        asyncio.run(publish_documents(ff.broker, key, docs))
    except aiomqtt.MqttError as err:
        click.echo(f"edgeprobe fleet: broker {ff.broker.url}: {err}", err=True)
        sys.exit(EXIT_FAILED)
    for t in topics:
        click.echo(f"{t}: cleared")


SAMPLE_FILES = {"agent": "agent.yaml", "collector": "collector.yaml"}  # in edgeprobe/examples/
SAMPLE_NEXT = {
    "agent": "edgeprobe agent check -c {path}, then: edgeprobe agent run -c {path}",
    "collector": "edgeprobe collector check -c {path}, then: edgeprobe collector run -c {path}",
}


def _sample_text(role: str) -> str:
    from importlib.resources import files

    return (files("edgeprobe") / "examples" / SAMPLE_FILES[role]).read_text(encoding="utf-8")


def _write_private(path: str, data: bytes, force: bool) -> str | None:
    """Write ``data`` to the file ``path`` with mode 0600 (a config may hold secrets); refuse to
    replace an existing file unless ``force``. Returns why it could not, or None."""
    from edgeprobe.files import write_new_file

    try:
        write_new_file(path, data, mode=0o600, replace=force)
    except IsADirectoryError:
        return f"{path}: is a directory; give a file name"
    except FileExistsError:
        return f"{path} exists; pass --force to overwrite it"
    except OSError as err:
        return f"cannot write {path}: {err.strerror or err}"
    return None


def _init(role: str, out_path: str | None, force: bool) -> int:
    text = _sample_text(role)
    if out_path is None:
        click.echo(text, nl=False)
        return EXIT_OK
    problem = _write_private(out_path, text.encode("utf-8"), force)
    if problem is not None:
        click.echo(f"edgeprobe init {role}: {problem}", err=True)
        return EXIT_USAGE
    click.echo(f"wrote {out_path} (mode 0600): every option with its default; edit it, then run")
    click.echo("  " + SAMPLE_NEXT[role].format(path=out_path))
    return EXIT_OK


@main.command("watch")
@_fleet_options
@where_option
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option("-n", "--count", "max_observations", type=click.IntRange(min=1), help="Stop after N observations.")
@click.option(
    "--once",
    is_flag=True,
    help="Print the table once, when it stops, instead of redrawing it (the default when stdout is not a terminal).",
)
def watch_cmd(
    fleet_config: str | None,
    broker_url: str | None,
    where: tuple[str, ...],
    duration_s: float | None,
    max_observations: int | None,
    once: bool,
) -> None:
    """The live table of `edgeprobe demo` for any running fleet: every agent's observations as the
    broker delivers them (read-only: it subscribes and publishes nothing). Stops at Ctrl-C,
    --duration or --count. Broker options as for the fleet commands."""
    from rich.console import Console

    from edgeprobe.watch import run_watch

    ff = _fleet_broker(fleet_config, broker_url)
    sel = _where(where)
    console = Console()
    live = console.is_terminal and not once
    if not console.is_terminal:
        console = Console(width=160)  # piped: wide enough for the table
    logging.basicConfig(level=logging.WARNING, format="edgeprobe watch: %(message)s", stream=sys.stderr)
    run = run_watch(ff.broker, console, where=sel, duration_s=duration_s, max_observations=max_observations, live=live)
    sys.exit(asyncio.run(run))


@main.group("init")
def init_group() -> None:
    """Write a commented sample config: every option, its default and why."""


_out_option = click.option(
    "-o", "--out", "out_path", metavar="FILE", help="Write to FILE (mode 0600) instead of standard output."
)
_force_option = click.option("--force", is_flag=True, help="Overwrite what exists.")


@init_group.command("agent")
@_out_option
@_force_option
def init_agent(out_path: str | None, force: bool) -> None:
    """Sample agent config (agent identity, broker, spool, one job per probe kind, control, policy)."""
    _finish(_init("agent", out_path, force))


@init_group.command("collector")
@_out_option
@_force_option
def init_collector(out_path: str | None, force: bool) -> None:
    """Sample collector config (broker, subscription, InfluxDB, limits, spool)."""
    _finish(_init("collector", out_path, force))


SYSTEMD_UNITS = ("edgeprobe-agent.service", "edgeprobe-collector.service", "edgeprobe-responder.service")
SYSTEMD_EXEC_PLACEHOLDER = "@EDGEPROBE@"


def systemd_units(executable: str) -> dict[str, str]:
    """The shipped unit files (edgeprobe/examples/systemd/) with ``ExecStart=`` naming ``executable``."""
    from importlib.resources import files

    folder = files("edgeprobe") / "examples" / "systemd"
    return {
        name: (folder / name).read_text(encoding="utf-8").replace(SYSTEMD_EXEC_PLACEHOLDER, executable)
        for name in SYSTEMD_UNITS
    }


def _installed_command() -> str:
    """The absolute path of this installation's ``edgeprobe`` command (beside the interpreter,
    else on PATH), for ``ExecStart=``; ``/usr/local/bin/edgeprobe`` if neither is found."""
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).with_name("edgeprobe")
    if beside.is_file():
        return str(beside.absolute())
    found = shutil.which("edgeprobe")
    return str(Path(found).absolute()) if found else "/usr/local/bin/edgeprobe"


def _init_systemd(out_dir: str, force: bool, executable: str | None) -> int:
    from pathlib import Path

    where = "edgeprobe init systemd"
    exe = executable or _installed_command()
    if not Path(exe).is_absolute():
        click.echo(f"{where}: --exec {exe}: give an absolute path (systemd's ExecStart=)", err=True)
        return EXIT_USAGE
    root = Path(out_dir)
    if (root.exists() or root.is_symlink()) and not root.is_dir():
        click.echo(f"{where}: {out_dir}: not a directory", err=True)
        return EXIT_USAGE
    units = systemd_units(exe)
    present = [name for name in units if (root / name).exists() or (root / name).is_symlink()]
    if present and not force:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        click.echo(f"{where}: {root / present[0]}{more} exist; pass --force to overwrite", err=True)
        return EXIT_USAGE
    from edgeprobe.files import write_new_file

    try:
        root.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            write_new_file(root / name, text.encode("utf-8"), mode=0o644, replace=force)
    except OSError as err:
        click.echo(f"{where}: cannot write to {root}: {err.strerror or err}", err=True)
        return EXIT_USAGE
    click.echo(f"wrote {len(units)} units to {root} (ExecStart={exe}):")
    for name in units:
        click.echo(f"  {name}")
    if exe.startswith(("/home/", "/root/")):
        click.echo(f"note: {exe} is under /home or /root, which the units hide (ProtectHome=yes);", err=True)
        click.echo("  install edgeprobe elsewhere (e.g. a venv in /opt/edgeprobe) and pass --exec.", err=True)
    click.echo("Next, as root (each unit's comments say more):")
    click.echo("  install -d -m 0755 /etc/edgeprobe")
    click.echo("  edgeprobe init agent --out /etc/edgeprobe/agent.yaml        # and set spool.path to")
    click.echo("      /var/lib/edgeprobe/agent/{agent}/spool.db (the agent's StateDirectory)")
    click.echo("  edgeprobe init collector --out /etc/edgeprobe/collector.yaml")
    click.echo(f"  install -m 0644 {root}/edgeprobe-*.service /etc/systemd/system/")
    click.echo("  systemctl daemon-reload && systemctl enable --now edgeprobe-agent   # or -collector, -responder")
    return EXIT_OK


@init_group.command("systemd")
@click.option(
    "-o", "--out", "out_dir", metavar="DIR", default=".", show_default=True, help="Write the unit files into DIR."
)
@_force_option
@click.option(
    "--exec", "executable", metavar="PATH",
    help="The edgeprobe command for ExecStart= (default: this installation's).",
)  # fmt: skip
def init_systemd(out_dir: str, force: bool, executable: str | None) -> None:
    """systemd units for the agent, collector and responder: a dynamic user, a state directory,
    CAP_NET_RAW for the agent only, and sandboxing."""
    _finish(_init_systemd(out_dir, force, executable))


# Shipped in edgeprobe.grafana: (folder, file name endings). The layout is kept when exported.
GRAFANA_FILES = (
    ("dashboards", (".json",)),  # for file provisioning: the datasource's fixed uid edgeprobe-influxdb
    ("import", (".json",)),  # for Grafana's Import: asks for the datasource (${DS_EDGEPROBE})
    ("provisioning/datasources", (".yaml", ".yml")),
    ("provisioning/dashboards", (".yaml", ".yml")),
)


def grafana_files() -> list[tuple[str, bytes]]:
    """The dashboards and provisioning files in the installed package: (relative path, content)."""
    from importlib.resources import files

    found: list[tuple[str, bytes]] = []
    for folder, endings in GRAFANA_FILES:
        node = files("edgeprobe.grafana")
        for part in folder.split("/"):
            node = node / part
        for item in sorted(node.iterdir(), key=lambda t: t.name):
            if item.is_file() and item.name.endswith(endings):
                found.append((f"{folder}/{item.name}", item.read_bytes()))
    return found


def _grafana_usage(directory: str, shipped: dict[str, bytes]) -> list[str]:
    """How to point Grafana at the files exported to ``directory`` (absolute), with the settings
    the shipped files hold."""
    from pathlib import Path

    import yaml

    root = Path(directory)

    def settings(rel_folder: str, section: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for rel, data in shipped.items():
            if rel.startswith(rel_folder + "/"):
                try:
                    doc = yaml.safe_load(data)
                except yaml.YAMLError:
                    continue
                items = doc.get(section) if isinstance(doc, dict) else None
                found += [dict(item, file=rel) for item in items or [] if isinstance(item, dict)]
        return found

    provisioning = root / "provisioning"
    lines = [
        "To use them with Grafana:",
        f"  1. Point its provisioning at {provisioning} (GF_PATHS_PROVISIONING={provisioning}",
        "     or paths.provisioning in grafana.ini), or copy the folders in it into Grafana's own",
        "     (/etc/grafana/provisioning in Grafana's packages and Docker image).",
    ]
    for provider in settings("provisioning/dashboards", "providers"):
        options = provider.get("options")
        path = options.get("path") if isinstance(options, dict) else None
        lines += [
            f"  2. {provider['file']} loads the dashboards from its options.path,",
            f"     {path}: set it to {root / 'dashboards'}, or put the JSON files there.",
        ]
    for source in settings("provisioning/datasources", "datasources"):
        secure = source.get("secureJsonData")
        password = secure.get("password") if isinstance(secure, dict) else None
        from_env = ""
        if isinstance(password, str) and password.startswith("${") and password.endswith("}"):
            from_env = f", password from ${password[2:-1]}"
        lines += [
            f"  3. {source['file']} reads InfluxDB at {source.get('url')}, database",
            f"     {source.get('database')}, user {source.get('user')}{from_env}: set them for yours",
            "     (its comments cover InfluxDB 1.x, 2.x and 3.x).",
        ]
    lines += [
        f"  Or, without provisioning: in Grafana, Dashboards > New > Import each file of {root / 'import'};",
        "  Import asks which InfluxDB datasource (InfluxQL, the edgeprobe database) the panels use.",
    ]
    return lines


def _export_dashboards(directory: str, force: bool) -> int:
    from pathlib import Path

    where = "edgeprobe dashboards export"
    root = Path(directory)
    if (root.exists() or root.is_symlink()) and not root.is_dir():
        click.echo(f"{where}: {directory}: not a directory", err=True)
        return EXIT_USAGE
    shipped = grafana_files()
    if not shipped:  # pragma: no cover - a broken install
        click.echo(f"{where}: no dashboards in this installation of edgeprobe", err=True)
        return EXIT_FAILED
    present = [rel for rel, _ in shipped if (root / rel).exists() or (root / rel).is_symlink()]
    if present and not force:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        click.echo(f"{where}: {root / present[0]}{more} exist; pass --force to overwrite", err=True)
        return EXIT_USAGE
    written: list[str] = []
    for rel, data in shipped:
        target = root / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as err:
            click.echo(f"{where}: cannot write {target}: {err.strerror or err}", err=True)
            return EXIT_USAGE
        written.append(rel)
    click.echo(f"wrote {len(written)} files to {root}:")
    for rel in written:
        click.echo(f"  {rel}")
    for line in _grafana_usage(str(root.resolve()), dict(shipped)):
        click.echo(line)
    return EXIT_OK


@main.group("dashboards")
def dashboards_group() -> None:
    """Grafana dashboards for edgeprobe's data, and the files that provision them."""


@dashboards_group.command("export")
@click.argument("directory", metavar="DIR")
@_force_option
def dashboards_export(directory: str, force: bool) -> None:
    """Write the dashboards (DIR/dashboards) and Grafana provisioning files (DIR/provisioning)."""
    _finish(_export_dashboards(directory, force))


@main.command("advise")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="The collector's config file: its influx settings (default: EDGEPROBE_INFLUX_* and the defaults).",
)
@click.option("--influx-url", help="InfluxDB URL (overrides the config and EDGEPROBE_INFLUX_URL).")
@click.option("--database", help="Database (api v2: bucket) to read (overrides the config and the environment).")
@click.option("--since", default=advise_model.DEFAULT_SINCE, show_default=True, help="Window: 30m, 24h, 7d …")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="TAG=VALUE",
    help="Only points with this tag value (or TAG!=VALUE); repeatable.",
)
@click.option(
    "--min-samples",
    type=click.IntRange(1, 1_000_000),
    default=advise_model.DEFAULT_MIN_SAMPLES,
    show_default=True,
    help="Successful samples a PoP × endpoint pair needs to be ranked.",
)
@click.option(
    "--max-points",
    type=click.IntRange(1, 10_000_000),
    default=advise_model.DEFAULT_MAX_POINTS_PER_SERIES,
    show_default=True,
    help="Newest points read per series.",
)
@click.option(
    "--candidates",
    "candidates_path",
    type=click.Path(dir_okay=False),
    help="What-if: YAML with the PoPs' coordinates and candidate sites.",
)
@click.option(
    "--weights",
    "weights_path",
    type=click.Path(dir_okay=False),
    help="YAML mapping PoP -> users or requests (default: equal).",
)
@click.option(
    "--k",
    "k",
    type=click.IntRange(1, 100),
    default=advise_model.DEFAULT_K,
    show_default=True,
    help="With --candidates: choose this many sites.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="Also write the report as one self-contained HTML file.",
)
@json_option
def advise_cmd(
    config_path: str | None,
    influx_url: str | None,
    database: str | None,
    since: str,
    where: tuple[str, ...],
    min_samples: int,
    max_points: int,
    candidates_path: str | None,
    weights_path: str | None,
    k: int,
    html_path: str | None,
    as_json: bool,
) -> None:
    """Where should inference live? Per PoP × endpoint TTFT, network vs server, what-if placements.

    Reads edgeprobe_inference (and icmp/tcp) from InfluxDB with the collector's settings.
    Exit 0: a report; 1: no usable data or InfluxDB failed; 2: bad usage or config.
    """
    from edgeprobe.advise.html import render_html
    from edgeprobe.advise.influxql import AdviseError, UsageError
    from edgeprobe.advise.report import to_json
    from edgeprobe.advise.run import advise, influx_settings
    from edgeprobe.advise.whatif import load_candidates, load_weights

    try:
        influx = influx_settings(config_path, influx_url, database)
        candidates = load_candidates(candidates_path) if candidates_path else None
        weights = load_weights(weights_path) if weights_path else None
    except ConfigError as err:
        click.echo(f"edgeprobe advise: config error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    if weights is not None and candidates is None:
        click.echo("edgeprobe advise: --weights needs --candidates (the sites to weigh)", err=True)
        sys.exit(EXIT_USAGE)
    try:
        report = advise(
            influx,
            since=since,
            where=list(where),
            min_samples=min_samples,
            max_points_per_series=max_points,
            candidates=candidates,
            weights=weights,
            k=k,
        )
    except AdviseError as err:
        click.echo(term_safe(f"edgeprobe advise: {err}"), err=True)
        sys.exit(EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILED)
    if html_path:
        try:
            with open(html_path, "w", encoding="utf-8") as fh:
                fh.write(render_html(report))
        except OSError as err:
            click.echo(term_safe(f"edgeprobe advise: cannot write {html_path}: {err.strerror or err}"), err=True)
            sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(to_json(report).decode())
    else:
        from rich.console import Console

        from edgeprobe.advise.table import render

        render(report, Console(soft_wrap=False))
        if html_path:
            click.echo(f"wrote {term_safe(html_path)}")


if __name__ == "__main__":  # pragma: no cover
    main()
