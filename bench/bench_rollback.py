"""Rollback propagation under load: how fast does a rollback reach every instance?

    python bench/bench_rollback.py [--trials 20] [--rate 5000] [--instances 2]

Starts the embedded broker, then ``--instances`` sidecars (``sidecar run``, one process each,
one consumer group) and a steady producer (``sidecar produce --rate``) as subprocesses. Each
trial, through the same code path as ``sidecar ctl``: canary 50% and wait until every instance
applied it, let the candidate decide for ``--dwell`` seconds, then publish a rollback and
measure

* ctl wait: from just before the rollback is produced until ``ctl`` has seen every live
  instance report it (audit/heartbeat) -- what an operator waits for;
* last candidate decision: the latest ``decided_at`` of a candidate decision made under the
  canary epoch, minus the rollback record's timestamp -- how long the candidate kept deciding
  after the operator pressed the button (negative: it had stopped before the publish landed).

Prints p50/p99/max of both. Secrets are generated per run and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


class _Decided(msgspec.Struct):
    arm: str
    policy_epoch: int
    decided_at: int


def _stats(name: str, values: list[float], unit: str = "ms") -> str:
    a = np.asarray(values, dtype=np.float64)
    return (
        f"{name:44} p50 {np.percentile(a, 50):8.1f} {unit}  p99 {np.percentile(a, 99):8.1f} "
        f"{unit}  max {a.max():8.1f} {unit}  (n={len(a)})"
    )


async def _read_decisions(bootstrap: str, topic: str, idle_s: float = 3.0) -> list[_Decided]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    decoder = msgspec.json.Decoder(_Decided)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[_Decided] = []
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for recs in batch.values():
                out.extend(decoder.decode(r.value) for r in recs)
                last = time.monotonic()
        return out
    finally:
        await consumer.stop()


async def _wait_for_instances(cfg: Any, trust: Any, count: int, timeout_s: float) -> None:
    from sidecar.control.client import load_view

    deadline = time.monotonic() + timeout_s
    live: list[Any] = []
    while time.monotonic() < deadline:
        view = await load_view(cfg, trust)
        live = [
            b
            for b in view.instances
            if b.verified and view.now_ms - b.status.ts_ms <= view.stale_ms
        ]
        if len(live) >= count:
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"only {len(live)} of {count} sidecars reported within {timeout_s:.0f}s")


async def bench(args: argparse.Namespace, bootstrap: str, workdir: Path) -> None:
    from kafka_helpers import create_topics, make_config, write_toml

    from sidecar.control import SigningKey, TrustStore
    from sidecar.control.client import EXIT_OK, build_command, issue
    from sidecar.control.keys import write_key_set
    from sidecar.kafka import ensure_control_topics

    keys = write_key_set(workdir / "keys", "bench")
    trust = TrustStore.from_file(keys.trust_file)
    operator = SigningKey.from_file(keys.operator)
    cfg = make_config(
        bootstrap,
        partitions=6,
        rollout={"mode": "shadow", "canary_share_bp": 0},
        control={
            "trust_file": str(keys.trust_file),
            "signing_key_file": str(keys.sidecar),
            "heartbeat_interval_s": 1.0,
            "allow_create_time": True,
        },
    )
    await ensure_control_topics(cfg)
    await create_topics(cfg)
    toml = write_toml(cfg, workdir / "sidecar.toml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "sidecar.cli"]
    logs = open(workdir / "processes.log", "ab")  # noqa: SIM115 - closed in finally
    sidecars = [
        subprocess.Popen(
            [*cli, "run", "--workers", "1", "--config", str(toml)],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
        for _ in range(args.instances)
    ]
    total = int(args.rate * (args.trials * (args.dwell + 2.0) + 60))
    producer = subprocess.Popen(
        [*cli, "produce", "--config", str(toml), "--count", str(total), "--rate", str(args.rate)],
        env=env,
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    trials: list[tuple[float, int, int]] = []  # (ctl wait s, rollback record ts, rollback epoch)
    try:
        await _wait_for_instances(cfg, trust, args.instances, 60)
        await asyncio.sleep(args.warmup)
        for i in range(args.trials):
            canary = await issue(
                cfg,
                build_command("canary", cfg.rollout.name, share_bp=5000),
                key=operator,
                trust=trust,
                timeout_s=10,
            )
            if canary.code != EXIT_OK:
                raise SystemExit(f"trial {i}: canary failed: {canary.message}")
            await asyncio.sleep(args.dwell)
            rollback = await issue(
                cfg,
                build_command("rollback", cfg.rollout.name, reason=f"bench trial {i}"),
                key=operator,
                trust=trust,
                timeout_s=10,
            )
            if rollback.code != EXIT_OK or rollback.epoch is None:
                raise SystemExit(f"trial {i}: rollback failed: {rollback.message}")
            trials.append((rollback.wait_s, rollback.published_at_ms, rollback.epoch))
            print(
                f"trial {i + 1:3}/{args.trials}: ctl wait {rollback.wait_s * 1000:7.1f} ms "
                f"(epoch {rollback.epoch}, {len(rollback.confirmed)} instances)",
                flush=True,
            )
            await asyncio.sleep(0.3)
    finally:
        producer.send_signal(signal.SIGTERM)
        producer.wait(10)
        await asyncio.sleep(3)  # let the sidecars finish the backlog
        for p in sidecars:
            p.send_signal(signal.SIGTERM)
        for p in sidecars:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()

    decisions = await _read_decisions(bootstrap, cfg.topics.decisions)
    last_candidate: dict[int, int] = {}
    epochs_seen: dict[int, int] = {}
    for d in decisions:
        epochs_seen[d.policy_epoch] = epochs_seen.get(d.policy_epoch, 0) + 1
        if d.arm == "candidate":
            last_candidate[d.policy_epoch] = max(
                last_candidate.get(d.policy_epoch, 0), d.decided_at
            )
    after_ms = []
    for _, published_ms, epoch in trials:
        if epoch - 1 in last_candidate:
            after_ms.append(float(last_candidate[epoch - 1] - published_ms))
    leaked = sorted({epoch for _, _, epoch in trials} & set(last_candidate))
    if leaked:
        raise SystemExit(f"the candidate decided under rollback epochs {leaked}: routing bug")
    print()
    print(
        f"{len(decisions)} decisions, {args.instances} instances, {args.rate:g} req/s offered, "
        f"{len(trials)} trials, dwell {args.dwell:g}s at canary 50%"
    )
    print(_stats("(i) ctl wait until every instance reported", [t[0] * 1000 for t in trials]))
    print(_stats("(ii) last candidate decision after publish", after_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="rollbacks to measure (20)")
    parser.add_argument("--rate", type=float, default=5000.0, help="requests/s offered (5000)")
    parser.add_argument("--instances", type=int, default=2, help="sidecar processes (2)")
    parser.add_argument(
        "--dwell", type=float, default=0.7, help="seconds at canary 50%% before each rollback (0.7)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load first (3)")
    args = parser.parse_args()
    from sidecar.broker import EmbeddedBroker

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        print(f"embedded broker on {broker.bootstrap_servers}; logs in {tmp}", flush=True)
        asyncio.run(bench(args, broker.bootstrap_servers, Path(tmp)))


if __name__ == "__main__":
    main()
