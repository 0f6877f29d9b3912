"""The outcome router: outcomes keyed any way -> the join task that holds their comparison.

Producers key outcomes as they like (by transaction id, say); the join needs each outcome on the
partition of ``<group_id>.by-task`` whose number is the comparison partition of its request
(co-partitioning, as Kafka Streams repartitions). Where that is:

* comparisons keyed by routing key (``topics.comparisons_key = "routing_key"``): the partition
  of the outcome's ``routing_key`` (``request_id`` when it has none, as the sidecar keys a
  request without one);
* comparisons keyed by rollout (the default): the partition of each rollout the stage judges
  (``rollout.name`` and the names under ``[outcomes.rollouts]``): an outcome does not say its
  rollout, so it goes to each of them and meets the comparison where there is one.

The router is a consumer group of its own (``<group_id>.router``) on the outcomes topic. Every
``HEARTBEAT_S`` each member also sends a heartbeat to every task partition: for each outcome
partition it owns, the largest event time routed and whether it is routed to its end
(:mod:`sidecar.outcomes.heartbeat`). Tasks bound stream time by them, so a router that is
restarting, rebalancing or behind holds windows open instead of letting them become final
before their outcomes arrive. A record that is no
``Outcome`` (or is dated more than ``max_future_ms`` ahead, or before 1973: a time in seconds)
becomes a dead
letter with its reason, like a bad request; offsets are committed once its outputs are
acknowledged (at-least-once: a repeated outcome is harmless, the join combines outcomes
idempotently).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from itertools import chain
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ..config import SidecarConfig
from ..contracts import DeadLetterKind
from ..dead_letters import DeadLetterWriter, keep_bytes
from ..hashing import kafka_partitions
from ..kafka import RebalanceListener, new_consumer, stop_quietly, topic_partitions
from ..kafka.unreadable import unreadable_of
from .contract import MIN_PLAUSIBLE_MS, Outcome, decode_outcome, encode_outcome
from .heartbeat import HEARTBEAT_HEADER, HEARTBEAT_S, PartitionProgress, RouterHeartbeat
from .metrics import OutcomesMetrics
from .publish import PartitionRecords, Publisher, Send

log = logging.getLogger(__name__)


def rollout_names(cfg: SidecarConfig) -> list[str]:
    """The rollouts whose partitions outcomes go to when comparisons are keyed by rollout."""
    return sorted({cfg.rollout.name, *cfg.outcomes.rollouts})


class Targets:
    """Which task partitions an outcome goes to."""

    def __init__(self, cfg: SidecarConfig, partitions: int) -> None:
        self.partitions = partitions
        self.by_routing_key = cfg.shared_rollouts
        names = rollout_names(cfg)
        self.fixed = sorted(set(kafka_partitions([n.encode() for n in names], partitions).tolist()))

    def of(self, outcomes: list[Outcome]) -> list[list[int]]:
        if not self.by_routing_key:
            return [self.fixed] * len(outcomes)
        keys = [(o.routing_key or o.request_id).encode() for o in outcomes]
        return [[p] for p in kafka_partitions(keys, self.partitions).tolist()] if keys else []


class OutcomeRouter:
    """Consumes the outcomes topic in its own group and forwards to ``<group_id>.by-task``."""

    def __init__(
        self,
        cfg: SidecarConfig,
        publisher: Publisher,
        metrics: OutcomesMetrics,
        clock: Callable[[], int],
    ) -> None:
        self.cfg = cfg
        self.settings = cfg.outcomes
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.writer = DeadLetterWriter(
            keep_bytes(cfg.dead_letter.max_value_bytes, cfg.kafka.max_record_bytes)
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.targets: Targets | None = None
        self.routed = 0
        self.dead_lettered = 0
        self.member = uuid.uuid4().hex[:12]
        self._last_beat = 0.0
        #: Largest event time routed per outcome partition (since this member owns it).
        self.routed_ms: dict[int, int] = {}

    async def start(self, comparison_partitions: int) -> None:
        self.targets = Targets(self.cfg, comparison_partitions)
        self.consumer = new_consumer(
            self.cfg,
            "outcomes-router",
            group_id=self.settings.router_group,
            auto_offset_reset="earliest",
        )
        await self.consumer.start()
        await topic_partitions(self.consumer, self.settings.topic, wait_s=10.0)
        self.consumer.subscribe([self.settings.topic], listener=RebalanceListener("router"))

    async def close(self) -> None:
        await stop_quietly(self.consumer)
        self.consumer = None

    async def run(self) -> None:
        """Route until cancelled."""
        consumer = self.consumer
        assert consumer is not None
        while True:
            polled = await consumer.getmany(
                timeout_ms=self.settings.fetch_timeout_ms, max_records=self.settings.max_batch
            )
            if polled:
                await self.route(list(chain.from_iterable(polled.values())))
                await self._commit(consumer, polled)
            if time.monotonic() - self._last_beat >= HEARTBEAT_S:
                await self.heartbeat()

    async def heartbeat(self) -> None:
        """Tell every task partition, for each outcome partition this member owns, the largest
        event time routed and whether it is routed up to the high watermark of its last fetch
        answer (from the fetch response: Tansu's ListOffsets answer can be wrong, its fetch
        responses are not; an empty poll is no evidence, a fetch may be in flight)."""
        consumer, targets = self.consumer, self.targets
        assert consumer is not None and targets is not None
        self._last_beat = time.monotonic()
        owned = {tp.partition: tp for tp in consumer.assignment()}
        for gone in set(self.routed_ms) - set(owned):  # revoked: another member speaks now
            del self.routed_ms[gone]
        partitions = {}
        for p, tp in sorted(owned.items()):
            high = consumer.highwater(tp)
            done = high is not None and await consumer.position(tp) >= high
            partitions[p] = PartitionProgress(self.routed_ms.get(p, -1), done)
        beat = RouterHeartbeat(
            member=self.member,
            total=len(consumer.partitions_for_topic(self.settings.topic) or ()),
            partitions=partitions,
            at_ms=self.clock(),
        )
        value = msgspec.json.encode(beat)
        headers = [(HEARTBEAT_HEADER, b"1")]
        topic = self.settings.by_task_topic
        await self.publisher.send_all(
            [Send(topic, value, b"heartbeat", p, headers) for p in range(targets.partitions)]
        )

    async def route(self, records: list[Any]) -> None:
        """Forward ``records`` (any partitions) and dead-letter the bad ones; returns once
        every output is acknowledged."""
        assert self.targets is not None
        now = self.clock()
        limit = now + self.settings.max_future_ms
        good: list[Outcome] = []
        sends: list[Send] = []
        for rec in records:
            skipped = unreadable_of(rec)
            if skipped is not None:
                sends.append(self._dead_letter(rec, "unreadable", skipped.describe()))
                continue
            got = decode_outcome(rec.value)
            if not isinstance(got, Outcome):
                sends.append(self._dead_letter(rec, *got))
            elif got.ts > limit:
                reason = (
                    f"outcome time {got.ts} is {(got.ts - now) / 1000:.0f}s ahead of the "
                    "clock (outcomes.max_future_ms): it would make quality windows final early"
                )
                sends.append(self._dead_letter(rec, "event_time", reason, got.request_id))
            elif got.ts < MIN_PLAUSIBLE_MS:
                reason = (
                    f"outcome time {got.ts} is before 1973 in epoch milliseconds: is it in "
                    "seconds? Outcome.ts is epoch milliseconds"
                )
                sends.append(self._dead_letter(rec, "event_time", reason, got.request_id))
            else:
                good.append(got)
                part = rec.partition
                self.routed_ms[part] = max(self.routed_ms.get(part, -1), got.ts)
        by_task: dict[int, PartitionRecords] = {}
        for outcome, parts in zip(good, self.targets.of(good), strict=True):
            value = encode_outcome(outcome)
            key = outcome.request_id.encode()
            for p in parts:
                task = by_task.get(p)
                if task is None:
                    task = by_task[p] = PartitionRecords()
                task.add(key, value)
        if sends:  # dead letters (rare): a record at a time
            await self.publisher.send_all(sends)
        await self.publisher.send_partitioned(self.settings.by_task_topic, by_task)
        self.routed += len(good)
        self.metrics.routed.inc(len(good))

    def _dead_letter(
        self, rec: Any, kind: DeadLetterKind, reason: str, request_id: str | None = None
    ) -> Send:
        self.dead_lettered += 1
        self.metrics.dead_letters.labels(kind).inc()
        key, value, headers = self.writer.encode(rec, kind, reason, request_id)
        return Send(self.cfg.topics.dead_letter, value, key, headers=headers)

    async def _commit(
        self, consumer: AIOKafkaConsumer, polled: dict[TopicPartition, list[Any]]
    ) -> None:
        offsets = {tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs}
        owned = consumer.assignment()
        todo = {tp: off for tp, off in offsets.items() if tp in owned}
        if not todo:
            return
        try:
            await consumer.commit(todo)
        except Exception as exc:  # a rebalance took them: the new owner re-routes (harmless)
            log.warning("router: commit failed (%s); those outcomes may be routed again", exc)


__all__ = ["OutcomeRouter", "Targets", "rollout_names"]
