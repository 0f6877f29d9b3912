"""Aggregator throughput on the embedded broker, against a plain consume+decode baseline.

Starts Tansu, preloads N comparison records (what the sidecar writes: one rollout, keyed by
rollout, so one partition; event time advancing at the sidecar's rate), then measures in the
same run:

* baseline: aiokafka ``getmany`` + ``msgspec`` decode of every record (no group, no windows);
* aggregator: ``AggregatorService`` end to end (consumer group, decode, columns, windows,
  reports produced to the reports topic, guards, offset commits), once per
  ``--decode-processes`` value (0: decode in the loop; 1: one decode helper process);
* sidecar: ``bench_throughput.py``'s sidecar contender on ``--sidecar-requests`` requests
  (its own process, same broker), so "x times the sidecar's output rate" is a same-run ratio.

    python bench/bench_aggregate.py [--count 300000] [--repeat 3] [--decode-processes 0,1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sidecar.aggregate.service import AggregatorService
from sidecar.broker import EmbeddedBroker
from sidecar.config import SidecarConfig, config_from_dict
from sidecar.contracts import OUTPUT_SCHEMA_VERSION, Comparison, ModelResult
from sidecar.kafka import ensure_topics
from sidecar.runtime import prepare_process
from sidecar.traffic import produce_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import preload as preload_requests

ROLLOUT = "fraud-v2"
#: What the sidecar puts on every comparison record (the consumer pays for parsing it).
SIDECAR_HEADERS = [("schema_version", OUTPUT_SCHEMA_VERSION.encode())]


def make_values(n: int, start_ms: int, rate: float, seed: int = 0) -> list[bytes]:
    """Comparisons shaped like the sidecar's (fraud models, shadow mode)."""
    rng = np.random.default_rng(seed)
    z1 = rng.standard_normal(n)
    z2 = 0.9 * z1 + 0.44 * rng.standard_normal(n)
    s1 = 1 / (1 + np.exp(-(-3 + z1)))
    s2 = 1 / (1 + np.exp(-(-3 + z2)))
    lat = rng.lognormal(0.5, 0.3, (2, n))
    ts = start_ms + (np.arange(n) * 1000.0 / rate).astype(np.int64)
    enc = msgspec.json.Encoder()
    return [
        enc.encode(
            Comparison(
                request_id=f"req-{i}",
                routing_key=f"card-{i % 50_000:06d}",
                rollout=ROLLOUT,
                ts=int(ts[i]),
                policy_epoch=0,
                policy_mode="shadow",
                served_by="champion",
                champion=ModelResult(
                    model="fraud-lr",
                    version="1.4.0",
                    score=float(s1[i]),
                    decision=bool(s1[i] > 0.3),
                    latency_ms=float(lat[0, i]),
                ),
                candidate=ModelResult(
                    model="fraud-lr",
                    version="2.0.0",
                    score=float(s2[i]),
                    decision=bool(s2[i] > 0.3),
                    latency_ms=float(lat[1, i]),
                ),
            )
        )
        for i in range(n)
    ]


def config(
    bootstrap: str,
    topic: str,
    window_ms: int,
    decode_processes: int = 1,
    *,
    group: str | None = None,
    shared: bool = False,
) -> SidecarConfig:
    """The aggregator's config for a run; ``shared``: comparisons keyed by routing key (the
    partials topic is ``<topic>.partials``). A fresh ``group`` unless one is given."""
    group = group or f"bench-{uuid.uuid4().hex[:8]}"
    topics: dict[str, str] = {"comparisons": topic, "control": f"{group}.control"}
    if shared:
        topics["comparisons_key"] = "routing_key"
    return config_from_dict(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "topics": topics,
            "models": {
                "champion": {"name": "m", "version": "1.0.0", "target": "x:y", "features": []}
            },
            "aggregate": {
                "group_id": group,
                "reports_topic": f"{group}.reports",
                "partials_topic": f"{topic}.partials",
                "window_ms": window_ms,
                "allowed_lateness_ms": 1000,
                "metrics_port": 0,
                "idle_timeout_ms": 2000,
                "decode_processes": decode_processes,
                "rules": [
                    {
                        "name": "ratio",
                        "figure": "decision_rate_ratio",
                        "threshold": 1.5,
                        "min_pairs": 500,
                        "consecutive": 2,
                        "action": "alert",
                    }
                ],
            },
        }
    )


async def preload(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        key = ROLLOUT.encode()
        for i in range(0, len(values), 50_000):
            chunk = [(key, v) for v in values[i : i + 50_000]]
            await produce_values(producer, topic, chunk, headers=SIDECAR_HEADERS)
    finally:
        await producer.stop()


async def baseline(bootstrap: str, topic: str, n: int) -> float:
    """Seconds to consume and decode n records (first fetch to last record)."""
    decoder = msgspec.json.Decoder(Comparison)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        tps = [
            TopicPartition(topic, p)
            for p in sorted(consumer.partitions_for_topic(topic) or await _parts(consumer, topic))
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got, t0 = 0, time.perf_counter()
        while got < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for recs in batches.values():
                decoded = [decoder.decode(r.value) for r in recs]
                got += len(decoded)
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


async def _parts(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()
    return consumer.partitions_for_topic(topic) or {0}


async def aggregator(cfg: SidecarConfig, n: int) -> tuple[float, float, int]:
    """(seconds first record -> n consumed, seconds including group join, reports)."""
    service = AggregatorService(cfg)
    service.keep_reports = True
    t_start = time.monotonic()
    task = asyncio.create_task(service.run())
    try:
        while service.consumed < n:
            await asyncio.sleep(0.002)
            if task.done():
                task.result()
        t_end = time.monotonic()
    finally:
        service.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
    assert service.first_poll_at is not None
    return t_end - service.first_poll_at, t_end - t_start, len(service.reports)


def sidecar_rate(bootstrap: str, topic: str, n: int) -> float:
    """The sidecar's own throughput (``bench_throughput.py``'s contender, own process)."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("bench_throughput.py")),
            "--mode=sidecar",
            f"--bootstrap={bootstrap}",
            f"--topic={topic}",
            f"--requests={n}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"sidecar run failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    modes = [int(m) for m in args.decode_processes.split(",")]
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap_servers
        topic = f"bench-{uuid.uuid4().hex[:6]}.comparisons"
        await ensure_topics(bs, [topic], partitions=args.partitions)
        t0 = time.perf_counter()
        values = make_values(args.count, start_ms=1_700_000_000_000, rate=args.event_rate)
        await preload(bs, topic, values)
        size = sum(map(len, values)) / len(values)
        print(
            f"preloaded {args.count} comparisons ({size:.0f} B each) into {topic} "
            f"in {time.perf_counter() - t0:.1f}s; event time {args.count / args.event_rate:.1f}s"
            f" at {args.event_rate:.0f}/s, {args.window_ms} ms windows"
        )
        del values
        requests_topic = ""
        if args.sidecar_requests:
            requests_topic = f"bench-{uuid.uuid4().hex[:6]}.requests"
            await preload_requests(bs, requests_topic, args.sidecar_requests)
        rates: dict[str, list[float]] = {"baseline": [], "sidecar": []}
        ratios: dict[int, list[float]] = {}
        for run in range(1, args.repeat + 1):
            line = []
            base_rate = args.count / await baseline(bs, topic, args.count)
            rates["baseline"].append(base_rate)
            line.append(f"consume+decode baseline {base_rate:,.0f}/s")
            for procs in modes:
                cfg = config(bs, topic, args.window_ms, procs)
                agg_s, _, reports = await aggregator(cfg, args.count)
                rate = args.count / agg_s
                rates.setdefault(f"aggregator decode_processes={procs}", []).append(rate)
                line.append(
                    f"aggregator[decode_processes={procs}] {rate:,.0f}/s ({reports} reports)"
                )
            if requests_topic:
                side = sidecar_rate(bs, requests_topic, args.sidecar_requests)
                rates["sidecar"].append(side)
                line.append(f"sidecar {side:,.0f} req/s")
                for procs in modes:
                    ratio = rates[f"aggregator decode_processes={procs}"][-1] / side
                    ratios.setdefault(procs, []).append(ratio)
                    line.append(f"[{procs}] {ratio:.1f}x")
            print(f"run {run}: " + " | ".join(line), flush=True)
        sidecar = statistics.median(rates["sidecar"]) if rates["sidecar"] else args.sidecar_rate
        source = "measured in this run" if rates["sidecar"] else "given by --sidecar-rate"
        print(f"\nmedians (sidecar output rate {sidecar:,.0f}/s, {source}):")
        for name, values_ in rates.items():
            if values_ and name != "sidecar":
                med = statistics.median(values_)
                print(f"  {name:38} {med:>10,.0f}/s = {med / sidecar:.1f}x the sidecar's output")
        for procs, values_ in ratios.items():
            print(
                f"  aggregator/sidecar per run, decode_processes={procs}: "
                + ", ".join(f"{r:.1f}x" for r in values_)
                + f" (median {statistics.median(values_):.1f}x, min {min(values_):.1f}x)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--window-ms", type=int, default=1_000)
    parser.add_argument(
        "--event-rate",
        type=float,
        default=40_000.0,
        help="comparisons per second of event time (the sidecar's output rate)",
    )
    parser.add_argument(
        "--sidecar-rate",
        type=float,
        default=40_000.0,
        help="sidecar output rate to compare against when --sidecar-requests is 0",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--decode-processes",
        default="0,1",
        help="aggregator variants to run, comma-separated decode_processes values",
    )
    parser.add_argument(
        "--sidecar-requests",
        type=int,
        default=200_000,
        help="also run the sidecar (bench_throughput's contender) on this many requests each "
        "run, for a same-run ratio; 0 uses --sidecar-rate instead",
    )
    prepare_process()  # as `sidecar aggregate` does: uvloop, tuned garbage collector
    asyncio.run(main(parser.parse_args()))
