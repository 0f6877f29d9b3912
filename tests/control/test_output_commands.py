"""``deprecate`` and ``sunset`` of an older output version: pure state-machine rules."""

from __future__ import annotations

from typing import Any

import pytest
from ctl_support import KEYS, T0, CommandFactory, apply_at

from sidecar.control import (
    ControlConfig,
    Duplicate,
    Noted,
    Outcome,
    Rejected,
    RejectReason,
    RolloutState,
    initial_state,
    next_state,
    replay,
)
from sidecar.outputs import OutputState

R = RejectReason
CFG = ControlConfig(min_promoted_age_s=0)
DAY = 86_400_000


def state(**kw: Any) -> RolloutState:
    return initial_state(
        "r1", now_ms=T0, outputs=(OutputState(version="v1"), OutputState(version="v0")), **kw
    )


def noted(outcome: Outcome) -> RolloutState:
    assert isinstance(outcome, Noted), outcome
    return outcome.new_state


def refused(outcome: Outcome, reason: RejectReason) -> str:
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason is reason, outcome
    return outcome.detail


def deprecate(cmd: CommandFactory, s: RolloutState, at: int, **kw: Any) -> Outcome:
    kw.setdefault("output_version", "v1")
    kw.setdefault("sunset_ms", at + 30 * DAY)
    return apply_at(s, cmd("deprecate", issued_at_ms=at, **kw), at, config=CFG)


def sunset(cmd: CommandFactory, s: RolloutState, at: int, **kw: Any) -> Outcome:
    kw.setdefault("output_version", "v1")
    return apply_at(s, cmd("sunset", issued_at_ms=at, **kw), at, config=CFG)


def test_deprecate_records_dates_and_guide_without_touching_the_epoch(
    cmd: CommandFactory,
) -> None:
    s = state()
    new = noted(deprecate(cmd, s, T0, link="https://x.example/guide"))
    assert new.epoch == s.epoch and new.mode is s.mode
    v1 = new.output("v1")
    assert v1 == OutputState(
        version="v1", deprecation_ms=T0, sunset_ms=T0 + 30 * DAY, link="https://x.example/guide"
    )
    assert new.output("v0") == OutputState(version="v0")


@pytest.mark.parametrize(
    ("kw", "reason", "text"),
    [
        ({"output_version": "v9"}, R.INVALID_ARGS, "configured: v1, v0"),
        ({"output_version": None}, R.INVALID_ARGS, "needs args.output_version"),
        ({"sunset_ms": None}, R.INVALID_ARGS, "needs args.sunset_ms"),
        ({"sunset_ms": T0 - 1}, R.INVALID_ARGS, "not in the past"),
        ({"deprecation_ms": T0 + 40 * DAY}, R.INVALID_ARGS, "after the deprecation"),
        ({"link": "not a url"}, R.INVALID_ARGS, "not a URL"),
        ({"share_bp": 5}, R.INVALID_ARGS, "does not take share_bp"),
    ],
)
def test_deprecate_refusals(
    cmd: CommandFactory, kw: dict[str, Any], reason: RejectReason, text: str
) -> None:
    assert text in refused(deprecate(cmd, state(), T0, **kw), reason)


def test_a_sunset_date_can_be_postponed_never_brought_forward(cmd: CommandFactory) -> None:
    s = noted(deprecate(cmd, state(), T0))
    later = noted(deprecate(cmd, s, T0 + 1, sunset_ms=T0 + 60 * DAY))
    assert later.output("v1").sunset_ms == T0 + 60 * DAY  # type: ignore[union-attr]
    refused(deprecate(cmd, later, T0 + 2, sunset_ms=T0 + 31 * DAY), R.ILLEGAL_TRANSITION)
    same = deprecate(cmd, later, T0 + 3, sunset_ms=T0 + 60 * DAY, deprecation_ms=T0)
    refused(same, R.NO_CHANGE)


def test_sunset_needs_deprecation_the_date_and_no_active_readers(cmd: CommandFactory) -> None:
    s = state()
    refused(sunset(cmd, s, T0, active_readers=0), R.ILLEGAL_TRANSITION)  # never deprecated
    s = noted(deprecate(cmd, s, T0, sunset_ms=T0 + DAY))
    assert "2023-11-15" in refused(sunset(cmd, s, T0 + 1, active_readers=0), R.TOO_EARLY)
    after = T0 + DAY
    assert "2 consumer group" in refused(sunset(cmd, s, after, active_readers=2), R.ACTIVE_READERS)
    assert "unknown number" in refused(sunset(cmd, s, after), R.ACTIVE_READERS)
    new = noted(sunset(cmd, s, after, active_readers=0))
    assert new.output("v1").sunset_at_ms == after  # type: ignore[union-attr]
    assert new.output("v1").is_sunset and new.epoch == s.epoch  # type: ignore[union-attr]
    refused(sunset(cmd, new, after + 1, active_readers=0), R.NO_CHANGE)
    refused(deprecate(cmd, new, after + 1), R.NO_CHANGE)


def test_force_skips_the_checks_and_the_reason_is_kept(cmd: CommandFactory) -> None:
    outcome = sunset(cmd, state(), T0, active_readers=3, force=True, reason="v1 leaks PII")
    new = noted(outcome)
    assert new.output("v1").sunset_at_ms == T0  # type: ignore[union-attr]
    assert outcome.command.reason == "v1 leaks PII"  # type: ignore[union-attr]


def test_a_retired_rollout_still_deprecates_and_sunsets(cmd: CommandFactory) -> None:
    s = state()
    for action in ("promote", "retire"):
        out = apply_at(s, cmd(action), T0, config=CFG)
        s = next_state(s, out)
    assert s.retired
    s = noted(deprecate(cmd, s, T0 + 1, sunset_ms=T0 + 2))
    assert noted(sunset(cmd, s, T0 + 2, active_readers=0)).output("v1").is_sunset  # type: ignore[union-attr]
    refused(apply_at(s, cmd("rollback"), T0 + 3, config=CFG), R.RETIRED)


def test_an_applied_output_command_is_a_duplicate_when_replayed(cmd: CommandFactory) -> None:
    c = cmd("deprecate", output_version="v1", sunset_ms=T0 + DAY, expected_epoch=0)
    s = state()
    out = apply_at(s, c, T0, config=CFG)
    s = next_state(s, out)
    assert isinstance(apply_at(s, c, T0 + 1, config=CFG), Duplicate)


def test_replay_gives_every_instance_the_same_output_states() -> None:
    from ctl_support import command_factory

    c = command_factory("o")
    records = [
        KEYS.record(c("deprecate", output_version="v1", sunset_ms=T0 + 10, expected_epoch=0), T0),
        KEYS.record(
            c(
                "sunset",
                output_version="v1",
                active_readers=0,
                expected_epoch=0,
                issued_at_ms=T0 + 20,
            ),
            T0 + 20,
        ),
        KEYS.record(c("sunset", output_version="v0", active_readers=0, expected_epoch=0), T0 + 30),
    ]
    final, outcomes = replay(records, initial=state(), trust=KEYS.trust, config=CFG)
    assert [type(o).__name__ for o in outcomes] == ["Noted", "Noted", "Rejected"]
    assert final.output("v1").is_sunset and not final.output("v0").is_sunset  # type: ignore[union-attr]
    assert final.epoch == 0


def test_only_operators_may_sign_them() -> None:
    from ctl_support import command_factory

    c = command_factory("g")
    for key in ("g1", "s1"):
        rec = KEYS.record(
            c("sunset", output_version="v1", force=True, expected_epoch=0), T0, key_id=key
        )
        _, outcomes = replay([rec], initial=state(), trust=KEYS.trust, config=CFG)
        assert isinstance(outcomes[0], Rejected) and outcomes[0].reason is R.ROLE
