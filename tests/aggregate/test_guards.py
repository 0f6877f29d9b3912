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
    ratio: float | None, *, window: int = 0, records: int = 1_000, rollout: str = ROLLOUT
) -> WindowReport:
    """A report whose decision-rate ratio is ``ratio`` (None = insufficient data)."""
    fig = insufficient(records) if ratio is None else Figure(value=ratio, lo=ratio * 0.9, n=records)
    paired = msgspec.structs.replace(_BASE.paired, decision_rate_ratio=fig)
    counts = msgspec.structs.replace(_BASE.counts, records=records)
    start = window * 60_000
    return msgspec.structs.replace(
        _BASE,
        rollout=rollout,
        paired=paired,
        counts=counts,
        window_start_ms=start,
        window_end_ms=start + 60_000,
        emitted_at_ms=start + 61_000,
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
    assert names["decision_rate_ratio"].threshold == 1.5
    assert names["decision_rate_ratio"].clear == 1.2
    assert names["psi_candidate_vs_champion"].threshold == 0.25
    assert names["candidate_error_rate"].threshold == 0.01
    assert names["latency_p99_ratio"].threshold == 2.0
    for r in default_rules():
        assert figure_of(_BASE, r.figure).status == "insufficient_data"


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
    [latency_rule] = [r for r in default_rules() if r.name == "latency_p99_ratio"]
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


def test_an_engine_only_takes_rules_on_figures_its_reports_have() -> None:
    quality = GuardRule(name="q", figure="cost_diff", threshold=0.0, bound="lo")
    with pytest.raises(ValueError, match="not in these reports"):
        GuardEngine([quality])  # the aggregator's reports have no quality figures
    table = {"cost_diff": lambda r: r.paired.decision_rate_ratio}
    engine = GuardEngine([quality], figures=table)
    (event,) = engine.evaluate(report(2.0))
    assert event.kind == "fired" and set(event.figures) == {"cost_diff"}
