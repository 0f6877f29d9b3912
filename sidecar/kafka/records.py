"""Fetched records, read a whole record batch at a time.

aiokafka turns a fetched record set into :class:`~aiokafka.structs.ConsumerRecord` objects one
at a time: a generator step, our :mod:`.unreadable` wrapper, ``FetchResult.getall``'s loop and a
dataclass ``__init__`` of eleven fields per record -- about 1 us per record, as much as the
rest of the consumer and more than decoding the request itself. This module makes
``getmany`` read each record batch in one tight loop into :class:`Record` objects (a msgspec
Struct, built in C, with the fields and attribute names of ``ConsumerRecord``) and hand a
partition's records over as slices of that list. Where the C extension is compiled
(:mod:`._batches`) the loop is C over the fetched bytes (a hardware CRC-32C, no per-record
aiokafka objects); compressed and pre-v2 batches still go through aiokafka's batch reader.

Everything the per-record path guarantees is kept: the CRC of every batch is checked,
control batches are skipped, records before the fetch offset (a fetch that starts inside a
batch) are dropped, ``max_records`` is honoured (the rest of a batch waits for the next call),
the position moves exactly as aiokafka moves it, and a batch the client cannot parse becomes
one :mod:`.unreadable` marker for the offsets not yet returned (the records of that batch
before the bad one are returned as usual).

This uses aiokafka internals (``consumer.fetcher.PartitionRecords`` and ``FetchResult``,
the record batch readers). :func:`install` checks the shapes it relies on and, when aiokafka
changed them, leaves aiokafka's own path in place and logs a warning (records then cost what
they cost before; nothing else changes). Consumers with deserializers or
``isolation_level="read_committed"`` always take aiokafka's path.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import msgspec
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException

from . import unreadable
from .unreadable import UNREADABLE_HEADER, Unreadable

try:
    from . import _batches
except ImportError:  # not compiled here: aiokafka's batch reader, a record at a time
    _batches = None  # type: ignore[assignment]

#: aiokafka's record set over a fetched partition's bytes.
_MemoryRecords = fetcher.MemoryRecords


class FetchedRecords:
    """aiokafka's ``MemoryRecords`` that keeps the fetched bytes, so the C reader
    (:mod:`._batches`) can parse them itself (installed as ``fetcher.MemoryRecords``)."""

    __slots__ = ("_records", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._records = _MemoryRecords(data)

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        return self._records.next_batch()

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())


log = logging.getLogger(__name__)


class Record(msgspec.Struct, frozen=True, gc=False):
    """One consumed record: the attributes of aiokafka's ``ConsumerRecord`` (which this
    module hands out instead, for speed). Holds only bytes, strings and numbers: no cycles,
    so the garbage collector need not track it."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, Any], ...]
    checksum: int | None = None

    @property
    def serialized_key_size(self) -> int:
        return len(self.key) if self.key is not None else -1

    @property
    def serialized_value_size(self) -> int:
        return len(self.value) if self.value is not None else -1


_EMPTY: tuple[tuple[str, Any], ...] = ()


def _read_batch(tp: Any, batch: Any, first: int, out: list[Record]) -> None:
    """Append ``batch``'s records at or after offset ``first`` to ``out`` (records already
    appended stay there when parsing fails part way)."""
    topic, partition = tp.topic, tp.partition
    ts_type = batch.timestamp_type
    append = out.append
    base = getattr(batch, "base_offset", None)  # legacy (v0/v1) batches may not say
    if base is not None and base >= first:
        for r in batch:
            h = r.headers
            append(
                Record(
                    topic,
                    partition,
                    r.offset,
                    r.timestamp,
                    ts_type,
                    r.key,
                    r.value,
                    tuple(h) if h else _EMPTY,
                )
            )
    else:  # the fetch started inside this batch
        for r in batch:
            offset = r.offset
            if offset < first:
                continue
            h = r.headers
            append(
                Record(
                    topic,
                    partition,
                    offset,
                    r.timestamp,
                    ts_type,
                    r.key,
                    r.value,
                    tuple(h) if h else _EMPTY,
                )
            )


def _marker(tp: Any, unreadable: Unreadable) -> Record:
    return Record(
        tp.topic,
        tp.partition,
        unreadable.last,
        -1,
        0,
        None,
        None,
        ((UNREADABLE_HEADER, unreadable),),
    )


def _fill(self: Any) -> bool:
    """Parse the next batch holding records into ``self._sc_pending``; False once the
    record set is exhausted. Sets ``next_fetch_offset`` past skipped (control) batches."""
    if self._sc_raw is not None:
        return _fill_raw(self)
    records = self._records  # the unreadable module's _Batches wrapper
    while records.has_next():
        first = self.next_fetch_offset
        try:
            batch = records.next_batch()
        except Exception as exc:
            current = records.current  # the batch before: its end is not after ``first``
            if _take_unreadable(self, current and current.next_offset, first, [], exc):
                return True
            raise
        if _take_batch(self, batch, first):
            return True
    return False


def _take_batch(self: Any, batch: Any, first: int) -> bool:
    """The records of one batch read by aiokafka's reader into ``self._sc_pending`` (True);
    False when it holds none to return (a control batch, all before ``first``, compacted
    away): the position then moves past it."""
    out: list[Record] = []
    try:
        if self._check_crcs and not batch.validate_crc():
            raise CorruptRecordException(f"Invalid CRC - {self._tp}")
        if batch.is_control_batch:
            self.next_fetch_offset = batch.next_offset
            return False
        _read_batch(self._tp, batch, first, out)
    except Exception as exc:  # the batch could not be parsed: skip its rest, say so
        if _take_unreadable(self, batch.next_offset, first, out, exc):
            return True
        raise
    if out:
        self._sc_pending, self._sc_pos, self._sc_end = out, 0, batch.next_offset
        return True
    self.next_fetch_offset = batch.next_offset
    return False


def _take_unreadable(
    self: Any, end: int | None, first: int, out: list[Record], error: BaseException | str
) -> bool:
    """``out`` (the batch's records before the bad one) and a marker for the rest of the
    batch, up to offset ``end``, into ``self._sc_pending``; False when there is no rest to
    mark (no batch, or the error is not about it: the caller raises it)."""
    if end is None:
        return False
    start = out[-1].offset + 1 if out else first
    if end <= start:
        return False
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    unreadable = Unreadable(start, end - 1, text[:300])
    log.error("%s[%d]: %s", self._tp.topic, self._tp.partition, unreadable.describe())
    out.append(_marker(self._tp, unreadable))
    self._sc_pending, self._sc_pos, self._sc_end = out, 0, end
    return True


def _fill_raw(self: Any) -> bool:
    """:func:`_fill` over the fetched bytes with the C reader (:mod:`._batches`): a batch's
    records straight into :class:`Record` objects. Compressed and old-format batches go to
    aiokafka's reader one at a time."""
    assert _batches is not None
    raw: bytes = self._sc_raw
    tp = self._tp
    while True:
        first = self.next_fetch_offset
        pos = self._sc_rawpos
        kind, out, next_pos, next_offset, error = _batches.read(
            raw, pos, first, tp.topic, tp.partition, Record, self._check_crcs
        )
        if kind == _batches.END:
            return False
        self._sc_rawpos = next_pos
        if kind == _batches.RECORDS:
            if out:
                self._sc_pending, self._sc_pos, self._sc_end = out, 0, next_offset
                return True
            self.next_fetch_offset = next_offset  # all before the fetch offset
        elif kind == _batches.CONTROL:
            self.next_fetch_offset = next_offset
        elif kind == _batches.DELEGATE:
            try:
                batch = _MemoryRecords(raw[pos:next_pos]).next_batch()
            except Exception as exc:  # not even its header parses: as aiokafka, raise
                raise CorruptRecordException(f"{exc} - {tp}") from exc
            if _take_batch(self, batch, first):
                return True
        else:  # CORRUPT
            error = error or "corrupt record batch"
            if next_offset < 0 or not _take_unreadable(self, next_offset, first, out, error):
                raise CorruptRecordException(f"{error} - {tp}")
            return True


def _has_next(self: Any) -> bool:
    """Whether a batch (complete, or one that fails to parse) is left to read."""
    raw = self._sc_raw
    if raw is None:
        return bool(self._records.has_next())
    pos = self._sc_rawpos
    left = len(raw) - pos
    if left < 17:
        return False
    length = int.from_bytes(raw[pos + 8 : pos + 12], "big", signed=True)
    return length < 14 or length + 12 <= left


def _take(self: Any, max_records: int | None) -> list[Any]:
    """Up to ``max_records`` (all when None) records, whole batches at a time."""
    if not self._sc_fast:
        taken = []
        for record in self:
            taken.append(record)
            if max_records is not None and len(taken) >= max_records:
                break
        return taken
    taken = []
    while True:
        pending: list[Record] = self._sc_pending
        pos: int = self._sc_pos
        if pos >= len(pending):
            if not _fill(self):
                self._sc_done = True
                return taken
            pending, pos = self._sc_pending, 0
        n = len(pending) - pos
        if max_records is not None:
            n = min(n, max_records - len(taken))
        if pos == 0 and n == len(pending) and not taken:
            taken = pending
        else:
            taken += pending[pos : pos + n]
        pos += n
        self._sc_pos = pos
        # As aiokafka: after a record its offset + 1; after a batch's last, the batch's end.
        self.next_fetch_offset = pending[pos - 1].offset + 1 if pos < len(pending) else self._sc_end
        if max_records is not None and len(taken) >= max_records:
            return taken


_original_init = fetcher.PartitionRecords.__init__
_original_next = fetcher.PartitionRecords.__next__


def _init(
    self: Any,
    tp: Any,
    records: Any,
    aborted_transactions: Any,
    fetch_offset: int,
    key_deserializer: Any,
    value_deserializer: Any,
    check_crcs: bool,
    isolation_level: int,
) -> None:
    _original_init(
        self,
        tp,
        records,
        aborted_transactions,
        fetch_offset,
        key_deserializer,
        value_deserializer,
        check_crcs,
        isolation_level,
    )
    self._sc_fast = (
        key_deserializer is None
        and value_deserializer is None
        and isolation_level == fetcher.READ_UNCOMMITTED
    )
    if self._sc_fast:
        # aiokafka's record generator (not started) refers back to this object: a cycle
        # only the cyclic garbage collector would free, keeping the fetched buffer (MiBs)
        # alive until then. The batch path does not use it.
        self._records_iterator = None
    self._sc_pending = []
    self._sc_pos = 0
    self._sc_end = fetch_offset
    self._sc_done = False
    #: The fetched bytes, when the C reader parses them (else None: aiokafka's reader).
    self._sc_raw = getattr(records, "data", None) if self._sc_fast and _batches else None
    self._sc_rawpos = 0


def _next(self: Any) -> Any:
    """One record (``getone``, iteration): from the batch being read."""
    if not self._sc_fast:
        return _original_next(self)
    taken = _take(self, 1)
    if not taken:
        raise StopIteration
    return taken[0]


def _getall(self: Any, max_records: int | None = None) -> list[Any]:
    """``FetchResult.getall``, taking whole batches (same checks and position updates)."""
    tp = self._topic_partition
    if not self.check_assignment(tp) or not self.has_more():
        return []
    partition_records = self._partition_records
    taken = _take(partition_records, max_records)
    self._update_position()
    if not partition_records._sc_fast:
        if max_records is None or len(taken) < max_records:
            self._partition_records = None
    elif partition_records._sc_done or (
        partition_records._sc_pos >= len(partition_records._sc_pending)
        and not _has_next(partition_records)
    ):
        self._partition_records = None  # all read: the fetcher may fetch this partition again
    return taken


def _shapes_ok() -> str | None:
    """None when aiokafka looks as this module expects; else what differs."""
    expected = [
        "self",
        "tp",
        "records",
        "aborted_transactions",
        "fetch_offset",
        "key_deserializer",
        "value_deserializer",
        "check_crcs",
        "isolation_level",
    ]
    # aiokafka's own __init__ (the unreadable module wraps it with *args).
    params = list(inspect.signature(unreadable.aiokafka_partition_records_init).parameters)
    if params != expected:
        return f"PartitionRecords.__init__{params}"
    for name in ("check_assignment", "has_more", "_update_position", "getall"):
        if not hasattr(fetcher.FetchResult, name):
            return f"FetchResult.{name} missing"
    if not hasattr(fetcher, "READ_UNCOMMITTED"):
        return "fetcher.READ_UNCOMMITTED missing"
    if not hasattr(fetcher, "MemoryRecords"):
        return "fetcher.MemoryRecords missing"
    return None


_installed = False


def install() -> bool:
    """Read fetched records a batch at a time (idempotent). Must run after
    :func:`.unreadable.install` (it relies on its record-set wrapper). False, with a warning,
    when aiokafka's internals are not what this module knows."""
    global _installed, _original_init, _original_next
    if _installed:
        return True
    problem = _shapes_ok()
    if problem is not None:
        log.warning(
            "aiokafka %s internals changed (%s): reading records one at a time (slower)",
            getattr(fetcher, "__name__", "?"),
            problem,
        )
        return False
    _original_init = fetcher.PartitionRecords.__init__
    _original_next = fetcher.PartitionRecords.__next__
    fetcher.PartitionRecords.__init__ = _init
    fetcher.PartitionRecords.__next__ = _next
    fetcher.FetchResult.getall = _getall
    if _batches is not None:
        fetcher.MemoryRecords = FetchedRecords
    _installed = True
    return True


_aiokafka_getall = fetcher.FetchResult.getall


def uninstall() -> None:
    """aiokafka's record-at-a-time path again (for the passthrough benchmark, which measures
    plain aiokafka)."""
    global _installed
    if not _installed:
        return
    fetcher.PartitionRecords.__init__ = _original_init
    fetcher.PartitionRecords.__next__ = _original_next
    fetcher.FetchResult.getall = _aiokafka_getall
    fetcher.MemoryRecords = _MemoryRecords
    _installed = False
