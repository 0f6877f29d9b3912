from __future__ import annotations

from typing import Any

import msgspec
import pytest
from ctl_support import KEYS, T0, CommandFactory, Keys, apply_at, command_factory, fixed_key
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sidecar.control import (
    ACTIONS,
    Applied,
    AuditRecord,
    CommandArgs,
    ControlCommand,
    ControlConfig,
    ControlRecord,
    Duplicate,
    Freshness,
    InstanceStatus,
    Noted,
    Outcome,
    RampStep,
    Rejected,
    RejectReason,
    RolloutState,
    TrustStore,
    Verdict,
    advance_command_id,
    apply,
    audit_record,
    encode_command,
    initial_state,
    instance_status,
    next_state,
    process_record,
    replay,
    tick,
    to_policy,
)
from sidecar.control.commands import OUTPUT_ACTIONS
from sidecar.routing import Mode, RoutingPolicy

R = RejectReason
CFG = ControlConfig(min_promoted_age_s=3600)
PLAN = [
    RampStep(share_bp=100, min_hold_s=60, min_samples=100),
    RampStep(share_bp=500, min_hold_s=120, min_samples=500),
    RampStep(share_bp=10_000, min_hold_s=300, min_samples=1000),
]


def ok(outcome: Outcome | None) -> RolloutState:
    assert isinstance(outcome, Applied), outcome
    assert outcome.to_epoch == outcome.from_epoch + 1 == outcome.new_state.epoch
    return outcome.new_state


def cmd_id(outcome: Outcome) -> str:
    assert outcome.command is not None
    return outcome.command.command_id


def refused(outcome: Outcome, reason: RejectReason) -> Rejected:
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason is reason, outcome
    assert outcome.detail
    return outcome


def build(name: str) -> RolloutState:
    """A rollout in the named situation, reached through real commands at T0."""
    c = command_factory("setup-")
    s = initial_state("r1", now_ms=T0)
    steps: dict[str, list[ControlCommand]] = {
        "shadow": [],
        "canary": [c("canary", share_bp=500)],
        "ramping": [c("ramp", plan=PLAN)],
        "paused": [c("ramp", plan=PLAN), c("pause")],
        "promoted": [c("promote")],
        "rolled_back": [c("canary", share_bp=500), c("rollback")],
        "retired": [c("promote"), c("retire", issued_at_ms=T0 + 3_600_000)],
    }
    for command in steps[name]:
        s = ok(apply_at(s, command, command.issued_at_ms, config=CFG))
    return s


# ------------------------------------------------------------------ transition table

A = dict[str, Any]
TABLE: list[tuple[str, str, A, RejectReason | tuple[Mode, int]]] = [
    # from shadow
    ("shadow", "shadow", {}, R.NO_CHANGE),
    ("shadow", "shadow", {"score_shadow_arm": False}, (Mode.SHADOW, 0)),
    ("shadow", "shadow", {"share_bp": 5}, R.INVALID_ARGS),
    ("shadow", "canary", {"share_bp": 500}, (Mode.CANARY, 500)),
    ("shadow", "canary", {"share_bp": 1}, (Mode.CANARY, 1)),
    ("shadow", "canary", {"share_bp": 10_000}, (Mode.CANARY, 10_000)),
    ("shadow", "canary", {"share_bp": 0}, R.INVALID_ARGS),
    ("shadow", "canary", {"share_bp": -1}, R.INVALID_ARGS),
    ("shadow", "canary", {"share_bp": 10_001}, R.INVALID_ARGS),
    ("shadow", "canary", {}, R.INVALID_ARGS),
    ("shadow", "canary", {"share_bp": 5, "plan": PLAN}, R.INVALID_ARGS),
    ("shadow", "ramp", {"plan": PLAN}, (Mode.CANARY, 100)),
    ("shadow", "ramp", {}, R.INVALID_ARGS),
    ("shadow", "ramp", {"plan": []}, R.INVALID_ARGS),
    ("shadow", "ramp", {"plan": [PLAN[1], PLAN[0]]}, R.INVALID_ARGS),
    ("shadow", "ramp", {"plan": [PLAN[0], PLAN[0]]}, R.INVALID_ARGS),
    (
        "shadow",
        "ramp",
        {"plan": [RampStep(share_bp=0, min_hold_s=1, min_samples=1)]},
        R.INVALID_ARGS,
    ),
    (
        "shadow",
        "ramp",
        {"plan": [RampStep(share_bp=10_001, min_hold_s=1, min_samples=1)]},
        R.INVALID_ARGS,
    ),
    (
        "shadow",
        "ramp",
        {"plan": [RampStep(share_bp=5, min_hold_s=-1, min_samples=1)]},
        R.INVALID_ARGS,
    ),
    (
        "shadow",
        "ramp",
        {"plan": [RampStep(share_bp=5, min_hold_s=1, min_samples=-1)]},
        R.INVALID_ARGS,
    ),
    ("shadow", "promote", {}, (Mode.PROMOTED, 10_000)),
    ("shadow", "rollback", {}, (Mode.ROLLED_BACK, 0)),
    ("shadow", "pause", {}, (Mode.SHADOW, 0)),  # a hold: frozen where it stands
    ("shadow", "resume", {}, R.ILLEGAL_TRANSITION),
    ("shadow", "retire", {}, R.ILLEGAL_TRANSITION),
    ("shadow", "advance", {"samples": 10**9, "expected_epoch": 0}, R.ILLEGAL_TRANSITION),
    # from canary 5%
    ("canary", "shadow", {}, (Mode.SHADOW, 0)),
    ("canary", "canary", {"share_bp": 500}, R.NO_CHANGE),
    ("canary", "canary", {"share_bp": 2000}, (Mode.CANARY, 2000)),
    ("canary", "canary", {"share_bp": 100}, (Mode.CANARY, 100)),
    ("canary", "ramp", {"plan": PLAN}, (Mode.CANARY, 100)),
    ("canary", "promote", {}, (Mode.PROMOTED, 10_000)),
    ("canary", "rollback", {}, (Mode.ROLLED_BACK, 0)),
    ("canary", "pause", {}, (Mode.CANARY, 500)),
    ("canary", "resume", {}, R.ILLEGAL_TRANSITION),
    ("canary", "retire", {}, R.ILLEGAL_TRANSITION),
    # from a running ramp (step 1 of 3, 1%)
    ("ramping", "pause", {}, (Mode.CANARY, 100)),
    ("ramping", "resume", {}, R.ILLEGAL_TRANSITION),
    ("ramping", "canary", {"share_bp": 2000}, (Mode.CANARY, 2000)),
    ("ramping", "canary", {"share_bp": 100}, (Mode.CANARY, 100)),  # cancels the ramp
    ("ramping", "shadow", {}, (Mode.SHADOW, 0)),
    ("ramping", "ramp", {"plan": PLAN[1:]}, (Mode.CANARY, 500)),
    ("ramping", "promote", {}, (Mode.PROMOTED, 10_000)),
    ("ramping", "rollback", {}, (Mode.ROLLED_BACK, 0)),
    ("ramping", "retire", {}, R.ILLEGAL_TRANSITION),
    ("ramping", "advance", {"samples": 10**9, "expected_epoch": 0}, R.EPOCH_CONFLICT),
    ("ramping", "pause", {"share_bp": 5}, R.INVALID_ARGS),
    # from a paused ramp
    ("paused", "pause", {}, R.NO_CHANGE),
    ("paused", "resume", {}, (Mode.CANARY, 100)),
    ("paused", "advance", {"samples": 10**9, "expected_epoch": 2}, R.ILLEGAL_TRANSITION),
    ("paused", "rollback", {}, (Mode.ROLLED_BACK, 0)),
    ("paused", "promote", {}, R.ILLEGAL_TRANSITION),  # held: resume first
    ("paused", "canary", {"share_bp": 300}, R.ILLEGAL_TRANSITION),
    ("paused", "shadow", {}, R.ILLEGAL_TRANSITION),
    ("paused", "ramp", {"plan": PLAN}, R.ILLEGAL_TRANSITION),
    # from promoted
    ("promoted", "shadow", {}, R.ILLEGAL_TRANSITION),
    ("promoted", "canary", {"share_bp": 500}, R.ILLEGAL_TRANSITION),
    ("promoted", "ramp", {"plan": PLAN}, R.ILLEGAL_TRANSITION),
    ("promoted", "promote", {}, R.ILLEGAL_TRANSITION),
    ("promoted", "rollback", {}, (Mode.ROLLED_BACK, 0)),
    ("promoted", "retire", {}, R.TOO_EARLY),
    ("promoted", "pause", {}, R.ILLEGAL_TRANSITION),
    ("promoted", "resume", {}, R.ILLEGAL_TRANSITION),
    ("promoted", "promote", {"score_shadow_arm": False}, R.ILLEGAL_TRANSITION),
    # from rolled back
    ("rolled_back", "shadow", {}, (Mode.SHADOW, 0)),
    ("rolled_back", "canary", {"share_bp": 100}, (Mode.CANARY, 100)),
    ("rolled_back", "ramp", {"plan": PLAN}, (Mode.CANARY, 100)),
    ("rolled_back", "promote", {}, R.ILLEGAL_TRANSITION),
    ("rolled_back", "rollback", {}, (Mode.ROLLED_BACK, 0)),  # the emergency button always works
    ("rolled_back", "pause", {}, R.ILLEGAL_TRANSITION),
    ("rolled_back", "retire", {}, R.ILLEGAL_TRANSITION),
]


@pytest.mark.parametrize(("start", "action", "kw", "expect"), TABLE)
def test_transition(
    cmd: CommandFactory,
    start: str,
    action: str,
    kw: A,
    expect: RejectReason | tuple[Mode, int],
) -> None:
    state = build(start)
    outcome = apply_at(state, cmd(action, **kw), T0 + 1, config=CFG)
    if isinstance(expect, RejectReason):
        refused(outcome, expect)
        return
    new = ok(outcome)
    assert (new.mode, new.share_bp) == expect
    assert new.last_command_id == cmd_id(outcome)
    assert new.since_ms == T0 + 1
    assert to_policy(new).candidate_share_bp == new.share_bp


@pytest.mark.parametrize("action", sorted(set(ACTIONS) - OUTPUT_ACTIONS))
def test_retired_rejects_everything(cmd: CommandFactory, action: str) -> None:
    # Output versions are exempt: their consumers still migrate after the old champion is
    # retired (tests/control/test_output_commands.py).
    refused(apply_at(build("retired"), cmd(action), T0 + 10**9, config=CFG), R.RETIRED)


@pytest.mark.parametrize(
    ("action", "kw", "reason"),
    [
        ("canary", {"share_bp": 500}, R.NO_CANDIDATE),
        ("ramp", {"plan": PLAN}, R.NO_CANDIDATE),
        ("promote", {}, R.NO_CANDIDATE),
        ("shadow", {}, R.NO_CHANGE),
    ],
)
def test_no_candidate(cmd: CommandFactory, action: str, kw: A, reason: RejectReason) -> None:
    state = initial_state("r1", has_candidate=False)
    refused(apply_at(state, cmd(action, **kw), T0), reason)
    assert ok(apply_at(state, cmd("rollback"), T0)).mode is Mode.ROLLED_BACK


def test_other_rollout(cmd: CommandFactory) -> None:
    refused(apply_at(build("shadow"), cmd("promote", rollout="r2"), T0), R.OTHER_ROLLOUT)


# ------------------------------------------------------------------ specific rules


def test_rollback_mid_ramp_cancels_ramp(cmd: CommandFactory) -> None:
    for start in ("ramping", "paused"):
        new = ok(apply_at(build(start), cmd("rollback"), T0 + 1))
        assert new.ramp is None and not new.paused
        assert to_policy(new).candidate_share_bp == 0


def test_manual_canary_cancels_ramp(cmd: CommandFactory) -> None:
    new = ok(apply_at(build("ramping"), cmd("canary", share_bp=100), T0 + 1))
    assert new.ramp is None and new.share_bp == 100


def test_pause_freezes_and_resume_restarts_step_clock(cmd: CommandFactory) -> None:
    paused = build("paused")
    assert paused.paused and paused.ramp is not None and paused.share_bp == 100
    assert tick(paused, T0 + 10**9, 10**9) is None
    resumed = ok(apply_at(paused, cmd("resume"), T0 + 50_000))
    assert not resumed.paused and resumed.ramp is not None
    assert resumed.ramp.step == 0
    assert resumed.ramp.step_started_ms == T0 + 50_000
    assert resumed.ramp.step_epoch == resumed.epoch


def test_retire_after_min_promoted_age(cmd: CommandFactory) -> None:
    promoted = build("promoted")
    assert promoted.promoted_since_ms == T0
    early = refused(apply_at(promoted, cmd("retire"), T0 + 3_599_999, config=CFG), R.TOO_EARLY)
    assert "3600s" in early.detail
    retired = ok(apply_at(promoted, cmd("retire"), T0 + 3_600_000, config=CFG))
    assert retired.retired and not retired.score_shadow_arm
    policy = to_policy(retired)
    assert policy.mode is Mode.PROMOTED and not policy.score_shadow_arm
    assert not policy.scores_champion


def test_rollback_clears_promoted_since(cmd: CommandFactory) -> None:
    rolled = ok(apply_at(build("promoted"), cmd("rollback"), T0 + 1))
    assert rolled.promoted_since_ms is None
    refused(apply_at(rolled, cmd("retire"), T0 + 10**9, config=CFG), R.ILLEGAL_TRANSITION)


def test_score_shadow_arm_carried(cmd: CommandFactory) -> None:
    s = ok(apply_at(build("shadow"), cmd("canary", share_bp=5, score_shadow_arm=False), T0))
    assert not s.score_shadow_arm
    s = ok(apply_at(s, cmd("canary", share_bp=6), T0))
    assert not s.score_shadow_arm  # kept unless a command changes it
    assert not to_policy(s).score_shadow_arm


# ------------------------------------------------------------------ epochs, CAS, idempotency


def test_epoch_increases_by_one_per_applied(cmd: CommandFactory) -> None:
    s = build("shadow")
    assert s.epoch == 0
    for i, c in enumerate(
        [
            cmd("canary", share_bp=5),
            cmd("canary", share_bp=5),
            cmd("ramp", plan=PLAN),
            cmd("pause"),
            cmd("resume"),
            cmd("rollback"),
        ]
    ):
        out = apply_at(s, c, T0 + i)
        if isinstance(out, Applied):
            assert out.from_epoch == s.epoch and out.to_epoch == s.epoch + 1
            s = out.new_state
    assert s.epoch == 5  # the second canary 5 was a no-op rejection


def test_every_command_but_rollback_is_bound_to_an_epoch(cmd: CommandFactory) -> None:
    s = ok(apply(build("shadow"), cmd("canary", share_bp=5, expected_epoch=0), T0))
    conflict = refused(apply(s, cmd("canary", share_bp=9, expected_epoch=0), T0), R.EPOCH_CONFLICT)
    assert "issued against epoch 0, the rollout is at 1" in conflict.detail
    missing = refused(apply(s, cmd("canary", share_bp=9), T0), R.INVALID_ARGS)
    assert "needs expected_epoch" in missing.detail
    refused(apply(s, cmd("rollback", expected_epoch=7), T0), R.EPOCH_CONFLICT)
    assert ok(apply(s, cmd("rollback"), T0)).mode is Mode.ROLLED_BACK  # always safe
    assert ok(apply(s, cmd("canary", share_bp=9, expected_epoch=1), T0)).share_bp == 9


def test_duplicate_command_id_is_ignored(cmd: CommandFactory) -> None:
    c = cmd("canary", share_bp=5, expected_epoch=0)
    s = ok(apply(build("shadow"), c, T0))
    again = apply(s, c, T0 + 5)
    assert isinstance(again, Duplicate) and again.command == c
    # Even a different payload under an applied id is a duplicate (ids are the idempotency key)
    assert isinstance(apply_at(s, msgspec.structs.replace(c, action="promote"), T0), Duplicate)
    # ... and even after the rollout moved on or retired.
    s2 = ok(apply_at(s, cmd("promote"), T0))
    s3 = ok(apply_at(s2, cmd("retire"), T0 + 10**8))
    assert isinstance(apply_at(s3, c, T0), Duplicate)


def test_a_refused_command_never_applies_later(cmd: CommandFactory) -> None:
    # An operator's canary 6% is refused (no change); the operator rolls back; replaying the
    # refused command's exact bytes must not undo the rollback.
    s = build("canary")
    c = cmd("canary", share_bp=500, expected_epoch=s.epoch)
    s = next_state(s, refused(apply(s, c, T0), R.NO_CHANGE))
    assert c.command_id in s.seen_ids
    s = ok(apply(s, cmd("rollback"), T0 + 1))
    replayed = refused(apply(s, msgspec.structs.replace(c, expected_epoch=s.epoch), T0), R.REPLAYED)
    assert "refused before" in replayed.detail
    assert next_state(s, replayed) == s


# ------------------------------------------------------------------ ramps


def ramp_at_step(n: int) -> RolloutState:
    s = build("ramping")
    t = T0
    for _ in range(n):
        assert s.ramp is not None
        t += 10**9
        s = ok(tick(s, t, 10**9))
    return s


def test_ramp_starts_at_first_step(cmd: CommandFactory) -> None:
    s = build("ramping")
    assert s.ramp is not None
    assert (s.mode, s.share_bp, s.ramp.step, s.paused) == (Mode.CANARY, 100, 0, False)
    assert s.ramp.step_started_ms == T0 and s.ramp.step_epoch == s.epoch == 1


@pytest.mark.parametrize(
    ("elapsed_ms", "samples", "guard_ok"),
    [
        (60_000, 99, True),  # hold met, samples short
        (59_999, 100, True),  # samples met, hold short
        (10**9, 10**9, False),  # a guard says stop
        (0, 0, True),
    ],
)
def test_tick_holds(elapsed_ms: int, samples: int, guard_ok: bool) -> None:
    s = build("ramping")
    if not guard_ok:
        s = msgspec.structs.replace(
            s, verdict=Verdict(guards_ok=False, window_end_ms=T0, detail="flag rate x2")
        )
    assert tick(s, T0 + elapsed_ms, samples) is None


def test_tick_advances_when_both_floors_met() -> None:
    s = build("ramping")
    applied = tick(s, T0 + 60_000, 100, issued_by="inst-1")
    new = ok(applied)
    assert new.ramp is not None
    assert (new.share_bp, new.ramp.step) == (500, 1)
    assert new.ramp.step_started_ms == T0 + 60_000 and new.ramp.step_epoch == new.epoch
    assert applied is not None
    c = applied.command
    assert c.action == "advance" and c.expected_epoch == s.epoch
    assert c.command_id == advance_command_id(s, "inst-1") == "advance:r1:1:inst-1:0"
    assert c.issued_by == "inst-1" and c.args.samples == 100


def test_tick_never_skips_a_step() -> None:
    s = build("ramping")
    shares = [s.share_bp]
    t = T0
    while s.ramp is not None:
        t += 10**10
        s = ok(tick(s, t, 10**12))
        shares.append(s.share_bp)
    assert shares == [100, 500, 10_000, 10_000]
    assert s.mode is Mode.PROMOTED and s.promoted_since_ms == t


def test_tick_floors_are_per_step() -> None:
    s = ramp_at_step(1)
    assert s.ramp is not None and s.ramp.step == 1
    started = s.ramp.step_started_ms
    assert tick(s, started + 119_999, 500) is None
    assert tick(s, started + 120_000, 499) is None
    assert ok(tick(s, started + 120_000, 500)).share_bp == 10_000


def test_last_step_at_full_share_promotes() -> None:
    s = ramp_at_step(2)
    assert s.ramp is not None and s.ramp.is_last and s.mode is Mode.CANARY
    done = ok(tick(s, s.ramp.step_started_ms + 300_000, 1000))
    assert done.mode is Mode.PROMOTED and done.ramp is None
    assert tick(done, T0 + 10**12, 10**9) is None


def test_last_step_below_full_share_ends_ramp_in_canary(cmd: CommandFactory) -> None:
    plan = [RampStep(share_bp=100, min_hold_s=0, min_samples=0)]
    s = ok(apply_at(build("shadow"), cmd("ramp", plan=plan), T0))
    done = ok(tick(s, T0, 0))
    assert (done.mode, done.share_bp, done.ramp) == (Mode.CANARY, 100, None)
    assert tick(done, T0 + 10**9, 10**9) is None


def test_tick_outside_ramp_is_none() -> None:
    for name in ("shadow", "canary", "paused", "promoted", "rolled_back", "retired"):
        assert tick(build(name), T0 + 10**12, 10**12) is None


def test_advance_command_rules(cmd: CommandFactory) -> None:
    s = build("ramping")
    refused(apply(s, cmd("advance", samples=100, expected_epoch=1), T0 + 59_999), R.TOO_EARLY)
    refused(apply(s, cmd("advance", samples=99, expected_epoch=1), T0 + 60_000), R.TOO_EARLY)
    refused(apply(s, cmd("advance", expected_epoch=1), T0 + 60_000), R.TOO_EARLY)
    refused(apply(s, cmd("advance", samples=100, expected_epoch=0), T0 + 60_000), R.EPOCH_CONFLICT)
    refused(apply(s, cmd("advance", samples=100), T0 + 60_000), R.INVALID_ARGS)
    assert ok(apply(s, cmd("advance", samples=100, expected_epoch=1), T0 + 60_000)).share_bp == 500


def test_concurrent_advances_apply_once() -> None:
    """Two instances decide to advance the same step: the first applies and moves the
    epoch, so the other's advance (issued against the old epoch) is an epoch conflict."""
    s = build("ramping")
    a = tick(s, T0 + 60_000, 100, issued_by="inst-a")
    b = tick(s, T0 + 61_000, 150, issued_by="inst-b")
    assert a is not None and b is not None
    assert a.command.command_id != b.command.command_id
    s1 = ok(apply_at(s, a.command, T0 + 60_000))
    refused(apply_at(s1, b.command, T0 + 61_000), R.EPOCH_CONFLICT)
    assert isinstance(apply_at(s1, a.command, T0 + 61_000), Duplicate)


def test_hold_boundary_agrees_between_tick_and_apply(cmd: CommandFactory) -> None:
    plan = [RampStep(share_bp=100, min_hold_s=0.29, min_samples=0), PLAN[2]]
    s = ok(apply_at(build("shadow"), cmd("ramp", plan=plan), T0))
    for dt in range(280, 300):
        t = tick(s, T0 + dt, 0)
        direct = apply_at(s, cmd("advance", samples=0, expected_epoch=s.epoch), T0 + dt)
        assert (t is None) == isinstance(direct, Rejected)


# ------------------------------------------------------------------ policy


@pytest.mark.parametrize(
    ("name", "mode", "canary_bp", "candidate_bp"),
    [
        ("shadow", Mode.SHADOW, 0, 0),
        ("canary", Mode.CANARY, 500, 500),
        ("ramping", Mode.CANARY, 100, 100),
        ("promoted", Mode.PROMOTED, 0, 10_000),
        ("rolled_back", Mode.ROLLED_BACK, 0, 0),
    ],
)
def test_to_policy(name: str, mode: Mode, canary_bp: int, candidate_bp: int) -> None:
    s = build(name)
    policy = to_policy(s)
    assert policy == RoutingPolicy(
        rollout="r1",
        mode=mode,
        canary_share_bp=canary_bp,
        epoch=s.epoch,
        score_shadow_arm=True,
        command_id=s.last_command_id,
        since_ms=s.since_ms,
    )
    assert policy.candidate_share_bp == candidate_bp


def test_initial_state() -> None:
    s = initial_state("r1", mode=Mode.PROMOTED, now_ms=5)
    assert (s.share_bp, s.promoted_since_ms, s.epoch) == (10_000, 5, 0)
    assert to_policy(s) == RoutingPolicy(rollout="r1", mode=Mode.PROMOTED, since_ms=5)
    with pytest.raises(ValueError, match="canary share"):
        initial_state("r1", mode=Mode.CANARY)
    assert initial_state("r1", mode=Mode.CANARY, share_bp=7).share_bp == 7
    with pytest.raises(ValueError, match="without a candidate"):
        initial_state("r1", mode=Mode.PROMOTED, has_candidate=False)


# ------------------------------------------------------------------ records and replay


def signed_history(keys: Keys, cmd: CommandFactory, t: int) -> list[ControlRecord]:
    """A signed history, each command issued against the epoch it will meet."""
    epoch = iter([0, 1, 2, 3, 4, 99])

    def rec(c: ControlCommand, at_epoch: bool = True) -> ControlRecord:
        if at_epoch and c.expected_epoch is None:
            c = msgspec.structs.replace(c, expected_epoch=next(epoch))
        return keys.record(c, c.issued_at_ms + 200)

    first = cmd("canary", share_bp=100, issued_at_ms=t)
    history = [
        rec(first),
        rec(cmd("ramp", plan=PLAN, issued_at_ms=t + 1000)),
        rec(cmd("pause", issued_at_ms=t + 2000)),
        rec(cmd("resume", issued_at_ms=t + 3000)),
    ]
    duplicate = msgspec.structs.replace(first, issued_at_ms=t + 4000)
    return [
        *history,
        keys.record(duplicate, t + 4200),  # an applied id again: duplicate
        ControlRecord(b"garbage", t + 5000),
        rec(cmd("promote", issued_at_ms=t + 6000, expected_epoch=99)),  # conflict
    ]


def test_replay_uses_record_time_not_wall_clock(keys: Keys, cmd: CommandFactory) -> None:
    long_ago = 946_684_800_000  # 2000-01-01: fresh when written, decades old now
    history = signed_history(keys, cmd, long_ago)
    state, outcomes = replay(history, initial=initial_state("r1"), trust=keys.trust)
    assert [type(o).__name__ for o in outcomes] == [
        "Applied",
        "Applied",
        "Applied",
        "Applied",
        "Duplicate",
        "Rejected",
        "Rejected",
    ]
    assert [o.reason for o in outcomes if isinstance(o, Rejected)] == [
        R.MALFORMED,
        R.EPOCH_CONFLICT,
    ]
    assert state.epoch == 4 and state.mode is Mode.CANARY and state.ramp is not None
    assert state.ramp.step_started_ms == long_ago + 3200  # the resume record's timestamp
    again, _ = replay(history, initial=initial_state("r1"), trust=keys.trust)
    assert again == state


def test_replay_rejects_record_stale_at_its_own_time(keys: Keys, cmd: CommandFactory) -> None:
    c = encode_command(keys.sign(cmd("promote", issued_at_ms=T0, expected_epoch=0)))
    cfg = ControlConfig(freshness=Freshness(max_age_s=60, max_future_s=5))
    state, outcomes = replay(
        [ControlRecord(c, T0 + 61_000), ControlRecord(c, T0 - 6_000)],
        initial=initial_state("r1"),
        trust=keys.trust,
        config=cfg,
    )
    assert [o.reason for o in outcomes if isinstance(o, Rejected)] == [R.STALE, R.FUTURE]
    assert state.epoch == 0


def test_records_with_producer_chosen_times_are_refused_unless_allowed(
    keys: Keys, cmd: CommandFactory
) -> None:
    record = keys.record(cmd("promote", expected_epoch=0), T0)
    created = ControlRecord(record.value, T0, log_append_time=False)
    _, outcomes = replay([created], initial=initial_state("r1"), trust=keys.trust)
    refused(outcomes[0], R.UNTRUSTED_TIME)
    allowed = ControlConfig(allow_create_time=True)
    state, _ = replay([created], initial=initial_state("r1"), trust=keys.trust, config=allowed)
    assert state.mode is Mode.PROMOTED


def test_replay_signature_failures(keys: Keys, cmd: CommandFactory) -> None:
    unsigned = encode_command(cmd("promote", expected_epoch=0))
    stranger = fixed_key("k9", "operator", 9)
    unknown = encode_command(msgspec.structs.replace(keys.sign(cmd("promote")), key_id="k9"))
    forged = encode_command(
        msgspec.structs.replace(
            keys.sign(cmd("promote", expected_epoch=0)),
            signature=keys.sign(cmd("promote", expected_epoch=0), "k2").signature,
        )
    )
    mine = TrustStore([stranger.trusted()])
    state, outcomes = replay(
        [ControlRecord(unsigned, T0), ControlRecord(unknown, T0), ControlRecord(forged, T0)],
        initial=initial_state("r1"),
        trust=keys.trust,
    )
    assert [o.reason for o in outcomes if isinstance(o, Rejected)] == [
        R.UNSIGNED,
        R.UNKNOWN_KEY,
        R.BAD_SIGNATURE,
    ]
    assert state.epoch == 0 and len(mine) == 1


def test_two_instances_converge(keys: Keys, cmd: CommandFactory) -> None:
    """Instance A processes records live (advancing the ramp through its own ticks, published
    to the log); instance B starts later and replays the log: same state."""
    log: list[ControlRecord] = []
    a = initial_state("r1")

    def publish(c: ControlCommand, ts: int, key_id: str = "k2") -> None:
        nonlocal a
        log.append(keys.record(c, ts, key_id))
        out = process_record(a, log[-1], trust=keys.trust)
        a = next_state(a, out)

    publish(cmd("ramp", plan=PLAN, issued_at_ms=T0, expected_epoch=0), T0)
    t = T0
    while a.ramp is not None:
        t += 400_000
        adv = tick(a, t, 5000, issued_by="s1")
        assert adv is not None
        publish(adv.command, t + 10, "s1")
        publish(adv.command, t + 20, "s1")  # a redelivery
    assert a.mode is Mode.PROMOTED and a.epoch == 4
    b, outcomes = replay(log, initial=initial_state("r1"), trust=keys.trust)
    assert b == a
    assert sum(isinstance(o, Duplicate) for o in outcomes) == 3


def test_replay_other_rollout(keys: Keys, cmd: CommandFactory) -> None:
    record = keys.record(cmd("promote", rollout="r2", expected_epoch=0), T0)
    _, outcomes = replay([record], initial=initial_state("r1"), trust=keys.trust)
    assert isinstance(outcomes[0], Rejected) and outcomes[0].reason is R.OTHER_ROLLOUT


# ------------------------------------------------------------------ audit and status


def test_audit_records(keys: Keys, cmd: CommandFactory) -> None:
    s = build("shadow")
    c = keys.sign(cmd("canary", share_bp=5, reason="first look", expected_epoch=0))
    applied = apply(s, c, T0)
    rec = audit_record(applied, instance_id="i1", applied_at_ms=T0 + 3, record_offset=7)
    assert rec == AuditRecord(
        outcome="applied",
        instance_id="i1",
        applied_at_ms=T0 + 3,
        command_id=c.command_id,
        rollout="r1",
        action="canary",
        issued_by="alice",
        issued_at_ms=T0,
        key_id="k1",
        command_reason="first look",
        from_epoch=0,
        to_epoch=1,
        mode="canary",
        share_bp=5,
        record_offset=7,
    )
    assert msgspec.json.decode(msgspec.json.encode(rec), type=AuditRecord) == rec

    assert isinstance(applied, Applied)
    dup = audit_record(apply(applied.new_state, c, T0), instance_id="i1", applied_at_ms=T0)
    assert (dup.outcome, dup.reason, dup.to_epoch) == ("duplicate", "duplicate", None)

    rej = audit_record(apply_at(s, cmd("resume"), T0), instance_id="i1", applied_at_ms=T0)
    assert (rej.outcome, rej.reason, rej.action) == ("rejected", "illegal_transition", "resume")
    assert rej.detail

    bad = process_record(s, ControlRecord(b"{", T0), trust=keys.trust)
    garbage = audit_record(bad, instance_id="i1", applied_at_ms=T0)
    assert (garbage.outcome, garbage.reason, garbage.command_id) == ("rejected", "malformed", None)
    assert b"command_id" not in msgspec.json.encode(garbage)


def test_instance_status() -> None:
    s = build("ramping")
    st_ = instance_status(s, instance_id="i1", ts_ms=T0, host="h", pid=42, assigned_partitions=3)
    assert (st_.epoch, st_.mode, st_.share_bp, st_.ramp_step, st_.ramp_steps) == (
        1,
        "canary",
        100,
        1,
        3,
    )
    assert msgspec.json.decode(msgspec.json.encode(st_), type=InstanceStatus) == st_
    promoted = instance_status(build("promoted"), instance_id="i1", ts_ms=T0)
    assert promoted.ramp_step is None and promoted.share_bp == 10_000


def test_state_is_serialisable() -> None:
    s = ramp_at_step(1)
    raw = msgspec.json.encode(s)
    assert msgspec.json.decode(raw, type=RolloutState) == s


# ------------------------------------------------------------------ properties

PROP_CFG = ControlConfig(min_promoted_age_s=60)

steps_st = st.lists(
    st.builds(
        RampStep,
        share_bp=st.integers(-10, 10_010),
        min_hold_s=st.sampled_from([0.0, 0.5, 30.0, 600.0]),
        min_samples=st.integers(-1, 2000),
    ),
    max_size=5,
).map(lambda steps: sorted(steps, key=lambda s: s.share_bp) if len(steps) % 2 else steps)

valid_plan_st = st.lists(st.integers(1, 10_000), min_size=1, max_size=4, unique=True).map(
    lambda shares: [RampStep(share_bp=b, min_hold_s=60.0, min_samples=100) for b in sorted(shares)]
)
shadow_arm_st = st.none() | st.booleans()


def _args_for(action: str) -> st.SearchStrategy[CommandArgs]:
    """Mostly well-formed arguments for ``action``, sometimes anything at all."""
    fitting: st.SearchStrategy[CommandArgs] = {
        "canary": st.builds(
            CommandArgs, share_bp=st.integers(0, 10_000), score_shadow_arm=shadow_arm_st
        ),
        "ramp": st.builds(
            CommandArgs, plan=valid_plan_st | steps_st, score_shadow_arm=shadow_arm_st
        ),
        "advance": st.builds(CommandArgs, samples=st.integers(0, 3000)),
        "shadow": st.builds(CommandArgs, score_shadow_arm=shadow_arm_st),
        "promote": st.builds(CommandArgs, score_shadow_arm=shadow_arm_st),
        "rollback": st.builds(CommandArgs, score_shadow_arm=shadow_arm_st),
    }.get(action, st.just(CommandArgs()))
    anything = st.builds(
        CommandArgs,
        share_bp=st.none() | st.integers(-10, 10_010),
        plan=st.none() | steps_st,
        score_shadow_arm=shadow_arm_st,
        samples=st.none() | st.integers(0, 3000),
    )
    return st.one_of(fitting, fitting, fitting, anything)


command_op = st.sampled_from(ACTIONS).flatmap(
    lambda action: st.tuples(
        st.just("cmd"),
        st.just(action),
        _args_for(action),
        st.sampled_from(["none", "none", "current", "random"]),  # compare-and-set
        st.integers(0, 12),  # the random expected_epoch
        st.integers(0, 700_000),  # ms since previous op
        st.integers(0, 9).map(lambda n: n == 0),  # reuse an earlier command id
    )
)
tick_op = st.tuples(st.just("tick"), st.integers(0, 3000), st.booleans(), st.integers(0, 700_000))
verdict_op = st.tuples(st.just("verdict"), st.booleans(), st.integers(0, 700_000))
ops_st = st.lists(st.one_of(command_op, command_op, tick_op, verdict_op), min_size=10, max_size=60)


def _check_invariants(s: RolloutState) -> None:
    assert 0 <= s.share_bp <= 10_000
    policy = to_policy(s)  # validates the share range itself
    assert policy.candidate_share_bp == s.share_bp
    assert policy.epoch == s.epoch
    if s.paused:
        assert s.mode in (Mode.SHADOW, Mode.CANARY)
    if s.ramp is not None:
        assert s.mode is Mode.CANARY
        assert 0 <= s.ramp.step < len(s.ramp.plan)
        assert s.share_bp == s.ramp.current.share_bp
    if s.retired:
        assert s.mode is Mode.PROMOTED
    assert (s.mode is Mode.PROMOTED) == (s.promoted_since_ms is not None)
    assert len(s.applied_ids) == s.epoch


@settings(max_examples=200, deadline=None)
@given(ops=ops_st)
@pytest.mark.slow
def test_random_histories(ops: list[tuple[Any, ...]]) -> None:
    state = initial_state("r1", now_ms=T0)
    t = T0
    log: list[ControlRecord] = []
    ids: list[str] = []
    window_end = T0
    for n, op in enumerate(ops):
        key_id = "k1"
        if op[0] == "tick":
            _, samples, _, dt = op
            t += dt
            maybe = tick(state, t, samples, config=PROP_CFG, issued_by="s1")
            if maybe is None:
                continue
            command, key_id = maybe.command, "s1"
        elif op[0] == "verdict":
            _, go, dt = op
            t += dt
            window_end += dt
            command = ControlCommand(
                command_id=f"v{n}",
                rollout="r1",
                action="verdict",
                args=CommandArgs(verdict=Verdict(guards_ok=go, window_end_ms=window_end)),
                issued_by="g1",
                reason="window",
                issued_at_ms=t,
                expected_epoch=state.epoch,
            )
            key_id = "g1"
        else:
            _, action, args, cas, random_epoch, dt, reuse = op
            expected = {"none": None, "current": state.epoch}.get(cas, random_epoch)
            t += dt
            cid = ids[n % len(ids)] if reuse and ids else f"c{n}"
            command = ControlCommand(
                command_id=cid,
                rollout="r1",
                action=action,
                args=args,
                issued_by="prop",
                reason="random",
                issued_at_ms=t,
                expected_epoch=expected,
            )
        ids.append(command.command_id)
        record = KEYS.record(command, t, key_id)
        log.append(record)
        out = process_record(state, record, trust=KEYS.trust, config=PROP_CFG)
        if isinstance(out, Applied):
            assert out.from_epoch == state.epoch and out.to_epoch == state.epoch + 1
            assert out.new_state.epoch == state.epoch + 1
            assert command.action == "rollback" or command.expected_epoch == state.epoch
        if isinstance(out, Noted):
            assert out.new_state.epoch == state.epoch
        if isinstance(out, Rejected):
            assert out.reason not in (R.BAD_SIGNATURE, R.STALE, R.ROLE, R.BAD_ISSUER)
        state = next_state(state, out)
        _check_invariants(state)
        event(f"{type(out).__name__}:{out.reason if isinstance(out, Rejected) else command.action}")

    first, outcomes1 = replay(
        log, initial=initial_state("r1", now_ms=T0), trust=KEYS.trust, config=PROP_CFG
    )
    second, outcomes2 = replay(
        log, initial=initial_state("r1", now_ms=T0), trust=KEYS.trust, config=PROP_CFG
    )
    assert first == second == state
    assert outcomes1 == outcomes2
    assert sum(isinstance(o, Applied) for o in outcomes1) == state.epoch


@settings(max_examples=200, deadline=None)
@given(
    plan=st.lists(st.integers(1, 10_000), min_size=1, max_size=8, unique=True).map(sorted),
    samples=st.lists(st.integers(0, 10**6), min_size=1, max_size=30),
)
def test_ramp_visits_every_step_in_order(plan: list[int], samples: list[int]) -> None:
    steps = [RampStep(share_bp=b, min_hold_s=1, min_samples=500) for b in plan]
    c = command_factory()
    s = ok(apply_at(initial_state("r1"), c("ramp", plan=steps), T0))
    seen = [s.share_bp]
    t = T0
    for n in samples:
        t += 10**9
        out = tick(s, t, n)
        if out is None:
            assert n < 500 or s.ramp is None
            continue
        s = out.new_state
        seen.append(s.share_bp)
    expected_prefix = plan + ([10_000] if plan[-1] == 10_000 else [plan[-1]])
    assert seen == expected_prefix[: len(seen)]
