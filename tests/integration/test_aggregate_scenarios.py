"""The aggregator end to end through the broker: a bad candidate is rolled back by itself.

Most scenarios produce **synthetic** ``Comparison`` records with explicit event times straight
to the comparisons topic (fast and deterministic: 1 s windows of event time, no waiting on the
wall clock). Every scenario is its own rollout on one shared topic and one aggregator, which is
also the production shape (one rollout per partition key). One scenario runs a real in-process
``Sidecar`` with the flag-shifted fraud candidate and checks the sidecar itself rolls back.

Time to rollback is reported from the first bad record: in event time (end of the window that
fired minus the first bad ``ts``) and in wall time (first bad record produced -> command read
back from the control topic). Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from control_helpers import key_set
from kafka_helpers import create_topics, decode_values, make_config, read_topic, unique, wait_until

from sidecar.aggregate.report import WindowReport
from sidecar.aggregate.service import AggregatorService
from sidecar.config import SidecarConfig
from sidecar.contracts import Comparison, ModelError, ModelResult
from sidecar.control import ControlCommand, TrustStore, verify_command
from sidecar.kafka import ensure_control_topics
from sidecar.traffic import produce_values

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]


def keys_of(cfg: SidecarConfig) -> str:
    assert cfg.control.trust_file is not None
    return cfg.control.trust_file


WINDOW_MS = 1_000
PER_WINDOW = 1_500
GOOD_WINDOWS = 3
BAD_WINDOWS = 5
#: Champion score = sigmoid(A + B z); at THRESHOLD about 5.3% of requests are flagged.
A, B, THRESHOLD, RHO = -3.0, 1.0, 0.2, 0.9
#: Logit shift that doubles the candidate's flag rate at the same threshold (5.3% -> 10.6%).
SHIFT_2X = 0.366
IDENTICAL_SEEDS = 6
IDENTICAL_WINDOWS = 10


@dataclass(frozen=True)
class Scenario:
    rollout: str
    shift: float = 0.0
    errors: bool = False
    latency_scale: float = 1.0
    seed: int = 0
    windows: int = GOOD_WINDOWS + BAD_WINDOWS
    #: First bad window (None: the candidate never changes).
    change_window: int | None = GOOD_WINDOWS


SCENARIOS = [
    Scenario("flags-2x", shift=SHIFT_2X),
    Scenario("nan-errors", errors=True),
    Scenario("latency-3x", latency_scale=3.0),
    Scenario("shift-under", shift=0.08),
    *(
        Scenario(f"identical-{s}", seed=s, windows=IDENTICAL_WINDOWS, change_window=None)
        for s in range(IDENTICAL_SEEDS)
    ),
]


def closed_windows(sc: Scenario) -> int:
    """The watermark is shared by every partition: it ends just short of the last window of
    the longest scenario, so that window alone stays open."""
    return min(sc.windows, IDENTICAL_WINDOWS - 1)


def _sigmoid(x: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-x))


def window_comparisons(sc: Scenario, w: int, base_ms: int) -> list[Comparison]:
    """One event-time window of a scenario's comparisons (deterministic per scenario+window)."""
    rng = np.random.default_rng([sc.seed, w, len(sc.rollout)])
    n = PER_WINDOW
    bad = sc.change_window is not None and w >= sc.change_window
    z1 = rng.standard_normal(n)
    z2 = RHO * z1 + math.sqrt(1 - RHO**2) * rng.standard_normal(n)  # same marginal as z1
    s1 = _sigmoid(A + B * z1)
    s2 = _sigmoid(A + B * z2 + (sc.shift if bad else 0.0))
    # ~12 ms median, ~25 ms p99 (every record its own model call here).
    lat1 = rng.lognormal(2.5, 0.3, n)
    lat2 = rng.lognormal(2.5, 0.3, n) * (sc.latency_scale if bad else 1.0)
    t0 = base_ms + w * WINDOW_MS
    out = []
    for i in range(n):
        cand = ModelResult(
            model="fraud-lr",
            version="2.0.0",
            score=float(s2[i]),
            decision=bool(s2[i] > THRESHOLD),
            latency_ms=float(lat2[i]),
        )
        if bad and sc.errors:
            kind = "invalid_output" if i % 2 else "exception"
            cand = ModelResult(
                model="fraud-lr",
                version="2.0.0",
                latency_ms=float(lat2[i]),
                error=ModelError(kind=kind, message="score is NaN" if i % 2 else "boom"),
            )
        out.append(
            Comparison(
                request_id=f"{sc.rollout}-{w}-{i}",
                routing_key=None,
                rollout=sc.rollout,
                ts=t0 + (i * WINDOW_MS) // n,
                policy_epoch=0,
                policy_mode="shadow",
                served_by="champion",
                champion=ModelResult(
                    model="fraud-lr",
                    version="1.4.0",
                    score=float(s1[i]),
                    decision=bool(s1[i] > THRESHOLD),
                    latency_ms=float(lat1[i]),
                ),
                candidate=cand,
            )
        )
    return out


def aggregate_config(
    bootstrap: str, tmp_path: Path, *, base: SidecarConfig | None = None, **aggregate: Any
) -> SidecarConfig:
    keys = key_set(tmp_path)
    settings: dict[str, Any] = {
        "group_id": unique("agg"),
        "reports_topic": f"{unique('t')}.reports",
        "window_ms": WINDOW_MS,
        "allowed_lateness_ms": 100,
        "idle_timeout_ms": 1_500,
        "metrics_port": 0,
        "signing_key_file": str(keys.guard),
        "commit_interval_ms": 200,
    }
    settings.update(aggregate)
    cfg = make_config(
        bootstrap,
        rollout={"name": "flags-2x", "mode": "shadow", "canary_share_bp": 0},
        control={"trust_file": str(keys.trust_file), "allow_create_time": True},
        aggregate=settings,
    )
    if base is not None:  # same comparisons topic, everything else its own
        cfg = msgspec.structs.replace(
            cfg, topics=msgspec.structs.replace(cfg.topics, comparisons=base.topics.comparisons)
        )
    return cfg


async def setup_topics(cfg: SidecarConfig) -> None:
    await ensure_control_topics(cfg)
    await create_topics(cfg)


@contextlib.asynccontextmanager
async def running(service: AggregatorService) -> AsyncIterator[AggregatorService]:
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


@dataclass
class Tail:
    """Every control record as it arrives, with the monotonic time it was read."""

    records: list[tuple[float, ControlCommand]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def tail_control(cfg: SidecarConfig) -> AsyncIterator[Tail]:
    tail = Tail()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    tp = TopicPartition(cfg.topics.control, 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)

    async def loop() -> None:
        while True:
            batch = await consumer.getmany(tp, timeout_ms=100)
            for rec in batch.get(tp, []):
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    cmd = msgspec.json.decode(rec.value, type=ControlCommand)
                    tail.records.append((time.monotonic(), cmd))

    task = asyncio.create_task(loop())
    try:
        yield tail
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()


Items = list[tuple[bytes | None, bytes]]


def build_windows(base_ms: int) -> dict[int, Items]:
    """Encoded records per event-time window, every scenario at once (built before the clock
    starts, so wall times measure the pipeline, not the generator)."""
    return {
        w: [
            (sc.rollout.encode(), msgspec.json.encode(c))
            for sc in SCENARIOS
            if w < sc.windows
            for c in window_comparisons(sc, w, base_ms)
        ]
        for w in range(IDENTICAL_WINDOWS)
    }


async def produce_windows(
    producer: AIOKafkaProducer, cfg: SidecarConfig, items: dict[int, Items], windows: range
) -> None:
    """Window by window, so partitions progress together in event time."""
    for w in windows:
        await produce_values(producer, cfg.topics.comparisons, items[w])


@dataclass
class Outcome:
    cfg: SidecarConfig
    dry_cfg: SidecarConfig
    #: Rollbacks and pauses as read from the control topic (when read, what).
    commands: list[tuple[float, ControlCommand]]
    #: Guard verdicts read from the control topic.
    verdicts: list[ControlCommand]
    service: AggregatorService
    dry: AggregatorService
    reports: list[WindowReport]
    base_ms: int
    bad_produced_at: float
    trust: TrustStore


@pytest.fixture(scope="module")
async def outcome(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    tmp = tmp_path_factory.mktemp("agg")
    cfg = aggregate_config(bootstrap, tmp)
    dry_cfg = aggregate_config(bootstrap, tmp, base=cfg, dry_run=True)
    await setup_topics(cfg)
    await setup_topics(dry_cfg)
    # Event times a minute in the past: windows are driven by ts, not by the wall clock.
    base_ms = (time.time_ns() // 1_000_000 - 60_000) // WINDOW_MS * WINDOW_MS
    items = build_windows(base_ms)
    service, dry = AggregatorService(cfg), AggregatorService(dry_cfg)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        async with tail_control(cfg) as tail, running(service), running(dry):
            await produce_windows(producer, cfg, items, range(GOOD_WINDOWS))
            await wait_until(lambda: len(service.reports) >= len(SCENARIOS), 60)
            bad_at = time.monotonic()
            await produce_windows(producer, cfg, items, range(GOOD_WINDOWS, IDENTICAL_WINDOWS))
            total_closed = sum(closed_windows(sc) for sc in SCENARIOS)
            await wait_until(lambda: len(service.reports) >= total_closed, 60)
            await wait_until(lambda: len(dry.reports) >= total_closed, 60)
            expected = len(service.commands) + len(service.verdicts)
            await wait_until(lambda: len(tail.records) >= expected, 30)
            await asyncio.sleep(0.5)  # anything extra would show up now
            commands = [(t, c) for t, c in tail.records if c.action != "verdict"]
            verdicts = [c for _, c in tail.records if c.action == "verdict"]
    finally:
        await producer.stop()
    reports = decode_values(
        await read_topic(bootstrap, cfg.aggregate.reports_topic, idle_s=1.0), WindowReport
    )
    return Outcome(
        cfg,
        dry_cfg,
        commands,
        verdicts,
        service,
        dry,
        reports,
        base_ms,
        bad_at,
        TrustStore.from_file(keys_of(cfg)),
    )


def _commands_for(o: Outcome, rollout: str) -> list[tuple[float, ControlCommand]]:
    return [(t, c) for t, c in o.commands if c.rollout == rollout]


def test_guard_verdicts_say_go_on_benign_windows_and_stop_on_a_breach(o: Outcome) -> None:
    """Every verdict is signed by the guard key and bound to its window's epoch; identical
    candidates only ever get a go; a rollout whose pause rule is in breach gets a stop (its
    pause covers the window it fired in; the next window's verdict says stop)."""
    assert o.verdicts
    for c in o.verdicts:
        verify_command(c, o.trust, c.issued_at_ms)
        assert c.command_id.startswith(f"guard-verdict:{c.rollout}:{c.expected_epoch}:")
    said: dict[str, list[bool | None]] = {}
    for c in o.verdicts:
        assert c.args.verdict is not None
        said.setdefault(c.rollout, []).append(c.args.verdict.guards_ok)
    identical = [r for r in said if r.startswith("identical-")]
    assert identical and all(all(said[r]) for r in identical)
    assert said["latency-3x"][0] is True and False in said["latency-3x"]
    assert said["latency-3x"][said["latency-3x"].index(False) :].count(True) == 0


def _time_to_rollback(o: Outcome, rollout: str, cmd: ControlCommand, t_read: float) -> str:
    event = next(
        e
        for e in o.service.events
        if e.rollout == rollout
        and e.kind == "fired"
        and cmd.command_id.endswith(f":{e.rule.name}:{e.window_start_ms}")
    )
    first_bad = o.base_ms + GOOD_WINDOWS * WINDOW_MS
    event_ms = event.window_end_ms - first_bad
    wall_s = t_read - o.bad_produced_at
    line = (
        f"[{rollout}] {cmd.action} by {event.rule.name} ({event.value:.3g}): "
        f"{event_ms} ms of event time, {wall_s:.2f} s of wall time after the first bad record"
    )
    print(line)
    assert event_ms <= 2 * WINDOW_MS, line
    return line


@pytest.mark.slow
def test_flag_rate_doubling_rolls_back_within_two_windows_while_in_shadow(o: Outcome) -> None:
    cmds = _commands_for(o, "flags-2x")
    rollbacks = [(t, c) for t, c in cmds if c.action == "rollback"]
    assert len(rollbacks) == 1, [c.command_id for _, c in cmds]
    t, cmd = rollbacks[0]
    assert cmd.command_id == f"guard:flags-2x:decision_rate_ratio:{o.base_ms + 4 * WINDOW_MS}"
    assert cmd.issued_by == "dev-guard" and cmd.key_id == "dev-guard"
    verify_command(cmd, o.trust, cmd.issued_at_ms)  # a guard key: the instances accept it
    assert "decision_rate_ratio" in cmd.reason and f"{o.cfg.topics.comparisons}[" in cmd.reason
    assert len(cmd.reason) <= 256
    _time_to_rollback(o, "flags-2x", cmd, t)


def test_candidate_errors_roll_back(o: Outcome) -> None:
    rollbacks = [(t, c) for t, c in _commands_for(o, "nan-errors") if c.action == "rollback"]
    assert [c.command_id.split(":")[2] for _, c in rollbacks] == ["candidate_errors"]
    verify_command(rollbacks[0][1], o.trust, rollbacks[0][1].issued_at_ms)
    _time_to_rollback(o, "nan-errors", rollbacks[0][1], rollbacks[0][0])


def test_tripled_latency_fires_the_latency_guard(o: Outcome) -> None:
    cmds = _commands_for(o, "latency-3x")
    assert [(c.action, c.command_id.split(":")[2]) for _, c in cmds] == [
        ("pause", "latency_median")
    ]
    assert cmds[0][1].expected_epoch == 0  # the epoch of the breaching window's comparisons
    _time_to_rollback(o, "latency-3x", cmds[0][1], cmds[0][0])


def test_score_shift_under_every_threshold_does_nothing(o: Outcome) -> None:
    assert _commands_for(o, "shift-under") == []
    fired = [e for e in o.service.events if e.rollout == "shift-under"]
    assert fired == []
    ratios = [r.paired.decision_rate_ratio.value for r in o.reports if r.rollout == "shift-under"]
    assert ratios and all(x is not None and x < 1.5 for x in ratios), ratios


def test_identical_candidate_never_acts_false_alarm_rate(o: Outcome) -> None:
    rollouts = {f"identical-{s}" for s in range(IDENTICAL_SEEDS)}
    windows = [r for r in o.reports if r.rollout in rollouts]
    fired = [e for e in o.service.events if e.rollout in rollouts and e.kind == "fired"]
    evaluations = len(windows) * len(o.cfg.aggregate.rules)
    print(
        f"false alarms: {len(fired)} fired events over {len(windows)} windows x "
        f"{len(o.cfg.aggregate.rules)} rules ({IDENTICAL_SEEDS} seeds): "
        f"rate {len(fired) / max(evaluations, 1):.4f} per rule-window"
    )
    assert len(windows) == IDENTICAL_SEEDS * (IDENTICAL_WINDOWS - 1)  # the last stays open
    assert fired == []
    assert not any(c.rollout in rollouts for _, c in o.commands)


def test_one_command_per_breach_and_reports_on_the_topic(o: Outcome) -> None:
    ids = [c.command_id for _, c in o.commands]
    assert len(ids) == len(set(ids)) == 3, ids  # flags-2x, nan-errors, latency-3x; once each
    per_rollout: dict[str, int] = {}
    for r in o.reports:
        per_rollout[r.rollout] = per_rollout.get(r.rollout, 0) + 1
        assert [(p.first <= p.last) for p in r.offsets] == [True] * len(r.offsets)
    for sc in SCENARIOS:
        assert per_rollout[sc.rollout] == closed_windows(sc), (sc.rollout, per_rollout)
    bad = next(
        r
        for r in o.reports
        if r.rollout == "flags-2x" and r.window_start_ms == o.base_ms + GOOD_WINDOWS * WINDOW_MS
    )
    assert bad.counts.records == PER_WINDOW and bad.counts.late == 0
    assert bad.paired.decision_rate_ratio.value is not None
    assert 1.6 < bad.paired.decision_rate_ratio.value < 2.6


async def test_dry_run_publishes_nothing(o: Outcome, bootstrap: str) -> None:
    assert {c.command_id for c in o.dry.commands} == {c.command_id for _, c in o.commands}
    assert all(c.signature is None for c in o.dry.commands)
    for topic in (o.dry_cfg.topics.control, o.dry_cfg.aggregate.reports_topic):
        assert await read_topic(bootstrap, topic, idle_s=0.5) == [], topic


@pytest.fixture
def o(outcome: Outcome) -> Outcome:
    return outcome


# --------------------------------------------------------------------------- real sidecar


async def test_real_sidecar_with_flag_shifted_candidate_is_rolled_back(
    bootstrap: str, tmp_path: Path
) -> None:
    """Real comparisons: the fraud candidate (shifted +0.5 logit) at the champion's threshold
    flags ~3x as often; the aggregator's signed rollback reaches the sidecar's control plane."""
    from sidecar.runner import Sidecar
    from sidecar.traffic import produce_forever

    cfg = aggregate_config(
        bootstrap,
        tmp_path,
        idle_timeout_ms=500,
        rules=[
            {
                "name": "decision_rate_ratio",
                "figure": "decision_rate_ratio",
                "threshold": 1.5,
                "clear_threshold": 1.2,
                "min_pairs": 500,
                "consecutive": 2,
                "action": "rollback",
            },
            {
                # Paired: an unpaired error rate here rolled this healthy-but-shifted candidate
                # back on a loaded machine, where the first batches timed out on both arms.
                "name": "candidate_errors",
                "figure": "candidate_excess_error_rate",
                "threshold": 0.01,
                "min_pairs": 500,
                "consecutive": 2,
                "action": "rollback",
                "only_if": "candidate_error_calls",
                "only_if_above": 1.5,
            },
        ],
    )
    models = cfg.models
    assert models.candidate is not None
    candidate = msgspec.structs.replace(
        models.candidate, threshold=models.champion.threshold, options={"flag_shift": 0.5}
    )
    cfg = msgspec.structs.replace(cfg, models=msgspec.structs.replace(models, candidate=candidate))
    await setup_topics(cfg)
    plane = importlib.util.find_spec("sidecar.control.plane") is not None
    sidecar = Sidecar(cfg, instance_id="real-0")
    service = AggregatorService(cfg)
    side_task = asyncio.create_task(sidecar.run())
    traffic = None
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 30)
        async with running(service):
            started = time.monotonic()
            traffic = asyncio.create_task(produce_forever(cfg, rate=3000))
            await wait_until(lambda: bool(service.commands), 30)
            took = time.monotonic() - started
            cmd = service.commands[0]
            assert cmd.action == "rollback" and cmd.command_id.startswith(
                "guard:flags-2x:decision_rate_ratio:"
            )
            print(f"[real sidecar] rollback published {took:.2f} s after traffic started")
            if not plane:
                pytest.skip("sidecar.control.plane is absent: cannot check the sidecar applies it")
            from sidecar.routing import Mode

            await wait_until(lambda: sidecar.policy.current.mode is Mode.ROLLED_BACK, 10)
            print(
                f"[real sidecar] sidecar rolled_back {time.monotonic() - started:.2f} s after "
                "traffic started"
            )
            assert sidecar.policy.current.command_id == cmd.command_id
    finally:
        if traffic is not None:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        sidecar.request_stop()
        await asyncio.wait_for(side_task, 40)
        sidecar.close_models()


@pytest.mark.slow
async def test_a_re_entered_harmful_candidate_is_rolled_back_again(
    bootstrap: str, tmp_path: Path
) -> None:
    """A real sidecar in canary 10% with the flag-shifted candidate: the aggregator rolls it
    back; an operator puts the same candidate back into canary (a signed command, as
    ``sidecar ctl canary`` sends it); the aggregator rolls it back again, within two windows of
    the re-entry, whatever the first rollback left behind (streaks, activity, cool-down)."""
    from control_helpers import operator_key

    from sidecar.control import sign_command
    from sidecar.control.client import build_command, publish
    from sidecar.routing import Mode
    from sidecar.runner import Sidecar
    from sidecar.traffic import produce_forever

    ratio_rule = {
        "name": "decision_rate_ratio",
        "figure": "decision_rate_ratio",
        "threshold": 1.5,
        "clear_threshold": 1.2,
        "lower_threshold": 0.67,
        "min_pairs": 100,
        "consecutive": 2,
        "cooldown_s": 600,
        "action": "rollback",
    }
    cfg = aggregate_config(bootstrap, tmp_path, idle_timeout_ms=500, rules=[ratio_rule])
    models = cfg.models
    assert models.candidate is not None
    candidate = msgspec.structs.replace(
        models.candidate, threshold=models.champion.threshold, options={"flag_shift": 0.5}
    )
    cfg = msgspec.structs.replace(
        cfg,
        models=msgspec.structs.replace(models, candidate=candidate),
        rollout=msgspec.structs.replace(cfg.rollout, mode=Mode.CANARY, canary_share_bp=1_000),
    )
    await setup_topics(cfg)
    operator = operator_key(cfg)
    sidecar = Sidecar(cfg, instance_id="reentry-0")
    service = AggregatorService(cfg)
    side_task = asyncio.create_task(sidecar.run())
    traffic = None
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 30)
        async with running(service):
            traffic = asyncio.create_task(produce_forever(cfg, rate=3000))
            await wait_until(lambda: len(service.commands) >= 1, 30)
            await wait_until(lambda: sidecar.policy.current.mode is Mode.ROLLED_BACK, 10)
            rolled_back = sidecar.policy.current.epoch
            await asyncio.sleep(2 * WINDOW_MS / 1000)  # rolled back for a couple of windows
            assert len(service.commands) == 1  # nothing more while the champion decides
            canary = build_command(
                "canary", cfg.rollout.name, share_bp=1_000, expected_epoch=rolled_back
            )
            reentered_ms = await publish(cfg, sign_command(canary, operator))
            reentered = time.monotonic()
            await wait_until(lambda: sidecar.policy.current.mode is Mode.CANARY, 10)
            assert sidecar.policy.current.epoch == rolled_back + 1
            await wait_until(lambda: len(service.commands) >= 2, 30)
            took = time.monotonic() - reentered
            await wait_until(lambda: sidecar.policy.current.mode is Mode.ROLLED_BACK, 10)
    finally:
        if traffic is not None:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        sidecar.request_stop()
        await asyncio.wait_for(side_task, 40)
        sidecar.close_models()
    first, second = list(service.commands)[:2]
    assert first.action == second.action == "rollback"
    assert first.command_id != second.command_id
    fired = [e for e in service.events if e.kind == "fired"]
    assert [e.policy_mode for e in fired] == ["canary", "canary"]
    assert fired[1].policy_epoch == rolled_back + 1  # judged under the re-entry's epoch
    windows_after = (fired[1].window_end_ms - reentered_ms) / WINDOW_MS
    print(
        f"[re-entry] second rollback published {took:.2f} s after the operator's canary "
        f"command; its window ended {windows_after:.2f} windows after it"
    )
    # Within two windows of the re-entry, counted from the first window holding records the
    # sidecar decided under it (a command published in a window's last few milliseconds may
    # reach the sidecar in the next one: then the window it was published in is all rolled
    # back, and 2.04 windows pass between the command and the second rollback's window end).
    first = min(
        r.window_start_ms
        for r in service.reports
        if r.rollout == cfg.rollout.name and r.policy_epoch_max == rolled_back + 1
    )
    assert first <= reentered_ms + WINDOW_MS
    assert fired[1].window_end_ms <= first + 2 * WINDOW_MS
    assert sidecar.policy.current.command_id == second.command_id
