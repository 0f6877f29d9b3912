"""Example traffic: seeded card-transaction requests produced to the requests topic.

Used by ``sidecar produce``, ``sidecar run --example-traffic``, the tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from .config import SidecarConfig
from .examples import fraud
from .hashing import kafka_partitions

_ENCODER = msgspec.json.Encoder()


def encode_requests(requests: Sequence[dict[str, object]], fmt: str = "json") -> list[bytes]:
    if fmt == "msgpack":
        return [msgspec.msgpack.encode(r) for r in requests]
    return [_ENCODER.encode(r) for r in requests]


async def produce_values(
    producer: AIOKafkaProducer,
    topic: str,
    items: Sequence[tuple[bytes | None, bytes]],
    partitions: int | None = None,
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> int:
    """Produce (key, value) pairs with the batch API, keyed like Kafka's default partitioner;
    ``headers``, if given, go on every record."""
    if partitions is None:
        partitions = len(await producer.partitions_for(topic))
    keys = [k or b"" for k, _ in items]
    parts = kafka_partitions(keys, partitions).tolist() if items else []
    builders: dict[int, Any] = {}
    futures = []
    for (key, value), part in zip(items, parts, strict=True):
        builder = builders.get(part)
        if builder is None:
            builder = builders[part] = producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            futures.append(await producer.send_batch(builder, topic, partition=part))
            builder = builders[part] = producer.create_batch()
            builder.append(key=key, value=value, timestamp=None, headers=headers)
    for part, builder in builders.items():
        futures.append(await producer.send_batch(builder, topic, partition=part))
    await asyncio.gather(*futures)
    return len(items)


async def _producer(cfg: SidecarConfig) -> AIOKafkaProducer:
    """A started producer, once the requests topic is known to exist: an unreachable broker
    or a missing topic is a BrokerError naming it (the CLI prints it, no traceback)."""
    from aiokafka.errors import KafkaError

    from .errors import BrokerError
    from .kafka import new_producer, require_topics, stop_quietly

    producer = new_producer(cfg, "traffic", linger_ms=5, max_batch_size=1 << 20)
    try:
        await producer.start()
        await require_topics(producer.client, {cfg.topics.requests: "topics.requests"})
    except KafkaError as exc:
        await stop_quietly(producer)
        raise BrokerError(f"cannot reach broker {cfg.kafka.bootstrap_servers}: {exc}") from exc
    except BaseException:
        await stop_quietly(producer)
        raise
    return producer


def generated_items(
    count: int, seed: int, start_id: int = 0, fmt: str = "json"
) -> list[tuple[bytes | None, bytes]]:
    data = fraud.generate(count, seed=seed)
    requests = fraud.request_dicts(data, start_id=start_id)
    values = encode_requests(requests, fmt)
    return [(r["routing_key"].encode(), v) for r, v in zip(requests, values, strict=True)]  # type: ignore[attr-defined]


async def produce_count(cfg: SidecarConfig, count: int, seed: int = 0, rate: float = 0.0) -> int:
    producer = await _producer(cfg)
    try:
        sent = 0
        chunk = 5_000 if rate <= 0 else max(1, int(rate / 10))
        start = time.monotonic()
        while sent < count:
            n = min(chunk, count - sent)
            items = generated_items(n, seed=seed + sent, start_id=sent, fmt=cfg.input.format)
            sent += await produce_values(producer, cfg.topics.requests, items)
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        return sent
    finally:
        await producer.stop()


async def produce_forever(cfg: SidecarConfig, rate: float, seed: int = 0) -> None:
    """Produce at ``rate`` requests per second until cancelled (ids continue across chunks)."""
    producer = await _producer(cfg)
    try:
        sent = 0
        start = time.monotonic()
        chunk = max(1, int(rate / 10))
        while True:
            items = generated_items(chunk, seed=seed + sent, start_id=sent, fmt=cfg.input.format)
            sent += await produce_values(producer, cfg.topics.requests, items)
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        await producer.stop()
