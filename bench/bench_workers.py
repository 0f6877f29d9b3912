"""``sidecar run --workers N``: throughput with 1 and with N worker processes, same run.

    python bench/bench_workers.py [--requests 400000] [--workers 2] [--rounds 2]
                                  [--model-cost-us 0]

Starts the embedded broker and preloads the requests once (8 numeric features, 6 partitions).
Each contender is the real command line, ``sidecar run --workers K`` on its own consumer
group (canary 10%, defaults otherwise), stopped with SIGTERM once every request has a
decision and a comparison. Throughput is read from the output records' timestamps (the
sidecar's producers stamp them): the middle 80% of the decisions, so that process start-up
and the group's first rebalance (every worker joins) are not counted.

The broker runs on the same machine: with 2 cores, N workers and the broker share them.
``--model-cost-us C`` wraps both example models in ``sidecar.examples.faulty:busy`` (C us of
CPU per record each, GIL held): the models then bound each process and the broker's share
of the machine is small, which is how "N workers where the cores are free" is shown on a
machine that has no core to spare for the broker.
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


def busy_models(cost_us: float) -> dict[str, Any]:
    """Both example models, each costing ``cost_us`` of CPU per record."""
    return {
        arm: {
            "target": "sidecar.examples.faulty:busy",
            "options": {"us_per_record": cost_us, "target": f"sidecar.examples.fraud:{arm}"},
            "timeout_ms": 5000,  # a batch costs 2,000 x cost_us: never a timeout here
        }
        for arm in ("champion", "candidate")
    }


def config_for(bootstrap: str, requests_topic: str, workers: int, cost_us: float = 0) -> Any:
    from kafka_helpers import make_config

    run = f"w{workers}-{uuid.uuid4().hex[:6]}"
    extra = {"models": busy_models(cost_us)} if cost_us else {}
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
        **extra,
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


async def run_contender(
    bootstrap: str, topic: str, n: int, workers: int, tmp: Path, cost_us: float = 0
) -> float:
    from kafka_helpers import write_toml

    from sidecar.kafka import ensure_topics

    cfg = config_for(bootstrap, topic, workers, cost_us)
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
            + (
                f"; models cost {args.model_cost_us:g} us of CPU a record each"
                if args.model_cost_us
                else ""
            )
        )
        rates: dict[int, list[float]] = {1: [], args.workers: []}
        for round_ in range(args.rounds):
            order = [1, args.workers] if round_ % 2 == 0 else [args.workers, 1]
            for workers in order:
                rate = await run_contender(
                    broker.bootstrap_servers,
                    topic,
                    args.requests,
                    workers,
                    Path(tmp),
                    args.model_cost_us,
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
    parser.add_argument(
        "--model-cost-us",
        type=float,
        default=0.0,
        help="CPU microseconds a record each model spends (0: the example models as they are)",
    )
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2 (1 is the baseline)")
    if args.model_cost_us < 0:
        parser.error("--model-cost-us must not be negative")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
