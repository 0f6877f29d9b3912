"""Producing for the outcomes stage: records in order, each acknowledged before the caller
goes on; transient errors retried with backoff, permanent ones stop the stage with what to
change (``sidecar.kafka.produce.refusal``). Many records bound for known partitions (the
router's outcomes) go as record batches (``sidecar.kafka.produce.BatchSender``), about a third
of the cost of a ``send()`` a record."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ..kafka import Backoff, is_permanent, refusal
from ..kafka.produce import BatchSender

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
U = TypeVar("U")
#: A unit handed to the producer and what came of it: its future, or the error at hand-over.
Handed = tuple[U, "asyncio.Future[Any] | KafkaError"]


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

        async def hand_over(i: int) -> list[Handed[int]]:
            s = items[i]
            fut = await self.producer.send(
                s.topic, s.value, key=s.key, partition=s.partition, headers=s.headers
            )
            return [(i, fut)]

        def refused(i: int, error: KafkaError) -> Exception:
            s = items[i]
            return refusal(error, s.topic, 1, len(s.value or b"") + len(s.key or b""))

        def acked(i: int, metadata: Any) -> None:
            results[i] = metadata

        await self._until_acked(list(range(len(items))), hand_over, refused, acked, "records")
        return results

    async def send_partitioned(self, topic: str, records: dict[int, PartitionRecords]) -> None:
        """``records[p]`` to partition ``p`` of ``topic``, each partition's in order, as record
        batches; returns once every record is acknowledged, retrying as :meth:`send_all`
        does (a batch that failed is sent again whole: at-least-once)."""
        Unit = tuple[int, Sequence[int]]  # a partition and positions of its records

        async def hand_over(unit: Unit) -> list[Handed[Unit]]:
            p, indices = unit
            deliveries = await self._batches.send_records(topic, p, records[p], indices)
            return [((p, d.indices), d.future) for d in deliveries]

        def refused(unit: Unit, error: KafkaError) -> Exception:
            recs = records[unit[0]]
            size = sum(len(recs.values[i]) + len(recs.keys[i]) for i in unit[1])
            return refusal(error, topic, len(unit[1]), size)

        units: list[Unit] = [(p, range(len(r))) for p, r in records.items() if len(r)]
        await self._until_acked(units, hand_over, refused, None, f"record batches for {topic}")

    async def _until_acked(
        self,
        units: list[U],
        hand_over: Callable[[U], Awaitable[list[Handed[U]]]],
        refused: Callable[[U, KafkaError], Exception],
        acked: Callable[[U, Any], None] | None,
        what: str,
    ) -> None:
        """Hand every unit over, in order, then await them all; send the failed ones again
        with backoff for ``retry_for_s``; a permanent error raises ``refused(unit, error)``."""
        deadline = time.monotonic() + self.retry_for_s
        backoff = Backoff(0.2, 5.0)
        todo = units
        while todo:
            handed: list[tuple[U, asyncio.Future[Any] | KafkaError]] = []
            for unit in todo:
                try:
                    handed += await hand_over(unit)
                except KafkaError as exc:
                    handed.append((unit, exc))
            failed: list[tuple[U, KafkaError]] = []
            for unit, outcome in handed:
                if isinstance(outcome, KafkaError):
                    failed.append((unit, outcome))
                    continue
                try:
                    metadata = await outcome
                except KafkaError as exc:
                    failed.append((unit, exc))
                    continue
                if acked is not None:
                    acked(unit, metadata)
            if not failed:
                return
            unit, error = failed[0]
            if is_permanent(error):
                raise refused(unit, error) from error
            if time.monotonic() > deadline:
                raise error
            log.warning(
                "%d of %d %s refused (%s: %s); re-sending in %.1fs",
                len(failed),
                len(handed),
                what,
                type(error).__name__,
                error,
                backoff.delay,
            )
            await backoff.wait()
            todo = [unit for unit, _ in failed]


__all__ = ["PartitionRecords", "Publisher", "Send"]
