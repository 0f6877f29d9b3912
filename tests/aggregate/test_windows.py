from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.aggregate import RequestDeduper, Watermark, WindowSpec
from sidecar.aggregate.batch import hash_strings


def test_tumbling_windows_align_to_origin() -> None:
    spec = WindowSpec(60_000)
    assert spec.windows_for(0) == [0]
    assert spec.windows_for(59_999) == [0]
    assert spec.windows_for(60_000) == [60_000]
    shifted = WindowSpec(60_000, origin_ms=15_000)
    assert shifted.windows_for(10_000) == [-45_000]
    assert shifted.windows_for(75_000) == [75_000]


def test_hopping_windows() -> None:
    spec = WindowSpec(60_000, 20_000)
    assert spec.windows_for(65_000) == [20_000, 40_000, 60_000]
    assert spec.windows_for(60_000) == [20_000, 40_000, 60_000]
    assert spec.windows_for(59_999) == [0, 20_000, 40_000]
    uneven = WindowSpec(50, 20)
    assert uneven.windows_for(45) == [0, 20, 40]
    assert uneven.windows_for(55) == [20, 40]


@given(
    ts=st.lists(st.integers(0, 10**13), min_size=1, max_size=50),
    size=st.integers(1, 10**6),
    div=st.integers(1, 7),
)
@settings(max_examples=200, deadline=None)
def test_assign_matches_definition(ts: list[int], size: int, div: int) -> None:
    step = max(1, size // div)
    spec = WindowSpec(size, step)
    rec, starts = spec.assign(np.array(ts, dtype=np.int64))
    for i, t in enumerate(ts):
        got = sorted(starts[rec == i].tolist())
        aligned = [t - t % step - j * step for j in range(size // step + 2)]
        expected = sorted(s for s in aligned if s <= t < s + size)
        assert got == expected


def test_window_spec_validation() -> None:
    with pytest.raises(ValueError):
        WindowSpec(10, 20)
    with pytest.raises(ValueError):
        WindowSpec(0)


def test_watermark_is_min_over_partitions_minus_lateness() -> None:
    wm = Watermark(allowed_lateness_ms=100, idle_timeout_ms=10_000)
    assert wm.observe([0, 0, 1], [1_000, 5_000, 2_000], now_ms=0) == 1_900
    assert wm.observe([1], [9_000], now_ms=1) == 4_900
    assert wm.partition_watermark(1) == 8_900


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 50_000))))
@settings(max_examples=200, deadline=None)
def test_watermark_never_moves_backwards(events: list[tuple[int, int, int]]) -> None:
    wm = Watermark(allowed_lateness_ms=10, idle_timeout_ms=5_000)
    now = 0
    last: int | None = None
    for part, ts, dt in events:
        now += dt
        current = wm.observe([part], [ts], now_ms=now)
        if last is not None:
            assert current is not None and current >= last
        last = current
        after = wm.advance(now + 100_000)
        if last is not None:
            assert after is not None and after >= last
        last = after


def test_idle_partition_stops_holding_the_watermark() -> None:
    wm = Watermark(idle_timeout_ms=1_000)
    wm.observe([0, 1], [100, 100], now_ms=0)
    wm.observe([0], [5_000], now_ms=500)
    assert wm.current == 100  # partition 1 still active, holds it
    assert wm.advance(now_ms=999) == 100
    assert wm.advance(now_ms=1_000) == 5_000  # partition 1 idle since t=0
    # When it resumes it holds again, but the watermark does not go back.
    assert wm.observe([1], [200], now_ms=1_100) == 5_000
    wm.observe([0, 1], [6_000, 7_000], now_ms=1_200)
    assert wm.current == 6_000


def test_all_partitions_idle_release_to_max() -> None:
    wm = Watermark(idle_timeout_ms=1_000)
    wm.observe([0, 1], [100, 900], now_ms=0)
    assert wm.current == 100
    assert wm.advance(now_ms=5_000) == 900


def test_assigned_partition_without_data_holds_until_idle() -> None:
    wm = Watermark(idle_timeout_ms=1_000)
    wm.assign([0, 1], now_ms=0)
    assert wm.observe([0], [500], now_ms=10) is None
    assert wm.advance(now_ms=1_000) == 500
    wm.revoke([0, 1])
    assert wm.current == 500


def test_a_partition_caught_up_without_records_does_not_hold_the_watermark() -> None:
    wm = Watermark(idle_timeout_ms=30_000)
    wm.assign([0, 1, 2], now_ms=0)
    wm.observe([0], [5_000], now_ms=10)
    assert wm.current is None  # partitions 1 and 2 hold it (they might have data)
    wm.caught_up([1, 2])  # the consumer found them at their end
    assert wm.advance(now_ms=20) == 5_000 and wm.empty_partitions == [1, 2]
    wm.observe([1], [6_000], now_ms=30)  # a record arrives there: it holds again
    wm.observe([0], [9_000], now_ms=40)
    assert wm.current == 6_000 and wm.empty_partitions == [2]
    wm.caught_up([0])  # ignored: partition 0 had records (it turns idle by time)
    assert wm.empty_partitions == [2]
    wm.revoke([2])
    assert wm.empty_partitions == []


def test_dedupe_exact_and_within_batch() -> None:
    d = RequestDeduper(exact_cap=100)
    h = hash_strings(["a", "b", "a", "c"])
    assert d.check_and_add(h).tolist() == [False, False, True, False]
    assert d.check_and_add(hash_strings(["c", "d"])).tolist() == [True, False]
    assert len(d) == 4


def test_dedupe_beyond_cap_uses_bloom_and_never_misses_duplicates() -> None:
    d = RequestDeduper(exact_cap=1_000, bloom_bits=1 << 20, bloom_hashes=5)
    ids = [f"id-{i}" for i in range(20_000)]
    h = hash_strings(ids)
    first = np.concatenate([d.check_and_add(h[i : i + 2_500]) for i in range(0, h.size, 2_500)])
    assert len(d) == 20_000 and d.in_bloom == 19_000
    false_pos = int(first.sum())
    assert false_pos <= 5  # expected ~ 19k * (1 - exp(-5 * 19k / 1M))**5 ~ 0.1
    again = d.check_and_add(h)
    assert again.all()  # every real duplicate is caught
    assert 0 < d.false_positive_rate < 1e-3


def test_dedupe_merge_is_union() -> None:
    a, b = RequestDeduper(exact_cap=3), RequestDeduper(exact_cap=3)
    a.check_and_add(hash_strings(["x1", "x2", "x3", "x4"]))
    b.check_and_add(hash_strings(["y1", "y2", "x1"]))
    a.merge(b)
    assert a.check_and_add(hash_strings(["x1", "x4", "y1", "y2", "new"])).tolist() == [
        True,
        True,
        True,
        True,
        False,
    ]


def test_hash_strings_is_stable_and_independent_of_batch_width() -> None:
    one = hash_strings(["abc"])
    padded = hash_strings(["abc", "a-much-longer-request-id-0123456789"])
    assert one[0] == padded[0]
    assert hash_strings(["abc"])[0] == one[0]
    assert hash_strings(["abc", "acb", "bac", "ab", "abcd"]).size == 5
    assert np.unique(hash_strings([f"r{i}" for i in range(100_000)])).size == 100_000
    assert hash_strings([]).size == 0
    assert hash_strings([""]).size == 1


def test_a_clock_bound_watermark_never_passes_the_clock() -> None:
    """One comparison dated minutes ahead (within ``max_future_ms``; its ``ts`` comes from the
    request, which any producer of the requests topic writes) must not make the records of the
    next minutes late: event time that has not happened yet moves no watermark."""
    wm = Watermark(allowed_lateness_ms=5_000, idle_timeout_ms=30_000, clock_bound=True)
    now = 1_000_000
    assert wm.observe([0], [now - 1_000], now_ms=now) == now - 6_000
    assert wm.observe([0], [now + 280_000], now_ms=now) == now - 5_000
    assert wm.partition_watermark(0) == now - 5_000
    assert wm.advance(now + 10_000) == now + 5_000  # the clock moves it, as ever
    assert wm.advance(now + 60_000) == now + 55_000  # all idle: released to the clock only
    # Without the bound (replay, which has no clock) event time alone moves it.
    free = Watermark(allowed_lateness_ms=5_000, idle_timeout_ms=30_000)
    assert free.observe([0], [now + 280_000], now_ms=now) == now + 275_000
