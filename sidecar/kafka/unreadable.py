"""Records the Kafka client itself cannot parse, turned into data instead of a stalled loop.

aiokafka parses a fetched record batch record by record, decoding every header key as UTF-8
and checking the batch's CRC. A record whose header key is not UTF-8 (librdkafka, and so
confluent-kafka, accepts any bytes as a key) or a batch whose CRC does not match makes every
``getmany`` on that partition raise the same exception, forever: the partition stalls, and a
loop that lets the exception through dies again at every restart. One record written by
anyone with write access would stop the control plane of every instance.

:func:`install` (run when :mod:`sidecar.kafka` is imported) makes aiokafka's per-partition
record iterator answer such a batch with one *marker* record instead of raising: it stands for
the offsets of the batch that could not be read (from the first record not yet returned to the
end of the batch), carries an :class:`Unreadable` as the value of its only header, and moves
the position past the batch, so consumption goes on. Producers can only write bytes, so a
header whose value is an :class:`Unreadable` object cannot be forged. Consumers account for a
marker like any bad record (a dead letter, an audited rejection); the originals stay readable
at their offsets for tools that can parse them.

The patch wraps two methods of ``aiokafka.consumer.fetcher.PartitionRecords`` (``__init__``
to remember the batch being read, ``__next__`` to catch what it raises); the per-record path
costs nothing more (a ``try`` in Python 3.11 is free until something raises).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)

#: Name of the marker record's only header.
UNREADABLE_HEADER = "sidecar-unreadable"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Offsets ``first``..``last`` (inclusive) of one partition the client could not parse."""

    first: int
    last: int
    error: str

    def describe(self) -> str:
        span = (
            f"offset {self.first}"
            if self.first == self.last
            else (f"offsets {self.first}..{self.last}")
        )
        return (
            f"{span} of this partition could not be parsed by the Kafka client ({self.error}); "
            "they were skipped and stay in the topic for a tool that can read them"
        )


def unreadable_of(record: Any) -> Unreadable | None:
    """The :class:`Unreadable` a marker record stands for; None for any other record."""
    headers = getattr(record, "headers", None)
    if headers and len(headers) == 1:
        name, value = headers[0]
        if name == UNREADABLE_HEADER and isinstance(value, Unreadable):
            return value
    return None


class _Batches:
    """The fetched record set, remembering the batch being read (to know where it ends)."""

    __slots__ = ("_records", "current")

    def __init__(self, records: Any) -> None:
        self._records = records
        self.current: Any = None

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        self.current = self._records.next_batch()
        return self.current

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


_original_init = fetcher.PartitionRecords.__init__
#: aiokafka's own ``PartitionRecords.__init__`` (``.records`` checks its signature).
aiokafka_partition_records_init = _original_init


def _init(self: Any, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
    _original_init(self, tp, _Batches(records), *args, **kwargs)


def _next(self: Any) -> Any:
    try:
        return next(self._records_iterator)
    except StopIteration:
        self._records_iterator = None  # as aiokafka does: break the reference cycle
        raise
    except Exception as exc:  # the batch could not be parsed: skip it, say so
        batch = self._records.current
        if batch is None:
            raise
        first = self.next_fetch_offset
        end = batch.next_offset
        if end <= first:  # nothing of this batch left: the error is not about it
            raise
        self.next_fetch_offset = end
        # A fresh iterator goes on with the batches after this one.
        self._records_iterator = self._unpack_records()
        unreadable = Unreadable(first, end - 1, f"{type(exc).__name__}: {exc}"[:300])
        tp = self._tp
        log.error("%s[%d]: %s", tp.topic, tp.partition, unreadable.describe())
        return ConsumerRecord(
            tp.topic,
            tp.partition,
            end - 1,
            -1,
            0,
            None,
            None,
            None,
            -1,
            -1,
            ((UNREADABLE_HEADER, unreadable),),
        )


_installed = False


def install() -> None:
    """Patch aiokafka's partition record iterator (idempotent)."""
    global _installed
    if _installed:
        return
    fetcher.PartitionRecords.__init__ = _init
    fetcher.PartitionRecords.__next__ = _next
    _installed = True
