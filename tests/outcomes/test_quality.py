"""The quality figures against scikit-learn and scipy, on the same requests.

ROC AUC and average precision are exact on binned scores, so they are compared with
scikit-learn on the binned scores (and with the raw-score values within the binning's
tolerance); DeLong's test with a textbook implementation (Sun & Xu's midrank form) on the
joint bins; everything computed from raw scores exactly.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn import metrics
from sklearn.calibration import calibration_curve

from sidecar.examples import fraud
from sidecar.outcomes.quality import (
    Costs,
    Layout,
    bin_edges,
    binned_auc,
    binned_average_precision,
    contribution,
    delong,
    figures,
    normal_quantile,
    score_bins,
)

LAYOUT = Layout(bins=64, reliability_bins=10, score_bins=1024)


def sample(n: int, seed: int, rate: float = 0.1) -> dict[str, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.int8)
    z = rng.normal(size=n) + 1.3 * y
    p1 = 1 / (1 + np.exp(-(z - 2)))
    p2 = 1 / (1 + np.exp(-(1.4 * z + 0.6 * rng.normal(size=n) - 2.6)))
    value = np.where(rng.random(n) < 0.6, np.round(rng.random(n) * 200, 2), np.nan)
    return {
        "y": y,
        "p1": p1,
        "p2": p2,
        "d1": (p1 >= 0.3).astype(np.int8),
        "d2": (p2 >= 0.25).astype(np.int8),
        "value": value,
    }


def accumulate(d: dict[str, npt.NDArray[np.float64]], costs: Costs | None = None) -> npt.NDArray:
    costs = costs or Costs()
    return contribution(LAYOUT, d["p1"], d["p2"], d["d1"], d["d2"], d["y"], d["value"], costs)


@pytest.fixture(scope="module")
def data() -> dict[str, npt.NDArray[np.float64]]:
    return sample(6000, seed=1)


def test_auc_and_average_precision_are_scikit_learns_on_the_binned_scores(data: dict) -> None:
    figs = figures(LAYOUT, accumulate(data))
    y = data["y"]
    for arm, p in ((figs.champion, data["p1"]), (figs.candidate, data["p2"])):
        binned = score_bins(p, LAYOUT.score_bins)
        assert arm.auc.value == pytest.approx(metrics.roc_auc_score(y, binned), abs=1e-12)
        assert arm.average_precision.value == pytest.approx(
            metrics.average_precision_score(y, binned), abs=1e-12
        )
    assert figs.diff.auc.value == pytest.approx(
        figs.candidate.auc.value - figs.champion.auc.value, abs=1e-12
    )


def test_binning_costs_little_against_the_raw_scores_of_the_example_models() -> None:
    """1024 log-odds bins on the demo's fraud models: AUC within 1e-4, AP within 2e-3."""
    d = fraud.generate(40_000, seed=5, fraud_rate=0.02)
    y = d.is_fraud.astype(np.int8)
    p1 = fraud.champion().predict(d.features[:, : len(fraud.CHAMPION_FEATURES)])
    p2 = fraud.candidate().predict(d.features)
    acc = contribution(
        LAYOUT,
        p1,
        p2,
        (p1 >= 0.3).astype(np.int8),
        (p2 >= 0.3).astype(np.int8),
        y,
        np.full(y.size, np.nan),
        Costs(),
    )
    figs = figures(LAYOUT, acc)
    assert figs.champion.auc.value == pytest.approx(metrics.roc_auc_score(y, p1), abs=1e-4)
    assert figs.candidate.auc.value == pytest.approx(metrics.roc_auc_score(y, p2), abs=1e-4)
    assert figs.champion.average_precision.value == pytest.approx(
        metrics.average_precision_score(y, p1), abs=2e-3
    )
    assert figs.candidate.average_precision.value == pytest.approx(
        metrics.average_precision_score(y, p2), abs=2e-3
    )


def delong_reference(y: npt.NDArray, s1: npt.NDArray, s2: npt.NDArray) -> npt.NDArray:
    """DeLong's covariance of two AUCs, Sun & Xu (2014) midrank form, from the definition."""
    scores = np.vstack([s1, s2]).astype(np.float64)
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    v10 = np.empty((2, m))
    v01 = np.empty((2, n))
    for k in range(2):
        tx = stats.rankdata(pos[k])
        ty = stats.rankdata(neg[k])
        tz = stats.rankdata(np.concatenate([pos[k], neg[k]]))
        v10[k] = (tz[:m] - tx) / n
        v01[k] = 1.0 - (tz[m:] - ty) / m
    return np.cov(v10) / m + np.cov(v01) / n


def test_delong_matches_the_textbook_on_the_joint_bins(data: dict) -> None:
    acc = accumulate(data)
    got = delong(LAYOUT.joint(acc))
    assert got is not None
    b1, b2 = score_bins(data["p1"], LAYOUT.bins), score_bins(data["p2"], LAYOUT.bins)
    y = data["y"]
    cov = delong_reference(y, b1, b2)
    assert got.champion_auc == pytest.approx(metrics.roc_auc_score(y, b1), abs=1e-12)
    assert got.candidate_auc == pytest.approx(metrics.roc_auc_score(y, b2), abs=1e-12)
    assert got.champion_var == pytest.approx(cov[0, 0], rel=1e-9)
    assert got.candidate_var == pytest.approx(cov[1, 1], rel=1e-9)
    assert got.diff_var == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], rel=1e-9)


def test_delong_test_detects_a_better_model_and_not_an_equal_one() -> None:
    d = sample(20_000, seed=3)
    figs = figures(LAYOUT, accumulate(d))
    # The candidate ranks with extra noise: significantly worse.
    assert figs.diff.auc.hi is not None and figs.diff.auc.hi < 0
    assert figs.diff.auc.p_value is not None and figs.diff.auc.p_value < 1e-3
    same = dict(d, p2=d["p1"], d2=d["d1"])
    figs = figures(LAYOUT, accumulate(same))
    assert figs.diff.auc.value == 0 and figs.diff.auc.p_value == 1.0


def test_probability_and_decision_figures_are_scikit_learns(data: dict) -> None:
    figs = figures(LAYOUT, accumulate(data))
    y = data["y"]
    for arm, p, d in (
        (figs.champion, data["p1"], data["d1"]),
        (figs.candidate, data["p2"], data["d2"]),
    ):
        assert arm.log_loss.value == pytest.approx(metrics.log_loss(y, p), rel=1e-12)
        assert arm.brier.value == pytest.approx(metrics.brier_score_loss(y, p), rel=1e-12)
        assert arm.precision.value == pytest.approx(metrics.precision_score(y, d))
        assert arm.recall.value == pytest.approx(metrics.recall_score(y, d))
        assert arm.f1.value == pytest.approx(metrics.f1_score(y, d))
        assert arm.accuracy.value == pytest.approx(metrics.accuracy_score(y, d))
        observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
        bins = [b for b in arm.reliability if b[2]]
        assert [b[4] for b in bins] == pytest.approx(list(observed), rel=1e-12)
        assert [b[3] for b in bins] == pytest.approx(list(predicted), rel=1e-12)
        counts = np.array([b[2] for b in bins])
        ece = np.sum(counts / y.size * np.abs(observed - predicted))
        assert arm.calibration_error.value == pytest.approx(ece, rel=1e-12)


def test_paired_differences_are_paired_t_statistics(data: dict) -> None:
    figs = figures(LAYOUT, accumulate(data))
    y = data["y"].astype(float)

    def log_loss(p: npt.NDArray) -> npt.NDArray:
        q = np.clip(p, np.finfo(float).eps, 1 - np.finfo(float).eps)
        return -(y * np.log(q) + (1 - y) * np.log1p(-q))

    for fig, a, b in (
        (figs.diff.log_loss, log_loss(data["p2"]), log_loss(data["p1"])),
        (figs.diff.brier, (data["p2"] - y) ** 2, (data["p1"] - y) ** 2),
    ):
        t = stats.ttest_rel(a, b)
        se = (fig.hi - fig.lo) / (2 * 1.959963984540054)
        assert fig.value == pytest.approx(np.mean(a - b), rel=1e-9)
        assert fig.value / se == pytest.approx(t.statistic, rel=1e-9)
        # p-values use the normal tails (no scipy at run time): close to the t test's here
        assert fig.p_value == pytest.approx(2 * stats.norm.sf(abs(t.statistic)), rel=1e-6)
        assert fig.p_value == pytest.approx(t.pvalue, rel=0.05)


def test_cost_weighs_errors_by_value_as_configured(data: dict) -> None:
    y, d1, d2, v = data["y"], data["d1"], data["d2"], data["value"]
    w = np.where(np.isnan(v), 1.0, v)

    def cost(d: npt.NDArray, fp_w: npt.NDArray | float, fn_w: npt.NDArray | float) -> npt.NDArray:
        return np.where((d == 1) & (y == 0), 2.0 * fp_w, 0.0) + np.where(
            (d == 0) & (y == 1), 7.0 * fn_w, 0.0
        )

    for rule, fp_w, fn_w in (
        ("both", w, w),
        ("false_negatives", 1.0, w),
        ("false_positives", w, 1.0),
        ("none", 1.0, 1.0),
    ):
        figs = figures(LAYOUT, accumulate(data, Costs(2.0, 7.0, rule)))  # type: ignore[arg-type]
        c1, c2 = cost(d1, fp_w, fn_w), cost(d2, fp_w, fn_w)
        assert figs.champion.mean_cost.value == pytest.approx(c1.mean(), rel=1e-12)
        assert figs.candidate.mean_cost.value == pytest.approx(c2.mean(), rel=1e-12)
        assert figs.champion.total_cost == pytest.approx(c1.sum(), rel=1e-12)
        t = stats.ttest_rel(c2, c1)
        fig = figs.diff.cost
        assert fig.value == pytest.approx((c2 - c1).mean(), rel=1e-9)
        assert fig.value / ((fig.hi - fig.lo) / (2 * 1.959963984540054)) == pytest.approx(
            t.statistic, rel=1e-9
        )


def test_mcnemar_on_correctness_is_scipys(data: dict) -> None:
    y, d1, d2 = data["y"], data["d1"], data["d2"]
    figs = figures(LAYOUT, accumulate(data))
    right1, right2 = d1 == y, d2 == y
    b = int(np.sum(right1 & ~right2))
    c = int(np.sum(~right1 & right2))
    chi2 = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    assert figs.diff.correctness_mcnemar.value == pytest.approx(chi2)
    assert figs.diff.correctness_mcnemar.p_value == pytest.approx(stats.chi2.sf(chi2, 1))
    assert figs.diff.accuracy.value == pytest.approx((c - b) / y.size)
    small = {k: v[:60] for k, v in data.items()}  # few discordant pairs: exact binomial
    figs = figures(Layout(), accumulate(small), min_pairs=10, min_positives=1)
    r1, r2 = small["d1"] == small["y"], small["d2"] == small["y"]
    b, c = int(np.sum(r1 & ~r2)), int(np.sum(~r1 & r2))
    assert b + c < 25
    assert figs.diff.correctness_mcnemar.p_value == pytest.approx(
        stats.binomtest(b, b + c, 0.5).pvalue
    )


def test_recall_difference_is_on_the_same_positives(data: dict) -> None:
    figs = figures(LAYOUT, accumulate(data))
    y = data["y"] == 1
    expected = data["d2"][y].mean() - data["d1"][y].mean()
    assert figs.diff.recall.value == pytest.approx(expected)
    assert figs.diff.recall.lo < expected < figs.diff.recall.hi
    assert figs.diff.recall.n == int(y.sum())


def test_bootstrap_intervals_are_reproducible_and_cover_the_point(data: dict) -> None:
    acc = accumulate(data)
    a, b = figures(LAYOUT, acc, seed=7), figures(LAYOUT, acc, seed=7)
    assert a.diff.average_precision == b.diff.average_precision
    for fig in (a.diff.average_precision, a.diff.f1):
        assert fig.lo < fig.value < fig.hi
    assert a.diff.se["f1"] and a.diff.se["average_precision"]
    y, p1, p2 = data["y"], data["p1"], data["p2"]
    point = metrics.average_precision_score(
        y, score_bins(p2, LAYOUT.score_bins)
    ) - metrics.average_precision_score(y, score_bins(p1, LAYOUT.score_bins))
    assert a.diff.average_precision.value == pytest.approx(point, abs=1e-12)


def test_too_little_data_is_said_not_zeroed() -> None:
    d = sample(50, seed=2)
    figs = figures(LAYOUT, accumulate(d))
    for fig in (figs.champion.auc, figs.diff.auc, figs.diff.cost, figs.champion.precision):
        assert fig.status == "insufficient_data" and fig.value is None
    one_class = dict(sample(3000, seed=2), y=np.zeros(3000, dtype=np.int8))
    figs = figures(LAYOUT, accumulate(one_class))
    assert figs.diff.auc.reason == "min_positives" and figs.champion.log_loss.ok


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(0, 400), st.integers(0, 10_000))
def test_accumulators_add_and_subtract_exactly(n: int, cut: int, seed: int) -> None:
    """A window of A and B is A plus B; taking B's contribution back leaves A (what an
    outcome that changes a request's label does)."""
    d = sample(n, seed)
    cut = min(cut, n)
    head = {k: v[:cut] for k, v in d.items()}
    tail = {k: v[cut:] for k, v in d.items()}
    whole = accumulate(d)
    parts = accumulate(head) + accumulate(tail)
    np.testing.assert_allclose(whole, parts, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(whole - accumulate(tail), accumulate(head), rtol=1e-9, atol=1e-8)
    assert LAYOUT.judged(whole) == n


def test_bins_are_monotone_and_match_their_edges() -> None:
    p = np.sort(np.random.default_rng(0).random(10_000))
    b = score_bins(p, 64)
    assert (np.diff(b) >= 0).all() and b.min() >= 0 and b.max() <= 63
    edges = bin_edges(64)
    assert (score_bins(edges[10:11] * 0.999999, 64) == 10).all()
    assert (score_bins(edges[10:11] * 1.000001, 64) == 11).all()
    assert score_bins(np.array([0.0, 1.0]), 64).tolist() == [0, 63]


def test_binned_curves_on_tiny_hand_computed_cases() -> None:
    pos = np.array([0.0, 1.0, 1.0])
    neg = np.array([1.0, 1.0, 0.0])
    # positives at bins 1, 2; negatives at 0, 1: pairs (1>0)=1, (1=1)=.5, (2>0)=1, (2>1)=1
    assert binned_auc(pos, neg) == pytest.approx(3.5 / 4)
    # thresholds: bin 2 -> P=1/1, R=1/2; bin 1 -> P=2/3, R=1; AP = .5*1 + .5*2/3
    assert binned_average_precision(pos, neg) == pytest.approx(0.5 + 1 / 3)


def test_normal_quantile_is_scipys() -> None:
    for p in (1e-12, 1e-6, 0.01, 0.025, 0.3, 0.5, 0.9, 0.95, 0.975, 0.999999):
        assert normal_quantile(p) == pytest.approx(stats.norm.ppf(p), abs=1e-9)
    assert math.isclose(normal_quantile(0.95), 1.6448536269514722, rel_tol=1e-12)
