from __future__ import annotations

import itertools
import math

import msgspec
import numpy as np
import pytest
from agg_support import ROLLOUT, batch_of, comparisons
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.aggregate import (
    AggregatorConfig,
    GroupKey,
    ScoreHistogram,
    WindowAggregate,
    WindowManager,
    WindowReport,
    comparison_batch,
)
from sidecar.contracts import Comparison, ModelError, ModelResult

KEY = GroupKey(ROLLOUT, "m", "1", "m", "2")
SMALL = AggregatorConfig(window_ms=1_000, min_pairs=20, min_latency_count=10)


def _one(request_id: str, ts: int, **cand: object) -> Comparison:
    return Comparison(
        request_id=request_id,
        routing_key=None,
        rollout=ROLLOUT,
        ts=ts,
        policy_epoch=1,
        policy_mode="canary",
        served_by="candidate",
        champion=ModelResult(model="m", version="1", score=0.5, decision=True, latency_ms=2.0),
        candidate=ModelResult(model="m", version="2", **cand),  # type: ignore[arg-type]
    )


def test_comparison_batch_columns() -> None:
    comps = [
        _one("a", 10, score=0.2, decision=False, latency_ms=1.5),
        _one("b", 11, score=None, error=ModelError(kind="timeout", message="x")),
        _one("c", 12, score=float("nan"), decision=True),
    ]
    b = comparison_batch(comps, [3, 3, 4], [100, 101, 7])
    assert b.keys == (KEY,) and b.key_code.tolist() == [0, 0, 0]
    assert b.partition.tolist() == [3, 3, 4] and b.offset.tolist() == [100, 101, 7]
    assert b.served_by.tolist() == [2, 2, 2]
    c = b.candidate
    assert c.score_missing.tolist() == [False, True, False]
    assert np.isnan(c.score[1:]).all()
    assert c.decision.tolist() == [0, -1, 1]
    assert c.error.tolist() == [0, 2, 0]
    assert c.latency_ms[0] == 1.5 and np.isnan(c.latency_ms[1:]).all()
    assert len(comparison_batch([], 0, [])) == 0


def test_add_counts_errors_decisions_and_never_crashes_on_bad_scores() -> None:
    comps = [
        _one("a", 10, score=0.95, decision=True, latency_ms=1.0),
        _one("b", 11, score=None, error=ModelError(kind="timeout", message="x")),
        _one("c", 12, score=float("nan"), decision=False),
        _one("d", 13, score=None, error=ModelError(kind="exception", message="boom")),
        _one("a", 14, score=0.95, decision=True, latency_ms=1.0),  # redelivery
    ]
    agg = WindowAggregate(KEY, 0, 1_000, SMALL)
    agg.add(batch_of(comps, partition=2, first_offset=40))
    r = agg.result(emitted_at_ms=5)
    assert r.counts.records == 4 and r.counts.duplicates == 1
    assert r.counts.served_candidate == 4
    assert r.candidate.errors == {
        "exception": 1,
        "timeout": 1,
        "invalid_output": 0,
        "unavailable": 0,
        "skipped": 0,
        "shed": 0,
    }
    assert (r.candidate.scored, r.candidate.score_nan, r.candidate.score_missing) == (1, 1, 2)
    assert (r.paired.pairs, r.paired.both_yes, r.paired.champion_yes_candidate_no) == (2, 1, 1)
    assert [(o.partition, o.first, o.last) for o in r.offsets] == [(2, 40, 44)]
    assert (r.min_ts_ms, r.max_ts_ms) == (10, 14)  # evidence includes the duplicate
    # Far below min_pairs: every statistic says so explicitly.
    for fig in (
        r.paired.decision_rate_ratio,
        r.paired.decision_rate_diff,
        r.paired.mcnemar,
        r.candidate.error_rate,
        r.drift_candidate_vs_champion.psi,
        r.candidate.latency.p99,
        r.latency_p99_ratio,
    ):
        assert fig.status == "insufficient_data" and fig.value is None
    assert r.candidate.drift_vs_reference.psi.reason == "no_reference"
    # And the report round-trips through its JSON contract.
    assert msgspec.json.decode(msgspec.json.encode(r), type=WindowReport) == r


def _report_of(parts: list[WindowAggregate]) -> dict[str, object]:
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    out = msgspec.to_builtins(merged.result(emitted_at_ms=1))
    assert isinstance(out, dict)
    return out


@given(
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 600), max_size=4),
)
@settings(max_examples=40, deadline=None)
def test_merge_equals_add_all(seed: int, cuts: list[int]) -> None:
    rng = np.random.default_rng(seed)
    comps = comparisons(
        rng, 600, noise=0.1, error_rate=0.02, nan_rate=0.02, none_rate=0.02, spacing_ms=1
    )
    batch = batch_of(comps, partition=0)
    perm = rng.permutation(len(comps))
    whole = WindowAggregate(KEY, 0, 1_000, SMALL)
    whole.add(batch.take(perm))
    bounds = [0, *sorted(cuts), len(comps)]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        part = WindowAggregate(KEY, 0, 1_000, SMALL)
        # Each part itself gets its rows in two adds, to mix add and merge.
        idx = perm[lo:hi]
        part.add(batch.take(idx[: len(idx) // 2]))
        part.add(batch.take(idx[len(idx) // 2 :]))
        parts.append(part)
    assert _report_of(parts) == msgspec.to_builtins(whole.result(emitted_at_ms=1))


def test_merge_rejects_other_windows() -> None:
    with pytest.raises(ValueError):
        WindowAggregate(KEY, 0, 1_000).merge(WindowAggregate(KEY, 1_000, 2_000))


def _manager(**kw: object) -> WindowManager:
    base: dict[str, object] = {
        "window_ms": 1_000,
        "min_pairs": 20,
        "min_latency_count": 10,
        "allowed_lateness_ms": 0,
    }
    base.update(kw)
    return WindowManager(msgspec.convert(base, AggregatorConfig))


def test_window_closes_once_after_watermark_passes_end_plus_grace() -> None:
    rng = np.random.default_rng(0)
    mgr = _manager(grace_ms=200, allowed_lateness_ms=100)
    res = mgr.process(batch_of(comparisons(rng, 100, t0=0, spacing_ms=10)), now_ms=0)
    assert res.reports == [] and mgr.open_windows == 1
    # Max ts 1_299 -> watermark 1_199 < 1_000 + 200: still open.
    res = mgr.process(batch_of(comparisons(rng, 1, t0=1_299, id_prefix="x")), now_ms=1)
    assert res.reports == []
    # Max ts 1_300 -> watermark 1_200 >= end + grace: closes, exactly once.
    res = mgr.process(batch_of(comparisons(rng, 1, t0=1_300, id_prefix="y")), now_ms=2)
    assert [(r.window_start_ms, r.window_end_ms) for r in res.reports] == [(0, 1_000)]
    assert res.reports[0].counts.records == 100 and res.reports[0].emitted_at_ms == 2
    res = mgr.process(batch_of(comparisons(rng, 1, t0=1_301, id_prefix="z")), now_ms=3)
    assert res.reports == []


def test_late_records_are_returned_counted_and_not_aggregated() -> None:
    rng = np.random.default_rng(1)
    mgr = _manager()
    mgr.process(batch_of(comparisons(rng, 50, t0=0, spacing_ms=10)), now_ms=0)
    closed = mgr.process(batch_of(comparisons(rng, 50, t0=1_000, spacing_ms=10)), now_ms=1)
    assert [r.window_start_ms for r in closed.reports] == [0]
    mixed = comparisons(rng, 3, t0=990, spacing_ms=10, id_prefix="late")  # 990 late; 1000+ ok
    res = mgr.process(batch_of(mixed), now_ms=2)
    assert res.late_indices.tolist() == [0]
    assert res.late_by_rollout == {ROLLOUT: 1} and mgr.late_total == {ROLLOUT: 1}
    res = mgr.process(batch_of(comparisons(rng, 1, t0=5_000, id_prefix="far")), now_ms=3)
    (report,) = [r for r in res.reports if r.window_start_ms == 1_000]
    assert report.counts.late == 1
    assert report.counts.records == 52  # the late record went nowhere else


def test_hopping_windows_each_record_in_every_window() -> None:
    rng = np.random.default_rng(2)
    mgr = _manager(window_ms=1_000, hop_ms=500)
    first = mgr.process(batch_of(comparisons(rng, 100, t0=0, spacing_ms=20)), now_ms=0)
    res = mgr.process(batch_of(comparisons(rng, 1, t0=10_000, id_prefix="x")), now_ms=1)
    # ts 0..1980: the first batch's own watermark (1980) already closes three windows.
    assert [r.window_start_ms for r in first.reports] == [-500, 0, 500]
    got = {r.window_start_ms: r.counts.records for r in first.reports + res.reports}
    assert got == {-500: 25, 0: 50, 500: 50, 1_000: 50, 1_500: 25}


def test_hopping_partially_late_record_goes_to_open_windows_only() -> None:
    rng = np.random.default_rng(3)
    mgr = _manager(window_ms=1_000, hop_ms=500)
    first = mgr.process(batch_of(comparisons(rng, 10, t0=0, spacing_ms=100)), now_ms=0)
    res = mgr.process(batch_of(comparisons(rng, 1, t0=1_000, id_prefix="a")), now_ms=1)
    assert [r.window_start_ms for r in first.reports + res.reports] == [-500, 0]
    res = mgr.process(batch_of(comparisons(rng, 1, t0=700, id_prefix="b")), now_ms=2)
    assert res.late_indices.size == 0  # window [500, 1500) is still open
    res = mgr.process(batch_of(comparisons(rng, 1, t0=400, id_prefix="c")), now_ms=3)
    assert res.late_indices.tolist() == [0]  # both its windows have closed


def test_idle_partition_releases_windows_on_advance() -> None:
    rng = np.random.default_rng(4)
    mgr = _manager(idle_timeout_ms=5_000)
    mgr.process(batch_of(comparisons(rng, 10, t0=0), partition=0), now_ms=0)
    mgr.process(batch_of(comparisons(rng, 10, t0=3_000, id_prefix="p1"), partition=1), 100)
    assert mgr.advance(now_ms=4_999) == []  # partition 0 still holds the watermark at ~0
    reports = mgr.advance(now_ms=5_000)
    assert [r.window_start_ms for r in reports] == [0]


def test_open_windows_are_capped_oldest_closed_early_and_their_stragglers_are_late() -> None:
    rng = np.random.default_rng(14)
    mgr = _manager(max_open_windows=3, idle_timeout_ms=10**9)
    # Partition 0 stays at t=0 and holds the watermark back; partition 1 runs ahead.
    mgr.process(batch_of(comparisons(rng, 10, t0=0, id_prefix="slow"), partition=0), 0)
    early: list[WindowReport] = []
    for w in range(1, 7):
        comps = comparisons(rng, 10, t0=w * 1_000, id_prefix=f"fast{w}")
        res = mgr.process(batch_of(comps, partition=1), now_ms=w)
        early += res.reports
        assert mgr.open_windows <= 3
    assert [(r.window_start_ms, r.closed_by) for r in early] == [
        (0, "capacity"),
        (1_000, "capacity"),
        (2_000, "capacity"),
        (3_000, "capacity"),
    ]
    assert [r.counts.records for r in early] == [10, 10, 10, 10]
    # A straggler of a window closed early is late: counted, never a second report for it.
    res = mgr.process(batch_of(comparisons(rng, 4, t0=1_500, id_prefix="strag"), partition=0), 9)
    assert res.late_by_rollout == {ROLLOUT: 4} and mgr.late_total == {ROLLOUT: 4}
    assert all(r.window_start_ms != 1_000 for r in res.reports)
    rest = mgr.flush(10)
    assert {r.closed_by for r in rest} == {"flush"}
    assert sum(r.counts.late for r in early + res.reports + rest) == 4


def test_keys_are_separate_windows_and_offsets_are_evidence() -> None:
    rng = np.random.default_rng(5)
    a = comparisons(rng, 30, t0=0, rollout="r-a")
    b = comparisons(rng, 20, t0=0, rollout="r-b", candidate_version="3")
    batch = comparison_batch(a + b, [0] * 30 + [1] * 20, list(range(100, 150)))
    mgr = _manager()
    mgr.process(batch, now_ms=0)
    reports = mgr.flush(now_ms=9)
    by = {(r.rollout, r.candidate.version): r for r in reports}
    assert by[("r-a", "2")].counts.records == 30 and by[("r-b", "3")].counts.records == 20
    assert [(o.partition, o.first, o.last) for o in by[("r-b", "3")].offsets] == [(1, 130, 149)]
    assert mgr.open_windows == 0


def test_reference_is_first_full_window_then_drift_is_reported() -> None:
    rng = np.random.default_rng(6)
    mgr = _manager(min_pairs=50)
    # Data starts mid-window at 500: window 0 is partial and must not become the reference.
    reports = []
    for t0, spacing, prefix in [(500, 1, "w0"), (1_000, 2, "w1"), (2_000, 2, "w2")]:
        batch = batch_of(comparisons(rng, 400, t0=t0, spacing_ms=spacing, id_prefix=prefix))
        reports += mgr.process(batch, now_ms=t0).reports
    first, second = reports
    assert first.window_start_ms == 0 and second.window_start_ms == 1_000
    assert first.candidate.drift_vs_reference.psi.reason == "no_reference"
    assert second.candidate.drift_vs_reference.psi.reason == "no_reference"
    ref = mgr.reference(ROLLOUT, "m", "2")
    assert ref is not None and ref.window_start_ms == 1_000
    res = mgr.process(batch_of(comparisons(rng, 1, t0=9_000, id_prefix="w9")), 3)
    third = res.reports[0]
    assert third.candidate.reference_window_start_ms == 1_000
    drift = third.candidate.drift_vs_reference
    assert drift.psi.ok and drift.psi_band == "stable" and drift.js_distance.ok and drift.ks.ok


def test_supplied_reference_is_used() -> None:
    rng = np.random.default_rng(7)
    mgr = _manager(min_pairs=50)
    ref = ScoreHistogram()
    ref.add(rng.beta(8, 2, 10_000))  # very different from U(0, 1)
    mgr.set_reference(ROLLOUT, "m", "2", ref)
    mgr.process(batch_of(comparisons(rng, 500, t0=0, spacing_ms=1)), now_ms=0)
    (r,) = mgr.flush(now_ms=1)
    assert r.candidate.drift_vs_reference.psi_band == "significant"
    assert r.candidate.reference_window_start_ms is None
    assert r.champion.drift_vs_reference.psi.reason == "no_reference"
    with pytest.raises(ValueError):
        mgr.set_reference(ROLLOUT, "m", "2", ScoreHistogram([0.0, 0.5, 1.0]))


def test_full_report_figures_on_a_clear_difference() -> None:
    rng = np.random.default_rng(8)
    comps = comparisons(
        rng, 5_000, threshold=0.9, candidate_threshold=0.8, latency_scale=3.0, error_rate=0.03
    )
    agg = WindowAggregate(KEY, 0, 10_000, AggregatorConfig(window_ms=10_000))
    agg.add(batch_of(comps))
    r = agg.result()
    ratio = r.paired.decision_rate_ratio
    assert ratio.ok and ratio.lo is not None and ratio.value is not None
    assert 1.7 < ratio.lo < ratio.value < 2.3
    assert r.paired.champion_yes_candidate_no == 0  # the candidate is strictly looser
    assert r.paired.mcnemar.p_value is not None and r.paired.mcnemar.p_value < 1e-10
    assert r.paired.flip_no_to_yes.value == pytest.approx(
        r.paired.champion_no_candidate_yes / (r.paired.both_no + r.paired.champion_no_candidate_yes)
    )
    assert r.candidate.error_rate.value == pytest.approx(0.03, abs=0.01)
    assert r.latency_p99_ratio.value == pytest.approx(3.0, rel=0.15)
    assert r.drift_candidate_vs_champion.psi.ok
    assert r.drift_candidate_vs_champion.psi.value is not None
    assert r.drift_candidate_vs_champion.psi.value < 0.1  # same scores, different threshold
    assert all(math.isfinite(f.value) for f in (ratio,) if f.value is not None)


def test_a_window_says_which_policies_its_records_were_decided_under() -> None:
    from sidecar.aggregate.ingest import ComparisonDecoder, decode_columns

    rng = np.random.default_rng(4)
    # Shadow at epoch 6, champion failing on 4% (the candidate decides those: fallbacks),
    # then a canary at epoch 7 from the middle of the window; one straggler of epoch 5.
    shadow = comparisons(rng, 400, t0=0, spacing_ms=1, policy_epoch=6, champion_error_rate=0.04)
    canary = comparisons(
        rng, 400, t0=500, spacing_ms=1, policy_epoch=7, policy_mode="canary", id_prefix="c"
    )
    late = comparisons(rng, 1, t0=900, policy_epoch=5, id_prefix="l")
    values = [msgspec.json.encode(c) for c in shadow + canary + late]
    decoder = ComparisonDecoder()
    mgr = WindowManager(SMALL)
    reports = []
    for start in range(0, len(values), 300):  # polls: typed (interned) decoding after the first
        chunk = values[start : start + 300]
        batch, bad = decode_columns(
            chunk,
            np.zeros(len(chunk), np.int32),
            np.arange(start, start + len(chunk), dtype=np.int64),
            decoder,
        )
        assert bad == []
        reports += mgr.process(batch, 0).reports
    (r,) = reports + mgr.flush(0)
    assert (r.policy_epoch_min, r.policy_epoch_max, r.policy_mode) == (5, 7, "canary")
    assert r.policy_modes == {"canary": 400, "shadow": 401}
    fallbacks = sum(c.served_by == "candidate" for c in shadow)
    assert fallbacks > 5
    assert (r.counts.champion_decides, r.counts.candidate_fallbacks) == (401, fallbacks)
    assert r.champion_fallback_rate.value == pytest.approx(fallbacks / 401)
    # in canary the candidate serving a fifth is its share, not a fallback
    assert r.counts.served_candidate == fallbacks + 80
