"""Kafka records -> ``ComparisonBatch``: one reused msgspec decoder, no per-record objects
beyond the decoded structs. Shared by the live aggregator, replay and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np

from .batch import ComparisonBatch, ComparisonView, comparison_batch


class RecordLike(Protocol):
    """The parts of an aiokafka ``ConsumerRecord`` used here."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...


_DECODER = msgspec.json.Decoder(ComparisonView)
_MANY = msgspec.json.Decoder(list[ComparisonView])


@dataclass(slots=True)
class Ingested:
    """A decoded batch plus what it was made of."""

    batch: ComparisonBatch
    #: The records behind ``batch``'s rows, in row order (undecodable ones left out).
    records: list[RecordLike]
    #: Records that were not a valid Comparison (skipped and counted, never fatal).
    undecodable: int
    #: Per partition, the offset after the last record of the poll (undecodable ones too).
    next_offsets: dict[int, int]


def decode_comparisons(
    values: Sequence[bytes | None],
) -> tuple[list[ComparisonView], list[int]]:
    """Decode values; returns the comparisons and the indices of the undecodable values.

    Fast path: the whole poll is decoded as one JSON array in a single call (values are
    JSON objects, so joining them with commas is valid JSON). Any bad record (or a null
    value) falls back to one call per record, so one bad record costs one slow batch.
    """
    try:
        return _MANY.decode(b"[" + b",".join(values) + b"]"), []  # type: ignore[arg-type]
    except (msgspec.DecodeError, TypeError):
        pass
    decode = _DECODER.decode
    good: list[ComparisonView] = []
    bad: list[int] = []
    for i, v in enumerate(values):
        try:
            good.append(decode(v))  # type: ignore[arg-type]
        except (msgspec.DecodeError, TypeError):
            bad.append(i)
    return good, bad


def ingest(records: Sequence[RecordLike]) -> Ingested:
    """Columns of the decodable records of one poll (any mix of partitions)."""
    comps, bad = decode_comparisons([r.value for r in records])
    n = len(records)
    partitions = np.fromiter((r.partition for r in records), dtype=np.int32, count=n)
    offsets = np.fromiter((r.offset for r in records), dtype=np.int64, count=n)
    nxt: dict[int, int] = {}
    if n:
        uniq, inv = np.unique(partitions, return_inverse=True)
        last = np.full(uniq.size, -1, dtype=np.int64)
        np.maximum.at(last, inv, offsets)
        nxt = {int(p): int(o) + 1 for p, o in zip(uniq.tolist(), last.tolist(), strict=True)}
    kept: list[RecordLike] = list(records)
    if bad:
        keep = np.ones(n, dtype=np.bool_)
        keep[bad] = False
        kept = [r for r, k in zip(records, keep.tolist(), strict=True) if k]
        partitions, offsets = partitions[keep], offsets[keep]
    return Ingested(comparison_batch(comps, partitions, offsets), kept, len(bad), nxt)


__all__ = ["Ingested", "RecordLike", "decode_comparisons", "ingest"]
