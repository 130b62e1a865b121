"""Human and JSON renderings of one observation for the CLI (pure: observation in, text out).

Every line is terminal-safe: control characters and escape sequences from a server or a target are
escaped (:mod:`edgeprobe.termtext`).

What a kind's fields mean on screen is part of the kind (``ProbeKind.render``, next to its
``KIND``); this module adds the frame every kind shares: the ``--json`` object and the error line.
"""

from __future__ import annotations

from typing import Any

from edgeprobe.probes.kind import plain_lines
from edgeprobe.probes.outcome import Outcome
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation
from edgeprobe.termtext import term_safe

MAX_LINE_CHARS = 4096


def as_json_obj(obs: Observation) -> dict[str, Any]:
    """The CLI's ``--json`` object: the kind's fields plus target, outcome and timing."""
    kind = KINDS.get(obs.kind)
    out: dict[str, Any] = {kind.target_label if kind is not None else "target": obs.target}
    out.update(obs.fields)
    out["outcome"] = obs.outcome
    out["reason"] = obs.reason
    out["started_at_ns"] = obs.started_at_ns
    out["duration_ms"] = obs.duration_ms
    return out


def error_line(obs: Observation, command: str | None = None) -> str | None:
    """The one-line error for a failed run, or None when it succeeded. It names ``command`` (the
    one the user typed: ``ping`` for an icmp run) or else the kind."""
    if obs.outcome == Outcome.OK:
        return None
    return term_safe(
        f"edgeprobe {command or obs.kind} {obs.target}: {obs.outcome}: {obs.reason or 'no reason given'}",
        MAX_LINE_CHARS,
    )


def render(obs: Observation, command: str | None = None) -> list[str]:
    """The kind's own lines (every field as ``name: value`` for a kind this build does not know),
    then the error line of a failed run. Terminal-safe (:func:`edgeprobe.termtext.term_safe`): the
    target, a server's reason or headers are not this program's text."""
    kind = KINDS.get(obs.kind)
    lines = [term_safe(line, MAX_LINE_CHARS) for line in (kind.render(obs) if kind is not None else plain_lines(obs))]
    err = error_line(obs, command)
    if err:
        lines.append(err)
    return lines
