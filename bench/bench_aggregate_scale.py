"""One rollout shared by K aggregator processes (``topics.comparisons_key = "routing_key"``).

Starts Tansu, preloads N comparisons keyed by routing key over P partitions, then for each K
runs K ``sidecar aggregate`` processes (their own OS processes, as deployed) in one consumer
group. Each holds its partitions paused until the whole group is assigned, so no instance
starts alone; then all start at once and the rate is N over the time until every comparison
is consumed and every window's merged report is out. The sidecar runs in the same rounds
(``bench_throughput.py``'s contender) for a same-run ratio.

    python bench/bench_aggregate_scale.py [--count 400000] [--instances 1,2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import process_group
from bench_aggregate import config, make_values, sidecar_rate
from bench_throughput import preload as preload_requests
from process_group import State, wait_for_go

from sidecar.broker import EmbeddedBroker
from sidecar.contracts import OUTPUT_SCHEMA_VERSION
from sidecar.kafka import ensure_topics
from sidecar.runtime import prepare_process
from sidecar.traffic import produce_values

HEADERS = [("schema_version", OUTPUT_SCHEMA_VERSION.encode())]


# -- child: one aggregator process ------------------------------------------------------------


async def child_main(args: argparse.Namespace) -> None:
    from sidecar.aggregate.service import AggregatorService

    cfg = config(
        args.bootstrap,
        args.topic,
        args.window_ms,
        args.decode_processes,
        group=args.group,
        shared=True,
    )
    go = asyncio.Event()

    class Held(AggregatorService):
        """Pauses newly assigned partitions until the parent says go."""

        def on_assigned(self, partitions: set[int]) -> None:
            super().on_assigned(partitions)
            consumer = self.consumer
            if consumer is not None and not go.is_set():
                consumer.pause(*consumer.assignment())

    service = Held(cfg)
    task = asyncio.create_task(service.run())

    def on_go() -> None:
        go.set()
        consumer = service.consumer
        if consumer is not None:
            consumer.resume(*consumer.assignment())

    reading = asyncio.create_task(wait_for_go(on_go, service.request_stop))
    while not task.done():
        consumer = service.consumer
        assigned = sorted(tp.partition for tp in consumer.assignment()) if consumer else []
        merging = sorted(service.merge.assignment) if service.merge else []
        print(
            json.dumps(
                {
                    "consumed": service.consumed,
                    "reports": len(service.reports),
                    "assigned": assigned,
                    "merging": merging,
                    "t": time.time(),
                }
            ),
            flush=True,
        )
        await asyncio.sleep(0.05)
    reading.cancel()
    task.result()


# -- parent ----------------------------------------------------------------------------------


async def run_group(
    bootstrap: str, topic: str, k: int, n: int, windows: int, args: argparse.Namespace
) -> float:
    """Comparisons per second of k instances sharing the topic (all consumed, all reported)."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    child = [
        __file__,
        "--child",
        f"--bootstrap={bootstrap}",
        f"--topic={topic}",
        f"--group={group}",
        f"--window-ms={args.window_ms}",
        f"--decode-processes={args.decode_processes}",
    ]

    def settled(states: list[State]) -> bool:
        """Every partition assigned, and the merge stage's too."""
        owned = sum(len(s.get("assigned", [])) for s in states)
        merging = sum(len(s.get("merging", [])) for s in states)
        return (
            owned == args.partitions
            and merging == args.partitions
            and all(s.get("assigned") for s in states)
        )

    def done(states: list[State]) -> bool:
        consumed = sum(int(s.get("consumed", 0)) for s in states)
        return consumed >= n and sum(int(s.get("reports", 0)) for s in states) >= windows

    seconds, _ = await process_group.run_group([child] * k, settled, done)
    return n / seconds


async def main(args: argparse.Namespace) -> None:
    ks = [int(k) for k in args.instances.split(",")]
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap_servers
        topic = f"bench-{uuid.uuid4().hex[:6]}.comparisons"
        await ensure_topics(bs, [topic], partitions=args.partitions)
        await ensure_topics(bs, [f"{topic}.partials"], partitions=args.partitions)
        values = make_values(args.count, start_ms=1_700_000_000_000, rate=args.event_rate)
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=bs, acks="all", linger_ms=5, max_batch_size=1 << 20
        )
        await producer.start()
        try:
            for i in range(0, len(values), 50_000):
                chunk = [
                    (f"card-{j % 50_000:06d}".encode(), values[j])
                    for j in range(i, min(i + 50_000, len(values)))
                ]
                await produce_values(producer, topic, chunk, headers=HEADERS)
        finally:
            await producer.stop()
        # Windows that close: all but the last (lateness holds the watermark a window back).
        windows = int(args.count / args.event_rate * 1000 // args.window_ms) - 2
        print(
            f"preloaded {args.count} comparisons keyed by routing key over {args.partitions} "
            f"partitions; {windows}+ windows of {args.window_ms} ms"
        )
        requests_topic = f"bench-{uuid.uuid4().hex[:6]}.requests"
        await preload_requests(bs, requests_topic, args.sidecar_requests)
        rates: dict[int, list[float]] = {k: [] for k in ks}
        ratios: dict[int, list[float]] = {k: [] for k in ks}
        for run in range(1, args.repeat + 1):
            line = []
            got = {}
            for k in ks:
                got[k] = await run_group(bs, topic, k, args.count, windows, args)
                rates[k].append(got[k])
                line.append(f"{k} aggregator(s) {got[k]:,.0f}/s")
            side = sidecar_rate(bs, requests_topic, args.sidecar_requests)
            line.append(f"sidecar {side:,.0f} req/s")
            for k in ks:
                ratios[k].append(got[k] / side)
                line.append(f"[{k}] {got[k] / side:.1f}x")
            print(f"run {run}: " + " | ".join(line), flush=True)
        print()
        for k in ks:
            print(
                f"  {k} aggregator process(es): median {statistics.median(rates[k]):,.0f}/s; "
                f"per run vs the sidecar "
                + ", ".join(f"{r:.1f}x" for r in ratios[k])
                + f" (median {statistics.median(ratios[k]):.1f}x)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--instances", default="1,2", help="comma-separated group sizes")
    parser.add_argument("--window-ms", type=int, default=1_000)
    parser.add_argument("--event-rate", type=float, default=40_000.0)
    parser.add_argument("--sidecar-requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--decode-processes", type=int, default=1, help="aggregate.decode_processes of each"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    prepare_process()  # as `sidecar aggregate` does
    asyncio.run(child_main(parsed) if parsed.child else main(parsed))
