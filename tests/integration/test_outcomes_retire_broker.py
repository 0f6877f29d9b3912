"""``sidecar outcomes`` on a real broker retires finished, idle rollout pairs: with room for
two pairs per task, two candidate versions finish and go idle, and two new ones are then
judged (refused before pairs were retired); the changelog replayed into a fresh store gives
the same state."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from kafka_helpers import create_topics, produce, read_topic, wait_until
from outcomes.outcome_support import Stream, final_reports, outcomes_config, stream

from sidecar.contracts import Comparison
from sidecar.outcomes.chunks import decode
from sidecar.outcomes.service import BARRIER_KEY, OutcomesService

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def versioned(s: Stream, version: str) -> Stream:
    """``s`` with its candidate at ``version`` (another rollout pair)."""
    out = []
    for key, raw in s.comparisons:
        comp = msgspec.json.decode(raw, type=Comparison)
        candidate = msgspec.structs.replace(comp.candidate, version=version)
        out.append((key, msgspec.json.encode(msgspec.structs.replace(comp, candidate=candidate))))
    s.comparisons = out
    return s


def finals(service: OutcomesService) -> set[str]:
    """Candidate versions with a final report published."""
    return {r.candidate.version for r in service.recent if r.status == "final"}


async def test_finished_idle_pairs_are_retired_and_new_ones_take_their_slots(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = outcomes_config(
        bootstrap,
        tmp_path / "state",
        outcomes={"max_pairs_per_task": 2, "retire_after_ms": 3000},
    )
    await create_topics(cfg)
    now = time.time_ns() // 1_000_000
    old = [
        versioned(stream(200, seed=i, prefix=f"a{i}-", t0=now - 40_000, span_ms=3000), v)
        for i, v in enumerate(("2.1.0", "2.2.0"))
    ]
    for s in old:
        await produce(cfg, s.comparisons, cfg.topics.comparisons)
        await produce(cfg, s.outcomes, cfg.outcomes.topic)
    service = OutcomesService(cfg)
    run = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: finals(service) >= {"2.1.0", "2.2.0"}, timeout_s=60)

        def retired() -> int:
            return sum(rt.join.meta.retired for rt in service.tasks.values() if rt.join)

        # Both pairs finish (every window final) and idle past retire_after_ms: retired.
        await wait_until(lambda: retired() >= 2 or run.done(), timeout_s=60)
        assert retired() == 2
        assert service.metrics.quality_diff.collect()[0].samples == []  # series gone
        # Two new candidate versions: the task's two slots are free for them.
        now = time.time_ns() // 1_000_000
        new = [
            versioned(stream(200, seed=10 + i, prefix=f"b{i}-", t0=now - 3000, span_ms=2000), v)
            for i, v in enumerate(("3.0.0", "3.1.0"))
        ]
        for s in new:
            await produce(cfg, s.comparisons, cfg.topics.comparisons)
            await produce(cfg, s.outcomes, cfg.outcomes.topic)
        await wait_until(lambda: finals(service) >= {"3.0.0", "3.1.0"} or run.done(), 60)
        assert service.applied.refused == 0
        assert service.applied.comparisons == 800
        judged: dict[str, int] = {}
        for (_, _, version, _), report in final_reports(list(service.recent)).items():
            judged[version] = judged.get(version, 0) + report.counts.records
        assert judged["3.0.0"] == judged["3.1.0"] == 200  # every request of both, judged
        (task,) = [rt for rt in service.tasks.values() if rt.join and rt.join.meta.retired]
        partition = task.partition
    finally:
        service.request_stop()
        await run
    # A restart from the changelog alone (the store lost) lands on the same state.
    records = await read_topic(bootstrap, cfg.outcomes.changelog_topic, idle_s=1.0)
    mine = sorted((r for r in records if r.partition == partition), key=lambda r: r.offset)
    live = service._open(tmp_path / "state" / f"task-{partition}", partition)
    rebuilt = service._open(tmp_path / "rebuilt", partition)
    try:
        for rec in mine:
            if rec.key == BARRIER_KEY:
                rebuilt.skip(rec.offset)
            else:
                rebuilt.apply(decode(rec.value), rec.offset)
        assert rebuilt.meta == live.meta and rebuilt.meta.retired >= 2
        assert rebuilt.pairs == live.pairs
        assert dict(rebuilt.store.scan(b"")) == dict(live.store.scan(b""))
        versions = {p.key.candidate_version for p in live.pairs.values()}
        assert not versions & {"2.1.0", "2.2.0"}
    finally:
        live.store.close()
        rebuilt.store.close()
