"""Guard and quality verdicts in the state machine, and the gates they feed: a ramp advances
only as ``control.ramp_gate`` allows, a promotion only as ``control.promote_gate`` allows."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from ctl_support import T0, apply_at, command_factory

from sidecar.control import (
    Applied,
    CommandArgs,
    ControlCommand,
    ControlConfig,
    Noted,
    RampStep,
    Rejected,
    RejectReason,
    RolloutState,
    Verdict,
    apply,
    initial_state,
    next_state,
    tick,
)
from sidecar.routing import Mode

PLAN = [
    RampStep(share_bp=100, min_hold_s=60, min_samples=10),
    RampStep(share_bp=10_000, min_hold_s=60, min_samples=10),
]
make = command_factory("v")


def verdict(
    state: RolloutState,
    *,
    guards_ok: bool | None = None,
    quality_ok: bool | None = None,
    window_end_ms: int = T0,
    epoch: Any = "current",
    candidate_version: str | None = None,
) -> ControlCommand:
    return ControlCommand(
        command_id=f"verdict-{make('shadow').command_id}",
        rollout="r1",
        action="verdict",
        issued_by="guard",
        reason="window",
        issued_at_ms=T0,
        expected_epoch=state.epoch if epoch == "current" else epoch,
        args=CommandArgs(
            verdict=Verdict(
                guards_ok=guards_ok,
                quality_ok=quality_ok,
                window_end_ms=window_end_ms,
                candidate_version=candidate_version,
                champion_version=None if candidate_version is None else "1.0.0",
            )
        ),
    )


def step(state: RolloutState, cmd: ControlCommand, now: int = T0, **kw: Any) -> Any:
    out = apply(state, cmd, now, **kw)
    return out, next_state(state, out)


def ramping(config: ControlConfig) -> RolloutState:
    out = apply_at(initial_state("r1", now_ms=T0), make("ramp", plan=PLAN), T0, config=config)
    assert isinstance(out, Applied)
    return out.new_state


def test_a_verdict_is_noted_without_an_epoch_and_never_about_an_older_window() -> None:
    s = initial_state("r1", now_ms=T0)
    out, s2 = step(s, verdict(s, guards_ok=True, window_end_ms=T0 + 10))
    assert isinstance(out, Noted) and s2.epoch == s.epoch and s2.verdict is not None
    out, _ = step(s2, verdict(s2, guards_ok=False, window_end_ms=T0 + 10))
    assert isinstance(out, Rejected) and out.reason is RejectReason.NO_CHANGE
    out, s3 = step(s2, verdict(s2, guards_ok=False, window_end_ms=T0 + 11))
    assert isinstance(out, Noted) and s3.verdict is not None and s3.verdict.guards_ok is False


def test_guard_verdicts_are_bound_to_an_epoch_quality_verdicts_are_not() -> None:
    s = initial_state("r1", now_ms=T0)
    out, _ = step(s, verdict(s, guards_ok=True, epoch=None))
    assert isinstance(out, Rejected) and out.reason is RejectReason.INVALID_ARGS
    out, _ = step(s, verdict(s, guards_ok=True, epoch=s.epoch + 1))
    assert isinstance(out, Rejected) and out.reason is RejectReason.EPOCH_CONFLICT
    out, s2 = step(s, verdict(s, quality_ok=True, epoch=None))
    assert isinstance(out, Noted) and s2.quality is not None and s2.verdict is None
    out, _ = step(s, verdict(s))  # says nothing
    assert isinstance(out, Rejected) and out.reason is RejectReason.INVALID_ARGS


def test_guard_and_quality_verdicts_are_kept_apart() -> None:
    """Quality windows (labels arrive days later) lag far behind guard windows: each kind is
    monotone on its own, and a new epoch forgets the guards' verdict but not the quality one."""
    s = initial_state("r1", now_ms=T0)
    _, s = step(s, verdict(s, guards_ok=False, window_end_ms=T0 + 1_000_000))
    out, s = step(s, verdict(s, quality_ok=True, window_end_ms=T0, epoch=None))
    assert isinstance(out, Noted)
    assert s.verdict is not None and s.verdict.guards_ok is False
    assert s.quality is not None and s.quality.quality_ok is True
    out, s = step(s, make("canary", share_bp=500, expected_epoch=s.epoch))
    assert isinstance(out, Applied)
    assert s.verdict is None and s.quality is not None


@pytest.mark.parametrize(
    ("gate", "verdicts", "advances"),
    [
        ("none", [False], True),
        ("no_stop", [], True),
        ("no_stop", [False], False),
        ("no_stop", [False, True], True),
        ("verdict", [], False),
        ("verdict", [True], True),
        ("verdict", [False], False),
        ("verdict", ["old"], False),  # a go about a window before the step started
    ],
)
def test_the_ramp_gate(gate: str, verdicts: list[Any], advances: bool) -> None:
    config = ControlConfig(ramp_gate=gate)  # type: ignore[arg-type]
    s = ramping(config)
    end = T0 + 1_000
    for v in verdicts:
        ok, window_end = (True, T0 - 1) if v == "old" else (v, end)
        _, s = step(s, verdict(s, guards_ok=ok, window_end_ms=window_end), config=config)
        end += 1_000
    now = T0 + 61_000
    applied = tick(s, now, 10, config=config)
    assert (applied is not None) == advances
    if applied is not None:  # what the instances would do with the advance it signs
        out = apply(s, applied.command, now, config=config)
        assert isinstance(out, Applied) and out.new_state.share_bp == 10_000


def test_a_stop_verdict_refuses_an_advance_signed_before_it() -> None:
    config = ControlConfig(ramp_gate="no_stop")
    s = ramping(config)
    applied = tick(s, T0 + 61_000, 10, config=config)
    assert applied is not None
    _, stopped = step(s, verdict(s, guards_ok=False, window_end_ms=T0 + 60_000), config=config)
    out = apply(stopped, applied.command, T0 + 61_000, config=config)
    assert isinstance(out, Rejected) and out.reason is RejectReason.TOO_EARLY
    assert "a guard says stop" in out.detail


@pytest.mark.parametrize(("quality", "promotes"), [(None, False), (False, False), (True, True)])
def test_the_promote_gate(quality: bool | None, promotes: bool) -> None:
    config = ControlConfig(promote_gate="quality")
    s = initial_state("r1", now_ms=T0)
    if quality is not None:
        _, s = step(s, verdict(s, quality_ok=quality, epoch=None), config=config)
    out = apply_at(s, make("promote"), T0, config=config)
    if promotes:
        assert isinstance(out, Applied) and out.new_state.mode is Mode.PROMOTED
    else:
        assert isinstance(out, Rejected) and out.reason is RejectReason.TOO_EARLY
    ungated = apply_at(s, make("promote"), T0, config=ControlConfig())
    assert isinstance(ungated, Applied)


def test_the_last_ramp_step_promotes_only_through_the_quality_gate() -> None:
    config = ControlConfig(promote_gate="quality", ramp_gate="none")
    s = ramping(config)
    applied = tick(s, T0 + 61_000, 10, config=config)
    assert applied is not None
    s = next_state(s, apply(s, applied.command, T0 + 61_000, config=config))
    assert s.share_bp == 10_000 and s.ramp is not None  # the last step, at 100%
    assert tick(s, T0 + 200_000, 10, config=config) is None  # no quality verdict: held
    _, s = step(s, verdict(s, quality_ok=True, epoch=None), config=config)
    last = tick(s, T0 + 200_000, 10, config=config)
    assert last is not None and last.new_state.mode is Mode.PROMOTED
    assert msgspec.structs.replace(last.new_state, since_ms=0).ramp is None


def test_a_quality_verdict_counts_only_for_the_candidate_version_it_judged() -> None:
    """The candidate 1.1.0 passed; the operator deploys 1.2.0 and promotes at once: the old
    verdict must not promote a model nobody judged."""
    config = ControlConfig(promote_gate="quality")
    s = initial_state("r1", now_ms=T0)
    _, s = step(s, verdict(s, quality_ok=True, epoch=None, candidate_version="1.1.0"))
    assert s.quality is not None and s.quality.candidate_version == "1.1.0"

    newer = apply_at(s, make("promote", candidate_version="1.2.0"), T0, config=config)
    assert isinstance(newer, Rejected) and newer.reason is RejectReason.TOO_EARLY
    assert "about candidate 1.1.0, not 1.2.0" in newer.detail
    unnamed = apply_at(s, make("promote"), T0, config=config)
    assert isinstance(unnamed, Rejected) and "does not name the candidate" in unnamed.detail
    judged = apply_at(s, make("promote", candidate_version="1.1.0"), T0, config=config)
    assert isinstance(judged, Applied) and judged.new_state.mode is Mode.PROMOTED

    # 1.2.0's first verdict counts though its window ends before 1.1.0's last one did (the
    # windows of another pair are another sequence); 1.1.0's own stay monotone.
    out, s2 = step(
        s,
        verdict(
            s, quality_ok=True, epoch=None, candidate_version="1.2.0", window_end_ms=T0 - 60_000
        ),
    )
    assert isinstance(out, Noted) and s2.quality is not None
    assert s2.quality.candidate_version == "1.2.0"
    again = apply_at(s2, make("promote", candidate_version="1.2.0"), T0, config=config)
    assert isinstance(again, Applied)
    stale, _ = step(
        s, verdict(s, quality_ok=False, epoch=None, candidate_version="1.1.0", window_end_ms=T0)
    )
    assert isinstance(stale, Rejected) and stale.reason is RejectReason.NO_CHANGE


def test_the_sidecars_last_advance_names_its_candidate() -> None:
    config = ControlConfig(promote_gate="quality", ramp_gate="none")
    s = ramping(config)
    first = tick(s, T0 + 61_000, 10, config=config, candidate_version="1.2.0")
    assert first is not None and first.command.args.candidate_version == "1.2.0"
    s = next_state(s, apply(s, first.command, T0 + 61_000, config=config))
    _, s = step(s, verdict(s, quality_ok=True, epoch=None, candidate_version="1.1.0"))
    assert tick(s, T0 + 200_000, 10, config=config, candidate_version="1.2.0") is None
    _, s = step(
        s, verdict(s, quality_ok=True, epoch=None, candidate_version="1.2.0", window_end_ms=T0 + 1)
    )
    last = tick(s, T0 + 200_000, 10, config=config, candidate_version="1.2.0")
    assert last is not None and last.new_state.mode is Mode.PROMOTED


def test_an_instance_names_its_candidate_and_says_when_another_was_promoted(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The plane's advances name the candidate it runs (its heartbeat's, else its config's);
    applying a promotion of another version (a deploy under way) is logged as an error."""
    from control_helpers import control_config

    from sidecar.control import ModelHealth
    from sidecar.control.plane import ControlPlane
    from sidecar.routing import PolicyHolder, RoutingPolicy

    cfg = control_config("unused:9092", tmp_path)
    assert cfg.models.candidate is not None
    holder = PolicyHolder(RoutingPolicy(rollout=cfg.rollout.name))
    plane = ControlPlane(cfg, holder, "i1")
    assert plane.candidate_version() == cfg.models.candidate.version
    running = [ModelHealth(arm="candidate", model="m", version="7.0.0")]
    plane = ControlPlane(cfg, holder, "i1", models=lambda: running)
    assert plane.candidate_version() == "7.0.0"

    s = initial_state(cfg.rollout.name, now_ms=T0)
    for named, logged in (("7.0.0", False), ("8.0.0", True), (None, False)):
        cmd = make("promote", rollout=cfg.rollout.name, candidate_version=named)
        out = apply_at(s, cmd, T0)
        assert isinstance(out, Applied)
        caplog.clear()
        plane._lifecycle(s, out)
        assert (
            "promoted candidate 8.0.0, but this instance runs candidate 7.0.0" in caplog.text
        ) is (logged)
