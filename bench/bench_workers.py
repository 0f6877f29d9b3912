"""``sidecar run --workers N``: throughput with 1 and with N worker processes, same run.

    python bench/bench_workers.py [--requests 400000] [--workers 2] [--rounds 2]

Starts the embedded broker and preloads the requests once (8 numeric features, 6 partitions).
Each contender is the real command line, ``sidecar run --workers K`` on its own consumer
group (canary 10%, defaults otherwise), stopped with SIGTERM once every request has a
decision and a comparison. Throughput is read from the output records' timestamps (the
sidecar's producers stamp them): the middle 80% of the decisions, so that process start-up
and the group's first rebalance (every worker joins) are not counted.

The broker runs on the same machine: with 2 cores, N workers and the broker share them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PARTITIONS = 6


def config_for(bootstrap: str, requests_topic: str, workers: int) -> Any:
    from kafka_helpers import make_config

    run = f"w{workers}-{uuid.uuid4().hex[:6]}"
    return make_config(
        bootstrap,
        partitions=PARTITIONS,
        kafka={"group_id": f"{run}-group"},
        topics={
            "requests": requests_topic,
            "decisions": f"{run}.decisions",
            "comparisons": f"{run}.comparisons",
            "dead_letter": f"{run}.dlq",
        },
        rollout={"mode": "canary", "canary_share_bp": 1000},
        control={"enabled": False},
        logging={"progress_interval_s": 0},
    )


async def preload(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer

    from sidecar.kafka import ensure_topics
    from sidecar.traffic import generated_items, produce_values

    await ensure_topics(bootstrap, [topic], partitions=PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20, linger_ms=5
    )
    await producer.start()
    try:
        for start in range(0, n, 20_000):
            items = generated_items(min(20_000, n - start), seed=start, start_id=start)
            await produce_values(producer, topic, items, partitions=PARTITIONS)
    finally:
        await producer.stop()


async def count(bootstrap: str, topic: str) -> list[int]:
    """Record timestamps of ``topic`` so far (read until idle)."""
    from kafka_helpers import read_topic

    return [r.timestamp for r in await read_topic(bootstrap, topic, idle_s=1.0)]


async def run_contender(bootstrap: str, topic: str, n: int, workers: int, tmp: Path) -> float:
    from kafka_helpers import write_toml

    from sidecar.kafka import ensure_topics

    cfg = config_for(bootstrap, topic, workers)
    await ensure_topics(bootstrap, cfg.all_topics(), PARTITIONS)
    path = write_toml(cfg, tmp / f"{cfg.kafka.group_id}.toml")
    command = [sys.executable, "-m", "sidecar.cli", "run", "--workers", str(workers)]
    proc = subprocess.Popen(
        [*command, "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + 600
        stamps: list[int] = []
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            stamps = await count(bootstrap, cfg.topics.decisions)
            if len(stamps) >= n and len(await count(bootstrap, cfg.topics.comparisons)) >= n:
                break
        else:
            raise TimeoutError(f"{workers} worker(s) did not finish")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    stamps.sort()
    lo, hi = stamps[len(stamps) // 10], stamps[len(stamps) * 9 // 10]
    return 0.8 * len(stamps) / max(0.001, (hi - lo) / 1000)


async def main_async(args: argparse.Namespace) -> None:
    from sidecar.broker import EmbeddedBroker

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        topic = f"bench-{uuid.uuid4().hex[:6]}.requests"
        await preload(broker.bootstrap_servers, topic, args.requests)
        print(
            f"preloaded {args.requests} requests ({PARTITIONS} partitions); "
            f"{os.cpu_count()} cores on this machine, the broker among them"
        )
        rates: dict[int, list[float]] = {1: [], args.workers: []}
        for round_ in range(args.rounds):
            order = [1, args.workers] if round_ % 2 == 0 else [args.workers, 1]
            for workers in order:
                rate = await run_contender(
                    broker.bootstrap_servers, topic, args.requests, workers, Path(tmp)
                )
                rates[workers].append(rate)
                print(f"round {round_ + 1}: --workers {workers}: {rate:>10,.0f} req/s", flush=True)
        one, many = statistics.median(rates[1]), statistics.median(rates[args.workers])
        per_round = [m / o for o, m in zip(rates[1], rates[args.workers], strict=True)]
        print(
            f"\nmedian: 1 worker {one:,.0f} req/s, {args.workers} workers {many:,.0f} req/s; "
            f"ratio {many / one:.2f} (per round: {', '.join(f'{r:.2f}' for r in per_round)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400_000)
    parser.add_argument("--workers", type=int, default=2, help="workers of the second contender")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2 (1 is the baseline)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
