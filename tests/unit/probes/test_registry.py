"""The registry is the only list of kinds, and each kind declares everything it means.

A new kind cannot forget a part of its definition (its ``KIND = ProbeKind(...)`` must spell out
every field of ProbeKind, even as None) nor misspell a result field it names (checked here
against its result_type).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import types
import typing
from typing import Any

import msgspec
import pytest

from edgeprobe.probes.kind import AnyKind, Figure, PolicyCost, ProbeKind
from edgeprobe.probes.registry import KINDS, get_kind
from edgeprobe.schema import Observation, Status


def result_fields(kind: AnyKind) -> dict[str, Any]:
    """The result type's field names with their annotated types (resolved)."""
    hints = typing.get_type_hints(kind.result_type)
    return {f.name: hints[f.name] for f in msgspec.structs.fields(kind.result_type)}


def is_number(annotation: Any) -> bool:
    """float, int or an optional one (bool excluded)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return any(a in (float, int) for a in args) and all(a in (float, int, type(None)) for a in args)


def named_fields(kind: AnyKind) -> dict[str, str]:
    """Every result field the kind names outside its renderer: what it is used for -> field."""
    named: dict[str, str] = {}
    for use, figure in (("headline", kind.headline), ("jitter", kind.jitter)):
        if figure is not None:
            named[use] = figure.field
    for use in ("fleet_field", "floor_field"):
        if (field := getattr(kind, use)) is not None:
            named[use] = field
    return named


def declared_parts(kind: AnyKind) -> set[str]:
    """The keywords given to ``ProbeKind(...)`` where the kind's module assigns its ``KIND``."""
    # Only the package's modules: a test module may hold a KIND of its own (KIND = KINDS["dns"]).
    modules = [
        m
        for m in list(sys.modules.values())
        if getattr(m, "__name__", "").startswith("edgeprobe.") and getattr(m, "KIND", None) is kind
    ]
    assert len(modules) == 1, f"{kind.name}: expected one module defining KIND, found {modules}"
    for node in ast.parse(inspect.getsource(modules[0])).body:
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "KIND" and isinstance(value, ast.Call):
            names = [kw.arg for kw in value.keywords]
            assert None not in names, f"{kind.name}: KIND = ProbeKind(**...) hides which parts it declares"
            return {n for n in names if n is not None}
    raise AssertionError(f"{kind.name}: no `KIND = ProbeKind(...)` in {modules[0].__name__}")


KIND_IDS = sorted(KINDS)


def test_the_registry_is_keyed_by_each_kind_s_own_name() -> None:
    assert KINDS, "no kinds registered"
    for name, kind in KINDS.items():
        assert kind.name == name
        assert get_kind(name) is kind
    assert len({k.measurement for k in KINDS.values()}) == len(KINDS)


@pytest.mark.parametrize("name", KIND_IDS)
def test_every_kind_declares_every_part(name: str) -> None:
    """Defaults exist for stand-in kinds in tests; a registered kind says what it means, None included."""
    parts = {f.name for f in dataclasses.fields(ProbeKind)}
    missing = parts - declared_parts(KINDS[name])
    assert not missing, f"{name}: KIND leaves out {sorted(missing)} (declare them, None if the kind has none)"
    kind = KINDS[name]
    assert kind.headline is not None and kind.fleet_field is not None, f"{name}: a kind has a headline number"


@pytest.mark.parametrize("name", KIND_IDS)
def test_every_field_a_kind_names_exists_in_its_result(name: str) -> None:
    kind = KINDS[name]
    fields = result_fields(kind)
    for use, field in named_fields(kind).items():
        assert field in fields, f"{name}.{use} names {field!r}, not a field of {kind.result_type.__name__}"
        assert field.endswith("_ms"), f"{name}.{use}: {field!r} is not in milliseconds (no _ms)"
        assert is_number(fields[field]), f"{name}.{use}: {field!r} is {fields[field]}, not a number"
    for tag in kind.tag_fields:
        assert tag in fields, f"{name}.tag_fields names {tag!r}, not a field of {kind.result_type.__name__}"


@pytest.mark.parametrize("name", KIND_IDS)
def test_presentation_parts_are_well_formed(name: str) -> None:
    kind = KINDS[name]
    assert kind.target_label in ("target", "url")
    assert isinstance(kind.headline, Figure) and kind.headline.label
    assert kind.jitter is None or (isinstance(kind.jitter, Figure) and kind.jitter.label)
    if kind.privilege is not None:
        status_fields = {f.name for f in msgspec.structs.fields(Status)}
        assert kind.privilege.status_field in status_fields, (
            f"{name}.privilege.status_field {kind.privilege.status_field!r} is not a field of Status"
        )
        assert kind.privilege.missing_note


@pytest.mark.parametrize("name", KIND_IDS)
def test_the_renderer_copes_with_a_run_that_measured_nothing(name: str) -> None:
    """A failed run may carry no fields at all; the kind's view still says what was tried."""
    obs = Observation(
        id="x", seq=0, kind=name, target="t", started_at_ns=1, duration_ms=1.0, outcome="timeout", reason="r"
    )
    lines = KINDS[name].render(obs)
    assert lines and all(isinstance(line, str) for line in lines)


def _config(kind: AnyKind, **given: Any) -> Any:
    """The kind's config from ``given`` plus placeholders for its required options."""
    required = {f.name: "m" for f in msgspec.structs.fields(kind.config_type) if f.required}
    return msgspec.convert({**required, **given}, kind.config_type)


@pytest.mark.parametrize("name", KIND_IDS)
def test_policy_cost_of_the_default_config(name: str) -> None:
    cost = KINDS[name].policy_cost(_config(KINDS[name]))
    assert isinstance(cost, PolicyCost)
    assert cost.packets >= 1 and cost.tokens >= 0


def test_policy_costs_follow_the_config() -> None:
    """What agent/policy.py charged before the kinds declared it: ``count`` packets, else 1;
    ``max_tokens`` tokens for inference."""
    assert get_kind("icmp").policy_cost(_config(get_kind("icmp"), count=7)) == PolicyCost(packets=7)
    assert get_kind("tcp").policy_cost(_config(get_kind("tcp"), count=4)) == PolicyCost(packets=4)
    assert get_kind("http").policy_cost(_config(get_kind("http"))) == PolicyCost(packets=1)
    inference = get_kind("inference")
    assert inference.policy_cost(_config(inference, max_tokens=9)) == PolicyCost(packets=1, tokens=9)


def test_target_labels_and_round_trips() -> None:
    assert {n: k.target_label for n, k in KINDS.items()} == {
        "icmp": "target",
        "tcp": "target",
        "http": "url",
        "inference": "url",
        "dns": "target",
        "trace": "target",
    }
    trips = get_kind("inference").first_byte_round_trips
    assert trips is not None
    assert trips("https://x/", {"tls_version": "TLSv1.3"}) == 3
    assert trips("https://x/", {"tls_version": "TLSv1.2"}) == 4
    assert trips("http://x/", {}) == 2
    assert trips("https://x/", {"connection": "reused"}) == 1
