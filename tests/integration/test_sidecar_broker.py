"""The sidecar end to end on a real broker: nothing lost, nothing wrongly decided."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kafka_helpers import (
    create_topics,
    decode_values,
    frozen,
    make_config,
    produce,
    read_topic,
    wait_until,
    write_toml,
)

from sidecar.broker import EmbeddedBroker, free_port
from sidecar.contracts import Comparison, DeadLetter, Decision
from sidecar.hashing import bucket_of
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

pytestmark = pytest.mark.broker


async def run_sidecar(sidecar: Sidecar) -> asyncio.Task[None]:
    task = asyncio.create_task(sidecar.run())
    await asyncio.wait_for(sidecar.ready.wait(), 30)
    return task


async def stop_sidecar(sidecar: Sidecar, task: asyncio.Task[None]) -> None:
    sidecar.request_stop()
    await asyncio.wait_for(task, 60)
    sidecar.close_models()


async def started_mid_stream(cfg: Any, n: int, seed: int) -> tuple[Sidecar, asyncio.Task[None]]:
    """A sidecar that has begun consuming ``n`` preloaded requests."""
    await create_topics(cfg)
    await produce(cfg, generated_items(n, seed=seed))
    sidecar = Sidecar(cfg)
    task = await run_sidecar(sidecar)
    await wait_until(lambda: sidecar.processed > 0, 60, interval_s=0.001)
    return sidecar, task


async def test_n_requests_give_n_decisions_and_n_comparisons(bootstrap: str) -> None:
    # Timeouts far above any stall of a loaded test machine: this test is about routing and
    # counts, and a model timing out would (rightly) change an arm.
    patient = {"timeout_ms": 20_000}
    cfg = make_config(
        bootstrap,
        rollout={"mode": "canary", "canary_share_bp": 2500},
        models={"champion": patient, "candidate": patient},
    )
    await create_topics(cfg)
    n = 6000
    await produce(cfg, generated_items(n, seed=11))
    sidecar = Sidecar(cfg)
    task = await run_sidecar(sidecar)
    await wait_until(lambda: sidecar.processed >= n, 60)
    await stop_sidecar(sidecar, task)

    decisions = decode_values(await read_topic(bootstrap, cfg.topics.decisions, expect=n), Decision)
    comparisons = decode_values(
        await read_topic(bootstrap, cfg.topics.comparisons, expect=n), Comparison
    )
    expected = {f"req-{i}" for i in range(n)}
    assert {d.request_id for d in decisions} == expected and len(decisions) == n
    assert {c.request_id for c in comparisons} == expected and len(comparisons) == n
    for d in decisions:
        on_candidate = bucket_of(d.routing_key or d.request_id, "fraud-v2") < 2500
        assert d.arm == ("candidate" if on_candidate else "champion")
        assert d.model_version == ("2.0.0" if on_candidate else "1.4.0")
        assert d.policy_epoch == 0 and d.policy_mode == "canary"
    for c in comparisons:
        assert c.champion.score is not None and c.candidate.score is not None
    # 25% of the buckets; ~6000 requests over ~5600 distinct cards: 5 sigma is about +-3%.
    share = sum(d.arm == "candidate" for d in decisions) / n
    assert 0.22 < share < 0.28


async def test_decisions_are_keyed_and_carry_headers(bootstrap: str) -> None:
    cfg = make_config(bootstrap)
    await create_topics(cfg)
    await produce(cfg, generated_items(200, seed=2))
    sidecar = Sidecar(cfg)
    task = await run_sidecar(sidecar)
    await wait_until(lambda: sidecar.processed >= 200, 60)
    await stop_sidecar(sidecar, task)
    records = await read_topic(bootstrap, cfg.topics.decisions, expect=200)
    for r in records:
        d = msgspec.json.decode(r.value, type=Decision)
        assert r.key == d.routing_key.encode()
        headers = dict(r.headers)
        assert headers["request_id"] == d.request_id.encode()
        assert headers["model_version"] == d.model_version.encode()
        assert headers["schema_version"] == b"1.0"
    # Same key -> same partition: per-entity order is kept downstream.
    by_key = collections.defaultdict(set)
    for r in records:
        by_key[r.key].add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())


BAD_INPUTS: list[tuple[bytes | None, str]] = [
    (b"\x00\x01 not json", "decode"),
    (b'["a", "list"]', "schema"),
    (b'{"features": {"amount": 1}}', "schema"),
    (b'{"request_id": "bad-missing", "features": {"amount": 3.0}}', "feature_missing"),
    (
        b'{"request_id": "bad-type", "features": {"amount": "lots", "hour": 1,'
        b' "merchant_risk": 0.1, "velocity_1h": 1, "velocity_24h": 1, "account_age_days": 1,'
        b' "distance_km": 1,'
        b' "device_score": 0.1}}',
        "feature_type",
    ),
    (b'{"request_id": "bad-version", "schema_version": "2.0", "features": {}}', "schema_version"),
    (
        b'{"request_id": "huge", "features": {}, "metadata": {"blob": "' + b"x" * 300_000 + b'"}}',
        "oversize",
    ),
]


async def test_bad_inputs_go_to_the_dead_letter_topic_and_good_ones_are_decided(
    bootstrap: str,
) -> None:
    cfg = make_config(bootstrap, input={"max_message_bytes": 200_000})
    await create_topics(cfg)
    good = generated_items(300, seed=5)
    items: list[tuple[bytes | None, bytes]] = []
    for i, item in enumerate(good):
        items.append(item)
        if i % 40 == 0 and i // 40 < len(BAD_INPUTS):
            items.append((f"bad-{i}".encode(), BAD_INPUTS[i // 40][0]))  # type: ignore[arg-type]
    await produce(cfg, items)
    sidecar = Sidecar(cfg)
    task = await run_sidecar(sidecar)
    await wait_until(lambda: sidecar.processed >= len(items), 60)
    await stop_sidecar(sidecar, task)

    letters = decode_values(
        await read_topic(bootstrap, cfg.topics.dead_letter, expect=len(BAD_INPUTS)), DeadLetter
    )
    assert sorted(x.kind for x in letters) == sorted(kind for _, kind in BAD_INPUTS)
    # Byte for byte, or (past dead_letter.max_value_bytes) a prefix with size and sha256.
    originals = set()
    for x in letters:
        original = x.original_value
        if x.truncated:
            (original,) = [v for v, _ in BAD_INPUTS if v and len(v) == x.original_size]
            assert original.startswith(x.original_value or b"\xff")
            assert x.original_sha256 == hashlib.sha256(original).hexdigest()
        originals.add(original)
    assert originals == {value for value, _ in BAD_INPUTS}
    for letter in letters:
        assert letter.reason and letter.source_topic == cfg.topics.requests
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=300), Decision
    )
    assert {d.request_id for d in decisions} == {f"req-{i}" for i in range(300)}


async def test_a_failing_candidate_does_not_touch_champion_traffic(bootstrap: str) -> None:
    cfg = make_config(
        bootstrap,
        rollout={"mode": "canary", "canary_share_bp": 5000},
        models={
            "candidate": {"target": "sidecar.examples.faulty:raising", "options": {"every": 2}}
        },
    )
    await create_topics(cfg)
    await produce(cfg, generated_items(3000, seed=8))
    sidecar = Sidecar(cfg)
    task = await run_sidecar(sidecar)
    await wait_until(lambda: sidecar.processed >= 3000, 60)
    await stop_sidecar(sidecar, task)
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, expect=3000), Decision
    )
    comparisons = {
        c.request_id: c
        for c in decode_values(
            await read_topic(bootstrap, cfg.topics.comparisons, expect=3000), Comparison
        )
    }
    assert len(decisions) == 3000
    from sidecar.examples import fraud

    data = fraud.generate(3000, seed=8)
    champion_scores = fraud.champion().predict(data.features[:, :6])
    for d in decisions:
        c = comparisons[d.request_id]
        i = int(d.request_id.split("-")[1])
        assert c.champion.score == pytest.approx(champion_scores[i])
        if d.arm == "champion":
            assert d.score == c.champion.score
        if c.candidate.error is not None:
            assert c.candidate.error.kind == "exception"
            assert d.arm == "champion"
            if d.routed_arm == "candidate":
                assert d.fallback and "candidate_failed" in d.fallback


def _spawn(config_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "run",
            "--workers",
            "1",
            "--config",
            str(config_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
async def test_sigterm_drains_commits_and_exits_zero(bootstrap: str, tmp_path: Path) -> None:
    cfg = make_config(bootstrap)
    await create_topics(cfg)
    n = 4000
    await produce(cfg, generated_items(n, seed=3))
    proc = _spawn(write_toml(cfg, tmp_path / "sidecar.toml"))
    try:
        records: list[Any] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(records) < n:
            records = await read_topic(bootstrap, cfg.topics.decisions, idle_s=0.5, max_wait_s=5)
        assert len({r.value for r in records}) >= n
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]
    # Everything was committed: a new member of the group finds nothing left to do.
    again = Sidecar(cfg)
    task = await run_sidecar(again)
    await asyncio.sleep(8)
    await stop_sidecar(again, task)
    assert again.processed == 0


async def test_a_second_sigterm_stops_without_waiting_for_the_drain(
    bootstrap: str, tmp_path: Path
) -> None:
    """A candidate hung on its first batch holds that batch in flight: SIGTERM drains (waits,
    up to pipeline.drain_timeout_s); a second SIGTERM stops at once and still exits 0 (the
    batch is consumed again). Before: the second signal changed nothing, the operator waited."""
    cfg = make_config(
        bootstrap,
        partitions=1,
        rollout={"mode": "canary", "canary_share_bp": 5000},
        pipeline={"drain_timeout_s": 120},
        models={
            "candidate": {
                "target": "model_doubles:candidate_stalling_once",
                "options": {"delay_s": 100},
                "timeout_ms": 110_000,
            }
        },
    )
    await create_topics(cfg)
    await produce(cfg, generated_items(200, seed=31))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "run",
            "--workers",
            "1",
            "--config",
            str(write_toml(cfg, tmp_path / "s.toml")),
        ],
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # The champion's decisions leave early; the candidate's half waits for the stall.
        early: list[Any] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not early:
            early = await read_topic(bootstrap, cfg.topics.decisions, idle_s=0.5, max_wait_s=3)
        assert early, "the sidecar never decided anything"
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(3)
        assert proc.poll() is None, "expected the first SIGTERM to wait for the candidate"
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text[-2000:]
    assert "second stop signal: not waiting for" in text, text[-2000:]
    # The hung call itself never returns in time: the process exits past it.
    assert "exiting without waiting for them" in text, text[-2000:]


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_nothing(bootstrap: str, tmp_path: Path) -> None:
    # A champion that takes 40 ms a batch keeps the sidecar behind the producer, so the kill
    # lands while records are consumed, scored and unacknowledged.
    slow_champion = {
        "target": "sidecar.examples.faulty:slow",
        "timeout_ms": 2000,
        "options": {"delay_s": 0.04, "target": "sidecar.examples.fraud:champion"},
    }
    cfg = make_config(bootstrap, pipeline={"max_batch": 500}, models={"champion": slow_champion})
    await create_topics(cfg)
    n, chunk = 60_000, 2_000
    items = generated_items(n, seed=21)
    config_path = write_toml(cfg, tmp_path / "sidecar.toml")
    proc = _spawn(config_path)
    try:
        await produce(cfg, items[:chunk])
        first = await read_topic(bootstrap, cfg.topics.decisions, idle_s=1, max_wait_s=60, expect=1)
        assert first, "the sidecar never started deciding"
        # Keep the stream flowing and kill the process while it is busy with it.
        for start in range(chunk, n // 2, chunk):
            await produce(cfg, items[start : start + chunk])
        decided = len(await read_topic(bootstrap, cfg.topics.decisions, idle_s=0.2, max_wait_s=5))
        assert decided < n // 2, "the sidecar was not behind; the kill would prove nothing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    await produce(cfg, items[n // 2 :])
    proc = _spawn(config_path)
    try:
        ids: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(set(ids)) < n:
            records = await read_topic(bootstrap, cfg.topics.decisions, idle_s=1.0, max_wait_s=10)
            ids = [msgspec.json.decode(r.value, type=Decision).request_id for r in records]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert set(ids) == {f"req-{i}" for i in range(n)}
    duplicates = len(ids) - len(set(ids))
    # At-least-once: only records consumed but not yet committed at the kill repeat, which is
    # bounded by pipeline.max_in_flight_records plus one batch per partition.
    print(f"\nSIGKILL mid-stream: {duplicates} duplicate decisions for {n} requests")
    assert duplicates <= cfg.pipeline.max_in_flight_records + cfg.pipeline.max_batch
    assert proc.returncode == 0, out.decode()[-2000:]


@pytest.mark.slow
async def test_a_broker_that_appears_late_is_waited_for(tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(f"127.0.0.1:{port}")
    sidecar = Sidecar(cfg)
    task = asyncio.create_task(sidecar.run())
    await asyncio.sleep(2.0)  # it is retrying with backoff, not crashing and not spinning
    assert not task.done()
    with EmbeddedBroker(port=port, log_path=tmp_path / "late.log"):
        await create_topics(cfg)
        await produce(cfg, generated_items(100, seed=1))
        await asyncio.wait_for(sidecar.ready.wait(), 60)
        await wait_until(lambda: sidecar.processed >= 100, 60)
        await stop_sidecar(sidecar, task)
        decisions = await read_topic(cfg.kafka.bootstrap_servers, cfg.topics.decisions, expect=100)
        assert len(decisions) == 100


@pytest.mark.slow
async def test_two_instances_share_the_work_and_survive_one_leaving(bootstrap: str) -> None:
    cfg = make_config(bootstrap, partitions=4, pipeline={"max_batch": 200})
    await create_topics(cfg)
    n = 20_000
    await produce(cfg, generated_items(n, seed=31))
    first, second = Sidecar(cfg), Sidecar(cfg)
    t1 = await run_sidecar(first)
    t2 = await run_sidecar(second)
    await wait_until(lambda: first.processed + second.processed >= n // 3, 60)
    await stop_sidecar(first, t1)  # leaves the group: its partitions move to the other one
    deadline = time.monotonic() + 90
    ids: set[str] = set()
    while time.monotonic() < deadline and len(ids) < n:
        records = await read_topic(bootstrap, cfg.topics.decisions, idle_s=1.0, max_wait_s=10)
        ids = {msgspec.json.decode(r.value, type=Decision).request_id for r in records}
    await stop_sidecar(second, t2)
    assert ids == {f"req-{i}" for i in range(n)}


@pytest.mark.slow
async def test_backpressure_bounds_the_records_in_flight(tmp_path: Path) -> None:
    """Freeze the broker (SIGSTOP) while the consumer holds prefetched records: no
    acknowledgement can arrive. aiokafka's producer itself stops accepting batches after about
    two per partition; the sidecar's bound must stop consumption earlier when it is set lower,
    at ``max_in_flight_records`` plus at most one batch. Once the broker is back it finishes."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        cfg = make_config(
            broker.bootstrap_servers,
            pipeline={"max_in_flight_records": 50, "max_batch": 100},
            kafka={"request_timeout_ms": 60_000},
        )
        n = 20_000
        sidecar, task = await started_mid_stream(cfg, n, seed=4)
        with frozen(broker):
            await asyncio.sleep(2.0)
            stalled_at = sidecar.processed
            assert sidecar.in_flight_records < 50 + 100
            await asyncio.sleep(1.0)
            assert sidecar.processed == stalled_at, "kept consuming with no acknowledgements"
        await wait_until(lambda: sidecar.processed >= n, 120)
        await stop_sidecar(sidecar, task)
        assert 0 < sidecar.peak_in_flight_records < 50 + 100
        assert stalled_at < n
        decisions = await read_topic(broker.bootstrap_servers, cfg.topics.decisions, expect=n)
        assert len({r.value for r in decisions}) == n


async def test_metrics_are_served_over_http(bootstrap: str) -> None:
    import urllib.request

    port = free_port()
    cfg = make_config(bootstrap, metrics={"port": port, "host": "127.0.0.1"})
    await create_topics(cfg)
    await produce(cfg, [*generated_items(500, seed=6), (b"k", b"garbage")])
    sidecar = Sidecar(cfg)
    sidecar.metrics.serve(port, "127.0.0.1")
    task = await run_sidecar(sidecar)
    await wait_until(lambda: sidecar.processed >= 501, 60)
    await stop_sidecar(sidecar, task)
    url = f"http://127.0.0.1:{port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'sidecar_records_consumed_total{topic="' + cfg.topics.requests + '"} 501.0' in body
    assert 'sidecar_dead_letters_total{kind="decode"} 1.0' in body
    assert 'sidecar_comparisons_total{rollout="fraud-v2"} 500.0' in body
    assert "sidecar_model_batch_latency_seconds_bucket" in body
    assert 'sidecar_policy_mode{mode="canary",rollout="fraud-v2"} 1.0' in body


@pytest.mark.slow
async def test_a_broker_outage_mid_stream_is_retried_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freeze the broker for longer than the request timeout: sends fail, the committer logs,
    backs off and sends again; nothing is committed past unacknowledged outputs, nothing lost.
    Meanwhile the lag is unknown, not the "lag 0" of the last high watermarks the broker gave
    (it said all was well while the broker was away)."""
    from sidecar import progress

    monkeypatch.setattr(progress, "STALE_FETCH_MS", 4_000)
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        cfg = make_config(
            broker.bootstrap_servers,
            # Above the session timeout (6 s here), as group joins need; the freeze is longer.
            kafka={"request_timeout_ms": 7000},
            pipeline={"max_batch": 200},
        )
        n = 6000
        sidecar, task = await started_mid_stream(cfg, n, seed=9)
        with frozen(broker):
            await asyncio.sleep(10.0)
            assert not task.done(), "the sidecar crashed during the outage"
            during = await progress.sample(sidecar)
        ids: set[str] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(ids) < n:
            records = await read_topic(
                broker.bootstrap_servers, cfg.topics.decisions, idle_s=1.0, max_wait_s=10
            )
            ids = {msgspec.json.decode(r.value, type=Decision).request_id for r in records}
        after = await progress.sample(sidecar)
        await stop_sidecar(sidecar, task)
        assert during.lag is None and during.partitions == 3, during
        assert after.lag is not None, after  # fetches answered again
        assert ids == {f"req-{i}" for i in range(n)}
        assert any("sending again" in r.getMessage() for r in caplog.records), (
            "expected the committer to retry the unacknowledged outputs"
        )


@pytest.mark.parametrize("sending_bound", [None, 200])
async def test_champion_decisions_do_not_wait_for_a_hung_candidate(
    bootstrap: str, sending_bound: int | None
) -> None:
    """The candidate answers nothing until the test lets it: every record the champion decides
    is on the decisions topic meanwhile, nothing is committed (their comparisons are not
    written yet), and once the candidate answers, every output arrives and the offsets commit.
    With ``max_sending_records`` at one batch: batches held by the candidate do not count
    there, so it does not stop the champion either (``max_in_flight_records`` bounds them).
    """
    import model_doubles
    from aiokafka import TopicPartition

    gate = model_doubles.new_gate()
    cfg = make_config(
        bootstrap,
        partitions=1,
        rollout={"mode": "canary", "canary_share_bp": 2000},
        pipeline={"max_batch": 200}
        if sending_bound is None
        else {"max_batch": 200, "max_sending_records": sending_bound},
        models={
            "candidate": {
                "target": "model_doubles:gated",
                "options": {"gate": gate},
                "timeout_ms": 60_000,
            }
        },
    )
    await create_topics(cfg)
    n = 1000
    await produce(cfg, generated_items(n, seed=21))
    sidecar = Sidecar(cfg)
    task = await run_sidecar(sidecar)
    try:
        await wait_until(lambda: sidecar.processed >= n, 60)
        early = decode_values(await read_topic(bootstrap, cfg.topics.decisions, idle_s=2), Decision)
        assert 600 < len(early) < n
        assert all(d.arm == d.routed_arm == "champion" for d in early)
        assert await read_topic(bootstrap, cfg.topics.comparisons, idle_s=0.5) == []
        consumer = sidecar.consumer
        assert consumer is not None
        tp = TopicPartition(cfg.topics.requests, 0)
        assert await consumer.committed(tp) is None  # comparisons still owed
        assert model_doubles.calls(gate) >= 1
        model_doubles.release(gate)
        await wait_until(lambda: not sidecar._in_flight, 60)
        assert await consumer.committed(tp) == n
    finally:
        model_doubles.release(gate)
        await stop_sidecar(sidecar, task)
    decisions = decode_values(await read_topic(bootstrap, cfg.topics.decisions, expect=n), Decision)
    comparisons = decode_values(
        await read_topic(bootstrap, cfg.topics.comparisons, expect=n), Comparison
    )
    assert sorted(d.request_id for d in decisions) == sorted(f"req-{i}" for i in range(n))
    assert len(comparisons) == n
    by_id = {c.request_id: c for c in comparisons}
    for d in decisions:
        c = by_id[d.request_id]
        assert d.arm == d.routed_arm and d.fallback is None  # the candidate was waited for
        assert c.served_by == d.arm and c.candidate.error is None  # 5 batches: none shed
    # The decisions of each key leave in the order of its requests.
    offsets: dict[str | None, list[int]] = collections.defaultdict(list)
    for d in decisions:
        offsets[d.routing_key].append(int(d.request_id.split("-")[1]))
    assert all(seq == sorted(seq) for seq in offsets.values())


def _consecutive_free_ports(count: int) -> int:
    import socket

    for _ in range(50):
        base = free_port()
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no consecutive free ports")


def _consumed(port: int, topic: str) -> float:
    import re
    import urllib.request

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    match = re.search(
        rf'sidecar_records_consumed_total{{topic="{re.escape(topic)}"}} (\S+)', body.decode()
    )
    return float(match.group(1)) if match else 0.0


async def test_workers_share_the_partitions_and_drain_on_sigterm(
    bootstrap: str, tmp_path: Path
) -> None:
    """``sidecar run --workers 2``: two members of the group, each with its own metrics port,
    each consuming; SIGTERM to the supervisor drains both, commits, exits 0."""
    base = _consecutive_free_ports(2)
    cfg = make_config(bootstrap, partitions=4, metrics={"port": base, "host": "127.0.0.1"})
    await create_topics(cfg)
    n = 8000
    await produce(cfg, generated_items(n, seed=12))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "run",
            "--workers",
            "2",
            "--config",
            str(write_toml(cfg, tmp_path / "sidecar.toml")),
        ],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        topic = cfg.topics.requests
        # Both workers end up consuming: the second to join gets partitions in a rebalance
        # (more records are produced until it has).
        deadline = time.monotonic() + 90
        counts = [0.0, 0.0]
        while time.monotonic() < deadline:
            counts = [await asyncio.to_thread(_consumed, base + i, topic) for i in range(2)]
            if all(counts) and sum(counts) >= n:
                break
            if sum(counts) >= n:
                await produce(cfg, generated_items(500, seed=99, start_id=n))
                n += 500
            await asyncio.sleep(0.5)
        assert all(counts), f"records consumed per worker: {counts}"
        records = await read_topic(bootstrap, cfg.topics.decisions, expect=n)
        assert {msgspec.json.decode(r.value)["request_id"] for r in records} == {
            f"req-{i}" for i in range(n)
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out.decode()[-3000:]
    again = Sidecar(cfg)  # everything was committed
    task = await run_sidecar(again)
    await asyncio.sleep(6)
    await stop_sidecar(again, task)
    assert again.processed == 0
