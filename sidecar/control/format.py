"""What ``sidecar ctl status`` and ``history`` print. Every line goes through
:func:`~sidecar.untrusted.printable`: records are untrusted and must not reach an operator's
terminal with escape sequences or line breaks of their own."""

from __future__ import annotations

import datetime as dt

import msgspec

from ..errors import SidecarError
from ..timefmt import humanise
from ..untrusted import printable
from .client import ControlView, Heartbeat, HistoryEntry, candidate_to_promote
from .commands import Duplicate, Rejected, format_ramp_plan
from .records import ModelHealth
from .state_machine import (
    Applied,
    ControlConfig,
    Noted,
    Outcome,
    RolloutState,
    promote_gate_holds,
    ramp_gate_holds,
)
from .wait import STALE_HEARTBEATS


def when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def ago(now: int, ms: int) -> str:
    s = max(0.0, (now - ms) / 1000)
    if s < 120:
        return f"{s:.1f}s ago"
    return f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def describe(state: RolloutState) -> str:
    text = f"{state.mode.value}"
    if state.share_bp and state.mode.value == "canary":
        text += f" {state.share_bp / 100:g}% ({state.share_bp} bp)"
    if state.ramp is not None:
        step = state.ramp.current
        text += f", ramp step {state.ramp.step + 1}/{len(state.ramp.plan)} " + (
            f"({format_ramp_plan([step])})"
        )
    if state.paused:
        text += ", HELD by a pause (resume to move on)"
    if state.retired:
        text += ", RETIRED"
    return text


def outcome_text(outcome: Outcome) -> str:
    if isinstance(outcome, Applied):
        return f"applied -> epoch {outcome.to_epoch}"
    if isinstance(outcome, Noted):
        return "noted"
    if isinstance(outcome, Duplicate):
        return "duplicate (ignored)"
    assert isinstance(outcome, Rejected)
    return f"REJECTED {outcome.reason.value}: {outcome.detail}"


def history_line(entry: HistoryEntry) -> str:
    cmd, ts = entry.command, entry.ts_ms
    if cmd is None:
        return f"  {when(ts)}  @{entry.offset} (not a command)  {outcome_text(entry.outcome)}"
    args = " ".join(
        f"{k}={format_ramp_plan(v) if k == 'plan' else v}"
        for k, v in msgspec.structs.asdict(cmd.args).items()
        if v is not None
    )
    epoch = "" if cmd.expected_epoch is None else f" @epoch {cmd.expected_epoch}"
    return (
        f"  {when(ts)}  {cmd.action:8} {args + ' ' if args else ''}[{cmd.command_id}]{epoch} "
        f"by {cmd.issued_by} ({cmd.key_id or 'unsigned'}): {humanise(cmd.reason)!r}  "
        f"{outcome_text(entry.outcome)}"
    )


def _model_line(m: ModelHealth) -> str:
    breaker = m.breaker.upper() if m.breaker in ("open", "half_open") else m.breaker
    opened = f", opened {m.breaker_opened}x" if m.breaker_opened else ""
    registry = f" (registry version {m.registry_version})" if m.registry_version else ""
    return (
        f"    {m.arm:9} {m.model} {m.version}{registry}  {m.manifest_digest or '-'}  "
        f"breaker {breaker}{opened}"
    )


def _instance_lines(view: ControlView, beat: Heartbeat) -> list[str]:
    s = beat.status
    stale = view.now_ms - s.ts_ms > view.stale_ms
    expected = view.states.get(s.rollout)
    lag = (
        ""
        if expected is None or s.epoch == expected.epoch
        else f" (behind: rollout is at epoch {expected.epoch})"
    )
    trust = f"signed {beat.signer}" if beat.verified else "UNVERIFIED (not signed by a trusted key)"
    lines = [
        f"  {s.instance_id:32} {'STALE' if stale else 'live ':5}  epoch {s.epoch:<4} "
        f"{s.mode:11} {s.share_bp:>5} bp  partitions {s.assigned_partitions}  "
        f"seen {ago(view.now_ms, s.ts_ms)}{lag}  {trust}"
    ]
    if s.champion_fallbacks:
        lines.append(
            f"    CHAMPION FALLBACKS: the candidate decided {s.champion_fallbacks} record(s) "
            "meant for the champion, because the champion failed"
        )
    lines.extend(_model_line(m) for m in s.models or [])
    return lines


def _promotion_held(
    view: ControlView, rollout: str, state: RolloutState, rules: ControlConfig
) -> str | None:
    """Why promoting the candidate the live instances run would be refused now (the judged
    candidate when no instance is live)."""
    try:
        running = candidate_to_promote(view, rollout, None)
    except SidecarError as exc:
        return str(exc)
    if running is None and state.quality is not None:
        running = state.quality.candidate_version
    return promote_gate_holds(state, rules, running)


def format_status(
    view: ControlView, rollout: str | None, last: int, rules: ControlConfig | None = None
) -> str:
    lines = []
    for name, state in sorted(view.states.items()):
        if rollout is not None and name != rollout:
            continue
        since = (
            "start (configured)"
            if state.epoch == 0
            else f"{when(state.since_ms)} ({ago(view.now_ms, state.since_ms)})"
        )
        lines.append(f"rollout {name}: {describe(state)}, epoch {state.epoch}, since {since}")
        if state.last_command_id:
            lines.append(f"  last command: {state.last_command_id}")
        if state.verdict is not None:
            v = state.verdict
            lines.append(
                f"  guard verdict: {'go' if v.guards_ok else 'STOP'} (window to "
                f"{when(v.window_end_ms)}): {humanise(v.detail) or '-'}"
            )
        if state.quality is not None:
            q = state.quality
            about = (
                f" about candidate {q.candidate_version} vs champion {q.champion_version}"
                if q.candidate_version is not None
                else ""
            )
            lines.append(
                f"  quality verdict: {'ok' if q.quality_ok else 'NOT ok'}{about} (window to "
                f"{when(q.window_end_ms)}): {humanise(q.detail) or '-'}"
            )
        if rules is not None:
            if state.ramp is not None and (held := ramp_gate_holds(state, rules)):
                lines.append(f"  ramp held back: {held}")
            if state.mode.value in ("shadow", "canary") and (
                held := _promotion_held(view, name, state, rules)
            ):
                lines.append(f"  promotion held back: {held}")
    lines.append(
        f"instances (stale = no heartbeat for {view.stale_ms / 1000:g}s, "
        f"{STALE_HEARTBEATS} intervals):"
    )
    shown = [b for b in view.instances if rollout is None or b.status.rollout == rollout]
    if not shown:
        lines.append("  none heard from recently")
    for beat in shown:
        lines.extend(_instance_lines(view, beat))
    history = [
        h
        for h in view.history
        if rollout is None or h.command is None or h.command.rollout == rollout
    ]
    lines.append(f"last {min(last, len(history))} of {len(history)} records:")
    lines.extend(history_line(h) for h in history[-last:] if last)
    return "\n".join(printable(line) for line in lines)
