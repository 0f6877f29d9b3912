"""The outcomes stage's producing: records placed on partitions go out as record batches, each
partition's in order, every one acknowledged before the call returns."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka_helpers import read_topic, unique
from outcome_support import outcomes_config

from sidecar.kafka import ensure_topics, new_producer
from sidecar.outcomes.publish import PartitionRecords, Publisher

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("prebuilt", "compression"),
    [(True, None), (False, None), (False, "gzip")],
    ids=["built in C", "aiokafka's builder", "compressed"],
)
async def test_partitioned_records_arrive_on_their_partitions_in_order(
    bootstrap: str, tmp_path: Path, prebuilt: bool, compression: str | None
) -> None:
    cfg = outcomes_config(bootstrap, tmp_path)
    topic = unique("by-task")
    await ensure_topics(bootstrap, [topic], 3)
    producer = new_producer(
        cfg, "outcomes", linger_ms=2, max_batch_size=64 << 10, compression_type=compression
    )
    await producer.start()
    try:
        publisher = Publisher(producer, 30.0, batch_bytes=(64 << 10) if prebuilt else None)
        sent: dict[int, PartitionRecords] = {p: PartitionRecords() for p in (0, 2)}
        # ~300 KiB for each of two partitions: several batches of at most 64 KiB each.
        for i in range(3_000):
            sent[0 if i % 3 else 2].add(f"k{i}".encode(), b"x" * 100 + str(i).encode())
        await publisher.send_partitioned(topic, sent)
        await publisher.send_partitioned(topic, {})  # nothing to send: returns at once
    finally:
        await producer.stop()
    records = await read_topic(bootstrap, topic, expect=3_000)
    got: dict[int, list[tuple[bytes, bytes]]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        got.setdefault(r.partition, []).append((r.key, r.value))
    assert set(got) == {0, 2}
    for p, recs in sent.items():
        assert got[p] == list(zip(recs.keys, recs.values, strict=True))
