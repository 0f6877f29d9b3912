"""Dead letters that always fit their topic.

A dead letter carries the record it stands for, base64-encoded inside JSON: a 900 kB request
would make a 1.2 MB dead letter, which Apache Kafka refuses by default, and a process that
cannot write its dead letter can never commit past the record. So originals are kept whole
only up to a cap; beyond it, a prefix plus the original size and sha256 -- a claim check,
since the original stays readable at its source coordinates.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec

from .contracts import OUTPUT_SCHEMA_VERSION, DeadLetter, DeadLetterKind, RecordHeader
from .kafka.unreadable import unreadable_of
from .tracecontext import trace_headers
from .untrusted import clip

Headers = list[tuple[str, bytes]]

#: Dead letters are keyed by the original key when it is at most this long (else by the
#: record's coordinates): per-key order is kept without a huge key on the dead-letter topic.
MAX_KEY_BYTES = 1024
#: A dead letter's reason, coordinates and field names fit in this many bytes.
FRAME_BYTES = 16_384
#: Longest reason kept.
MAX_REASON_CHARS = 2000
_SCHEMA_HEADER = ("schema_version", OUTPUT_SCHEMA_VERSION.encode())


class SourceRecord(Protocol):
    """The parts of a consumed record a dead letter keeps."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


def where(record: SourceRecord) -> str:
    """``topic/partition/offset``: where a record can be read again."""
    return f"{record.topic}/{record.partition}/{record.offset}"


#: Bytes a kept header costs besides its name and base64 value (its JSON framing).
HEADER_OVERHEAD_BYTES = 32


def keep_bytes(max_value_bytes: int, topic_limit: int, header_bytes: int = 0) -> int:
    """How much of an original key and value a dead letter keeps: the configured cap, lowered
    so that both, base64-encoded (4 bytes for 3), and ``header_bytes`` of kept headers fit
    the dead-letter topic's record limit."""
    return max(0, min(max_value_bytes, (topic_limit - FRAME_BYTES - header_bytes) * 3 // 8))


def kept_headers(
    headers: Sequence[tuple[str, bytes | None]], budget: int
) -> tuple[list[RecordHeader], bool]:
    """The headers that fit ``budget`` bytes (a name, its base64 value and
    :data:`HEADER_OVERHEAD_BYTES` each), in order, and whether any was left out."""
    kept: list[RecordHeader] = []
    used = 0
    for key, value in headers:
        name = key if isinstance(key, str) else str(key)
        raw = bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None
        cost = len(name.encode("utf-8", "replace")) + HEADER_OVERHEAD_BYTES
        cost += 0 if raw is None else (len(raw) + 2) // 3 * 4
        if used + cost > budget:
            return kept, True
        used += cost
        kept.append(RecordHeader(key=name, value=raw))
    return kept, False


class DeadLetterWriter:
    """Encodes dead letters, keeping at most ``keep`` bytes of an original key or value."""

    def __init__(self, keep: int, max_header_bytes: int = 16_384) -> None:
        self.keep = keep
        self.max_header_bytes = max_header_bytes
        self._encoder = msgspec.json.Encoder()

    def encode(
        self,
        record: SourceRecord,
        kind: DeadLetterKind,
        reason: str,
        request_id: str | None = None,
    ) -> tuple[bytes, bytes, Headers]:
        """Key, value and headers of the dead letter for ``record``."""
        keep = self.keep
        value, key = record.value, record.key
        first, last = record.offset, None
        skipped = unreadable_of(record)
        if skipped is not None:
            first, last = skipped.first, skipped.last
        truncated, size, sha256 = False, None, None
        if value is not None and len(value) > keep:
            truncated, size = True, len(value)
            sha256 = hashlib.sha256(value).hexdigest()
            value = value[:keep]
        if key is not None and len(key) > keep:
            truncated, key = True, key[:keep]
        # A marker of unreadable offsets carries our own header, none of the originals.
        original = () if skipped is not None else (getattr(record, "headers", None) or ())
        kept, cut = kept_headers(original, self.max_header_bytes) if original else ([], False)
        letter = DeadLetter(
            kind=kind,
            reason=clip(reason, MAX_REASON_CHARS),
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=first,
            source_offset_last=last,
            ts=time.time_ns() // 1_000_000,
            original_value=value,
            original_key=key,
            request_id=request_id,
            truncated=truncated,
            original_size=size,
            original_sha256=sha256,
            original_headers=kept or None,
            headers_truncated=cut,
            original_header_count=len(original) if cut else None,
        )
        kafka_key = (
            record.key
            if record.key and len(record.key) <= MAX_KEY_BYTES
            else where(record).encode()
        )
        headers: Headers = [("dead_letter_kind", kind.encode()), _SCHEMA_HEADER]
        trace = trace_headers(original) if original else None
        if trace:
            headers += trace
        return kafka_key, self._encoder.encode(letter), headers
