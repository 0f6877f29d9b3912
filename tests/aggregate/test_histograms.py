from __future__ import annotations

import numpy as np
import pytest

from sidecar.aggregate import LatencySketch, ScoreHistogram, quantile_edges, uniform_edges


def test_score_histogram_counts_like_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(10_000)
    h = ScoreHistogram(uniform_edges(20))
    h.add(x)
    expected = np.histogram(x, uniform_edges(20))[0]
    assert np.array_equal(h.counts, expected)


def test_nan_and_missing_counted_separately_and_never_crash() -> None:
    h = ScoreHistogram()
    scores = np.array([0.01, np.nan, np.nan, np.nan, 0.99, np.inf, -np.inf, 5.0, -3.0])
    missing = np.array([False, True, True, False, False, False, False, False, False])
    h.add(scores, missing)
    assert (h.missing, h.nan, h.total) == (2, 1, 6)
    assert h.counts[0] == 3 and h.counts[-1] == 3  # out-of-range clamped, not dropped
    h.add(np.array([], dtype=np.float64))
    h.add(np.array([np.nan]))
    assert h.nan == 2


def test_merge_is_exact_and_requires_same_edges() -> None:
    rng = np.random.default_rng(1)
    x = rng.random(1000)
    whole, a, b = ScoreHistogram(), ScoreHistogram(), ScoreHistogram()
    whole.add(x)
    a.add(x[:300])
    b.add(x[300:])
    a.merge(b)
    assert np.array_equal(a.counts, whole.counts)
    with pytest.raises(ValueError):
        a.merge(ScoreHistogram(uniform_edges(10)))


def test_quantile_edges_give_equal_mass_bins() -> None:
    rng = np.random.default_rng(2)
    ref = rng.beta(2, 8, 50_000)
    edges = quantile_edges(np.append(ref, [np.nan, np.inf]), bins=10)
    assert edges.size == 11
    h = ScoreHistogram(edges)
    h.add(ref)
    assert np.all(np.abs(h.counts - 5000) <= 2)


def test_quantile_edges_collapse_ties_and_reject_constant() -> None:
    assert quantile_edges([0.0] * 95 + [1.0] * 5, bins=10).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        quantile_edges([0.5, 0.5, 0.5])


@pytest.mark.parametrize("seed", range(3))
def test_latency_quantiles_within_relative_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(2.0, 1.0, 20_000)
    s = LatencySketch()
    s.add(x)
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(x, q, method="inverted_cdf"))
        approx = s.quantile(q)
        assert approx is not None
        assert abs(approx - exact) / exact <= 0.0205


def test_latency_sketch_merge_and_edges() -> None:
    rng = np.random.default_rng(4)
    x = rng.lognormal(0, 2, 5000)
    whole, a, b = LatencySketch(), LatencySketch(), LatencySketch()
    whole.add(x)
    a.add(x[:1234])
    b.add(x[1234:])
    a.merge(b)
    assert np.array_equal(a.counts, whole.counts)
    assert a.quantile(0.99) == whole.quantile(0.99)
    s = LatencySketch()
    assert s.quantile(0.5) is None
    s.add(np.array([0.0, -1.0, np.nan, 1e9, 0.001]))
    assert s.missing == 1 and s.total == 4
    assert s.quantile(0.25) == s.min_ms
    assert s.quantile(1.0) == s.max_ms
