"""The sample configs that `edgeprobe init` writes stay complete and true.

Complete: every option of the config structs (walked recursively, each probe kind's options
included) appears in the sample, set or commented, with a word of why. True: the sample loads
with the real loaders, so does the sample with every commented option uncommented, and every
commented ``# key: value`` equals the struct's default (an option set to something else says what
its default is).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from edgeprobe.agent.config import AgentConfig, JobConfig, load_agent_config
from edgeprobe.collector.config import CollectorConfig, load_collector_config
from edgeprobe.probes.registry import KINDS

# A commented option: "# key: value" (or "# - key: value", a list item) with the "#" where the
# key's indentation begins. Prose comments never look like that (else they would uncomment into
# unknown keys, which the loaders reject).
COMMENTED = re.compile(r"^(?P<indent> *)# (?P<rest> *(?:- )?[a-z_][a-z0-9_]*:(?: .*)?)$")


def sample(name: str) -> str:
    return (files("edgeprobe") / "examples" / name).read_text(encoding="utf-8")


def uncomment(text: str) -> tuple[str, set[int]]:
    """The text with every commented option uncommented, and the (0-based) lines that were."""
    out: list[str] = []
    lines: set[int] = set()
    for i, line in enumerate(text.splitlines()):
        m = COMMENTED.match(line)
        if m:
            out.append(m["indent"] + m["rest"])
            lines.add(i)
        else:
            out.append(line)
    return "\n".join(out) + "\n", lines


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _inner(tp: Any) -> Iterator[tuple[type[msgspec.Struct], str]]:
    """The struct types inside a field's type, with the path suffix to reach them ("[]": a list item)."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if _is_struct(tp):
        yield tp, ""
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            yield from _inner(arg)
    elif origin in (list, tuple):
        for cls, suffix in _inner(typing.get_args(tp)[0]):
            yield cls, "[]" + suffix


def _options_path(path: str, kind: str) -> str:
    return f"{path}<{kind}>"


def expected_paths(cls: type[msgspec.Struct], path: str = "") -> set[str]:
    """Every option of ``cls``, recursively, as dotted paths (``jobs[].options<icmp>.count``)."""
    paths: set[str] = set()
    for f in msgspec.structs.fields(cls):
        here = f"{path}.{f.encode_name}" if path else f.encode_name
        paths.add(here)
        for inner, suffix in _inner(f.type):
            paths |= expected_paths(inner, here + suffix)
        if cls is JobConfig and f.name == "options":
            for kind in KINDS.values():
                paths |= expected_paths(kind.config_type, _options_path(here, kind.name))
    return paths


@dataclass
class Option:
    path: str
    field: msgspec.structs.FieldInfo
    line: int  # 0-based, of the key
    value: Any
    section: bool  # its value holds structs (or a kind's options), walked into
    why: bool  # a comment on its line, or a comment line just above


def _has_default(f: msgspec.structs.FieldInfo) -> bool:
    return f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT


def _plain(value: Any) -> Any:
    """As it would read in YAML: tuples are lists."""
    return msgspec.json.decode(msgspec.json.encode(value))


def _default(f: msgspec.structs.FieldInfo) -> Any:
    return _plain(f.default_factory() if f.default is msgspec.NODEFAULT else f.default)


def walk(text: str, root: type[msgspec.Struct]) -> list[Option]:
    """Every struct option set in ``text`` (YAML), found by walking its nodes along the structs."""
    lines = text.splitlines()
    found: list[Option] = []

    def why(key: yaml.Node, value: yaml.Node) -> bool:
        line = key.start_mark.line
        if value.start_mark.line == line:
            rest = lines[line][value.end_mark.column :] if value.end_mark.line == line else ""
        else:
            rest = lines[line][key.end_mark.column :]
        above = lines[line - 1].strip() if line > 0 else ""
        return "#" in rest or above.startswith("#")

    def visit(node: yaml.Node, tp: Any, path: str) -> None:
        structs = list(_inner(tp))
        if isinstance(node, yaml.SequenceNode):
            for item_type, suffix in structs:
                if suffix.startswith("[]"):
                    for item in node.value:
                        visit(item, item_type, path + "[]")
                    return
            return
        if not isinstance(node, yaml.MappingNode):
            return
        cls = next((c for c, suffix in structs if suffix == ""), None)
        if cls is None:
            return
        fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
        for key, value in node.value:
            assert key.value in fields, f"{path or '(top level)'}: {key.value!r} is no option of {cls.__name__}"
            f = fields[key.value]
            here = f"{path}.{key.value}" if path else key.value
            section = bool(list(_inner(f.type))) and isinstance(value, yaml.MappingNode | yaml.SequenceNode)
            if cls is JobConfig and f.name == "options":
                kind = next(v.value for k, v in node.value if k.value == "kind")
                visit(value, KINDS[kind].config_type, _options_path(here, kind))
                section = True
            else:
                visit(value, f.type, here)
            found.append(
                Option(here, f, key.start_mark.line, yaml.safe_load(yaml.serialize(value)), section, why(key, value))
            )

    document = yaml.compose(text, Loader=yaml.SafeLoader)
    assert document is not None
    visit(document, root, "")
    return found


ROOTS: dict[str, type[msgspec.Struct]] = {"agent.yaml": AgentConfig, "collector.yaml": CollectorConfig}
LOADERS: dict[str, Callable[[Path], Any]] = {
    "agent.yaml": lambda p: load_agent_config(p, environ={}),
    "collector.yaml": lambda p: load_collector_config(p, environ={}),
}


@pytest.fixture(params=sorted(ROOTS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_sample_loads_as_shipped_and_with_every_option_uncommented(name: str, tmp_path: Path) -> None:
    text = sample(name)
    full, commented = uncomment(text)
    assert len(commented) > 20, "the sample lists its options as commented `# key: value` lines"
    for label, body in (("as shipped", text), ("uncommented", full)):
        path = tmp_path / f"{label}-{name}"
        path.write_text(body, encoding="utf-8")
        LOADERS[name](path)  # a ConfigError here names the file, the key and what was expected


def test_every_option_appears_with_a_reason(name: str) -> None:
    full, _ = uncomment(sample(name))
    options = walk(full, ROOTS[name])
    present = {o.path for o in options}
    missing = expected_paths(ROOTS[name]) - present
    assert not missing, f"{name}: options missing from the sample: {sorted(missing)}"
    kinds = {m for p in present if (m := re.search(r"options<(\w+)>", p))}
    if name == "agent.yaml":
        assert {m.group(1) for m in kinds} == set(KINDS), "a job of every probe kind"
    explained = {o.path for o in options if o.why or o.section}
    unexplained = sorted(present - explained)
    assert not unexplained, f"{name}: options without a comment saying why: {unexplained}"


def test_written_defaults_are_the_struct_defaults(name: str) -> None:
    full, commented = uncomment(sample(name))
    lines = full.splitlines()
    options = [o for o in walk(full, ROOTS[name]) if not o.section and _has_default(o.field)]
    # An option set to something else must say its default once: on one of its lines, or as a
    # commented default elsewhere (e.g. in another job).
    told = {o.path for o in options if o.line in commented or "default" in lines[o.line]}
    wrong: list[str] = []
    for o in options:
        default = _default(o.field)
        if o.line in commented:
            if o.value != default or isinstance(o.value, bool) != isinstance(default, bool):
                wrong.append(f"line {o.line + 1}: {o.path}: sample says {o.value!r}, the default is {default!r}")
        elif o.value != default and o.path not in told:
            wrong.append(f"line {o.line + 1}: {o.path} is set to {o.value!r}: say that the default is {default!r}")
    assert not wrong, f"{name}:\n" + "\n".join(wrong)


def test_every_commented_option_is_where_a_key_can_be() -> None:
    """A commented key that is no option would surface as an unknown key when uncommented: the
    loaders reject those, so the uncommented samples loading (above) covers it. Here: the pattern."""
    full, lines = uncomment("a: 1\n# b: 2\n  # - c: {}\n# Prose: not a key\n# note that: prose\n")
    assert full == "a: 1\nb: 2\n  - c: {}\n# Prose: not a key\n# note that: prose\n"
    assert lines == {1, 2}
