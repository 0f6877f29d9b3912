from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from sidecar.aggregate.stats import (
    Z95,
    PairedTable,
    binom_cdf_half,
    chi2_sf_1dof,
    conditional_flip_rates,
    js_distance,
    ks_binned,
    mcnemar,
    paired_difference,
    paired_ratio,
    psi,
    psi_band,
    wilson,
)


def test_psi_matches_direct_formula() -> None:
    ref = np.array([100, 200, 300, 250, 150])
    cur = np.array([120, 180, 280, 270, 150])
    p, q = ref / ref.sum(), cur / cur.sum()
    expected = float(np.sum((q - p) * np.log(q / p)))
    fig = psi(ref, cur)
    assert fig.status == "ok" and fig.value == pytest.approx(expected, rel=1e-12)
    assert psi(ref, ref).value == pytest.approx(0.0, abs=1e-15)


def test_psi_empty_bins_use_epsilon_and_stay_finite() -> None:
    ref = np.array([50, 50, 0])
    cur = np.array([0, 50, 50])
    eps = 1e-4
    p = np.maximum(ref / 100, eps)
    q = np.maximum(cur / 100, eps)
    fig = psi(ref, cur, eps=eps)
    assert fig.value is not None and math.isfinite(fig.value)
    assert fig.value == pytest.approx(float(np.sum((q - p) * np.log(q / p))))


def test_psi_bands() -> None:
    assert psi_band(0.05) == "stable"
    assert psi_band(0.1) == "moderate"
    assert psi_band(0.25) == "moderate"
    assert psi_band(0.2501) == "significant"
    assert psi_band(None) is None


@pytest.mark.parametrize("seed", range(5))
def test_js_distance_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 50, 20)
    q = rng.integers(0, 50, 20)
    p[3] = 0  # zero bins on one side only
    fig = js_distance(p, q)
    assert fig.value == pytest.approx(float(jensenshannon(p, q, base=2)), abs=1e-12)
    assert js_distance(p, p).value == pytest.approx(0.0, abs=1e-7)


def test_js_distance_disjoint_is_one() -> None:
    assert js_distance([1, 0], [0, 1]).value == pytest.approx(1.0)


def test_ks_binned_equals_exact_ks_when_scores_sit_inside_bins() -> None:
    rng = np.random.default_rng(1)
    edges = np.linspace(0, 1, 51)
    mids = (edges[:-1] + edges[1:]) / 2
    a = rng.choice(mids, 3000, p=np.full(50, 1 / 50))
    b = rng.choice(mids, 2000, p=np.linspace(1, 2, 50) / np.linspace(1, 2, 50).sum())
    ha = np.histogram(a, edges)[0]
    hb = np.histogram(b, edges)[0]
    assert ks_binned(ha, hb).value == pytest.approx(sps.ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ks_binned_is_a_close_lower_bound_of_exact_ks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.beta(2, 5, 4000)
    b = rng.beta(2.3, 5, 3000)
    edges = np.linspace(0, 1, 1001)
    fig = ks_binned(np.histogram(a, edges)[0], np.histogram(b, edges)[0])
    exact = sps.ks_2samp(a, b).statistic
    assert fig.value is not None
    assert fig.value <= exact + 1e-12
    assert exact - fig.value < 0.01


def test_wilson_matches_scipy() -> None:
    for k, n in [(0, 10), (3, 10), (10, 10), (37, 1000), (500, 1000)]:
        fig = wilson(k, n)
        ci = sps.binomtest(k, n).proportion_ci(method="wilson")
        assert fig.value == pytest.approx(k / n)
        assert fig.lo == pytest.approx(ci.low, abs=1e-12)
        assert fig.hi == pytest.approx(ci.high, abs=1e-12)


def test_insufficient_data_is_explicit() -> None:
    for fig in (
        wilson(0, 0),
        wilson(3, 50, min_count=100),
        psi([0, 0], [1, 2]),
        js_distance([1, 2], [3, 4], min_count=100),
        ks_binned([], []),
        paired_difference(PairedTable(1, 2, 3, 4), min_count=100),
        paired_ratio(PairedTable(0, 0, 0, 0)),
        mcnemar(3, 4, n=10, min_count=100),
    ):
        assert fig.status == "insufficient_data"
        assert fig.value is None and not fig.ok


def test_chi2_sf_matches_scipy() -> None:
    for x in [0.0, 0.1, 1.0, 3.84, 10.0, 50.0]:
        assert chi2_sf_1dof(x) == pytest.approx(float(sps.chi2.sf(x, 1)), rel=1e-12)


def test_binom_cdf_matches_scipy() -> None:
    for n in [1, 5, 24, 100]:
        for k in range(0, n + 1, max(1, n // 7)):
            assert binom_cdf_half(k, n) == pytest.approx(float(sps.binom.cdf(k, n, 0.5)))


@pytest.mark.parametrize(("b", "c"), [(0, 5), (3, 9), (10, 2), (7, 7), (1, 0), (12, 12)])
def test_mcnemar_exact_matches_binomtest(b: int, c: int) -> None:
    fig = mcnemar(b, c)
    assert fig.reason == "exact_binomial"
    assert fig.p_value == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


@pytest.mark.parametrize(("b", "c"), [(20, 40), (100, 80), (15, 10), (300, 330)])
def test_mcnemar_chi2_continuity_corrected(b: int, c: int) -> None:
    fig = mcnemar(b, c)
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    assert fig.reason == "chi2_cc"
    assert fig.value == pytest.approx(stat)
    assert fig.p_value == pytest.approx(float(sps.chi2.sf(stat, 1)), rel=1e-10)


def test_mcnemar_no_discordant_pairs() -> None:
    fig = mcnemar(0, 0, n=500)
    assert fig.ok and fig.p_value == 1.0


def _newcombe_reference(a: int, b: int, c: int, d: int) -> tuple[float, float]:
    """Newcombe (1998) method 10 written the textbook way (rows: candidate, cols: champion)."""
    n = a + b + c + d
    # Table with candidate as "test 1": r = both yes, s = cand yes/champ no, t = champ only.
    r, s, t, u = a, c, b, d
    p1, p2 = (r + s) / n, (r + t) / n
    ci1 = sps.binomtest(r + s, n).proportion_ci(method="wilson")
    ci2 = sps.binomtest(r + t, n).proportion_ci(method="wilson")
    l1, u1, l2, u2 = ci1.low, ci1.high, ci2.low, ci2.high
    big_a = (r + s) * (t + u) * (r + t) * (s + u)
    cross = r * u - s * t
    corr = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0)
    phi = corr / math.sqrt(big_a) if big_a else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    hi = diff + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    return lo, hi


@pytest.mark.parametrize(
    "cells", [(8, 5, 4, 9), (36, 12, 2, 0), (100, 20, 40, 840), (0, 0, 5, 95), (5, 3, 3, 989)]
)
def test_paired_difference_newcombe(cells: tuple[int, int, int, int]) -> None:
    a, b, c, d = cells
    fig = paired_difference(PairedTable(a, b, c, d))
    lo, hi = _newcombe_reference(a, b, c, d)
    n = a + b + c + d
    assert fig.value == pytest.approx((c - b) / n)
    assert fig.lo == pytest.approx(lo) and fig.hi == pytest.approx(hi)
    assert fig.lo is not None and fig.hi is not None and fig.value is not None
    assert -1 <= fig.lo <= fig.value <= fig.hi <= 1


def test_paired_difference_close_to_wald_for_large_n() -> None:
    a, b, c, d = 5_000, 1_000, 1_400, 92_600
    n = a + b + c + d
    diff = (c - b) / n
    se = math.sqrt((b + c) - (c - b) ** 2 / n) / n
    fig = paired_difference(PairedTable(a, b, c, d))
    assert fig.lo == pytest.approx(diff - Z95 * se, abs=2e-4)
    assert fig.hi == pytest.approx(diff + Z95 * se, abs=2e-4)


def _coverage(fn: str, true_cells: np.ndarray, n: int, sims: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    p11, p10, p01, _ = true_cells
    p_champ, p_cand = p11 + p10, p11 + p01
    target = p_cand - p_champ if fn == "diff" else p_cand / p_champ
    hits = 0
    for cells in rng.multinomial(n, true_cells, size=sims):
        t = PairedTable(*(int(x) for x in cells))
        fig = paired_difference(t) if fn == "diff" else paired_ratio(t)
        assert fig.lo is not None and fig.hi is not None
        hits += fig.lo <= target <= fig.hi
    return hits / sims


@pytest.mark.parametrize("fn", ["diff", "ratio"])
def test_paired_intervals_have_nominal_coverage(fn: str) -> None:
    cells = np.array([0.04, 0.02, 0.05, 0.89])  # rates 6% vs 9%, correlated
    cov = _coverage(fn, cells, n=2000, sims=1500, seed=3)
    assert 0.93 <= cov <= 0.97


def test_paired_ratio_log_method() -> None:
    a, b, c, d = 40, 10, 50, 900
    fig = paired_ratio(PairedTable(a, b, c, d))
    ratio = (a + c) / (a + b)
    se = math.sqrt((b + c) / ((a + b) * (a + c)))
    assert fig.value == pytest.approx(ratio)
    assert fig.lo == pytest.approx(ratio * math.exp(-Z95 * se))
    assert fig.hi == pytest.approx(ratio * math.exp(Z95 * se))


def test_paired_ratio_champion_never_flags_stays_finite() -> None:
    fig = paired_ratio(PairedTable(0, 0, 30, 970))
    assert fig.ok and fig.value is not None and fig.value > 10 and math.isfinite(fig.value)


def test_identical_decisions_ratio_is_one_with_degenerate_interval() -> None:
    fig = paired_ratio(PairedTable(50, 0, 0, 950))
    assert (fig.value, fig.lo, fig.hi) == (1.0, 1.0, 1.0)


def test_conditional_flip_rates() -> None:
    yes_to_no, no_to_yes = conditional_flip_rates(PairedTable(30, 10, 20, 940))
    assert yes_to_no.value == pytest.approx(10 / 40)
    assert no_to_yes.value == pytest.approx(20 / 960)
