"""A rollout shared by two aggregator instances (comparisons keyed by routing key): per-partition
partials merged into the same reports one instance would make, each window reported once."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest
from aggregate.agg_support import batch_of, comparisons
from aiokafka import AIOKafkaProducer
from kafka_helpers import create_topics, make_config, unique, wait_until

from sidecar.aggregate import GuardEngine, WindowManager, WindowReport
from sidecar.aggregate.service import AggregatorService
from sidecar.config import SidecarConfig
from sidecar.contracts import Comparison
from sidecar.kafka import ensure_control_topics
from sidecar.traffic import produce_values

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

PER_WINDOW = 600
WINDOWS = 6


def config(bootstrap: str, **aggregate: object) -> SidecarConfig:
    settings: dict[str, object] = {
        "group_id": unique("agg"),
        "reports_topic": f"{unique('t')}.reports",
        "partials_topic": f"{unique('t')}.partials",
        "window_ms": 1000,
        "allowed_lateness_ms": 0,
        "idle_timeout_ms": 60_000,
        "merge_timeout_ms": 30_000,
        "metrics_port": 0,
        "commit_interval_ms": 0,
        "min_pairs": 100,
        "rules": [
            {"name": "ratio", "figure": "decision_rate_ratio", "threshold": 1.5, "action": "alert"}
        ],
    }
    settings.update(aggregate)
    return make_config(
        bootstrap, partitions=3, topics={"comparisons_key": "routing_key"}, aggregate=settings
    )


def traffic() -> list[tuple[bytes, Comparison]]:
    """Windows of comparisons over many entities; the candidate flags 2x from window 3 on."""
    out = []
    for w in range(WINDOWS):
        rng = np.random.default_rng(w)
        ct = 0.8 if w >= 3 else 0.9
        comps = comparisons(rng, PER_WINDOW, t0=w * 1000, threshold=0.9, candidate_threshold=ct)
        out += [(f"card-{(w * 7919 + i) % 211}".encode(), c) for i, c in enumerate(comps)]
    # Event time past the last window on every partition: every window closes.
    rng = np.random.default_rng(99)
    end = comparisons(rng, 60, t0=WINDOWS * 1000 + 500, id_prefix="end")
    return out + [(f"card-{i}".encode(), c) for i, c in enumerate(end)]


def expected(items: list[tuple[bytes, Comparison]], cfg: SidecarConfig) -> list[WindowReport]:
    """What one aggregator seeing every comparison reports."""
    mgr = WindowManager(cfg.aggregate.aggregator_config())
    return mgr.process(batch_of([c for _, c in items]), 0).reports


async def test_two_instances_share_a_rollout_and_report_each_window_once(bootstrap: str) -> None:
    cfg = config(bootstrap)
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    first, second = AggregatorService(cfg), AggregatorService(cfg)
    tasks = [asyncio.create_task(s.run()) for s in (first, second)]
    try:
        # Both groups settled (one rebalance each) before any data, so nothing is re-read.
        def settled() -> bool:
            stages = [s for s in (first, second) if s.consumer and s.merge]
            comparisons_owned = sum(len(s.consumer.assignment()) for s in stages)  # type: ignore[union-attr]
            partials_owned = sum(len(s.merge.assignment) for s in stages)  # type: ignore[union-attr]
            return (
                len(stages) == 2
                and comparisons_owned == 3
                and partials_owned == 3
                and all(
                    s.consumer.assignment()
                    for s in stages  # type: ignore[union-attr]
                )
            )

        await wait_until(settled, 60)
        # The merge waits for as many partitions as the comparisons topic has (a partial
        # claiming more cannot hold a window: tests/aggregate/test_partials.py).
        for s in (first, second):
            assert s.merge is not None and s.merge.merger.known_partitions() == 3
        items = traffic()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            encoded = [(k, msgspec.json.encode(c)) for k, c in items]
            await produce_values(producer, cfg.topics.comparisons, encoded)
        finally:
            await producer.stop()
        await wait_until(lambda: len(first.reports) + len(second.reports) >= WINDOWS, 60)
        await asyncio.sleep(1.0)  # a duplicate report would show up by now
    finally:
        for s in (first, second):
            s.request_stop()
        await asyncio.gather(*tasks)

    reports = sorted(first.reports + second.reports, key=lambda r: r.window_start_ms)
    assert [r.window_start_ms for r in reports] == [w * 1000 for w in range(WINDOWS)]
    assert {len(first.reports), len(second.reports)} == {0, WINDOWS}  # one merger per rollout
    assert all(r.closed_by == "watermark" and r.partitions_missing == [] for r in reports)
    assert all(len(r.offsets) == 3 for r in reports)  # every partition contributed
    want = expected(items, cfg)[:WINDOWS]
    assert [r.counts.records for r in reports] == [PER_WINDOW] * WINDOWS
    assert [r.paired for r in reports] == [r.paired for r in want]
    assert [r.candidate.latency for r in reports] == [r.candidate.latency for r in want]
    guards = GuardEngine(cfg.aggregate.rules)
    want_fired = [e.window_start_ms for r in want for e in guards.evaluate(r) if e.kind == "fired"]
    merger = first if first.reports else second
    fired = [e.window_start_ms for e in merger.events if e.kind == "fired"]
    assert fired == want_fired and fired  # the 2x candidate is caught once, as by one instance
