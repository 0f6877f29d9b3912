"""Ranking throughput against the binary path, same run, and where a ranking's time goes.

    python bench/bench_ranking.py [--requests 60000] [--rounds 2] [--baseline main]

Starts the embedded broker and preloads two request topics once: binary fraud requests (8
numeric features) and recommendation requests (a user, a segment and 100 candidate item ids;
both models re-rank them to the top k = 10). Then, each in its own process and consumer group,
rounds alternating the order:

* ``binary``: the real ``Sidecar`` of this checkout on the fraud requests (the two example
  logistic regressions, canary 10%);
* ``binary@BASE``: the same, with the ``sidecar`` package of git ref ``--baseline`` (default
  ``main``; ``--baseline ''`` skips it): does this checkout slow the binary path down?
* ``ranking``: the real ``Sidecar`` on the recommendation requests (segment popularity vs
  matrix factorisation, canary 10%).

Then, without Kafka (far less noise than the broker rounds on a shared machine): the binary
``Pipeline.process`` per record of this checkout against ``--baseline`` (each in its own
process, alternating), the per-record cost of both kinds on batches of 2,000, the ranking path
split into stages (decode, interning the candidates, each model, the top k, the JSON fields),
and a cProfile of the ranking pipeline's top functions (model calls run in threads: they show
as the event loop's ``poll``; the stages above time them alone).

Peak RSS is not reported: a child's ``ru_maxrss`` starts from the parent's at fork.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from baseline import baseline_tree, last_line_of  # noqa: E402

TOPIC_PARTITIONS = 6
RECOMMENDER = {
    "output_kind": "ranking",
    "k": 10,
    "items_from": "request",
    "features": [{"name": "user"}, {"name": "segment"}],
}


def config_for(bootstrap: str, topic: str, group: str, kind: str) -> Any:
    from kafka_helpers import make_config

    models: dict[str, Any] = {}
    if kind == "ranking":
        models = {
            "champion": {
                "name": "recs",
                "version": "1.0.0",
                "target": "sidecar.examples.recommend:popularity",
                **RECOMMENDER,
            },
            "candidate": {
                "name": "recs",
                "version": "2.1.0",
                "target": "sidecar.examples.recommend:matrix_factorisation",
                **RECOMMENDER,
            },
        }
    return make_config(
        bootstrap,
        partitions=TOPIC_PARTITIONS,
        kafka={"group_id": group},
        topics={"requests": topic},
        rollout={"mode": "canary", "canary_share_bp": 1000},
        control={"enabled": False},
        **({"models": models} if models else {}),
    )


def ranking_items(n: int, seed: int, start_id: int) -> list[tuple[bytes, bytes]]:
    import msgspec

    from sidecar.examples import recommend

    docs = recommend.request_dicts(recommend.generate(n, seed=seed), start_id=start_id)
    return [(d["routing_key"].encode(), msgspec.json.encode(d)) for d in docs]


async def preload(bootstrap: str, topic: str, n: int, kind: str) -> None:
    from aiokafka import AIOKafkaProducer

    from sidecar.kafka import ensure_topics
    from sidecar.traffic import generated_items, produce_values

    await ensure_topics(bootstrap, [topic], partitions=TOPIC_PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        max_batch_size=1 << 20,
        linger_ms=5,
        max_request_size=1 << 22,
    )
    await producer.start()
    try:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            if kind == "ranking":
                items = ranking_items(m, seed=start, start_id=start)
            else:
                items = generated_items(m, seed=start, start_id=start)
            await produce_values(producer, topic, items, partitions=TOPIC_PARTITIONS)
    finally:
        await producer.stop()


async def run_sidecar(cfg: Any, n: int) -> float:
    from sidecar.kafka import ensure_topics
    from sidecar.runner import Sidecar

    await ensure_topics(cfg.kafka.bootstrap_servers, cfg.all_topics(), TOPIC_PARTITIONS)
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    start = None
    while True:
        if start is None and sidecar.processed:
            start = time.perf_counter()
        if sidecar.processed >= n and not sidecar.in_flight_records:
            break
        if task.done():
            task.result()
            raise RuntimeError("sidecar stopped early")
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - (start or 0)
    sidecar.request_stop()
    await task
    sidecar.close_models()
    return elapsed


def child(args: argparse.Namespace) -> None:
    import sidecar
    from sidecar.runtime import prepare_process

    prepare_process()
    kind = "ranking" if args.mode == "ranking" else "binary"
    cfg = config_for(args.bootstrap, args.topic, f"bench-{kind}-{uuid.uuid4().hex[:6]}", kind)
    elapsed = asyncio.run(run_sidecar(cfg, args.requests))
    print(
        json.dumps(
            {
                "mode": args.mode,
                "package": str(Path(sidecar.__file__).parent),
                "rate": args.requests / elapsed,
            }
        )
    )


# --------------------------------------------------------------------------- no Kafka


def pipeline_costs(batch: int, repeats: int) -> None:
    """Per-record cost of ``Pipeline.process`` by kind, its stages, and a profile."""
    import cProfile
    import pstats

    import msgspec
    import numpy as np
    from records import Rec

    from sidecar.examples import fraud, recommend
    from sidecar.models import load_model
    from sidecar.output_kinds import shape_output
    from sidecar.pipeline import Pipeline
    from sidecar.routing import Mode, RoutingPolicy

    policy = RoutingPolicy(rollout="bench", mode=Mode.CANARY, canary_share_bp=1000, epoch=1)
    enc = msgspec.json.Encoder()
    binary_recs = [Rec(enc.encode(r)) for r in fraud.request_dicts(fraud.generate(batch, seed=3))]
    ranking_recs = [Rec(v) for _, v in ranking_items(batch, seed=3, start_id=0)]
    pipes: dict[str, Any] = {}
    for kind in ("binary", "ranking"):
        cfg = config_for("unused:9092", "t", "g", kind)
        pipes[kind] = Pipeline(
            cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate)
        )

    async def per_record(p: Any, recs: list[Any]) -> float:
        await p.process(recs, policy)  # warm up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            await p.process(recs, policy)
            best = min(best, time.perf_counter() - t0)
        return best / len(recs) * 1e6

    cost = {
        "binary": asyncio.run(per_record(pipes["binary"], binary_recs)),
        "ranking": asyncio.run(per_record(pipes["ranking"], ranking_recs)),
    }
    print(f"\nPipeline.process, batches of {batch:,}, best of {repeats} (no Kafka):")
    for kind, us in cost.items():
        print(f"  {kind:8} {us:6.1f} us/record  ({1e6 / us:,.0f} records/s on one core)")
    print(f"  ranking / binary: {cost['ranking'] / cost['binary']:.1f}x")

    # Stages of the ranking path, timed alone on the same batch.
    p = pipes["ranking"]
    champ, cand = recommend.popularity(), recommend.matrix_factorisation()

    def best_of(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) / batch * 1e6

    decoded = p.decoder.decode(ranking_recs)
    x = decoded.matrix
    items = decoded.items
    assert items is not None

    def fresh_items() -> Any:
        return type(items)(items.ids, items.counts)

    champ_scores = champ.predict(x, items)
    cand_scores = cand.predict(x, items)
    shaped = shape_output("ranking", cand_scores, batch, k=10, items=items)
    assert shaped.output is not None
    stages = {
        "decode (JSON with 100 candidates, the candidates matrix)": best_of(
            lambda: p.decoder.decode(ranking_recs)
        ),
        "intern the candidates once per batch (ids -> codes)": best_of(
            lambda: fresh_items().codes()
        ),
        "champion: segment popularity, gather (100 scores/request)": best_of(
            lambda: champ.predict(x, items)
        ),
        "candidate: matrix factorisation, gather + dot (100 scores/request)": best_of(
            lambda: cand.predict(x, items)
        ),
        "top 10 of 100 per arm (argpartition + stable sort), x2": 2
        * best_of(lambda: shape_output("ranking", champ_scores, batch, k=10, items=items)),
        "ranking JSON fields per record (items, scores), x2": 2
        * best_of(lambda: shaped.output.fragments(shaped.valid)),  # type: ignore[union-attr]
    }
    print(
        f"\nranking stages alone, us/record (sum {sum(stages.values()):.1f}; the rest of "
        f"{cost['ranking']:.1f} is routing, templates, decisions and comparisons):"
    )
    for name, us in stages.items():
        print(f"  {us:6.2f}  {name}")

    profiler = cProfile.Profile()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(p.process(ranking_recs, policy))
    profiler.enable()
    for _ in range(repeats):
        loop.run_until_complete(p.process(ranking_recs, policy))
    profiler.disable()
    loop.close()
    print(f"\ncProfile of the ranking Pipeline.process ({repeats} batches), top by own time:")
    stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime")
    stats.print_stats(14)
    del np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="main", help="git ref of the binary baseline")
    parser.add_argument("--batch", type=int, default=2_000, help="pipeline batch (no Kafka)")
    parser.add_argument("--skip-kafka", action="store_true", help="only the pipeline costs")
    parser.add_argument(
        "--modes", default="binary,ranking,baseline", help="broker contenders (comma-separated)"
    )
    parser.add_argument("--pipeline-rounds", type=int, default=6)
    parser.add_argument("--binary-pipeline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    if args.binary_pipeline:
        print(json.dumps({"us": binary_pipeline_cost(args.batch, repeats=7)}))
        return
    if not args.skip_kafka:
        kafka_rounds(args)
    if args.baseline:
        binary_against_baseline(args)
    pipeline_costs(args.batch, repeats=5)


def binary_pipeline_cost(batch: int, repeats: int) -> float:
    """Best per-record microseconds of the binary ``Pipeline.process`` (the fraud pair)."""
    import msgspec
    from records import Rec

    from sidecar.examples import fraud
    from sidecar.models import load_model
    from sidecar.pipeline import Pipeline
    from sidecar.routing import Mode, RoutingPolicy

    policy = RoutingPolicy(rollout="bench", mode=Mode.CANARY, canary_share_bp=1000, epoch=1)
    enc = msgspec.json.Encoder()
    recs = [Rec(enc.encode(r)) for r in fraud.request_dicts(fraud.generate(batch, seed=3))]
    cfg = config_for("unused:9092", "t", "g", "binary")
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))

    async def run() -> float:
        await p.process(recs, policy)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            await p.process(recs, policy)
            best = min(best, time.perf_counter() - t0)
        return best / batch * 1e6

    return asyncio.run(run())


def binary_against_baseline(args: argparse.Namespace) -> None:
    """The binary pipeline of this checkout and of ``--baseline``, alternating processes."""
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_tree(args.baseline, Path(tmp))
        if base is None:
            return
        costs: dict[str, list[float]] = {"this checkout": [], args.baseline: []}
        for round_ in range(args.pipeline_rounds):
            order = list(costs) if round_ % 2 == 0 else list(costs)[::-1]
            for who in order:
                cmd = [sys.executable, __file__, "--binary-pipeline", "--batch", str(args.batch)]
                tree = base if who == args.baseline else None
                line = last_line_of(cmd, tree, f"binary pipeline, {who}")
                costs[who].append(json.loads(line)["us"])
        median = {who: statistics.median(v) for who, v in costs.items()}
        print(
            f"\nbinary Pipeline.process, batches of {args.batch:,} ({args.pipeline_rounds} "
            "processes each, best of 7 batches per process; median over processes):"
        )
        for who, v in costs.items():
            print(
                f"  {who:14} {median[who]:5.2f} us/record  (all: "
                + ", ".join(f"{x:.2f}" for x in v)
                + ")"
            )
        ratio = median["this checkout"] / median[args.baseline]
        print(f"  this checkout / {args.baseline}: {ratio:.3f}")


def kafka_rounds(args: argparse.Namespace) -> None:
    from sidecar.broker import EmbeddedBroker

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        base = baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
        topics = {kind: f"bench-{uuid.uuid4().hex[:6]}.{kind}" for kind in ("binary", "ranking")}
        for kind, topic in topics.items():
            t0 = time.perf_counter()
            asyncio.run(preload(broker.bootstrap_servers, topic, args.requests, kind))
            print(f"preloaded {args.requests:,} {kind} requests in {time.perf_counter() - t0:.1f}s")
        modes = [m for m in ("binary", "ranking") if m in args.modes.split(",")]
        if base is not None and "baseline" in args.modes.split(","):
            modes.append(f"binary@{args.baseline}")
        results: dict[str, list[float]] = {m: [] for m in modes}
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else modes[::-1]
            for mode in order:
                kind = "ranking" if mode == "ranking" else "binary"
                cmd = [
                    sys.executable,
                    __file__,
                    "--mode",
                    mode,
                    "--bootstrap",
                    broker.bootstrap_servers,
                    "--topic",
                    topics[kind],
                    "--requests",
                    str(args.requests),
                ]
                tree = base if mode.startswith("binary@") else None
                result = json.loads(last_line_of(cmd, tree, mode))
                results[mode].append(result["rate"])
                print(
                    f"round {round_ + 1} {mode:14} {result['rate']:>9,.0f} req/s  "
                    f"({result['package']})"
                )
        median = {m: statistics.median(r) for m, r in results.items()}
        print("\nmedian req/s: " + ", ".join(f"{m} {v:,.0f}" for m, v in median.items()))
        if "ranking" in median and "binary" in median:
            print(f"ranking / binary: {median['ranking'] / median['binary']:.2f}")
        ref = f"binary@{args.baseline}"
        if ref in median and "binary" in median:
            print(f"binary (this checkout) / {ref}: {median['binary'] / median[ref]:.2f}")


if __name__ == "__main__":
    main()
