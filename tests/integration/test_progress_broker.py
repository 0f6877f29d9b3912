"""``sidecar run``'s progress line and lag gauge on a real sidecar and broker."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from kafka_helpers import create_topics, make_config, produce, wait_until

from sidecar.progress import progress_task
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_a_serving_sidecar_logs_progress_and_sets_the_lag_gauge(
    bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(bootstrap)
    await create_topics(cfg)
    await produce(cfg, [*generated_items(300, seed=5), (None, b"not json")])
    sidecar = Sidecar(cfg)
    caplog.set_level(logging.INFO, logger="sidecar.progress")
    try:
        async with progress_task(sidecar, interval_s=0.5):
            task = asyncio.create_task(sidecar.run())
            await wait_until(lambda: sidecar.processed >= 301, 60)
            await wait_until(
                lambda: (
                    any("dead letters (+" in r.getMessage() for r in caplog.records)
                    and "1 dead letters" in caplog.records[-1].getMessage()
                ),
                30,
            )
            sidecar.request_stop()
            await asyncio.wait_for(task, 60)
    finally:
        sidecar.request_stop()
        sidecar.close_models()
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.progress"]
    last = lines[-1]
    assert re.match(
        r"progress: [\d,]+ records/s, lag (\d+|unknown), 1 dead letters \(\+[01]\), "
        r"mode canary 20%, epoch 0, 3 partitions, \d+ in flight, 301 records in all",
        last,
    ), last
    gauge = sidecar.metrics.registry.get_sample_value(
        "sidecar_consumer_lag_records", {"topic": cfg.topics.requests}
    )
    assert gauge is not None and gauge >= 0


async def test_lag_per_partition_in_records_and_seconds(bootstrap: str) -> None:
    """Single-record produce batches (the embedded broker's high watermark is only right for
    those) to one partition, consumed by a sidecar whose champion takes 0.3 s a batch of at
    most 5: it falls behind, and says by how much, in records and seconds."""
    from aiokafka import AIOKafkaProducer, TopicPartition

    cfg = make_config(
        bootstrap,
        partitions=1,
        pipeline={"max_batch": 5},
        models={
            "champion": {
                "target": "sidecar.examples.faulty:slow",
                "options": {"delay_s": 0.3, "target": "sidecar.examples.fraud:champion"},
                "timeout_ms": 5000,
            }
        },
    )
    await create_topics(cfg)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for key, value in generated_items(100, seed=4):
            await producer.send_and_wait(cfg.topics.requests, value, key=key, partition=0)
    finally:
        await producer.stop()
    await asyncio.sleep(1.5)  # the oldest records are at least this old when consumed
    sidecar = Sidecar(cfg)
    try:
        async with progress_task(sidecar, interval_s=0.5):
            task = asyncio.create_task(sidecar.run())
            await wait_until(lambda: sidecar.lag is not None and sidecar.processed >= 10, 60)
            await wait_until(
                lambda: bool(sidecar.lag and sidecar.lag[0].seconds and sidecar.lag[0].records),
                30,
            )
            lag = sidecar.lag
            assert lag is not None
            consumer = sidecar.consumer
            assert consumer is not None
            assert consumer.highwater(TopicPartition(cfg.topics.requests, 0)) == 100
            [p0] = lag
            assert p0.partition == 0 and 0 < (p0.records or 0) < 100
            assert p0.seconds is not None and p0.seconds >= 1.0
            labels = {"topic": cfg.topics.requests, "partition": "0"}
            registry = sidecar.metrics.registry
            assert registry.get_sample_value("sidecar_partition_lag_records", labels) is not None
            assert (registry.get_sample_value("sidecar_partition_lag_seconds", labels) or 0) >= 1

            def detail() -> str:
                _, body = sidecar.health.readiness()
                return str(body["checks"].get("lag", {}).get("detail", ""))

            await wait_until(lambda: "p0" in detail(), 10)  # published about every second
            assert re.match(
                r"[\d,]+ records behind on 1 partitions: p0 [\d,]+ records \d", detail()
            )
            sidecar.request_stop()
            await asyncio.wait_for(task, 60)
    finally:
        sidecar.request_stop()
        sidecar.close_models()
