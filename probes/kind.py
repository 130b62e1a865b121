"""What every probe kind declares. The list of kinds lives in :mod:`edgeprobe.probes.registry` only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgeprobe.probes.context import ProbeContext

C = TypeVar("C")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class ProbeKind(Generic[C, R]):
    name: str
    description: str
    config_type: type[C]  # msgspec.Struct with forbid_unknown_fields; its defaults are the defaults
    result_type: type[R]  # msgspec.Struct; its field names are the CLI --json, MQTT and InfluxDB names
    run: Callable[[str, C, ProbeContext], Awaitable[R]]
    check_target: Callable[[str], str | None]  # None when fine, else what is wrong with it
    # The longest one run may take with this config, its own timeouts included. The handler's hard
    # limit is this plus HANDLER_GRACE_S, so a probe's own typed timeout fires first.
    max_run_s: Callable[[C], float]
    tag_fields: tuple[str, ...] = ()  # result fields of low cardinality stored as InfluxDB tags

    @property
    def measurement(self) -> str:
        return f"edgeprobe_{self.name}"


AnyKind = ProbeKind[Any, Any]
