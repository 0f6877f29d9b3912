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
from typing import Protocol

import msgspec

from .contracts import OUTPUT_SCHEMA_VERSION, DeadLetter, DeadLetterKind
from .kafka.unreadable import unreadable_of
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


def where(record: SourceRecord) -> str:
    """``topic/partition/offset``: where a record can be read again."""
    return f"{record.topic}/{record.partition}/{record.offset}"


def keep_bytes(max_value_bytes: int, topic_limit: int) -> int:
    """How much of an original key and value a dead letter keeps: the configured cap, lowered
    so that both, base64-encoded (4 bytes for 3), fit the dead-letter topic's record limit."""
    return max(0, min(max_value_bytes, (topic_limit - FRAME_BYTES) * 3 // 8))


class DeadLetterWriter:
    """Encodes dead letters, keeping at most ``keep`` bytes of an original key or value."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
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
        )
        kafka_key = (
            record.key
            if record.key and len(record.key) <= MAX_KEY_BYTES
            else where(record).encode()
        )
        headers: Headers = [("dead_letter_kind", kind.encode()), _SCHEMA_HEADER]
        return kafka_key, self._encoder.encode(letter), headers
