"""Paired quality of two models on the same labelled requests, from mergeable accumulators.

A window's quality state is one flat float64 vector (:class:`Layout` names its parts): counters,
each arm's fine score histogram per class, the joint histogram of both arms' coarsely binned
scores per class, the 2x2x2 table of (class, champion decision, candidate decision), sums for
log loss, Brier score and cost (with the sums of the paired differences and their squares),
and reliability bins. Every part is a sum over
requests, so a request's contribution can be added, and subtracted again when its label
changes; windows merge by addition; memory is fixed by the bin counts, whatever the number of
requests. Counts are exact in float64 up to 2**53.

What binning costs: ROC AUC and average precision are computed on the scores rounded to their
bin (``score_bins``, 1024 by default, uniform in log-odds), i.e. exactly what scikit-learn
computes on the binned scores (tests check it; ties inside a bin count half, as in any AUC);
at 1024 bins they differ from the raw-score values in the fourth decimal (tested). The paired
tests need both arms' bins at once: DeLong's test and the paired bootstrap use the joint
histogram at ``joint_bins`` (64 by default, 64 x 64 cells per class), which moves their
standard errors, not the values they are around. Log loss, Brier score, cost and the
decision-based figures use the raw scores and are exact.

numpy and the standard library only (no scipy at runtime); figures are
:class:`~sidecar.aggregate.stats.Figure` with an explicit status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..aggregate.stats import (
    Z95,
    Figure,
    PairedTable,
    insufficient,
    mcnemar,
    paired_difference,
    wilson,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Scores are binned uniformly in log-odds over [-LOGIT_RANGE, LOGIT_RANGE] (probabilities
#: 0.00034 .. 0.99966); scores beyond land in the end bins.
LOGIT_RANGE = 8.0
#: Probabilities are clipped to [EPS, 1 - EPS] in the log loss (scikit-learn's ``log_loss``
#: clips to the float64 machine epsilon).
EPS = float(np.finfo(np.float64).eps)

COUNTERS: tuple[str, ...] = (
    #: requests of the window with both scores and decisions (judgeable)
    "requests",
    #: requests where an arm had no score or decision (never judged)
    "unscored",
    #: judgeable requests with an outcome
    "labelled",
    #: judgeable requests without one, counted as negatives (``missing = "negative"``)
    "assumed_negative",
    #: judgeable requests without one, left out (``missing = "unlabelled"``)
    "unlabelled",
    #: requests whose outcome is a ranking label (not judged)
    "unsupported",
    #: outcomes that happened after their request's label window (ignored)
    "outside_window",
    #: scores outside [0, 1], clipped before they were judged
    "clipped",
)
SUMS: tuple[str, ...] = (
    "log_loss_champion",
    "log_loss_candidate",
    "brier_champion",
    "brier_candidate",
    "cost_champion",
    "cost_candidate",
    "cost_sq_champion",
    "cost_sq_candidate",
    "d_log_loss",
    "d_log_loss_sq",
    "d_brier",
    "d_brier_sq",
    "d_cost",
    "d_cost_sq",
    #: sum and count of the outcomes' ``value`` over judged requests that have one
    "value",
    "valued",
)
_C = {name: i for i, name in enumerate(COUNTERS)}
_S = {name: i for i, name in enumerate(SUMS)}
ARMS = ("champion", "candidate")
CostValue = Literal["both", "false_negatives", "false_positives", "none"]


@dataclass(frozen=True)
class Layout:
    """Where each part of an accumulator vector lives, for ``bins`` score bins and
    ``reliability_bins`` reliability bins."""

    bins: int = 64
    reliability_bins: int = 10
    #: Bins of each arm's own score histograms (the AUC and average precision values).
    score_bins: int = 1024

    @property
    def _ranks_at(self) -> int:
        return len(COUNTERS)

    @property
    def _joint_at(self) -> int:
        return self._ranks_at + 4 * self.score_bins

    @property
    def _decisions_at(self) -> int:
        return self._joint_at + 2 * self.bins * self.bins

    @property
    def _sums_at(self) -> int:
        return self._decisions_at + 8

    @property
    def _reliability_at(self) -> int:
        return self._sums_at + len(SUMS)

    @property
    def size(self) -> int:
        return self._reliability_at + 2 * self.reliability_bins * 3

    def zeros(self) -> FloatArray:
        return np.zeros(self.size, dtype=np.float64)

    def from_bytes(self, raw: bytes) -> FloatArray:
        v = np.frombuffer(raw, dtype=np.float64)
        if v.size != self.size:
            raise ValueError(f"accumulator of {v.size} values, expected {self.size}")
        return v.copy()

    def counters(self, v: FloatArray) -> FloatArray:
        return v[: len(COUNTERS)]

    def counter(self, v: FloatArray, name: str) -> int:
        return int(v[_C[name]])

    def ranks(self, v: FloatArray) -> FloatArray:
        """``[arm, class, score bin]`` counts of judged requests (fine bins)."""
        return v[self._ranks_at : self._joint_at].reshape(2, 2, self.score_bins)

    def joint(self, v: FloatArray) -> FloatArray:
        """``[class, champion bin, candidate bin]`` counts of judged requests (coarse)."""
        b = self.bins
        return v[self._joint_at : self._decisions_at].reshape(2, b, b)

    def decisions(self, v: FloatArray) -> FloatArray:
        """``[class, champion decision, candidate decision]`` counts of judged requests."""
        return v[self._decisions_at : self._sums_at].reshape(2, 2, 2)

    def sums(self, v: FloatArray) -> FloatArray:
        return v[self._sums_at : self._reliability_at]

    def sum(self, v: FloatArray, name: str) -> float:
        return float(v[self._sums_at + _S[name]])

    def reliability(self, v: FloatArray) -> FloatArray:
        """``[arm, bin, (count, sum of scores, sum of labels)]``."""
        return v[self._reliability_at :].reshape(2, self.reliability_bins, 3)

    def judged(self, v: FloatArray) -> int:
        """Requests behind the quality figures (labelled, or negative by rule)."""
        return round(float(self.decisions(v).sum()))


# --------------------------------------------------------------------------- contributions


def score_bins(p: FloatArray, bins: int) -> IntArray:
    """Bin index of each probability, uniform in log-odds (monotone in ``p``)."""
    q = np.clip(p, 1e-300, 1.0)
    with np.errstate(divide="ignore"):
        z = np.log(q) - np.log1p(-np.minimum(q, 1.0 - 1e-16))
    idx = np.floor((z + LOGIT_RANGE) * (bins / (2.0 * LOGIT_RANGE)))
    return np.clip(idx, 0, bins - 1).astype(np.int64)


def bin_edges(bins: int) -> FloatArray:
    """The probabilities at the bins' inner edges (for documentation and plots)."""
    z = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins + 1)[1:-1]
    return 1.0 / (1.0 + np.exp(-z))


def reliability_bin(p: FloatArray, bins: int) -> IntArray:
    """As ``sklearn.calibration.calibration_curve(strategy="uniform")`` bins scores."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], p).astype(np.int64)


@dataclass(frozen=True)
class Costs:
    """What an error costs (see ``RolloutQuality``)."""

    fp_cost: float = 1.0
    fn_cost: float = 1.0
    cost_value: CostValue = "both"


def contribution(
    layout: Layout,
    champion: FloatArray,
    candidate: FloatArray,
    champion_decision: npt.NDArray[np.int8],
    candidate_decision: npt.NDArray[np.int8],
    label: npt.NDArray[np.int8],
    value: FloatArray,
    costs: Costs,
) -> FloatArray:
    """The accumulator of judged requests (scores in [0, 1], decisions and labels 0/1,
    ``value`` NaN where the outcome has none). Counters are left at zero: the caller knows
    why each request is (or is not) judged."""
    acc = layout.zeros()
    n = label.size
    if not n:
        return acc
    y = label.astype(np.int64)
    fine = layout.score_bins
    for arm, p in enumerate((champion, candidate)):
        ranks = np.bincount(y * fine + score_bins(p, fine), minlength=2 * fine)
        start = layout._ranks_at + arm * 2 * fine
        acc[start : start + 2 * fine] = ranks
    b = layout.bins
    c1, c2 = score_bins(champion, b), score_bins(candidate, b)
    acc[layout._joint_at : layout._decisions_at] = np.bincount(
        (y * b + c1) * b + c2, minlength=2 * b * b
    )
    cell = y * 4 + champion_decision.astype(np.int64) * 2 + candidate_decision.astype(np.int64)
    acc[layout._decisions_at : layout._sums_at] = np.bincount(cell, minlength=8)
    yf = y.astype(np.float64)
    per_arm = []
    for p, d in ((champion, champion_decision), (candidate, candidate_decision)):
        q = np.clip(p, EPS, 1.0 - EPS)
        log_loss = -(yf * np.log(q) + (1.0 - yf) * np.log1p(-q))
        brier = (p - yf) ** 2
        cost = _cost(d, y, value, costs)
        per_arm.append((log_loss, brier, cost))
    (ll1, br1, co1), (ll2, br2, co2) = per_arm
    d_ll, d_br, d_co = ll2 - ll1, br2 - br1, co2 - co1
    valued = np.isfinite(value)
    sums = [
        ll1.sum(),
        ll2.sum(),
        br1.sum(),
        br2.sum(),
        co1.sum(),
        co2.sum(),
        (co1 * co1).sum(),
        (co2 * co2).sum(),
        d_ll.sum(),
        (d_ll * d_ll).sum(),
        d_br.sum(),
        (d_br * d_br).sum(),
        d_co.sum(),
        (d_co * d_co).sum(),
        value[valued].sum(),
        float(valued.sum()),
    ]
    acc[layout._sums_at : layout._reliability_at] = sums
    r = layout.reliability_bins
    rel = layout.reliability(acc)
    for arm, p in enumerate((champion, candidate)):
        idx = reliability_bin(p, r)
        rel[arm, :, 0] = np.bincount(idx, minlength=r)
        rel[arm, :, 1] = np.bincount(idx, weights=p, minlength=r)
        rel[arm, :, 2] = np.bincount(idx, weights=yf, minlength=r)
    return acc


def _cost(
    decision: npt.NDArray[np.int8], y: IntArray, value: FloatArray, costs: Costs
) -> FloatArray:
    weight = np.where(np.isfinite(value), value, 1.0)
    fp = (decision == 1) & (y == 0)
    fn = (decision == 0) & (y == 1)
    fp_w = weight if costs.cost_value in ("both", "false_positives") else 1.0
    fn_w = weight if costs.cost_value in ("both", "false_negatives") else 1.0
    return np.asarray(
        np.where(fp, costs.fp_cost * fp_w, 0.0) + np.where(fn, costs.fn_cost * fn_w, 0.0),
        dtype=np.float64,
    )


# --------------------------------------------------------------------------- ranking figures


def binned_auc(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """ROC AUC from per-bin counts of positives and negatives (last axis: bins, ascending
    scores); ties within a bin count half. Leading axes are batched (the bootstrap)."""
    p_total = pos.sum(axis=-1)
    n_total = neg.sum(axis=-1)
    below = np.cumsum(neg, axis=-1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(wins / (p_total * n_total), dtype=np.float64)


def binned_average_precision(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """Average precision from per-bin counts (last axis: bins, ascending scores), each bin one
    threshold: ``sum over thresholds of (recall step) * precision``, which is what
    ``sklearn.metrics.average_precision_score`` computes on the binned scores."""
    tp = np.cumsum(pos[..., ::-1], axis=-1)
    fp = np.cumsum(neg[..., ::-1], axis=-1)
    flagged = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(flagged > 0, tp / np.where(flagged > 0, flagged, 1.0), 0.0)
        ap = (pos[..., ::-1] * precision).sum(axis=-1) / pos.sum(axis=-1)
    return np.asarray(ap, dtype=np.float64)


@dataclass(frozen=True)
class DeLong:
    """Both arms' AUC and DeLong's paired test of their difference (candidate - champion)."""

    champion_auc: float
    candidate_auc: float
    champion_var: float
    candidate_var: float
    diff: float
    diff_var: float


def delong(joint: FloatArray) -> DeLong | None:
    """DeLong, DeLong & Clarke-Pearson (1988) on binned paired scores.

    ``joint[class, champion bin, candidate bin]``. Each positive's placement among the
    negatives (``V10``) and each negative's among the positives (``V01``) depend only on its
    bin, so the covariance matrices over positives and negatives are sums over the joint
    histogram: exact for the binned scores, in O(bins^2). None without both classes.
    """
    pos, neg = joint[1], joint[0]
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos < 2 or n_neg < 2:
        return None
    placements = []
    for axis in (1, 0):  # champion bins are rows (sum over candidate bins), then candidate
        p_hist, n_hist = pos.sum(axis=axis), neg.sum(axis=axis)
        v10 = (np.cumsum(n_hist) - n_hist + 0.5 * n_hist) / n_neg
        v01 = (p_hist[::-1].cumsum()[::-1] - p_hist + 0.5 * p_hist) / n_pos
        placements.append((v10, v01))
    (v10_a, v01_a), (v10_b, v01_b) = placements
    auc_a = float((pos.sum(axis=1) * v10_a).sum() / n_pos)
    auc_b = float((pos.sum(axis=0) * v10_b).sum() / n_pos)

    def cov(weights: FloatArray, x: FloatArray, y: FloatArray, mx: float, my: float) -> float:
        return float((weights * np.outer(x - mx, y - my)).sum() / (weights.sum() - 1.0))

    # Placement means: over positives V10 averages to the AUC; over negatives V01 does too.
    s10_ab = cov(pos, v10_a, v10_b, auc_a, auc_b)
    s10_aa = float((pos.sum(axis=1) * (v10_a - auc_a) ** 2).sum() / (n_pos - 1.0))
    s10_bb = float((pos.sum(axis=0) * (v10_b - auc_b) ** 2).sum() / (n_pos - 1.0))
    s01_aa = float((neg.sum(axis=1) * (v01_a - auc_a) ** 2).sum() / (n_neg - 1.0))
    s01_bb = float((neg.sum(axis=0) * (v01_b - auc_b) ** 2).sum() / (n_neg - 1.0))
    s01_ab = cov(neg, v01_a, v01_b, auc_a, auc_b)
    var_a = s10_aa / n_pos + s01_aa / n_neg
    var_b = s10_bb / n_pos + s01_bb / n_neg
    cov_ab = s10_ab / n_pos + s01_ab / n_neg
    return DeLong(auc_a, auc_b, var_a, var_b, auc_b - auc_a, max(var_a + var_b - 2 * cov_ab, 0.0))


# --------------------------------------------------------------------------- helpers


def normal_sf(z: float) -> float:
    """Upper tail of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF (Acklam's rational approximation refined by one
    Halley step: |error| < 1e-12 over (0, 1))."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    a = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
         -30.66479806614716, 2.506628277459239)  # fmt: skip
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
         -13.28068155288572)  # fmt: skip
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838, -2.549732539343734,
         4.374664141464968, 2.938163982698783)  # fmt: skip
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996, 3.754408661907416)
    low = 0.02425
    if p < low:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    elif p > 1 - low:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    else:
        q = p - 0.5
        r = q * q
        x = (
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
            * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        )
    e = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    u = e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
    return x - u / (1 + x * u / 2)


def estimate(value: float, se: float, n: int, z: float = Z95) -> Figure:
    """``value`` with a normal interval and a two-sided p-value against zero."""
    value, se = float(value), float(se)
    if not (math.isfinite(value) and math.isfinite(se)):
        return insufficient(n, "not_finite")
    p = 2.0 * normal_sf(abs(value) / se) if se > 0 else (1.0 if value == 0 else 0.0)
    return Figure(value=value, lo=value - z * se, hi=value + z * se, p_value=min(p, 1.0), n=n)


def mean_figure(total: float, total_sq: float, n: int, min_count: int) -> tuple[Figure, float]:
    """Mean of a per-request quantity from its sum and sum of squares, with its standard
    error (sample variance, n - 1)."""
    if n < max(min_count, 2):
        return insufficient(n), math.nan
    mean = total / n
    var = max((total_sq - n * mean * mean) / (n - 1), 0.0)
    se = math.sqrt(var / n)
    return estimate(mean, se, n), se


def plain(value: float, n: int) -> Figure:
    value = float(value)
    return Figure(value=value, n=n) if math.isfinite(value) else insufficient(n, "not_finite")


# --------------------------------------------------------------------------- the figures


@dataclass(frozen=True)
class ArmFigures:
    precision: Figure
    recall: Figure
    f1: Figure
    accuracy: Figure
    auc: Figure
    average_precision: Figure
    log_loss: Figure
    brier: Figure
    calibration_error: Figure
    mean_cost: Figure
    total_cost: float
    #: ``(lower edge, upper edge, count, mean score, observed positive rate)`` per bin.
    reliability: list[ReliabilityRow]


@dataclass(frozen=True)
class DiffFigures:
    """Candidate minus champion on the same requests."""

    auc: Figure
    average_precision: Figure
    log_loss: Figure
    brier: Figure
    cost: Figure
    accuracy: Figure
    recall: Figure
    f1: Figure
    calibration_error: Figure
    #: McNemar's test on correctness (``b``: only the champion right; ``c``: only the
    #: candidate right).
    correctness_mcnemar: Figure
    #: Standard errors behind the non-inferiority test (None where there is none).
    se: dict[str, float | None]


@dataclass(frozen=True)
class QualityFigures:
    judged: int
    positives: int
    champion: ArmFigures
    candidate: ArmFigures
    diff: DiffFigures


def confusion(table: FloatArray, arm: int) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of one arm from the ``[class, champion, candidate]`` table."""
    by = table.sum(axis=2 - arm)  # [class, this arm's decision]
    tp, fn = int(by[1, 1]), int(by[1, 0])
    fp, tn = int(by[0, 1]), int(by[0, 0])
    return tp, fp, fn, tn


def f1_of(tp: FloatArray, fp: FloatArray, fn: FloatArray) -> FloatArray:
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan))


ReliabilityRow = tuple[float, float, int, float | None, float | None]


def calibration(rel: FloatArray, n: int, min_count: int) -> tuple[Figure, list[ReliabilityRow]]:
    """Expected calibration error (bins weighted by their counts) and the reliability rows."""
    bins = rel.shape[0]
    edges = np.linspace(0.0, 1.0, bins + 1)
    out: list[ReliabilityRow] = []
    ece = 0.0
    for i in range(bins):
        count, sum_p, sum_y = rel[i]
        c = round(float(count))
        mean_p = float(sum_p / count) if count else None
        obs = float(sum_y / count) if count else None
        if count:
            ece += count * abs(sum_p / count - sum_y / count)
        out.append((float(edges[i]), float(edges[i + 1]), c, mean_p, obs))
    fig = Figure(value=float(ece / n), n=n) if n >= max(min_count, 1) else insufficient(n)
    return fig, out


def _arm(
    layout: Layout, acc: FloatArray, arm: int, auc: Figure, ap: Figure, min_pairs: int
) -> ArmFigures:
    name = ARMS[arm]
    table = layout.decisions(acc)
    n = layout.judged(acc)
    tp, fp, fn, tn = confusion(table, arm)
    ok = n >= min_pairs
    precision = wilson(tp, tp + fp) if ok else insufficient(tp + fp)
    recall = wilson(tp, tp + fn) if ok else insufficient(tp + fn)
    f1 = plain(2 * tp / (2 * tp + fp + fn), n) if ok and tp + fp + fn else insufficient(n)
    accuracy = wilson(tp + tn, n) if ok else insufficient(n)
    log_loss = _mean_only(layout.sum(acc, f"log_loss_{name}"), n, min_pairs)
    brier = _mean_only(layout.sum(acc, f"brier_{name}"), n, min_pairs)
    mean_cost, _ = mean_figure(
        layout.sum(acc, f"cost_{name}"), layout.sum(acc, f"cost_sq_{name}"), n, min_pairs
    )
    cal, bins = calibration(layout.reliability(acc)[arm], n, min_pairs)
    return ArmFigures(
        precision=precision,
        recall=recall,
        f1=f1,
        accuracy=accuracy,
        auc=auc,
        average_precision=ap,
        log_loss=log_loss,
        brier=brier,
        calibration_error=cal,
        mean_cost=mean_cost,
        total_cost=layout.sum(acc, f"cost_{name}"),
        reliability=bins,
    )


def _mean_only(total: float, n: int, min_count: int) -> Figure:
    return plain(total / n, n) if n >= max(min_count, 1) else insufficient(n)


def figures(
    layout: Layout,
    acc: FloatArray,
    *,
    min_pairs: int = 100,
    min_positives: int = 10,
    resamples: int = 200,
    seed: int = 0,
) -> QualityFigures:
    """Every quality figure of one accumulator (a window, or several merged)."""
    n = layout.judged(acc)
    joint = layout.joint(acc)
    positives = round(float(joint[1].sum()))
    negatives = n - positives
    enough = n >= min_pairs and positives >= min_positives and negatives >= min_positives
    why = "min_count" if n < min_pairs else "min_positives"
    dl = delong(joint) if enough else None
    ranks = layout.ranks(acc)
    if dl is not None:
        # Values from each arm's fine histograms; standard errors from DeLong on the joint
        # (no p-value on an arm's own AUC: nothing to test it against).
        value_a = float(binned_auc(ranks[0, 1], ranks[0, 0]))
        value_b = float(binned_auc(ranks[1, 1], ranks[1, 0]))
        auc_a = _no_p(estimate(value_a, math.sqrt(dl.champion_var), n))
        auc_b = _no_p(estimate(value_b, math.sqrt(dl.candidate_var), n))
        auc_diff = estimate(value_b - value_a, math.sqrt(dl.diff_var), n)
    else:
        auc_a = auc_b = auc_diff = insufficient(n, why)
    table = layout.decisions(acc)
    rng = np.random.default_rng(seed)
    if enough:
        ap_a = float(binned_average_precision(ranks[0, 1], ranks[0, 0]))
        ap_b = float(binned_average_precision(ranks[1, 1], ranks[1, 0]))
        # Paired bootstrap: resample requests (cells of the joint histogram) with replacement.
        boot = rng.multinomial(n, (joint / n).ravel(), size=resamples).reshape(
            resamples, *joint.shape
        )
        d = binned_average_precision(
            boot[:, 1].sum(axis=1), boot[:, 0].sum(axis=1)
        ) - binned_average_precision(boot[:, 1].sum(axis=2), boot[:, 0].sum(axis=2))
        ap_diff, ap_se = _bootstrap_figure(ap_b - ap_a, d - d.mean(), n)
        ap_fig_a, ap_fig_b = plain(ap_a, n), plain(ap_b, n)
    else:
        ap_fig_a = ap_fig_b = ap_diff = insufficient(n, why)
        ap_se = None
    champion = _arm(layout, acc, 0, auc_a, ap_fig_a, min_pairs)
    candidate = _arm(layout, acc, 1, auc_b, ap_fig_b, min_pairs)
    se: dict[str, float | None] = {
        "auc": math.sqrt(dl.diff_var) if dl is not None else None,
        "average_precision": ap_se,
    }
    diffs: dict[str, Figure] = {}
    for metric, key in (("log_loss", "d_log_loss"), ("brier", "d_brier"), ("cost", "d_cost")):
        fig, s = mean_figure(layout.sum(acc, key), layout.sum(acc, f"{key}_sq"), n, min_pairs)
        diffs[metric], se[metric] = fig, (s if math.isfinite(s) else None)
    # Correctness: b = only the champion right, c = only the candidate right.
    correct = np.zeros((2, 2))  # [champion right, candidate right]
    for y in (0, 1):
        for da in (0, 1):
            for db in (0, 1):
                correct[int(da == y), int(db == y)] += table[y, da, db]
    b, c = int(correct[1, 0]), int(correct[0, 1])
    if n >= min_pairs:
        acc_se = math.sqrt(max((b + c) / n**2 - (c - b) ** 2 / n**3, 0.0))
        diffs["accuracy"], se["accuracy"] = estimate((c - b) / n, acc_se, n), acc_se
        mcn = mcnemar(b, c, n=n)
    else:
        diffs["accuracy"], se["accuracy"], mcn = insufficient(n), None, insufficient(n)
    recall_diff, se["recall"] = _recall_diff(table, positives, min_positives, n)
    if enough:
        boot_t = rng.multinomial(n, (table / n).ravel(), size=resamples).reshape(resamples, 2, 2, 2)
        f1s = []
        for arm in (0, 1):
            by = boot_t.sum(axis=3 - arm)
            f1s.append(f1_of(by[:, 1, 1], by[:, 0, 1], by[:, 1, 0]))
        point = _value(candidate.f1) - _value(champion.f1)
        f1_d = f1s[1] - f1s[0]
        f1_diff, se["f1"] = _bootstrap_figure(point, f1_d - np.nanmean(f1_d), n)
    else:
        f1_diff, se["f1"] = insufficient(n, why), None
    cal = (
        plain(_value(candidate.calibration_error) - _value(champion.calibration_error), n)
        if champion.calibration_error.ok and candidate.calibration_error.ok
        else insufficient(n)
    )
    return QualityFigures(
        judged=n,
        positives=positives,
        champion=champion,
        candidate=candidate,
        diff=DiffFigures(
            auc=auc_diff,
            average_precision=ap_diff,
            log_loss=diffs["log_loss"],
            brier=diffs["brier"],
            cost=diffs["cost"],
            accuracy=diffs["accuracy"],
            recall=recall_diff,
            f1=f1_diff,
            calibration_error=cal,
            correctness_mcnemar=mcn,
            se=se,
        ),
    )


def _value(f: Figure) -> float:
    return f.value if f.ok and f.value is not None else math.nan


def _no_p(f: Figure) -> Figure:
    return Figure(value=f.value, lo=f.lo, hi=f.hi, n=f.n, status=f.status, reason=f.reason)


def _bootstrap_figure(point: float, deviations: FloatArray, n: int) -> tuple[Figure, float | None]:
    """``point`` with a basic-percentile 95% interval from the bootstrap ``deviations``
    (resampled statistic minus its bootstrap mean), and the bootstrap standard error (the
    p-value uses the normal approximation with it)."""
    finite = deviations[np.isfinite(deviations)]
    if finite.size < 10 or not math.isfinite(point):
        return insufficient(n, "bootstrap"), None
    lo_dev, hi_dev = np.quantile(finite, [0.025, 0.975])
    point = float(point)
    lo, hi = point + float(lo_dev), point + float(hi_dev)
    se = float(finite.std(ddof=1))
    p = 2.0 * normal_sf(abs(point) / se) if se > 0 else (1.0 if point == 0 else 0.0)
    return Figure(value=point, lo=float(lo), hi=float(hi), p_value=min(p, 1.0), n=n), se


def _recall_diff(
    table: FloatArray, positives: int, min_positives: int, n: int
) -> tuple[Figure, float | None]:
    """Candidate minus champion recall on the same positives: Newcombe's paired interval for
    the figure, the Wald paired standard error for the non-inferiority test."""
    if positives < min_positives:
        return insufficient(positives, "min_positives"), None
    both, champ_only = int(table[1, 1, 1]), int(table[1, 1, 0])
    cand_only, neither = int(table[1, 0, 1]), int(table[1, 0, 0])
    fig = paired_difference(PairedTable(both, champ_only, cand_only, neither))
    m = positives
    se = math.sqrt(max((champ_only + cand_only) / m**2 - (cand_only - champ_only) ** 2 / m**3, 0))
    return fig, se


__all__ = [
    "ARMS",
    "COUNTERS",
    "EPS",
    "LOGIT_RANGE",
    "SUMS",
    "ArmFigures",
    "Costs",
    "DeLong",
    "DiffFigures",
    "Layout",
    "QualityFigures",
    "bin_edges",
    "binned_auc",
    "binned_average_precision",
    "confusion",
    "contribution",
    "delong",
    "estimate",
    "figures",
    "mean_figure",
    "normal_quantile",
    "normal_sf",
    "reliability_bin",
    "score_bins",
]
