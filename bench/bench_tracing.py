"""What tracing adds to one batch, against what the pipeline spends on it, same run.

    python bench/bench_tracing.py [--batch 2000] [--batches 300] [--traced 0.1]

No broker: a batch of ``--batch`` request records (``--traced`` of them with a W3C
``traceparent``) goes through ``Pipeline.process`` (decode, route, score champion and
candidate, encode: the baseline), and through everything the runner asks of a batch tracer
when ``[tracing]`` is on: ``batch()`` (attributes, links), ``staged``, ``sent`` (with
acknowledged futures), ``finished``, ``committed`` (the spans made and ended, exported by a
``BatchSpanProcessor`` to an in-memory exporter, as OTLP would be, off the event loop).
Prints microseconds per batch of each and their ratio. Needs the ``otel`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


class _TP:
    def __init__(self, partition: int) -> None:
        self.topic = "requests"
        self.partition = partition

    def __hash__(self) -> int:
        return self.partition

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TP) and other.partition == self.partition


class _Delivery:
    def __init__(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = loop.create_future()
        self.indices = range(n)


def records(n: int, traced: float) -> dict[Any, list[Any]]:
    import msgspec
    from records import Rec

    from sidecar.examples import fraud

    docs = fraud.request_dicts(fraud.generate(n, seed=5))
    every = int(1 / traced) if traced > 0 else 0
    out: dict[Any, list[Any]] = {}
    for i, doc in enumerate(docs):
        headers: tuple[tuple[str, bytes], ...] = ()
        if every and i % every == 0:
            headers = (("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01".encode()),)
        part = i % 6
        out.setdefault(_TP(part), []).append(
            Rec(msgspec.json.encode(doc), offset=i, headers=headers, partition=part)
        )
    return out


async def run(args: argparse.Namespace) -> None:
    import msgspec
    from kafka_helpers import make_config
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidecar.models import load_model
    from sidecar.pipeline import Pipeline
    from sidecar.routing import Mode, RoutingPolicy
    from sidecar.tracing import new_tracer

    cfg = make_config("unused:9092", control={"enabled": False})
    settings = msgspec.structs.replace(cfg.tracing, enabled=True, exporter="none")
    cfg = msgspec.structs.replace(cfg, tracing=settings)
    assert cfg.models.candidate is not None
    pipeline = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    tracer = new_tracer(cfg, "bench")
    assert tracer is not None
    exporter = InMemorySpanExporter()
    tracer.provider.add_span_processor(BatchSpanProcessor(exporter))
    policy = RoutingPolicy(rollout="fraud-v2", mode=Mode.CANARY, canary_share_bp=1000)
    batches = records(args.batch, args.traced)
    flat = [r for part in batches.values() for r in part]
    await pipeline.process(flat, policy)  # warm up
    pipe_us: list[float] = []
    trace_us: list[float] = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        staged = await pipeline.start(flat, policy)
        late = await staged.finish()
        pipe_us.append((time.perf_counter() - t0) * 1e6)
        deliveries = [_Delivery(len(flat) // 4) for _ in range(4)]
        t0 = time.perf_counter()
        trace = tracer.batch(batches, flat, policy, False)
        assert trace is not None
        trace.staged(staged)
        trace.sent(deliveries[:2])  # type: ignore[arg-type]
        trace.finished(late)
        trace.sent(deliveries[2:])  # type: ignore[arg-type]
        spent = time.perf_counter() - t0
        for d in deliveries:
            d.future.set_result(None)
        await asyncio.sleep(0)  # the acknowledgement callbacks run
        t0 = time.perf_counter()
        trace.committed()
        trace_us.append((spent + time.perf_counter() - t0) * 1e6)
    tracer.flush()
    pipe = statistics.median(pipe_us)
    spans = statistics.median(trace_us)
    made = exporter.get_finished_spans()
    print(
        f"{args.batches} batches of {args.batch} records ({args.traced:.0%} traced), "
        f"{len(made)} spans exported"
    )
    print(f"pipeline (both stages): median {pipe:,.0f} us per batch")
    print(f"tracing (all steps):    median {spans:,.1f} us per batch")
    print(f"ratio tracing/pipeline: {spans / pipe:.4f} ({spans / args.batch:.3f} us per record)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--traced", type=float, default=0.1, help="share of traced requests")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
