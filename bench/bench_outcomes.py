"""The outcomes stage (``sidecar outcomes``) on the embedded broker: its throughput against the
sidecar's output rate in the same run, its memory with 10x more pending requests, and its
recovery after a SIGKILL with a day's worth of pending state.

    python bench/bench_outcomes.py throughput [--count 300000] [--repeat 3]
    python bench/bench_outcomes.py memory [--pending 200000]      # and 10x that
    python bench/bench_outcomes.py recovery [--hours 24] [--rate 1000]

throughput: preloads N comparisons shaped like the sidecar's (one rollout, keyed by rollout: one
partition; event time at the sidecar's rate) and outcomes for the frauds among them (2%, the
demo's fraud rate; ``--label-share`` for more), keyed by request id as a producer would, then
runs ``OutcomesService`` end to end (router, changelog, RocksDB, reports, verdicts) until every
comparison is applied; and ``bench_throughput.py``'s sidecar on ``--sidecar-requests`` in the
same run, for a same-run ratio.

memory: a fresh stage (own process) on N, then 10 N comparisons that all stay pending (a
one-day label window, no outcomes); prints each run's peak RSS and store size.

join: the binary path of the join alone, without Kafka (``ChunkBuilder.build`` of polls of
~10,000 records, comparisons with their outcomes (``--label-share`` of them), then
``JoinTask.apply`` of the chunks on a fresh store), per comparison, for this checkout and
the ``sidecar`` package of git ref ``--baseline`` (default ``main``) in alternating processes
of the same run:

    python bench/bench_outcomes.py join [--count 200000] [--rounds 6] [--baseline main]
                                        [--label-share 0.02]

recovery: builds a task's store holding ``--hours`` of pending requests at ``--rate`` per second
(the demo's 1000/s; 24 h = 86.4 M requests), with its changelog on the broker, through the
join's own code (``JoinTask.apply`` of the same chunks the live path writes); then runs
``sidecar outcomes run`` on it under live traffic, SIGKILLs it and restarts it: (a) with its
store (replays the changelog's tail), (b) without it (replays the whole changelog). It prints
the time from start to the first new record applied, and the replay rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import baseline_tree, last_line_of, peak_rss_mib
from bench_aggregate import ROLLOUT, make_values
from bench_aggregate import preload as preload_comparisons
from bench_throughput import preload as preload_requests

from sidecar.broker import EmbeddedBroker
from sidecar.config import SidecarConfig, config_from_dict
from sidecar.hashing import kafka_partition
from sidecar.kafka import ensure_topics, new_producer
from sidecar.outcomes.chunks import (
    EMPTY_OUTCOMES,
    InputChunk,
    PairSpec,
    comparison_columns,
    encode,
)
from sidecar.outcomes.contract import Outcome
from sidecar.outcomes.join import JoinTask, Windows
from sidecar.outcomes.service import OutcomesService
from sidecar.outcomes.store import Store
from sidecar.runtime import limit_malloc_arenas, prepare_process
from sidecar.traffic import produce_values

PARTITIONS = 6


def config(bootstrap: str, run: str, state_dir: Path, **outcomes: Any) -> SidecarConfig:
    settings: dict[str, Any] = {
        "topic": f"{run}.outcomes",
        "quality_topic": f"{run}.quality",
        "verdicts_topic": f"{run}.verdicts",
        "group_id": f"{run}-outcomes",
        "state_dir": str(state_dir),
        "report_window_ms": 60_000,
        "comparison_lateness_ms": 5_000,
        "outcome_grace_ms": 5_000,
        "metrics_port": 0,
        "rules": [],
        # Nothing to sign: no guard rules, and verdicts stay on the verdicts topic.
        "control_verdicts": False,
        "quality": {"label_window_ms": 30_000, "missing": "negative"},
    }
    settings.update(outcomes)
    return config_from_dict(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "topics": {
                "comparisons": f"{run}.comparisons",
                "control": f"{run}.control",
                "dead_letter": f"{run}.dlq",
                "partitions": PARTITIONS,
            },
            "rollout": {"name": ROLLOUT},
            "models": {
                "champion": {"name": "m", "version": "1.0.0", "target": "x:y", "features": []}
            },
            "outcomes": settings,
        }
    )


def outcome_values(n: int, start_ms: int, rate: float, share: float, seed: int = 1) -> list[bytes]:
    """Outcomes for ``share`` of the requests ``req-i`` (as ``make_values`` numbers them),
    a few seconds after each."""
    rng = np.random.default_rng(seed)
    picked = np.flatnonzero(rng.random(n) < share)
    enc = msgspec.json.Encoder()
    return [
        enc.encode(
            Outcome(
                request_id=f"req-{i}",
                label=bool(rng.random() < 0.9),
                ts=int(start_ms + i * 1000.0 / rate) + int(rng.integers(500, 5000)),
                source="bench",
            )
        )
        for i in picked.tolist()
    ]


async def produce_keyed(bootstrap: str, topic: str, values: list[bytes], key_field: str) -> None:
    producer = new_producer_plain(bootstrap)
    await producer.start()
    try:
        for i in range(0, len(values), 50_000):
            part = values[i : i + 50_000]
            keys = [msgspec.json.decode(v)[key_field].encode() for v in part]
            await produce_values(producer, topic, list(zip(keys, part, strict=True)))
    finally:
        await producer.stop()


def new_producer_plain(bootstrap: str) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20
    )


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process (every thread), or of process ``pid``."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sidecar_run(bootstrap: str, topic: str, n: int) -> tuple[float, float]:
    """The sidecar's throughput and CPU-us per request (``bench_throughput.py``'s contender,
    own process; its CPU includes its start-up)."""
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
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return float(got["rate"]), float(got["cpu_us"])


def _helpers_cpu_s() -> float:
    """CPU seconds of this process's Python children (the stage's decode helper)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    if "python" in Path(f"/proc/{child}/cmdline").read_bytes().decode():
                        total += _cpu_s(int(child))
    return total


async def run_stage(
    cfg: SidecarConfig, comparisons: int, broker_pid: int | None = None
) -> tuple[float, OutcomesService]:
    """Seconds from the first applied input to ``comparisons`` applied. Sets
    ``service.cpu_s``: CPU seconds of this process and of the broker over that time (from
    the first poll after the first input, 5 ms at most later)."""
    service = OutcomesService(cfg)
    task = asyncio.create_task(service.run())
    cpu0: tuple[float, float, float] | None = None
    try:
        while service.applied.comparisons < comparisons:
            await asyncio.sleep(0.005)
            if cpu0 is None and service.first_input_at is not None:
                cpu0 = (_cpu_s(), _cpu_s(broker_pid) if broker_pid else 0.0, _helpers_cpu_s())
            if task.done():
                task.result()
        end = time.monotonic()
        if cpu0 is not None:
            service.cpu_s = (  # type: ignore[attr-defined]
                _cpu_s() - cpu0[0],
                (_cpu_s(broker_pid) - cpu0[1]) if broker_pid else 0.0,
                _helpers_cpu_s() - cpu0[2],
            )
        memory: dict[str, float] = {}
        for rt in service.tasks.values():
            if rt.join is not None:
                for name, value in rt.join.store.memory().items():
                    # the block cache is one for every store of the process: not a sum
                    total = max if name == "block cache" else (lambda a, b: a + b)
                    memory[name] = total(memory.get(name, 0.0), value)
        service.store_memory = memory  # type: ignore[attr-defined]
    finally:
        service.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
    assert service.first_input_at is not None
    return end - service.first_input_at, service


# --------------------------------------------------------------------------- throughput


async def throughput(args: argparse.Namespace) -> None:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bs = broker.bootstrap_servers
        run = f"bench-{uuid.uuid4().hex[:6]}"
        cfg = config(bs, run, Path(tmp) / "x")
        await ensure_topics(bs, [cfg.topics.comparisons, cfg.outcomes.topic], PARTITIONS)
        start_ms = time.time_ns() // 1_000_000 - int(args.count / args.event_rate * 1000) - 60_000
        t0 = time.perf_counter()
        values = make_values(args.count, start_ms=start_ms, rate=args.event_rate)
        await preload_comparisons(bs, cfg.topics.comparisons, values)
        outs = outcome_values(args.count, start_ms, args.event_rate, args.label_share)
        await produce_keyed(bs, cfg.outcomes.topic, outs, "request_id")
        print(
            f"preloaded {args.count:,} comparisons and {len(outs):,} outcomes in "
            f"{time.perf_counter() - t0:.0f}s; event time {args.count / args.event_rate:.1f}s at "
            f"{args.event_rate:,.0f}/s, {args.label_share:.0%} labelled"
        )
        del values, outs
        requests_topic = f"{run}.requests"
        if args.sidecar_requests:
            await preload_requests(bs, requests_topic, args.sidecar_requests)
        modes = [int(m) for m in args.decode_processes.split(",")]
        rates: dict[int, list[float]] = {m: [] for m in modes}
        ratios: dict[int, list[float]] = {m: [] for m in modes}
        side_rates: list[float] = []
        pid = broker.process.pid if broker.process else None
        for i in range(1, args.repeat + 1):
            # Alternate the order of the modes round by round (the machine is shared).
            for m in modes if i % 2 else modes[::-1]:
                cfg_i = config(bs, run, Path(tmp) / f"state-{i}-{m}", decode_processes=m)
                cfg_i = msgspec.structs.replace(
                    cfg_i,
                    outcomes=msgspec.structs.replace(cfg_i.outcomes, group_id=f"{run}-o{i}-{m}"),
                )
                secs, service = await run_stage(cfg_i, args.count, pid)
                rate = args.count / secs
                rates[m].append(rate)
                cpu = getattr(service, "cpu_s", (float("nan"),) * 3)
                print(
                    f"run {i}: outcomes stage (decode_processes={m}) {rate:,.0f} comparisons/s "
                    f"({sum(service.applied.joined.values()):,} joined); CPU per comparison: "
                    f"stage {cpu[0] / args.count * 1e6:.1f} us + helper "
                    f"{cpu[2] / args.count * 1e6:.1f} us, broker "
                    f"{cpu[1] / args.count * 1e6:.1f} us",
                    flush=True,
                )
                shutil.rmtree(Path(tmp) / f"state-{i}-{m}", ignore_errors=True)
            if args.sidecar_requests:
                side, side_cpu = sidecar_run(bs, requests_topic, args.sidecar_requests)
                side_rates.append(side)
                for m in modes:
                    ratios[m].append(rates[m][-1] / side)
                each = [f"{rates[m][-1] / side:.2f}x (decode_processes={m})" for m in modes]
                print(
                    f"run {i}: sidecar {side:,.0f} req/s ({side_cpu:.1f} CPU-us a request); "
                    "stage/sidecar " + ", ".join(each),
                    flush=True,
                )
        print()
        for m in modes:
            line = (
                f"decode_processes={m}: median outcomes stage {statistics.median(rates[m]):,.0f} "
                "comparisons/s"
            )
            if ratios[m]:
                line += (
                    "; stage/sidecar per run "
                    + ", ".join(f"{r:.2f}x" for r in ratios[m])
                    + f" (median {statistics.median(ratios[m]):.2f}x, min {min(ratios[m]):.2f}x)"
                )
            print(line)
        if side_rates:
            print(f"median sidecar {statistics.median(side_rates):,.0f} req/s")


# --------------------------------------------------------------------------- memory


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 20)


async def memory_worker(args: argparse.Namespace) -> None:
    """(Own process.) Apply ``--pending`` comparisons that all stay pending; print JSON."""
    state = Path(args.state)
    cfg = config(
        args.bootstrap,
        args.run,
        state,
        quality={"label_window_ms": 86_400_000},
        report_window_ms=3_600_000,
        cache_mb=args.cache_mb,
    )
    secs, service = await run_stage(cfg, args.pending)
    rocks = service.store_memory  # type: ignore[attr-defined]
    print(
        json.dumps(
            {
                "pending": args.pending,
                "seconds": secs,
                "peak_rss_mib": peak_rss_mib(),
                "store_mib": _dir_mib(state),
                "stored": service.applied.comparisons,
                "rocksdb_mib": rocks,
            }
        )
    )


async def memory(args: argparse.Namespace) -> None:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bs = broker.bootstrap_servers
        results = []
        for n in (args.pending, 10 * args.pending):
            run = f"bench-{uuid.uuid4().hex[:6]}"
            cfg = config(bs, run, Path(tmp))
            await ensure_topics(bs, [cfg.topics.comparisons, cfg.outcomes.topic], PARTITIONS)
            start_ms = time.time_ns() // 1_000_000 - int(n / args.event_rate * 1000) - 10_000
            for i in range(0, n, 500_000):
                part = make_values(min(500_000, n - i), start_ms, args.event_rate, seed=i)
                part = [v.replace(b'"req-', f'"m{i}-'.encode(), 1) for v in part]
                await preload_comparisons(bs, cfg.topics.comparisons, part)
            state = Path(tmp) / run
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "memory-worker",
                    f"--bootstrap={bs}",
                    f"--run={run}",
                    f"--state={state}",
                    f"--pending={n}",
                    f"--cache-mb={args.cache_mb}",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            got = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(got)
            rocks = ", ".join(f"{k} {v:.0f}" for k, v in got["rocksdb_mib"].items())
            print(
                f"{n:>10,} pending: peak RSS {got['peak_rss_mib']:,.0f} MiB (RocksDB: {rocks} "
                f"MiB), store on disk {got['store_mib']:,.0f} MiB, "
                f"{n / got['seconds']:,.0f} comparisons/s",
                flush=True,
            )
            shutil.rmtree(state, ignore_errors=True)
        a, b = results
        print(
            f"\n10x the pending requests: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} "
            f"({a['peak_rss_mib']:,.0f} -> {b['peak_rss_mib']:,.0f} MiB); store on disk "
            f"x{b['store_mib'] / max(a['store_mib'], 1e-9):.1f}"
        )


# --------------------------------------------------------------------------- recovery


def _chunk(
    task: int, first: int, n: int, t0: int, rate: float, rng: np.random.Generator, spec: PairSpec
) -> InputChunk:
    i = np.arange(first, first + n)
    ids = [f"req-{j}" for j in i.tolist()]  # the demo's ids
    s1 = rng.random(n)
    s2 = np.clip(s1 + 0.1 * rng.standard_normal(n), 0, 1)
    return InputChunk(
        task=task,
        pairs=[spec],
        comparisons=comparison_columns(
            ids,
            np.zeros(n, np.int32),
            (t0 + i * 1000.0 / rate).astype(np.int64),
            s1,
            s2,
            (s1 > 0.9).astype(np.int8),
            (s2 > 0.9).astype(np.int8),
        ),
        outcomes=EMPTY_OUTCOMES,
        # No input offsets: these requests stand for comparisons read before the live ones
        # (the stage then reads the comparisons topic from its beginning: the live traffic).
        offsets={},
        stream_ms=int(t0 + (first + n - 1) * 1000.0 / rate),
    )


async def build_state(cfg: SidecarConfig, task: int, total: int, t0: int, rate: float) -> int:
    """A task's store with ``total`` pending requests and its changelog, built through the
    join's apply path (the chunks are what the live path writes, minus JSON decoding).
    Returns the changelog's size in bytes (keys and values)."""
    s = cfg.outcomes
    store = Store(
        Path(s.state_dir) / f"task-{task}", cache_mb=s.cache_mb, write_buffer_mb=s.write_buffer_mb
    )
    join = JoinTask(
        store,
        task,
        s.layout(),
        Windows(s.report_window_ms, s.comparison_lateness_ms, s.outcome_grace_ms),
        s.judging(),
        max_label_window_ms=s.max_label_window_ms(),
    )
    producer = new_producer(cfg, "bench", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    spec = PairSpec(ROLLOUT, "fraud-lr", "1.4.0", "fraud-lr", "2.1.0", s.for_rollout(ROLLOUT))
    rng = np.random.default_rng(0)
    step = 8000
    started = time.monotonic()
    size = 0
    try:
        for first in range(0, total, step):
            chunk = _chunk(task, first, min(step, total - first), t0, rate, rng, spec)
            # Unique keys (the changelog is compacted): these chunks have no input offsets.
            key, raw = f"input/{task}/built{first}".encode(), encode(chunk)
            size += len(key) + len(raw)
            fut = await producer.send(s.changelog_topic, raw, key=key, partition=task)
            md = await fut
            join.apply(chunk, md.offset)
            if first // step % 500 == 0:
                done = first + step
                print(
                    f"  built {done:,} of {total:,} pending requests "
                    f"({done / (time.monotonic() - started):,.0f}/s)",
                    flush=True,
                )
    finally:
        await producer.stop()
        store.close()
    return size


def _rss_of(pid: int, field: str = "VmRSS") -> float:
    """MiB of ``field`` (VmRSS, VmHWM) of process ``pid`` (NaN once it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _spawn(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "outcomes", "run", "--config", str(config_path)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _scrape(port: int, name: str) -> float:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return -1.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def _time_to_first_record(
    proc: subprocess.Popen[bytes], port: int, timeout_s: float
) -> tuple[float, float]:
    """(seconds to /metrics answering with the store open, seconds to a new comparison
    applied) from the process start."""
    start = time.monotonic()
    ready = None
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the stage exited with {proc.returncode}")
        consumed = _scrape(port, 'sidecar_outcomes_records_total{input="comparisons"}')
        if consumed >= 0 and ready is None:
            ready = time.monotonic() - start
        if consumed > 0:
            return ready or 0.0, time.monotonic() - start
        await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("no record applied in time")


async def live_traffic(cfg: SidecarConfig, rate: float, stop: asyncio.Event, t0: int) -> None:
    """Comparisons at ``rate`` per second, event time now (new ids)."""
    producer = new_producer(cfg, "bench-traffic", linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    sent = 0
    began = time.monotonic()
    try:
        while not stop.is_set():
            n = max(1, int(rate / 10))
            values = make_values(n, time.time_ns() // 1_000_000, rate, seed=sent)
            values = [v.replace(b'"req-', f'"live{sent}-'.encode(), 1) for v in values]
            await produce_values(
                producer, cfg.topics.comparisons, [(ROLLOUT.encode(), v) for v in values]
            )
            sent += n
            ahead = sent / rate - (time.monotonic() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        await producer.stop()


async def recovery(args: argparse.Namespace) -> None:
    total = int(args.hours * 3600 * args.rate)
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap_servers
        root = Path(args.dir or tempfile.mkdtemp(prefix="bench-outcomes-"))
        run = f"bench-{uuid.uuid4().hex[:6]}"
        port = args.port
        cfg = config(
            bs,
            run,
            root / "state",
            metrics_port=port,
            report_window_ms=3_600_000,
            quality={"label_window_ms": int(args.hours * 3_600_000) + 3_600_000},
        )
        await ensure_topics(bs, [cfg.topics.comparisons, cfg.outcomes.topic], PARTITIONS)
        # The stage creates its internal topics; so does this, to write the changelog first.
        await ensure_topics(bs, [cfg.outcomes.by_task_topic], PARTITIONS)
        await ensure_topics(
            bs,
            [cfg.outcomes.changelog_topic],
            PARTITIONS,
            configs={"cleanup.policy": "compact,delete"},
        )
        task = kafka_partition(ROLLOUT.encode(), PARTITIONS)
        now = time.time_ns() // 1_000_000
        t0 = now - int(args.hours * 3_600_000)
        print(
            f"building {total:,} pending requests ({args.hours:g} h at {args.rate:g}/s) in "
            f"{root} ...",
            flush=True,
        )
        broker_pid = broker.process.pid if broker.process else 0
        broker_before = _rss_of(broker_pid)
        began = time.monotonic()
        changelog_bytes = await build_state(cfg, task, total, t0, args.rate)
        build_s = time.monotonic() - began
        store_mib = _dir_mib(root / "state")
        broker_growth = _rss_of(broker_pid) - broker_before
        print(
            f"built in {build_s:.0f}s ({total / build_s:,.0f} requests/s); store "
            f"{store_mib:,.0f} MiB on disk ({store_mib * (1 << 20) / total:.1f} B a request); "
            f"changelog {changelog_bytes / (1 << 20):,.0f} MiB ({changelog_bytes / total:.1f} B a "
            f"request); broker RSS +{broker_growth:,.0f} MiB "
            f"({broker_growth * (1 << 20) / total:.1f} B a request)",
            flush=True,
        )
        path = root / "sidecar.toml"
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from kafka_helpers import write_toml

        write_toml(cfg, path)
        log = root / "outcomes.log"
        stop = asyncio.Event()
        traffic = asyncio.create_task(live_traffic(cfg, args.rate, stop, t0))
        spawned: list[subprocess.Popen[bytes]] = []
        try:
            results = {}
            proc = _spawn(path, log)
            spawned = [proc]
            ready, first = await _time_to_first_record(proc, port, 600)
            await asyncio.sleep(3)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            print(
                f"first start: serving after {ready:.1f}s, first new comparison applied after "
                f"{first:.1f}s; SIGKILL",
                flush=True,
            )
            restores: dict[str, tuple[float, int, int]] = {}
            for name, wipe in (("with its store", False), ("without its store", True)):
                if wipe:
                    shutil.rmtree(root / "state")
                log_at = log.stat().st_size
                proc = _spawn(path, log)
                spawned.append(proc)
                ready, first = await _time_to_first_record(proc, port, 3600)
                results[name] = first
                await asyncio.sleep(3)
                with log.open("rb") as f:
                    f.seek(log_at)
                    restore = _restore_line(f.read().decode(errors="replace"), task)
                if restore is not None:
                    restores[name] = restore
                took, replayed, stored = restore or (float("nan"), 0, 0)
                print(
                    f"restart {name}: serving after {ready:.1f}s, task {task} restored in "
                    f"{took:.1f}s ({replayed:,} changelog records replayed, {stored:,} requests "
                    f"stored), first new comparison applied after {first:.1f}s (the rest: the "
                    f"group waiting for the killed member); peak RSS "
                    f"{_rss_of(proc.pid, 'VmHWM'):,.0f} MiB, store "
                    f"{_dir_mib(root / 'state'):,.0f} MiB on disk",
                    flush=True,
                )
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=60)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await traffic
            for p in spawned:  # never leave a stage behind (it would hold the port)
                if p.poll() is None:
                    p.kill()
                    p.communicate(timeout=30)
        full = results["without its store"]
        replay = restores.get("without its store")
        rate = f"{replay[2] / replay[0]:,.0f} requests/s" if replay and replay[0] else "?"
        print(
            f"\n{total:,} pending requests ({args.hours:g} h at {args.rate:g}/s): after a SIGKILL "
            f"the stage applies new records {results['with its store']:.1f}s after its restart "
            f"with its store, {full:.1f}s without it (a whole-changelog replay at {rate})"
        )
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def _restore_line(text: str, task: int) -> tuple[float, int, int] | None:
    """(seconds, changelog records replayed, requests stored) of task ``task``'s restore, from
    the stage's log."""
    import re

    pattern = rf"task {task} restored in ([0-9.]+)s: ([0-9]+) changelog records replayed, ([0-9]+)"
    found = re.findall(pattern, text)
    if not found:
        return None
    took, replayed, stored = found[-1]
    return float(took), int(replayed), int(stored)


class Rec(NamedTuple):
    """The fields of a consumer record the chunk builder reads."""

    value: bytes
    offset: int
    headers: tuple[tuple[str, bytes], ...] = ()


def _join_costs(count: int, repeats: int, share: float = 0.02) -> dict[str, float]:
    """Best per-comparison costs (us) of building and applying the chunks of ``count``
    comparisons (``share`` of them with an outcome), over ``repeats`` fresh stores."""
    from sidecar.outcomes.decode import ChunkBuilder, Skipped
    from sidecar.outcomes.settings import OutcomesSettings

    tree = {"quality": {"label_window_ms": 30_000, "missing": "negative"}}
    s = msgspec.convert(tree, OutcomesSettings)
    start = 1_700_000_000_000
    comps = make_values(count, start, 40_000.0)
    outs = outcome_values(count, start, 40_000.0, share)
    # Polls of ~10,000 records in all (comparisons and their outcomes), as the stage's
    # getmany gives them (``outcomes.max_batch``).
    poll = int(10_000 / (1 + share))
    best = {"build_us": float("inf"), "apply_us": float("inf")}
    for _ in range(repeats):
        builder = ChunkBuilder(s)
        t0 = time.perf_counter()
        chunks = []
        for i in range(0, count, poll):
            c = [Rec(v, offset=i + j) for j, v in enumerate(comps[i : i + poll])]
            lo, hi = len(outs) * i // count, len(outs) * (i + poll) // count
            o = [Rec(v, offset=lo + j) for j, v in enumerate(outs[lo:hi])]
            chunks += [chunk for chunk, _ in builder.build(0, c, o, 10**13, Skipped())]
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            task = JoinTask(
                Store(Path(tmp) / "task"),
                0,
                s.layout(),
                Windows(s.report_window_ms, s.comparison_lateness_ms, s.outcome_grace_ms),
                s.judging(),
                max_label_window_ms=s.max_label_window_ms(),
            )
            t2 = time.perf_counter()
            for offset, chunk in enumerate(chunks):
                task.apply(chunk, offset)
            t3 = time.perf_counter()
            task.store.close()
        best["build_us"] = min(best["build_us"], (t1 - t0) / count * 1e6)
        best["apply_us"] = min(best["apply_us"], (t3 - t2) / count * 1e6)
    return best


async def join_worker(args: argparse.Namespace) -> None:
    print(json.dumps(_join_costs(args.count, args.repeats, args.label_share)))


async def join(args: argparse.Namespace) -> None:
    """This checkout's join against ``--baseline``'s, alternating processes."""
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_tree(args.baseline, Path(tmp))
        if base is None:
            return
        here = "this checkout"
        costs: dict[str, list[dict[str, float]]] = {here: [], args.baseline: []}
        for round_ in range(args.rounds):
            order = [here, args.baseline] if round_ % 2 == 0 else [args.baseline, here]
            for who in order:
                cmd = [sys.executable, __file__, "join-worker", "--count", str(args.count)]
                cmd += ["--label-share", str(args.label_share)]
                tree = base if who == args.baseline else None
                costs[who].append(json.loads(last_line_of(cmd, tree, f"join, {who}")))
        print(
            f"join without Kafka, {args.count:,} comparisons ({args.label_share:.0%} with an "
            "outcome), "
            f"{args.rounds} processes each (best of 3 per process; median over processes):"
        )
        median = {
            who: {k: statistics.median(c[k] for c in runs) for k in ("build_us", "apply_us")}
            for who, runs in costs.items()
        }
        for who, runs in costs.items():
            m = median[who]
            print(
                f"  {who:14} build {m['build_us']:.3f} us + apply {m['apply_us']:.3f} us "
                "per comparison (all builds: "
                + ", ".join(f"{c['build_us']:.3f}" for c in runs)
                + "; applies: "
                + ", ".join(f"{c['apply_us']:.3f}" for c in runs)
                + ")"
            )
        for k in ("build_us", "apply_us"):
            ratio = median[here][k] / median[args.baseline][k]
            print(f"  {k[:-3]}: this checkout / {args.baseline} = {ratio:.3f}")
        total = sum(median[here].values()) / sum(median[args.baseline].values())
        print(f"  build + apply: this checkout / {args.baseline} = {total:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--count", type=int, default=300_000)
    p.add_argument("--event-rate", type=float, default=40_000.0)
    p.add_argument("--label-share", type=float, default=0.02)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sidecar-requests", type=int, default=200_000)
    p.add_argument(
        "--decode-processes",
        default="1,0",
        help="outcomes.decode_processes values to run, each every round (comma-separated)",
    )
    p = sub.add_parser("memory")
    p.add_argument("--pending", type=int, default=200_000)
    p.add_argument("--event-rate", type=float, default=1000.0)
    p.add_argument("--cache-mb", type=int, default=64, help="outcomes.cache_mb")
    p = sub.add_parser("memory-worker")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--pending", type=int, required=True)
    p.add_argument("--cache-mb", type=int, default=64)
    p = sub.add_parser("join")
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--baseline", default="main", help="git ref to compare with")
    p.add_argument("--label-share", type=float, default=0.02, help="comparisons with an outcome")
    p = sub.add_parser("join-worker")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label-share", type=float, default=0.02)
    p = sub.add_parser("recovery")
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--rate", type=float, default=1000.0, help="the demo's rate")
    p.add_argument("--port", type=int, default=9192)
    p.add_argument("--dir", help="keep the state here (default: a temporary directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    limit_malloc_arenas()  # as `sidecar outcomes run` does
    prepare_process()
    runner = {
        "throughput": throughput,
        "memory": memory,
        "memory-worker": memory_worker,
        "recovery": recovery,
        "join": join,
        "join-worker": join_worker,
    }[args.mode]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
