"""What a report is built from, and the pure functions that turn it into plot series.

A :class:`Recording` holds the topics an analyst needs: window reports (the aggregator's
figures), control commands (who asked for what, and why), when present the audit topic (what
the instances did), and the outcomes stage's quality reports and verdicts (whether the
candidate is better, once the truth is known). It round-trips through a JSONL file (one
record per line, tagged by ``type``) so a report can be rebuilt offline from what
``sidecar demo`` recorded.

No I/O besides :func:`read_jsonl`/:func:`write_jsonl`; everything else is a plain function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..aggregate.guards import GuardRule, default_rules
from ..aggregate.report import WindowReport, figure_of
from ..aggregate.stats import Figure
from ..control.commands import CommandRejected, ControlCommand, Freshness, Rejected, check_fresh
from ..control.records import AuditRecord
from ..control.state_machine import (
    Applied,
    ControlConfig,
    Noted,
    RolloutState,
    apply,
    initial_state,
    next_state,
)
from ..errors import SidecarError
from ..outcomes.report import QualityReport, QualityVerdict
from ..routing import Mode

RecordType = Literal["meta", "report", "command", "audit", "quality", "verdict"]


class Line(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of a recorded JSONL file."""

    type: RecordType
    ts: int = 0
    data: msgspec.Raw = msgspec.Raw(b"null")


@dataclass
class Recording:
    """Reports, commands (with their record timestamps), audits, and free-form metadata."""

    reports: list[WindowReport] = field(default_factory=list)
    commands: list[tuple[int, ControlCommand]] = field(default_factory=list)
    audits: list[AuditRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    quality: list[QualityReport] = field(default_factory=list)
    verdicts: list[QualityVerdict] = field(default_factory=list)

    def normalised(self) -> Recording:
        """Reports deduplicated by (rollout, window start) and ordered; commands by time;
        quality reports by (rollout pair, window, status), the last one kept."""
        seen: dict[tuple[str, int], WindowReport] = {}
        for r in self.reports:
            seen.setdefault((r.rollout, r.window_start_ms), r)
        reports = sorted(seen.values(), key=lambda r: (r.window_start_ms, r.rollout))
        commands = sorted(self.commands, key=lambda c: c[0])
        quality: dict[tuple[str, str, str, int, str], QualityReport] = {}
        for q in sorted(self.quality, key=lambda q: q.emitted_at_ms):
            key = (q.rollout, q.champion.version, q.candidate.version, q.window_start_ms, q.status)
            quality[key] = q
        return Recording(
            reports,
            commands,
            list(self.audits),
            dict(self.meta),
            sorted(quality.values(), key=lambda q: (q.window_start_ms, q.rollout)),
            sorted(self.verdicts, key=lambda v: v.emitted_at_ms),
        )

    def between(self, start_ms: int | None, end_ms: int | None) -> Recording:
        """Only what falls in [start_ms, end_ms): windows by their start, commands by time."""

        def inside(t: int) -> bool:
            return (start_ms is None or t >= start_ms) and (end_ms is None or t < end_ms)

        return Recording(
            [r for r in self.reports if inside(r.window_start_ms)],
            [c for c in self.commands if inside(c[0])],
            [a for a in self.audits if inside(a.applied_at_ms)],
            dict(self.meta),
            [q for q in self.quality if inside(q.window_start_ms)],
            [v for v in self.verdicts if inside(v.emitted_at_ms)],
        )

    def only_rollouts(self, rollouts: Iterable[str]) -> Recording:
        keep = set(rollouts)
        return Recording(
            [r for r in self.reports if r.rollout in keep],
            [c for c in self.commands if c[1].rollout in keep],
            [a for a in self.audits if a.rollout in keep],
            dict(self.meta),
            [q for q in self.quality if q.rollout in keep],
            [v for v in self.verdicts if v.rollout in keep],
        )


# --------------------------------------------------------------------------- JSONL


def _line(type_: RecordType, ts: int, obj: object) -> bytes:
    return msgspec.json.encode(Line(type=type_, ts=ts, data=msgspec.Raw(msgspec.json.encode(obj))))


def encode_jsonl(rec: Recording) -> bytes:
    """The recording as JSONL: meta first, then reports, commands and audits."""
    lines = [_line("meta", 0, rec.meta)] if rec.meta else []
    lines += [_line("report", r.emitted_at_ms, r) for r in rec.reports]
    lines += [_line("command", ts, c) for ts, c in rec.commands]
    lines += [_line("audit", a.applied_at_ms, a) for a in rec.audits]
    lines += [_line("quality", q.emitted_at_ms, q) for q in rec.quality]
    lines += [_line("verdict", v.emitted_at_ms, v) for v in rec.verdicts]
    return b"".join(line + b"\n" for line in lines)


def decode_jsonl(data: bytes, source: str = "input") -> Recording:
    """Parse a recorded JSONL file; a bad line is an error naming the line."""
    rec = Recording()
    decoder = msgspec.json.Decoder(Line)
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = decoder.decode(raw)
            if line.type == "meta":
                rec.meta.update(msgspec.json.decode(line.data, type=dict[str, Any]))
            elif line.type == "report":
                rec.reports.append(msgspec.json.decode(line.data, type=WindowReport))
            elif line.type == "command":
                rec.commands.append((line.ts, msgspec.json.decode(line.data, type=ControlCommand)))
            elif line.type == "quality":
                rec.quality.append(msgspec.json.decode(line.data, type=QualityReport))
            elif line.type == "verdict":
                rec.verdicts.append(msgspec.json.decode(line.data, type=QualityVerdict))
            else:
                rec.audits.append(msgspec.json.decode(line.data, type=AuditRecord))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SidecarError(f"{source}:{lineno}: not a recorded report line: {exc}") from None
    return rec


def read_jsonl(path: str | Path) -> Recording:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    return decode_jsonl(data, str(path))


def write_jsonl(rec: Recording, path: str | Path) -> None:
    Path(path).write_bytes(encode_jsonl(rec))


# --------------------------------------------------------------------------- rules


def rules_of(rec: Recording) -> list[GuardRule]:
    """The guard rules recorded in the metadata (what the aggregator ran), else the defaults."""
    raw = rec.meta.get("rules")
    if raw is None:
        return default_rules()
    return msgspec.convert(raw, type=list[GuardRule])


def rule_for(rules: Sequence[GuardRule], figure: str) -> GuardRule | None:
    return next((r for r in rules if r.figure == figure), None)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class CommandEntry:
    """A control command, the verdict the state machine reaches on it, and the state after."""

    ts_ms: int
    command: ControlCommand
    outcome: str  # "applied", "duplicate", or "rejected: <reason>: <detail>"
    mode: str
    share_bp: int
    epoch: int
    #: Instances whose audit record says they applied it (empty without an audit topic).
    applied_by: tuple[str, ...] = ()

    @property
    def applied(self) -> bool:
        return self.outcome == "applied"


def _initial(rec: Recording, rollout: str) -> tuple[Mode, int]:
    start = (rec.meta.get("initial") or {}).get(rollout) or {}
    mode = Mode(start.get("mode", "shadow"))
    return mode, int(start.get("share_bp", 0)) if mode is Mode.CANARY else 0


def command_timeline(rec: Recording) -> list[CommandEntry]:
    """Replay each rollout's commands through the state machine (as the instances do).

    Signatures are not re-verified here (the report has no keys); freshness and every
    transition rule are. The audit topic, when recorded, names the instances that applied each
    command. A rollout starts in the mode the metadata gives (``initial``), else shadow.
    """
    applied_by: dict[str, list[str]] = {}
    for a in rec.audits:
        if a.outcome == "applied" and a.command_id:
            applied_by.setdefault(a.command_id, []).append(a.instance_id)
    states: dict[str, RolloutState] = {}
    rules = ControlConfig(freshness=Freshness(max_age_s=300.0, max_future_s=30.0))
    out: list[CommandEntry] = []
    for ts, cmd in sorted(rec.commands, key=lambda c: c[0]):
        state = states.get(cmd.rollout)
        if state is None:
            mode, share = _initial(rec, cmd.rollout)
            state = initial_state(cmd.rollout, mode=mode, share_bp=share or None)
        if cmd.expected_epoch is None and cmd.action != "rollback":
            # Recorded before every command had to name its epoch: judged at the epoch it
            # arrived at, as the instances of that version did.
            cmd = msgspec.structs.replace(cmd, expected_epoch=state.epoch)
        try:
            check_fresh(cmd, ts, rules.freshness)
            outcome = apply(state, cmd, ts, config=rules)
        except CommandRejected as exc:
            text = f"rejected: {exc.reason.value}: {exc.detail}"
        else:
            if isinstance(outcome, Applied):
                text = "applied"
            elif isinstance(outcome, Noted):
                text = "noted"
            elif isinstance(outcome, Rejected):
                text = f"rejected: {outcome.reason.value}: {outcome.detail}"
            else:
                text = "duplicate"
            state = next_state(state, outcome)
        states[cmd.rollout] = state
        if cmd.action == "verdict":  # one per window: in the state, not on the timeline
            continue
        out.append(
            CommandEntry(
                ts,
                cmd,
                text,
                state.mode.value,
                state.share_bp,
                state.epoch,
                tuple(sorted(set(applied_by.get(cmd.command_id, [])))),
            )
        )
    return out


# --------------------------------------------------------------------------- series

Point = tuple[float, float | None]  # (epoch ms, value); None breaks the line


@dataclass(frozen=True)
class Span:
    """The time a rollout was observed (its first window start to its last window end)."""

    rollout: str
    start_ms: int
    end_ms: int
    candidate: str
    champion: str


def rollout_spans(rec: Recording) -> list[Span]:
    spans: dict[str, Span] = {}
    for r in rec.reports:
        s = spans.get(r.rollout)
        cand = f"{r.candidate.model} {r.candidate.version}"
        champ = f"{r.champion.model} {r.champion.version}"
        if s is None:
            spans[r.rollout] = Span(r.rollout, r.window_start_ms, r.window_end_ms, cand, champ)
        else:
            spans[r.rollout] = Span(
                r.rollout,
                min(s.start_ms, r.window_start_ms),
                max(s.end_ms, r.window_end_ms),
                cand,
                champ,
            )
    for ts, c in rec.commands:
        s = spans.get(c.rollout)
        if s is not None:
            spans[c.rollout] = Span(s.rollout, min(s.start_ms, ts), max(s.end_ms, ts), *_names(s))
    return sorted(spans.values(), key=lambda s: s.start_ms)


def _names(s: Span) -> tuple[str, str]:
    return s.candidate, s.champion


def time_domain(rec: Recording) -> tuple[int, int]:
    """[first, last] epoch ms over windows and commands; raises when there is nothing."""
    times = [r.window_start_ms for r in rec.reports] + [r.window_end_ms for r in rec.reports]
    times += [ts for ts, _ in rec.commands]
    times += [q.window_start_ms for q in rec.quality] + [q.window_end_ms for q in rec.quality]
    if not times:
        raise SidecarError("nothing to report: no window reports and no control commands")
    lo, hi = min(times), max(times)
    return lo, hi if hi > lo else lo + 1000


def _mid(r: WindowReport) -> float:
    return (r.window_start_ms + r.window_end_ms) / 2


def _value(fig: Figure) -> float | None:
    v = fig.value
    return v if fig.ok and v is not None and math.isfinite(v) else None


def figure_series(
    reports: Sequence[WindowReport], get: Callable[[WindowReport], Figure | float | None]
) -> dict[str, list[Point]]:
    """Per rollout, (window midpoint, value) of one figure; insufficient data gives None."""
    out: dict[str, list[Point]] = {}
    for r in reports:
        v = get(r)
        value = _value(v) if isinstance(v, Figure) else v
        out.setdefault(r.rollout, []).append((_mid(r), value))
    return out


def named(name: str) -> Callable[[WindowReport], Figure]:
    return lambda r: figure_of(r, name)


def disagreement(r: WindowReport) -> float | None:
    """Share of paired requests on which the two models decided differently."""
    p = r.paired
    if not p.pairs:
        return None
    return (p.champion_yes_candidate_no + p.champion_no_candidate_yes) / p.pairs


def served_share(r: WindowReport) -> float | None:
    """Share of the window's requests actually decided by the candidate (observed routing)."""
    c = r.counts
    total = c.served_champion + c.served_candidate
    return c.served_candidate / total if total else None


def share_steps(timeline: Sequence[CommandEntry], spans: Sequence[Span]) -> dict[str, list[Point]]:
    """The commanded candidate share (fraction) per rollout as a step function over its span."""
    out: dict[str, list[Point]] = {}
    for span in spans:
        entries = [e for e in timeline if e.command.rollout == span.rollout]
        share = 0.0
        points: list[Point] = [(span.start_ms, share)]
        for e in entries:
            if not e.applied:
                continue
            points.append((e.ts_ms, share))
            share = e.share_bp / 10_000
            points.append((e.ts_ms, share))
        points.append((max(span.end_ms, points[-1][0]), share))
        out[span.rollout] = points
    return out


def guard_breaches(reports: Sequence[WindowReport], rule: GuardRule) -> list[Point]:
    """Windows whose figure (at the rule's bound) breaches ``rule`` with enough pairs: the
    red dots on a plot."""
    hits: list[Point] = []
    for r in reports:
        fig = figure_of(r, rule.figure)
        v = _value(fig)
        if v is not None and rule.bound != "value":
            v = fig.lo if rule.bound == "lo" else fig.hi
        if v is not None and r.counts.records >= rule.min_pairs and rule.breaches(v):
            hits.append((_mid(r), v))
    return hits


def firing_window(rec: Recording, cmd: ControlCommand) -> WindowReport | None:
    """The report a guard command cites (its id is ``guard:<rollout>:<rule>:<window start>``)."""
    parts = cmd.command_id.split(":")
    if len(parts) < 4 or parts[0] != "guard" or not parts[-1].isdigit():
        return None
    start = int(parts[-1])
    return next(
        (r for r in rec.reports if r.rollout == cmd.rollout and r.window_start_ms == start), None
    )


__all__ = [
    "CommandEntry",
    "Line",
    "Point",
    "Recording",
    "Span",
    "command_timeline",
    "decode_jsonl",
    "disagreement",
    "encode_jsonl",
    "figure_series",
    "firing_window",
    "guard_breaches",
    "named",
    "read_jsonl",
    "rollout_spans",
    "rule_for",
    "rules_of",
    "served_share",
    "share_steps",
    "time_domain",
    "write_jsonl",
]
