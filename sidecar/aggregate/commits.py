"""Offset commits that make the log the checkpoint of in-memory state.

Both aggregator stages hold state built from records (open windows; windows waiting for
partials) that is not saved anywhere else. Committing past every applied record but never
past the first record such state still holds means a restart or a rebalance re-reads exactly
what it needs to rebuild it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from .actions import commit_points

log = logging.getLogger(__name__)


class SafeCommitter:
    """Tracks a topic's applied offsets and commits them, held back by open state."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._next: dict[int, int] = {}
        self._committed: dict[int, int] = {}

    def applied(self, next_offsets: Mapping[int, int]) -> None:
        """Records below these offsets (per partition) are applied to the state."""
        for p, nxt in next_offsets.items():
            self._next[p] = max(self._next.get(p, 0), nxt)

    def reset(self) -> None:
        """After a revoke: the state is gone and will be rebuilt from the committed offsets."""
        self._next.clear()
        self._committed.clear()

    async def commit(
        self, consumer: AIOKafkaConsumer | None, open_first: Mapping[int, int]
    ) -> None:
        """Commit the safe points of the partitions still owned (failures are logged)."""
        if consumer is None or not self._next:
            return
        points = commit_points(self._next, open_first)
        owned = {tp.partition for tp in consumer.assignment()}
        todo = {
            TopicPartition(self.topic, p): off
            for p, off in points.items()
            if p in owned and self._committed.get(p) != off
        }
        if not todo:
            return
        try:
            await consumer.commit(todo)
            self._committed.update({tp.partition: off for tp, off in todo.items()})
        except CommitFailedError as exc:
            log.warning("commit on %s rejected after a rebalance (%s); re-read", self.topic, exc)
        except KafkaError as exc:
            log.warning("commit on %s failed (%s); may be re-read after a restart", self.topic, exc)


__all__ = ["SafeCommitter"]
