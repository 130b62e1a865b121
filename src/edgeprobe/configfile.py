"""Loading YAML config files into typed, validated structs, with errors a person can act on.

Every error names the file, the key (as a dotted path like ``jobs[0].options.count``) and what
was expected. Unknown keys are rejected (config structs use ``forbid_unknown_fields``). Secrets
are held in :class:`Secret`, whose ``repr``/``str``/format never show the value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec
import yaml

from edgeprobe.termtext import term_safe

T = TypeVar("T")


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The daemons' own logging (``log:`` in agent.yaml and collector.yaml)."""

    # One INFO line this often (monotonic seconds) with what happened in the interval; 0: off.
    summary_interval_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 60.0


class ConfigError(ValueError):
    """A config problem, already phrased for the user: ``<file>: <key>: <what was expected>``."""


class Secret:
    """A credential. Formatting it never reveals it; call :meth:`reveal` where it is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Secret:
        if not isinstance(obj, str):
            raise msgspec.ValidationError(f"Expected `str`, got `{type(obj).__name__}`")
        return Secret(obj)
    raise NotImplementedError(f"unsupported config type {typ!r}")


_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<key>[^`]*)`$")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _struct_at(root: type, path: str) -> Any:
    """Walk ``root`` along a msgspec error path (``.jobs[0].options``) to the struct type there."""
    info: msgspec.inspect.Type = msgspec.inspect.type_info(root)
    for token in re.findall(r"\.([A-Za-z0-9_]+)|\[(\d+)\]", path):
        name, index = token
        while isinstance(info, msgspec.inspect.UnionType):
            structs = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(structs) != 1:
                return None
            info = structs[0]
        if name and isinstance(info, msgspec.inspect.StructType):
            match = [f for f in info.fields if f.encode_name == name]
            if not match:
                return None
            info = match[0].type
        elif name and isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        elif index and isinstance(info, msgspec.inspect.ListType | msgspec.inspect.VarTupleType):
            info = info.item_type
        else:
            return None
    while isinstance(info, msgspec.inspect.UnionType):
        structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        if len(structs) != 1:
            return None
        info = structs[0]
    return info.cls if isinstance(info, msgspec.inspect.StructType) else None


def explain(err: msgspec.ValidationError, root: type, source: str, prefix: str = "") -> ConfigError:
    """Rephrase a msgspec validation error as ``<source>: <key>: <expectation>``."""
    text = str(err)
    m = _PATH_RE.search(text)
    path = m.group("path") if m else ""
    body = text[: m.start()] if m else text
    shown = (prefix + path).lstrip(".")
    if um := _UNKNOWN_RE.match(body):
        key = um.group("key")
        cls = _struct_at(root, path)
        allowed = ", ".join(sorted(cls.__struct_fields__)) if cls is not None else "?"
        return ConfigError(f"{source}: {_join(shown, key)}: unknown key; expected one of: {allowed}")
    if mm := _MISSING_RE.match(body):
        return ConfigError(f"{source}: {_join(shown, mm.group('key'))}: required key is missing")
    # __post_init__ checks phrase their errors as "<key>: <problem>": attach the key to the path.
    if km := re.match(r"^([a-z_][a-z0-9_]*): (.+)$", body, re.DOTALL):
        cls = _struct_at(root, path)
        if cls is not None and km.group(1) in cls.__struct_fields__:
            shown, body = _join(shown, km.group(1)), km.group(2)
    for msgspec_name, ours in (("`array`", "a list"), ("`object`", "a mapping"), ("`str`", "a string")):
        body = body.replace(msgspec_name, ours)
    body = body[:1].lower() + body[1:]
    return ConfigError(f"{source}: {shown or '(top level)'}: {body}")


def convert(data: Any, typ: type[T], source: str, prefix: str = "") -> T:
    """Validate plain data (from YAML, JSON or the CLI) into ``typ``, raising :class:`ConfigError`."""
    try:
        return msgspec.convert(data, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as err:
        raise explain(err, typ, source, prefix) from err


MAX_CONFIG_BYTES: Final = 1 << 20  # 1 MiB: a hand-written config is a few kB; a larger one is a mistake


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``).

    An alias makes the loader share one node many times: an 815-byte document of nested aliases
    expands to millions of entries ("billion laughs") once something walks it. Nothing in an
    edgeprobe config needs them, so they are refused while composing, before anything expands.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in edgeprobe config files", event.start_mark
            )
        return super().compose_node(parent, index)


def read_config_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a config file: a regular file of at most ``max_bytes``, else :class:`ConfigError`.

    Opened without blocking and checked with ``fstat`` before reading, so a FIFO, a device such
    as ``/dev/zero`` or a directory is refused at once instead of hanging or reading without end.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror or err}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{p}: not a regular file; a config must be a plain file")
        if st.st_size > max_bytes:
            raise ConfigError(f"{p}: {st.st_size} bytes; a config file may have at most {max_bytes} bytes")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while we read it
        raise ConfigError(f"{p}: more than {max_bytes} bytes; a config file may have at most {max_bytes} bytes")
    return data


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """A config file's top-level mapping (see :func:`read_config_bytes` for what is refused)."""
    p = Path(path)
    raw = read_config_bytes(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text: {err.reason} at byte {err.start}") from err
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: (top level): expected a mapping of keys, got {type(data).__name__}")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating the intermediate mappings."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(child).__name__}")
        node = child
    node[keys[-1]] = value


def apply_env(data: dict[str, Any], mapping: Mapping[str, str], environ: Mapping[str, str]) -> list[str]:
    """Override config keys from environment variables (``{"EDGEPROBE_X": "broker.url"}``).

    Returns the names of the variables that were applied (never their values).
    """
    applied = []
    for var, dotted in mapping.items():
        if var in environ:
            set_path(data, dotted, environ[var])
            applied.append(var)
    return applied


def load(
    path: str | os.PathLike[str],
    typ: type[T],
    env_map: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    data = read_yaml(path)
    if env_map:
        apply_env(data, env_map, os.environ if environ is None else environ)
    return convert(data, typ, str(path))


def changed_keys(old: msgspec.Struct, new: msgspec.Struct, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs of one type (pure), e.g.
    ``["broker.url", "jobs", "log.summary_interval_s"]``: a nested struct is compared key by key,
    anything else (lists, mappings, scalars) as a whole. A :class:`Secret` compares by its value
    (never shown). For a reload (SIGHUP): what changed, and whether all of it can change live."""
    keys: list[str] = []
    for name in type(old).__struct_fields__:
        a, b = getattr(old, name), getattr(new, name)
        key = _join(prefix, name)
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            keys.extend(changed_keys(a, b, key))
        elif _plain(a) != _plain(b):
            keys.append(key)
    return keys


def _plain(value: Any) -> Any:
    return value.reveal() if isinstance(value, Secret) else value


def needs_restart(changed: list[str], live: tuple[str, ...]) -> list[str]:
    """Those of ``changed`` (dotted keys) that are not in ``live`` nor under one of its keys (pure)."""
    return [k for k in changed if not any(k == p or k.startswith(p + ".") or k.startswith(p + "[") for p in live)]


def value_at(config: msgspec.Struct, dotted: str) -> Any:
    """The value of a dotted key of :func:`changed_keys` (no list indexes) in ``config``."""
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def describe_changes(old: msgspec.Struct, new: msgspec.Struct, keys: list[str], max_chars: int = 80) -> str:
    """``"limits.max_message_bytes 1048576 → 4096, health_interval_s null → 0.5"`` for a log line:
    each value clipped, terminal-safe, a :class:`Secret` never shown (pure)."""

    def shown(value: Any) -> str:
        if isinstance(value, Secret):
            return "***"
        if value is None:
            return "null"
        if isinstance(value, float):
            return f"{value:g}"
        return term_safe(value if isinstance(value, str) else repr(value), max_chars)

    return ", ".join(f"{k} {shown(value_at(old, k))} → {shown(value_at(new, k))}" for k in keys)
