"""Comparison statistics over binned and counted data, numpy/stdlib only (no scipy at runtime).

Every figure is returned as a :class:`Figure` whose ``status`` says whether there was enough
data. "Not enough data" is an explicit state, never a zero and never an exception, so a guard
can tell "no signal yet" from "no difference".
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

#: Two-sided 95% normal quantile (``scipy.stats.norm.ppf(0.975)``).
Z95 = 1.959963984540054
#: Proportions below this are replaced by it in PSI, so empty bins give a large finite term.
PSI_EPSILON = 1e-4
#: Discordant-pair count below which McNemar uses the exact binomial test.
MCNEMAR_EXACT_BELOW = 25

FigureStatus = Literal["ok", "insufficient_data"]
PsiBand = Literal["stable", "moderate", "significant"]


class Figure(msgspec.Struct, frozen=True, kw_only=True):
    """One reported number with its interval, its sample size and whether it is meaningful."""

    value: float | None
    lo: float | None = None
    hi: float | None = None
    p_value: float | None = None
    n: int = 0
    status: FigureStatus = "ok"
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.value is not None


def insufficient(n: int = 0, reason: str = "min_count") -> Figure:
    """The explicit "not enough data" figure."""
    return Figure(value=None, n=n, status="insufficient_data", reason=reason)


def _counts(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------- distributions


def psi(
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    *,
    eps: float = PSI_EPSILON,
    min_count: int = 1,
) -> Figure:
    """Population Stability Index of ``current`` against ``reference`` binned counts.

    ``PSI = sum((c_i - r_i) * ln(c_i / r_i))`` over bin proportions, where each proportion
    below ``eps`` is replaced by ``eps`` (no renormalisation), so an empty bin contributes a
    large but finite term instead of infinity. ``n`` is the smaller of the two sample sizes.
    """
    r, c = _counts(reference), _counts(current)
    nr, nc = float(r.sum()), float(c.sum())
    n = int(min(nr, nc))
    if nr < max(min_count, 1) or nc < max(min_count, 1):
        return insufficient(n)
    rp = np.maximum(r / nr, eps)
    cp = np.maximum(c / nc, eps)
    return Figure(value=float(np.sum((cp - rp) * np.log(cp / rp))), n=n)


def psi_band(value: float | None) -> PsiBand | None:
    """The usual PSI reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant."""
    if value is None:
        return None
    if value < 0.1:
        return "stable"
    return "moderate" if value <= 0.25 else "significant"


def js_distance(p: npt.ArrayLike, q: npt.ArrayLike, *, min_count: int = 1) -> Figure:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two binned distributions.

    Equal to ``scipy.spatial.distance.jensenshannon(p, q, base=2)``; counts are normalised.
    """
    a, b = _counts(p), _counts(q)
    na, nb = float(a.sum()), float(b.sum())
    n = int(min(na, nb))
    if na < max(min_count, 1) or nb < max(min_count, 1):
        return insufficient(n)
    a, b = a / na, b / nb
    m = (a + b) / 2.0

    def kl(x: npt.NDArray[np.float64]) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    div = max(0.0, (kl(a) + kl(b)) / 2.0)
    return Figure(value=math.sqrt(div), n=n)


def ks_binned(p: npt.ArrayLike, q: npt.ArrayLike, *, min_count: int = 1) -> Figure:
    """Kolmogorov-Smirnov statistic from binned counts: max |CDF_p - CDF_q| at the bin edges.

    The binned CDFs are the empirical CDFs just below each bin's upper edge, i.e. the exact
    ECDFs sampled at the edges, so this is a lower bound of the exact two-sample KS statistic on
    the raw scores (``scipy.stats.ks_2samp``). It equals it when the largest ECDF gap is reached
    at an edge, e.g. whenever each bin holds at most one distinct score value; with fine bins
    the gap is at most the mass of the densest bin.
    """
    a, b = _counts(p), _counts(q)
    na, nb = float(a.sum()), float(b.sum())
    n = int(min(na, nb))
    if na < max(min_count, 1) or nb < max(min_count, 1):
        return insufficient(n)
    d = np.abs(np.cumsum(a) / na - np.cumsum(b) / nb)
    return Figure(value=float(d.max()), n=n)


# --------------------------------------------------------------------------- proportions


def _wilson_bounds(k: float, n: float, z: float) -> tuple[float, float]:
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(max(p * (1.0 - p) / n + z2 / (4.0 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson(k: int, n: int, *, z: float = Z95, min_count: int = 1) -> Figure:
    """Proportion ``k / n`` with its Wilson score interval (no continuity correction)."""
    if n < max(min_count, 1):
        return insufficient(n)
    lo, hi = _wilson_bounds(k, n, z)
    return Figure(value=k / n, lo=lo, hi=hi, n=n)


class PairedTable(msgspec.Struct, frozen=True):
    """2x2 table of the same requests decided by both arms.

    ``both_yes`` (a), ``champion_only`` (b: champion yes, candidate no),
    ``candidate_only`` (c: champion no, candidate yes), ``both_no`` (d).
    """

    both_yes: int
    champion_only: int
    candidate_only: int
    both_no: int

    @property
    def n(self) -> int:
        return self.both_yes + self.champion_only + self.candidate_only + self.both_no


def paired_difference(t: PairedTable, *, z: float = Z95, min_count: int = 1) -> Figure:
    """Candidate minus champion decision rate on paired data, Newcombe (1998) method 10 CI.

    The hybrid score interval combines each arm's Wilson interval with the correlation
    ``phi`` of the paired decisions (continuity-corrected as in the paper), which is what makes
    it a *paired* interval; it behaves well at small counts and rates near 0 or 1.
    """
    a, b, c, d = t.both_yes, t.champion_only, t.candidate_only, t.both_no
    n = t.n
    if n < max(min_count, 1):
        return insufficient(n)
    p1, p2 = (a + c) / n, (a + b) / n  # candidate, champion
    l1, u1 = _wilson_bounds(a + c, n, z)
    l2, u2 = _wilson_bounds(a + b, n, z)
    denom = (a + c) * (b + d) * (a + b) * (c + d)
    phi = 0.0
    if denom > 0:
        # Rows/columns swapped relative to the candidate-first orientation leave ad - bc
        # unchanged, so the usual formula applies as is.
        cross = a * d - b * c
        corrected = cross - n / 2.0 if cross > n / 2.0 else (float(cross) if cross < 0 else 0.0)
        phi = corrected / math.sqrt(denom)
    diff = p1 - p2
    dl = (p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du = (u1 - p1) ** 2 - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    lo = max(-1.0, diff - math.sqrt(max(dl, 0.0)))
    hi = min(1.0, diff + math.sqrt(max(du, 0.0)))
    return Figure(value=diff, lo=lo, hi=hi, n=n)


def paired_ratio(t: PairedTable, *, z: float = Z95, min_count: int = 1) -> Figure:
    """Candidate / champion decision rate on paired data, log-method (delta) CI.

    For matched pairs ``Var(ln R) = (b + c) / ((a + b)(a + c))`` (the covariance of the two
    marginal rates is included; only discordant pairs contribute). When either arm has no
    positive decision, 0.5 is added to every cell (Haldane) so the ratio stays finite and a
    candidate that starts flagging where the champion never did is still visible.
    """
    a, b, c, d = (
        float(t.both_yes),
        float(t.champion_only),
        float(t.candidate_only),
        float(t.both_no),
    )
    n = t.n
    if n < max(min_count, 1):
        return insufficient(n)
    if a + b == 0 or a + c == 0:
        a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    ratio = (a + c) / (a + b)
    se = math.sqrt((b + c) / ((a + b) * (a + c)))
    log_r = math.log(ratio)
    return Figure(value=ratio, lo=math.exp(log_r - z * se), hi=math.exp(log_r + z * se), n=n)


def conditional_flip_rates(
    t: PairedTable, *, z: float = Z95, min_count: int = 1
) -> tuple[Figure, Figure]:
    """Flip rates with Wilson CIs: P(candidate no | champion yes), P(candidate yes | champion no).

    Conditioning on the champion's decision makes the two directions comparable whatever the
    base rate (the unconditional counts are in the paired table itself).
    """
    yes_to_no = wilson(t.champion_only, t.both_yes + t.champion_only, z=z, min_count=min_count)
    no_to_yes = wilson(t.candidate_only, t.candidate_only + t.both_no, z=z, min_count=min_count)
    return yes_to_no, no_to_yes


# --------------------------------------------------------------------------- tests


def chi2_sf_1dof(x: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    if x <= 0:
        return 1.0
    return math.erfc(math.sqrt(x / 2.0))


def binom_cdf_half(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``, exact (integer arithmetic)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)


def sign_test_greater(k: int, n: int) -> float:
    """One-sided sign test: ``P(X >= k)`` for ``X ~ Binomial(n, 1/2)`` (exact), i.e. the
    p-value of "more than half of ``n`` paired observations went one way" when ``k`` did."""
    if n <= 0 or k <= 0:
        return 1.0
    if k > n:
        return 0.0
    # log C(n, i) for i = 0..n by a running sum (floats: big-integer binomials for n ~ 1000
    # would cost milliseconds per window).
    j = np.arange(1, n + 1, dtype=np.float64)
    log_comb = np.concatenate(([0.0], np.cumsum(np.log(n - j + 1.0) - np.log(j))))
    tail = float(np.exp(log_comb[k:] - n * math.log(2.0)).sum())
    return min(1.0, tail)


def mcnemar(
    b: int,
    c: int,
    *,
    exact_below: int = MCNEMAR_EXACT_BELOW,
    n: int | None = None,
    min_count: int = 1,
) -> Figure:
    """McNemar's test on the discordant counts ``b`` and ``c``.

    Below ``exact_below`` discordant pairs: exact two-sided binomial test (``value`` is
    ``min(b, c)``, p as ``scipy.stats.binomtest(b, b + c, 0.5)``). Otherwise: chi-square with
    continuity correction, ``(max(|b - c| - 1, 0))**2 / (b + c)``, 1 dof (as statsmodels'
    ``mcnemar(exact=False)`` except the correction is not allowed to overshoot past zero).
    ``n`` is the number of pairs behind the table; it is what ``min_count`` is checked against.
    """
    total = b + c
    pairs = total if n is None else n
    if pairs < max(min_count, 1):
        return insufficient(pairs)
    if total == 0:
        return Figure(value=0.0, p_value=1.0, n=pairs, reason="no_discordant_pairs")
    if total < exact_below:
        p = min(1.0, 2.0 * binom_cdf_half(min(b, c), total))
        return Figure(value=float(min(b, c)), p_value=p, n=pairs, reason="exact_binomial")
    stat = max(abs(b - c) - 1.0, 0.0) ** 2 / total
    return Figure(value=stat, p_value=chi2_sf_1dof(stat), n=pairs, reason="chi2_cc")


def ratio_figure(num: Figure, den: Figure) -> Figure:
    """Ratio of two point figures (e.g. p99 latencies); insufficient if either is."""
    if not (num.ok and den.ok) or num.value is None or den.value is None or den.value <= 0:
        return insufficient(min(num.n, den.n))
    return Figure(value=num.value / den.value, n=min(num.n, den.n))
