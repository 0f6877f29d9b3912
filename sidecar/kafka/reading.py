"""Reading a topic outside a consumer group: find its partitions, seek by time, read until
idle.

"The end" of a topic is never taken from the broker's end offsets: Tansu reports a wrong high
watermark for multi-record batches, so a read ends when a fetch of ``idle_s`` brings nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from ..config import SidecarConfig
from ..errors import BrokerError
from .clients import new_consumer, stop_quietly


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, *, wait_s: float = 0.0
) -> list[TopicPartition]:
    """The partitions of ``topic``; BrokerError when it does not exist (after ``wait_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            # aiokafka has no public metadata refresh for a consumer; this is its one use.
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if loop.time() >= deadline:
            raise BrokerError(f"topic {topic} does not exist; is the sidecar configured for it?")
        await asyncio.sleep(0.1)


async def seek_since(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], since_ms: int
) -> None:
    """Position at the first record at or after ``since_ms`` (record timestamp); at the
    beginning where the broker has no answer (correct, only slower: callers filter)."""
    found: dict[TopicPartition, Any] = {}
    with contextlib.suppress(Exception):  # a broker without ListOffsets by time
        found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    for tp in tps:
        hit = found.get(tp)
        if hit is None or hit.timestamp is None or hit.timestamp < 0:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, hit.offset)


async def read_until_idle(
    cfg: SidecarConfig,
    topic: str,
    *,
    role: str = "reader",
    since_ms: int | None = None,
    idle_s: float = 0.5,
    only_partition: int | None = None,
    max_s: float = 60.0,
) -> list[Any]:
    """Records of ``topic`` (those with a timestamp at or after ``since_ms``, else all) up to
    now: a partition is done once it is idle for ``idle_s`` or delivers a record stamped after
    the read began (a busy topic -- heartbeats every few hundred milliseconds -- is never
    idle), and the whole read after ``max_s``. Records are returned as the consumer gave them:
    untrusted."""
    consumer = new_consumer(cfg, role, fetch_max_wait_ms=20)
    try:
        await consumer.start()
    except Exception as exc:
        await stop_quietly(consumer)
        raise BrokerError(f"cannot reach broker {cfg.kafka.bootstrap_servers}: {exc}") from exc
    try:
        tps = await topic_partitions(consumer, topic)
        if only_partition is not None:
            tps = [tp for tp in tps if tp.partition == only_partition]
        consumer.assign(tps)
        if since_ms is None:
            await consumer.seek_to_beginning(*tps)
        else:
            await seek_since(consumer, tps, since_ms)
        loop = asyncio.get_running_loop()
        started_ms = time.time_ns() // 1_000_000
        deadline = loop.time() + max_s
        records: list[Any] = []
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            if not batch:
                return records
            for tp, part in batch.items():
                for r in part:
                    if since_ms is None or r.timestamp >= since_ms:
                        records.append(r)
                    if r.timestamp > started_ms:  # caught up with the present
                        consumer.pause(tp)
                        break
        return records
    finally:
        await stop_quietly(consumer)
