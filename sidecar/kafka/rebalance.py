"""The one consumer-group rebalance listener: logs what moved and calls back the owner."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import ConsumerRebalanceListener, TopicPartition

log = logging.getLogger(__name__)

OnRevoked = Callable[[set[TopicPartition]], Awaitable[None]]
OnAssigned = Callable[[set[TopicPartition]], Awaitable[None] | None]


def format_partitions(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Revocation runs before the group moves on (the owner drains and commits there);
    assignment after. ``name`` says whose partitions move, in the log lines."""

    def __init__(
        self,
        name: str,
        *,
        on_revoked: OnRevoked | None = None,
        on_assigned: OnAssigned | None = None,
    ) -> None:
        self.name = name
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("%s: partitions revoked: %s", self.name, format_partitions(revoked))
        if self._on_revoked is not None:
            await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("%s: partitions assigned: %s", self.name, format_partitions(assigned))
        if self._on_assigned is not None:
            result = self._on_assigned(set(assigned))
            if result is not None:
                await result
