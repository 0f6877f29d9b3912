"""The aggregator's offsets on a real broker: a restart rebuilds open windows from the log
(nothing lost, nothing reported twice), and ``sidecar replay`` reads a range without writing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from aggregate.agg_support import comparisons
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from kafka_helpers import create_topics, make_config, read_topic, unique, wait_until, write_toml

from sidecar.aggregate import WindowManager
from sidecar.aggregate.service import AggregatorService
from sidecar.cli import main
from sidecar.config import SidecarConfig
from sidecar.kafka import ensure_control_topics
from sidecar.traffic import produce_values

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

PER_WINDOW = 1000


def config(bootstrap: str, **aggregate: object) -> SidecarConfig:
    settings: dict[str, object] = {
        "group_id": unique("agg"),
        "reports_topic": f"{unique('t')}.reports",
        "window_ms": 1000,
        "allowed_lateness_ms": 0,
        "idle_timeout_ms": 1000,
        "metrics_port": 0,
        "dry_run": False,
        "commit_interval_ms": 0,
        "rules": [
            {"name": "ratio", "figure": "decision_rate_ratio", "threshold": 1.5, "action": "alert"}
        ],
    }
    settings.update(aggregate)
    return make_config(bootstrap, partitions=1, aggregate=settings)


async def produce_windows(cfg: SidecarConfig, windows: range, ratio_2x_from: int = 99) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for w in windows:
            rng = np.random.default_rng(w)
            ct = 0.8 if w >= ratio_2x_from else 0.9
            comps = comparisons(rng, PER_WINDOW, t0=w * 1000, threshold=0.9, candidate_threshold=ct)
            items = [(b"fraud-v2", msgspec.json.encode(c)) for c in comps]
            await produce_values(producer, cfg.topics.comparisons, items)
    finally:
        await producer.stop()


async def committed(cfg: SidecarConfig) -> int | None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        group_id=cfg.aggregate.group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        result: int | None = await consumer.committed(TopicPartition(cfg.topics.comparisons, 0))
        return result
    finally:
        await consumer.stop()


async def run_until(service: AggregatorService, reports: int) -> None:
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: len(service.reports) >= reports, 30)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("decode_processes", [0, 1], ids=["in-loop", "helper"])
@pytest.mark.slow
async def test_restart_rebuilds_the_open_window_from_committed_offsets(
    bootstrap: str, decode_processes: int
) -> None:
    cfg = config(bootstrap, decode_processes=decode_processes)
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    # Windows 0-3: window 3 stays open (no later event time closes it).
    await produce_windows(cfg, range(3))
    await produce_windows(cfg, range(3, 4))
    first = AggregatorService(cfg)
    await run_until(first, 3)
    assert [r.window_start_ms for r in first.reports] == [0, 1000, 2000]
    # Committed up to the first record of the open window [3000, 4000), not past it.
    assert await committed(cfg) == 3 * PER_WINDOW

    await produce_windows(cfg, range(4, 6))
    second = AggregatorService(cfg)
    await run_until(second, 2)
    assert [r.window_start_ms for r in second.reports] == [3000, 4000]
    assert all(r.counts.records == PER_WINDOW for r in first.reports + second.reports)
    assert second.reports[0].offsets[0].first == 3 * PER_WINDOW  # rebuilt from the log


@pytest.mark.parametrize("decode_processes", [0, 1], ids=["in-loop", "helper"])
async def test_a_failure_applying_a_poll_stops_the_service_instead_of_hanging(
    bootstrap: str, decode_processes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(bootstrap, decode_processes=decode_processes)
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    await produce_windows(cfg, range(3))

    def corrupted(*_: object) -> None:
        raise RuntimeError("window state corrupted")

    monkeypatch.setattr(WindowManager, "process", corrupted)
    service = AggregatorService(cfg)
    with pytest.raises(RuntimeError, match="corrupted"):
        await asyncio.wait_for(service.run(), 30)
    assert await committed(cfg) is None  # nothing applied, nothing committed


async def test_replay_prints_when_guards_would_fire_and_writes_nothing(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(bootstrap)
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    await produce_windows(cfg, range(6), ratio_2x_from=3)
    path = write_toml(cfg, tmp_path / "sidecar.toml")
    code = await asyncio.to_thread(
        main, ["replay", "--config", str(path), "--from", "offset:1000", "--idle", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "replayed 5000 comparisons" in out
    assert "guard:" not in out  # alert rules issue no command ...
    assert "ratio" in out and "fired" in out  # ... but the firing is listed
    assert await read_topic(bootstrap, cfg.aggregate.reports_topic, idle_s=0.5) == []
    assert await read_topic(bootstrap, cfg.topics.control, idle_s=0.5) == []

    code = main(["replay", "--config", str(path), "--from", "offset:9", "--to", "offset:3"])
    assert code == 2 and "empty range" in capsys.readouterr().err


@pytest.mark.parametrize("decode_processes", [0, 1], ids=["in-loop", "helper"])
async def test_first_report_comes_within_two_windows_of_start_despite_empty_partitions(
    bootstrap: str, decode_processes: int
) -> None:
    """Comparisons keyed by rollout fill one partition of three; the other two are empty.
    They must not hold the first windows back for ``idle_timeout_ms`` (30 s by default)."""
    cfg = make_config(
        bootstrap,
        partitions=3,
        aggregate={
            "group_id": unique("agg"),
            "reports_topic": f"{unique('t')}.reports",
            "window_ms": 1000,
            "allowed_lateness_ms": 200,
            "metrics_port": 0,
            "dry_run": True,
            "decode_processes": decode_processes,
            "rules": [],
        },
    )
    assert cfg.aggregate.idle_timeout_ms == 30_000  # the default
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    service = AggregatorService(cfg)
    task = asyncio.create_task(service.run())
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        await wait_until(lambda: service.consumer is not None and service.consumer.assignment(), 30)
        started = time.time()
        rng = np.random.default_rng(0)
        sent = 0
        while not service.reports and time.time() - started < 10:
            now = int(time.time() * 1000)
            comps = comparisons(rng, 50, t0=now, spacing_ms=1, id_prefix=f"live{sent}")
            for c in comps:
                await producer.send(
                    cfg.topics.comparisons, msgspec.json.encode(c), key=b"fraud-v2", partition=0
                )
            sent += 1
            await asyncio.sleep(0.05)
        took = time.time() - started
    finally:
        await producer.stop()
        service.request_stop()
        await asyncio.wait_for(task, 30)
    print(f"first report {took:.2f} s after the first record (1 s windows, 200 ms lateness)")
    assert service.reports, "no report within 10 s: the empty partitions held the watermark"
    assert took < 2 * 1.0 + 0.2 + 1.0  # two windows, the lateness, and a second of slack
    assert service.manager.watermark.empty_partitions == [1, 2]
    assert service.reports[0].counts.late == 0
