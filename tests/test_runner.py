"""The runner's accounting of batches in flight (sidecar.runner), without Kafka: which
records count against ``pipeline.max_sending_records``."""

from __future__ import annotations

import asyncio

from sidecar.kafka import Delivery
from sidecar.runner import _InFlight, sending_records


def delivery(loop: asyncio.AbstractEventLoop, *, acknowledged: bool) -> Delivery:
    future: asyncio.Future[None] = loop.create_future()
    if acknowledged:
        future.set_result(None)
    return Delivery("decisions", 0, [0], future, 100, None)  # type: ignore[arg-type]


async def batch(
    records: int,
    *,
    acknowledged: bool = True,
    lane: str | None = None,
) -> _InFlight:
    """A batch in flight. ``lane``: None (no candidate stage), "asking" (waiting for the
    candidate's answer), "sending" (its late outputs on their way), "done"."""
    loop = asyncio.get_running_loop()
    entry = _InFlight({}, [delivery(loop, acknowledged=acknowledged)], records)
    if lane is not None:
        gate = loop.create_future()
        entry.lane = asyncio.ensure_future(gate)
        if lane == "done":
            gate.set_result(None)
            await asyncio.sleep(0)
        entry.asking_candidate = lane == "asking"
    return entry


async def test_unacknowledged_batches_and_sending_lanes_count() -> None:
    entries = [
        await batch(100, acknowledged=False),  # decisions not yet acknowledged
        await batch(200, lane="sending"),  # comparisons on their way
        await batch(400),  # all acknowledged: waits only for its commit
        await batch(800, lane="done"),
    ]
    assert sending_records(entries) == 300


async def test_batches_from_one_waiting_for_the_candidate_on_do_not_count() -> None:
    entries = [
        await batch(100, acknowledged=False),
        await batch(200, acknowledged=False, lane="asking"),  # the candidate has not answered
        await batch(400, acknowledged=False),  # behind it: commits wait for it
        await batch(800, lane="sending"),  # its lane waits for the previous one
    ]
    assert sending_records(entries) == 100
    entries[1].asking_candidate = False  # it answered: all of them are the producer's again
    assert sending_records(entries) == 100 + 200 + 400 + 800


async def test_nothing_in_flight_sends_nothing() -> None:
    assert sending_records([]) == 0
