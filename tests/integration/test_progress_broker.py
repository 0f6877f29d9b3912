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
