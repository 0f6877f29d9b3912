"""The router's heartbeats: how far may stream time go on the outcomes' account?"""

from __future__ import annotations

import msgspec
from records import Rec

from sidecar.outcomes.heartbeat import (
    HEARTBEAT_HEADER,
    PartitionProgress,
    RouterHeartbeat,
    heartbeat_of,
    outcomes_bound,
)


def beat(member: str, at: int = 1000, **parts: tuple[int, bool]) -> RouterHeartbeat:
    return RouterHeartbeat(
        member=member,
        total=3,
        partitions={int(k[1:]): PartitionProgress(*v) for k, v in parts.items()},
        at_ms=at,
    )


def test_the_slowest_outcome_partition_bounds_stream_time() -> None:
    """The router read partition 0 to t=9000 but partition 2 only to t=4000: a task has the
    outcomes of partition 0 up to 9000 and must not act as if it had partition 2's."""
    beats = [beat("a", p0=(9000, False), p1=(8000, True), p2=(4000, False))]
    assert outcomes_bound(beats, now_ms=1500, fresh_ms=1000) == 4000
    # Everything routed to its end: no bound.
    done = [beat("a", p0=(9000, True), p1=(8000, True), p2=(4000, True))]
    assert outcomes_bound(done, 1500, 1000) is None


def test_members_share_partitions_and_silence_holds() -> None:
    a = beat("a", p0=(9000, True), p1=(7000, False))
    b = beat("b", p2=(5000, False))
    assert outcomes_bound([a, b], 1500, 1000) == 5000
    # Member b stopped speaking (old heartbeat): its partition holds stream time.
    assert outcomes_bound([a, beat("b", at=100, p2=(5000, True))], 1500, 1000) == -1
    # Before any heartbeat (a start, a rebalance): held.
    assert outcomes_bound([], 1500, 1000) == -1
    # The latest word on a partition counts (a rebalance moved it from b to a).
    moved = beat("a", at=1200, p0=(9000, True), p1=(7000, True), p2=(6000, True))
    assert outcomes_bound([a, b, moved], 1500, 1000) is None


def test_only_a_marked_well_formed_record_is_a_heartbeat() -> None:
    value = msgspec.json.encode(beat("a", p0=(1, True)))
    marked = Rec(value, headers=((HEARTBEAT_HEADER, b"1"),))
    assert heartbeat_of(marked) == beat("a", p0=(1, True))
    assert heartbeat_of(Rec(value)) is None  # no header: an outcome (or garbage)
    forged = Rec(b"\xff not json", headers=((HEARTBEAT_HEADER, b"1"),))
    assert heartbeat_of(forged) is None
    # A heartbeat claiming a billion partitions would make every stream-time step loop over
    # them: refused at decode.
    huge = msgspec.json.encode({"member": "a", "total": 10**9, "partitions": {}, "at_ms": 1})
    assert heartbeat_of(Rec(huge, headers=((HEARTBEAT_HEADER, b"1"),))) is None


def test_a_heartbeat_dated_ahead_does_not_count() -> None:
    """A router with a clock far ahead would otherwise stay "fresh" for ever."""
    ahead = beat("a", at=1_000_000, p0=(9000, True), p1=(9000, True), p2=(9000, True))
    assert outcomes_bound([ahead], now_ms=1500, fresh_ms=1000) == -1
