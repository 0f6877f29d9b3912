"""The demo's live terminal view: a snapshot of the run rendered as a panel or as one line.

Pure formatting (snapshot in, text out). On a terminal the panel is redrawn in place with ANSI
"home + clear"; when stdout is not a terminal (CI logs, pipes) one line per update is printed
instead, and every event once.
"""

from __future__ import annotations

import datetime as dt
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..aggregate.guards import GuardRule
from ..aggregate.report import WindowReport, figure_of

CLEAR = "\x1b[H\x1b[2J"


def average_precision(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Average precision (area under the precision-recall curve, step-wise) of ``scores``
    against boolean ``labels``; NaN when there is no positive label."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.bool_)
    positives = int(y.sum())
    if positives == 0 or s.size == 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, s.size + 1)
    return float(precision[hits].sum() / positives)


@dataclass(frozen=True)
class GuardState:
    name: str
    figure: str
    value: float | None
    threshold: float
    comparison: str
    action: str
    active: bool

    @property
    def status(self) -> str:
        if self.active:
            return "FIRED"
        if self.value is None:
            return "waiting"
        breach = (
            self.value > self.threshold if self.comparison == ">" else self.value < self.threshold
        )
        return "breach" if breach else "ok"


def guard_states(
    rules: Sequence[GuardRule], report: WindowReport | None, active: Sequence[str]
) -> list[GuardState]:
    out = []
    for rule in rules:
        value = None
        if report is not None:
            fig = figure_of(report, rule.figure)
            value = fig.value if fig.ok else None
        out.append(
            GuardState(
                rule.name,
                rule.figure,
                value,
                rule.threshold,
                rule.comparison,
                rule.action,
                rule.name in active,
            )
        )
    return out


@dataclass
class Snapshot:
    scenario: str
    elapsed_s: float
    act_index: int
    acts: int
    headline: str
    phase: str
    produced: int
    produced_rate: float
    scored_rate: float
    backlog: int
    rollout: str
    mode: str
    share_bp: int
    epoch: int
    ramp: str
    instances: int
    report: WindowReport | None
    guards: list[GuardState]
    #: From the outcomes stage (chargebacks joined to the comparisons).
    ap_champion: float
    ap_candidate: float
    ap_pairs: int
    events: list[str] = field(default_factory=list)
    #: The quality figure's name and what a request is (fraud stories: average precision over
    #: transactions; the recommend story: NDCG@10 over requests).
    quality_name: str = "average precision"
    quality_unit: str = "transactions"
    #: Where the quality figures come from (final windows or a provisional one).
    quality: str = ""
    #: The quality gate the operator waits for (empty when the act has none).
    gate: str = ""


def _pct(x: float | None, digits: int = 2) -> str:
    return "  n/a" if x is None else f"{x * 100:.{digits}f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)


def _hms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M:%S")


def window_text(r: WindowReport | None) -> str:
    if r is None:
        return "no window closed yet"
    if r.ranking is not None:
        return ranking_text(r)
    p = r.paired

    def fig(name: str) -> float | None:
        f = figure_of(r, name)
        return f.value if f.ok else None

    return (
        f"{_hms(r.window_start_ms)}-{_hms(r.window_end_ms)} UTC  {r.counts.records:,} pairs  "
        f"flagged: champion {_pct(fig('champion_decision_rate'))}, candidate "
        f"{_pct(fig('candidate_decision_rate'))}, ratio {_num(fig('decision_rate_ratio'))}  "
        f"PSI {_num(fig('psi_candidate_vs_champion'), '{:.3f}')}  "
        f"p99 {_num(fig('champion_latency_p99'), '{:.1f}')}/"
        f"{_num(fig('candidate_latency_p99'), '{:.1f}')} ms  "
        f"disagree {p.champion_yes_candidate_no + p.champion_no_candidate_yes}"
    )


def ranking_text(r: WindowReport) -> str:
    k = r.ranking
    assert k is not None

    def v(f: object, fmt: str = "{:.2f}") -> str:
        return _num(getattr(f, "value", None), fmt)

    jump = (
        f"{v(k.top_exposure_jump)} ({k.top_exposure_jump_item})"
        if k.top_exposure_jump_item
        else v(k.top_exposure_jump)
    )
    return (
        f"{_hms(r.window_start_ms)}-{_hms(r.window_end_ms)} UTC  {k.pairs:,} pairs  "
        f"overlap@{k.k} {v(k.overlap)}  RBO {v(k.rbo)}  tau {v(k.kendall_tau)}  "
        f"coverage x{v(k.coverage_ratio)}  exposure jump {jump}  PSI {v(k.exposure_psi)}"
    )


def guard_text(g: GuardState) -> str:
    fmt = "{:.2%}" if "rate" in g.figure and "ratio" not in g.figure else "{:.3g}"
    value = "-" if g.value is None else fmt.format(g.value)
    limit = fmt.format(g.threshold)
    return f"{g.name} {value} ({g.comparison}{limit} -> {g.action}) {g.status}"


def routing_text(s: Snapshot) -> str:
    share = f" {s.share_bp / 100:g}%" if s.mode == "canary" else ""
    ramp = f", {s.ramp}" if s.ramp else ""
    return (
        f"rollout {s.rollout}: {s.mode}{share}{ramp}, epoch {s.epoch}, "
        f"{s.instances} sidecar instances"
    )


def _shown(events: Sequence[str], last: int = 5) -> list[str]:
    """Guard actions always, then the latest other commands."""
    pinned = [e for e in events if "by the AGGREGATOR" in e]
    others = [e for e in events if e not in pinned][-last:]
    return [e for e in events if e in pinned or e in others]


def render_panel(s: Snapshot, width: int = 110) -> str:
    """The full panel (no ANSI codes; the caller clears the screen)."""
    ap = (
        f"{s.quality_name} ({s.quality or f'{s.ap_pairs:,} scored {s.quality_unit}'}): "
        f"champion {_num(s.ap_champion, '{:.3f}')}, candidate {_num(s.ap_candidate, '{:.3f}')}"
        if s.ap_pairs
        else f"{s.quality_name}: waiting for scored {s.quality_unit}"
    )
    lines = [
        f"sidecar demo: {s.scenario}    {s.elapsed_s:5.0f} s    act {s.act_index}/{s.acts}",
        "=" * min(width, 100),
        *textwrap.wrap(s.headline, width, initial_indent="  ", subsequent_indent="  "),
        f"  now: {s.phase}",
        "",
        f"  traffic   {s.produced_rate:7,.0f} req/s produced, {s.scored_rate:7,.0f} req/s scored, "
        f"backlog {s.backlog:,} (produced - scored), {s.produced:,} in total",
        f"  routing   {routing_text(s)}",
        *textwrap.wrap(ap, width, initial_indent="  quality   ", subsequent_indent=" " * 12),
        *textwrap.wrap(
            f"quality gate {s.gate}" if s.gate else "",
            width,
            initial_indent=" " * 12,
            subsequent_indent=" " * 14,
        ),
        f"  window    {window_text(s.report)}",
        *(("  guards    " if i == 0 else " " * 12) + guard_text(g) for i, g in enumerate(s.guards)),
        "",
        "  control commands and guard actions:",
        *(f"    {e}" for e in _shown(s.events)),
    ]
    if not s.events:
        lines.append("    none yet")
    return "\n".join(lines)


def render_line(s: Snapshot) -> str:
    """One line per update for non-terminal output."""
    r = s.report
    ratio = None
    if r is not None:
        f = figure_of(r, "decision_rate_ratio")
        ratio = f.value if f.ok else None
    fired = [g.name for g in s.guards if g.status in ("FIRED", "breach")]
    return (
        f"[{s.elapsed_s:4.0f}s] act {s.act_index}/{s.acts} {s.rollout} {s.mode}"
        f"{f' {s.share_bp / 100:g}%' if s.mode == 'canary' else ''} epoch {s.epoch} | "
        f"{s.produced_rate:,.0f} req/s, backlog {s.backlog:,} | last window ratio "
        f"{_num(ratio)} | guards {'ok' if not fired else ', '.join(fired)} | {s.phase}"
    )


__all__ = [
    "CLEAR",
    "GuardState",
    "Snapshot",
    "guard_states",
    "guard_text",
    "ranking_text",
    "render_line",
    "render_panel",
    "routing_text",
    "window_text",
]
