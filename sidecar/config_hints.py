"""Configuration errors that say what to do: which setting or environment variable, the closest
known name for a typo, the accepted values of an enum.

Pure functions over the config Structs' type information (``msgspec.inspect``), no I/O;
``sidecar.config`` calls them when it overlays the environment and when msgspec rejects a tree.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import cache

import msgspec
from msgspec import inspect as mi

ENV_PREFIX = "SIDECAR_"

#: One step of a path into the config tree: a key of a table, or an index into a list.
Step = str | int

_AT = re.compile(r"^(?P<what>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_STEP = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
#: Appended to errors about names: where to find the right one.
LIST_HINT = " (`sidecar config` lists every setting and its environment variable)"
_ENUM = re.compile(r"^Invalid enum value (?P<value>.+)$")


def env_name(path: Sequence[Step]) -> str:
    """``["rollout", "canary_share_bp"]`` -> ``SIDECAR_ROLLOUT__CANARY_SHARE_BP``."""
    return ENV_PREFIX + "__".join(str(p).upper() for p in path)


def dotted(path: Sequence[Step]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def _structs(t: mi.Type) -> list[mi.StructType]:
    """The Struct types a value of type ``t`` may be (through ``X | None`` unions)."""
    if isinstance(t, mi.StructType):
        return [t]
    if isinstance(t, mi.UnionType):
        return [s for x in t.types for s in _structs(x)]
    return []


def _fields(struct: mi.StructType) -> dict[str, mi.Type]:
    return {f.name: f.type for f in struct.fields}


@cache
def _info(root: type[msgspec.Struct]) -> mi.StructType:
    info = mi.type_info(root)
    assert isinstance(info, mi.StructType)
    return info


def type_at(root: type[msgspec.Struct], path: Sequence[Step]) -> mi.Type | None:
    """The declared type at ``path`` (None when the path leaves the declared settings)."""
    t: mi.Type = _info(root)
    for step in path:
        if isinstance(step, int):
            if isinstance(t, mi.UnionType):
                t = next((x for x in t.types if isinstance(x, mi.ListType)), t)
            if not isinstance(t, mi.ListType):
                return None
            t = t.item_type
            continue
        structs = _structs(t)
        if not structs:
            return None
        found = _fields(structs[0]).get(step)
        if found is None:
            return None
        t = found
    return t


def _leaves(t: mi.Type, prefix: list[str]) -> Iterator[list[str]]:
    structs = _structs(t)
    if not structs:
        yield prefix
        return
    if prefix and isinstance(t, mi.UnionType):
        yield prefix  # an optional table can be set whole (JSON) as well as field by field
    for name, inner in _fields(structs[0]).items():
        yield from _leaves(inner, [*prefix, name])


@cache
def setting_paths(root: type[msgspec.Struct]) -> tuple[str, ...]:
    """Every settable dotted path, optional tables included (``models.candidate.timeout_ms``)."""
    return tuple(".".join(p) for p in _leaves(_info(root), []))


def closest(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The choice most like ``word`` (difflib), if any is alike enough."""
    found = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return found[0] if found else None


def check_env_path(root: type[msgspec.Struct], var: str, path: Sequence[str]) -> str | None:
    """Why ``var`` (split into ``path``) names no setting, with the closest variable that does;
    None when it is a setting (or lies inside a free-form table such as ``options``)."""
    t: mi.Type = _info(root)
    for i, step in enumerate(path):
        if isinstance(t, mi.DictType | mi.AnyType):
            return None  # free-form table: any key is valid
        structs = _structs(t)
        inner = _fields(structs[0]).get(step) if structs else None
        if inner is None:
            where = dotted(path[: i + 1])
            if not structs:
                what = f"{dotted(path[:i])} is a single setting, not a table"
                hint: str | None = env_name(path[:i])
            else:
                what = f"`{where}` is not a setting"
                names = list(_fields(structs[0]))
                near = closest(step, names)
                known = [env_name(p.split(".")) for p in setting_paths(root)]
                hint = env_name([*path[:i], near]) if near else closest(var, known, cutoff=0.85)
                if hint is None:
                    what += f" (settings of {dotted(path[:i])}: {', '.join(names)})"
            return (
                f"environment variable {var}: {what}"
                + (f"; did you mean {hint}?" if hint else "")
                + LIST_HINT
            )
        t = inner
    return None


def is_text_setting(root: type[msgspec.Struct], path: Sequence[str]) -> bool:
    """Whether ``path`` names a setting whose value is a string (an environment value for it
    is taken as it is, never as JSON: ``[::1]:9092`` is a broker, not a list)."""
    t: mi.Type = _info(root)
    for step in path:
        structs = _structs(t)
        inner = _fields(structs[0]).get(step) if structs else None
        if inner is None:
            return False
        t = inner
    return isinstance(t, mi.StrType)


def _parse_path(text: str) -> list[Step]:
    return [
        name if name else int(index) for name, index in (m.groups() for m in _STEP.finditer(text))
    ]


def _choices(t: mi.Type | None) -> list[str]:
    if isinstance(t, mi.LiteralType):
        return [repr(v) for v in t.values]
    if isinstance(t, mi.EnumType):
        return [repr(m.value) if isinstance(m, enum.Enum) else repr(m) for m in t.cls]
    if isinstance(t, mi.UnionType):
        return [c for x in t.types for c in _choices(x)]
    return []


def explain(
    root: type[msgspec.Struct],
    exc: msgspec.ValidationError,
    source: str,
    from_env: Mapping[tuple[str, ...], str],
) -> str:
    """A ConfigError message for msgspec's ``exc``: the setting as a dotted name, where the
    value came from (the file, or the environment variable that set it), and a hint."""
    message = str(exc)
    m = _AT.match(message)
    what, path = (m["what"], _parse_path(m["path"])) if m else (message, [])
    setting = path
    text = what
    if um := _UNKNOWN.match(what):
        field = um["field"]
        setting = [*path, field]
        structs = _structs(type_at(root, path) or mi.AnyType())
        names = list(_fields(structs[0])) if structs else []
        hint = closest(field, names)
        text = f"unknown setting `{dotted(setting)}`" + (
            f"; did you mean `{dotted([*path, hint])}`?" if hint else ""
        )
        if names and not hint:
            text += f" (known here: {', '.join(names)})"
    elif mm := _MISSING.match(what):
        setting = [*path, mm["field"]]
        text = f"missing required setting `{dotted(setting)}`"
    elif em := _ENUM.match(what):
        choices = _choices(type_at(root, path))
        text = f"`{dotted(path)}` = {em['value']} is not one of " + (
            ", ".join(choices) if choices else "the accepted values"
        )
    else:
        text = f"`{dotted(path)}`: {what}" if path else what
    var = _env_source(setting, from_env)
    if var is not None:
        return f"environment variable {var}: {text}"
    return f"{source}: {text}"


def _env_source(path: Sequence[Step], from_env: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set ``path`` or a table containing it."""
    keys = [p for p in path if isinstance(p, str)]
    for n in range(len(keys), 0, -1):
        var = from_env.get(tuple(keys[:n]))
        if var is not None:
            return var
    return None


__all__ = [
    "LIST_HINT",
    "check_env_path",
    "closest",
    "dotted",
    "env_name",
    "explain",
    "setting_paths",
    "type_at",
]
