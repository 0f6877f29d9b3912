"""Helpers for tests that talk to a real broker (embedded Tansu, or the one in the env)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sidecar.broker import EmbeddedBroker
from sidecar.config import SidecarConfig, config_from_dict
from sidecar.examples.fraud import CANDIDATE_FEATURES, CHAMPION_FEATURES
from sidecar.kafka import ensure_config_topics
from sidecar.traffic import produce_values


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def frozen(broker: EmbeddedBroker) -> Iterator[None]:
    """The broker process stopped (SIGSTOP): connections stay open, nothing answers."""
    assert broker.process is not None
    broker.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        broker.process.send_signal(signal.SIGCONT)


def make_config(bootstrap: str, partitions: int = 3, **sections: dict[str, Any]) -> SidecarConfig:
    """A config on fresh topics (unique names) with the example fraud models."""
    run = unique("t")
    tree: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{run}-group",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "topics": {
            "requests": f"{run}.requests",
            "decisions": f"{run}.decisions",
            "comparisons": f"{run}.comparisons",
            "dead_letter": f"{run}.dlq",
            "control": f"{run}.control",
            "partitions": partitions,
        },
        "rollout": {"name": "fraud-v2", "mode": "canary", "canary_share_bp": 2000},
        "models": {
            "champion": {
                "name": "fraud-lr",
                "version": "1.4.0",
                "target": "sidecar.examples.fraud:champion",
                "threshold": 0.3,
                "features": [{"name": f} for f in CHAMPION_FEATURES],
            },
            "candidate": {
                "name": "fraud-lr",
                "version": "2.0.0",
                "target": "sidecar.examples.fraud:candidate",
                "threshold": 0.5,
                "features": [{"name": f} for f in CANDIDATE_FEATURES],
            },
        },
        "metrics": {"port": 0},
        "pipeline": {"drain_timeout_s": 20},
        # The embedded broker (Tansu) keeps producer-chosen record times on the control topic.
        "control": {"allow_create_time": True},
    }
    for section, values in sections.items():
        node = tree.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                node[key].update(value)
            else:
                node[key] = value
    return config_from_dict(tree)


async def create_topics(cfg: SidecarConfig) -> None:
    await ensure_config_topics(cfg)


async def produce(
    cfg: SidecarConfig, items: Sequence[tuple[bytes | None, bytes]], topic: str | None = None
) -> None:
    """Produce ``items`` to ``topic`` (default: the requests topic)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all", max_batch_size=1 << 20
    )
    await producer.start()
    try:
        await produce_values(producer, topic or cfg.topics.requests, items)
    finally:
        await producer.stop()


async def read_topic(
    bootstrap: str,
    topic: str,
    idle_s: float = 3.0,
    max_wait_s: float = 120.0,
    expect: int | None = None,
) -> list[Any]:
    """Every record of a topic, read from the beginning until nothing new arrives for
    ``idle_s`` (Tansu's high watermark is not reliable for batches, so no end offsets)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        parts = await consumer._client._wait_on_metadata(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        last_new = time.monotonic()
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = sum(len(v) for v in batch.values())
            for part in batch.values():
                records.extend(part)
            if got:
                last_new = time.monotonic()
            elif (
                time.monotonic() - last_new > idle_s and (expect is None or len(records) >= expect)
            ) or (
                expect is not None and len(records) >= expect and time.monotonic() - last_new > 0.5
            ):
                break
        return records
    finally:
        await consumer.stop()


def decode_values(records: Sequence[Any], type_: type[Any]) -> list[Any]:
    return [msgspec.json.decode(r.value, type=type_) for r in records]


async def wait_until(predicate: Any, timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        items = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value"):  # enums
        return _toml_value(value.value)
    return msgspec.json.encode(value).decode()


def write_toml(cfg: SidecarConfig, path: Any) -> Any:
    """Write a config as TOML (what a user would write), for tests that run the CLI."""
    tree = msgspec.to_builtins(cfg)
    lines: list[str] = []
    for section, values in tree.items():
        if section == "models":
            for arm, model in values.items():
                if model is None:
                    continue
                lines.append(f"[models.{arm}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in model.items() if v is not None]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path
