"""The Kafka edge against a real broker: topics, limits, reading until idle, and an instance
that stops (not ready, non-zero) when one of its background tasks dies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka.errors import KafkaError
from control_helpers import control_config, running, setup
from kafka_helpers import (
    decode_values,
    frozen,
    make_config,
    produce,
    read_topic,
    unique,
    wait_until,
)

from sidecar.broker import EmbeddedBroker
from sidecar.config import SidecarConfig
from sidecar.contracts import DeadLetter, Decision
from sidecar.errors import BrokerError
from sidecar.examples import fraud
from sidecar.kafka import (
    BackgroundTaskFailed,
    ensure_config_topics,
    ensure_topics,
    fetch_bytes,
    new_consumer,
    new_producer,
    read_until_idle,
    record_limits,
    stop_quietly,
    topic_configs,
    topic_partitions,
)
from sidecar.runner import Sidecar

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

ENC = msgspec.json.Encoder()


async def run_until_processed(cfg: SidecarConfig, n: int) -> None:
    """Run a sidecar until it has processed ``n`` records, then stop it."""
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    try:
        await wait_until(lambda: sidecar.processed >= n, 30)
    finally:
        sidecar.request_stop()
        await asyncio.wait_for(task, 30)
        sidecar.close_models()


async def the_requests_decided_and_one_dead_letter(
    cfg: SidecarConfig, requests: list[dict[str, Any]]
) -> DeadLetter:
    """Run a sidecar over ``requests`` and one bad record among them: every request is
    decided, and the bad record is the one dead letter (returned)."""
    bootstrap = cfg.kafka.bootstrap_servers
    await run_until_processed(cfg, len(requests) + 1)
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=len(requests)), Decision
    )
    assert sorted(d.request_id for d in decisions) == sorted(r["request_id"] for r in requests)
    (letter,) = decode_values(
        await read_topic(bootstrap, cfg.topics.dead_letter, expect=1), DeadLetter
    )
    return letter


async def test_every_topic_of_a_config_is_created_the_late_topic_included(bootstrap: str) -> None:
    cfg = make_config(bootstrap, aggregate={"late_topic": unique("late")})
    created = await ensure_config_topics(cfg)
    assert cfg.aggregate.late_topic in created and cfg.status_topic in created
    assert await ensure_config_topics(cfg) == []  # idempotent
    assert set(await topic_configs(cfg, cfg.all_topics())) == set(cfg.all_topics())
    # The control topic has exactly one partition: one order of commands for everyone.
    consumer = new_consumer(cfg, "test")
    await consumer.start()
    try:
        assert len(await topic_partitions(consumer, cfg.topics.control)) == 1
        assert len(await topic_partitions(consumer, cfg.topics.requests)) == 3
    finally:
        await stop_quietly(consumer)


async def test_read_until_idle_reads_everything_from_a_time(bootstrap: str) -> None:
    cfg = make_config(bootstrap)
    await ensure_config_topics(cfg)
    items = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(50)]
    await produce(cfg, items)
    records = await read_until_idle(cfg, cfg.topics.requests, idle_s=0.5)
    assert sorted(r.value for r in records) == sorted(v for _, v in items)
    newest = max(r.timestamp for r in records)
    later = await read_until_idle(cfg, cfg.topics.requests, since_ms=newest, idle_s=0.3)
    assert later and all(r.timestamp >= newest for r in later)
    assert await read_until_idle(cfg, cfg.topics.requests, since_ms=newest + 1, idle_s=0.3) == []


async def test_record_limits_follow_the_topics_max_message_bytes(bootstrap: str) -> None:
    cfg = make_config(bootstrap)
    small = unique("small")
    await ensure_topics(
        cfg.kafka.bootstrap_servers, [small], 1, configs={"max.message.bytes": "20000"}
    )
    await ensure_config_topics(cfg)
    assert (await topic_configs(cfg, [small]))[small]["max.message.bytes"] == "20000"
    limits = await record_limits(cfg, [small, cfg.topics.decisions])
    assert limits[small] < 20000 and limits[cfg.topics.decisions] == cfg.kafka.max_record_bytes


async def test_an_output_larger_than_its_topic_takes_becomes_a_dead_letter(bootstrap: str) -> None:
    cfg = make_config(bootstrap)
    # The decisions topic takes 20 kB records (Tansu stores the setting without enforcing
    # it; the sidecar reads it back and keeps to it, as it would have to on Apache Kafka).
    await ensure_topics(
        cfg.kafka.bootstrap_servers,
        [cfg.topics.decisions],
        3,
        configs={"max.message.bytes": "20000"},
    )
    await ensure_config_topics(cfg)
    requests = fraud.request_dicts(fraud.generate(20, seed=3))
    requests[7]["metadata"] = {"blob": "z" * 30_000}
    await produce(cfg, [(r["routing_key"].encode(), ENC.encode(r)) for r in requests])
    await run_until_processed(cfg, 20)
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=19), Decision
    )
    assert {d.request_id for d in decisions} == {r["request_id"] for r in requests} - {"req-7"}
    (letter,) = decode_values(
        await read_topic(bootstrap, cfg.topics.dead_letter, expect=1), DeadLetter
    )
    assert letter.kind == "output_oversize" and letter.request_id == "req-7"


async def test_a_request_bigger_than_a_whole_fetch_is_dead_lettered_and_the_partition_moves_on(
    bootstrap: str,
) -> None:
    """The consumer fetches at most ``fetch_bytes`` at a time (its buffers stay small); a
    record three times that, written by another client (the broker takes any size), must not
    stall its partition: it is the first record of a fetch, which brokers return whole."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    cfg = make_config(bootstrap, partitions=1)
    await ensure_config_topics(cfg)
    size = 3 * fetch_bytes(cfg.input.max_message_bytes)
    requests = fraud.request_dicts(fraud.generate(20, seed=4))
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 0, "message.max.bytes": size + (1 << 20)}
    )
    for i, r in enumerate(requests):
        if i == 10:  # alone in its produce request, so it starts a record batch of its own
            producer.flush(10)
            huge = {**r, "request_id": "huge", "metadata": {"blob": "x" * size}}
            producer.produce(cfg.topics.requests, ENC.encode(huge), b"huge")
            producer.flush(10)
        producer.produce(cfg.topics.requests, ENC.encode(r), r["routing_key"].encode())
    assert producer.flush(10) == 0
    letter = await the_requests_decided_and_one_dead_letter(cfg, requests)
    assert letter.kind == "oversize"


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_requests_compressed_by_another_client_are_decided(
    bootstrap: str, codec: str
) -> None:
    """Producers of other clients compress as they are told (lz4 is a common default): every
    codec Kafka has must be readable, or every request would be dead-lettered unreadable."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    cfg = make_config(bootstrap, partitions=1, kafka={"compression_type": codec})
    await ensure_config_topics(cfg)
    requests = fraud.request_dicts(fraud.generate(200, seed=5))
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": codec}
    )
    for r in requests:
        producer.produce(cfg.topics.requests, ENC.encode(r), r["routing_key"].encode())
    assert producer.flush(10) == 0
    await run_until_processed(cfg, 200)  # ... and its own outputs compressed the same way
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=200), Decision
    )
    assert sorted(d.request_id for d in decisions) == sorted(r["request_id"] for r in requests)
    assert await read_topic(bootstrap, cfg.topics.dead_letter, idle_s=1.0) == []


_BOMB = """
import sys, confluent_kafka
producer = confluent_kafka.Producer({
    "bootstrap.servers": sys.argv[1], "compression.type": "zstd", "linger.ms": 0,
    "message.max.bytes": 200_000_000,
})
producer.produce(sys.argv[2], bytes(100 << 20), b"bomb")  # 100 MiB of zeros: ~3 KB in zstd
assert producer.flush(30) == 0
"""


async def test_a_batch_that_would_inflate_past_the_bound_is_dead_lettered_uninflated(
    bootstrap: str,
) -> None:
    """A few kilobytes of zstd that inflate to 100 MiB (written by another client, in its own
    process) are refused before they are inflated: an ``unreadable`` dead letter saying why,
    and the partition moves on. Inflated, the record would only have been ``oversize``."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    cfg = make_config(bootstrap, partitions=1)
    await ensure_config_topics(cfg)
    requests = fraud.request_dicts(fraud.generate(20, seed=6))
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 0, "compression.type": "zstd"}
    )
    for i, r in enumerate(requests):
        if i == 10:
            assert producer.flush(10) == 0
            subprocess.run(
                [sys.executable, "-c", _BOMB, bootstrap, cfg.topics.requests],
                check=True,
                timeout=60,
            )
        producer.produce(cfg.topics.requests, ENC.encode(r), r["routing_key"].encode())
    assert producer.flush(10) == 0
    letter = await the_requests_decided_and_one_dead_letter(cfg, requests)
    assert letter.kind == "unreadable"
    assert "would inflate to more than" in letter.reason


async def test_an_instance_whose_control_tail_dies_stops_and_is_not_ready(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    sidecar = Sidecar(cfg, instance_id="doomed")
    task = asyncio.create_task(sidecar.run())
    await asyncio.wait_for(sidecar.ready.wait(), 30)
    plane = sidecar.control
    assert plane is not None

    def bug(record: object) -> None:  # a bug in our own code
        raise RuntimeError("simulated bug in the control tail")

    plane._decide = bug  # type: ignore[method-assign,assignment]
    await produce(cfg, [(b"x", b"{}")], topic=cfg.topics.control)
    await wait_until(lambda: sidecar.failure is not None, 10)
    with pytest.raises(BackgroundTaskFailed, match="control-tail died: RuntimeError"):
        await asyncio.wait_for(task, 30)
    sidecar.close_models()
    await wait_until(lambda: not sidecar.health.readiness()[0], 5)
    assert sidecar.health.readiness()[1]["phase"] == "stopped"


async def test_running_helper_survives_a_clean_start(bootstrap: str, tmp_path: Path) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    async with running(cfg, 1) as (one,):
        assert one.failure is None and one.supervisor.failure is None


async def test_a_stop_held_up_by_a_frozen_broker_says_what_it_waits_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer stopped with a record on its way to a broker that answers nothing: the stop
    ends (the record expires at the request timeout) and, while it waits, the log says which
    client waits for what, so that an instance slow to terminate can be diagnosed."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        cfg = make_config(broker.bootstrap_servers, kafka={"request_timeout_ms": 7000})
        await ensure_config_topics(cfg)
        producer = new_producer(cfg, "test", instance="frozen")
        await producer.start()
        await producer.send_and_wait(cfg.topics.requests, b"before")
        with frozen(broker):
            pending = await producer.send(cfg.topics.requests, b"during")
            started = time.monotonic()
            await stop_quietly(producer, warn_every_s=0.5)
            took = time.monotonic() - started
        with pytest.raises(KafkaError):
            pending.result()
    assert 0.5 < took < 30, took
    waits = [r.getMessage() for r in caplog.records if "has taken" in r.getMessage()]
    assert waits, "expected the slow stop to be logged"
    assert "AIOKafkaProducer" in waits[0] and "test-frozen" in waits[0], waits[0]
    assert "records still on their way to the broker" in waits[0]


async def _topic_exists(bootstrap: str, topic: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    listed = await asyncio.to_thread(admin.list_topics, timeout=10)
    return topic in listed.topics


async def test_a_missing_output_topic_is_named_and_never_created_by_the_sidecar(
    bootstrap: str,
) -> None:
    """Before: naming a missing topic in a metadata request made the broker create it (aiokafka
    always allows auto-creation; the embedded broker, and Apache Kafka by default, do it): a
    mistyped topics.decisions, or the topics of a restarted in-memory broker, came back with
    the broker's default partition count and the sidecar served them without a word."""
    cfg = make_config(bootstrap, kafka={"connect_timeout_s": 3})
    await ensure_config_topics(cfg)
    typo = msgspec.structs.replace(
        cfg, topics=msgspec.structs.replace(cfg.topics, decisions=unique("typo.decisions"))
    )
    sidecar = Sidecar(typo)
    try:
        with pytest.raises(BrokerError, match=r"typo\.decisions-\w+ \(topics\.decisions\)"):
            await asyncio.wait_for(sidecar.run(), 60)
    finally:
        sidecar.close_models()
    assert not sidecar.ready.is_set()
    assert not await _topic_exists(bootstrap, typo.topics.decisions)
    # Created on purpose, it is served.
    await ensure_config_topics(typo)
    requests = fraud.request_dicts(fraud.generate(20, seed=8))
    await produce(typo, [(r["routing_key"].encode(), ENC.encode(r)) for r in requests])
    await run_until_processed(typo, 20)


async def test_traffic_to_a_missing_requests_topic_names_it_and_creates_nothing(
    bootstrap: str,
) -> None:
    """`sidecar produce` (and --example-traffic) into a topic that is not there: a clear
    error naming topics.requests, not a KafkaTimeoutError traceback after request_timeout_ms
    (nor, before metadata requests stopped creating topics, a topic made up on the spot)."""
    from sidecar.traffic import produce_count

    cfg = make_config(bootstrap)
    with pytest.raises(BrokerError, match=r"requests \(topics\.requests\) do not exist"):
        await asyncio.wait_for(produce_count(cfg, 5), 20)
    assert not await _topic_exists(bootstrap, cfg.topics.requests)
