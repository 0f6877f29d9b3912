"""A poison corpus on the outcomes topic, written by an external client (confluent-kafka,
librdkafka) as any upstream team could: the stage neither crashes nor stalls, every record
that is no usable outcome becomes a dead letter with its reason, and the figures of the good
traffic around it are exactly what they would be without it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kafka_helpers import create_topics, produce, read_topic
from outcomes.outcome_support import ROLLOUT, final_reports, outcomes_config, stream

from sidecar.contracts import DeadLetter
from sidecar.outcomes.service import OutcomesService

confluent_kafka = pytest.importorskip("confluent_kafka")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

ENC = msgspec.json.Encoder()
Headers = list[tuple[str, Any]] | None


def poison(now_ms: int) -> list[tuple[str, bytes | None, bytes | None, Headers, str | None]]:
    """(name, key, value, headers, dead-letter kind; None: a valid outcome, routed)."""

    def out(**kw: Any) -> bytes:
        return ENC.encode({"request_id": "r1", "label": True, "ts": now_ms, **kw})

    return [
        ("tombstone", None, None, None, "decode"),
        ("binary key, not UTF-8", b"\xff\x00\xfe", b"\xff\xfe\xfa{", None, "decode"),
        ("a JSON array", b"k", b"[1, 2, 3]", None, "schema"),
        ("deep nesting", b"k", b"[" * 100_000 + b"]" * 100_000, None, "schema"),
        ("10 MB request id", b"k", out(request_id="x" * 10_000_000), None, "schema"),
        ("ts in seconds", b"k", out(ts=now_ms // 1000), None, "event_time"),
        ("value 1.7e308", b"k", out(value=1.7e308), None, "schema"),
        ("label 1e400", b"k", b'{"request_id":"r1","label":1e400,"ts":1}', None, "schema"),
        ("NaN label", b"k", b'{"request_id":"r1","label":NaN,"ts":1}', None, "decode"),
        ("bool label list", b"k", out(label=[True]), None, "schema"),
        ("100k item ids", b"k", out(label=[f"i{i}" for i in range(100_000)]), None, "schema"),
        # Valid outcomes with odd parts: routed, never judged (no comparison has their id).
        ("NUL and escapes in the id", b"k", out(request_id="a\x00\x1b[31m\n"), None, None),
        ("weird headers", b"\x00", out(request_id="nobody"), [("a", None), ("b", b"\xff")], None),
    ]


def produce_external(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None, Headers]]
) -> None:
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 20_000_000, "linger.ms": 0}
    )
    errors: list[Any] = []
    for key, value, headers in records:
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0 and not errors, errors


async def test_a_poison_corpus_on_the_outcomes_topic_is_dead_lettered_and_harms_nothing(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = outcomes_config(bootstrap, tmp_path / "state")
    await create_topics(cfg)
    s = stream(600, seed=5)
    corpus = poison(time.time_ns() // 1_000_000)
    await produce(cfg, s.comparisons, cfg.topics.comparisons)
    half = len(s.outcomes) // 2
    await produce(cfg, s.outcomes[:half], cfg.outcomes.topic)
    await asyncio.get_running_loop().run_in_executor(
        None,
        produce_external,
        bootstrap,
        cfg.outcomes.topic,
        [(key, value, headers) for _, key, value, headers, _ in corpus],
    )
    await produce(cfg, s.outcomes[half:], cfg.outcomes.topic)
    service = OutcomesService(cfg)
    task = asyncio.create_task(service.run())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            v = service.verdicts.get(ROLLOUT)
            if task.done() or (v is not None and v.judged_pairs >= len(s.ids)):
                break
            await asyncio.sleep(0.2)
        assert not task.done(), task.result()
        verdict = service.verdicts[ROLLOUT]
        assert service.router is not None
        assert service.router.dead_lettered == sum(kind is not None for *_, kind in corpus)
    finally:
        service.request_stop()
        await task
    # The good traffic's figures are exactly its own.
    assert verdict.judged_pairs == len(s.ids) and verdict.labelled == len(s.labelled)
    finals = final_reports(list(service.recent))
    assert sum(r.counts.positives for r in finals.values()) == int(s.y.sum())
    assert all(r.champion.mean_cost.reason != "not_finite" for r in finals.values())
    # Every bad record is a dead letter that says why (partitions interleave: any order).
    letters = [
        msgspec.json.decode(r.value, type=DeadLetter)
        for r in await read_topic(bootstrap, cfg.topics.dead_letter, idle_s=1)
    ]
    assert sorted(d.kind for d in letters) == sorted(k for *_, k in corpus if k is not None)
    assert all(d.source_topic == cfg.outcomes.topic and d.reason for d in letters)
    (seconds,) = [d for d in letters if d.kind == "event_time"]
    assert "in seconds?" in seconds.reason
