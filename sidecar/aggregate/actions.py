"""Pure glue between guard events and the control plane: command ids, evidence, commit points.

Kept apart from the Kafka service so replay, tests and the live aggregator share one
definition of "which command a breach becomes".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..control.commands import CommandArgs, ControlCommand, Verdict
from ..timefmt import utc_window
from .guards import GuardEvent
from .report import WindowReport
from .stats import Figure

#: ``issued_by`` of every command the aggregator publishes.
ISSUER = "aggregator"
#: Guard actions that become control commands (``alert`` only logs and counts).
COMMAND_ACTIONS = ("rollback", "pause")
#: ``ControlCommand.reason`` is limited to this many characters.
MAX_REASON = 256

#: Extra figures appended to a command's reason, most useful first, while they fit.
_EVIDENCE_FIGURES = (
    ("ratio", "decision_rate_ratio"),
    ("psi", "psi_candidate_vs_champion"),
    ("cand_err_excess", "candidate_excess_error_rate"),
    ("cand_timeout_excess", "candidate_excess_timeout_rate"),
    ("slower", "latency_slower_share"),
    ("p50_ratio", "latency_p50_ratio"),
    ("p95_ratio", "latency_p95_ratio"),
    ("js", "js_candidate_vs_champion"),
    ("ks", "ks_candidate_vs_champion"),
)


def is_guard_command(cmd: ControlCommand) -> bool:
    """Whether ``cmd`` is a guard's rollback or pause (its id says so; ``issued_by`` names the
    key's holder, whatever a deployment calls it). Guard verdicts are ``guard-verdict:``."""
    return cmd.command_id.startswith("guard:")


def command_id(event: GuardEvent) -> str:
    """Deterministic per (rollout, rule, breaching window): a replay or restart that fires the
    same breach again yields the same id, which the control plane ignores as a duplicate."""
    return f"guard:{event.rollout}:{event.rule.name}:{event.window_start_ms}"


def _fmt(fig: Figure) -> str:
    return "n/a" if fig.value is None else f"{fig.value:.4g}"


def command_reason(event: GuardEvent, comparisons_topic: str) -> str:
    """Rule, figure vs threshold, window and comparison-topic offsets, within MAX_REASON."""
    rule = event.rule
    head = (
        f"guard {rule.name}: {rule.figure}={event.value:.4g} {rule.comparison} "
        f"{rule.threshold:g} over {max(event.consecutive_windows, 1)} window(s); "
        f"window {utc_window(event.window_start_ms, event.window_end_ms)}"
    )
    spans = ",".join(f"{o.partition}@{o.first}-{o.last}" for o in event.offsets)
    parts = [head, f"evidence {comparisons_topic}[{spans}]"]
    for short, name in _EVIDENCE_FIGURES:
        fig = event.figures.get(name)
        if fig is not None and name != rule.figure:
            parts.append(f"{short}={_fmt(fig)}")
    reason = ""
    for part in parts:
        candidate = part if not reason else f"{reason}; {part}"
        if len(candidate) > MAX_REASON:
            break
        reason = candidate
    return reason or head[:MAX_REASON]


def guard_command(event: GuardEvent, comparisons_topic: str, issued_at_ms: int) -> ControlCommand:
    """The (unsigned) control command a fired rollback/pause event becomes.

    A ``pause`` is a compare-and-set on the latest epoch seen in the breaching window
    (``expected_epoch``): it applies only while the rollout is still in the state the
    evidence was gathered under, never to whatever an operator did since. A ``rollback`` is
    always wanted, whatever the epoch, so it carries none.
    """
    action = event.rule.action
    if event.kind != "fired" or action == "alert":
        raise ValueError(f"event {event.rule.name}/{event.kind} does not issue a command")
    return ControlCommand(
        command_id=command_id(event),
        rollout=event.rollout,
        action=action,
        issued_by=ISSUER,
        reason=command_reason(event, comparisons_topic),
        issued_at_ms=issued_at_ms,
        expected_epoch=event.policy_epoch if action == "pause" else None,
    )


#: Modes in which a guard verdict can matter (a ramp or a promotion may follow).
_VERDICT_MODES = ("shadow", "canary")


def guard_verdict(
    report: WindowReport,
    breached: Sequence[str],
    min_records: int,
    issued_at_ms: int,
) -> ControlCommand | None:
    """The (unsigned) ``verdict`` a closed window gives its rollout: ``guards_ok`` unless a
    rollback or pause rule is in breach (``breached``: their names). None when the window says
    nothing: too few records, no policy epoch (comparisons of an older sidecar), or a mode no
    ramp or promotion follows. Bound to the window's highest epoch (``expected_epoch``): a
    verdict about an earlier step never gates a later one."""
    if (
        report.counts.records < min_records
        or report.policy_epoch_max is None
        or report.policy_mode not in _VERDICT_MODES
    ):
        return None
    ok = not breached
    detail = (
        f"no rollback or pause rule in breach over {report.counts.records:,} records"
        if ok
        else f"in breach: {', '.join(breached)}"
    )[:256]
    return ControlCommand(
        command_id=f"guard-verdict:{report.rollout}:{report.policy_epoch_max}:"
        f"{report.window_end_ms}",
        rollout=report.rollout,
        action="verdict",
        issued_by=ISSUER,
        reason="guard verdict for window "
        + utc_window(report.window_start_ms, report.window_end_ms),
        issued_at_ms=issued_at_ms,
        expected_epoch=report.policy_epoch_max,
        args=CommandArgs(
            verdict=Verdict(guards_ok=ok, window_end_ms=report.window_end_ms, detail=detail)
        ),
    )


@dataclass
class VerdictPacer:
    """Which verdicts to publish: a changed one, the first of a new epoch, and otherwise at
    most one per ``interval_ms`` per rollout (a verdict per window would flood the control
    topic and its audit: every instance audits every record)."""

    interval_ms: int
    _last: dict[str, tuple[int, bool | None, int]] = field(default_factory=dict)

    def due(self, cmd: ControlCommand, now_ms: int) -> bool:
        verdict = cmd.args.verdict
        assert verdict is not None and cmd.expected_epoch is not None
        last = self._last.get(cmd.rollout)
        if (
            last is not None
            and last[0] == cmd.expected_epoch
            and last[1] == verdict.guards_ok
            and now_ms - last[2] < self.interval_ms
        ):
            return False
        self._last[cmd.rollout] = (cmd.expected_epoch, verdict.guards_ok, now_ms)
        return True


def commanding(events: Sequence[GuardEvent]) -> list[GuardEvent]:
    """The fired events of one report that become commands: the first per action, and no
    pause when a rollback fired (it would be pointless, and its expected epoch gone). Two
    pauses of one window would be one pause and a refused compare-and-set."""
    fired = [e for e in events if e.kind == "fired" and e.rule.action in COMMAND_ACTIONS]
    rollbacks = [e for e in fired if e.rule.action == "rollback"]
    if rollbacks:
        return rollbacks[:1]
    return fired[:1]


def commit_points(
    consumed_next: Mapping[int, int], open_first: Mapping[int, int]
) -> dict[int, int]:
    """Offsets safe to commit per partition: past every consumed record, but never past the
    first record of a still-open window (those must be re-read after a restart/rebalance)."""
    return {
        p: min(nxt, open_first[p]) if p in open_first else nxt for p, nxt in consumed_next.items()
    }


__all__ = [
    "COMMAND_ACTIONS",
    "ISSUER",
    "MAX_REASON",
    "VerdictPacer",
    "command_id",
    "command_reason",
    "commanding",
    "commit_points",
    "guard_command",
    "guard_verdict",
    "is_guard_command",
]
