"""Every record read from Kafka is untrusted: anyone with write access to a topic may have put
anything in it. Decoding one must never raise past the record.

msgspec raises more than ``DecodeError``/``ValidationError`` on hostile input: nesting deeper
than the interpreter's recursion limit is a ``RecursionError``, an integer of more than 4300
digits a ``ValueError``, and our own checks on decoded values can hit ``TypeError`` or
``AttributeError`` on shapes nobody planned for. These helpers turn *any* exception of one
record into a value the caller accounts for (a dead letter, an audited rejection, a skip
counter) and never into an exception in a loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Longest exception text kept in a reason (dead letters, audit records, logs).
MAX_REASON_CHARS = 500


def error_text(exc: BaseException, limit: int = MAX_REASON_CHARS) -> str:
    """``"TypeName: message"``, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def try_decode(decode: Callable[[bytes], T], raw: bytes | None) -> T | BaseException:
    """``decode(raw)``, or the exception it raised (a null value is a ``TypeError``)."""
    if raw is None:
        return TypeError("record has no value")
    try:
        return decode(raw)
    except Exception as exc:  # untrusted input: any failure belongs to this record
        return exc


def decoded_or_none(decode: Callable[[bytes], T], raw: bytes | None) -> T | None:
    """``decode(raw)``, or None when it fails for any reason."""
    result = try_decode(decode, raw)
    return None if isinstance(result, BaseException) else result


def header_text(value: bytes | None) -> str:
    """A header value as text; a null header value (Kafka allows one) is ``""``."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


#: C0 and C1 control characters (ANSI escapes, carriage returns, newlines) and the Unicode
#: bidi overrides that reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to show on one terminal line: every control character is replaced by
    its escape (``\\x1b``...), so a record cannot forge lines or recolour an operator's
    terminal."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
