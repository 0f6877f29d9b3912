"""Two ``sidecar outcomes`` instances share a rollout keyed by routing key: each sends its tasks'
quality partials, one merge stage merges them, and the final reports and the verdict are those
one instance computes for the same requests keyed by rollout (no merge at all); a task late
for the merge is merged in after it; hostile records on the partials topic are skipped."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kafka_helpers import create_topics, produce, read_topic
from outcomes.outcome_support import ROLLOUT, final_reports, outcomes_config, stream

from sidecar.config import SidecarConfig
from sidecar.hashing import kafka_partition
from sidecar.outcomes.partials import (
    DECODER,
    HeldShare,
    MergedQualityWindow,
    QualityPartial,
    merged_key,
    partial_key,
    partial_of,
)
from sidecar.outcomes.report import PairKey, QualityReport, QualityVerdict
from sidecar.outcomes.service import OutcomesService

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(120)]

N = 3000


def figures(obj: Any) -> Any:
    """A report's or verdict's content, without when and from which stream time it was made."""
    out = msgspec.to_builtins(obj)
    for name in ("stream_time_ms", "emitted_at_ms", "final_at_ms", "tasks_missing"):
        out.pop(name, None)
    return out


def assert_close(got: Any, want: Any, path: str = "") -> None:
    """Equal, floats to 1e-9 (sums added in another order differ in their last bits)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float | int), path
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(
            want, rel=1e-9, abs=1e-12
        ), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def latest_verdict(*services: OutcomesService) -> QualityVerdict | None:
    found = [v for s in services if (v := s.verdicts.get(ROLLOUT)) is not None]
    return max(found, key=lambda v: v.judged_pairs, default=None)


async def run_all(services: list[OutcomesService], done: Any, timeout_s: float) -> None:
    tasks = [asyncio.create_task(s.run()) for s in services]
    try:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.1)
        assert done(), "the outcomes stages did not get there in time"
    finally:
        for s in services:
            s.request_stop()
        await asyncio.gather(*tasks)


async def reference(bootstrap: str, tmp_path: Path, t0: int) -> tuple[dict, QualityVerdict]:
    """One instance, comparisons keyed by rollout: one task holds the rollout, no merge."""
    cfg = outcomes_config(bootstrap, tmp_path / "one", outcomes={"max_batch": 1000})
    await create_topics(cfg)
    s = stream(N, seed=11, t0=t0)
    await produce(cfg, s.comparisons, cfg.topics.comparisons)
    await produce(cfg, s.outcomes, cfg.outcomes.topic)
    one = OutcomesService(cfg)
    await run_all([one], lambda: (v := latest_verdict(one)) is not None and v.judged_pairs >= N, 60)
    verdict = latest_verdict(one)
    assert verdict is not None
    return final_reports(list(one.recent)), verdict


def with_state(cfg: SidecarConfig, state: Path) -> SidecarConfig:
    return msgspec.structs.replace(
        cfg, outcomes=msgspec.structs.replace(cfg.outcomes, state_dir=str(state))
    )


async def two_instances(
    bootstrap: str, tmp_path: Path, t0: int, merge_timeout_ms: int
) -> tuple[SidecarConfig, OutcomesService, OutcomesService, Any]:
    """Two instances sharing a rollout keyed by routing key, and the stream they will judge."""
    cfg = outcomes_config(
        bootstrap,
        tmp_path / "a",
        topics={"comparisons_key": "routing_key"},
        outcomes={"max_batch": 500, "merge_timeout_ms": merge_timeout_ms},
    )
    await create_topics(cfg)
    a, b = OutcomesService(cfg), OutcomesService(with_state(cfg, tmp_path / "b"))
    return cfg, a, b, stream(N, seed=11, t0=t0, key_by="routing_key")


async def until(runs: list[asyncio.Task[None]], done: Any, timeout_s: float, what: str) -> None:
    """Wait for ``done()``; a service that stopped raises its error."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        for t in runs:
            if t.done():
                t.result()
        await asyncio.sleep(0.1)


async def split_and_hold_outcomes(
    cfg: SidecarConfig, services: tuple[OutcomesService, ...], s: Any, runs: list[Any]
) -> None:
    """The instances split the three tasks, then every outcome reaches its task before any
    comparison is written: this history is 30 s old, so comparisons of its later windows move
    stream time past the earlier windows at once, and a router heartbeat from just before the
    outcomes were written ("routed to the end") would let them be final without their
    outcomes."""
    await until(
        runs,
        lambda: (
            all(svc.tasks and all(rt.ready for rt in svc.tasks.values()) for svc in services)
            and sum(len(svc.tasks) for svc in services) == 3
        ),
        40,
        "the two instances did not split the tasks",
    )
    await produce(cfg, s.outcomes, cfg.outcomes.topic)
    await until(
        runs,
        lambda: sum(svc.applied.orphaned for svc in services) >= len(s.outcomes),
        30,
        "the outcomes did not reach their tasks",
    )


async def test_two_instances_merge_a_shared_rollout_as_one_instance_judges_it(
    bootstrap: str, tmp_path: Path
) -> None:
    t0 = (time.time_ns() // 1_000_000 - 30_000) // 2000 * 2000  # windows aligned to the stream
    want_finals, want_verdict = await reference(bootstrap, tmp_path, t0)
    cfg, a, b, s = await two_instances(bootstrap, tmp_path, t0, merge_timeout_ms=60_000)
    runs = [asyncio.create_task(svc.run()) for svc in (a, b)]
    try:
        await split_and_hold_outcomes(cfg, (a, b), s, runs)
        await produce(cfg, s.comparisons, cfg.topics.comparisons)
        await until(
            runs,
            lambda: (v := latest_verdict(a, b)) is not None and v.judged_pairs >= N,
            60,
            "the merged verdict did not count every request in time",
        )
    finally:
        for svc in (a, b):
            svc.request_stop()
        await asyncio.gather(*runs)

    assert a.applied.comparisons > 0 and b.applied.comparisons > 0  # both did share the work
    got = final_reports([*a.recent, *b.recent])
    assert got.keys() == want_finals.keys()
    for key, report in got.items():
        assert report.tasks_missing == [], key
        assert_close(figures(report), figures(want_finals[key]), str(key))
    verdict = latest_verdict(a, b)
    assert verdict is not None
    assert_close(figures(verdict), figures(want_verdict), "verdict")
    # What the topics hold: the same, and each window merged once from every task's partial.
    reports = [
        msgspec.json.decode(r.value, type=QualityReport)
        for r in await read_topic(bootstrap, cfg.outcomes.quality_topic, idle_s=1)
    ]
    assert final_reports(reports).keys() == want_finals.keys()
    raw = await read_topic(bootstrap, cfg.outcomes.partials_topic_name, idle_s=1)
    records = [
        DECODER.decode(r.value) for r in raw if r.value and r.key and not r.key.endswith(b"barrier")
    ]
    merged = [r for r in records if isinstance(r, MergedQualityWindow)]
    assert sorted(r.window_start_ms for r in merged) == sorted(k[3] for k in want_finals)
    finals = {(r.window_start_ms, r.task) for r in records if isinstance(r, QualityPartial)}
    assert {t for _, t in finals} == {0, 1, 2}
    # After a window's merged record, a tombstone for each task's partial of it (compaction
    # then keeps one record per merged window).
    last_of: dict[bytes, bytes | None] = {r.key: r.value for r in raw if r.key}
    for m in merged:
        for task in (0, 1, 2):
            assert last_of[partial_key(m.key, m.window_start_ms, task)] is None
            assert last_of.get(partial_key(m.key, m.window_start_ms, task, "provisional")) is None
    # A new instance alone (the others gone, no store) rebuilds the merge from the topic: it
    # reports no window again and holds the same verdict.
    c = OutcomesService(with_state(cfg, tmp_path / "c"))

    since: list[float] = []

    def rebuilt() -> bool:  # and then a second and a half more (anything due would be out)
        m = c.merge
        if not since and m is not None and m.assignment and m.ready:
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] > 1.5

    await run_all([c], rebuilt, 40)
    assert c.merge is not None and c.merge.merger.open_windows == 0
    assert c.merge.merged_read >= len(merged)
    assert [r for r in c.recent if r.status == "final"] == []
    key = PairKey(
        verdict.rollout,
        verdict.champion_model,
        verdict.champion_version,
        verdict.candidate_model,
        verdict.candidate_version,
    )
    again = c.merge.merger.verdict(key, 0)
    assert again is not None
    assert_close(figures(again), figures(verdict), "rebuilt verdict")


async def test_a_lagging_tasks_share_is_merged_in_after_the_window_was_reported_without_it(
    bootstrap: str, tmp_path: Path
) -> None:
    """The comparisons of one partition arrive only after the other tasks' windows were
    merged without it (the merge timeout passed: a lagging or restoring instance): its final
    partials then come in after all, each window is reported final again without a task
    missing, and the last reports and the verdict are one instance's on the same requests."""
    t0 = (time.time_ns() // 1_000_000 - 30_000) // 2000 * 2000
    want_finals, want_verdict = await reference(bootstrap, tmp_path, t0)
    cfg, a, b, s = await two_instances(bootstrap, tmp_path, t0, merge_timeout_ms=1_500)
    lagging = 2
    on_time = [c for c in s.comparisons if kafka_partition(c[0], 3) != lagging]
    late = [c for c in s.comparisons if kafka_partition(c[0], 3) == lagging]
    assert on_time and late

    def finals() -> list[QualityReport]:
        return [r for svc in (a, b) for r in svc.recent if r.status == "final"]

    runs = [asyncio.create_task(svc.run()) for svc in (a, b)]
    try:
        await split_and_hold_outcomes(cfg, (a, b), s, runs)
        await produce(cfg, on_time, cfg.topics.comparisons)
        await until(
            runs,
            lambda: len({r.window_start_ms for r in finals()}) == len(want_finals),
            60,
            "the windows were not merged without the lagging task",
        )
        assert all(r.tasks_missing == [lagging] for r in finals())
        await produce(cfg, late, cfg.topics.comparisons)
        await until(
            runs,
            lambda: (v := latest_verdict(a, b)) is not None and v.judged_pairs >= N,
            60,
            "the lagging task's shares were not merged in",
        )
        await until(
            runs,
            lambda: all(r.tasks_missing == [] for r in final_reports(finals()).values()),
            30,
            "a window was not reported again with the lagging task's share",
        )
    finally:
        for svc in (a, b):
            svc.request_stop()
        await asyncio.gather(*runs)

    got = final_reports(finals())
    assert got.keys() == want_finals.keys()
    for key, report in got.items():
        assert_close(figures(report), figures(want_finals[key]), str(key))
    verdict = latest_verdict(a, b)
    assert verdict is not None
    assert_close(figures(verdict), figures(want_verdict), "verdict")
    # On the topic: each window's merged record, the last one naming no task missing.
    raw = await read_topic(bootstrap, cfg.outcomes.partials_topic_name, idle_s=1)
    last_merged: dict[int, MergedQualityWindow] = {}
    for r in raw:
        if r.value and r.key and r.key.startswith(b"merged/"):
            m = DECODER.decode(r.value)
            assert isinstance(m, MergedQualityWindow)
            last_merged[m.window_start_ms] = m
    assert sorted(last_merged) == sorted(k[3] for k in want_finals)
    assert all(m.tasks_missing == [] and m.held == [] for m in last_merged.values())


async def test_hostile_records_on_the_partials_topic_are_skipped_and_harm_no_report(
    bootstrap: str, tmp_path: Path
) -> None:
    """Written by an external client (confluent-kafka) to the partials topic while the merge
    stage runs: partials claiming 2**40 tasks (of the real pair and of a made-up one) or one
    more than the comparisons topic has partitions, merged records naming impossible tasks
    or holding shares of tasks they do not name missing, and junk. Each is skipped and
    counted; none opens a window (one claiming 2**40 tasks made the merge build a set of
    every task at its timeout: the process was killed for memory), and the real rollout is
    judged in full."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    t0 = (time.time_ns() // 1_000_000 - 30_000) // 2000 * 2000
    cfg = outcomes_config(
        bootstrap,
        tmp_path / "h",
        topics={"comparisons_key": "routing_key"},
        # Long: a regression fails on the counts below, before a window claiming 2**40 tasks
        # is due (its merge would take the machine's memory, not fail a test).
        outcomes={"max_batch": 500, "merge_timeout_ms": 60_000},
    )
    await create_topics(cfg)
    svc = OutcomesService(cfg)
    s = stream(N, seed=11, t0=t0, key_by="routing_key")
    settings = cfg.outcomes.for_rollout(ROLLOUT)
    real = PairKey(ROLLOUT, "fraud-lr", "1.4.0", "fraud-lr", "2.1.0")
    made_up = PairKey("evil", "m", "1", "m", "2")
    zeros = cfg.outcomes.layout().zeros()

    def partial(key: PairKey, tasks_total: int) -> bytes:
        return msgspec.json.encode(
            partial_of(
                key,
                t0,
                t0 + 2000,
                task=0,
                tasks_total=tasks_total,
                status="final",
                stream_time_ms=t0 + 60_000,
                final_at_ms=t0 + 5000,
                label_window_ms=settings.label_window_ms,
                missing=settings.missing,
                requirement=settings.non_inferiority,
                acc=zeros,
                ranking=None,
                emitted_at_ms=0,
            )
        )

    def merged(**kw: Any) -> bytes:
        return msgspec.json.encode(
            MergedQualityWindow(
                **real._asdict(),
                window_start_ms=t0 - 20_000,
                window_end_ms=t0 - 18_000,
                requirement=settings.non_inferiority,
                size=zeros.size,
                **kw,
            )
        )

    hostile = [
        (partial_key(real, t0, 0), partial(real, 2**40)),
        (partial_key(made_up, t0, 0), partial(made_up, 2**40)),
        # More tasks than the comparisons topic has partitions: as impossible, if smaller.
        (partial_key(made_up, t0, 0), partial(made_up, cfg.topics.partitions + 1)),
        (merged_key(real, t0 - 20_000), merged(tasks_missing=[cfg.topics.partitions])),
        (merged_key(real, t0 - 20_000), merged(tasks_missing=[2**40])),
        (
            merged_key(real, t0 - 20_000),
            merged(tasks_missing=[1], held=[HeldShare(task=2, index=[0], values=[1.0])]),
        ),
        (b"partial/x", b"not json"),
        (b"partial/y", b'{"kind":"partial"}'),
    ]
    runs = [asyncio.create_task(svc.run())]
    try:
        await until(
            runs,
            lambda: svc.merge is not None and svc.merge.assignment and svc.merge.ready,
            40,
            "the merge stage did not start",
        )
        producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        for key, value in hostile:
            producer.produce(cfg.outcomes.partials_topic_name, key=key, value=value)
        assert producer.flush(30) == 0
        merge = svc.merge
        assert merge is not None
        await until(
            runs, lambda: merge.undecodable >= len(hostile), 30, "hostile records not skipped"
        )
        assert merge.merger.open_windows == 0 and merge.merger.pairs == set()
        await split_and_hold_outcomes(cfg, (svc,), s, runs)
        await produce(cfg, s.comparisons, cfg.topics.comparisons)
        await until(
            runs,
            lambda: (v := latest_verdict(svc)) is not None and v.judged_pairs >= N,
            60,
            "the rollout was not judged in full",
        )
    finally:
        svc.request_stop()
        await asyncio.gather(*runs)
    assert merge.undecodable == len(hostile)
    skipped = svc.metrics.skipped.labels("partials", "unusable")._value.get()
    assert skipped == len(hostile)
    finals = [r for r in svc.recent if r.status == "final"]
    assert finals and all(r.rollout == ROLLOUT and r.tasks_missing == [] for r in finals)
