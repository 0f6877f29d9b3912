"""An attacker who can write the control topic but holds no key: whatever they do with the
records they have seen -- reorder them, replay them, back-date them, mix in forgeries -- the
rollout only ever reaches a state a legal sequence of signed commands reaches.

"Legal" is what signers can do: every applied command carries a trusted signature of a key
whose role may sign it, applies at exactly the epoch it was issued against (``rollback``
excepted), and applies once; a command refused once (after authentication) never applies.
"""

from __future__ import annotations

from typing import Any

from ctl_support import KEYS, T0
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.control import (
    Applied,
    CommandArgs,
    ControlCommand,
    ControlConfig,
    ControlRecord,
    Duplicate,
    Noted,
    RampStep,
    Rejected,
    RolloutState,
    encode_command,
    initial_state,
    process_record,
    replay,
    sign_command,
    step,
    verify_command,
)
from sidecar.control.commands import AUTHENTIC_REJECTIONS

CFG = ControlConfig(min_promoted_age_s=60, allow_create_time=True)
PLAN = [
    RampStep(share_bp=100, min_hold_s=1, min_samples=1),
    RampStep(share_bp=10_000, min_hold_s=1, min_samples=1),
]
ACTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("canary", {"share_bp": 500}, "k1"),
    ("canary", {"share_bp": 2500}, "k2"),
    ("shadow", {}, "k1"),
    ("ramp", {"plan": PLAN}, "k1"),
    ("promote", {}, "k2"),
    ("pause", {}, "g1"),
    ("resume", {}, "k1"),
    ("rollback", {}, "g1"),
    ("advance", {"samples": 5}, "s1"),
    ("promote", {}, "g1"),  # a guard may not promote: refused as role
    ("retire", {}, "k1"),
]


@st.composite
def signed_history(draw: st.DrawFn) -> list[ControlRecord]:
    """What legitimate signers wrote: each command signed against the epoch its signer saw
    (sometimes a stale one), some of them refused."""
    state = initial_state("r1", now_ms=T0)
    records: list[ControlRecord] = []
    t = T0
    for n in range(draw(st.integers(3, 14))):
        action, args, key_id = draw(st.sampled_from(ACTIONS))
        t += draw(st.integers(0, 120_000))
        epoch = state.epoch - draw(st.sampled_from([0, 0, 0, 1]))
        cmd = ControlCommand(
            command_id=f"c{n}",
            rollout="r1",
            action=action,  # type: ignore[arg-type]
            args=CommandArgs(**args),
            issued_by="x",
            reason="legit",
            issued_at_ms=t,
            expected_epoch=None if action == "rollback" else max(epoch, 0),
        )
        record = KEYS.record(cmd, t, key_id)
        records.append(record)
        state, _ = step(state, record, trust=KEYS.trust, config=CFG)
    return records


def forged(t: int) -> ControlRecord:
    cmd = ControlCommand(
        command_id="forged",
        rollout="r1",
        action="promote",
        issued_by="mallory",
        reason="evil",
        issued_at_ms=t,
        expected_epoch=0,
        key_id="k1",
        signature="A" * 86,
    )
    return ControlRecord(encode_command(cmd), t)


def check_legal(records: list[ControlRecord]) -> RolloutState:
    """Replay ``records`` and check every outcome against the legality rules."""
    state = initial_state("r1", now_ms=T0)
    applied: set[str] = set()
    refused: set[str] = set()
    for record in records:
        before = state
        outcome = process_record(state, record, trust=KEYS.trust, config=CFG)
        state, again = step(before, record, trust=KEYS.trust, config=CFG)
        assert again == outcome  # pure
        if isinstance(outcome, Applied | Noted):
            cmd = outcome.command
            verify_command(cmd, KEYS.trust, record.ts_ms)  # signed, role allowed, issuer bound
            assert cmd.command_id not in refused, f"{cmd.command_id} applied after a refusal"
            assert cmd.expected_epoch == before.epoch or cmd.action == "rollback"
            if isinstance(outcome, Applied):
                assert cmd.command_id not in applied, f"{cmd.command_id} applied twice"
                applied.add(cmd.command_id)
                assert state.epoch == before.epoch + 1
            else:
                assert state.epoch == before.epoch
        else:
            assert state.epoch == before.epoch and state.mode == before.mode
            assert state.share_bp == before.share_bp and state.paused == before.paused
            if (
                isinstance(outcome, Rejected)
                and outcome.command is not None
                and outcome.reason in AUTHENTIC_REJECTIONS
                and outcome.command.command_id not in applied
            ):
                refused.add(outcome.command.command_id)
            if isinstance(outcome, Duplicate):
                assert outcome.command.command_id in applied
    return state


@settings(max_examples=300, deadline=None)
@given(history=signed_history(), data=st.data())
def test_reordered_replayed_and_forged_records_reach_only_legal_states(
    history: list[ControlRecord], data: st.DataObject
) -> None:
    # The attacker rebuilds the log from what they saw: any order, any repetitions, any
    # record time (back-dating included), forgeries mixed in.
    picks = data.draw(st.lists(st.sampled_from(history), min_size=1, max_size=30))
    log = [
        ControlRecord(r.value, r.ts_ms + data.draw(st.integers(-600_000, 600_000))) for r in picks
    ]
    for _ in range(data.draw(st.integers(0, 3))):
        log.insert(data.draw(st.integers(0, len(log))), forged(T0))
    check_legal(log)


@settings(max_examples=300, deadline=None)
@given(history=signed_history(), data=st.data())
def test_appending_old_records_changes_nothing(
    history: list[ControlRecord], data: st.DataObject
) -> None:
    # The attacker cannot remove history, only append to it: whatever they append from it,
    # at whatever record time, the rollout stays exactly where the legitimate log left it.
    legit, _ = replay(history, initial=initial_state("r1", now_ms=T0), trust=KEYS.trust, config=CFG)
    appended = [
        ControlRecord(r.value, history[-1].ts_ms + data.draw(st.integers(-3_600_000, 600_000)))
        for r in data.draw(st.lists(st.sampled_from(history), max_size=20))
    ]
    appended.append(forged(history[-1].ts_ms))
    after = check_legal(history + appended)
    routing = ("mode", "share_bp", "epoch", "paused", "ramp", "retired", "verdict")
    assert {f: getattr(after, f) for f in routing} == {f: getattr(legit, f) for f in routing}


def test_the_issue_s_replay_of_a_refused_canary_is_refused() -> None:
    """canary 6% refused as no_change, then a rollback; the refused bytes re-published."""
    t = T0
    canary = KEYS.record(_cmd("a", "canary", t, 0, share_bp=600), t)
    again = KEYS.record(_cmd("b", "canary", t + 1, 1, share_bp=600), t + 1)
    rollback = KEYS.record(_cmd("c", "rollback", t + 2, None), t + 2)
    state = check_legal([canary, again, rollback, ControlRecord(again.value, t + 3)])
    assert state.mode.value == "rolled_back" and state.epoch == 2


def _cmd(cid: str, action: str, t: int, epoch: int | None, **args: Any) -> ControlCommand:
    return ControlCommand(
        command_id=cid,
        rollout="r1",
        action=action,  # type: ignore[arg-type]
        args=CommandArgs(**args),
        issued_by="x",
        reason="r",
        issued_at_ms=t,
        expected_epoch=epoch,
    )


def test_signatures_of_the_helpers_are_real() -> None:
    signed = sign_command(_cmd("z", "shadow", T0, 0), KEYS.by_id["k1"])
    verify_command(signed, KEYS.trust, T0)
