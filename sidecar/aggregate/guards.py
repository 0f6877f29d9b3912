"""Guard rules over window reports: hysteresis, consecutive breaches, cooldown, once per breach.

``GuardEngine`` is pure: it sees reports in window order and returns events; the Kafka layer
turns ``fired`` events with action ``rollback``/``pause`` into (signed) control commands and
puts the event's figures and offsets in the command's reason as evidence.
"""

from __future__ import annotations

import math
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
Side = Literal["upper", "lower"]
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
    """What guards read of a report (a ``WindowReport`` or a ``QualityReport``). A window
    report also says the policy its records were decided under (``policy_epoch_max``,
    ``policy_mode``); a quality report does not, and its rules then never re-arm by epoch."""

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


def _policy(report: GuardedReport) -> tuple[int | None, str | None]:
    """The report's highest policy epoch and its mode (None, None: a quality report)."""
    return getattr(report, "policy_epoch_max", None), getattr(report, "policy_mode", None)


class GuardRule(msgspec.Struct, frozen=True, kw_only=True):
    """Fire ``action`` when ``figure`` (short name or dotted path) breaches ``threshold``.

    A breach needs ``consecutive`` breaching windows in a row; once fired the rule stays active
    (no further events) until the figure crosses ``clear_threshold`` (hysteresis; defaults to
    ``threshold``). A new firing waits ``cooldown_s`` of event time after the previous one.
    ``bound`` picks the point value or a CI bound (``lo`` for ">" rules is the conservative
    choice). Windows with fewer than ``min_pairs`` records, or an insufficient-data figure,
    neither breach nor clear, and do not break a streak. ``only_if`` / ``only_if_above`` add
    a second condition a breach needs.

    Two-sided (a band): a ">" rule with ``lower_threshold`` also breaches below it, and then
    clears above ``lower_clear_threshold`` (defaults to ``lower_threshold``). E.g. a
    decision-rate ratio outside [0.67, 1.5]: the candidate flags half as often, or twice.
    """

    name: str
    figure: str
    comparison: Comparison = ">"
    threshold: float
    clear_threshold: float | None = None
    #: Two-sided rules only (``comparison = ">"``): also breach below this value ...
    lower_threshold: float | None = None
    #: ... and clear (from a low breach) above this one.
    lower_clear_threshold: float | None = None
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
        if self.lower_clear_threshold is not None and self.lower_threshold is None:
            raise ValueError(f"rule {self.name!r}: lower_clear_threshold needs lower_threshold")
        low = self.lower_threshold
        if low is not None:
            if self.comparison != ">":
                raise ValueError(
                    f"rule {self.name!r}: a two-sided rule is written with comparison '>' "
                    "(threshold above, lower_threshold below)"
                )
            if not low < self.threshold:
                raise ValueError(f"rule {self.name!r}: lower_threshold must be below threshold")
            if not low <= self.lower_clear <= c:
                raise ValueError(
                    f"rule {self.name!r}: lower_clear_threshold must lie between "
                    "lower_threshold and clear_threshold"
                )

    @property
    def clear(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    @property
    def lower_clear(self) -> float:
        """The value a low breach clears above (two-sided rules)."""
        if self.lower_clear_threshold is not None:
            return self.lower_clear_threshold
        return -math.inf if self.lower_threshold is None else self.lower_threshold

    @property
    def two_sided(self) -> bool:
        return self.lower_threshold is not None

    @property
    def issues_command(self) -> bool:
        """Whether a firing becomes a control command (``rollback``/``pause``)."""
        return self.action != "alert"

    def breach_side(self, x: float) -> Side | None:
        """``"upper"``/``"lower"`` when ``x`` breaches, else None."""
        if self.comparison == "<":
            return "lower" if x < self.threshold else None
        if x > self.threshold:
            return "upper"
        if self.lower_threshold is not None and x < self.lower_threshold:
            return "lower"
        return None

    def breaches(self, x: float) -> bool:
        return self.breach_side(x) is not None

    def clears(self, x: float) -> bool:
        """Whether ``x`` clears an active breach (two-sided rules: inside both clear limits,
        so a jump from one side to the other does not clear)."""
        if self.comparison == "<":
            return x > self.clear
        return x < self.clear and x > self.lower_clear


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
    #: The highest policy epoch and its mode in the window (None: not reported). A ``pause``
    #: command carries the epoch as ``expected_epoch``.
    policy_epoch: int | None = None
    policy_mode: str | None = None
    #: Which limit a two-sided rule breached.
    side: Side | None = None


class GuardReset(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout pair's rule state was reset: the rollout moved to another policy epoch."""

    rollout: str
    champion_version: str
    candidate_version: str
    from_epoch: int
    to_epoch: int
    from_mode: str | None
    to_mode: str | None
    window_start_ms: int
    window_end_ms: int


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
    """Conservative defaults (``bench/bench_guards.py`` measures their false alarms); tune per
    rollout. Rules on the candidate act; rules on the champion alert."""
    return [
        # The candidate decides differently: flags 1.5x as often, or 1/1.5 as often.
        GuardRule(
            name="decision_rate_ratio",
            figure="decision_rate_ratio",
            threshold=1.5,
            clear_threshold=1.2,
            lower_threshold=1 / 1.5,
            lower_clear_threshold=1 / 1.2,
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
        # Paired: errors of the candidate where the champion succeeded on the same request,
        # less the champion's own such errors.
        GuardRule(
            name="candidate_errors",
            figure="candidate_excess_error_rate",
            threshold=0.01,
            clear_threshold=0.005,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
            # from two calls on: one failed batch of a few hundred records is one event
            only_if="candidate_error_calls",
            only_if_above=1.5,
        ),
        # Paired, host stalls left out: timeouts on both arms, or on one arm while the other
        # was slow on the same batch too, blame neither model.
        GuardRule(
            name="candidate_timeouts",
            figure="candidate_excess_timeout_rate",
            threshold=0.01,
            clear_threshold=0.005,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
            only_if="candidate_timeout_calls",
            only_if_above=1.5,
        ),
        # Paired per batch: the candidate took more than 1.5x the champion's time (and 1 ms
        # more) on most batches, significantly (the share's lower 95% bound above one half):
        # a slower median, whatever the host's noise.
        GuardRule(
            name="latency_median",
            figure="latency_slower_share",
            threshold=0.5,
            clear_threshold=0.3,
            bound="lo",
            min_pairs=200,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        # Paired tail: more batches where the candidate alone went past 1.5x the champion's
        # p95 (and 1.5x the champion on that batch) than the other way round, by over 5% of
        # the batches at the lower 95% bound. Scheduling noise throws either arm into its tail;
        # only a surplus on the candidate's side is a slower tail.
        GuardRule(
            name="latency_tail",
            figure="latency_tail_excess",
            threshold=0.05,
            clear_threshold=0.0,
            bound="lo",
            min_pairs=200,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        # The champion is watched too: alerts (a rollback would not help).
        GuardRule(
            name="champion_error_rate",
            figure="champion_error_rate",
            threshold=0.01,
            clear_threshold=0.005,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="alert",
        ),
        GuardRule(
            name="champion_nan_rate",
            figure="champion_nan_rate",
            threshold=0.005,
            clear_threshold=0.001,
            min_pairs=500,
            consecutive=1,
            cooldown_s=600,
            action="alert",
        ),
        GuardRule(
            name="champion_drift",
            figure="psi_champion_vs_reference",
            threshold=0.25,
            clear_threshold=0.1,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="alert",
        ),
        # Rankings (recommenders). The candidate's lists share almost nothing with the
        # champion's: fewer than 1 in 20 items at the upper 95% bound (a personalised model
        # replacing a popularity one still shares a fair part of the head).
        GuardRule(
            name="ranking_overlap_collapse",
            figure="overlap_at_k",
            comparison="<",
            threshold=0.05,
            clear_threshold=0.1,
            bound="hi",
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
        ),
        # One item shown to at least 20% more of the requests than the champion shows it
        # (lower 95% bound): a pinned, boosted or leaked item.
        GuardRule(
            name="item_exposure_jump",
            figure="item_exposure_jump",
            threshold=0.2,
            clear_threshold=0.1,
            bound="lo",
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
        ),
        # Diversity collapse: the candidate shows fewer than half as many distinct items
        # as the champion on the same requests.
        GuardRule(
            name="catalogue_coverage",
            figure="coverage_ratio",
            comparison="<",
            threshold=0.5,
            clear_threshold=0.7,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
        ),
        # Exposure moves a lot: expected of a new recommender, so it is only an alert.
        GuardRule(
            name="exposure_drift",
            figure="exposure_psi",
            threshold=1.0,
            clear_threshold=0.5,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="alert",
        ),
        # Labels (multiclass, regression bands): some label decided 2x as often, or half.
        GuardRule(
            name="label_rate_ratio",
            figure="label_rate_ratio",
            threshold=2.0,
            clear_threshold=1.5,
            lower_threshold=0.5,
            lower_clear_threshold=1 / 1.5,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="rollback",
        ),
        GuardRule(
            name="label_psi",
            figure="label_psi",
            threshold=0.25,
            clear_threshold=0.1,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        # Regression values: over a fifth of the pairs differ beyond the tolerance (lower
        # 95% bound), or the distribution moved.
        GuardRule(
            name="value_differences",
            figure="value_diff_share",
            threshold=0.2,
            clear_threshold=0.1,
            bound="lo",
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        GuardRule(
            name="value_psi",
            figure="value_psi",
            threshold=0.25,
            clear_threshold=0.1,
            min_pairs=500,
            consecutive=2,
            cooldown_s=600,
            action="pause",
        ),
        # The candidate decided while the policy said the champion decides (shadow,
        # rolled_back): the champion failed and fell back to an unpromoted candidate.
        GuardRule(
            name="champion_fallback",
            figure="champion_fallback_rate",
            threshold=0.001,
            clear_threshold=0.0005,
            min_pairs=500,
            consecutive=1,
            cooldown_s=600,
            action="alert",
        ),
    ]


@dataclass(slots=True)
class _RuleState:
    streak: int = 0
    active: bool = False
    last_fired_end_ms: int | None = None


#: The policy mode in which the candidate decides nothing and a rollback already happened:
#: rules that would issue a command stay quiet there (their state waits for the re-entry).
ROLLED_BACK = "rolled_back"
#: Version pairs whose guard state is kept (oldest forgotten first).
MAX_PAIRS = 256


@dataclass(slots=True)
class _PairState:
    """Guard state of one (rollout, champion version, candidate version)."""

    rules: dict[str, _RuleState] = field(default_factory=dict)
    #: Event-time end of the last report evaluated (older or repeated reports are ignored).
    last_window_end_ms: int | None = None
    #: The policy (highest epoch, its mode) of the last report that carried one.
    epoch: int | None = None
    mode: str | None = None
    #: Epochs this engine's own published pauses would create (expected epoch + 1): moving
    #: to one of them changes nothing about who decides, so it resets nothing.
    own_pauses: set[int] = field(default_factory=set)
    #: The epoch a rollback (pause) fired under: until the rollout leaves it, another
    #: command (pause) would only be refused, so those rules wait.
    rollback_epoch: int | None = None
    pause_epoch: int | None = None


def _pick(fig: Figure, bound: Bound) -> float | None:
    if not fig.ok:
        return None
    return fig.value if bound == "value" else (fig.lo if bound == "lo" else fig.hi)


PairKey = tuple[str, str, str]


class GuardEngine:
    """Evaluates rules against reports, with state per (rollout, model versions, rule).

    Cooldown and ordering use event time (``window_end_ms``), so replays give the same events.
    A report older than (or the same window as) the last one evaluated for its rollout and
    versions is ignored.

    **Guard state follows the rollout.** Each report says which policy epochs its records
    were decided under. When a rollout pair's highest epoch moves on (an operator's or a
    ramp's command: the mode, the share or, with a new version, the candidate changed), its
    rules restart from nothing: no streak, not active, no cool-down. So a harmful candidate
    put back into canary after a rollback is judged afresh and rolled back again within its
    ``consecutive`` windows. The only epoch that resets nothing is the one this engine's own
    ``pause`` creates (same mode, one epoch on: see :meth:`published_pause`). The comparisons
    do not carry the canary share, so every other epoch change is taken as one that may have
    changed who decides (an operator's pause or resume re-arms the rules too).

    Rules that issue commands stay quiet where a command could only be refused or pointless:
    while a window's policy is ``rolled_back``, in the rest of the epoch a rollback fired
    under (the windows still in flight before it applies), and for pauses, in the rest of
    the epoch a pause fired under.

    A window that straddles a command (records of two epochs) counts as a window of the
    later epoch: both arms score every request in every mode, so its paired figures are the
    candidate's all the same.
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
        self._pairs: dict[PairKey, _PairState] = {}
        #: Each rollout's latest evaluated pair (``active`` reports on it).
        self._latest: dict[str, PairKey] = {}
        self._resets: list[GuardReset] = []

    def active(self, rollout: str) -> list[str]:
        """Names of the rules currently in breach for ``rollout`` (its latest version pair)."""
        key = self._latest.get(rollout)
        state = None if key is None else self._pairs.get(key)
        if state is None:
            return []
        return [r.name for r in self.rules if (st := state.rules.get(r.name)) and st.active]

    def take_resets(self) -> list[GuardReset]:
        """Resets since the last call (for logs and metrics)."""
        out, self._resets = self._resets, []
        return out

    def published_pause(self, event: GuardEvent) -> None:
        """Note that ``event``'s pause was published with ``expected_epoch =
        event.policy_epoch``: if it applies, the rollout moves to the next epoch, which then
        resets nothing (the pause changes no routing)."""
        if event.policy_epoch is None:
            return
        state = self._pairs.get(_pair_key(event))
        if state is not None:
            state.own_pauses.add(event.policy_epoch + 1)
            while len(state.own_pauses) > 16:
                state.own_pauses.discard(min(state.own_pauses))

    def _pair(self, report: GuardedReport) -> _PairState:
        key = (report.rollout, report.champion.version, report.candidate.version)
        state = self._pairs.get(key)
        if state is None:
            state = self._pairs[key] = _PairState()
            while len(self._pairs) > MAX_PAIRS:
                del self._pairs[next(iter(self._pairs))]
        self._latest[report.rollout] = key
        return state

    def evaluate(self, report: GuardedReport) -> list[GuardEvent]:
        state = self._pair(report)
        end = report.window_end_ms
        if state.last_window_end_ms is not None and end <= state.last_window_end_ms:
            return []  # older than a window already evaluated, or the same one again
        state.last_window_end_ms = end
        self._follow_policy(state, report)
        epoch, mode = _policy(report)
        quiet: set[str] = set()
        if mode == ROLLED_BACK or (epoch is not None and epoch == state.rollback_epoch):
            quiet = {"rollback", "pause"}
        elif epoch is not None and epoch == state.pause_epoch:
            quiet = {"pause"}
        events: list[GuardEvent] = []
        for rule in self.rules:
            if rule.action in quiet:
                continue
            st = state.rules.get(rule.name)
            if st is None:
                st = state.rules[rule.name] = _RuleState()
            event = self._evaluate_rule(rule, st, report)
            if event is not None:
                events.append(event)
                if event.kind == "fired" and epoch is not None:
                    if rule.action == "rollback":
                        state.rollback_epoch = epoch
                    elif rule.action == "pause":
                        state.pause_epoch = epoch
        return events

    def _follow_policy(self, state: _PairState, report: GuardedReport) -> None:
        epoch, mode = _policy(report)
        if epoch is None:
            return
        if state.epoch is None:
            state.epoch, state.mode = epoch, mode
            return
        if epoch <= state.epoch:
            return  # the same policy (or a lagging instance's records)
        own = epoch in state.own_pauses and mode == state.mode
        if own:  # held by our own pause: another pause would only be refused
            state.pause_epoch = epoch
        else:
            state.rules.clear()
            state.rollback_epoch = state.pause_epoch = None
            self._resets.append(
                GuardReset(
                    rollout=report.rollout,
                    champion_version=report.champion.version,
                    candidate_version=report.candidate.version,
                    from_epoch=state.epoch,
                    to_epoch=epoch,
                    from_mode=state.mode,
                    to_mode=mode,
                    window_start_ms=report.window_start_ms,
                    window_end_ms=report.window_end_ms,
                )
            )
            del self._resets[:-MAX_PAIRS]
        state.epoch, state.mode = epoch, mode

    def _evaluate_rule(
        self, rule: GuardRule, st: _RuleState, report: GuardedReport
    ) -> GuardEvent | None:
        end = report.window_end_ms
        fig = _lookup(report, rule.figure, self.figures)
        x = _pick(fig, rule.bound)
        if x is None or report.counts.records < rule.min_pairs:
            return None
        if st.active:
            if rule.clears(x):
                st.active = False
                st.streak = 0
                return self._event("cleared", rule, report, fig, x, 0, None)
            return None
        side = rule.breach_side(x)
        if side is None or not _condition_holds(rule, report, self.figures):
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
        return self._event("fired", rule, report, fig, x, streak, side)

    def _event(
        self,
        kind: Literal["fired", "cleared"],
        rule: GuardRule,
        report: GuardedReport,
        fig: Figure,
        x: float,
        streak: int,
        side: Side | None,
    ) -> GuardEvent:
        word = "breached" if kind == "fired" else "cleared"
        if kind == "cleared":
            limit = (
                f"{rule.lower_clear:g} < x < {rule.clear:g}"
                if rule.two_sided
                else f"{'<' if rule.comparison == '>' else '>'} {rule.clear:g}"
            )
        elif side == "lower" and rule.lower_threshold is not None:
            limit = f"< {rule.lower_threshold:g}"
        else:
            limit = f"{rule.comparison} {rule.threshold:g}"
        reason = (
            f"{rule.name}: {rule.figure}.{rule.bound}={x:.6g} {word} ({limit}) over window "
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
            policy_epoch=_policy(report)[0],
            policy_mode=_policy(report)[1],
            side=side,
        )


def _pair_key(event: GuardEvent) -> PairKey:
    return (event.rollout, event.champion_version, event.candidate_version)
