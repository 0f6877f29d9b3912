"""Throughput of the sidecar with one output version and with two, side by side in one run.

    python bench/bench_versions.py [--requests 200000] [--rounds 2] [--callable]

Starts the embedded broker, preloads N requests once, then runs the real ``Sidecar`` in its
own process per contender, each on its own consumer group and output topics:

* one: the decisions topic only (no ``outputs`` section: the path without versions);
* two: the current version plus ``v1`` through the declarative adapter of
  ``sidecar.examples.outputs.V1`` (map, rename, drop, defaults) on its own topic, every
  batch committed only after both versions' records are acknowledged;
* callable (``--callable``): the current version plus a version through a Python callable
  (``sidecar.examples.outputs:legacy``), the general path.

Rounds alternate the order to spread the machine's noise. Prints requests/s, the ratios to
``one`` and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from baseline import peak_rss_mib
from bench_throughput import TOPIC_PARTITIONS, preload, run_sidecar


def config_for(bootstrap: str, requests_topic: str, group: str, mode: str) -> Any:
    from kafka_helpers import make_config

    from sidecar.examples.outputs import V1

    run = uuid.uuid4().hex[:6]
    outputs: dict[str, Any] = {}
    if mode == "two":
        outputs = {
            "api_version": "v2",
            "versions": [{"version": "v1", "topic": f"b-{run}.v1", **copy.deepcopy(V1)}],
            "readers_interval_s": 0,
        }
    elif mode == "callable":
        outputs = {
            "api_version": "v2",
            "versions": [
                {
                    "version": "v0",
                    "topic": f"b-{run}.v0",
                    "adapter": "sidecar.examples.outputs:legacy",
                    "struct": "sidecar.examples.outputs:LegacyDecision",
                }
            ],
            "readers_interval_s": 0,
        }
    return make_config(
        bootstrap,
        partitions=TOPIC_PARTITIONS,
        kafka={"group_id": group},
        topics={"requests": requests_topic},
        rollout={"mode": "canary", "canary_share_bp": 1000},
        control={"enabled": False},
        **({"outputs": outputs} if outputs else {}),
    )


def child(args: argparse.Namespace) -> None:
    from sidecar.runtime import prepare_process

    prepare_process()
    cfg = config_for(
        args.bootstrap, args.topic, f"bench-{args.mode}-{uuid.uuid4().hex[:6]}", args.mode
    )
    elapsed = asyncio.run(run_sidecar(cfg, args.requests))
    rss_mib = peak_rss_mib()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "seconds": elapsed,
                "rate": args.requests / elapsed,
                "peak_rss_mib": rss_mib,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--callable", action="store_true", help="also a callable adapter")
    parser.add_argument("--mode", choices=["one", "two", "callable"], help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return

    from sidecar.broker import EmbeddedBroker

    modes = ["one", "two"] + (["callable"] if args.callable else [])
    with EmbeddedBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:6]}.requests"
        t0 = time.perf_counter()
        asyncio.run(preload(broker.bootstrap_servers, topic, args.requests))
        print(f"preloaded {args.requests} requests in {time.perf_counter() - t0:.1f}s")
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else list(reversed(modes))
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
                ]
                out = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    check=False,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"),
                )
                if out.returncode != 0:
                    sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results[mode].append(result)
                print(
                    f"round {round_ + 1} {mode:9} {result['rate']:>10,.0f} req/s  "
                    f"peak RSS {result['peak_rss_mib']:.1f} MiB"
                )
        best = {m: max(r["rate"] for r in rs) for m, rs in results.items()}
        median = {m: statistics.median(r["rate"] for r in rs) for m, rs in results.items()}
        print()
        for m in modes:
            print(
                f"{m:9} best {best[m]:>9,.0f} req/s, median {median[m]:>9,.0f}  "
                f"ratio to one: best {best[m] / best['one']:.2f}, "
                f"median {median[m] / median['one']:.2f}"
            )


if __name__ == "__main__":
    main()
