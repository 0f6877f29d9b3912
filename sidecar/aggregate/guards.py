"""Guard rules over window reports: hysteresis, consecutive breaches, cooldown, once per breach.

``GuardEngine`` is pure: it sees reports in window order and returns events; the Kafka layer
turns ``fired`` events with action ``rollback``/``pause`` into (signed) control commands and
puts the event's figures and offsets in the command's reason as evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

from ..outcomes.figures import QUALITY_FIGURE_PATHS
from ..timefmt import utc_window
from .report import FIGURES, OffsetRange, figure_of
from .stats import Figure

Action = Literal["rollback", "pause", "alert"]
Comparison = Literal[">", "<"]
Bound = Literal["value", "lo", "hi"]
#: Figure getters by short name: the aggregator's ``FIGURES``, or the outcomes stage's
#: ``QUALITY_FIGURES`` (whose reports are quality reports).
FigureTable = Mapping[str, Callable[[Any], Figure]]
#: Short names a rule may watch: a window report's or a quality report's.
KNOWN_FIGURES = frozenset(FIGURES) | frozenset(QUALITY_FIGURE_PATHS)


class _Models(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...


class _Counts(Protocol):
    @property
    def records(self) -> int: ...


class GuardedReport(Protocol):
    """What guards read of a report (a ``WindowReport`` or a ``QualityReport``)."""

    @property
    def rollout(self) -> str: ...
    @property
    def window_start_ms(self) -> int: ...
    @property
    def window_end_ms(self) -> int: ...
    @property
    def champion(self) -> _Models: ...
    @property
    def candidate(self) -> _Models: ...
    @property
    def counts(self) -> _Counts: ...
    @property
    def offsets(self) -> list[OffsetRange]: ...
    @property
    def emitted_at_ms(self) -> int: ...


class GuardRule(msgspec.Struct, frozen=True, kw_only=True):
    """Fire ``action`` when ``figure`` (short name or dotted path) breaches ``threshold``.

    A breach needs ``consecutive`` breaching windows in a row; once fired the rule stays active
    (no further events) until the figure crosses ``clear_threshold`` (hysteresis; defaults to
    ``threshold``). A new firing waits ``cooldown_s`` of event time after the previous one.
    ``bound`` picks the point value or a CI bound (``lo`` for ">" rules is the conservative
    choice). Windows with fewer than ``min_pairs`` records, or an insufficient-data figure,
    neither breach nor clear, and do not break a streak. ``only_if`` / ``only_if_above`` add
    a second condition a breach needs (e.g. a latency ratio only counts once the candidate's
    p99 is large enough to matter: at a few milliseconds the ratio is scheduling noise).
    """

    name: str
    figure: str
    comparison: Comparison = ">"
    threshold: float
    clear_threshold: float | None = None
    min_pairs: int = 0
    consecutive: int = 1
    cooldown_s: float = 0.0
    action: Action = "alert"
    bound: Bound = "value"
    only_if: str | None = None
    only_if_above: float = 0.0

    def __post_init__(self) -> None:
        if self.consecutive < 1:
            raise ValueError("consecutive must be >= 1")
        only_if = self.only_if
        if only_if is not None and "." not in only_if and only_if not in KNOWN_FIGURES:
            raise ValueError(f"rule {self.name!r}: unknown only_if figure {self.only_if!r}")
        c = self.clear
        if (self.comparison == ">" and c > self.threshold) or (
            self.comparison == "<" and c < self.threshold
        ):
            raise ValueError(f"rule {self.name!r}: clear_threshold is on the breaching side")
        if "." not in self.figure and self.figure not in KNOWN_FIGURES:
            raise ValueError(f"rule {self.name!r}: unknown figure {self.figure!r}")

    @property
    def clear(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    def breaches(self, x: float) -> bool:
        return x > self.threshold if self.comparison == ">" else x < self.threshold

    def clears(self, x: float) -> bool:
        return x < self.clear if self.comparison == ">" else x > self.clear


class GuardEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A rule fired (act on it) or cleared (informational), with the evidence behind it."""

    kind: Literal["fired", "cleared"]
    rule: GuardRule
    rollout: str
    champion_model: str
    champion_version: str
    candidate_model: str
    candidate_version: str
    window_start_ms: int
    window_end_ms: int
    value: float
    figure: Figure
    consecutive_windows: int
    figures: dict[str, Figure]
    offsets: list[OffsetRange]
    at_ms: int
    reason: str


def _lookup(report: GuardedReport, name: str, figures: FigureTable) -> Figure:
    """A figure by short name (the engine's table) or dotted path."""
    getter = figures.get(name)
    if getter is not None:
        return getter(report)
    return figure_of(report, name)  # type: ignore[arg-type]  # a dotted path walks any report


def _condition_holds(rule: GuardRule, report: GuardedReport, figures: FigureTable) -> bool:
    if rule.only_if is None:
        return True
    value = _lookup(report, rule.only_if, figures).value
    return value is not None and value > rule.only_if_above


def default_rules() -> list[GuardRule]:
    """Conservative defaults; tune per rollout."""
    return [
        GuardRule(
            name="decision_rate_ratio",
            figure="decision_rate_ratio",
            threshold=1.5,
            clear_threshold=1.2,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
        ),
        GuardRule(
            name="score_psi",
            figure="psi_candidate_vs_champion",
            threshold=0.25,
            clear_threshold=0.1,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        GuardRule(
            name="candidate_error_rate",
            figure="candidate_error_rate",
            threshold=0.01,
            clear_threshold=0.005,
            min_pairs=500,
            consecutive=1,
            cooldown_s=600,
            action="rollback",
        ),
        GuardRule(
            name="latency_p99_ratio",
            figure="latency_p99_ratio",
            threshold=2.0,
            clear_threshold=1.5,
            min_pairs=200,
            consecutive=2,
            cooldown_s=600,
            action="pause",
            # Below 20 ms a doubled p99 is thread-scheduling noise, not a regression.
            only_if="candidate_latency_p99",
            only_if_above=20.0,
        ),
    ]


@dataclass(slots=True)
class _RuleState:
    streak: int = 0
    active: bool = False
    last_fired_end_ms: int | None = None
    last_window_end_ms: int | None = None
    #: Model versions already evaluated for the window ending at ``last_window_end_ms``: a
    #: report delivered again (at-least-once) must not count twice towards ``consecutive``.
    seen_at_last_end: set[tuple[str, str]] = field(default_factory=set)


def _pick(fig: Figure, bound: Bound) -> float | None:
    if not fig.ok:
        return None
    return fig.value if bound == "value" else (fig.lo if bound == "lo" else fig.hi)


class GuardEngine:
    """Evaluates rules against reports with state per (rollout, rule name).

    Cooldown and ordering use event time (``window_end_ms``), so replays give the same events.
    A report older than the last one evaluated for a (rollout, rule) is ignored.
    """

    def __init__(
        self, rules: Iterable[GuardRule] | None = None, figures: FigureTable = FIGURES
    ) -> None:
        self.rules = list(default_rules() if rules is None else rules)
        self.figures = figures
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("guard rule names must be unique")
        for rule in self.rules:
            if "." not in rule.figure and rule.figure not in figures:
                raise ValueError(f"rule {rule.name!r}: {rule.figure!r} is not in these reports")
        self._state: dict[tuple[str, str], _RuleState] = {}

    def active(self, rollout: str) -> list[str]:
        """Names of the rules currently in breach for ``rollout``."""
        return [r.name for r in self.rules if self._get(rollout, r.name).active]

    def _get(self, rollout: str, name: str) -> _RuleState:
        return self._state.setdefault((rollout, name), _RuleState())

    def evaluate(self, report: GuardedReport) -> list[GuardEvent]:
        events: list[GuardEvent] = []
        for rule in self.rules:
            event = self._evaluate_rule(rule, report)
            if event is not None:
                events.append(event)
        return events

    def _evaluate_rule(self, rule: GuardRule, report: GuardedReport) -> GuardEvent | None:
        st = self._get(report.rollout, rule.name)
        end = report.window_end_ms
        pair = (report.champion.version, report.candidate.version)
        if st.last_window_end_ms is not None and end < st.last_window_end_ms:
            return None  # older than a window already evaluated
        if end == st.last_window_end_ms and pair in st.seen_at_last_end:
            return None  # the same window again
        if end != st.last_window_end_ms:
            st.seen_at_last_end = set()
        st.last_window_end_ms = end
        st.seen_at_last_end.add(pair)
        fig = _lookup(report, rule.figure, self.figures)
        x = _pick(fig, rule.bound)
        if x is None or report.counts.records < rule.min_pairs:
            return None
        if st.active:
            if rule.clears(x):
                st.active = False
                st.streak = 0
                return self._event("cleared", rule, report, fig, x, 0)
            return None
        if not rule.breaches(x) or not _condition_holds(rule, report, self.figures):
            st.streak = 0
            return None
        st.streak += 1
        if st.streak < rule.consecutive:
            return None
        cooldown_ms = rule.cooldown_s * 1000.0
        if st.last_fired_end_ms is not None and end - st.last_fired_end_ms < cooldown_ms:
            return None
        streak = st.streak
        st.active = True
        st.streak = 0
        st.last_fired_end_ms = end
        return self._event("fired", rule, report, fig, x, streak)

    def _event(
        self,
        kind: Literal["fired", "cleared"],
        rule: GuardRule,
        report: GuardedReport,
        fig: Figure,
        x: float,
        streak: int,
    ) -> GuardEvent:
        word = "breached" if kind == "fired" else "cleared"
        limit = rule.threshold if kind == "fired" else rule.clear
        reason = (
            f"{rule.name}: {rule.figure}.{rule.bound}={x:.6g} {word} "
            f"({rule.comparison} {limit:g}) over window "
            f"{utc_window(report.window_start_ms, report.window_end_ms)} with "
            f"{report.counts.records} pairs"
        )
        return GuardEvent(
            kind=kind,
            rule=rule,
            rollout=report.rollout,
            champion_model=report.champion.model,
            champion_version=report.champion.version,
            candidate_model=report.candidate.model,
            candidate_version=report.candidate.version,
            window_start_ms=report.window_start_ms,
            window_end_ms=report.window_end_ms,
            value=x,
            figure=fig,
            consecutive_windows=streak,
            figures={name: get(report) for name, get in self.figures.items()},
            offsets=list(report.offsets),
            at_ms=report.emitted_at_ms,
            reason=reason,
        )
