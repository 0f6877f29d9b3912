"""Stage 2 of a shared rollout's quality: the Kafka edge of ``QualityMerger``.

Runs inside every ``sidecar outcomes`` when ``topics.comparisons_key = "routing_key"``, as its
own consumer group (``<outcomes.group_id>.merge``) on ``outcomes.partials_topic``. Everything
of a rollout is on one partition of that topic, so each rollout is merged, reported, guarded
and judged by exactly one instance. The topic is compacted and is the merger's whole state: on
every assignment the stage reads its partitions from the beginning, up to a barrier record it
writes there (Tansu's end offsets are not trusted), reporting nothing meanwhile; windows merged
before come back as their ``MergedQualityWindow`` record and are counted once, never reported
again. No offsets are committed: nothing is resumed from them. Retired pairs (see
``partials``) leave the merger, and their records leave the topic as tombstones, so that this
read-back stays bounded by the live pairs' windows however long the stage runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from itertools import chain
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ..config import SidecarConfig
from ..hashing import kafka_partition
from ..kafka import RebalanceListener, new_consumer, stop_quietly
from ..untrusted import clip, error_text, printable
from .heartbeat import MAX_PARTITIONS
from .partials import (
    DECODER,
    MergedQualityWindow,
    MergeOutput,
    QualityMerger,
    merged_key,
    partial_key,
)
from .publish import Publisher, Send
from .report import PairKey

log = logging.getLogger(__name__)

#: At most one warning this often about unusable records (a flood of junk stays one line).
UNDECODABLE_LOG_S = 60.0
#: Key of the barrier records the stage writes to find the end of a partition it reads.
MERGE_BARRIER_KEY = b"merge-barrier"

#: Publishes what the merger says (reports, verdicts, then the merged records).
Publish = Callable[[MergeOutput, int], Awaitable[None]]
#: Told the rollouts of pairs the merger retired (their metric series may go).
Retired = Callable[[set[str]], None]


class QualityMergeStage:
    """Consumes quality partials, hands merged windows to ``publish``."""

    def __init__(
        self,
        config: SidecarConfig,
        publisher: Publisher,
        publish: Publish,
        clock: Callable[[], int],
        on_retired: Retired | None = None,
        *,
        tasks: int = MAX_PARTITIONS,
        on_unusable: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        #: The comparisons topic's partitions: a partial naming more tasks is refused.
        self.tasks = tasks
        #: Called for each record of the topic skipped as unusable (the stage's metrics).
        self._on_unusable = on_unusable
        self._on_retired = on_retired
        self.settings = s = config.outcomes
        self._publisher = publisher
        self._publish = publish
        self._clock = clock
        self.topic = s.partials_topic_name
        self.merger = self._new_merger()
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        #: Per partition being read back: the offset of its barrier (reached: removed).
        self.catching_up: dict[int, int] = {}
        self._last_provisional = 0
        #: What this stage did (tests and logs read these).
        self.partials = 0
        self.merged_read = 0
        self.undecodable = 0
        self._warned_at = -UNDECODABLE_LOG_S
        self._unwarned = 0

    def _new_merger(self) -> QualityMerger:
        s = self.settings
        return QualityMerger(
            s.layout(),
            s.judging(),
            s.merge_timeout_ms,
            s.merge_retire_horizon_ms(),
            max_future_ms=s.max_future_ms,
            max_tasks=self.tasks,
        )

    async def start(self) -> None:
        self._consumer = new_consumer(
            self.config,
            "outcomes-merge",
            group_id=self.settings.merge_group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 << 20,
        )
        await self._consumer.start()
        self._consumer.subscribe(
            [self.topic],
            listener=RebalanceListener(
                "outcomes merge stage", on_revoked=self._revoked, on_assigned=self._assigned
            ),
        )

    @property
    def assignment(self) -> set[int]:
        consumer = self._consumer
        return {tp.partition for tp in consumer.assignment()} if consumer else set()

    @property
    def ready(self) -> bool:
        """Every partition this stage owns is read back up to its barrier."""
        return not self.catching_up

    async def close(self) -> None:
        await stop_quietly(self._consumer)
        self._consumer = None

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            if self.merger.open_windows:
                log.info(
                    "outcomes merge stage rebalanced: %d open windows dropped; the next owner "
                    "reads them back from %s",
                    self.merger.open_windows,
                    self.topic,
                )
            self.merger = self._new_merger()
            self.catching_up = {}

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        async with self._lock:
            # Rebuilt from scratch from every partition owned now (what a revocation left
            # behind included: the merger holds no partition's state alone).
            self.merger = self._new_merger()
            owned = sorted(consumer.assignment(), key=lambda tp: tp.partition)
            self.catching_up = {}
            if not owned:
                return
            await consumer.seek_to_beginning(*owned)
            sent = await self._publisher.send_all(
                [Send(self.topic, b"{}", MERGE_BARRIER_KEY, partition=tp.partition) for tp in owned]
            )
            self.catching_up = {tp.partition: md.offset for tp, md in zip(owned, sent, strict=True)}
            log.info(
                "outcomes merge stage: reading partitions %s of %s back from the beginning",
                sorted(self.catching_up),
                self.topic,
            )

    async def run(self) -> None:
        """Until cancelled (the service's supervisor stops it with the process)."""
        consumer = self._consumer
        assert consumer is not None
        while True:
            polled = await consumer.getmany(timeout_ms=self.settings.fetch_timeout_ms)
            async with self._lock:
                await self.process(list(chain.from_iterable(polled.values())))

    async def process(self, records: list[Any]) -> None:
        """One poll of partials-topic records (possibly none): merge, then report what is due
        once every owned partition is read back."""
        now = self._clock()
        for record in records:
            barrier = self.catching_up.get(record.partition)
            if barrier is not None and record.offset >= barrier:
                del self.catching_up[record.partition]
            if record.key == MERGE_BARRIER_KEY:
                continue
            if record.value is None:
                if record.key is not None and record.key.startswith(b"merged/"):
                    self.merger.forget_merged(record.key)
                continue
            if record.key is not None and record.key.startswith(b"barrier"):
                continue
            try:
                item = DECODER.decode(record.value)
                if isinstance(item, MergedQualityWindow):
                    self.merger.add_merged(item)
                    self.merged_read += 1
                else:
                    self.merger.add(item, now)
                    self.partials += 1
            except (msgspec.DecodeError, ValueError) as exc:  # untrusted, like every topic
                self.undecodable += 1
                if self._on_unusable is not None:
                    self._on_unusable()
                self._unwarned += 1
                if time.monotonic() - self._warned_at >= UNDECODABLE_LOG_S:  # no log flood
                    self._warned_at = time.monotonic()
                    log.warning(
                        "skipped %d unusable partials record(s), the latest %s[%d]@%d: %s",
                        self._unwarned,
                        self.topic,
                        record.partition,
                        record.offset,
                        error_text(exc),
                    )
                    self._unwarned = 0
        if self.catching_up or self._consumer is None or not self.assignment:
            return
        interval = self.settings.provisional_interval_ms
        provisional = now - self._last_provisional >= interval
        out = await asyncio.to_thread(self.merger.due, now, provisional=provisional)
        if provisional:
            self._last_provisional = now
        if out.provisional or out.final:
            await self._publish(out, now)
        await self._retire()

    async def _retire(self) -> None:
        """Tombstone the merged windows (and any partials left) of the pairs the merger
        retires, so that no read-back sees them again."""
        retired = self.merger.retire()
        if not retired:
            return
        consumer = self._consumer
        known = consumer.partitions_for_topic(self.topic) if consumer is not None else None
        n = len(known) if known else 1
        for key, starts, tasks in retired:
            tasks = tasks or n
            partition = kafka_partition(key.rollout.encode(), n)
            sends = [
                Send(self.topic, None, k, partition=partition)
                for ws in starts
                for k in self._keys(key, ws, tasks)
            ]
            await self._publisher.send_all(sends)
            log.info(
                "merge stage: rollout pair retired: %s (%s %s vs %s %s): no window open and "
                "none merged since %d ms of stream time (outcomes.retire_after_ms); %d "
                "merged windows and their partials tombstoned on %s",
                printable(clip(key.rollout, 200)),
                printable(clip(key.candidate_model, 100)),
                printable(clip(key.candidate_version, 100)),
                printable(clip(key.champion_model, 100)),
                printable(clip(key.champion_version, 100)),
                self.merger.retire_horizon_ms,
                len(starts),
                self.topic,
            )
        if self._on_retired is not None:
            self._on_retired({key.rollout for key, _, _ in retired})

    @staticmethod
    def _keys(key: PairKey, ws: int, tasks: int) -> list[bytes]:
        return [merged_key(key, ws)] + [
            partial_key(key, ws, task, status)
            for task in range(tasks)
            for status in ("provisional", "final")
        ]


__all__ = ["MERGE_BARRIER_KEY", "QualityMergeStage"]
