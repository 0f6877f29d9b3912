"""Champion isolation: the champion's latency and the sidecar's throughput with a healthy and
with misbehaving candidates, side by side in one run.

    python bench/bench_isolation.py [--backlog 100000] [--rate 2000] [--seconds 8] [--rounds 1]

Starts the embedded broker. For each candidate (healthy; raising on every call; NaN for
every record; 100 ms slow; hung, i.e. 30 s per call against its 200 ms timeout) a fresh set
of topics and a ``sidecar run``-equivalent child process (canary 10%, its defaults
otherwise):

1. throughput: ``--backlog`` requests preloaded, consumed as fast as the sidecar goes;
   requests/s = backlog / (last output record time - first output record time), read from
   the output topics' record timestamps (the sidecar's producer stamps them). Counted to the
   last comparison, so a candidate's timeout adds a tail at the end; "decisions/s" counts to
   the last decision only (the rate the downstream systems see);
2. latency: then ``--rate`` requests/s for ``--seconds``; the end-to-end time of each
   decision the champion was routed is its record's timestamp minus its request's (both
   stamped by a producer on this machine): p50 and p99.

Every number of a faulty candidate is printed with its ratio to the healthy one of the same
round. Target (issue 13): within 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PARTITIONS = 4
FAULTY = "sidecar.examples.faulty"
CASES: dict[str, dict[str, Any] | None] = {
    "healthy": None,
    "raising": {"target": f"{FAULTY}:raising"},
    "nan": {"target": f"{FAULTY}:nans", "options": {"fraction": 1.0}},
    "slow_100ms": {"target": f"{FAULTY}:slow", "options": {"delay_s": 0.1}},
    "hung": {"target": f"{FAULTY}:slow", "options": {"delay_s": 30.0}},
}


def config_tree(bootstrap: str, case: str) -> dict[str, Any]:
    from kafka_helpers import make_config

    run = f"iso-{case}-{uuid.uuid4().hex[:6]}"
    candidate = CASES[case]
    cfg = make_config(
        bootstrap,
        partitions=PARTITIONS,
        kafka={"group_id": f"{run}-group"},
        topics={
            "requests": f"{run}.requests",
            "decisions": f"{run}.decisions",
            "comparisons": f"{run}.comparisons",
            "dead_letter": f"{run}.dlq",
        },
        rollout={"mode": "canary", "canary_share_bp": 1000},
        control={"enabled": False},
        models={"candidate": candidate} if candidate else {},
    )
    import msgspec

    return msgspec.to_builtins(cfg)  # type: ignore[no-any-return]


# -- the child: one sidecar, reporting progress on stdout --------------------------------------


async def serve(tree: dict[str, Any]) -> None:
    from sidecar.config import config_from_dict
    from sidecar.runner import Sidecar

    cfg = config_from_dict(tree)
    sidecar = Sidecar(cfg)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, sidecar.request_stop)
    task = asyncio.create_task(sidecar.run())
    await asyncio.wait_for(sidecar.ready.wait(), 60)
    print("ready", flush=True)
    reported = -1
    while not task.done():
        drained = not sidecar.in_flight_records
        if drained and sidecar.processed != reported:
            reported = sidecar.processed
            print(f"drained {reported}", flush=True)
        await asyncio.sleep(0.05)
    await task
    shed = sidecar.metrics.candidate_shed._value.get()
    print(f"done shed={int(shed)} retries={sidecar.pipeline.champion_retries}", flush=True)
    os._exit(0)  # a hung candidate's thread would hold the interpreter for 30 s


def child_main(config_path: str) -> None:
    from sidecar.runtime import prepare_process

    prepare_process()
    tree = json.loads(Path(config_path).read_text())
    asyncio.run(serve(tree))


# -- the parent ---------------------------------------------------------------------------------


class Child:
    def __init__(self, tree: dict[str, Any], workdir: Path) -> None:
        path = workdir / f"{tree['kafka']['group_id']}.json"
        path.write_text(json.dumps(tree))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def wait_for(self, prefix: str, value: int | None = None, timeout_s: float = 600) -> str:
        """The next stdout line starting with ``prefix`` (and, for ``drained``, at least
        ``value`` records processed)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"sidecar exited ({self.proc.wait()}) waiting for {prefix}")
            line = line.strip()
            if line.startswith(prefix) and (value is None or int(line.split()[1]) >= value):
                return line
        raise TimeoutError(prefix)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        line = self.wait_for("done")
        self.proc.wait(60)
        return line


async def preload(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer

    from sidecar.traffic import generated_items, produce_values

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


async def paced(bootstrap: str, topic: str, start_id: int, rate: float, seconds: float) -> int:
    """``rate`` requests/s for ``seconds``, sent in 10 ms ticks; returns how many."""
    from aiokafka import AIOKafkaProducer

    from sidecar.traffic import generated_items

    n = int(rate * seconds)
    items = generated_items(n, seed=start_id, start_id=start_id)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        per_tick, sent, t0 = max(1, int(rate / 100)), 0, time.perf_counter()
        futures = []
        while sent < n:
            for key, value in items[sent : sent + per_tick]:
                futures.append(await producer.send(topic, value, key=key))
            sent += per_tick
            ahead = t0 + sent / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n


async def read_all(bootstrap: str, topic: str, expect: int) -> list[Any]:
    from kafka_helpers import read_topic

    return await read_topic(bootstrap, topic, idle_s=2.0, expect=expect)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_case(
    bootstrap: str, case: str, backlog: int, rate: float, seconds: float, workdir: Path
) -> dict[str, float | str]:
    import msgspec

    from sidecar.config import config_from_dict
    from sidecar.contracts import Decision
    from sidecar.kafka import ensure_topics

    tree = config_tree(bootstrap, case)
    cfg = config_from_dict(tree)
    await ensure_topics(bootstrap, cfg.all_topics(), PARTITIONS)
    await preload(bootstrap, cfg.topics.requests, backlog)
    child = Child(tree, workdir)
    try:
        await asyncio.to_thread(child.wait_for, "ready")
        await asyncio.to_thread(child.wait_for, "drained", backlog)
        live = await paced(bootstrap, cfg.topics.requests, backlog, rate, seconds)
        await asyncio.to_thread(child.wait_for, "drained", backlog + live)
    finally:
        done = await asyncio.to_thread(child.stop)
    decisions = await read_all(bootstrap, cfg.topics.decisions, backlog + live)
    comparisons = await read_all(bootstrap, cfg.topics.comparisons, backlog + live)
    decode = msgspec.json.Decoder(Decision).decode
    backlog_times: list[int] = []
    latencies: list[float] = []
    deciding: list[float] = []
    for record in decisions:
        d = decode(record.value)
        number = int(d.request_id.rsplit("-", 1)[1])
        if number < backlog:
            backlog_times.append(record.timestamp)
        elif d.routed_arm == "champion":
            latencies.append(record.timestamp - d.ts)
            deciding.append(d.decided_at - d.ts)
    decided_s = (max(backlog_times) - min(backlog_times)) / 1000
    backlog_times += [
        r.timestamp
        for r in comparisons
        if int(msgspec.json.decode(r.value)["request_id"].rsplit("-", 1)[1]) < backlog
    ]
    span_s = (max(backlog_times) - min(backlog_times)) / 1000
    return {
        "case": case,
        "rate": backlog / span_s,
        "decision_rate": backlog / decided_s,
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "decided_p50_ms": statistics.median(deciding),
        "decisions": len(decisions),
        "comparisons": len(comparisons),
        "child": done,
    }


async def main_async(args: argparse.Namespace) -> None:
    import tempfile

    from sidecar.broker import EmbeddedBroker

    cases = args.cases.split(",")
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = cases if round_ % 2 == 0 else list(reversed(cases))
            for case in order:
                r = await run_case(
                    broker.bootstrap_servers, case, args.backlog, args.rate, args.seconds, Path(tmp)
                )
                results[case].append(r)
                print(
                    f"round {round_ + 1} {case:11} backlog {r['rate']:>8,.0f} req/s "
                    f"({r['decision_rate']:,.0f} decisions/s)   champion "
                    f"p50 {r['p50_ms']:6.1f} ms (decided {r['decided_p50_ms']:.1f})  "
                    f"p99 {r['p99_ms']:6.1f} ms   "
                    f"({r['decisions']} decisions, {r['comparisons']} comparisons; {r['child']})",
                    flush=True,
                )
    print()
    print(f"{'candidate':11} {'req/s':>9} {'x healthy':>9} {'decided/s':>9} {'x':>6}", end="")
    print(f" {'p50 ms':>8} {'x':>6} {'p99 ms':>8} {'x':>6}")
    keys = ("rate", "decision_rate", "p50_ms", "p99_ms")
    base = {k: statistics.median(r[k] for r in results["healthy"]) for k in keys}
    for case in cases:
        m = {k: statistics.median(r[k] for r in results[case]) for k in keys}
        print(
            f"{case:11} {m['rate']:>9,.0f} {m['rate'] / base['rate']:>9.2f} "
            f"{m['decision_rate']:>9,.0f} {m['decision_rate'] / base['decision_rate']:>6.2f} "
            f"{m['p50_ms']:>8.1f} {m['p50_ms'] / base['p50_ms']:>6.2f} "
            f"{m['p99_ms']:>8.1f} {m['p99_ms'] / base['p99_ms']:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=100_000, help="requests preloaded")
    parser.add_argument("--rate", type=float, default=2000.0, help="live requests per second")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of live traffic")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated candidates")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if "healthy" not in args.cases.split(","):
        parser.error("--cases must include healthy (the baseline)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
