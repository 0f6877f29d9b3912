"""The rollout state machine: pure functions from (state, control record) to a new state.

No I/O. :func:`step` is deterministic in its arguments, so every sidecar instance that reads
the same control-topic records (with the broker's append time of each) converges on the same
:class:`RolloutState`; :func:`replay` does exactly that at start-up. See STATES.md.

What makes a command apply, and apply once (the attacks it answers are in STATES.md):

* it is signed by a key of the trust file whose role may sign its action, valid at the
  record's time, with ``issued_by`` bound to the key's principal;
* the record's time is the broker's append time (or CreateTime is explicitly allowed), and the
  command was issued within the freshness window of it;
* its id was never seen before -- applied (then it is an idempotent duplicate) or refused
  after authentication (then it is refused again as ``replayed``);
* it was issued against the rollout's current epoch (``expected_epoch``); only ``rollback``
  goes without, because rolling back is always safe;
* the transition is legal from the current state, and the guards' gates allow it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from ..hashing import BUCKETS
from ..outputs.lifecycle import OutputState, link_ok
from ..routing import Mode, RoutingPolicy
from ..timefmt import utc
from ..untrusted import error_text
from .commands import (
    AUTHENTIC_REJECTIONS,
    OUTPUT_ACTIONS,
    CommandArgs,
    ControlCommand,
    Duplicate,
    Freshness,
    RampStep,
    Rejected,
    RejectReason,
    Verdict,
    authenticate,
    validate_plan,
)
from .keys import TrustStore

#: ``none``: ramps advance on hold and samples alone. ``no_stop`` (default): and only while
#: the latest guard verdict of the epoch does not say stop. ``verdict``: and only with a
#: guard verdict that says go, based on a window that ended after the step started.
RampGate = Literal["none", "no_stop", "verdict"]
#: ``quality``: promotion (by ``promote`` or by a ramp's last advance to 100%) needs the
#: latest verdict of the epoch to say the candidate's quality passes its gate.
PromoteGate = Literal["none", "quality"]


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Rules of the state machine. Every instance must run with the same values, or replays
    may diverge."""

    #: A promoted rollout may retire its old champion only after this long.
    min_promoted_age_s: float = 3600.0
    freshness: Freshness = field(default_factory=Freshness)
    #: ``False`` only for local demos: unsigned commands are then accepted.
    require_signature: bool = True
    #: Accept records whose time the producer chose (CreateTime). Off in production: the
    #: control topic must use ``message.timestamp.type=LogAppendTime``.
    allow_create_time: bool = False
    ramp_gate: RampGate = "no_stop"
    promote_gate: PromoteGate = "none"


DEFAULT_CONFIG = ControlConfig()


@dataclass(frozen=True, slots=True)
class ControlRecord:
    """One record of the control topic, as the state machine sees it."""

    value: bytes | ControlCommand
    #: The record's timestamp (epoch ms): the broker's append time when ``log_append_time``.
    ts_ms: int
    log_append_time: bool = True


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

    ``applied_ids`` and ``seen_ids`` hold *every* applied or authentic-but-refused command id:
    commands arrive at operator pace, so the sets stay small, and a bounded window would let an
    old command apply once it fell out.
    """

    rollout: str
    mode: Mode = Mode.SHADOW
    #: Share of buckets the candidate decides: 0 in shadow/rolled_back, 10000 when promoted.
    share_bp: int = 0
    epoch: int = 0
    #: Frozen where it stands by ``pause`` (a running ramp, or a hold in shadow or canary):
    #: no advance, no promote, no change of share until ``resume``; ``rollback`` always works.
    paused: bool = False
    ramp: RampProgress | None = None
    has_candidate: bool = True
    promoted_since_ms: int | None = None
    retired: bool = False
    score_shadow_arm: bool = True
    last_command_id: str | None = None
    since_ms: int = 0
    applied_ids: frozenset[str] = frozenset()
    seen_ids: frozenset[str] = frozenset()
    #: The newest guard verdict (``guards_ok``) at this epoch (cleared when the epoch moves).
    verdict: Verdict | None = None
    #: The newest quality verdict (``quality_ok``). About the models, not the routing: it
    #: survives epoch changes (a ramp step, a pause), so labels that arrive days later can
    #: still gate a promotion.
    quality: Verdict | None = None
    #: The older output versions (``outputs.versions``) and where each stands: changed by
    #: ``deprecate`` and ``sunset``, which leave the epoch alone.
    outputs: tuple[OutputState, ...] = ()

    def output(self, version: str) -> OutputState | None:
        return next((o for o in self.outputs if o.version == version), None)


@dataclass(frozen=True, slots=True)
class Applied:
    """Outcome: ``command`` moved the rollout from ``from_epoch`` to ``to_epoch`` (+1)."""

    new_state: RolloutState
    from_epoch: int
    to_epoch: int
    command: ControlCommand


@dataclass(frozen=True, slots=True)
class Noted:
    """Outcome: a guard verdict, or a ``deprecate``/``sunset`` of an output version, was
    recorded; routing and epoch are unchanged."""

    new_state: RolloutState
    command: ControlCommand


Outcome = Applied | Noted | Rejected | Duplicate


def initial_state(
    rollout: str,
    *,
    mode: Mode = Mode.SHADOW,
    share_bp: int | None = None,
    has_candidate: bool = True,
    score_shadow_arm: bool = True,
    now_ms: int = 0,
    outputs: tuple[OutputState, ...] = (),
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
        outputs=outputs,
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


# --------------------------------------------------------------------------- gates


def ramp_gate_holds(state: RolloutState, config: ControlConfig) -> str | None:
    """Why the guards hold the ramp back now (None: they do not)."""
    verdict, ramp = state.verdict, state.ramp
    if config.ramp_gate == "none":
        return None
    if verdict is not None and verdict.guards_ok is False:
        return f"a guard says stop: {verdict.detail or 'no detail'}"
    if config.ramp_gate == "verdict":
        if verdict is None:
            return "no guard verdict at this epoch yet (control.ramp_gate = verdict)"
        if ramp is not None and verdict.window_end_ms < ramp.step_started_ms:
            return "the latest guard verdict is about a window before this step started"
    return None


def promote_gate_holds(
    state: RolloutState, config: ControlConfig, candidate_version: str | None = None
) -> str | None:
    """Why the quality gate holds back promoting ``candidate_version`` now (None: it does
    not). A verdict about another candidate version never counts (the candidate was
    replaced since, or instances still run the old one); nor does one that names a version
    when the promotion names none."""
    if config.promote_gate == "none":
        return None
    verdict = state.quality
    if verdict is None or verdict.quality_ok is None:
        return "no quality verdict yet (control.promote_gate = quality)"
    judged = verdict.candidate_version
    if judged is not None and candidate_version is None:
        return (
            f"the promotion does not name the candidate version it promotes (args."
            f"candidate_version) and the quality verdict is about candidate {judged}"
        )
    if judged is not None and judged != candidate_version:
        return (
            f"the latest quality verdict is about candidate {judged}, not {candidate_version}: "
            "wait for a verdict about the candidate the instances run"
        )
    if not verdict.quality_ok:
        return f"the quality gate holds: {verdict.detail or 'candidate not yet good enough'}"
    return None


# --------------------------------------------------------------------------- apply

_ARGS_BY_ACTION: dict[str, frozenset[str]] = {
    "shadow": frozenset({"score_shadow_arm"}),
    "canary": frozenset({"share_bp", "score_shadow_arm"}),
    "ramp": frozenset({"plan", "score_shadow_arm"}),
    "promote": frozenset({"score_shadow_arm", "candidate_version"}),
    "rollback": frozenset({"score_shadow_arm"}),
    "pause": frozenset(),
    "resume": frozenset(),
    "retire": frozenset(),
    "advance": frozenset({"samples", "candidate_version"}),
    "verdict": frozenset({"verdict"}),
    "deprecate": frozenset({"output_version", "sunset_ms", "deprecation_ms", "link"}),
    "sunset": frozenset({"output_version", "active_readers", "force"}),
}
#: Actions that change the share while a pause holds the rollout.
_HELD_BACK = frozenset({"shadow", "canary", "ramp", "promote", "advance"})


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

    if s.paused and a in _HELD_BACK:
        raise _Refused(
            RejectReason.ILLEGAL_TRANSITION,
            f"{a}: the rollout is held by a pause where it stands; resume first (or roll back)",
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
        held = promote_gate_holds(s, cfg, args.candidate_version)
        if held:
            raise _Refused(RejectReason.TOO_EARLY, f"promote: {held}")
        return msgspec.structs.replace(
            s, mode=Mode.PROMOTED, share_bp=BUCKETS, promoted_since_ms=now_ms, **no_ramp
        )

    if a == "pause":
        if s.mode not in (Mode.SHADOW, Mode.CANARY):
            raise _Refused(
                RejectReason.ILLEGAL_TRANSITION,
                f"pause: nothing to hold in {s.mode.value} (roll back, or nothing to do)",
            )
        if s.paused:
            raise _Refused(RejectReason.NO_CHANGE, "pause: the rollout is already held")
        return msgspec.structs.replace(s, paused=True)

    if a == "resume":
        if not s.paused:
            raise _Refused(RejectReason.ILLEGAL_TRANSITION, "resume: the rollout is not held")
        if s.ramp is None:
            return msgspec.structs.replace(s, paused=False)
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
    held = ramp_gate_holds(s, cfg)
    if held:
        raise _Refused(RejectReason.TOO_EARLY, f"advance: {held}")
    if not s.ramp.is_last:
        nxt = s.ramp.step + 1
        ramp = RampProgress(
            plan=s.ramp.plan, step=nxt, step_started_ms=now_ms, step_epoch=s.epoch + 1
        )
        return msgspec.structs.replace(s, share_bp=s.ramp.plan[nxt].share_bp, ramp=ramp)
    if step.share_bp == BUCKETS:
        held = promote_gate_holds(s, cfg, args.candidate_version)
        if held:
            raise _Refused(RejectReason.TOO_EARLY, f"advance to promoted: {held}")
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


def _quality_only(cmd: ControlCommand) -> bool:
    """A verdict about quality alone: about the models, not an epoch (needs none)."""
    v = cmd.args.verdict
    return cmd.action == "verdict" and v is not None and v.guards_ok is None


def _note_verdict(state: RolloutState, cmd: ControlCommand) -> RolloutState:
    """Record a verdict's guard part (monotone in its window per epoch) and quality part
    (monotone in its window)."""
    verdict = cmd.args.verdict
    if verdict is None or (verdict.guards_ok is None and verdict.quality_ok is None):
        raise _Refused(
            RejectReason.INVALID_ARGS, "verdict needs args.verdict with guards_ok or quality_ok"
        )
    for part, known in (("guards_ok", state.verdict), ("quality_ok", state.quality)):
        if getattr(verdict, part) is None or known is None:
            continue
        if part == "quality_ok" and (
            known.candidate_version,
            known.champion_version,
        ) != (verdict.candidate_version, verdict.champion_version):
            continue  # about other models: their windows are another sequence
        if verdict.window_end_ms <= known.window_end_ms:
            raise _Refused(
                RejectReason.NO_CHANGE,
                f"verdict ({part}) about a window ending {verdict.window_end_ms}, not after the "
                f"one in force ({known.window_end_ms})",
            )
    new = state
    if verdict.guards_ok is not None:
        new = msgspec.structs.replace(new, verdict=verdict)
    if verdict.quality_ok is not None:
        new = msgspec.structs.replace(new, quality=verdict)
    return new


def _output_command(state: RolloutState, cmd: ControlCommand, now_ms: int) -> RolloutState:
    """``deprecate`` or ``sunset`` of an older output version: the new state or _Refused.

    A sunset nobody is surprised by: the version must have been deprecated, its announced
    sunset date reached, and the issuer must have seen no consumer group still reading it
    (``args.active_readers`` = 0, counted by ``sidecar ctl`` from the cluster just before
    signing: the state machine is pure and cannot look). ``args.force`` skips these three
    checks; the command's reason says why, in the audit.
    """
    args = cmd.args
    name = args.output_version
    if name is None:
        raise _Refused(RejectReason.INVALID_ARGS, f"{cmd.action} needs args.output_version")
    current = state.output(name)
    if current is None:
        known = ", ".join(o.version for o in state.outputs) or "none"
        raise _Refused(
            RejectReason.INVALID_ARGS,
            f"{cmd.action}: no older output version {name!r} (configured: {known})",
        )
    if current.is_sunset:
        raise _Refused(RejectReason.NO_CHANGE, f"{cmd.action}: output version {name} is sunset")
    if cmd.action == "deprecate":
        if args.sunset_ms is None:
            raise _Refused(RejectReason.INVALID_ARGS, "deprecate needs args.sunset_ms")
        if args.link is not None and not link_ok(args.link):
            raise _Refused(RejectReason.INVALID_ARGS, "deprecate: link is not a URL")
        deprecation = args.deprecation_ms
        if deprecation is None:  # now, unless deprecated already (postponing a sunset)
            deprecation = current.deprecation_ms if current.deprecated_at(now_ms) else now_ms
        assert deprecation is not None
        if args.sunset_ms < max(now_ms, deprecation):
            raise _Refused(
                RejectReason.INVALID_ARGS,
                "deprecate: the sunset date must be after the deprecation and not in the past",
            )
        if current.sunset_ms is not None and args.sunset_ms < current.sunset_ms:
            raise _Refused(
                RejectReason.ILLEGAL_TRANSITION,
                "deprecate: a sunset date already announced can be postponed, never brought "
                "forward (consumers plan by it)",
            )
        new = msgspec.structs.replace(
            current,
            deprecation_ms=deprecation,
            sunset_ms=args.sunset_ms,
            link=args.link if args.link is not None else current.link,
        )
        if new == current:
            raise _Refused(RejectReason.NO_CHANGE, "deprecate would change nothing")
    else:
        if not args.force:
            if not current.deprecated_at(now_ms):
                raise _Refused(
                    RejectReason.ILLEGAL_TRANSITION,
                    f"sunset: output version {name} is not deprecated yet: deprecate it "
                    "(with a sunset date) first, or force",
                )
            if current.sunset_ms is None or current.sunset_ms > now_ms:
                raise _Refused(
                    RejectReason.TOO_EARLY,
                    f"sunset: output version {name} was announced to stay until "
                    f"{_when(current.sunset_ms)}; wait, or force",
                )
            if args.active_readers is None or args.active_readers > 0:
                raise _Refused(
                    RejectReason.ACTIVE_READERS,
                    f"sunset: {_readers(args.active_readers)} consumer group(s) still read "
                    f"output version {name}; migrate them, or force with a reason",
                )
        new = msgspec.structs.replace(current, sunset_at_ms=now_ms)
    outputs = tuple(new if o.version == name else o for o in state.outputs)
    return msgspec.structs.replace(state, outputs=outputs)


def _when(ms: int | None) -> str:
    return "a date not yet announced" if ms is None else utc(ms)


def _readers(count: int | None) -> str:
    return "an unknown number of" if count is None else str(count)


def apply(
    state: RolloutState,
    command: ControlCommand,
    now_ms: int,
    *,
    config: ControlConfig = DEFAULT_CONFIG,
) -> Outcome:
    """Apply an *authenticated* command at ``now_ms`` (the record's time). Pure.

    Checks, in order: rollout name, already applied (duplicate), already seen (replayed),
    retired, epoch (required but for ``rollback``), arguments, transition rules and gates,
    no-op. An applied command bumps the epoch by exactly one; a verdict changes no epoch.
    """
    cmd = command
    if cmd.rollout != state.rollout:
        return Rejected(RejectReason.OTHER_ROLLOUT, f"command is for rollout {cmd.rollout!r}", cmd)
    if cmd.command_id in state.applied_ids:
        return Duplicate(cmd)
    if cmd.command_id in state.seen_ids:
        return Rejected(
            RejectReason.REPLAYED,
            f"command {cmd.command_id} was refused before; a refused command never applies",
            cmd,
        )
    if state.retired and cmd.action not in OUTPUT_ACTIONS:
        return Rejected(RejectReason.RETIRED, "the rollout is retired; start a new one", cmd)
    if cmd.expected_epoch is None and cmd.action != "rollback" and not _quality_only(cmd):
        return Rejected(
            RejectReason.INVALID_ARGS,
            f"{cmd.action} needs expected_epoch (the epoch it was issued against)",
            cmd,
        )
    if cmd.expected_epoch is not None and cmd.expected_epoch != state.epoch:
        return Rejected(
            RejectReason.EPOCH_CONFLICT,
            f"issued against epoch {cmd.expected_epoch}, the rollout is at {state.epoch}",
            cmd,
        )
    try:
        _check_args(cmd)
        if cmd.action == "verdict":
            return Noted(_note_verdict(state, cmd), cmd)
        if cmd.action in OUTPUT_ACTIONS:
            new_outputs = _output_command(state, cmd, now_ms)
            return Noted(
                msgspec.structs.replace(
                    new_outputs, applied_ids=state.applied_ids | {cmd.command_id}
                ),
                cmd,
            )
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
        verdict=None,
    )
    return Applied(new, state.epoch, new.epoch, cmd)


def next_state(state: RolloutState, outcome: Outcome) -> RolloutState:
    """The state after ``outcome``: the new state of an applied command or a noted verdict; an
    authentic command that was refused is remembered as seen (its id never applies later)."""
    if isinstance(outcome, Applied | Noted):
        return outcome.new_state
    if (
        isinstance(outcome, Rejected)
        and outcome.command is not None
        and outcome.command.rollout == state.rollout
        and outcome.command.action != "verdict"
        and outcome.reason in AUTHENTIC_REJECTIONS
        and outcome.command.command_id not in state.seen_ids
    ):
        return msgspec.structs.replace(
            state, seen_ids=state.seen_ids | {outcome.command.command_id}
        )
    return state


# --------------------------------------------------------------------------- ramps


def hold_ms(step: RampStep) -> int:
    """A step's hold in whole milliseconds (rounded up); :func:`tick` and :func:`apply` use
    the same integer comparison, so they never disagree at the boundary."""
    return math.ceil(step.min_hold_s * 1000)


def advance_command_id(state: RolloutState, issuer: str, attempt: int = 0) -> str:
    """Unique per (epoch, issuer, attempt): two instances advancing at once issue two ids, and
    the first to apply moves the epoch, so the other is an ``epoch_conflict`` -- a step is
    never skipped, and a refused advance (e.g. ``too_early`` under clock skew) can be retried
    under a new id."""
    return f"advance:{state.rollout}:{state.epoch}:{issuer}:{attempt}"


def tick(
    state: RolloutState,
    now_ms: int,
    samples_compared: int,
    *,
    config: ControlConfig = DEFAULT_CONFIG,
    issued_by: str = "sidecar",
    attempt: int = 0,
    candidate_version: str | None = None,
) -> Applied | None:
    """Should the ramp move on? ``samples_compared`` counts comparisons in the current step
    (``policy_epoch >= state.ramp.step_epoch``); ``now_ms`` is the wall clock. The guards are
    asked through the verdict in force (``control.ramp_gate``).

    Returns the :class:`Applied` an ``advance`` would produce, or ``None``. At most one step
    per call. The Kafka layer must not install ``new_state`` directly: it signs and publishes
    ``applied.command`` (which carries ``expected_epoch``), and every instance applies it from
    the control topic, so a step is never skipped nor applied twice.
    """
    ramp = state.ramp
    if ramp is None or state.paused or state.retired:
        return None
    step = ramp.current
    if samples_compared < step.min_samples:
        return None
    if now_ms - ramp.step_started_ms < hold_ms(step):
        return None
    last = ramp.is_last
    cmd = ControlCommand(
        command_id=advance_command_id(state, issued_by, attempt),
        rollout=state.rollout,
        action="advance",
        args=CommandArgs(samples=samples_compared, candidate_version=candidate_version),
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
    record: ControlRecord,
    *,
    trust: TrustStore,
    config: ControlConfig = DEFAULT_CONFIG,
) -> Outcome:
    """Check the record's time, decode, authenticate, check freshness, and apply.

    Used identically for live records and on replay, so both reach the same verdicts. Total:
    whatever the record holds, the answer is an outcome (an unexpected error is a
    ``Rejected(UNPROCESSABLE)`` naming it), never an exception -- one record must not stop
    the control tail or the start-up replay of every instance. Use :func:`next_state` (or
    :func:`step`) for the state after it.
    """
    cmd: ControlCommand | Rejected | None = None
    try:
        if not record.log_append_time and not config.allow_create_time:
            return Rejected(
                RejectReason.UNTRUSTED_TIME,
                "the record's time was set by its producer (CreateTime): the control topic "
                "must use message.timestamp.type=LogAppendTime (or set "
                "control.allow_create_time = true where the broker cannot, e.g. the embedded "
                "one)",
            )
        cmd = authenticate(
            record.value,
            record.ts_ms,
            trust=trust,
            freshness=config.freshness,
            require_signature=config.require_signature,
        )
        if isinstance(cmd, Rejected):
            return cmd
        return apply(state, cmd, record.ts_ms, config=config)
    except Exception as exc:
        command = cmd if isinstance(cmd, ControlCommand) else None
        return Rejected(RejectReason.UNPROCESSABLE, error_text(exc), command)


def step(
    state: RolloutState,
    record: ControlRecord,
    *,
    trust: TrustStore,
    config: ControlConfig = DEFAULT_CONFIG,
) -> tuple[RolloutState, Outcome]:
    """:func:`process_record` and :func:`next_state` in one."""
    outcome = process_record(state, record, trust=trust, config=config)
    return next_state(state, outcome), outcome


def replay(
    records: Iterable[ControlRecord],
    *,
    initial: RolloutState,
    trust: TrustStore,
    config: ControlConfig = DEFAULT_CONFIG,
) -> tuple[RolloutState, list[Outcome]]:
    """Rebuild a rollout's state from its control-topic history.

    Times are each record's own, never the wall clock: a command that was fresh when written
    stays valid when replayed years later, and all instances agree.
    """
    state = initial
    outcomes: list[Outcome] = []
    for record in records:
        state, outcome = step(state, record, trust=trust, config=config)
        outcomes.append(outcome)
    return state, outcomes
