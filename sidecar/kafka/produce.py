"""Producing with the batch API, and what to do when the broker says no.

Outputs go out with aiokafka's ``send_batch`` (about three times the throughput of one
``send()`` per record), partitioned exactly as Kafka's default partitioner would. The batch API
checks no sizes, so record sizes are bounded before they get here (the pipeline turns an
output that does not fit into a dead letter) and batches are capped at what the topics accept.

A partition's records are written into a batch in one C call (:mod:`._batches`: the bytes of
aiokafka's builder, with a hardware CRC-32C) when the extension is compiled and the producer
compresses nothing; else through aiokafka's ``create_batch`` builder, a record at a time.

Produce errors fall in two kinds (:func:`is_permanent`): transient ones (a leader moving, a
timeout, the broker away) are retried with backoff for as long as it takes -- nothing is
committed meanwhile; permanent ones (a record the broker refuses, a topic we may not write)
can never succeed by sending the same bytes again and stop the process with a
:class:`ProduceRefused` that says what to change, instead of an endless resend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidMessageError,
    InvalidRequiredAcksError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
    UnsupportedVersionError,
)

from ..errors import BrokerError
from ..hashing import kafka_partitions

try:
    from . import _batches
except ImportError:  # not compiled here (no C compiler at install): aiokafka's builder
    _batches = None  # type: ignore[assignment]

Headers = list[tuple[str, bytes]]

#: The broker refuses these records (or batches): the same bytes will be refused again.
_REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
    InvalidMessageError,
    InvalidTimestampError,
    UnsupportedForMessageFormatError,
)
#: We may not write there, or it cannot exist: an operator has to act.
_FORBIDDEN = (
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    AuthenticationFailedError,
    InvalidTopicError,
    PolicyViolationError,
    InvalidRequiredAcksError,
    UnsupportedVersionError,
)


def is_permanent(exc: BaseException) -> bool:
    """True for produce errors that retrying the same records can never fix."""
    return isinstance(exc, _REFUSED + _FORBIDDEN)


class ProduceRefused(BrokerError):
    """The broker permanently refused records of ours; the message says what to change."""

    retriable = False


def refusal(exc: KafkaError, topic: str, records: int, size: int) -> ProduceRefused:
    """The :class:`ProduceRefused` for a permanent error on ``records`` records to ``topic``."""
    what = f"{records} record(s), {size} bytes, to {topic}"
    if isinstance(exc, _REFUSED):
        hint = (
            "the topic's max.message.bytes (or the broker's message.max.bytes) is below what "
            "was sent: raise it, or lower kafka.max_record_bytes (outputs larger than that "
            "become dead letters)"
            if isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)
            else "the broker refused the records' format"
        )
    elif isinstance(exc, TopicAuthorizationFailedError | ClusterAuthorizationFailedError):
        hint = f"grant this principal WRITE on topic {topic} (Kafka ACLs)"
    else:
        hint = "check the topic and the client's Kafka settings"
    return ProduceRefused(f"broker refused {what}: {type(exc).__name__}: {exc}; {hint}")


class TopicOutputLike(Protocol):
    keys: list[bytes]
    values: list[bytes]
    headers: list[Headers]

    def __len__(self) -> int: ...


@dataclass(slots=True)
class Delivery:
    """One batch handed to the producer: which records of an output it holds, and the future
    the producer resolves when the broker acknowledged (or refused) them."""

    topic: str
    partition: int
    indices: Sequence[int]
    future: asyncio.Future[Any]
    size: int
    #: The output ``indices`` refer to (to send them again).
    output: TopicOutputLike


class PrebuiltBatch:
    """A record batch built whole by :func:`._batches.build`, in the shape aiokafka's
    producer expects of a ``BatchBuilder`` (``send_batch`` takes it as one): closed, so the
    producer's own ``send()`` never appends to it."""

    __slots__ = ("_buffer", "_count")

    def __init__(self, buffer: bytes, count: int) -> None:
        self._buffer = buffer
        self._count = count

    def append(self, **_: Any) -> None:
        return None  # full: aiokafka starts a new batch

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return True

    def record_count(self) -> int:
        return self._count

    def size(self) -> int:
        return len(self._buffer)

    def _build(self) -> bytes:
        return self._buffer

    def _set_producer_state(
        self, producer_id: int, producer_epoch: int, base_sequence: int
    ) -> None:
        """An idempotent producer's identity and sequence, written in (CRC redone)."""
        assert _batches is not None
        self._buffer = _batches.set_producer(
            self._buffer, producer_id, producer_epoch, base_sequence
        )


class BatchSender:
    """Sends a topic's outputs as one batch per partition (more when a batch fills)."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        partitions: dict[str, int],
        *,
        raw_append: bool = True,
        prebuilt_batch_bytes: int | None = None,
    ) -> None:
        self._producer = producer
        self._partitions = partitions
        #: Append through aiokafka's C record builder directly (see :func:`_append`); False:
        #: its public ``BatchBuilder.append`` (the passthrough benchmark measures plain aiokafka).
        self._raw = raw_append and _RAW_APPEND_OK
        #: Build each batch whole in C up to this size (the producer's ``max_batch_size``);
        #: None: aiokafka's builder. Only for a producer that compresses nothing.
        self._prebuilt = prebuilt_batch_bytes if _batches is not None else None

    async def send(self, topic: str, output: TopicOutputLike) -> list[Delivery]:
        n = len(output)
        if not n:
            return []
        keys = output.keys
        count = self._partitions[topic]
        if len(set(keys[:2])) == 1 and len(set(keys)) == 1:
            groups: list[tuple[int, Sequence[int]]] = [
                (int(kafka_partitions(keys[:1], count)[0]), range(n))
            ]
        else:
            parts = kafka_partitions(keys, count)
            order = np.argsort(parts, kind="stable")
            bounds = np.searchsorted(parts[order], np.arange(count + 1))
            groups = [
                (p, order[bounds[p] : bounds[p + 1]].tolist())
                for p in range(count)
                if bounds[p + 1] > bounds[p]
            ]
        deliveries = []
        for partition, indices in groups:
            deliveries += await self.send_records(topic, partition, output, indices)
        return deliveries

    async def send_records(
        self, topic: str, partition: int, output: TopicOutputLike, indices: Sequence[int]
    ) -> list[Delivery]:
        """Records ``indices`` of ``output``, in that order, to one partition."""
        producer = self._producer
        deliveries: list[Delivery] = []
        # One CreateTime for the records of a call (they are built within a millisecond or
        # two), instead of a clock read per record.
        now_ms = time.time_ns() // 1_000_000
        start, n = 0, len(indices)
        if not n:
            return deliveries
        if self._prebuilt is not None:
            return await self._send_prebuilt(topic, partition, output, indices, now_ms)
        while True:
            builder = producer.create_batch()
            end = _append(builder, output, indices, start, now_ms, self._raw)
            if end == start:  # cannot happen: an empty batch takes any one record
                raise RuntimeError(f"aiokafka refused a record into an empty batch for {topic}")
            deliveries.append(
                await self._submit(builder, topic, partition, output, indices[start:end])
            )
            if end >= n:
                return deliveries
            start = end

    async def _send_prebuilt(
        self,
        topic: str,
        partition: int,
        output: TopicOutputLike,
        indices: Sequence[int],
        now_ms: int,
    ) -> list[Delivery]:
        assert _batches is not None and self._prebuilt is not None
        keys, values, headers = output.keys, output.values, output.headers
        # ``range(len(output))`` (a partition's whole output) needs no index list.
        picks: list[int] | None
        if isinstance(indices, range) and indices == range(len(keys)):
            picks = None
        else:  # a partition's positions are already a list (no copy); a range slice is not
            picks = indices if isinstance(indices, list) else list(indices)
        deliveries: list[Delivery] = []
        start, n = 0, len(indices)
        while start < n:
            data, end = _batches.build(keys, values, headers, picks, start, now_ms, self._prebuilt)
            batch = PrebuiltBatch(data, end - start)
            future = await self._producer.send_batch(batch, topic, partition=partition)
            deliveries.append(
                Delivery(topic, partition, indices[start:end], future, len(data), output)
            )
            start = end
        return deliveries

    async def resend(self, delivery: Delivery) -> list[Delivery]:
        """The records of a failed ``delivery``, sent again."""
        return await self.send_records(
            delivery.topic, delivery.partition, delivery.output, delivery.indices
        )

    async def _submit(
        self,
        builder: Any,
        topic: str,
        partition: int,
        output: TopicOutputLike,
        indices: Sequence[int],
    ) -> Delivery:
        size = builder.size()
        future = await self._producer.send_batch(builder, topic, partition=partition)
        return Delivery(topic, partition, indices, future, size, output)


def _append(
    builder: Any, output: TopicOutputLike, indices: Sequence[int], start: int, ts: int, raw: bool
) -> int:
    """Append records ``indices[start:]`` of ``output`` to ``builder`` (an aiokafka
    ``BatchBuilder``) until it is full; the position of the first record not appended.

    Calls the C record builder behind ``BatchBuilder.append`` directly (its private
    ``_builder``; the wrapper's keyword call and checks cost ~0.2 us a record, a third of
    appending) and keeps the wrapper's record count (``_relative_offset``) as it would. When
    aiokafka's ``BatchBuilder`` no longer looks like that, its public ``append`` is used.
    """
    keys, values, headers = output.keys, output.values, output.headers
    inner = getattr(builder, "_builder", None)
    offset = getattr(builder, "_relative_offset", None)
    if not raw or inner is None or offset != 0 or builder.closed():
        for pos in range(start, len(indices)):
            i = indices[pos]
            if (
                builder.append(key=keys[i], value=values[i], timestamp=ts, headers=headers[i])
                is None
            ):
                return pos
        return len(indices)
    append = inner.append
    pos = start
    n = len(indices)
    while pos < n:
        i = indices[pos]
        if append(offset, ts, keys[i], values[i], headers[i]) is None:
            builder.close()  # as BatchBuilder.append does when full
            break
        offset += 1
        pos += 1
    builder._relative_offset = offset
    return pos


def _raw_append_ok() -> bool:
    """aiokafka's ``BatchBuilder`` still wraps a record builder as ``_builder`` and counts
    records in ``_relative_offset`` (checked once, on a throwaway builder)."""
    try:
        from aiokafka.producer.message_accumulator import BatchBuilder

        probe = BatchBuilder(1 << 10, 0)
        if probe._relative_offset != 0:
            return False
        if probe._builder.append(0, 0, b"k", b"v", []) is None:
            return False
        probe._relative_offset = 1
        return bool(probe.record_count() == 1)
    except Exception:  # any change of shape: use the public append
        return False


_RAW_APPEND_OK = _raw_append_ok()
