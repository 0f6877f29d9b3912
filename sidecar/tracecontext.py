"""W3C Trace Context (https://www.w3.org/TR/trace-context/) carried through the sidecar.

A request may carry ``traceparent`` and ``tracestate`` headers; every output derived from it
(each decision version, its comparison, a dead letter) carries them on, so a trace started
upstream continues downstream. Headers are attacker-controlled: a ``traceparent`` that is not
well formed (or appears twice) is dropped with its ``tracestate``, as the specification says
a receiver must; ``tracestate`` values (several headers are joined with commas, as HTTP
would) are passed on only when printable ASCII of at most :data:`MAX_TRACESTATE_BYTES`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Headers = list[tuple[str, bytes]]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The specification's limit a vendor must propagate at least; longer ones are dropped whole.
MAX_TRACESTATE_BYTES = 512
_PARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[ -~]*)?$")
_PRINTABLE = re.compile(rb"^[ -~]*$")
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16


def valid_traceparent(value: bytes) -> bool:
    """A ``traceparent`` a receiver may continue: version 00 is exactly 55 characters, version
    ff is invalid, trace and parent ids are not all zeros; later versions may append fields."""
    if len(value) > 256:
        return False
    m = _PARENT.match(value)
    if m is None:
        return False
    version, trace_id, parent_id, _flags, rest = m.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return False
    return not (version == b"00" and rest)


def trace_headers(headers: Iterable[tuple[str, bytes | None]]) -> Headers | None:
    """The trace-context headers to pass on from a record's headers, or None."""
    parent: bytes | None = None
    states: list[bytes] = []
    for key, value in headers:
        if not isinstance(key, str) or not isinstance(value, bytes | bytearray | memoryview):
            continue
        name = key.lower()
        if name == TRACEPARENT:
            if parent is not None:
                return None  # two parents: which one? neither
            parent = bytes(value)
        elif name == TRACESTATE:
            states.append(bytes(value))
    if parent is None or not valid_traceparent(parent):
        return None
    out: Headers = [(TRACEPARENT, parent)]
    state = b",".join(s.strip() for s in states if s.strip())
    if state and len(state) <= MAX_TRACESTATE_BYTES and _PRINTABLE.match(state):
        out.append((TRACESTATE, state))
    return out
