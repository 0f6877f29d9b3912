"""Fixed-edge histograms: the only per-window score and latency state the aggregator keeps.

Edges are frozen when a histogram is created (uniform over [0, 1] by default, or quantile edges
computed once from a reference sample), so two histograms with the same edges merge exactly by
adding counts. That is what makes windows mergeable across partitions and restarts, and what
keeps memory bounded by the number of open windows rather than the number of records.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def uniform_edges(bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> FloatArray:
    """``bins`` equal-width bins over ``[lo, hi]``: the default for probability-like scores."""
    if bins < 1 or not hi > lo:
        raise ValueError("need bins >= 1 and hi > lo")
    return np.linspace(lo, hi, bins + 1, dtype=np.float64)


def quantile_edges(reference: npt.ArrayLike, bins: int = 10) -> FloatArray:
    """Edges at the quantiles of a reference sample (equal-mass bins, the usual PSI set-up).

    Tied quantiles are collapsed, so a reference with few distinct values yields fewer bins.
    NaN/inf values in the reference are ignored.
    """
    values = np.asarray(reference, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("reference sample has no finite values")
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        raise ValueError("reference sample is constant; cannot derive quantile edges")
    return edges.astype(np.float64)


class ScoreHistogram:
    """Counts of scores in fixed bins, with NaN and missing (None) scores counted apart.

    Values outside ``[edges[0], edges[-1]]`` (including +-inf) are clamped into the first or last
    bin rather than dropped, so every finite or infinite score is accounted for.
    """

    __slots__ = ("_inner", "counts", "edges", "missing", "nan")

    def __init__(self, edges: npt.ArrayLike | None = None) -> None:
        e = uniform_edges() if edges is None else np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
            raise ValueError("edges must be a strictly increasing 1-d array of >= 2 values")
        self.edges: FloatArray = e
        self._inner: FloatArray = e[1:-1]
        self.counts: IntArray = np.zeros(e.size - 1, dtype=np.int64)
        self.nan = 0
        self.missing = 0

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def total(self) -> int:
        """Number of binned (non-NaN, non-missing) scores."""
        return int(self.counts.sum())

    def add(self, scores: FloatArray, missing: BoolArray | None = None) -> None:
        """Add a batch. ``missing`` marks None scores (stored as NaN in ``scores``)."""
        n_missing = int(np.count_nonzero(missing)) if missing is not None else 0
        isnan = np.isnan(scores)
        self.missing += n_missing
        self.nan += int(np.count_nonzero(isnan)) - n_missing
        finite = scores[~isnan]
        if finite.size:
            idx = np.searchsorted(self._inner, finite, side="right")
            self.counts += np.bincount(idx, minlength=self.counts.size)

    def same_edges(self, other: ScoreHistogram) -> bool:
        return self.edges.shape == other.edges.shape and bool(np.all(self.edges == other.edges))

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """Add ``other``'s counts into this histogram (exact, edges must be identical)."""
        if not self.same_edges(other):
            raise ValueError("cannot merge histograms with different edges")
        self.counts += other.counts
        self.nan += other.nan
        self.missing += other.missing
        return self

    def copy(self) -> ScoreHistogram:
        out = ScoreHistogram(self.edges)
        out.merge(self)
        return out


#: Latency sketch range and resolution: 10 us .. 60 s, bins 4% wide (<= 2% error at the mid).
LATENCY_MIN_MS = 0.01
LATENCY_MAX_MS = 60_000.0
LATENCY_GAMMA = 1.04


class LatencySketch:
    """Log-spaced latency histogram with mergeable quantiles.

    Bin ``i`` (1-based) covers ``[min * gamma**(i-1), min * gamma**i)``; a quantile is reported
    as the geometric midpoint of its bin, so the relative error is at most ``sqrt(gamma) - 1``
    (~2% for gamma = 1.04). Bin 0 collects everything below ``min_ms`` (including 0 and
    negative clock skew) and the last bin everything at or above ``max_ms``; quantiles falling
    there are reported as ``min_ms`` / ``max_ms``. NaN and None latencies are counted as missing.
    """

    __slots__ = ("_log_gamma", "_log_min", "counts", "gamma", "max_ms", "min_ms", "missing")

    def __init__(
        self,
        min_ms: float = LATENCY_MIN_MS,
        max_ms: float = LATENCY_MAX_MS,
        gamma: float = LATENCY_GAMMA,
    ) -> None:
        if not (0 < min_ms < max_ms) or gamma <= 1.0:
            raise ValueError("need 0 < min_ms < max_ms and gamma > 1")
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.gamma = gamma
        self._log_min = math.log(min_ms)
        self._log_gamma = math.log(gamma)
        inner = math.ceil((math.log(max_ms) - self._log_min) / self._log_gamma)
        self.counts: IntArray = np.zeros(inner + 2, dtype=np.int64)
        self.missing = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, latency_ms: FloatArray) -> None:
        """Add a batch of latencies (NaN = missing)."""
        isnan = np.isnan(latency_ms)
        self.missing += int(np.count_nonzero(isnan))
        x = latency_ms[~isnan]
        if not x.size:
            return
        last = self.counts.size - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.floor((np.log(np.maximum(x, self.min_ms)) - self._log_min) / self._log_gamma)
        idx = np.clip(raw, 0, last - 2).astype(np.int64) + 1
        idx[x < self.min_ms] = 0
        idx[x >= self.max_ms] = last
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def merge(self, other: LatencySketch) -> LatencySketch:
        if (self.min_ms, self.max_ms, self.gamma) != (other.min_ms, other.max_ms, other.gamma):
            raise ValueError("cannot merge latency sketches with different parameters")
        self.counts += other.counts
        self.missing += other.missing
        return self

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile (``inverted_cdf``) at bin resolution; None when empty."""
        n = self.total
        if n == 0:
            return None
        rank = max(1, math.ceil(q * n))
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        if i == 0:
            return self.min_ms
        if i == self.counts.size - 1:
            return self.max_ms
        return float(self.min_ms * self.gamma ** (i - 1) * math.sqrt(self.gamma))
