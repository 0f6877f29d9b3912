"""Throughput of the sidecar's full path against a plain aiokafka passthrough, same run.

    python bench/bench_throughput.py [--requests 200000] [--rounds 2]

Starts the embedded broker, preloads N requests (8 numeric features) once, then runs each
contender in its own process (so peak memory is its own) on its own consumer group:

* passthrough: consume, decode each request (msgspec), encode two outputs per record,
  produce them with the batch API, commit after acks. No models, no routing. The ceiling.
* sidecar: the real ``Sidecar`` (decode + validate, route, score champion and candidate,
  choose, encode decisions and comparisons, produce, commit after acks).

Rounds alternate the order to spread the machine's noise. Prints requests/s, the ratio and
peak RSS of each.

``--wire-equal`` adds a third contender, the passthrough writing what the sidecar writes on
the wire: each output padded to the mean size of the sidecar's decision and comparison for
this workload (measured here, without Kafka) and carrying as many headers. The plain
passthrough stays the ceiling; this one shows how much of the gap is the bytes and headers
the output contracts carry rather than the sidecar's own work.

``--c-edge`` adds the passthrough reading and writing record batches with the sidecar's C
extension (``sidecar/kafka/_batches.c``) instead of aiokafka's: how much of the sidecar's
lead over plain aiokafka is that edge, and how close the rest of its work comes to it.

``--tracing memory`` runs the sidecar with ``[tracing]`` on (extra ``otel``): every batch
traced, its spans exported in the background (``BatchSpanProcessor``, as with OTLP) to an
in-memory exporter, so the figure is the cost of making the spans, not of a collector.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import peak_rss_mib, rss_mib

TOPIC_PARTITIONS = 6


#: Process CPU seconds when the first record was processed and when the last was
#: acknowledged: the steady-state cost per request, start-up and shutdown left out.
STEADY: dict[str, float] = {}
#: Resident size (MiB) when a quarter, half, three quarters and all of the requests were
#: processed: a process whose memory is bounded levels off; one that leaks keeps rising.
QUARTERS: list[float] = []


def note_progress(done: int, n: int) -> None:
    while len(QUARTERS) < 4 and done >= n * (len(QUARTERS) + 1) / 4:
        QUARTERS.append(rss_mib())


def config_for(bootstrap: str, requests_topic: str, group: str) -> Any:
    from kafka_helpers import make_config

    return make_config(
        bootstrap,
        partitions=TOPIC_PARTITIONS,
        kafka={"group_id": group},
        topics={"requests": requests_topic},
        rollout={"mode": "canary", "canary_share_bp": 1000},
        control={"enabled": False},
    )


async def preload(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer

    from sidecar.kafka import ensure_topics
    from sidecar.traffic import generated_items, produce_values

    await ensure_topics(bootstrap, [topic], partitions=TOPIC_PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20, linger_ms=5
    )
    await producer.start()
    try:
        for start in range(0, n, 20_000):
            items = generated_items(min(20_000, n - start), seed=start, start_id=start)
            await produce_values(producer, topic, items, partitions=TOPIC_PARTITIONS)
    finally:
        await producer.stop()


async def run_passthrough(
    cfg: Any, n: int, wire: tuple[int, int] | None = None, c_edge: bool = False
) -> float:
    import msgspec
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from sidecar.contracts import InferenceRequest
    from sidecar.kafka import BatchSender, ensure_topics, records
    from sidecar.pipeline import TopicOutput

    # The ceiling reads records as aiokafka does (the sidecar reads whole batches); with
    # ``c_edge`` it reads and writes batches as the sidecar does (sidecar/kafka/_batches.c).
    if not c_edge:
        records.uninstall()

    t = cfg.topics
    await ensure_topics(cfg.kafka.bootstrap_servers, cfg.all_topics(), TOPIC_PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=1 << 21,
    )
    await producer.start()
    consumer = AIOKafkaConsumer(
        t.requests,
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        group_id=cfg.kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    sender = BatchSender(
        producer,
        {t.decisions: TOPIC_PARTITIONS, t.comparisons: TOPIC_PARTITIONS},
        raw_append=False,  # aiokafka's public BatchBuilder.append, as any client would
        prebuilt_batch_bytes=(1 << 20) if c_edge else None,
    )
    decoder = msgspec.json.Decoder(InferenceRequest)
    encoder = msgspec.json.Encoder()
    # --wire-equal: outputs as big as the sidecar's, with as many headers.
    decision_bytes, comparison_bytes = wire or (0, 0)
    comparison_headers = [("schema_version", b"1.0")]
    done = 0
    start = None
    pending: list[tuple[dict[Any, int], list[Any]]] = []
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            if not batches:
                continue
            if start is None:
                start = time.perf_counter()
                STEADY["cpu_start"] = time.process_time()
            out_a, out_b = TopicOutput(), TopicOutput()
            for part in batches.values():
                for record in part:
                    req = decoder.decode(record.value)
                    key = (req.routing_key or req.request_id).encode()
                    a, b = encoder.encode(req), encoder.encode(req.features)
                    out_a.keys.append(key)
                    out_b.keys.append(key)
                    if wire is None:
                        out_a.values.append(a)
                        out_a.headers.append([])
                        out_b.values.append(b)
                        out_b.headers.append([])
                    else:  # JSON allows trailing blanks
                        out_a.values.append(a.ljust(decision_bytes))
                        out_a.headers.append(
                            [
                                ("request_id", req.request_id.encode()),
                                ("model_version", b"1.4.0"),
                                ("schema_version", b"1.0"),
                            ]
                        )
                        out_b.values.append(b.ljust(comparison_bytes))
                        out_b.headers.append(comparison_headers)
            deliveries = await sender.send(t.decisions, out_a)
            deliveries += await sender.send(t.comparisons, out_b)
            futures = [d.future for d in deliveries]
            pending.append(({tp: p[-1].offset + 1 for tp, p in batches.items()}, futures))
            # Commit in order once acknowledged, keeping a few batches in flight (as the
            # sidecar does).
            while pending and (len(pending) > 4 or all(f.done() for f in pending[0][1])):
                offsets, futs = pending.pop(0)
                await asyncio.gather(*futs)
                await consumer.commit(offsets)
            done += sum(len(p) for p in batches.values())
            note_progress(done, n)
        for offsets, futs in pending:
            await asyncio.gather(*futs)
            await consumer.commit(offsets)
        assert start is not None
        STEADY["cpu_end"] = time.process_time()
        return time.perf_counter() - start
    finally:
        await consumer.stop()
        await producer.stop()


async def run_sidecar(cfg: Any, n: int, tracing: str = "off") -> float:
    from sidecar.kafka import ensure_topics
    from sidecar.runner import Sidecar

    await ensure_topics(cfg.kafka.bootstrap_servers, cfg.all_topics(), TOPIC_PARTITIONS)
    tracer = None
    exporter = None
    if tracing == "memory":
        import msgspec
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from sidecar.tracing import new_tracer

        settings = msgspec.structs.replace(cfg.tracing, enabled=True, exporter="none")
        cfg = msgspec.structs.replace(cfg, tracing=settings)
        tracer = new_tracer(cfg, "bench")
        assert tracer is not None
        exporter = InMemorySpanExporter()
        tracer.provider.add_span_processor(BatchSpanProcessor(exporter))
    sidecar = Sidecar(cfg, tracer=tracer)
    task = asyncio.create_task(sidecar.run())
    elapsed = await time_until_done(sidecar, task, n)
    sidecar.request_stop()
    await task
    sidecar.close_models()
    if exporter is not None:
        spans = exporter.get_finished_spans()
        batches = sum(1 for s in spans if s.name == "sidecar.batch")
        print(f"tracing: {len(spans)} spans, {batches} batch spans", file=sys.stderr)
    return elapsed


async def time_until_done(sidecar: Any, task: asyncio.Task[None], n: int) -> float:
    """Seconds from the sidecar's first processed record until ``n`` are acknowledged."""
    start = None
    while True:
        if start is None and sidecar.processed:
            start = time.perf_counter()
            STEADY["cpu_start"] = time.process_time()
        note_progress(sidecar.processed, n)
        if sidecar.processed >= n and not sidecar.in_flight_records:
            STEADY["cpu_end"] = time.process_time()
            break
        if task.done():
            task.result()
            raise RuntimeError("sidecar stopped early")
        await asyncio.sleep(0.002)
    return time.perf_counter() - (start or 0)


def child(args: argparse.Namespace) -> None:
    from sidecar.runtime import prepare_process

    prepare_process()  # as `sidecar run` does: uvloop, tuned garbage collector
    cfg = config_for(args.bootstrap, args.topic, f"bench-{args.mode}-{uuid.uuid4().hex[:6]}")
    if args.mode == "passthrough":
        job = run_passthrough(cfg, args.requests)
    elif args.mode == "passthrough-c":
        job = run_passthrough(cfg, args.requests, c_edge=True)
    elif args.mode == "wire-equal":
        job = run_passthrough(cfg, args.requests, (args.decision_bytes, args.comparison_bytes))
    else:
        job = run_sidecar(cfg, args.requests, args.tracing)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        elapsed = asyncio.run(job)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    else:
        elapsed = asyncio.run(job)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "mode": args.mode,
                "seconds": elapsed,
                "rate": args.requests / elapsed,
                "peak_rss_mib": peak_rss_mib(),
                "quarters_rss_mib": QUARTERS,
                # CPU time of the whole process (start-up included) per request: less
                # sensitive than wall time to other work on the machine.
                "cpu_us": (usage.ru_utime + usage.ru_stime) / args.requests * 1e6,
                "steady_cpu_us": (STEADY["cpu_end"] - STEADY["cpu_start"]) / args.requests * 1e6,
            }
        )
    )


def sidecar_output_sizes() -> tuple[int, int]:
    """Mean bytes of the sidecar's decision and comparison on this workload (its pipeline on
    generated requests, no Kafka)."""
    from sidecar.kafka.records import Record
    from sidecar.models import load_model
    from sidecar.pipeline import Pipeline
    from sidecar.routing import Mode, RoutingPolicy
    from sidecar.traffic import generated_items

    cfg = config_for("unused:9092", "requests", "sizes")
    pipeline = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    items = generated_items(2000, seed=7, start_id=0)
    records = [Record("t", 0, i, 0, 0, k, v, ()) for i, (k, v) in enumerate(items)]
    policy = RoutingPolicy(rollout=cfg.rollout.name, mode=Mode.CANARY, canary_share_bp=1000)
    result = asyncio.run(pipeline.process(records, policy))  # type: ignore[arg-type]
    pipeline.champion.close()
    if pipeline.candidate is not None:
        pipeline.candidate.close()
    return (
        round(statistics.mean(map(len, result.decisions.values))),
        round(statistics.mean(map(len, result.comparisons.values))),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--mode",
        choices=["passthrough", "sidecar", "wire-equal", "passthrough-c"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--decision-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--comparison-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--wire-equal",
        action="store_true",
        help="also run a passthrough whose outputs are as big as the sidecar's",
    )
    parser.add_argument(
        "--c-edge",
        action="store_true",
        help="also run the passthrough with the sidecar's C record batch reader and builder",
    )
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="cProfile each contender")
    parser.add_argument(
        "--tracing",
        choices=["off", "memory"],
        default="off",
        help="the sidecar with [tracing] on, spans to an in-memory exporter (extra otel)",
    )
    args = parser.parse_args()
    if args.mode:
        child(args)
        return

    from sidecar.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:6]}.requests"
        t0 = time.perf_counter()
        asyncio.run(preload(broker.bootstrap_servers, topic, args.requests))
        print(
            f"preloaded {args.requests} requests in {time.perf_counter() - t0:.1f}s "
            f"({TOPIC_PARTITIONS} partitions, 8 numeric features)"
        )
        results: dict[str, list[dict[str, float]]] = {"passthrough": [], "sidecar": []}
        sizes: list[str] = []
        if args.wire_equal:
            decision_bytes, comparison_bytes = sidecar_output_sizes()
            print(f"sidecar outputs: decision {decision_bytes} B, comparison {comparison_bytes} B")
            sizes = ["--decision-bytes", str(decision_bytes)]
            sizes += ["--comparison-bytes", str(comparison_bytes)]
            results["wire-equal"] = []
        if args.c_edge:
            results["passthrough-c"] = []
        for round_ in range(args.rounds):
            order = ["passthrough", "sidecar"] if round_ % 2 == 0 else ["sidecar", "passthrough"]
            if args.wire_equal:
                order.insert(1, "wire-equal")
            if args.c_edge:
                order.insert(1, "passthrough-c")
            for mode in order:
                cmd = [
                    sys.executable,
                    __file__,
                    "--mode",
                    mode,
                    "--bootstrap",
                    broker.bootstrap_servers,
                    "--topic",
                    topic,
                    "--requests",
                    str(args.requests),
                    "--tracing",
                    args.tracing,
                    *sizes,
                ] + (["--profile"] if args.profile else [])
                out = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    check=False,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"),
                )
                if out.returncode != 0:
                    sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
                if args.profile:
                    print(out.stderr[-6000:])
                for line in out.stderr.splitlines():
                    if line.startswith("tracing:"):
                        print(line)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results[mode].append(result)
                print(
                    f"round {round_ + 1} {mode:13} {result['rate']:>10,.0f} req/s  "
                    f"{result['cpu_us']:5.1f} CPU-us/req ({result['steady_cpu_us']:4.1f} "
                    f"while serving)  peak RSS {result['peak_rss_mib']:.1f} MiB (at 1/4, 1/2, "
                    f"3/4, all: {', '.join(f'{q:.0f}' for q in result['quarters_rss_mib'])})"
                )
        best = {m: max(r["rate"] for r in rs) for m, rs in results.items()}
        median = {m: statistics.median(r["rate"] for r in rs) for m, rs in results.items()}
        print(
            f"\npassthrough (ceiling): best {best['passthrough']:,.0f} req/s, "
            f"median {median['passthrough']:,.0f}"
        )
        print(
            f"sidecar (full path):   best {best['sidecar']:,.0f} req/s, "
            f"median {median['sidecar']:,.0f}"
        )
        print(
            f"ratio sidecar/passthrough: best-vs-best {best['sidecar'] / best['passthrough']:.2f}, "
            f"median-vs-median {median['sidecar'] / median['passthrough']:.2f}"
        )
        cpu = {m: statistics.median(r["cpu_us"] for r in rs) for m, rs in results.items()}
        print(
            f"CPU per request (median): passthrough {cpu['passthrough']:.1f} us, sidecar "
            f"{cpu['sidecar']:.1f} us; ratio {cpu['passthrough'] / cpu['sidecar']:.2f}"
        )
        steady = {m: statistics.median(r["steady_cpu_us"] for r in rs) for m, rs in results.items()}
        print(
            f"CPU per request while serving (median; start-up and shutdown left out): "
            f"passthrough {steady['passthrough']:.1f} us, sidecar {steady['sidecar']:.1f} us; "
            f"ratio {steady['passthrough'] / steady['sidecar']:.2f}"
        )
        if args.wire_equal:
            print(
                f"wire-equal passthrough: median {median['wire-equal']:,.0f} req/s, "
                f"{steady['wire-equal']:.1f} CPU-us/req while serving; sidecar against it: "
                f"req/s {median['sidecar'] / median['wire-equal']:.2f}, "
                f"CPU {steady['wire-equal'] / steady['sidecar']:.2f}"
            )
        if args.c_edge:
            print(
                f"passthrough with the C record batches: median {median['passthrough-c']:,.0f} "
                f"req/s, {steady['passthrough-c']:.1f} CPU-us/req while serving; sidecar against "
                f"it: req/s {median['sidecar'] / median['passthrough-c']:.2f}, "
                f"CPU {steady['passthrough-c'] / steady['sidecar']:.2f}"
            )


if __name__ == "__main__":
    main()
