"""``sidecar outcomes`` on a real broker: outcomes keyed any way meet their comparisons, bad
outcome records become dead letters, the figures are scikit-learn's, a new owner rebuilds the
store from the changelog, a SIGKILL loses and double-counts nothing, and a quality guard rolls a
worse candidate back with a signed command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kafka_helpers import create_topics, produce, read_topic, wait_until, write_toml
from outcomes.outcome_support import (
    ROLLOUT,
    Stream,
    final_reports,
    outcomes_config,
    ranking_stream,
    stream,
)
from sklearn import metrics

from sidecar.cli import main
from sidecar.config import SidecarConfig
from sidecar.contracts import DeadLetter
from sidecar.control.commands import ControlCommand, verify_command
from sidecar.control.keys import TrustStore, write_key_set
from sidecar.errors import ConfigError
from sidecar.kafka import ensure_topics, new_admin
from sidecar.outcomes.contract import Outcome
from sidecar.outcomes.quality import score_bins
from sidecar.outcomes.ranking import PairedRankingQuality
from sidecar.outcomes.report import QualityReport, QualityVerdict
from sidecar.outcomes.service import OutcomesService

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


async def feed(cfg: SidecarConfig, s: Stream, *extra_outcomes: tuple[bytes, bytes]) -> None:
    await produce(cfg, s.comparisons, cfg.topics.comparisons)
    await produce(cfg, [*s.outcomes, *extra_outcomes], cfg.outcomes.topic)


async def run_until(service: OutcomesService, done: Any, timeout_s: float = 60) -> None:
    task = asyncio.create_task(service.run())
    try:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            if task.done():
                task.result()
            await asyncio.sleep(0.2)
        assert done(), "the outcomes stage did not get there in time"
    finally:
        service.request_stop()
        await task


def judged(service: OutcomesService) -> int:
    v = service.verdicts.get(ROLLOUT)
    return v.judged_pairs if v is not None else 0


@pytest.mark.parametrize(
    ("key_by", "decode_processes"),
    [
        ("rollout", 1),
        ("rollout", 0),
        pytest.param("routing_key", 1, marks=pytest.mark.slow),
    ],
    ids=["by-rollout-helper", "by-rollout-in-loop", "by-routing-key"],
)
async def test_outcomes_meet_their_comparisons_and_the_figures_are_scikit_learns(
    bootstrap: str, tmp_path: Path, key_by: str, decode_processes: int
) -> None:
    cfg = outcomes_config(
        bootstrap,
        tmp_path / "state",
        topics={"comparisons_key": key_by},
        outcomes={"decode_processes": decode_processes, "max_batch": 1000},
    )
    await create_topics(cfg)
    s = stream(6000, seed=1, key_by=key_by)
    future = Outcome(request_id="r2", label=True, ts=time.time_ns() // 1_000_000 + 3_600_000)
    garbage = [
        (b"x", b"not json"),
        (b"y", b'{"request_id": "r1", "label": "yes", "ts": 1}'),
        (b"z", msgspec.json.encode(future)),
    ]
    await feed(cfg, s, *garbage)
    service = OutcomesService(cfg)
    await run_until(service, lambda: judged(service) >= len(s.ids))
    assert service.applied.duplicates == 0 and service.applied.late == {}
    finals = final_reports(list(service.recent))
    assert sum(r.counts.requests for r in finals.values()) == len(s.ids)
    assert sum(r.counts.labelled for r in finals.values()) == len(s.labelled)
    assert sum(r.counts.positives for r in finals.values()) == int(s.y.sum())
    verdict = service.verdicts[ROLLOUT]
    assert verdict.judged_pairs == len(s.ids) and verdict.labelled == len(s.labelled)
    y = s.y.astype(int)
    for arm, p in (("champion", s.champion), ("candidate", s.candidate)):
        expected = metrics.roc_auc_score(y, score_bins(p, 1024))
        assert getattr(verdict.metrics["auc"], arm) == pytest.approx(expected, abs=1e-12)
    assert verdict.gate.ok, verdict.gate.reason
    # What the topics hold: reports and verdicts for anyone; the garbage as dead letters.
    reports = [
        msgspec.json.decode(r.value, type=QualityReport)
        for r in await read_topic(bootstrap, cfg.outcomes.quality_topic, idle_s=1)
    ]
    assert final_reports(reports).keys() == finals.keys()
    assert {r.status for r in reports} == {"provisional", "final"}
    letters = [
        msgspec.json.decode(r.value, type=DeadLetter)
        for r in await read_topic(bootstrap, cfg.topics.dead_letter, idle_s=1)
    ]
    assert sorted(d.kind for d in letters) == ["decode", "event_time", "schema"]
    assert all(d.source_topic == cfg.outcomes.topic and d.reason for d in letters)


async def test_ranking_outcomes_judge_both_arms_lists(bootstrap: str, tmp_path: Path) -> None:
    """Click sets meet ranking comparisons on the broker (repeated outcomes counted once,
    requests without a click judged as clicking nothing); the final reports and the verdict
    are ``PairedRankingQuality`` on the same data, and the ndcg gate passes the better
    candidate. A hostile item-set label is dead-lettered."""
    rollout = "recs-v2"
    rules = {
        "label_window_ms": 1500,
        "missing": "negative",
        "ranking_k": 5,
        "non_inferiority": {"metric": "ndcg", "margin": 0.0, "min_pairs": 500},
    }
    cfg = outcomes_config(bootstrap, tmp_path / "state", outcomes={"rollouts": {rollout: rules}})
    await create_topics(cfg)
    s = ranking_stream(1500, seed=4, rollout=rollout, span_ms=3000, delay_ms=(100, 1200))
    hostile = (b"h", b'{"request_id": "q1", "label": ["sku-1", 7], "ts": 1}')
    await produce(cfg, s.comparisons, cfg.topics.comparisons)
    await produce(cfg, [*s.outcomes, hostile], cfg.outcomes.topic)
    service = OutcomesService(cfg)

    def done() -> bool:
        v = service.verdicts.get(rollout)
        return v is not None and v.judged_pairs >= len(s.ids)

    await run_until(service, done)
    want = PairedRankingQuality(5)
    want.add(s.champion, s.candidate, s.clicked)
    expected = want.report()
    finals = [r for r in final_reports(list(service.recent)).values() if r.rollout == rollout]
    assert all(r.ranking is not None for r in finals)
    assert sum(r.ranking.requests for r in finals if r.ranking) == len(s.ids)
    assert sum(r.ranking.no_clicks for r in finals if r.ranking) == expected.no_clicks > 0
    assert sum(r.counts.labelled for r in finals) == len({k for k, _ in s.outcomes})
    verdict = service.verdicts[rollout]
    for name, fig in (("ndcg", "ndcg"), ("ctr", "ctr"), ("mrr", "mrr")):
        est = verdict.metrics[name]
        assert est.champion == pytest.approx(getattr(expected, f"{fig}_champion").value, abs=1e-9)
        assert est.candidate == pytest.approx(getattr(expected, f"{fig}_candidate").value, abs=1e-9)
        assert est.diff == pytest.approx(getattr(expected, f"{fig}_diff").value, abs=1e-9)
    assert verdict.metrics["ndcg"].diff > 0 and verdict.gate.ok, verdict.gate.reason
    letters = [
        msgspec.json.decode(r.value, type=DeadLetter)
        for r in await read_topic(bootstrap, cfg.topics.dead_letter, idle_s=1)
    ]
    assert [d.kind for d in letters] == ["schema"]


@pytest.mark.slow
async def test_status_prints_the_latest_verdict_and_its_gate(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = outcomes_config(bootstrap, tmp_path / "state")
    await create_topics(cfg)
    path = write_toml(cfg, tmp_path / "sidecar.toml")
    assert await asyncio.to_thread(main, ["outcomes", "status", "--config", str(path)]) == 3
    assert "no quality verdict" in capsys.readouterr().out
    s = stream(3000, seed=2)
    await feed(cfg, s)
    service = OutcomesService(cfg)
    await run_until(service, lambda: judged(service) >= len(s.ids))
    assert await asyncio.to_thread(main, ["outcomes", "status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{ROLLOUT}: fraud-lr 2.1.0 vs fraud-lr 1.4.0: 3,000 judged pairs" in out
    assert "gate MET (met)" in out and "auc" in out


@pytest.mark.slow
async def test_a_new_owner_rebuilds_the_store_from_the_changelog(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = outcomes_config(bootstrap, tmp_path / "state")
    await create_topics(cfg)
    first = stream(4000, seed=3, t0=time.time_ns() // 1_000_000 - 60_000)
    second = stream(4000, seed=4, prefix="s", t0=int(first.ts[-1]) + 1)
    await feed(cfg, first)
    a = OutcomesService(cfg)
    await run_until(a, lambda: a.applied.comparisons >= 4000 and sum(a.applied.joined.values()) > 0)
    shutil.rmtree(tmp_path / "state")  # the store is lost (another machine takes over)
    await feed(cfg, second)
    b = OutcomesService(cfg)
    await run_until(b, lambda: judged(b) >= 8000)
    assert b.metrics.restored_records._value.get() > 0  # it replayed the changelog
    assert b.applied.comparisons == 4000  # and read only what the changelog did not hold
    verdict = b.verdicts[ROLLOUT]
    assert verdict.judged_pairs == 8000
    assert verdict.labelled == len(first.labelled) + len(second.labelled)


async def test_a_comparisons_topic_that_changes_partition_count_stops_the_stage_for_good(
    bootstrap: str, tmp_path: Path
) -> None:
    """Partition p of the comparisons topic is task p, whose outcomes come on partition p of
    ``by-task``: with a partition more, that partition's comparisons would never be joined.
    (Tansu cannot add partitions; the topic is deleted and created again with four.)"""
    cfg = outcomes_config(bootstrap, tmp_path / "state", kafka={"metadata_max_age_ms": 1000})
    await create_topics(cfg)
    svc = OutcomesService(cfg)
    task = asyncio.create_task(svc.run())
    try:
        await wait_until(lambda: len(svc.tasks) == 3 and all(t.ready for t in svc.tasks.values()))
        assert not task.done()
        admin = new_admin(cfg, "test")
        await admin.start()
        try:
            await admin.delete_topics([cfg.topics.comparisons])
        finally:
            await admin.close()
        await ensure_topics(bootstrap, [cfg.topics.comparisons], 4)
        with pytest.raises(ConfigError, match=r"now has 4 partitions.* have 3"):
            await asyncio.wait_for(asyncio.shield(task), 60)
    finally:
        svc.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
    # ... and a new start refuses until the internal topics match again.
    with pytest.raises(ConfigError, match=r"has 3 partitions but .* has 4"):
        await asyncio.wait_for(OutcomesService(cfg).run(), 60)


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "outcomes", "run", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _scrape(port: int, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def _kill_mid_stream(proc: subprocess.Popen[bytes], port: int, low: int, high: int) -> float:
    """SIGKILL once the stage consumed between ``low`` and ``high`` comparisons."""
    deadline = time.monotonic() + 90
    consumed = 0.0
    while time.monotonic() < deadline:
        consumed = _scrape(port, 'sidecar_outcomes_records_total{input="comparisons"}')
        if consumed >= low:
            break
        await asyncio.sleep(0.05)
    try:
        children = _children(proc.pid)  # its decode helper (and multiprocessing's tracker)
        assert children, "the stage runs its decode helper process"
    finally:  # killed whatever happens: a failing check must not leave the stage running
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert low <= consumed < high, f"killed after {consumed} comparisons: not mid-stream"
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    left = [c for c in children if Path(f"/proc/{c}").exists()]
    assert not left, f"helper processes {left} outlived their SIGKILLed stage"
    return consumed


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:  # a thread may end between the listing and the read
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


async def test_a_fetched_poll_not_yet_applied_holds_the_inputs_back_from_their_end(
    bootstrap: str, tmp_path: Path
) -> None:
    """Polls are pipelined (the next one fetched while the last is written and applied): while
    a task has a fetched poll not applied, its comparisons do not count as read to their end
    (that would let stream time run on the wall clock past records still in hand)."""
    cfg = outcomes_config(bootstrap, tmp_path / "state", outcomes={"max_batch": 500})
    await create_topics(cfg)
    s = stream(2000, seed=5)
    await feed(cfg, s)
    service = OutcomesService(cfg)
    task = asyncio.create_task(service.run())
    topic = cfg.topics.comparisons
    try:
        deadline = time.monotonic() + 60
        while service.applied.comparisons < len(s.ids) and time.monotonic() < deadline:
            assert not task.done()
            await asyncio.sleep(0.1)
        assert service.applied.comparisons == len(s.ids)
        (p,) = [p for p, rt in service.tasks.items() if rt.join and rt.join.meta.stored]
        read: list[bool] = []
        while not any(read) and time.monotonic() < deadline:
            read.append(await service._read_to_end(p, topic))
            await asyncio.sleep(0.05)
        assert read[-1], "the task's comparisons were never read to their end"
        service._unapplied[p] += 1  # as the loop counts a poll it fetched for the task
        try:
            assert not await service._read_to_end(p, topic)
        finally:
            service._unapplied[p] -= 1
        assert await service._read_to_end(p, topic)
    finally:
        service.request_stop()
        await task


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_and_double_counts_nothing(
    bootstrap: str, tmp_path: Path, free_port: int
) -> None:
    """Two SIGKILLs mid-stream: a restart that finds its store replays the changelog's tail; a
    restart without it (the store wiped) replays the whole changelog. Every request of the
    stream ends in exactly one final window, and the verdict counts each one once."""
    state = tmp_path / "state"
    cfg = outcomes_config(
        bootstrap,
        state,
        outcomes={"metrics_port": free_port, "max_batch": 2000, "decode_processes": 1},
    )
    await create_topics(cfg)
    n = 150_000
    s = stream(n, seed=9, span_ms=30_000, t0=time.time_ns() // 1_000_000 - 90_000)
    await feed(cfg, s)
    config = write_toml(cfg, tmp_path / "sidecar.toml")
    log = tmp_path / "outcomes.log"
    killed = [await _kill_mid_stream(_spawn(config, log), free_port, 20_000, n)]
    killed.append(await _kill_mid_stream(_spawn(config, log), free_port, 10_000, n))
    shutil.rmtree(state)  # and the second restart finds no store at all
    proc = _spawn(config, log)
    try:
        verdicts: list[QualityVerdict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            verdicts = [
                msgspec.json.decode(r.value, type=QualityVerdict)
                for r in await read_topic(bootstrap, cfg.outcomes.verdicts_topic, idle_s=1)
            ]
            if verdicts and max(v.judged_pairs for v in verdicts) >= n:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    reports = [
        msgspec.json.decode(r.value, type=QualityReport)
        for r in await read_topic(bootstrap, cfg.outcomes.quality_topic, idle_s=1)
    ]
    finals = final_reports(reports)
    assert sum(r.counts.requests for r in finals.values()) == n
    assert sum(r.counts.labelled for r in finals.values()) == len(s.labelled)
    assert sum(r.counts.positives for r in finals.values()) == int(s.y.sum())
    last = verdicts[-1]  # a rollout's verdicts are on one partition, in order
    assert [v.judged_pairs for v in verdicts] == sorted(v.judged_pairs for v in verdicts)
    assert (last.judged_pairs, last.labelled) == (n, len(s.labelled))
    duplicated = len([r for r in reports if r.status == "final"]) - len(finals)
    print(
        f"\nSIGKILL x2 after {killed} comparisons: {n} requests counted once; "
        f"{duplicated} final report(s) published twice (at-least-once)"
    )


async def test_a_worse_candidate_is_rolled_back_by_a_quality_guard(
    bootstrap: str, tmp_path: Path
) -> None:
    keys = write_key_set(tmp_path / "keys")
    rule = {
        "name": "quality_cost",
        "figure": "cost_diff",
        "threshold": 0.0,
        "bound": "lo",
        "min_pairs": 500,
        "consecutive": 1,
        "action": "rollback",
    }
    cfg = outcomes_config(
        bootstrap,
        tmp_path / "state",
        control={"trust_file": str(keys.trust_file)},
        outcomes={
            "signing_key_file": str(keys.guard),
            "control_verdicts": True,
            "rules": [rule],
            "quality": {"label_window_ms": 3000, "missing": "negative", "fn_cost": 20.0},
        },
    )
    await create_topics(cfg)
    # The candidate's scores are mostly noise: it misses frauds (each costs 20). Windows aligned
    # to the stream, so which windows breach does not depend on the wall clock.
    t0 = (time.time_ns() // 1_000_000 - 40_000) // 2000 * 2000
    s = stream(8000, seed=5, candidate_noise=4.0, t0=t0)
    await feed(cfg, s)
    service = OutcomesService(cfg)
    await run_until(service, lambda: bool(service.commands) and bool(service.verdict_commands))
    (cmd,) = list(service.commands)
    assert cmd.action == "rollback" and cmd.issued_by == "dev-guard"  # the key's holder
    assert cmd.command_id.startswith(f"guard:{ROLLOUT}:quality_cost:")
    assert "cost_diff.lo=" in cmd.reason and "label coverage" in cmd.reason
    records = await read_topic(bootstrap, cfg.topics.control, idle_s=1)
    published = [msgspec.json.decode(r.value, type=ControlCommand) for r in records]
    trust = TrustStore.from_file(keys.trust_file)
    for c in published:  # every one signed with the stage's guard key
        verify_command(c, trust, c.issued_at_ms)
    assert [c.command_id for c in published if c.action == "rollback"] == [cmd.command_id]
    # The quality gate goes to the control plane too (control.promote_gate = "quality"):
    # about the models, so no expected epoch; here it says the candidate is not good enough.
    quality = [c for c in published if c.action == "verdict"]
    assert quality and all(c.expected_epoch is None for c in quality)
    last = quality[-1].args.verdict
    assert last is not None and last.quality_ok is False and last.guards_ok is None
    assert not service.verdicts[ROLLOUT].gate.ok


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
