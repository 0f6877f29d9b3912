"""Versioned outputs on a real broker: two output versions from the same batches, two
consumer groups on the old one -- one migrates, one lags. Status shows the laggard, the
sunset is refused while it reads and applied once it migrated, and neither stream loses a
record."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from control_helpers import audits, control_config, ctl, running, setup
from kafka_helpers import read_topic, unique, wait_until

from sidecar.config import SidecarConfig
from sidecar.control.client import EXIT_OK, EXIT_REJECTED
from sidecar.examples.outputs import V1
from sidecar.outputs.cli import active_readers, format_status, version_status
from sidecar.outputs.readers import now_ms
from sidecar.traffic import generated_items, produce_values

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

WINDOW_S = 4.0


class Traffic:
    """Requests at a steady rate; remembers every id it produced, in order."""

    def __init__(self, cfg: SidecarConfig, rate: float) -> None:
        self.cfg, self.rate = cfg, rate
        self.ids: list[str] = []

    async def run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.cfg.kafka.bootstrap_servers)
        await producer.start()
        try:
            chunk = max(1, int(self.rate / 10))
            while True:
                items = generated_items(chunk, seed=len(self.ids), start_id=len(self.ids))
                await produce_values(producer, self.cfg.topics.requests, items)
                self.ids += [msgspec.json.decode(v)["request_id"] for _, v in items]
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()


class Reader:
    """A downstream application: one consumer group on one topic, committing what it read."""

    def __init__(self, cfg: SidecarConfig, group: str, topic: str) -> None:
        self.cfg, self.group, self.topic = cfg, group, topic
        self.ids: set[str] = set()
        self.headers: list[dict[str, bytes]] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.cfg.kafka.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        doc = msgspec.json.decode(r.value)
                        self.ids.add(doc["request_id"])
                        self.headers.append(dict(r.headers))
                if batch:
                    await consumer.commit()
        finally:
            await consumer.stop()

    def start(self) -> Reader:
        self.task = asyncio.create_task(self.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def config(bootstrap: str, tmp_path: Path) -> SidecarConfig:
    run = unique("mig")
    return control_config(
        bootstrap,
        tmp_path,
        topics={"decisions": f"{run}.decisions"},
        outputs={
            "api_version": "v2",
            "versions": [{"version": "v1", "topic": f"{run}.decisions.v1", **copy.deepcopy(V1)}],
            "active_window_s": WINDOW_S,
            "readers_interval_s": 1.0,
        },
    )


async def readers_of(cfg: SidecarConfig, version: str) -> list[str]:
    return sorted(r.group for r in await active_readers(cfg, version, sample_s=1.0))


async def test_laggard_blocks_the_sunset_until_it_migrates_and_nothing_is_lost(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = config(bootstrap, tmp_path)
    v1_topic = cfg.outputs.versions[0].topic
    v2_topic = cfg.topics.decisions
    await setup(cfg)
    traffic = Traffic(cfg, rate=300)
    migrated, laggard = unique("app-migrated"), unique("app-laggard")
    producing = asyncio.create_task(traffic.run())
    async with running(cfg, 2) as sidecars:
        m1 = Reader(cfg, migrated, v1_topic).start()
        l1 = Reader(cfg, laggard, v1_topic).start()
        await wait_until(lambda: len(m1.ids) > 100 and len(l1.ids) > 100, 60)
        # v1 records carry their version (not deprecated yet); v2 readers get v2.
        assert all(h["api_version"] == b"v1" and "deprecation" not in h for h in l1.headers)
        phase_a = len(traffic.ids)

        # The first application migrates to v2.
        await m1.stop()
        m2 = Reader(cfg, migrated, v2_topic).start()

        # Announce: deprecated now, sunset in 2 s, with the migration guide.
        dep = await ctl(
            cfg, "deprecate", output_version="v1", sunset_ms=now_ms() + 2000, link=V1["link"]
        )
        assert dep.code == EXIT_OK, dep.message
        assert set(dep.confirmed) == {"inst-0", "inst-1"}
        await wait_until(lambda: any("deprecation" in h for h in l1.headers), 30)
        notice = next(h for h in l1.headers if "deprecation" in h)
        assert notice["deprecation"].startswith(b"@") and notice["sunset"].endswith(b" GMT")
        assert notice["link"].startswith(b"<" + V1["link"].encode() + b">")

        # Status: the laggard still reads v1, the migrated group has aged out of it.
        async def laggard_alone() -> bool:
            return await readers_of(cfg, "v1") == [laggard]

        await wait_until_async(laggard_alone, 30)
        status = await version_status(cfg, sample_s=1.0)
        text = format_status(status, now_ms())
        assert f"ACTIVE {laggard}" in text and f"idle   {migrated}" in text, text

        async def migrated_reads_v2() -> bool:  # once its group rebalanced onto v2
            status = await version_status(cfg, sample_s=1.0)
            v2 = next(v for v in status if v.version == "v2")
            return migrated in {r.group for r in v2.active}

        await wait_until_async(migrated_reads_v2, 40)
        # Every instance's gauge counts the laggard.
        gauge = sidecars[0].metrics.output_active_readers.labels("v1", v1_topic)
        await wait_until(lambda: gauge._value.get() == 1, 20)

        # The sunset is refused while it reads (by every instance, audited)...
        refused = await ctl(cfg, "sunset", output_version="v1", active_readers=1)
        assert refused.code == EXIT_REJECTED and "active_readers" in refused.message
        assert all(s.pipeline.output_versions == ["v1"] for s in sidecars)

        # ...and applied once it migrated too.
        await l1.stop()
        l2 = Reader(cfg, laggard, v2_topic).start()

        async def nobody() -> bool:
            return await readers_of(cfg, "v1") == []

        await wait_until_async(nobody, 30)
        done = await ctl(cfg, "sunset", output_version="v1", active_readers=0)
        assert done.code == EXIT_OK, done.message
        assert all(s.pipeline.output_versions == [] for s in sidecars)
        phase_b = len(traffic.ids)
        await wait_until(lambda: len(traffic.ids) > phase_b + 600, 30)
        producing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producing
        produced = list(traffic.ids)
        await wait_until(lambda: sum(s.processed for s in sidecars) >= len(produced), 30)
    await m2.stop()
    await l2.stop()

    # Nothing lost: v2 has every request; v1 every one until the sunset and none after it.
    v2_ids = [
        msgspec.json.decode(r.value)["request_id"]
        for r in await read_topic(bootstrap, v2_topic, expect=len(produced))
    ]
    v1_records = await read_topic(bootstrap, v1_topic)
    v1_ids = {msgspec.json.decode(r.value)["request_id"] for r in v1_records}
    assert set(v2_ids) == set(produced)
    assert set(produced[:phase_a]) <= v1_ids
    assert not v1_ids & set(produced[phase_b:])
    assert v1_ids <= set(produced)
    assert all(dict(r.headers)["api_version"] == b"v1" for r in v1_records)
    outcomes = {(a.instance_id, a.action, a.outcome, a.reason) for a in await audits(cfg)}
    for inst in ("inst-0", "inst-1"):
        assert (inst, "sunset", "rejected", "active_readers") in outcomes
        assert (inst, "sunset", "noted", None) in outcomes


async def wait_until_async(predicate: Any, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout_s}s")
