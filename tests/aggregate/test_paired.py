"""Paired failures (per request) and paired latency (per distinct batch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sidecar.aggregate.batch import ERROR_KINDS, ArmColumns
from sidecar.aggregate.paired import (
    BOTH_TIMED_OUT,
    CANDIDATE_ONLY_TIMEOUT,
    CANDIDATE_ONLY_TIMEOUT_HOST,
    PAIRS,
    BatchLatencies,
    FailureTable,
    paired_failures,
    paired_latency,
)
from sidecar.aggregate.stats import Z95, sign_test_greater

CODE = {k: i + 1 for i, k in enumerate(ERROR_KINDS)}


def arm(latency: list[float], errors: list[str | None]) -> ArmColumns:
    error = np.array([0 if e is None else CODE[e] for e in errors], dtype=np.int8)
    failed = error != 0
    return ArmColumns(
        score=np.where(failed, np.nan, 0.5),
        score_missing=failed,
        decision=np.where(failed, -1, 0).astype(np.int8),
        latency_ms=np.asarray(latency, dtype=np.float64),
        error=error,
    )


def test_failures_on_the_same_requests_are_told_apart() -> None:
    champion = arm(
        [2.0, 2.0, 200.0, 3.0, 150.0, 2.0, 2.5, 1.0],
        [None, None, "timeout", None, None, "exception", None, None],
    )
    candidate = arm(
        [2.0, 2.0, 200.0, 200.0, 200.0, 2.0, 2.0, 1.0],
        [None, "exception", "timeout", "timeout", "timeout", None, "invalid_output", "skipped"],
    )
    table = FailureTable(0.25)
    table.add(champion, candidate)
    f = paired_failures(table, z=Z95, min_count=1)
    assert f.pairs == 7  # the skipped arm's record is not a pair
    assert (f.both_failed, f.both_timed_out) == (1, 1)  # a host stall: nobody's fault
    assert (f.candidate_only_errors, f.champion_only_errors) == (2, 1)
    # The champion took 3 ms where the candidate timed out: the candidate's. It took 150 ms
    # on another batch: the host was starved for both (the champion just made it).
    assert (f.candidate_only_timeouts, f.candidate_only_timeouts_host) == (1, 1)
    assert f.candidate_excess_error_rate.value == pytest.approx((2 - 1) / 7)
    assert f.candidate_excess_timeout_rate.value == pytest.approx(1 / 7)
    lo, hi = f.candidate_excess_error_rate.lo, f.candidate_excess_error_rate.hi
    assert lo is not None and hi is not None and lo < 1 / 7 < hi
    # two distinct calls failed on the candidate alone; one timed out (its own fault)
    assert (f.candidate_error_calls.value, f.candidate_timeout_calls.value) == (2.0, 1.0)


def test_one_failed_call_is_one_failure_however_many_records_it_held() -> None:
    table = FailureTable()
    for latency in (7.0, 7.0, 9.0):  # two calls, the first delivered in two polls
        champion = arm([2.0] * 200, [None] * 200)
        candidate = arm([latency] * 200, ["exception"] * 200)
        table.add(champion, candidate)
    other = FailureTable()
    other.add(arm([2.0] * 5, [None] * 5), arm([7.0] * 5, ["exception"] * 5))  # a partition
    table.merge(other)
    f = paired_failures(table, z=Z95, min_count=1)
    assert f.candidate_only_errors == 605 and f.candidate_error_calls.value == 2.0


def test_a_stalled_window_does_not_judge_the_candidates_timeouts() -> None:
    table = FailureTable()
    counts = table.counts
    counts[PAIRS], counts[BOTH_TIMED_OUT] = 5_000, 400
    counts[CANDIDATE_ONLY_TIMEOUT], counts[CANDIDATE_ONLY_TIMEOUT_HOST] = 150, 100
    f = paired_failures(table, z=Z95, min_count=500)
    assert f.candidate_excess_timeout_rate.status == "insufficient_data"
    assert f.candidate_excess_timeout_rate.reason == "host_stall"
    counts[BOTH_TIMED_OUT] = 200  # fewer than the candidate's own: judged
    f = paired_failures(table, z=Z95, min_count=500)
    assert f.candidate_excess_timeout_rate.value == pytest.approx(150 / 5_000)
    assert paired_failures(table, z=Z95, min_count=10_000).candidate_excess_error_rate.value is None


def test_records_of_one_batch_are_one_latency_sample() -> None:
    sample = BatchLatencies()
    sample.add(np.full(500, 1.5), np.full(500, 6.0))  # one batch of 500 records
    sample.add(np.array([1.5, 1.6, 1.6]), np.array([6.0, 2.0, 2.0]))  # again, and a new one
    assert len(sample) == 2
    assert sorted(sample.candidate.tolist()) == [2.0, 6.0]


def test_the_batch_sample_is_the_same_however_records_are_split_or_ordered() -> None:
    rng = np.random.default_rng(3)
    champ = np.round(rng.lognormal(0.5, 0.3, 5_000), 3)
    cand = np.round(rng.lognormal(0.6, 0.3, 5_000), 3)
    whole = BatchLatencies(capacity=256)
    whole.add(champ, cand)
    parts = [BatchLatencies(capacity=256) for _ in range(3)]
    order = rng.permutation(champ.size)
    for i, chunk in enumerate(np.array_split(order, 7)):
        parts[i % 3].add(champ[chunk], cand[chunk])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert len(whole) == len(merged) == 256  # bounded
    assert merged.keys.tolist() == whole.keys.tolist()
    assert merged.champion.tolist() == whole.champion.tolist()
    assert merged.candidate.tolist() == whole.candidate.tolist()
    back = BatchLatencies(capacity=256)
    back.load(merged.champion.tolist(), merged.candidate.tolist())  # a partial off the wire
    assert back.keys.tolist() == whole.keys.tolist()


def test_a_slower_median_is_a_significant_sign_test_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    champ = rng.lognormal(math.log(1.6), 0.25, 50)
    slow = BatchLatencies()
    slow.add(champ, champ * 3.75)
    lat = paired_latency(slow, z=Z95)
    assert lat.batches == 50 and lat.slower_share.value == 1.0
    assert lat.slower_share.lo is not None and lat.slower_share.lo > 0.9
    assert lat.slower_share.p_value == pytest.approx(0.5**50)
    assert lat.p50_ratio.value == pytest.approx(3.75, rel=1e-9)
    # The same batches, each arm with its own noise and host stalls that hit both.
    stall = np.where(rng.random(50) < 0.1, rng.pareto(1.3, 50) * 20, 0.0)
    noisy = BatchLatencies()
    noisy.add(champ * rng.lognormal(0, 0.2, 50) + stall, champ * rng.lognormal(0, 0.2, 50) + stall)
    lat = paired_latency(noisy, z=Z95)
    assert lat.slower_share.value is not None and lat.slower_share.value < 0.2
    assert lat.tail_excess.lo is not None and lat.tail_excess.lo < 0.05
    # Too few batches: no figure, not a zero.
    few = BatchLatencies()
    few.add(champ[:10], champ[:10] * 3)
    assert paired_latency(few, z=Z95, min_batches=20).slower_share.status == "insufficient_data"


def test_a_slower_tail_is_a_surplus_of_candidate_excursions() -> None:
    rng = np.random.default_rng(1)
    champ = rng.lognormal(math.log(1.6), 0.25, 200)
    cand = champ * rng.lognormal(0, 0.1, 200)
    cand[:60] += 25.0  # 30% of batches: a GC pause
    sample = BatchLatencies()
    sample.add(champ, cand)
    lat = paired_latency(sample, z=Z95)
    assert lat.tail_excess.value == pytest.approx(0.3)
    assert lat.tail_excess.lo is not None and lat.tail_excess.lo > 0.2
    assert lat.slower_share.value == pytest.approx(0.3)  # the median did not move
    swapped = BatchLatencies()
    swapped.add(cand, champ)  # the champion's tail: a negative excess
    assert (paired_latency(swapped, z=Z95).tail_excess.value or 0) < -0.2


def test_sign_test_matches_the_exact_binomial_tail() -> None:
    for n, k in [(10, 8), (50, 30), (400, 230), (1_024, 560), (20, 20), (5, 0)]:
        exact = sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
        assert sign_test_greater(k, n) == pytest.approx(exact, rel=1e-9)
