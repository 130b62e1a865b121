"""Stand-in probe kinds for tests (no network): a kind around a run coroutine, with an empty config
and a result of one field. Each gets a unique name unless given one: a kind's ``prepare`` runs
once per process per name (edgeprobe.probes.handler)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec

from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import ProbeKind


class EmptyConfig(msgspec.Struct, frozen=True):
    pass


class OkResult(msgspec.Struct):
    ok: bool = True


async def answer_ok(target: str, config: EmptyConfig, ctx: ProbeContext) -> OkResult:
    return OkResult()


def stand_in_kind(
    run: Callable[[str, EmptyConfig, ProbeContext], Awaitable[OkResult]] = answer_ok,
    *,
    prepare: Callable[[], None] | None = None,
    name: str | None = None,
) -> ProbeKind[EmptyConfig, OkResult]:
    return ProbeKind(
        name=name or f"stand-in-{uuid.uuid4().hex[:8]}",
        description="no network",
        config_type=EmptyConfig,
        result_type=OkResult,
        run=run,
        check_target=lambda t: None,
        max_run_s=lambda c: 1.0,
        prepare=prepare,
    )


def hold_interpreter(seconds: float) -> None:
    """Spend ``seconds`` of CPU in bytecode, not a sleep: the GIL is held the way an import holds it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
