"""One rollout shared by K outcomes stages (``topics.comparisons_key = "routing_key"``).

The outcomes stage scales out by partitions: each task (a partition of the comparisons topic)
has one owner in the stage's consumer group, and a rollout spread over several tasks is
reported by the merge stage from the tasks' partials. This starts Tansu, preloads N
comparisons keyed by routing key over P partitions and outcomes for a share of them (with
their routing key, as a producer must then send them), and for each K runs K
``OutcomesService`` processes (their own OS processes, as deployed) in one group. Each holds
its polling until the whole group is assigned and every task restored, so no instance starts
alone; then all start at once and the rate is N over the time until every comparison is
applied (with how busy the machine's cores were meanwhile). The sidecar runs in the same
rounds (``bench_throughput.py``'s contender) for a same-run ratio. The outcomes' router (its
own group) may route them before the start.

    python bench/bench_outcomes_scale.py [--count 600000] [--instances 1,2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import process_group
from bench_aggregate import make_values
from bench_outcomes import config, new_producer_plain, sidecar_run
from bench_throughput import preload as preload_requests
from process_group import State, wait_for_go

from sidecar.broker import EmbeddedBroker
from sidecar.contracts import OUTPUT_SCHEMA_VERSION
from sidecar.kafka import ensure_topics
from sidecar.outcomes.contract import Outcome
from sidecar.runtime import limit_malloc_arenas, prepare_process
from sidecar.traffic import produce_values

HEADERS = [("schema_version", OUTPUT_SCHEMA_VERSION.encode())]
CARDS = 50_000  # make_values' routing keys: card-{i % 50_000}


def stage_config(bootstrap: str, run: str, state: Path, group: str, decode: int) -> Any:
    cfg = config(bootstrap, run, state, decode_processes=decode, group_id=group)
    return msgspec.structs.replace(
        cfg, topics=msgspec.structs.replace(cfg.topics, comparisons_key="routing_key")
    )


# -- child: one outcomes stage process --------------------------------------------------------


async def child_main(args: argparse.Namespace) -> None:
    from sidecar.outcomes.service import OutcomesService

    cfg = stage_config(args.bootstrap, args.run, Path(args.state), args.group, args.decode)
    go = asyncio.Event()

    class Held(OutcomesService):
        """Polls nothing until the parent says go (the group settles and restores first)."""

        async def _loop(self) -> None:
            await go.wait()
            await super()._loop()

    service = Held(cfg)
    task = asyncio.create_task(service.run())

    reading = asyncio.create_task(wait_for_go(go.set, service.request_stop))
    while not task.done():
        print(
            json.dumps(
                {
                    "applied": service.applied.comparisons,
                    "ready": sorted(p for p, rt in service.tasks.items() if rt.ready),
                    "t": time.time(),
                }
            ),
            flush=True,
        )
        await asyncio.sleep(0.02)
    reading.cancel()
    task.result()


# -- parent ----------------------------------------------------------------------------------


async def run_group(
    bootstrap: str, run: str, tmp: Path, k: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Comparisons per second of k stages sharing the topic (every comparison applied), and
    how busy the machine's cores were meanwhile (0-1)."""
    group = f"{run}-o{uuid.uuid4().hex[:6]}"
    argv = [
        [
            __file__,
            "--child",
            f"--bootstrap={bootstrap}",
            f"--run={run}",
            f"--group={group}",
            f"--state={tmp / group / str(i)}",
            f"--decode={args.decode_processes}",
        ]
        for i in range(k)
    ]

    def settled(states: list[State]) -> bool:
        """Every task owned and restored, by every member."""
        owned = sum(len(s.get("ready", [])) for s in states)
        return owned == int(args.partitions) and all(s.get("ready") for s in states)

    def done(states: list[State]) -> bool:
        return sum(int(s.get("applied", 0)) for s in states) >= int(args.count)

    seconds, busy = await process_group.run_group(argv, settled, done)
    return args.count / seconds, busy


async def preload(bootstrap: str, cfg: Any, args: argparse.Namespace) -> int:
    """Comparisons keyed by routing key; outcomes for ``--label-share`` of them, with it."""
    start_ms = time.time_ns() // 1_000_000 - int(args.count / args.event_rate * 1000) - 60_000
    values = make_values(args.count, start_ms=start_ms, rate=args.event_rate)
    rng = np.random.default_rng(1)
    picked = np.flatnonzero(rng.random(args.count) < args.label_share).tolist()
    enc = msgspec.json.Encoder()
    outcomes = [
        (
            f"card-{i % CARDS:06d}".encode(),
            enc.encode(
                Outcome(
                    request_id=f"req-{i}",
                    routing_key=f"card-{i % CARDS:06d}",
                    label=bool(rng.random() < 0.9),
                    ts=int(start_ms + i * 1000.0 / args.event_rate) + int(rng.integers(500, 5000)),
                    source="bench",
                )
            ),
        )
        for i in picked
    ]
    producer = new_producer_plain(bootstrap)
    await producer.start()
    try:
        for i in range(0, len(values), 50_000):
            chunk = [
                (f"card-{j % CARDS:06d}".encode(), values[j])
                for j in range(i, min(i + 50_000, len(values)))
            ]
            await produce_values(producer, cfg.topics.comparisons, chunk, headers=HEADERS)
        for i in range(0, len(outcomes), 50_000):
            await produce_values(producer, cfg.outcomes.topic, outcomes[i : i + 50_000])
    finally:
        await producer.stop()
    return len(outcomes)


async def main(args: argparse.Namespace) -> None:
    ks = [int(k) for k in args.instances.split(",")]
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bs = broker.bootstrap_servers
        run = f"bench-{uuid.uuid4().hex[:6]}"
        cfg = stage_config(bs, run, tmp, "x", 0)
        await ensure_topics(
            bs, [cfg.topics.comparisons, cfg.outcomes.topic], partitions=args.partitions
        )
        labelled = await preload(bs, cfg, args)
        print(
            f"preloaded {args.count:,} comparisons keyed by routing key over {args.partitions} "
            f"partitions and {labelled:,} outcomes",
            flush=True,
        )
        requests_topic = f"{run}.requests"
        await preload_requests(bs, requests_topic, args.sidecar_requests)
        rates: dict[int, list[float]] = {k: [] for k in ks}
        ratios: dict[int, list[float]] = {k: [] for k in ks}
        for i in range(1, args.repeat + 1):
            got, busy = {}, {}
            for k in ks if i % 2 else ks[::-1]:  # alternate the order (a shared machine)
                got[k], busy[k] = await run_group(bs, run, tmp, k, args)
                rates[k].append(got[k])
            side, _ = sidecar_run(bs, requests_topic, args.sidecar_requests)
            line = [
                f"{k} stage(s) {got[k]:,.0f} comparisons/s (cores {busy[k]:.0%} busy)" for k in ks
            ]
            line.append(f"sidecar {side:,.0f} req/s")
            for k in ks:
                ratios[k].append(got[k] / side)
                line.append(f"[{k}] {got[k] / side:.2f}x")
            print(f"run {i}: " + " | ".join(line), flush=True)
        print()
        for k in ks:
            print(
                f"  {k} stage process(es): median {statistics.median(rates[k]):,.0f} "
                "comparisons/s; per run vs the sidecar "
                + ", ".join(f"{r:.2f}x" for r in ratios[k])
                + f" (median {statistics.median(ratios[k]):.2f}x); vs 1 stage "
                + ", ".join(f"{r / r1:.2f}x" for r, r1 in zip(rates[k], rates[ks[0]], strict=True))
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--instances", default="1,2", help="comma-separated group sizes")
    parser.add_argument("--event-rate", type=float, default=40_000.0)
    parser.add_argument("--label-share", type=float, default=0.02)
    parser.add_argument("--sidecar-requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--decode-processes", type=int, default=0, help="outcomes.decode_processes of each"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--decode", type=int, default=0, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    limit_malloc_arenas()  # as `sidecar outcomes run` does
    prepare_process()
    asyncio.run(child_main(parsed) if parsed.child else main(parsed))
