"""``sidecar outcomes`` on a real broker retires finished, idle rollout pairs: with room for
two pairs per task, two candidate versions finish and go idle, and two new ones are then
judged (refused before pairs were retired); the changelog replayed into a fresh store gives
the same state, and (keyed by routing key) the merge stage forgets the retired pairs and
tombstones their merged windows, so that reading the partials topic back holds none of them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import msgspec
import pytest
from kafka_helpers import create_topics, produce, read_topic, wait_until
from outcomes.outcome_support import Stream, final_reports, outcomes_config, stream

from sidecar.contracts import Comparison
from sidecar.outcomes.chunks import decode
from sidecar.outcomes.merge_stage import QualityMergeStage
from sidecar.outcomes.report import PairKey
from sidecar.outcomes.service import BARRIER_KEY, OutcomesService

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

OLD = ("2.1.0", "2.2.0")
NEW = ("3.0.0", "3.1.0")


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


def judged_pairs(service: OutcomesService) -> dict[str, int]:
    """Judged pairs per candidate version over its final reports (each window once)."""
    judged: dict[str, int] = {}
    for (_, _, version, _), report in final_reports(list(service.recent)).items():
        judged[version] = judged.get(version, 0) + report.counts.records
    return judged


def versions_held(service: OutcomesService) -> set[str]:
    return {
        p.key.candidate_version
        for rt in service.tasks.values()
        if rt.join is not None
        for p in rt.join.pairs.values()
    }


@pytest.mark.parametrize("key_by", ["rollout", pytest.param("routing_key", marks=pytest.mark.slow)])
async def test_finished_idle_pairs_are_retired_and_new_ones_take_their_slots(
    bootstrap: str, tmp_path: Path, key_by: str
) -> None:
    cfg = outcomes_config(
        bootstrap,
        tmp_path / "state",
        # A task behind the others in stream time may never send the empty final partial
        # of a window the others already marked final: the merge goes without it after the
        # merge timeout (kept short here).
        outcomes={"max_pairs_per_task": 2, "retire_after_ms": 3000, "merge_timeout_ms": 2000},
        topics={"comparisons_key": key_by},
    )
    await create_topics(cfg)
    now = time.time_ns() // 1_000_000
    for i, v in enumerate(OLD):
        s = stream(200, seed=i, prefix=f"a{i}-", t0=now - 40_000, span_ms=3000, key_by=key_by)
        await produce(cfg, versioned(s, v).comparisons, cfg.topics.comparisons)
        await produce(cfg, s.outcomes, cfg.outcomes.topic)
    service = OutcomesService(cfg)
    run = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: finals(service) >= set(OLD) or run.done(), timeout_s=60)
        assert versions_held(service) >= set(OLD)
        # Both pairs finish (every window final) and idle past retire_after_ms: retired.
        await wait_until(lambda: not versions_held(service) & set(OLD) or run.done(), 60)
        assert not versions_held(service) & set(OLD)
        if key_by == "rollout":  # the rollout's series went with its last pair
            assert service.metrics.quality_diff.collect()[0].samples == []
        # Two new candidate versions: the tasks' two slots are free for them.
        now = time.time_ns() // 1_000_000
        keyed = {"key_by": key_by}
        for i, v in enumerate(NEW):
            s = stream(200, seed=10 + i, prefix=f"b{i}-", t0=now - 3000, span_ms=2000, **keyed)
            versioned(s, v)
            await produce(cfg, s.comparisons, cfg.topics.comparisons)
            await produce(cfg, s.outcomes, cfg.outcomes.topic)
        merge = service.merge

        def merged() -> set[str]:
            """Candidate versions the merge stage holds (a rebalance may have rebuilt it from
            the topic since: what it holds, not what it counted, is checked)."""
            held = merge.merger.pairs if merge is not None else set()
            return {k.candidate_version for k in held}

        def done() -> bool:
            judged = judged_pairs(service)
            both = (judged.get("3.0.0"), judged.get("3.1.0")) == (200, 200)
            return both and not merged() & set(OLD)

        with contextlib.suppress(AssertionError):
            await wait_until(lambda: done() or run.done(), 60)
        # Every request of both new pairs judged in a final window; the old pairs forgotten.
        state = merge and (merge.merger.stream_ms, merge.merger.open_windows, merge.catching_up)
        assert done(), (judged_pairs(service), merged(), state)
        assert service.applied.refused == 0 and service.applied.comparisons == 800
        partitions = [rt.partition for rt in service.tasks.values() if rt.join is not None]
    finally:
        service.request_stop()
        await run
    # A restart from the changelog alone (the stores lost) lands on the same state.
    records = await read_topic(bootstrap, cfg.outcomes.changelog_topic, idle_s=1.0)
    retired = 0
    for p in partitions:
        mine = sorted((r for r in records if r.partition == p), key=lambda r: r.offset)
        live = service._open(tmp_path / "state" / f"task-{p}", p)
        rebuilt = service._open(tmp_path / f"rebuilt-{p}", p)
        try:
            for rec in mine:
                if rec.key == BARRIER_KEY:
                    rebuilt.skip(rec.offset)
                else:
                    rebuilt.apply(decode(rec.value), rec.offset)
            assert rebuilt.meta == live.meta
            assert rebuilt.pairs == live.pairs
            assert dict(rebuilt.store.scan(b"")) == dict(live.store.scan(b""))
            assert not {q.key.candidate_version for q in live.pairs.values()} & set(OLD)
            retired += live.meta.retired
        finally:
            live.store.close()
            rebuilt.store.close()
    assert retired >= 2
    if key_by == "routing_key":
        # The merge stage's read-back (compacted or not) holds nothing of the retired pairs.
        topic = await read_topic(bootstrap, cfg.outcomes.partials_topic_name, idle_s=1.0)

        async def publish(*_: object) -> None:
            raise AssertionError("a read-back publishes nothing")

        again = QualityMergeStage(cfg, None, publish, lambda: 0)  # type: ignore[arg-type]
        await again.process(sorted(topic, key=lambda r: (r.partition, r.offset)))
        assert again.merged_read > 0
        for v in OLD:
            key = PairKey("fraud-v2", "fraud-lr", "1.4.0", "fraud-lr", v)
            assert again.merger.verdict(key, 0) is None, v
        for v in NEW:
            key = PairKey("fraud-v2", "fraud-lr", "1.4.0", "fraud-lr", v)
            assert again.merger.verdict(key, 0) is not None, v
