"""Producing with the batch API, and what to do when the broker says no.

Outputs go out with aiokafka's ``create_batch``/``send_batch`` (about three times the
throughput of one ``send()`` per record), partitioned exactly as Kafka's default partitioner
would. The batch API checks no sizes, so record sizes are bounded before they get here (the
pipeline turns an output that does not fit into a dead letter) and batches are capped at what
the topics accept.

Produce errors fall in two kinds (:func:`is_permanent`): transient ones (a leader moving, a
timeout, the broker away) are retried with backoff for as long as it takes -- nothing is
committed meanwhile; permanent ones (a record the broker refuses, a topic we may not write)
can never succeed by sending the same bytes again and stop the process with a
:class:`ProduceRefused` that says what to change, instead of an endless resend.
"""

from __future__ import annotations

import asyncio
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


class BatchSender:
    """Sends a topic's outputs as one batch per partition (more when a batch fills)."""

    def __init__(self, producer: AIOKafkaProducer, partitions: dict[str, int]) -> None:
        self._producer = producer
        self._partitions = partitions

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
        keys, values, headers = output.keys, output.values, output.headers
        deliveries = []
        builder = producer.create_batch()
        start = 0
        for pos, i in enumerate(indices):
            appended = builder.append(
                key=keys[i], value=values[i], timestamp=None, headers=headers[i]
            )
            if appended is not None:
                continue
            # Full: send what it holds and start the next batch with this record.
            deliveries.append(
                await self._submit(builder, topic, partition, output, indices[start:pos])
            )
            builder = producer.create_batch()
            builder.append(key=keys[i], value=values[i], timestamp=None, headers=headers[i])
            start = pos
        deliveries.append(await self._submit(builder, topic, partition, output, indices[start:]))
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
