from __future__ import annotations

import msgspec
import numpy as np
import pytest
from agg_support import ROLLOUT, batch_of, comparisons

from sidecar.aggregate import (
    AggregatorConfig,
    Figure,
    GroupKey,
    GuardEngine,
    GuardRule,
    WindowAggregate,
    WindowManager,
    WindowReport,
    default_rules,
    figure_of,
    insufficient,
)

KEY = GroupKey(ROLLOUT, "m", "1", "m", "2")
_BASE = WindowAggregate(KEY, 0, 60_000).result()


def report(
    ratio: float | None,
    *,
    window: int = 0,
    records: int = 1_000,
    rollout: str = ROLLOUT,
    epoch: int | None = None,
    mode: str | None = None,
    candidate_version: str = "2",
) -> WindowReport:
    """A report whose decision-rate ratio is ``ratio`` (None = insufficient data)."""
    fig = insufficient(records) if ratio is None else Figure(value=ratio, lo=ratio * 0.9, n=records)
    paired = msgspec.structs.replace(_BASE.paired, decision_rate_ratio=fig)
    counts = msgspec.structs.replace(_BASE.counts, records=records)
    candidate = msgspec.structs.replace(_BASE.candidate, version=candidate_version)
    start = window * 60_000
    return msgspec.structs.replace(
        _BASE,
        rollout=rollout,
        paired=paired,
        counts=counts,
        candidate=candidate,
        window_start_ms=start,
        window_end_ms=start + 60_000,
        emitted_at_ms=start + 61_000,
        policy_epoch_min=epoch,
        policy_epoch_max=epoch,
        policy_mode=mode,
    )


def rule(**kw: object) -> GuardRule:
    base: dict[str, object] = {
        "name": "ratio",
        "figure": "decision_rate_ratio",
        "threshold": 1.5,
        "clear_threshold": 1.2,
        "action": "rollback",
    }
    base.update(kw)
    return msgspec.convert(base, GuardRule)


def run(engine: GuardEngine, values: list[float | None], **kw: object) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for w, v in enumerate(values):
        for e in engine.evaluate(report(v, window=w, **kw)):  # type: ignore[arg-type]
            out.append((w, e.kind))
    return out


def test_fires_once_per_breach_and_clears_below_clear_threshold() -> None:
    eng = GuardEngine([rule()])
    events = run(eng, [1.0, 1.6, 1.7, 1.3, 1.8, 1.1, 1.4, 1.6])
    # 1.3 is inside the hysteresis band: still active, so 1.8 does not fire again.
    assert events == [(1, "fired"), (5, "cleared"), (7, "fired")]


def test_needs_consecutive_breaching_windows() -> None:
    eng = GuardEngine([rule(consecutive=3)])
    assert run(eng, [1.6, 1.6, 1.0, 1.6, 1.6, 1.6, 1.6]) == [(5, "fired")]


def test_insufficient_data_neither_breaches_nor_clears_nor_breaks_streak() -> None:
    eng = GuardEngine([rule(consecutive=2)])
    assert run(eng, [1.6, None, 1.6, None, 1.0]) == [(2, "fired"), (4, "cleared")]
    eng = GuardEngine([rule(min_pairs=2_000)])
    assert run(eng, [3.0, 3.0]) == []  # reports have only 1_000 records


def test_cooldown_in_event_time() -> None:
    eng = GuardEngine([rule(cooldown_s=180)])  # 3 windows of 60 s
    events = run(eng, [1.6, 1.0, 1.6, 1.0, 1.6, 1.0, 1.6, 1.6])
    # Fired at w0 (end 60s); w2 is 120 s later (blocked, stays pending); w4 is 240 s: fires.
    assert events == [(0, "fired"), (1, "cleared"), (4, "fired"), (5, "cleared"), (7, "fired")]


def test_state_is_per_rollout_and_stale_reports_ignored() -> None:
    eng = GuardEngine([rule()])
    assert [e.kind for e in eng.evaluate(report(2.0, window=5, rollout="a"))] == ["fired"]
    assert [e.kind for e in eng.evaluate(report(2.0, window=5, rollout="b"))] == ["fired"]
    assert eng.evaluate(report(1.0, window=4, rollout="a")) == []  # older window: ignored
    assert eng.active("a") == ["ratio"]


def test_a_report_delivered_twice_counts_once_towards_consecutive() -> None:
    eng = GuardEngine([rule(consecutive=2)])
    assert eng.evaluate(report(2.0, window=1)) == []
    assert eng.evaluate(report(2.0, window=1)) == []  # at-least-once duplicate: no streak 2
    assert [e.kind for e in eng.evaluate(report(2.0, window=2))] == ["fired"]


def test_less_than_rules_and_bounds() -> None:
    low = rule(name="low", comparison="<", threshold=0.5, clear_threshold=0.8)
    eng = GuardEngine([low])
    assert run(eng, [0.9, 0.4, 0.7, 0.9]) == [(1, "fired"), (3, "cleared")]
    eng = GuardEngine([rule(bound="lo")])  # lo = 0.9 * value in these reports
    assert run(eng, [1.6, 1.7]) == [(1, "fired")]


def test_rule_validation() -> None:
    with pytest.raises(ValueError):
        rule(clear_threshold=2.0)
    with pytest.raises(ValueError):
        rule(figure="no_such_figure")
    with pytest.raises(ValueError):
        GuardEngine([rule(), rule()])
    with pytest.raises(KeyError):
        figure_of(_BASE, "paired.nothing")


def test_event_carries_evidence() -> None:
    eng = GuardEngine([rule()])
    (event,) = eng.evaluate(report(2.0, window=3))
    assert event.kind == "fired" and event.rule.action == "rollback"
    assert event.value == 2.0 and event.figure.value == 2.0
    assert (event.window_start_ms, event.window_end_ms) == (180_000, 240_000)
    assert event.figures["decision_rate_ratio"].value == 2.0
    assert "decision_rate_ratio" in event.reason and "1000 pairs" in event.reason
    assert event.candidate_version == "2"
    msgspec.json.encode(event)  # serialisable as a command reason


def test_default_rules_cover_the_documented_figures() -> None:
    names = {r.figure: r for r in default_rules()}
    ratio = names["decision_rate_ratio"]
    assert (ratio.threshold, ratio.clear) == (1.5, 1.2)
    assert ratio.lower_threshold == pytest.approx(1 / 1.5)
    assert ratio.lower_clear == pytest.approx(1 / 1.2)
    assert names["psi_candidate_vs_champion"].threshold == 0.25
    assert names["candidate_excess_error_rate"].threshold == 0.01
    assert names["candidate_excess_timeout_rate"].threshold == 0.01
    assert names["latency_slower_share"].bound == "lo"
    assert names["latency_tail_excess"].bound == "lo"
    for figure in ("champion_error_rate", "champion_nan_rate", "psi_champion_vs_reference"):
        assert names[figure].action == "alert"
    assert names["champion_fallback_rate"].action == "alert"
    acting = {r.name for r in default_rules() if r.action != "alert"}
    assert acting == {
        "decision_rate_ratio",
        "score_psi",
        "candidate_errors",
        "candidate_timeouts",
        "latency_median",
        "latency_tail",
        # non-binary outputs: inert (insufficient data) in binary rollouts
        "ranking_overlap_collapse",
        "item_exposure_jump",
        "catalogue_coverage",
        "label_rate_ratio",
        "label_psi",
        "value_differences",
        "value_psi",
    }
    for r in default_rules():
        assert figure_of(_BASE, r.figure).status == "insufficient_data"
        assert r.consecutive >= 1 and r.min_pairs >= 200


def _scenario(seed: int, candidate_threshold: float, noise: float) -> list[str]:
    rng = np.random.default_rng(seed)
    cfg = AggregatorConfig(window_ms=10_000, allowed_lateness_ms=0, min_pairs=500)
    mgr = WindowManager(cfg)
    eng = GuardEngine()
    fired = []
    for w in range(6):
        comps = comparisons(
            rng,
            2_000,
            t0=w * 10_000,
            spacing_ms=5,
            threshold=0.9,
            candidate_threshold=candidate_threshold,
            noise=noise,
            id_prefix=f"w{w}",
        )
        for r in mgr.process(batch_of(comps), now_ms=w).reports:
            fired += [e.rule.name for e in eng.evaluate(r) if e.kind == "fired"]
    for r in mgr.flush(now_ms=99):
        fired += [e.rule.name for e in eng.evaluate(r) if e.kind == "fired"]
    return fired


def test_candidate_flagging_twice_as_often_fires_the_ratio_guard() -> None:
    # Same scores, threshold 0.8 instead of 0.9: the candidate flags 2x the requests.
    assert _scenario(0, candidate_threshold=0.8, noise=0.0) == ["decision_rate_ratio"]


@pytest.mark.parametrize("seed", range(10))
def test_equivalent_candidate_never_fires(seed: int) -> None:
    assert _scenario(seed, candidate_threshold=0.9, noise=0.03) == []
    assert _scenario(seed + 100, candidate_threshold=0.9, noise=0.0) == []


def _latency_report(window: int, ratio: float, candidate_p99_ms: float) -> WindowReport:
    base = report(1.0, window=window)
    latency = msgspec.structs.replace(
        base.candidate.latency, p99=Figure(value=candidate_p99_ms, n=1_000)
    )
    candidate = msgspec.structs.replace(base.candidate, latency=latency)
    return msgspec.structs.replace(
        base, candidate=candidate, latency_p99_ratio=Figure(value=ratio, n=1_000)
    )


def test_a_second_condition_keeps_millisecond_noise_from_firing() -> None:
    latency_rule = rule(
        name="p99",
        figure="latency_p99_ratio",
        threshold=2.0,
        clear_threshold=1.5,
        consecutive=2,
        action="pause",
        only_if="candidate_latency_p99",
        only_if_above=20.0,
    )
    engine = GuardEngine([latency_rule])
    # A tripled p99 of a few milliseconds: scheduling noise on a busy host, not a regression.
    noisy = [engine.evaluate(_latency_report(w, 3.0, 6.0)) for w in range(4)]
    assert not any(noisy)
    # The same ratio at a p99 that matters fires after the consecutive windows.
    events = [engine.evaluate(_latency_report(w, 3.0, 60.0)) for w in range(4, 7)]
    assert [len(e) for e in events] == [0, 1, 0]
    assert events[1][0].kind == "fired"


def test_only_if_must_name_a_known_figure() -> None:
    with pytest.raises(ValueError, match="only_if"):
        rule(only_if="no_such_figure", only_if_above=1.0)


# --------------------------------------------------------------------------- two-sided rules


def band(**kw: object) -> GuardRule:
    return rule(lower_threshold=0.67, lower_clear_threshold=0.83, **kw)


def test_a_two_sided_rule_fires_on_either_side_and_clears_inside_the_band() -> None:
    eng = GuardEngine([band()])
    got = []
    for w, v in enumerate([1.0, 0.5, 0.7, 0.9, 1.6, 0.5, 1.1]):
        got += [(w, e.kind, e.side) for e in eng.evaluate(report(v, window=w))]
    # 0.7 is inside the lower hysteresis band; a jump from one side to the other (1.6 -> 0.5)
    # does not clear.
    assert got == [
        (1, "fired", "lower"),
        (3, "cleared", None),
        (4, "fired", "upper"),
        (6, "cleared", None),
    ]


def test_two_sided_rule_validation() -> None:
    with pytest.raises(ValueError, match="below threshold"):
        rule(lower_threshold=2.0)
    with pytest.raises(ValueError, match="comparison '>'"):
        rule(comparison="<", threshold=0.5, clear_threshold=0.8, lower_threshold=0.2)
    with pytest.raises(ValueError, match="lower_clear_threshold must lie"):
        rule(lower_threshold=0.67, lower_clear_threshold=0.5)
    with pytest.raises(ValueError, match="needs lower_threshold"):
        rule(lower_clear_threshold=0.8)


def test_a_lower_breach_is_named_in_the_reason() -> None:
    (event,) = GuardEngine([band()]).evaluate(report(0.5))
    assert "breached (< 0.67)" in event.reason


# --------------------------------------------------------------------------- rollout state


def run_policy(engine: GuardEngine, windows: list[tuple[float, int, str]]) -> list[str]:
    out = []
    for w, (v, epoch, mode) in enumerate(windows):
        for e in engine.evaluate(report(v, window=w, epoch=epoch, mode=mode)):
            out.append(f"{w}:{e.kind}")
    return out


def test_a_new_epoch_resets_streaks_activity_and_cooldown() -> None:
    eng = GuardEngine([rule(consecutive=2, cooldown_s=3_600)])
    events = run_policy(
        eng,
        [
            (2.0, 4, "canary"),
            (2.0, 4, "canary"),  # fires
            (2.0, 5, "rolled_back"),  # quiet while rolled back (state reset, nothing counted)
            (2.0, 5, "rolled_back"),
            (2.0, 6, "canary"),  # re-entered: judged afresh, despite the hour of cool-down
            (2.0, 6, "canary"),
        ],
    )
    assert events == ["1:fired", "5:fired"]
    resets = eng.take_resets()
    assert [(r.from_epoch, r.to_epoch, r.to_mode) for r in resets] == [
        (4, 5, "rolled_back"),
        (5, 6, "canary"),
    ]
    assert eng.take_resets() == []


def test_without_epochs_the_state_carries_on_as_before() -> None:
    eng = GuardEngine([rule(consecutive=2, cooldown_s=3_600)])
    assert run_policy(eng, [(2.0, 0, "canary")] * 2) == ["1:fired"]
    events = [e.kind for w in range(2, 6) for e in eng.evaluate(report(2.0, window=w))]
    assert events == []  # still active: no epoch says anything changed


def test_own_pause_does_not_reset_but_other_commands_do() -> None:
    pause = rule(action="pause", consecutive=1, clear_threshold=1.0)
    eng = GuardEngine([pause])
    (fired,) = eng.evaluate(report(2.0, window=0, epoch=7, mode="canary"))
    assert fired.policy_epoch == 7
    eng.published_pause(fired)  # it went out with expected_epoch 7
    assert eng.evaluate(report(2.0, window=1, epoch=8, mode="canary")) == []  # held, no reset
    assert eng.active(ROLLOUT) == ["ratio"] and eng.take_resets() == []
    # an operator's resume (epoch 9): the rules are re-armed, and the breach pauses again
    assert [e.kind for e in eng.evaluate(report(2.0, window=2, epoch=9, mode="canary"))] == [
        "fired"
    ]


def test_no_second_command_in_the_epoch_a_rollback_fired_in() -> None:
    rollback = rule(name="ratio", consecutive=1)
    pause = rule(name="pause", action="pause", consecutive=2)
    eng = GuardEngine([rollback, pause])
    first = eng.evaluate(report(2.0, window=0, epoch=3, mode="shadow"))
    assert [e.rule.name for e in first] == ["ratio"]
    # the next window still ran under epoch 3 (the rollback was applied after it ended)
    assert eng.evaluate(report(2.0, window=1, epoch=3, mode="shadow")) == []


def test_state_is_per_candidate_version() -> None:
    eng = GuardEngine([rule(consecutive=1, cooldown_s=3_600)])
    assert [e.kind for e in eng.evaluate(report(2.0, window=0))] == ["fired"]
    new = eng.evaluate(report(2.0, window=1, candidate_version="3"))
    assert [(e.kind, e.candidate_version) for e in new] == [("fired", "3")]
    assert eng.active(ROLLOUT) == ["ratio"]  # the latest pair's


def test_an_engine_only_takes_rules_on_figures_its_reports_have() -> None:
    quality = GuardRule(name="q", figure="cost_diff", threshold=0.0, bound="lo")
    with pytest.raises(ValueError, match="not in these reports"):
        GuardEngine([quality])  # the aggregator's reports have no quality figures
    table = {"cost_diff": lambda r: r.paired.decision_rate_ratio}
    engine = GuardEngine([quality], figures=table)
    (event,) = engine.evaluate(report(2.0))
    assert event.kind == "fired" and set(event.figures) == {"cost_diff"}
