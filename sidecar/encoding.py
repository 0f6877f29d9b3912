"""Fast JSON encoding of the output contracts, derived from the msgspec Structs themselves.

Building a Struct per record and encoding it costs about 2 µs per output message, which is most
of the sidecar's per-record budget. Within one batch almost every field of a Decision or a
Comparison is the same (rollout, model, version, threshold, epoch, mode, decided-at, batch
latency); only a handful differ per record. So for each batch we encode a *prototype* Struct
in which the varying fields hold sentinels, and turn the bytes msgspec produced into a
``%``-format template (the pipeline formats it as bytes, with bytes). Field names, order and the
encoding of every constant come from msgspec; per record we only format the few values that
vary, already JSON text. A test checks that templated output decodes to exactly the Struct it
stands for, for arbitrary values.

Strings that would need JSON escaping (quotes, backslashes, control characters) are escaped by
msgspec itself; the common case (ids made of plain characters) skips that step.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

_ENCODER = msgspec.json.Encoder()
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def needs_escape(text: str) -> bool:
    """True when ``text`` cannot be placed between JSON quotes as it is."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return False  # the common case, at C speed: no quote, backslash or control character
    return _NEEDS_ESCAPE.search(text) is not None


def escape(text: str) -> str:
    """The JSON string body (no quotes) for ``text``, escaped by msgspec."""
    return _ENCODER.encode(text).decode()[1:-1]


def template(
    prototype: Any,
    slots: tuple[str, ...],
    raw: frozenset[str],
    ignored: frozenset[str] = frozenset(),
) -> str:
    """A ``%``-format template from a prototype Struct (or a dict, encoded in its order).

    ``prototype`` holds ``"@@name@@"`` in each slot field; ``slots`` names them in the order
    they appear in the encoded JSON (checked), which is the order of the ``%`` arguments. A
    slot in ``raw`` replaces the quoted sentinel (format it with JSON text: a number,
    ``true``, an object...); any other slot stays inside its quotes (format it with an escaped
    string body). The template also works as bytes (``template(...).encode()``, formatted
    with bytes: about twice as fast per record as ``str`` formatting and its ``encode()``).
    A slot in
    ``ignored`` is not in the prototype: it takes its argument and prints nothing (``%.0s``),
    so templates with and without an optional field take the same arguments.
    """
    encoded = _ENCODER.encode(prototype).decode().replace("%", "%%")
    position = -1
    for k, name in enumerate(slots):
        if name in ignored:
            if k == 0 or slots[k - 1] in ignored:
                raise ValueError(f"ignored slot {name!r} must follow a slot that is printed")
            continue
        sentinel = f'"@@{name}@@"' if name in raw else f"@@{name}@@"
        if encoded.count(sentinel) != 1:
            raise ValueError(f"slot {name!r} not found exactly once in the prototype")
        found = encoded.index(sentinel)
        if found < position:
            raise ValueError(f"slot {name!r} is out of order: list slots as they appear")
        position = found
        spec = "%s"
        if k + 1 < len(slots) and slots[k + 1] in ignored:
            spec += "%.0s"
        encoded = encoded.replace(sentinel, spec)
    return encoded


def json_numbers(values: list[float] | list[int]) -> list[str]:
    """JSON text of each number, with one msgspec call for the whole list (floats in their
    shortest round-trip form; NaN and infinities become ``null``)."""
    if not values:
        return []
    return _ENCODER.encode(values).decode()[1:-1].split(",")


def json_number_bytes(values: list[float] | list[int]) -> list[bytes]:
    """:func:`json_numbers` as bytes (for bytes templates)."""
    if not values:
        return []
    return _ENCODER.encode(values)[1:-1].split(b",")


def json_bool(value: bool) -> str:
    return "true" if value else "false"


JSON_BOOL = ("false", "true")
JSON_BOOL_BYTES = (b"false", b"true")


def raw_json(value: Any) -> str:
    """JSON text of any value msgspec can encode."""
    return _ENCODER.encode(value).decode()
