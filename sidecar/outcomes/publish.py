"""Producing for the outcomes stage: records in order, each acknowledged before the caller
goes on; transient errors retried with backoff, permanent ones stop the stage with what to
change (``sidecar.kafka.produce.refusal``). Many records bound for known partitions (the
router's outcomes) go as record batches (``sidecar.kafka.produce.BatchSender``), about a third
of the cost of a ``send()`` a record."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ..kafka import Backoff, is_permanent, refusal
from ..kafka.produce import BatchSender

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Send:
    topic: str
    value: bytes | None
    key: bytes | None
    partition: int | None = None
    headers: Headers | None = None


@dataclass(slots=True)
class PartitionRecords:
    """Records for one partition, in order (keys, values and headers side by side)."""

    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    headers: list[Headers] = field(default_factory=list)

    def add(self, key: bytes, value: bytes, headers: Headers | None = None) -> None:
        self.keys.append(key)
        self.values.append(value)
        self.headers.append(headers or [])

    def __len__(self) -> int:
        return len(self.values)


class Publisher:
    """At-least-once sends through one producer: a record may be written twice after a
    retried error, none is skipped; a caller goes on only once every record is acknowledged."""

    def __init__(
        self, producer: AIOKafkaProducer, retry_for_s: float, *, batch_bytes: int | None = None
    ) -> None:
        self.producer = producer
        self.retry_for_s = retry_for_s
        #: ``batch_bytes``: the producer's batch size when it compresses nothing (batches are
        #: then built whole in C), else None (aiokafka's batch builder).
        self._batches = BatchSender(producer, {}, prebuilt_batch_bytes=batch_bytes)

    async def send(self, item: Send) -> Any:
        """One record; its metadata (``.offset``, ``.partition``) once acknowledged."""
        return (await self.send_all([item]))[0]

    async def send_all(self, items: list[Send]) -> list[Any]:
        """Every record, handed over in order, then awaited; metadata in the same order."""
        results: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        deadline = time.monotonic() + self.retry_for_s
        backoff = Backoff(0.2, 5.0)
        while todo:
            handed: list[tuple[int, asyncio.Future[Any] | KafkaError]] = []
            for i in todo:
                s = items[i]
                try:
                    fut = await self.producer.send(
                        s.topic, s.value, key=s.key, partition=s.partition, headers=s.headers
                    )
                    handed.append((i, fut))
                except KafkaError as exc:
                    handed.append((i, exc))
            failed: list[tuple[int, KafkaError]] = []
            for i, outcome in handed:
                if isinstance(outcome, KafkaError):
                    failed.append((i, outcome))
                    continue
                try:
                    results[i] = await outcome
                except KafkaError as exc:
                    failed.append((i, exc))
            if not failed:
                return results
            i, error = failed[0]
            if is_permanent(error):
                s = items[i]
                raise refusal(error, s.topic, 1, len(s.value or b"") + len(s.key or b"")) from error
            if time.monotonic() > deadline:
                raise error
            log.warning(
                "%d of %d records refused (%s: %s); re-sending in %.1fs",
                len(failed),
                len(todo),
                type(error).__name__,
                error,
                backoff.delay,
            )
            await backoff.wait()
            todo = [i for i, _ in failed]
        return results

    async def send_partitioned(self, topic: str, records: dict[int, PartitionRecords]) -> None:
        """``records[p]`` to partition ``p`` of ``topic``, each partition's in order, as record
        batches; returns once every record is acknowledged, retrying as :meth:`send_all`
        does (a batch that failed is sent again whole: at-least-once)."""
        todo: list[tuple[int, Sequence[int]]] = [
            (p, range(len(recs))) for p, recs in records.items() if len(recs)
        ]
        deadline = time.monotonic() + self.retry_for_s
        backoff = Backoff(0.2, 5.0)
        while todo:
            handed: list[tuple[tuple[int, Sequence[int]], asyncio.Future[Any] | KafkaError]] = []
            for p, indices in todo:
                try:
                    for d in await self._batches.send_records(topic, p, records[p], indices):
                        handed.append(((p, d.indices), d.future))
                except KafkaError as exc:
                    handed.append(((p, indices), exc))
            failed: list[tuple[tuple[int, Sequence[int]], KafkaError]] = []
            for unit, outcome in handed:
                if isinstance(outcome, KafkaError):
                    failed.append((unit, outcome))
                    continue
                try:
                    await outcome
                except KafkaError as exc:
                    failed.append((unit, exc))
            if not failed:
                return
            (p, indices), error = failed[0]
            if is_permanent(error):
                recs = records[p]
                size = sum(len(recs.values[i]) + len(recs.keys[i]) for i in indices)
                raise refusal(error, topic, len(indices), size) from error
            if time.monotonic() > deadline:
                raise error
            log.warning(
                "%d record batches for %s refused (%s: %s); re-sending in %.1fs",
                len(failed),
                topic,
                type(error).__name__,
                error,
                backoff.delay,
            )
            await backoff.wait()
            todo = [unit for unit, _ in failed]


__all__ = ["PartitionRecords", "Publisher", "Send"]
