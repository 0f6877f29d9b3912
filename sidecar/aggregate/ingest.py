"""Kafka records -> ``ComparisonBatch``: one msgspec call per poll, no per-record objects
beyond the decoded structs. Shared by the live aggregator, replay and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Literal, Protocol

import msgspec
import numpy as np

from ..contracts import DeadLetterKind
from ..kafka.unreadable import unreadable_of
from ..untrusted import error_text, try_decode
from .batch import (
    ComparisonBatch,
    ComparisonLike,
    ComparisonView,
    Int32Array,
    Int64Array,
    ResultView,
    comparison_batch,
)


class RecordLike(Protocol):
    """The parts of an aiokafka ``ConsumerRecord`` used here."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...


_PLAIN = msgspec.json.Decoder(ComparisonView)
_PARTITION, _OFFSET, _VALUE = (attrgetter(f) for f in ("partition", "offset", "value"))
_ROLLOUT, _CHAMPION, _CANDIDATE, _MODEL, _VERSION, _MODE = (
    attrgetter(f) for f in ("rollout", "champion", "candidate", "model", "version", "policy_mode")
)

#: Most distinct values interned per field. Past it the field restarts from the values of
#: the poll that overflowed it, so a long-lived aggregator follows promotions.
MAX_INTERNED = 64


def _one_of(values: dict[str, None]) -> Any:
    """``Literal[values]`` (a str field msgspec answers with the interned object), or str."""
    return Literal.__getitem__(tuple(values)) if values else str


class ComparisonDecoder:
    """Decodes a poll's comparison values in one call, interning the group-key strings.

    Rollout, model, version and policy-mode names repeat on every record. Decoding them as
    ``Literal`` types of the values seen so far makes msgspec return the same ``str`` objects: no
    allocation per record, and the key columns then compare by identity (about a quarter
    less decode and column time, ``bench/bench_aggregate.py``). A value not seen yet fails
    the typed decode once; that poll is decoded with plain ``str`` fields (``ComparisonView``)
    and the value is learned.

    Fast path: all values joined as JSON lines, decoded by one ``decode_lines`` call. It is
    taken only when the buffer holds exactly one newline between values (no value has a
    newline of its own, so lines map 1:1 to records) and every line decodes. Otherwise
    (a bad record, a null value) each value is decoded alone, so one bad record costs one
    slow poll and is the only one lost.
    """

    def __init__(self) -> None:
        self._rollouts: dict[str, None] = {}
        self._models: dict[str, None] = {}
        self._versions: dict[str, None] = {}
        self._modes: dict[str, None] = {}
        self._typed: msgspec.json.Decoder[Any] | None = None

    @property
    def interned(self) -> int:
        """How many names are interned now (at most ``4 * MAX_INTERNED``)."""
        return len(self._rollouts) + len(self._models) + len(self._versions) + len(self._modes)

    def decode(self, values: Sequence[bytes | None]) -> tuple[list[ComparisonLike], list[int]]:
        """The comparisons of ``values`` and the indices of the undecodable ones."""
        n = len(values)
        try:
            joined = b"\n".join(values)  # type: ignore[arg-type]
        except TypeError:  # a null value
            joined = b""
        if n and joined.count(b"\n") == n - 1:
            if self._typed is not None:
                try:
                    comps: list[Any] = self._typed.decode_lines(joined)
                    if len(comps) == n:
                        return comps, []
                except Exception:  # any bad record: the slower paths find it
                    pass
            try:
                plain = _PLAIN.decode_lines(joined)
                if len(plain) == n:
                    self._learn(plain)
                    return list[ComparisonLike](plain), []
            except Exception:
                pass
        decode = _PLAIN.decode
        good: list[ComparisonLike] = []
        bad: list[int] = []
        for i, v in enumerate(values):
            try:
                good.append(decode(v))  # type: ignore[arg-type]
            except Exception:  # untrusted: DecodeError, RecursionError, a null value...
                bad.append(i)
        return good, bad

    def _learn(self, comps: list[ComparisonView]) -> None:
        arms = [*map(_CHAMPION, comps), *map(_CANDIDATE, comps)]
        fields = (
            (self._rollouts, set(map(_ROLLOUT, comps))),
            (self._models, set(map(_MODEL, arms))),
            (self._versions, set(map(_VERSION, arms))),
            (self._modes, set(map(_MODE, comps))),
        )
        changed = False
        for known, seen in fields:
            new = seen.difference(known)
            if not new:
                continue
            changed = True
            if len(known) + len(new) > MAX_INTERNED:
                known.clear()
                new = seen if len(seen) <= MAX_INTERNED else set()
            known.update(dict.fromkeys(sorted(new)))
        if changed:
            self._typed = self._decoder()

    def _decoder(self) -> msgspec.json.Decoder[Any]:
        result = _retyped(ResultView, model=_one_of(self._models), version=_one_of(self._versions))
        view = _retyped(
            ComparisonView,
            rollout=_one_of(self._rollouts),
            policy_mode=_one_of(self._modes),
            champion=result,
            candidate=result,
        )
        return msgspec.json.Decoder(view)


def _retyped(cls: type[msgspec.Struct], **types: Any) -> type[msgspec.Struct]:
    """A copy of the view struct ``cls`` with some field types replaced."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (f.name, types.get(f.name, f.type))
        if f.required
        else (f.name, types.get(f.name, f.type), f.default)
        for f in msgspec.structs.fields(cls)
    ]
    return msgspec.defstruct(cls.__name__, fields, kw_only=True, gc=False)


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
    #: The records left out and why (for the dead-letter topic): undecodable ones here, and
    #: the aggregator adds those it refuses (``event_time``).
    rejected: list[tuple[RecordLike, DeadLetterKind, str]] = field(default_factory=list)


_SHARED = ComparisonDecoder()


@dataclass(frozen=True, slots=True)
class Poll:
    """One poll's records split into what decoding needs (values and positions)."""

    records: Sequence[RecordLike]
    values: list[bytes | None]
    partitions: Int32Array
    offsets: Int64Array

    @classmethod
    def of(cls, records: Sequence[RecordLike]) -> Poll:
        n = len(records)
        return cls(
            records,
            list(map(_VALUE, records)),
            np.fromiter(map(_PARTITION, records), dtype=np.int32, count=n),
            np.fromiter(map(_OFFSET, records), dtype=np.int64, count=n),
        )

    def next_offsets(self) -> dict[int, int]:
        """Per partition, the offset after the poll's last record."""
        parts, offsets = self.partitions, self.offsets
        if not parts.size:
            return {}
        if (parts == parts[0]).all():  # the usual poll: one partition
            return {int(parts[0]): int(offsets.max()) + 1}
        uniq, inv = np.unique(parts, return_inverse=True)
        last = np.full(uniq.size, -1, dtype=np.int64)
        np.maximum.at(last, inv, offsets)
        return {int(p): int(o) + 1 for p, o in zip(uniq.tolist(), last.tolist(), strict=True)}

    def ingested(self, decoded: Decoded) -> Ingested:
        """The poll's ``Ingested`` once its values are decoded (here or in a helper process)."""
        batch, bad = decoded
        kept = list(self.records)
        rejected: list[tuple[RecordLike, DeadLetterKind, str]] = []
        if bad:
            dropped = set(bad)
            kept = [r for i, r in enumerate(self.records) if i not in dropped]
            rejected = [why_undecodable(self.records[i], self.values[i]) for i in bad]
        return Ingested(batch, kept, len(bad), self.next_offsets(), rejected)


def why_undecodable(
    record: RecordLike, value: bytes | None
) -> tuple[RecordLike, DeadLetterKind, str]:
    """Why ``record`` is no Comparison (decoded again, alone: only for the rare bad record)."""
    skipped = unreadable_of(record)
    if skipped is not None:
        return record, "unreadable", skipped.describe()
    result = try_decode(_PLAIN.decode, value)
    if isinstance(result, BaseException):
        return record, "decode", f"not a Comparison: {error_text(result)}"
    return record, "decode", "not a Comparison: refused with the rest of its poll"


#: Columns of a poll's decodable values and the indices of the undecodable ones.
Decoded = tuple[ComparisonBatch, list[int]]


def decode_columns(
    values: Sequence[bytes | None],
    partitions: Int32Array,
    offsets: Int64Array,
    decoder: ComparisonDecoder | None = None,
) -> Decoded:
    """Decode ``values`` into columns (what a decode helper process runs)."""
    comps, bad = (decoder or _SHARED).decode(values)
    if bad:
        keep = np.ones(len(values), dtype=np.bool_)
        keep[bad] = False
        partitions, offsets = partitions[keep], offsets[keep]
    return comparison_batch(comps, partitions, offsets), bad


def ingest(records: Sequence[RecordLike], decoder: ComparisonDecoder | None = None) -> Ingested:
    """Columns of the decodable records of one poll (any mix of partitions), in process."""
    poll = Poll.of(records)
    return poll.ingested(decode_columns(poll.values, poll.partitions, poll.offsets, decoder))


__all__ = [
    "MAX_INTERNED",
    "ComparisonDecoder",
    "Decoded",
    "Ingested",
    "Poll",
    "RecordLike",
    "decode_columns",
    "ingest",
]
