"""The router's heartbeats: how far a join task has received each outcome partition.

The router writes outcomes of several ordered source partitions into one task partition,
interleaved, so the largest outcome time a task has read says nothing about the partitions the
router has not got to yet. Every ``HEARTBEAT_S`` each router member therefore tells every task
partition, for each outcome partition it owns, the largest event time it has routed from it
and whether it has routed everything there is (read up to the high watermark of its last
fetch answer). A heartbeat follows the outcomes it speaks of on the same partition, so a task
that reads it has read them. :func:`outcomes_bound` turns the heartbeats into how far stream
time may go on the outcomes' account.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import msgspec

#: More partitions than any topic has: a heartbeat claiming more is no heartbeat (it would
#: make :func:`outcomes_bound` loop over them).
MAX_PARTITIONS = 65_536
_Partitions = Annotated[int, msgspec.Meta(ge=0, le=MAX_PARTITIONS)]

#: Seconds between a router member's heartbeats to the task partitions.
HEARTBEAT_S = 0.5
#: Header that marks a heartbeat on ``<group_id>.by-task`` (its value is JSON).
HEARTBEAT_HEADER = "sidecar-router-heartbeat"


class PartitionProgress(msgspec.Struct, frozen=True, array_like=True):
    """One outcome partition: the largest event time routed from it (-1: none yet), and
    whether it is routed up to its end."""

    routed_ms: int
    caught_up: bool


class RouterHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """A router member's word to a task, by outcome partition it owns."""

    member: Annotated[str, msgspec.Meta(max_length=256)]
    #: Partitions of the outcomes topic (all members, all partitions).
    total: _Partitions
    partitions: Annotated[dict[int, PartitionProgress], msgspec.Meta(max_length=MAX_PARTITIONS)]
    at_ms: int


_BEAT = msgspec.json.Decoder(RouterHeartbeat)


def heartbeat_of(record: Any) -> RouterHeartbeat | None:
    """The heartbeat a by-task record carries, or None (an outcome, or something else)."""
    headers = getattr(record, "headers", None)
    if not headers:  # a routed outcome: no headers (checked first: one a record)
        return None
    if not any(key == HEARTBEAT_HEADER for key, _ in headers):
        return None
    try:
        return _BEAT.decode(record.value)
    except Exception:  # untrusted: a forged or broken heartbeat is no heartbeat
        return None


def outcomes_bound(beats: Iterable[RouterHeartbeat], now_ms: int, fresh_ms: int) -> int | None:
    """How far stream time may go on the outcomes' account: the smallest routed event time
    over the outcome partitions not routed to their end; None when every partition is routed
    to its end (no bound). A partition no fresh heartbeat (within ``fresh_ms``) speaks of --
    a router restarting, rebalancing, or behind -- holds it where it is (-1)."""
    latest: dict[int, PartitionProgress] = {}
    total = 0
    for beat in sorted(beats, key=lambda b: b.at_ms):
        if abs(now_ms - beat.at_ms) > fresh_ms:  # stale, or dated ahead (a wrong clock)
            continue
        total = max(total, beat.total)
        latest.update(beat.partitions)
    if total == 0:
        return -1
    bound: int | None = None
    for p in range(total):
        progress = latest.get(p)
        if progress is None:
            return -1
        if not progress.caught_up:
            bound = progress.routed_ms if bound is None else min(bound, progress.routed_ms)
    return bound


__all__ = [
    "HEARTBEAT_HEADER",
    "HEARTBEAT_S",
    "PartitionProgress",
    "RouterHeartbeat",
    "heartbeat_of",
    "outcomes_bound",
]
