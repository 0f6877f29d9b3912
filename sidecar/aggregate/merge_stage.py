"""Stage 2 of a shared rollout: the Kafka edge of ``PartialMerger``.

Runs inside every ``sidecar aggregate`` when ``topics.comparisons_key = "routing_key"``, as its
own consumer group (``<aggregate.group_id>.merge``) on ``aggregate.partials_topic``. Partials
are keyed by rollout, so each rollout is merged, reported and guarded by exactly one instance.
Offsets of the partials topic are committed only up to the first partial of a window still
waiting for the others: after a restart or a rebalance the new owner re-reads them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from itertools import chain
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ..config import SidecarConfig
from ..contracts import DeadLetterKind
from ..kafka import RebalanceListener, new_consumer, stop_quietly
from ..untrusted import error_text
from .admission import Admission
from .commits import SafeCommitter
from .metrics import AggregateMetrics
from .partials import PartialMerger, WindowPartial
from .report import WindowReport

log = logging.getLogger(__name__)

_DECODER = msgspec.json.Decoder(WindowPartial)

#: Publishes merged reports (and runs the guards on them): the service's ``_publish``.
Publish = Callable[[list[WindowReport], int], Awaitable[None]]
#: Dead-letters records with their kind and reason.
DeadLetter = Callable[[list[tuple[Any, DeadLetterKind, str]]], Awaitable[None]]


class MergeStage:
    """Consumes partials, merges complete (or timed-out) windows, hands reports to ``publish``."""

    def __init__(
        self,
        config: SidecarConfig,
        publish: Publish,
        clock: Callable[[], int],
        metrics: AggregateMetrics,
        dead_letter: DeadLetter | None = None,
        admission: Admission | None = None,
        partitions: Callable[[], int | None] | None = None,
    ) -> None:
        self.config = config
        #: The comparisons topic's partition count as known now (bounds what a window waits for).
        self._partitions = partitions
        self._dead_letter = dead_letter
        self._admission = admission
        self.settings = config.aggregate
        self._publish = publish
        self._clock = clock
        self._metrics = metrics
        self._topic = self.settings.partials_topic
        self.merger = self._new_merger()
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._commits = SafeCommitter(self._topic)
        #: What this stage did (tests read these).
        self.partials = 0
        self.late_partials = 0
        self.undecodable = 0

    def _new_merger(self) -> PartialMerger:
        return PartialMerger(
            self.settings.aggregator_config(), self.settings.merge_timeout_ms, self._partitions
        )

    async def start(self) -> None:
        self._consumer = new_consumer(
            self.config,
            "aggregator-merge",
            group_id=f"{self.settings.group_id}.merge",
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        self._consumer.subscribe(
            [self._topic], listener=RebalanceListener("merge stage", on_revoked=self._revoked)
        )

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        await self.on_revoked()

    @property
    def assignment(self) -> set[int]:
        """Partials-topic partitions this instance merges now."""
        consumer = self._consumer
        return {tp.partition for tp in consumer.assignment()} if consumer else set()

    async def close(self) -> None:
        await stop_quietly(self._consumer)
        self._consumer = None

    async def run(self, stopping: asyncio.Event) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not stopping.is_set():
            polled = await consumer.getmany(timeout_ms=self.settings.fetch_timeout_ms)
            async with self._lock:
                await self.process(list(chain.from_iterable(polled.values())))
        async with self._lock:
            await self._commit()

    async def process(self, records: list[Any]) -> None:
        """One poll of partial records (possibly none): merge, report, commit."""
        now = self._clock()
        reports: list[WindowReport] = []
        refused: list[tuple[Any, DeadLetterKind, str]] = []
        for record in records:
            try:
                partial = _DECODER.decode(record.value)
                admission = self._admission
                if admission is not None and not admission.admit(partial.key):
                    admission.refused += 1
                    refused.append((record, "out_of_range", admission.reason(partial.key)))
                    continue
                result = self.merger.add(partial, (record.partition, record.offset), now)
            except Exception as exc:  # untrusted, like every topic: skip it, never stop
                self.undecodable += 1
                self._metrics.undecodable.inc()
                log.warning(
                    "skipped partial %s[%d]@%d: %s",
                    self._topic,
                    record.partition,
                    record.offset,
                    error_text(exc),
                )
                kind: DeadLetterKind = (
                    "decode" if isinstance(exc, msgspec.DecodeError) else "schema"
                )
                if isinstance(exc, msgspec.ValidationError):
                    kind = "schema"
                refused.append((record, kind, f"not a usable WindowPartial: {error_text(exc)}"))
                continue
            self.partials += 1
            self.late_partials += result.late_partials
            reports += result.reports
        reports += self.merger.tick(now)
        if refused and self._dead_letter is not None:
            await self._dead_letter(refused)
        if reports:
            await self._publish(reports, now)
        self._commits.applied({r.partition: r.offset + 1 for r in records})
        await self._commit()

    async def _commit(self) -> None:
        await self._commits.commit(self._consumer, self.merger.open_first_offsets())

    async def on_revoked(self) -> None:
        """Commit what is safe, drop pending windows (the new owner re-reads their partials)."""
        async with self._lock:
            await self._commit()
            if self.merger.pending_windows:
                log.info(
                    "merge stage rebalanced: dropping %d pending windows; their partials are "
                    "re-read from the committed offsets",
                    self.merger.pending_windows,
                )
            self.merger = self._new_merger()
            self._commits.reset()


__all__ = ["MergeStage"]
