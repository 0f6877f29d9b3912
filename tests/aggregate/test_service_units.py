"""The pure parts of the aggregator's Kafka edge: commands, evidence, commit points, settings,
decoding, replay bounds and the replayer."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import pytest
from agg_support import comparisons
from aiokafka.errors import MessageSizeTooLargeError, NotLeaderForPartitionError

from sidecar.aggregate import GuardEngine, GuardEvent, GuardRule, WindowManager, default_rules
from sidecar.aggregate.actions import (
    VerdictPacer,
    command_id,
    command_reason,
    commanding,
    commit_points,
    guard_command,
    guard_verdict,
    is_guard_command,
)
from sidecar.aggregate.admission import Admission
from sidecar.aggregate.batch import GroupKey
from sidecar.aggregate.ingest import ingest
from sidecar.aggregate.replay import Bound, Replayer, check_range, format_result, parse_bound
from sidecar.aggregate.report import WindowReport
from sidecar.aggregate.service import AggregatorService, _Send, signing_key
from sidecar.aggregate.settings import AggregateSettings
from sidecar.config import config_from_dict, load_config
from sidecar.control import (
    ControlCommand,
    SigningKey,
    TrustStore,
    sign_command,
    verify_command,
)
from sidecar.control.keys import write_key_set
from sidecar.errors import ConfigError
from sidecar.kafka import ProduceRefused

MODELS = {"champion": {"name": "m", "version": "1.0.0", "target": "x:y", "features": []}}


def now_ms() -> int:
    """The live service's clock (event times of records it reads as current)."""
    return time.time_ns() // 1_000_000


class Rec(NamedTuple):
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


def records(comps: list[object], partition: int = 0, first: int = 0) -> list[Rec]:
    return [Rec(partition, first + i, msgspec.json.encode(c)) for i, c in enumerate(comps)]


def fired_events(settings: AggregateSettings, bad_from_window: int = 2) -> list[GuardEvent]:
    rng = np.random.default_rng(3)
    replayer = Replayer(settings)
    offset = 0
    for w in range(6):
        ct = 0.8 if w >= bad_from_window else 0.9  # candidate flags 2x from that window on
        comps = comparisons(rng, 1000, t0=w * 1000, threshold=0.9, candidate_threshold=ct)
        replayer.feed(records(list(comps), first=offset))
        offset += 1000
    return [e for e in replayer.finish().events if e.kind == "fired"]


SETTINGS = AggregateSettings(window_ms=1000, allowed_lateness_ms=0, min_pairs=200)


def test_replayer_fires_the_ratio_rule_once_with_a_deterministic_command() -> None:
    events = fired_events(SETTINGS)
    ratio = [e for e in events if e.rule.name == "decision_rate_ratio"]
    assert len(ratio) == 1
    event = ratio[0]
    assert event.window_start_ms == 3000
    assert command_id(event) == "guard:fraud-v2:decision_rate_ratio:3000"
    again = fired_events(SETTINGS)
    assert [command_id(e) for e in again] == [command_id(e) for e in events]


def test_guard_command_reason_carries_evidence_and_fits() -> None:
    event = next(e for e in fired_events(SETTINGS) if e.rule.action == "rollback")
    cmd = guard_command(event, "a-very-long-topic-name." * 8 + "comparisons", 123)
    assert cmd.action == "rollback" and cmd.issued_by == "aggregator" and cmd.issued_at_ms == 123
    assert len(cmd.reason) <= 256 and "decision_rate_ratio" in cmd.reason
    short = command_reason(event, "cmp")
    assert "evidence cmp[0@3000-3999]" in short
    assert "window 1970-01-01 00:00:03-00:00:04 UTC" in short, "windows are UTC times"
    guard = SigningKey.generate("agg", "guard")
    signed = sign_command(cmd, guard)
    verify_command(signed, TrustStore([guard.trusted()]), 123)  # a guard may roll back


def test_a_pause_is_a_compare_and_set_on_the_breaching_epoch_and_a_rollback_is_not() -> None:
    event = next(e for e in fired_events(SETTINGS) if e.rule.action == "rollback")
    assert event.policy_epoch == 1 and event.policy_mode == "shadow"  # from the comparisons
    assert guard_command(event, "cmp", 0).expected_epoch is None
    pause = msgspec.structs.replace(
        event, rule=msgspec.structs.replace(event.rule, action="pause"), policy_epoch=41
    )
    cmd = guard_command(pause, "cmp", 0)
    assert cmd.action == "pause" and cmd.expected_epoch == 41
    guard = SigningKey.generate("agg", "guard")
    verify_command(sign_command(cmd, guard), TrustStore([guard.trusted()]), cmd.issued_at_ms)
    assert commanding([pause, event]) == [event]  # the rollback covers the pause
    second = msgspec.structs.replace(pause, rule=msgspec.structs.replace(pause.rule, name="b"))
    assert commanding([pause, second]) == [pause]  # one pause per window
    cleared = msgspec.structs.replace(event, kind="cleared")
    assert commanding([cleared]) == []


def test_alert_events_are_not_commands() -> None:
    rule = GuardRule(name="a", figure="decision_rate_ratio", threshold=1.2, action="alert")
    events = fired_events(AggregateSettings(window_ms=1000, allowed_lateness_ms=0, rules=[rule]))
    assert events
    with pytest.raises(ValueError, match="does not issue a command"):
        guard_command(events[0], "cmp", 0)


def test_commit_points_never_pass_an_open_window() -> None:
    assert commit_points({0: 100, 1: 50, 2: 7}, {0: 40, 1: 60}) == {0: 40, 1: 50, 2: 7}


def test_ingest_skips_and_counts_bad_records_but_consumes_them() -> None:
    rng = np.random.default_rng(0)
    recs = records(list(comparisons(rng, 5)), partition=2, first=10)
    recs.insert(2, Rec(2, 99, b"not json"))
    recs.append(Rec(1, 4, None))
    got = ingest(recs)
    assert got.undecodable == 2 and len(got.batch) == 5
    assert got.next_offsets == {2: 100, 1: 5}
    assert got.batch.offset.tolist() == [10, 11, 12, 13, 14]


class FlakyProducer:
    """Stands in for aiokafka's producer: refuses chosen (topic, attempt) sends once."""

    def __init__(self, failures: dict[int, Exception]) -> None:
        self.failures = failures  # send number -> error its future fails with
        self.sent: list[tuple[str, bytes | None]] = []

    async def send(self, topic: str, value: bytes | None, **_: object) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        error = self.failures.pop(len(self.sent), None)
        self.sent.append((topic, value))
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
        return fut


def service_with(producer: FlakyProducer) -> AggregatorService:
    cfg = config_from_dict({"models": MODELS, "aggregate": {"dry_run": True}})
    service = AggregatorService(cfg)
    service._producer = producer  # type: ignore[assignment]
    return service


async def test_records_refused_with_a_retriable_error_are_sent_again() -> None:
    producer = FlakyProducer({1: NotLeaderForPartitionError()})
    sends = [_Send("t", b"a", None), _Send("t", b"b", None), _Send("t", b"c", None)]
    await service_with(producer)._send_all(sends)
    assert producer.sent == [("t", b"a"), ("t", b"b"), ("t", b"c"), ("t", b"b")]


async def test_a_non_retriable_refusal_stops_instead_of_looping() -> None:
    producer = FlakyProducer({0: MessageSizeTooLargeError()})
    with pytest.raises(ProduceRefused, match=r"max\.message\.bytes") as refused:
        await service_with(producer)._send_all([_Send("t", b"a", None)])
    assert isinstance(refused.value.__cause__, MessageSizeTooLargeError)
    assert len(producer.sent) == 1


def test_settings_from_toml_and_env(tmp_path: object) -> None:
    cfg = config_from_dict(
        {
            "models": MODELS,
            "aggregate": {
                "window_ms": 2000,
                "rules": [{"name": "p", "figure": "psi_candidate_vs_champion", "threshold": 0.3}],
            },
        }
    )
    assert cfg.aggregate.window_ms == 2000 and cfg.aggregate.reports_topic == "inference.reports"
    assert cfg.aggregate.aggregator_config().window_ms == 2000
    assert "inference.reports" in cfg.all_topics()
    assert config_from_dict({"models": MODELS}).aggregate.rules == default_rules()
    env = {"SIDECAR_MODELS__CHAMPION__NAME": "m", "SIDECAR_AGGREGATE__DRY_RUN": "true"}
    with pytest.raises(ConfigError):  # champion needs more than a name: env alone is not enough
        load_config(None, env)
    with pytest.raises(ConfigError, match="hop_ms"):
        config_from_dict({"models": MODELS, "aggregate": {"window_ms": 10, "hop_ms": 20}})
    with pytest.raises(ConfigError, match="unknown figure"):
        config_from_dict(
            {
                "models": MODELS,
                "aggregate": {"rules": [{"name": "x", "figure": "no", "threshold": 1}]},
            }
        )


def test_signing_key_says_what_to_set(tmp_path: Path) -> None:
    cfg = config_from_dict({"models": MODELS})
    with pytest.raises(ConfigError, match=r"aggregate\.signing_key_file"):
        signing_key(cfg, None)
    keys = write_key_set(tmp_path / "keys")
    sidecar_key = config_from_dict(
        {"models": MODELS, "aggregate": {"signing_key_file": str(keys.sidecar)}}
    )
    with pytest.raises(ConfigError, match="role sidecar"):
        signing_key(sidecar_key, None)
    guard = config_from_dict({"models": MODELS, "aggregate": {"signing_key_file": str(keys.guard)}})
    key = signing_key(guard, None)
    assert key is not None and key.role == "guard"
    dry = config_from_dict({"models": MODELS, "aggregate": {"dry_run": True}})
    assert signing_key(dry, None) is None


@pytest.mark.parametrize(
    ("text", "bound"),
    [
        ("offset:12", Bound("offset", 12)),
        ("1718000000000", Bound("time", 1718000000000)),
        ("2024-06-10T06:13:20Z", Bound("time", 1718000000000)),
        ("2024-06-10T06:13:20", Bound("time", 1718000000000)),
        ("2024-06-10T08:13:20+02:00", Bound("time", 1718000000000)),
    ],
)
def test_parse_bound(text: str, bound: Bound) -> None:
    assert parse_bound(text) == bound


@pytest.mark.parametrize("text", ["offset:", "offset:-1", "yesterday", "12:00:00x"])
def test_parse_bound_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="offset"):
        parse_bound(text)


def test_check_range() -> None:
    check_range(Bound("offset", 1), Bound("time", 0))  # different kinds: not comparable
    with pytest.raises(ValueError, match="empty range"):
        check_range(Bound("time", 5), Bound("time", 5))


def test_format_result_lists_firings_and_windows() -> None:
    replayer = Replayer(SETTINGS)
    rng = np.random.default_rng(1)
    for w in range(4):
        comps = comparisons(rng, 1000, t0=w * 1000, threshold=0.9, candidate_threshold=0.8)
        replayer.feed(records(list(comps), first=w * 1000))
    text = format_result(replayer.finish())
    assert "decision_rate_ratio" in text and "guard:fraud-v2:decision_rate_ratio:1000" in text
    assert "nothing was published" in text and "*" in text  # the last window is partial
    assert "shadow@1" in text and "err_excess" in text  # the policy each window ran under


def test_window_manager_open_first_offsets() -> None:
    mgr = WindowManager(SETTINGS.aggregator_config())
    rng = np.random.default_rng(2)
    comps = comparisons(rng, 1500, t0=0, spacing_ms=1)
    mgr.process(ingest(records(list(comps), partition=3, first=100)).batch, 0)
    assert mgr.open_first_offsets() == {3: 1100}  # window [1000, 2000) starts at offset 1100
    assert GuardEngine().active("fraud-v2") == []


def _reports(bad_from_window: int = 99) -> list[WindowReport]:
    rng = np.random.default_rng(3)
    replayer = Replayer(SETTINGS)
    for w in range(4):
        ct = 0.8 if w >= bad_from_window else 0.9
        comps = comparisons(rng, 1000, t0=w * 1000, threshold=0.9, candidate_threshold=ct)
        replayer.feed(records(list(comps), first=w * 1000))
    return list(replayer.finish().reports)


def test_a_window_gives_a_guard_verdict_bound_to_its_epoch() -> None:
    report = _reports()[0]
    go = guard_verdict(report, [], 200, issued_at_ms=5)
    assert go is not None and go.action == "verdict" and go.expected_epoch == 1
    assert go.args.verdict is not None and go.args.verdict.guards_ok is True
    assert go.args.verdict.quality_ok is None
    assert go.args.verdict.window_end_ms == report.window_end_ms
    assert go.command_id == f"guard-verdict:fraud-v2:1:{report.window_end_ms}"
    assert not is_guard_command(go)  # not a rollback or pause (the report's timeline)
    stop = guard_verdict(report, ["decision_rate_ratio"], 200, issued_at_ms=5)
    assert stop is not None and stop.args.verdict is not None
    assert (
        stop.args.verdict.guards_ok is False and "decision_rate_ratio" in stop.args.verdict.detail
    )
    guard = SigningKey.generate("agg", "guard")
    verify_command(sign_command(go, guard), TrustStore([guard.trusted()]), 5)  # a guard may
    # Too little data, no epoch (an older sidecar's comparisons), a mode nothing follows: none.
    assert guard_verdict(report, [], report.counts.records + 1, issued_at_ms=5) is None
    for change in ({"policy_epoch_max": None}, {"policy_mode": "rolled_back"}):
        assert guard_verdict(msgspec.structs.replace(report, **change), [], 1, 5) is None


def test_verdicts_are_paced_but_a_change_or_a_new_epoch_goes_out_at_once() -> None:
    report = _reports()[0]
    pacer = VerdictPacer(interval_ms=60_000)

    def v(ok: bool, epoch: int = 1) -> ControlCommand:
        cmd = guard_verdict(
            msgspec.structs.replace(report, policy_epoch_max=epoch), [] if ok else ["r"], 1, 0
        )
        assert cmd is not None
        return cmd

    assert pacer.due(v(True), 0)
    assert not pacer.due(v(True), 30_000)  # the same again: quiet
    assert pacer.due(v(False), 31_000)  # changed
    assert pacer.due(v(False, epoch=2), 32_000)  # a new step
    assert not pacer.due(v(False, epoch=2), 91_999)
    assert pacer.due(v(False, epoch=2), 92_000)  # refreshed once a minute


async def test_made_up_rollout_names_are_dead_lettered_not_kept_for_ever() -> None:
    """Every made-up rollout (or version) on the comparisons topic used to become window
    keys, references, guard state and a few dozen Prometheus series, for the life of the
    process. Beyond ``aggregate.max_rollouts``/``max_rollout_pairs`` such records are refused
    with a reason (dead letters), and the real rollout's windows count exactly its own
    records."""
    max_rollouts, max_groups = 16, 256
    cfg = config_from_dict(
        {
            "models": MODELS,
            "rollout": {"name": "fraud-v2"},
            "aggregate": {
                "dry_run": True,
                "window_ms": 1_000,
                "allowed_lateness_ms": 0,
                "max_rollouts": max_rollouts,
                "max_rollout_pairs": max_groups,
            },
        }
    )
    service = AggregatorService(cfg)
    rng = np.random.default_rng(4)
    offset = 0
    start = now_ms() - 10_000
    for w in range(6):
        t0 = start + w * 1_000
        comps: list[object] = list(comparisons(rng, 50, t0=t0, id_prefix=f"w{w}-"))
        for i in range(60):  # 60 new rollouts and 60 new versions of the real one, per window
            fake = comparisons(rng, 1, t0=t0, rollout=f"fake-{w}-{i}", id_prefix=f"f{w}")
            version = comparisons(rng, 1, t0=t0, candidate_version=f"9.{w}.{i}")
            comps += [*fake, *version]
        recs = records(comps, first=offset)
        offset += len(recs)
        if w == 0:
            got = service._admitted(ingest(recs))
            kinds = {kind for _, kind, _ in got.rejected}
            assert kinds == {"out_of_range"} and "made-up rollout names" in got.rejected[0][2]
            assert len(got.records) < len(recs)
            service = AggregatorService(cfg)  # the check above took some pairs: start afresh
        await service.process(recs)
    rollouts = {k.rollout for k in service.manager._key_list}
    assert len(rollouts) <= max_rollouts and len(service.manager._key_list) <= max_groups
    series = {
        s.labels["rollout"]
        for metric in service.metrics.registry.collect()
        for s in metric.samples
        if "rollout" in s.labels
    }
    assert "fraud-v2" in series and len(series) <= max_rollouts
    assert service.admission.refused >= 6 * 120 - max_groups
    real = [r for r in service.reports if r.rollout == "fraud-v2" and r.candidate.version == "2"]
    assert [r.counts.records for r in real] == [50] * len(real) and len(real) >= 4


def test_the_configured_rollout_keeps_its_slot_whatever_came_first() -> None:
    admission = Admission("fraud-v2", max_rollouts=4, max_groups=8)

    def key(rollout: str, version: str = "2") -> GroupKey:
        return GroupKey(rollout, "m", "1", "m", version)

    assert [admission.admit(key(f"fake-{i}")) for i in range(5)] == [True] * 3 + [False] * 2
    assert [admission.admit(key("fake-0", str(v))) for v in range(3, 7)] == [True] * 3 + [False]
    assert admission.admit(key("fraud-v2")) and admission.admit(key("fraud-v2", "3"))
    assert not admission.admit(key("fraud-v2", "4"))  # every pair taken now
    assert admission.admit(key("fake-1"))  # a pair taken already stays taken


def test_the_configured_pair_is_taken_after_a_flood_of_made_up_versions() -> None:
    """Made-up versions of the configured rollout (anyone who can write the comparisons
    topic) took every pair slot, so the pair the config runs was refused for the aggregator's
    life when it came after them (a new candidate deployed later): its guards were blind."""
    cfg = config_from_dict(
        {
            "models": {
                **MODELS,
                "candidate": {"name": "m", "version": "2.0.0", "target": "x:y", "features": []},
            },
            "rollout": {"name": "fraud-v2"},
            "aggregate": {"dry_run": True, "max_rollout_pairs": 16},
        }
    )
    admission = AggregatorService(cfg).admission
    made_up = [GroupKey("fraud-v2", "m", "1.0.0", "m", f"9.9.{i}") for i in range(40)]
    assert sum(admission.admit(k) for k in made_up) == 16
    assert admission.admit(GroupKey("fraud-v2", "m", "1.0.0", "m", "2.0.0"))
    assert not admission.admit(GroupKey("fraud-v2", "m", "1.0.0", "m", "2.0.1"))


def test_windows_closed_for_capacity_are_never_the_configured_pair_s() -> None:
    """Over ``max_open_windows`` the oldest windows close early, and records of a window
    closed early are late. A thousand made-up pairs with a record each in the current window
    closed the real pair's window first (it opened first, the lowest key), so every real
    comparison after that of the window was dropped as late: guards blind for ~1,000 records
    a window."""
    model = {"name": "m", "target": "x:y", "features": []}
    cfg = config_from_dict(
        {
            "models": {
                "champion": {**model, "version": "1.0.0"},
                "candidate": {**model, "version": "2.0.0"},
            },
            "rollout": {"name": "fraud-v2"},
            "aggregate": {"dry_run": True, "max_open_windows": 10, "window_ms": 10_000},
        }
    )
    manager = AggregatorService(cfg)._new_manager()
    rng = np.random.default_rng(5)

    def semver(c: Any) -> Any:  # the config's versions are semver
        return msgspec.structs.replace(
            c, champion=msgspec.structs.replace(c.champion, version="1.0.0")
        )

    real = [semver(c) for c in comparisons(rng, 40, t0=1_000, candidate_version="2.0.0")]
    fakes = [
        semver(c)
        for i in range(10)  # one more window than may be open
        for c in comparisons(rng, 1, t0=1_000, id_prefix=f"f{i}-", candidate_version=f"9.{i}.0")
    ]
    manager.process(ingest(records([*real[:20], *fakes])).batch, 5_000)
    result = manager.process(ingest(records(list(real[20:]), first=100)).batch, 5_001)
    assert len(result.late_indices) == 0 and manager.late_total == {}
    (report,) = [r for r in manager.flush(5_002) if r.candidate.version == "2.0.0"]
    assert report.counts.records == 40


def test_a_comparison_dated_minutes_ahead_does_not_make_the_live_stream_late() -> None:
    """The live aggregator's windows close on event time bounded by its clock: a record dated
    280 s ahead (within max_future_ms, e.g. a request whose ``ts`` a producer set ahead) left
    every comparison of the next ~5 minutes late (not aggregated: guards blind)."""
    import time

    cfg = config_from_dict({"models": MODELS, "aggregate": {"dry_run": True, "window_ms": 10_000}})
    manager = AggregatorService(cfg)._new_manager()
    now = int(time.time() * 1000)
    rng = np.random.default_rng(3)
    manager.process(ingest(records(comparisons(rng, 1, t0=now + 280_000))).batch, now)
    live = comparisons(rng, 50, t0=now + 1_000, spacing_ms=10, id_prefix="live")
    live_batch = ingest(records(list(live), first=1)).batch
    result = manager.process(live_batch, now + 1_500)
    assert len(result.late_indices) == 0
    assert manager.late_total == {}


async def test_the_dead_letter_log_line_counts_each_kind(caplog: pytest.LogCaptureFixture) -> None:
    """One line per poll named the first record's reason for all of them: 1,062 records
    refused for made-up pairs and 11 undecodable ones read as 1,073 of whichever came first."""
    cfg = config_from_dict(
        {"models": MODELS, "rollout": {"name": "fraud-v2"}, "aggregate": {"dry_run": True}}
    )
    service = AggregatorService(cfg)
    service.admission.max_groups = 1
    rng = np.random.default_rng(6)
    comps: list[object] = [
        *comparisons(rng, 2, t0=now_ms()),
        *comparisons(rng, 3, t0=now_ms(), rollout="fake", id_prefix="f"),
    ]
    recs = [*records(comps), Rec(0, 99, b"{"), Rec(0, 100, b"[]")]
    with caplog.at_level(logging.WARNING, logger="sidecar.aggregate.service"):
        await service._apply(ingest(recs))
    (line,) = [r.getMessage() for r in caplog.records if "dead-lettering" in r.getMessage()]
    assert "dead-lettering 5 comparison records" in line
    assert "decode 2" in line and "out_of_range 3" in line


async def test_late_comparisons_dated_in_seconds_are_explained_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request ``ts`` in seconds reads as January 1970 in milliseconds: counted late for
    every window, the late count alone said nothing of why."""
    cfg = config_from_dict(
        {"models": MODELS, "rollout": {"name": "fraud-v2"}, "aggregate": {"dry_run": True}}
    )
    clock = [now_ms()]
    service = AggregatorService(cfg, clock=lambda: clock[0])
    rng = np.random.default_rng(8)
    current = list(comparisons(rng, 20, t0=clock[0] - 1_000))
    in_seconds = [
        msgspec.structs.replace(c, ts=c.ts // 1000)
        for c in comparisons(rng, 5, t0=clock[0], id_prefix="s")
    ]
    with caplog.at_level(logging.WARNING, logger="sidecar.aggregate.service"):
        await service.process(records(current))
        await service.process(records(in_seconds, first=20))
        clock[0] += 1_000
        await service.process(records(in_seconds, first=25))  # within the minute: not again
    lines = [r.getMessage() for r in caplog.records if "before 1973" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("5 late comparisons") and "in seconds" in lines[0]
