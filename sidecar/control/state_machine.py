"""The rollout state machine: pure functions from (state, command, time) to a new state.

No I/O. :func:`apply` is deterministic in its arguments, so every sidecar instance that reads
the same control-topic records (and uses their record timestamps as ``now_ms``) converges on
the same :class:`RolloutState`; :func:`replay` does exactly that at start-up. See STATES.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from ..hashing import BUCKETS
from ..routing import Mode, RoutingPolicy
from ..untrusted import error_text
from .commands import (
    CommandArgs,
    ControlCommand,
    Duplicate,
    Freshness,
    Keyring,
    RampStep,
    Rejected,
    RejectReason,
    authenticate,
    validate_plan,
)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Rules of the state machine. Every instance must run with the same values, or replays
    may diverge."""

    #: A promoted rollout may retire its old champion only after this long.
    min_promoted_age_s: float = 3600.0
    freshness: Freshness = field(default_factory=Freshness)
    #: ``False`` only for local demos: unsigned commands are then accepted.
    require_signature: bool = True


DEFAULT_CONFIG = ControlConfig()


class RampProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Where an active ramp stands. ``step_epoch`` is the epoch at which the current step
    (re)started: samples for the step's floor are comparisons with ``policy_epoch >=
    step_epoch``, which any instance can count from the comparisons topic."""

    plan: tuple[RampStep, ...]
    step: int
    step_started_ms: int
    step_epoch: int

    @property
    def current(self) -> RampStep:
        return self.plan[self.step]

    @property
    def is_last(self) -> bool:
        return self.step == len(self.plan) - 1


class RolloutState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the control plane knows about one rollout; immutable.

    ``applied_ids`` holds *every* applied command id: commands arrive at operator pace, so the
    set stays small, and a bounded window would let an old command re-apply once it fell out.
    """

    rollout: str
    mode: Mode = Mode.SHADOW
    #: Share of buckets the candidate decides: 0 in shadow/rolled_back, 10000 when promoted.
    share_bp: int = 0
    epoch: int = 0
    paused: bool = False
    ramp: RampProgress | None = None
    has_candidate: bool = True
    promoted_since_ms: int | None = None
    retired: bool = False
    score_shadow_arm: bool = True
    last_command_id: str | None = None
    since_ms: int = 0
    applied_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Applied:
    """Outcome: ``command`` moved the rollout from ``from_epoch`` to ``to_epoch`` (+1)."""

    new_state: RolloutState
    from_epoch: int
    to_epoch: int
    command: ControlCommand


Outcome = Applied | Rejected | Duplicate


def initial_state(
    rollout: str,
    *,
    mode: Mode = Mode.SHADOW,
    share_bp: int | None = None,
    has_candidate: bool = True,
    score_shadow_arm: bool = True,
    now_ms: int = 0,
) -> RolloutState:
    """The configured start state (epoch 0), before any command."""
    if share_bp is None:
        share_bp = {Mode.PROMOTED: BUCKETS, Mode.CANARY: 0}.get(mode, 0)
    state = RolloutState(
        rollout=rollout,
        mode=mode,
        share_bp=share_bp,
        has_candidate=has_candidate,
        score_shadow_arm=score_shadow_arm,
        promoted_since_ms=now_ms if mode is Mode.PROMOTED else None,
        since_ms=now_ms,
    )
    problem = _invariant_violation(state)
    if problem:
        raise ValueError(f"invalid initial state for rollout {rollout!r}: {problem}")
    return state


def _invariant_violation(s: RolloutState) -> str | None:
    if s.mode is Mode.CANARY and not 1 <= s.share_bp <= BUCKETS:
        return f"canary share must be within 1..{BUCKETS} bp, got {s.share_bp}"
    if s.mode is Mode.PROMOTED and s.share_bp != BUCKETS:
        return "promoted share must be 10000 bp"
    if s.mode in (Mode.SHADOW, Mode.ROLLED_BACK) and s.share_bp != 0:
        return f"{s.mode.value} share must be 0 bp"
    if s.mode is not Mode.SHADOW and s.mode is not Mode.ROLLED_BACK and not s.has_candidate:
        return "a rollout without a candidate can only be in shadow or rolled_back"
    return None


def to_policy(state: RolloutState) -> RoutingPolicy:
    """The routing policy the data path runs under in ``state``."""
    return RoutingPolicy(
        rollout=state.rollout,
        mode=state.mode,
        canary_share_bp=state.share_bp if state.mode is Mode.CANARY else 0,
        epoch=state.epoch,
        score_shadow_arm=state.score_shadow_arm,
        command_id=state.last_command_id,
        since_ms=state.since_ms,
    )


# --------------------------------------------------------------------------- apply

_ARGS_BY_ACTION: dict[str, frozenset[str]] = {
    "shadow": frozenset({"score_shadow_arm"}),
    "canary": frozenset({"share_bp", "score_shadow_arm"}),
    "ramp": frozenset({"plan", "score_shadow_arm"}),
    "promote": frozenset({"score_shadow_arm"}),
    "rollback": frozenset({"score_shadow_arm"}),
    "pause": frozenset(),
    "resume": frozenset(),
    "retire": frozenset(),
    "advance": frozenset({"samples"}),
}


class _Refused(Exception):
    """Internal: a rule refused the command."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _check_args(cmd: ControlCommand) -> None:
    given = {f for f in cmd.args.__struct_fields__ if getattr(cmd.args, f) is not None}
    extra = given - _ARGS_BY_ACTION[cmd.action]
    if extra:
        raise _Refused(
            RejectReason.INVALID_ARGS,
            f"{cmd.action} does not take {', '.join(sorted(extra))}",
        )


def _transition(
    s: RolloutState, cmd: ControlCommand, now_ms: int, cfg: ControlConfig
) -> RolloutState:
    """The new state (epoch not yet bumped) or :class:`_Refused`."""
    a = cmd.action
    args = cmd.args
    shadow_arm = s.score_shadow_arm if args.score_shadow_arm is None else args.score_shadow_arm
    # Leaving a ramp: any mode-setting command cancels it (and un-pauses).
    no_ramp = {"ramp": None, "paused": False, "score_shadow_arm": shadow_arm}

    def need_candidate() -> None:
        if not s.has_candidate:
            raise _Refused(RejectReason.NO_CANDIDATE, f"{a}: the rollout has no candidate model")

    def not_promoted() -> None:
        if s.mode is Mode.PROMOTED:
            raise _Refused(
                RejectReason.ILLEGAL_TRANSITION, f"{a}: the rollout is promoted; roll back first"
            )

    if a == "rollback":
        return msgspec.structs.replace(
            s, mode=Mode.ROLLED_BACK, share_bp=0, promoted_since_ms=None, **no_ramp
        )

    if a == "shadow":
        not_promoted()
        return msgspec.structs.replace(s, mode=Mode.SHADOW, share_bp=0, **no_ramp)

    if a == "canary":
        need_candidate()
        not_promoted()
        share = args.share_bp
        if share is None:
            raise _Refused(RejectReason.INVALID_ARGS, "canary needs args.share_bp")
        if not 1 <= share <= BUCKETS:
            raise _Refused(
                RejectReason.INVALID_ARGS,
                f"canary share {share} bp is outside 1..{BUCKETS} (use shadow for 0)",
            )
        return msgspec.structs.replace(s, mode=Mode.CANARY, share_bp=share, **no_ramp)

    if a == "ramp":
        need_candidate()
        not_promoted()
        if args.plan is None:
            raise _Refused(RejectReason.INVALID_ARGS, "ramp needs args.plan")
        try:
            plan = tuple(validate_plan(args.plan))
        except ValueError as exc:
            raise _Refused(RejectReason.INVALID_ARGS, f"ramp plan: {exc}") from None
        ramp = RampProgress(plan=plan, step=0, step_started_ms=now_ms, step_epoch=s.epoch + 1)
        return msgspec.structs.replace(
            s,
            mode=Mode.CANARY,
            share_bp=plan[0].share_bp,
            ramp=ramp,
            paused=False,
            score_shadow_arm=shadow_arm,
        )

    if a == "promote":
        need_candidate()
        if s.mode not in (Mode.SHADOW, Mode.CANARY):
            raise _Refused(
                RejectReason.ILLEGAL_TRANSITION,
                f"promote from {s.mode.value}: only shadow or canary can be promoted",
            )
        return msgspec.structs.replace(
            s, mode=Mode.PROMOTED, share_bp=BUCKETS, promoted_since_ms=now_ms, **no_ramp
        )

    if a == "pause":
        if s.ramp is None:
            raise _Refused(RejectReason.ILLEGAL_TRANSITION, "pause: no ramp is running")
        if s.paused:
            raise _Refused(RejectReason.NO_CHANGE, "pause: the ramp is already paused")
        return msgspec.structs.replace(s, paused=True)

    if a == "resume":
        if s.ramp is None or not s.paused:
            raise _Refused(RejectReason.ILLEGAL_TRANSITION, "resume: no paused ramp")
        # The step's hold and sample floors restart: evidence must be gathered unpaused.
        ramp = msgspec.structs.replace(s.ramp, step_started_ms=now_ms, step_epoch=s.epoch + 1)
        return msgspec.structs.replace(s, paused=False, ramp=ramp)

    if a == "retire":
        if s.mode is not Mode.PROMOTED or s.promoted_since_ms is None:
            raise _Refused(RejectReason.ILLEGAL_TRANSITION, "retire: the rollout is not promoted")
        age_s = (now_ms - s.promoted_since_ms) / 1000
        if age_s < cfg.min_promoted_age_s:
            raise _Refused(
                RejectReason.TOO_EARLY,
                f"retire: promoted {age_s:.0f}s ago; at least {cfg.min_promoted_age_s:g}s needed",
            )
        return msgspec.structs.replace(s, retired=True, score_shadow_arm=False)

    # advance: complete the current ramp step.
    if s.ramp is None:
        raise _Refused(RejectReason.ILLEGAL_TRANSITION, "advance: no ramp is running")
    if s.paused:
        raise _Refused(RejectReason.ILLEGAL_TRANSITION, "advance: the ramp is paused")
    if cmd.expected_epoch is None:
        raise _Refused(RejectReason.INVALID_ARGS, "advance needs expected_epoch (no step skips)")
    step = s.ramp.current
    held_ms = now_ms - s.ramp.step_started_ms
    if held_ms < hold_ms(step):
        raise _Refused(
            RejectReason.TOO_EARLY,
            f"advance: step {s.ramp.step + 1} held {held_ms / 1000:.1f}s of {step.min_hold_s:g}s",
        )
    if args.samples is None or args.samples < step.min_samples:
        raise _Refused(
            RejectReason.TOO_EARLY,
            f"advance: step {s.ramp.step + 1} has {args.samples} of {step.min_samples} samples",
        )
    if not s.ramp.is_last:
        nxt = s.ramp.step + 1
        ramp = RampProgress(
            plan=s.ramp.plan, step=nxt, step_started_ms=now_ms, step_epoch=s.epoch + 1
        )
        return msgspec.structs.replace(s, share_bp=s.ramp.plan[nxt].share_bp, ramp=ramp)
    if step.share_bp == BUCKETS:
        return msgspec.structs.replace(
            s, mode=Mode.PROMOTED, share_bp=BUCKETS, promoted_since_ms=now_ms, ramp=None
        )
    return msgspec.structs.replace(s, ramp=None)  # ramp done: stays canary at the last share


def _same_policy(a: RolloutState, b: RolloutState) -> bool:
    return (a.mode, a.share_bp, a.ramp, a.paused, a.retired, a.score_shadow_arm) == (
        b.mode,
        b.share_bp,
        b.ramp,
        b.paused,
        b.retired,
        b.score_shadow_arm,
    )


def apply(
    state: RolloutState,
    command: ControlCommand,
    now_ms: int,
    *,
    config: ControlConfig = DEFAULT_CONFIG,
) -> Outcome:
    """Apply an *authenticated* command at ``now_ms`` (the record timestamp). Pure.

    Checks, in order: rollout name, duplicate id, retired, epoch compare-and-set, arguments,
    transition rules, no-op. An applied command bumps the epoch by exactly one.
    """
    cmd = command
    if cmd.rollout != state.rollout:
        return Rejected(RejectReason.OTHER_ROLLOUT, f"command is for rollout {cmd.rollout!r}", cmd)
    if cmd.command_id in state.applied_ids:
        return Duplicate(cmd)
    if state.retired:
        return Rejected(RejectReason.RETIRED, "the rollout is retired; start a new one", cmd)
    if cmd.expected_epoch is not None and cmd.expected_epoch != state.epoch:
        return Rejected(
            RejectReason.EPOCH_CONFLICT,
            f"expected epoch {cmd.expected_epoch}, rollout is at {state.epoch}",
            cmd,
        )
    try:
        _check_args(cmd)
        new = _transition(state, cmd, now_ms, config)
    except _Refused as exc:
        return Rejected(exc.reason, exc.detail, cmd)
    if cmd.action != "rollback" and _same_policy(state, new):
        return Rejected(RejectReason.NO_CHANGE, f"{cmd.action} would change nothing", cmd)
    new = msgspec.structs.replace(
        new,
        epoch=state.epoch + 1,
        last_command_id=cmd.command_id,
        since_ms=now_ms,
        applied_ids=state.applied_ids | {cmd.command_id},
    )
    return Applied(new, state.epoch, new.epoch, cmd)


# --------------------------------------------------------------------------- ramps


def hold_ms(step: RampStep) -> int:
    """A step's hold in whole milliseconds (rounded up); :func:`tick` and :func:`apply` use
    the same integer comparison, so they never disagree at the boundary."""
    return math.ceil(step.min_hold_s * 1000)


def advance_command_id(state: RolloutState) -> str:
    """Deterministic, so two instances that both decide to advance the same step issue the
    same id: the first applies, the second is a :class:`Duplicate`."""
    return f"advance:{state.rollout}:{state.epoch}"


def tick(
    state: RolloutState,
    now_ms: int,
    samples_compared: int,
    guard_ok: bool,
    *,
    config: ControlConfig = DEFAULT_CONFIG,
    issued_by: str = "sidecar",
) -> Applied | None:
    """Should the ramp move on? ``samples_compared`` counts comparisons in the current step
    (``policy_epoch >= state.ramp.step_epoch``); ``now_ms`` is the wall clock.

    Returns the :class:`Applied` an ``advance`` would produce, or ``None``. At most one step
    per call. The Kafka layer must not install ``new_state`` directly: it signs and publishes
    ``applied.command`` (which carries ``expected_epoch``), and every instance applies it from
    the control topic, so a step is never skipped nor applied twice.
    """
    ramp = state.ramp
    if ramp is None or state.paused or state.retired or not guard_ok:
        return None
    step = ramp.current
    if samples_compared < step.min_samples:
        return None
    if now_ms - ramp.step_started_ms < hold_ms(step):
        return None
    last = ramp.is_last
    cmd = ControlCommand(
        command_id=advance_command_id(state),
        rollout=state.rollout,
        action="advance",
        args=CommandArgs(samples=samples_compared),
        issued_by=issued_by,
        reason=(
            f"ramp step {ramp.step + 1}/{len(ramp.plan)} ({step.share_bp} bp) held "
            f"{(now_ms - ramp.step_started_ms) / 1000:.0f}s with {samples_compared} samples"
            + ("; ramp complete" if last else "")
        ),
        issued_at_ms=now_ms,
        expected_epoch=state.epoch,
    )
    outcome = apply(state, cmd, now_ms, config=config)
    return outcome if isinstance(outcome, Applied) else None


# --------------------------------------------------------------------------- records & replay


def process_record(
    state: RolloutState,
    record: bytes | ControlCommand,
    record_ts_ms: int,
    *,
    keyring: Keyring,
    config: ControlConfig = DEFAULT_CONFIG,
) -> Outcome:
    """Decode, authenticate, check freshness against the record timestamp, and apply.

    Used identically for live records and on replay, so both reach the same verdicts. Total:
    whatever the record holds, the answer is an outcome (an unexpected error is a
    ``Rejected(UNPROCESSABLE)`` naming it), never an exception -- one record must not stop
    the control tail or the start-up replay of every instance.
    """
    cmd: ControlCommand | Rejected | None = None
    try:
        cmd = authenticate(
            record,
            record_ts_ms,
            keyring=keyring,
            freshness=config.freshness,
            require_signature=config.require_signature,
        )
        if isinstance(cmd, Rejected):
            return cmd
        return apply(state, cmd, record_ts_ms, config=config)
    except Exception as exc:
        command = cmd if isinstance(cmd, ControlCommand) else None
        return Rejected(RejectReason.UNPROCESSABLE, error_text(exc), command)


def replay(
    records: Iterable[tuple[bytes | ControlCommand, int]],
    *,
    initial: RolloutState,
    keyring: Keyring,
    config: ControlConfig = DEFAULT_CONFIG,
) -> tuple[RolloutState, list[Outcome]]:
    """Rebuild a rollout's state from its control-topic history of ``(value, record_ts_ms)``.

    Staleness is judged against each record's own timestamp, never the wall clock: a command
    that was fresh when written stays valid when replayed years later, and all instances agree.
    Records for other rollouts come back as ``Rejected(OTHER_ROLLOUT)``; do not audit those.
    """
    state = initial
    outcomes: list[Outcome] = []
    for value, ts in records:
        outcome = process_record(state, value, ts, keyring=keyring, config=config)
        if isinstance(outcome, Applied):
            state = outcome.new_state
        outcomes.append(outcome)
    return state, outcomes


# --------------------------------------------------------------------------- wire records

OutcomeKind = Literal["applied", "rejected", "duplicate"]


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the audit topic: what happened to one control record, on one instance."""

    outcome: OutcomeKind
    instance_id: str
    applied_at_ms: int
    command_id: str | None = None
    rollout: str | None = None
    action: str | None = None
    issued_by: str | None = None
    issued_at_ms: int | None = None
    key_id: str | None = None
    #: The operator's reason for the command.
    command_reason: str | None = None
    #: Rejection code (:class:`RejectReason` value) and its human-readable detail.
    reason: str | None = None
    detail: str | None = None
    from_epoch: int | None = None
    to_epoch: int | None = None
    mode: str | None = None
    share_bp: int | None = None
    schema_version: str = "1.0"


def audit_record(outcome: Outcome, *, instance_id: str, applied_at_ms: int) -> AuditRecord:
    """The audit-topic record for ``outcome``."""
    if isinstance(outcome, Applied):
        record = AuditRecord(
            outcome="applied",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            from_epoch=outcome.from_epoch,
            to_epoch=outcome.to_epoch,
            mode=outcome.new_state.mode.value,
            share_bp=outcome.new_state.share_bp,
        )
    elif isinstance(outcome, Duplicate):
        record = AuditRecord(
            outcome="duplicate",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            reason="duplicate",
        )
    else:
        record = AuditRecord(
            outcome="rejected",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            reason=outcome.reason.value,
            detail=outcome.detail,
        )
    cmd = outcome.command
    if cmd is None:
        return record
    return msgspec.structs.replace(
        record,
        command_id=cmd.command_id,
        rollout=cmd.rollout,
        action=cmd.action,
        issued_by=cmd.issued_by,
        issued_at_ms=cmd.issued_at_ms,
        key_id=cmd.key_id,
        command_reason=cmd.reason,
    )


class ModelHealth(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One model arm as an instance runs it: which exact model (the manifest digest names its
    contract and, for registry loaders, the registry version) and its circuit breaker."""

    arm: Literal["champion", "candidate"]
    model: str
    version: str
    manifest_digest: str | None = None
    #: ``off`` when the breaker is disabled (the model is called whatever happens).
    breaker: Literal["off", "closed", "half_open", "open"] = "off"
    #: Times the breaker opened since the instance started.
    breaker_opened: int = 0
    #: Registry loaders (``mlflow``): the registry version the target resolved to.
    registry_version: str | None = None


class InstanceStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Heartbeat of one sidecar instance: the policy it runs, so operators (and ``sidecar ctl
    status``) can see every instance converge on the same epoch."""

    instance_id: str
    rollout: str
    epoch: int
    mode: str
    share_bp: int
    ts_ms: int
    last_command_id: str | None = None
    paused: bool = False
    ramp_step: int | None = None  # 1-based
    ramp_steps: int | None = None
    score_shadow_arm: bool = True
    retired: bool = False
    host: str | None = None
    pid: int | None = None
    assigned_partitions: int | None = None
    started_at_ms: int | None = None
    version: str | None = None
    #: The models' health (absent in heartbeats of older instances).
    models: list[ModelHealth] | None = None
    schema_version: str = "1.0"


def instance_status(
    state: RolloutState,
    *,
    instance_id: str,
    ts_ms: int,
    host: str | None = None,
    pid: int | None = None,
    assigned_partitions: int | None = None,
    started_at_ms: int | None = None,
    version: str | None = None,
    models: list[ModelHealth] | None = None,
) -> InstanceStatus:
    """The heartbeat record for an instance running ``state``."""
    return InstanceStatus(
        instance_id=instance_id,
        rollout=state.rollout,
        epoch=state.epoch,
        mode=state.mode.value,
        share_bp=state.share_bp,
        ts_ms=ts_ms,
        last_command_id=state.last_command_id,
        paused=state.paused,
        ramp_step=None if state.ramp is None else state.ramp.step + 1,
        ramp_steps=None if state.ramp is None else len(state.ramp.plan),
        score_shadow_arm=state.score_shadow_arm,
        retired=state.retired,
        host=host,
        pid=pid,
        assigned_partitions=assigned_partitions,
        started_at_ms=started_at_ms,
        version=version,
        models=models,
    )
