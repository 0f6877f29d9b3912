"""Compatibility adapters: the current Decision, re-shaped into an older API version.

An adapter is compiled once, at start-up, from its declarative spec (``map``, ``rename``,
``drop``, ``defaults``) or from a callable. On the hot path a declarative adapter costs
about what the current version does: per batch, the prototype Decision the pipeline templates
from is adapted once (constants mapped, fields renamed and dropped, defaults added) and turned
into a ``%`` template of the old shape; per record only the varying values are formatted,
after one vectorised pass over the batch for a mapped score, bucket or time, and a
two-entry table for a mapped decision. Records that take the pipeline's general path
(fallbacks, metadata) are adapted from their encoded Decision, like a callable's.

Each version's JSON Schema is derived the same way from the Decision's (or, for a callable,
generated from the Struct it declares), so the shape on the wire and the published schema
cannot drift: a test validates every adapter's output against it.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import msgspec
import numpy as np

from ..contracts import Decision
from ..encoding import JSON_BOOL, json_numbers, template
from ..errors import ConfigError
from .settings import FieldMap, OutputVersion

#: Fields of a Decision that vary per record (the pipeline's template slots), in the order
#: they appear in the encoded Decision (and in the template's arguments).
SLOTS = ("request_id", "routing_key", "score", "decision", "bucket", "ts")
#: Slots formatted as JSON text rather than as string bodies.
RAW_SLOTS = frozenset({"score", "decision", "bucket", "ts"})
_NUMERIC_SLOTS = frozenset({"score", "bucket", "ts"})
_STRING_SLOTS = frozenset({"request_id", "routing_key"})
DECISION_FIELDS: tuple[str, ...] = Decision.__struct_fields__
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
_DECISION_DECODER = msgspec.json.Decoder(Decision)


def value_key(value: Any) -> str:
    """The text a ``values`` table is keyed by: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else _ENCODER.encode(value).decode()


def _import(ref: str, what: str) -> Any:
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{what} {ref!r} must look like 'package.module:name'")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} {ref!r} cannot be imported: {exc}") from exc
    return found


class CompiledMap:
    """One field's :class:`FieldMap`, ready to apply to a value or a batch of numbers."""

    def __init__(self, field: str, spec: FieldMap, where: str) -> None:
        self.field = field
        numeric = spec.scale is not None or spec.offset is not None or spec.round is not None
        if spec.values is None and not numeric:
            raise ConfigError(f"{where}: map.{field} needs values, or scale/offset/round")
        if spec.values is not None and numeric:
            raise ConfigError(f"{where}: map.{field} takes values or scale/offset/round, not both")
        if spec.other is not msgspec.UNSET and spec.values is None:
            raise ConfigError(f"{where}: map.{field}.other needs values")
        self.values = spec.values
        self.has_other = spec.other is not msgspec.UNSET
        self.other = None if spec.other is msgspec.UNSET else spec.other
        self.numeric = numeric
        self.scale = 1.0 if spec.scale is None else spec.scale
        self.offset = 0.0 if spec.offset is None else spec.offset
        self.round = spec.round
        for name, value in (("scale", self.scale), ("offset", self.offset)):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: map.{field}.{name} must be finite")

    def apply(self, value: Any) -> Any:
        if self.values is not None:
            key = value_key(value)
            if key in self.values:
                return self.values[key]
            return self.other if self.has_other else value
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return value
        out = value * self.scale + self.offset
        if self.round is None:
            return out
        return round(out) if self.round == 0 else round(out, self.round)

    def texts(self, values: np.ndarray) -> list[str]:
        """JSON text of the mapped value of each number (NaN stays null): one vectorised pass."""
        out = values.astype(np.float64) * self.scale + self.offset
        if self.round is None:
            return json_numbers(out.tolist())
        out = np.round(out, self.round)
        if self.round:
            return json_numbers(out.tolist())
        finite = np.isfinite(out)
        texts = json_numbers(np.where(finite, out, 0).astype(np.int64).tolist())
        if not finite.all():
            for i in np.flatnonzero(~finite).tolist():
                texts[i] = "null"
        return texts

    def bool_texts(self) -> tuple[str, str]:
        """JSON text of the mapped ``false`` and ``true``."""
        return (
            _ENCODER.encode(self.apply(False)).decode(),
            _ENCODER.encode(self.apply(True)).decode(),
        )


class Adapter:
    """A compiled adapter of one older API version; build with :func:`compile_adapter`."""

    version: str
    topic: str
    spec: OutputVersion
    #: True when the batch templates can be adapted (declarative adapters).
    templated: bool

    def adapt_dict(self, decision: dict[str, Any], *, slots: frozenset[str]) -> dict[str, Any]:
        raise NotImplementedError

    def adapt_bytes(self, encoded: bytes) -> bytes:
        """The old shape of one encoded Decision (the general path)."""
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The version's JSON Schema."""
        raise NotImplementedError


class DeclarativeAdapter(Adapter):
    """``map``, ``rename``, ``drop``, ``defaults``: compiled into templates per batch."""

    templated = True

    def __init__(self, spec: OutputVersion) -> None:
        where = f"outputs.versions[{spec.version}]"
        self.version, self.topic, self.spec = spec.version, spec.topic, spec
        known = set(DECISION_FIELDS)
        for what, names in (
            ("map", list(spec.map)),
            ("rename", list(spec.rename)),
            ("drop", spec.drop),
        ):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ConfigError(
                    f"{where}: {what} names {unknown}, which the Decision does not have "
                    f"(its fields: {', '.join(DECISION_FIELDS)})"
                )
        both = sorted(set(spec.drop) & (set(spec.rename) | set(spec.map)))
        if both:
            raise ConfigError(f"{where}: {both} both dropped and renamed or mapped")
        self.maps = {f: CompiledMap(f, m, where) for f, m in spec.map.items()}
        for field, m in self.maps.items():
            if field in _STRING_SLOTS:
                raise ConfigError(f"{where}: map.{field}: per-record strings are not mapped")
            if field in _NUMERIC_SLOTS and not m.numeric:
                raise ConfigError(f"{where}: map.{field} is a number: use scale/offset/round")
            if field == "decision" and m.numeric:
                raise ConfigError(f"{where}: map.decision is a boolean: use values")
        self.renamed = {f: spec.rename.get(f, f) for f in DECISION_FIELDS if f not in spec.drop}
        targets = list(self.renamed.values())
        clash = sorted({t for t in targets if targets.count(t) > 1})
        if clash:
            raise ConfigError(f"{where}: rename gives several fields the name(s) {clash}")
        self.defaults = dict(spec.defaults)
        self.dropped = frozenset(spec.drop)
        #: Slots the old shape keeps, for keyed and unkeyed records (template argument order).
        self.kept_slots = tuple(s for s in SLOTS if s not in self.dropped)

    def adapt_dict(self, decision: dict[str, Any], *, slots: frozenset[str] = frozenset()) -> Any:
        """``decision`` (a Decision as builtins, in field order) in the old shape; fields in
        ``slots`` hold template sentinels and are not mapped (the per-record pass does)."""
        out: dict[str, Any] = {}
        for field, value in decision.items():
            if field in self.dropped:
                continue
            m = self.maps.get(field)
            if m is not None and field not in slots:
                value = m.apply(value)
            out[self.renamed.get(field, field)] = value
        for field, value in self.defaults.items():
            if out.get(field) is None:
                out[field] = value
        return out

    def adapt_bytes(self, encoded: bytes) -> bytes:
        return _ENCODER.encode(self.adapt_dict(_DECODER.decode(encoded)))

    def batch_template(self, prototype: Decision, keyed: bool) -> tuple[str, Callable[..., Any]]:
        """The old shape's template for one batch prototype, and the function that picks its
        arguments out of the full ``(request_id, [routing_key,] score, decision, bucket,
        ts)`` tuple."""
        slots = SLOTS if keyed else tuple(s for s in SLOTS if s != "routing_key")
        adapted = self.adapt_dict(msgspec.to_builtins(prototype), slots=frozenset(slots))
        kept = tuple(s for s in slots if s in self.kept_slots)
        text = template(adapted, kept, RAW_SLOTS)
        return text, _picker([slots.index(s) for s in kept])

    def slot_texts(self, field: str, values: np.ndarray) -> list[str] | None:
        """JSON texts of a mapped numeric slot over the batch (None: not mapped)."""
        m = self.maps.get(field)
        return None if m is None else m.texts(values)

    def decision_texts(self) -> tuple[str, str]:
        m = self.maps.get("decision")
        return JSON_BOOL if m is None else m.bool_texts()

    def schema(self) -> dict[str, Any]:
        doc = msgspec.json.schema(Decision)
        base = doc["$defs"]["Decision"]
        props: dict[str, Any] = {}
        required = set(base.get("required", []))
        new_required: list[str] = []
        for field, prop in base["properties"].items():
            if field in self.dropped:
                continue
            m = self.maps.get(field)
            if m is not None:
                prop = _mapped_schema(prop, m)
            name = self.renamed.get(field, field)
            props[name] = prop
            if field in required:
                new_required.append(name)
        for field, value in self.defaults.items():
            if field in props:  # never null any more: the default fills it
                kept, added = _without_null(props[field]), _schema_of(value)
                props[field] = kept if kept == added else {"anyOf": [kept, added]}
            else:
                props[field] = _schema_of(value)
            if field not in new_required:
                new_required.append(field)
        title = f"Decision {self.version}"
        body = {
            "title": title,
            "description": f"Decision API version {self.version}: the current Decision "
            "through its compatibility adapter (map, rename, drop, defaults).",
            "type": "object",
            "properties": props,
            "required": sorted(new_required),
        }
        return {
            "$ref": f"#/$defs/{_def_name(self.version)}",
            "$defs": {_def_name(self.version): body},
        }


class CallableAdapter(Adapter):
    """A Python function of each Decision; its Struct type gives the schema."""

    templated = False

    def __init__(self, spec: OutputVersion) -> None:
        where = f"outputs.versions[{spec.version}]"
        self.version, self.topic, self.spec = spec.version, spec.topic, spec
        if spec.map or spec.rename or spec.drop or spec.defaults:
            raise ConfigError(f"{where}: adapter (a callable) excludes map/rename/drop/defaults")
        if not spec.struct:
            raise ConfigError(
                f"{where}: adapter {spec.adapter!r} needs struct = 'package.module:Type', the "
                "msgspec Struct it returns (its JSON Schema is the version's)"
            )
        assert spec.adapter is not None
        self.function = _import(spec.adapter, f"{where}: adapter")
        if not callable(self.function):
            raise ConfigError(f"{where}: adapter {spec.adapter!r} is not callable")
        struct = _import(spec.struct, f"{where}: struct")
        if not (isinstance(struct, type) and issubclass(struct, msgspec.Struct)):
            raise ConfigError(f"{where}: struct {spec.struct!r} is not a msgspec Struct")
        self.struct: type[msgspec.Struct] = struct

    def adapt_dict(self, decision: dict[str, Any], *, slots: frozenset[str] = frozenset()) -> Any:
        return msgspec.to_builtins(self._call(msgspec.convert(decision, Decision)))

    def _call(self, decision: Decision) -> msgspec.Struct:
        out = self.function(decision)
        if isinstance(out, dict):
            out = msgspec.convert(out, self.struct)
        if not isinstance(out, self.struct):
            raise TypeError(
                f"adapter {self.spec.adapter} returned {type(out).__name__}, not "
                f"{self.struct.__name__}"
            )
        return out

    def adapt_bytes(self, encoded: bytes) -> bytes:
        return _ENCODER.encode(self._call(_DECISION_DECODER.decode(encoded)))

    def schema(self) -> dict[str, Any]:
        return msgspec.json.schema(self.struct)


def _def_name(version: str) -> str:
    return "Decision_" + "".join(c if c.isalnum() else "_" for c in version)


def _picker(indices: Sequence[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    if len(indices) == 1:
        only = indices[0]
        return lambda args: (args[only],)
    if not indices:
        return lambda args: ()
    return itemgetter(*indices)


def _schema_of(value: Any) -> dict[str, Any]:
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    return {"type": "object"}


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """``prop`` less its null branch and its default."""
    out = {k: v for k, v in prop.items() if k != "default"}
    if "anyOf" in out:
        kept = [p for p in out["anyOf"] if p != {"type": "null"}]
        if len(kept) == 1 and len(out) == 1:
            return dict(kept[0])
        out["anyOf"] = kept
    return out


def _allows_null(prop: dict[str, Any]) -> bool:
    if prop.get("type") == "null":
        return True
    return any(_allows_null(p) for p in prop.get("anyOf", []))


def _mapped_schema(prop: dict[str, Any], m: CompiledMap) -> dict[str, Any]:
    if m.numeric:
        kind = {"type": "integer" if m.round == 0 else "number"}
        return {"anyOf": [kind, {"type": "null"}]} if _allows_null(prop) else kind
    assert m.values is not None
    if "enum" in prop:  # a closed set (a Literal): exactly what each value becomes
        return {"enum": _unique([m.apply(v) for v in prop["enum"]])}
    mapped = list(m.values.values())
    if m.has_other:
        return {"enum": _unique([*mapped, m.other])}
    return {"anyOf": [{"enum": _unique(mapped)}, copy.deepcopy(prop)]}


def _unique(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if not any(type(v) is type(s) and v == s for s in seen):
            seen.append(v)
    return seen


def compile_adapter(spec: OutputVersion) -> Adapter:
    """The adapter of ``spec`` (ConfigError naming the problem)."""
    if spec.adapter is not None:
        return CallableAdapter(spec)
    return DeclarativeAdapter(spec)
