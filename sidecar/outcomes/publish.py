"""Producing for the outcomes stage: records in order, each acknowledged before the caller
goes on; transient errors retried with backoff, permanent ones stop the stage with what to
change (``sidecar.kafka.produce.refusal``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ..kafka import Backoff, is_permanent, refusal

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Send:
    topic: str
    value: bytes | None
    key: bytes | None
    partition: int | None = None
    headers: Headers | None = None


class Publisher:
    """At-least-once sends through one producer: a record may be written twice after a
    retried error, none is skipped; a caller goes on only once every record is acknowledged."""

    def __init__(self, producer: AIOKafkaProducer, retry_for_s: float) -> None:
        self.producer = producer
        self.retry_for_s = retry_for_s

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


__all__ = ["Publisher", "Send"]
