"""What every probe kind declares. The list of kinds lives in :mod:`edgeprobe.probes.registry` only.

A kind is one module, ``probes/<name>.py``, ending in ``KIND = ProbeKind(...)``. Everything the
rest of edgeprobe needs to know about a kind is a field of that object, so nothing outside the
kind's module keeps a table keyed by kind name:

* running it: ``config_type``, ``result_type``, ``run``, ``check_target``, ``max_run_s``;
* storing it: ``measurement``, ``tag_fields`` (the collector), ``display_target`` (the target as
  every observation stores and publishes it: credentials in it replaced, applied by the handler);
* showing it: ``render`` (the CLI's human view of one observation, a pure function defined in the
  kind's module next to ``KIND``; ``edgeprobe.render`` only adds the generic frame around it),
  ``target_label`` (the CLI's ``--json``), ``headline`` and ``jitter`` (the demo's live view),
  ``fleet_field`` (``edgeprobe fleet probe``), ``live`` (the CLI's view of a run as it happens),
  ``aliases`` (the other names users give the kind: the CLI's command name, ``ping`` for
  ``icmp``; resolved by :func:`edgeprobe.probes.registry.get_kind` wherever a kind is named);
* judging it: ``floor_field`` and ``first_byte_round_trips`` (the physical floor,
  :func:`edgeprobe.probes.geo.physics`), ``policy_cost`` (an agent's ad-hoc policy),
  ``env_vars`` (the environment variables a run reads: an agent lets a remote request name only
  those its owner allowed), ``privilege`` (what the agent's host must grant, as
  ``edgeprobe fleet ls`` shows it);
* storing more: ``sub_points`` (points an observation makes besides its own: the trace's hops).

The parts beyond running it have neutral defaults (no tags, no figures, the generic renderer, one
packet a request) so that a test can build a stand-in kind in a few lines; a *registered* kind
must declare every part explicitly, ``None`` meaning "this kind has none". Adding a kind means: its module (config,
result, ``probe``, the parts above and its renderer), one line in the registry's tuple, its tests
and its docs; nothing else changes. ``tests/unit/probes/test_registry.py`` checks that each kind
in the registry spells out every part in its ``KIND = ProbeKind(...)`` and that every result field
it names exists in its ``result_type`` (a misspelt name would otherwise show as "-" forever).

This module sits below the kinds and above nothing of theirs: the renderer and the callables are
given to it, it imports none of them (and nothing above ``edgeprobe.probes``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

from edgeprobe.probes.context import ProbeContext, Step
from edgeprobe.schema import Observation

C = TypeVar("C")
R = TypeVar("R")

REDACTED: Final = "REDACTED"  # what a hidden credential becomes in what is stored (display_target)


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One number of a kind's result as a view shows it."""

    field: str  # a field of the kind's result_type, in ms
    label: str  # what the number is, in a few words ("rtt p50", "time to first token")


@dataclass(frozen=True, kw_only=True)
class PolicyCost:
    """What one run with a given config costs against an agent's ad-hoc policy (agent/policy.py)."""

    packets: int  # checked against policy.max_packets_per_request (echoes, connection attempts …)
    tokens: int = 0  # model tokens at most, charged to policy.inference_tokens_per_hour


@dataclass(frozen=True, kw_only=True)
class SubPoint:
    """One more InfluxDB point an observation makes besides its own (the trace's one per hop),
    written to ``<measurement>_<suffix>`` with the observation's tags plus ``tags``."""

    suffix: str  # "hop": edgeprobe_trace_hop
    tags: Mapping[str, str]  # of low cardinality (a hop's TTL)
    fields: Mapping[str, Any]  # scalars; None left out


@dataclass(frozen=True, kw_only=True)
class Privilege:
    """Something the agent's host must grant before the kind can run (e.g. an ICMP socket)."""

    status_field: str  # the edgeprobe.schema.Status field in which an agent reports whether it has it
    missing_note: str  # how a listing marks an agent without it: "<kind>(<missing_note>)"


@dataclass(frozen=True, kw_only=True)
class LiveView:
    """How the CLI shows a run as it happens (the kind reports :class:`Step` s to
    ``ProbeContext.progress``). Pure functions."""

    step: Callable[[Step], str]  # one line per step; the start (``seq`` None) is the header line
    summary: Callable[[Observation], list[str]]  # the lines after the steps (the statistics)
    one_line: Callable[[Observation], str]  # the whole run in one line (several targets at once)


def plain_lines(obs: Observation) -> list[str]:
    """The generic human view: every field as ``name: value`` (pure)."""
    return [f"{k}: {v}" for k, v in obs.fields.items()]


def one_request(config: Any) -> PolicyCost:
    """The generic policy cost: one packet, no tokens."""
    return PolicyCost(packets=1)


@dataclass(frozen=True, kw_only=True)
class ProbeKind(Generic[C, R]):
    # Running it.
    name: str
    description: str
    config_type: type[C]  # msgspec.Struct with forbid_unknown_fields; its defaults are the defaults
    result_type: type[R]  # msgspec.Struct; its field names are the CLI --json, MQTT and InfluxDB names
    run: Callable[[str, C, ProbeContext], Awaitable[R]]
    check_target: Callable[[str], str | None]  # None when fine, else what is wrong with it
    # The longest one run may take with this config, its own timeouts included. The handler's hard
    # limit is this plus HANDLER_GRACE_S, so a probe's own typed timeout fires first.
    max_run_s: Callable[[C], float]
    # Storing it.
    tag_fields: tuple[str, ...] = ()  # result fields of low cardinality stored as InfluxDB tags
    # The target as observations store and publish it (pure), e.g. with credentials in a URL's query
    # replaced; the run itself gets the target as given. None: stored as given.
    display_target: Callable[[str], str] | None = None
    # Showing it.
    target_label: Literal["target", "url"] = "target"  # the target's name in the CLI's --json object
    # The human view of one observation: lines, from fields that may be partial or absent (a failed
    # run); pure. The generic frame (the error line) is added by edgeprobe.render.
    render: Callable[[Observation], list[str]] = plain_lines
    headline: Figure | None = None  # the latency a one-line live view shows (the demo)
    jitter: Figure | None = None  # the variation a one-line live view shows next to it
    fleet_field: str | None = None  # the number `edgeprobe fleet probe` shows per agent and summarises
    live: LiveView | None = None  # the CLI's live view; None: the kind reports no steps (shown at the end)
    aliases: tuple[str, ...] = ()  # other names for the kind (the CLI command's), unique across kinds
    # Judging it.
    floor_field: str | None = None  # the smallest measured round trip, compared with the physical floor
    # Round trips a fresh request needs before the first byte of its answer, from the target and the
    # result fields (pure): the physics gives floor_ttft_ms = this × floor_rtt_ms. None: not computed.
    first_byte_round_trips: Callable[[str, Mapping[str, Any]], int] | None = None
    policy_cost: Callable[[C], PolicyCost] = one_request  # what one ad-hoc run with this config is charged
    # The names of the environment variables a run with this config reads (an API key's, say), pure.
    # An agent refuses a remote request naming one its policy does not allow. None: it reads none.
    env_vars: Callable[[C], tuple[str, ...]] | None = None
    privilege: Privilege | None = None  # what the agent's host must grant; None: nothing beyond the network
    # Points an observation makes besides its own, from its result fields (pure; the collector
    # writes them). None: only its own point.
    sub_points: Callable[[Mapping[str, Any]], list[SubPoint]] | None = None
    # Work too heavy for the event loop that the kind needs done once per process before its first
    # run (the trace kind's scapy import: ~0.5 s of CPU). Idempotent; run in a worker thread by
    # :func:`edgeprobe.probes.handler.prepare_kinds`, before the run's clock starts (the agent
    # prepares its jobs' kinds before its scheduler starts). None: nothing to prepare.
    prepare: Callable[[], None] | None = None

    @property
    def measurement(self) -> str:
        return f"edgeprobe_{self.name}"

    def shown_target(self, target: str) -> str:
        """``target`` as observations store it (see ``display_target``)."""
        return target if self.display_target is None else self.display_target(target)

    def reads_env(self, config: C) -> tuple[str, ...]:
        """The environment variables a run with ``config`` reads (see ``env_vars``)."""
        return () if self.env_vars is None else self.env_vars(config)


AnyKind = ProbeKind[Any, Any]
