"""Throughput of each model loader on the standard workload, against the in-process one.

    python bench/bench_loaders.py [--requests 100000] [--loaders python,process,onnx,http]

The standard workload of ``bench_throughput.py`` (N preloaded requests, 8 numeric features,
canary 10%, the full sidecar path) with the champion served by each loader in turn, each run
in its own process on its own consumer group: ``python`` (in-process threads, the baseline),
``process`` (the same factory in worker processes through shared memory), ``onnx`` (a logistic
regression exported to ONNX, onnxruntime) and ``http`` (scikit-learn on MLServer, from the
cached test venv; skipped when it is not built: run ``pytest tests/models/test_http_loader.py``
once). Prints requests/s and the overhead per record against ``python``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "models"))
sys.path.insert(0, str(ROOT / "bench"))


def champion_for(loader: str, assets: dict[str, str]) -> dict[str, Any]:
    if loader == "python":
        return {}
    if loader == "process":
        return {"loader": "process", "concurrency": 1}
    if loader == "onnx":
        return {"loader": "onnx", "target": assets["onnx"]}
    return {
        "loader": "http",
        "url": assets["http"],
        "target": "fraud-sklearn",
        "options": {"output": "predict_proba"},
        "concurrency": 2,
        "timeout_ms": 2000,
    }


async def run_one(bootstrap: str, topic: str, n: int, champion: dict[str, Any]) -> float:
    from bench_throughput import TOPIC_PARTITIONS, time_until_done
    from kafka_helpers import make_config

    from sidecar.kafka import ensure_topics
    from sidecar.runner import Sidecar

    cfg = make_config(
        bootstrap,
        partitions=TOPIC_PARTITIONS,
        kafka={"group_id": f"bench-loaders-{uuid.uuid4().hex[:6]}"},
        topics={"requests": topic},
        rollout={"mode": "canary", "canary_share_bp": 1000},
        control={"enabled": False},
        models={"champion": champion},
    )
    await ensure_topics(cfg.kafka.bootstrap_servers, cfg.all_topics(), TOPIC_PARTITIONS)
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    elapsed = await time_until_done(sidecar, task, n)
    errors = sidecar.metrics.registry.get_sample_value(
        "sidecar_model_errors_total",
        {"arm": "champion", "model": "fraud-lr", "version": "1.4.0", "kind": "timeout"},
    )
    sidecar.request_stop()
    await task
    sidecar.close_models()
    if errors:
        print(f"warning: {errors:.0f} champion records timed out", file=sys.stderr)
    return elapsed


def export_onnx(path: Path) -> None:
    """The champion's six features, a plain logistic regression exported to ONNX."""
    import numpy as np
    from test_onnx_loader import export, fit

    coef, intercept, _, _ = fit()
    export(path, np.asarray(coef[:6]), intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--loaders", default="python,process,onnx,http")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        from sidecar.runtime import prepare_process

        prepare_process()  # as `sidecar run` does
        elapsed = asyncio.run(
            run_one(spec["bootstrap"], spec["topic"], args.requests, spec["champion"])
        )
        print(json.dumps({"seconds": elapsed}))
        return

    from bench_throughput import preload

    from sidecar.broker import EmbeddedBroker

    loaders = args.loaders.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-loaders-"))
    assets: dict[str, str] = {}
    server = None
    if "onnx" in loaders:
        try:
            export_onnx(tmp / "champion.onnx")
            assets["onnx"] = str(tmp / "champion.onnx")
        except ImportError:
            print("onnx: skipped (pip install -e '.[onnx]')")
            loaders.remove("onnx")
    if "http" in loaders:
        from mlserver_support import MLServer, train_model, venv_dir

        bin_dir = venv_dir() / "bin"
        if not (venv_dir() / "installed.json").exists():
            print("http: skipped (MLServer test venv not built)")
            loaders.remove("http")
        else:
            train_model(bin_dir, tmp / "model")
            server = MLServer(bin_dir, tmp / "model", tmp / "mlserver.log")
            server.start()
            assets["http"] = server.url
    try:
        with EmbeddedBroker() as broker:
            topic = f"bench-loaders-{uuid.uuid4().hex[:6]}"
            asyncio.run(preload(broker.bootstrap_servers, topic, args.requests))
            rates: dict[str, float] = {}
            for loader in loaders:
                spec = {
                    "bootstrap": broker.bootstrap_servers,
                    "topic": topic,
                    "champion": champion_for(loader, assets),
                }
                child = ["--requests", str(args.requests), "--child", json.dumps(spec)]
                out = subprocess.run(
                    [sys.executable, __file__, *child],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
                rates[loader] = args.requests / seconds
    finally:
        if server is not None:
            server.stop()
    base = rates.get("python")
    print(f"{args.requests} requests, champion served by each loader (candidate: python)")
    print(f"{'loader':8} {'requests/s':>11} {'vs python':>10} {'overhead/record':>16}")
    for loader, rate in rates.items():
        ratio = f"{rate / base:.2f}x" if base else "-"
        overhead = f"{(1 / rate - 1 / base) * 1e6:+.1f} us" if base else "-"
        print(f"{loader:8} {rate:11,.0f} {ratio:>10} {overhead:>16}")


if __name__ == "__main__":
    main()
