"""Ranking quality from outcomes: CTR@k, NDCG@k and MRR of both arms on the same requests.

Pure functions over ``(ranked item ids, clicked item ids)`` and one mergeable accumulator;
no Kafka, no join. A ranking's ground truth is the set of item ids the user acted on (clicked,
bought) -- an ``Outcome`` whose ``label`` is a list of item ids.

Per request and arm, with ``hits[j]`` true when the item at rank ``j`` (0-based) was clicked:

* ``CTR@k`` = clicked items in the top k / k (items the arm returned beyond its list count
  as not clicked: a list shorter than k is not rewarded);
* ``NDCG@k`` = ``sum(hits[j] / log2(j + 2))`` over the top k, divided by the same sum for the
  ideal list (``min(k, clicked)`` hits first); requests with no click have no NDCG and are
  counted apart (``no_clicks``);
* ``RR`` = 1 / (rank of the first clicked item + 1), 0 when none in the list; MRR is its mean.

:class:`PairedRankingQuality` sums each figure, its square and the paired difference
(candidate - champion) and its square, so windows merge by addition and each figure gets a
normal-approximation interval; the difference's interval is the *paired* one (the same
requests judged for both arms). Counts are exact; memory is fixed.

The outcomes stage uses it (:mod:`sidecar.outcomes.join`): for ranking comparisons
(``ModelResult.output_kind == "ranking"`` on both arms) it calls
:meth:`PairedRankingQuality.add` with both arms' ``items`` and the outcome's item ids as the
clicked set, once per chunk of joined requests (and takes a request's contribution back, by
subtracting the same call's state, when a later outcome replaces its set), keeps one
accumulator per window next to its quality state (``to_list`` / ``from_list`` are its stored
form), and publishes :meth:`PairedRankingQuality.report` as the ``ranking`` section of the
window's ``QualityReport`` and :meth:`PairedRankingQuality.estimate` in the verdict.
``sidecar demo --scenario recommend`` feeds it directly from the generator's click sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from ..aggregate.stats import Z95, Figure, insufficient

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def _discounts(k: int) -> FloatArray:
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)


def hits(
    ranked: Sequence[Sequence[str]], clicked: Sequence[set[str] | frozenset[str]], k: int
) -> BoolArray:
    """``(n, k)``: whether the item at each rank of each request's list was clicked (a list
    shorter than ``k`` is padded with misses)."""
    n = len(ranked)
    out = np.zeros((n, k), dtype=np.bool_)
    for i, (row, seen) in enumerate(zip(ranked, clicked, strict=True)):
        if seen:
            top = row[:k]
            out[i, : len(top)] = [x in seen for x in top]
    return out


def ctr_at_k(hit: BoolArray) -> FloatArray:
    """Clicked share of each request's top k (``k`` = the columns of ``hit``)."""
    k = hit.shape[1]
    return hit.sum(axis=1) / k if k else np.zeros(hit.shape[0])


def ndcg_at_k(hit: BoolArray, clicked: IntArray) -> FloatArray:
    """NDCG@k per request; NaN where nothing was clicked (no ideal ranking)."""
    k = hit.shape[1]
    disc = _discounts(k)
    dcg = hit.astype(np.float64) @ disc
    ideal_cum = np.concatenate(([0.0], np.cumsum(disc)))
    idcg = ideal_cum[np.minimum(clicked, k)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def reciprocal_rank(hit: BoolArray) -> FloatArray:
    """1 / (rank of the first hit + 1) per request, 0 without a hit in the list."""
    any_hit = hit.any(axis=1)
    first = hit.argmax(axis=1)
    return np.where(any_hit, 1.0 / (first + 1.0), 0.0)


METRICS = ("ctr", "ndcg", "rr")
#: Accumulator layout: requests, requests without a click, then per metric:
#: [champion sum, champion sum of squares, candidate sum, candidate sum of squares,
#: difference sum, difference sum of squares, pairs].
_HEAD = 2
_PER = 7


class RankingQualityReport(msgspec.Struct, frozen=True, kw_only=True):
    """Per-arm ranking quality on the same labelled requests, with 95% intervals."""

    k: int
    requests: int
    no_clicks: int
    ctr_champion: Figure
    ctr_candidate: Figure
    ctr_diff: Figure
    ndcg_champion: Figure
    ndcg_candidate: Figure
    ndcg_diff: Figure
    mrr_champion: Figure
    mrr_candidate: Figure
    mrr_diff: Figure


def _mean(total: float, squares: float, n: float, z: float, lo: float, hi: float) -> Figure:
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
    half = z * math.sqrt(var / n)
    return Figure(value=mean, lo=max(lo, mean - half), hi=min(hi, mean + half), n=int(n))


class PairedRankingQuality:
    """Mergeable sums of CTR@k, NDCG@k and RR for both arms and their paired differences."""

    __slots__ = ("k", "state")

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.state: FloatArray = np.zeros(_HEAD + _PER * len(METRICS))

    def add(
        self,
        champion: Sequence[Sequence[str]],
        candidate: Sequence[Sequence[str]],
        clicked: Sequence[set[str] | frozenset[str]],
    ) -> None:
        """Judge both arms' lists of the same requests against their clicked items."""
        n = len(clicked)
        if not n:
            return
        n_clicked = np.fromiter(map(len, clicked), dtype=np.int64, count=n)
        hc, hk = hits(champion, clicked, self.k), hits(candidate, clicked, self.k)
        s = self.state
        s[0] += n
        s[1] += int(np.count_nonzero(n_clicked == 0))
        per_metric = (
            (ctr_at_k(hc), ctr_at_k(hk)),
            (ndcg_at_k(hc, n_clicked), ndcg_at_k(hk, n_clicked)),
            (reciprocal_rank(hc), reciprocal_rank(hk)),
        )
        for m, (a, b) in enumerate(per_metric):
            ok = ~(np.isnan(a) | np.isnan(b))
            a, b = a[ok], b[ok]
            d = b - a
            base = _HEAD + _PER * m
            s[base : base + _PER] += (
                a.sum(),
                (a * a).sum(),
                b.sum(),
                (b * b).sum(),
                d.sum(),
                (d * d).sum(),
                a.size,
            )

    def merge(self, other: PairedRankingQuality) -> PairedRankingQuality:
        if other.k != self.k:
            raise ValueError("cannot merge ranking quality of another k")
        self.state += other.state
        return self

    def to_list(self) -> list[float]:
        return [float(self.k), *self.state.tolist()]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> PairedRankingQuality:
        out = cls(int(values[0]))
        if len(values) != 1 + out.state.size:
            raise ValueError("ranking quality state of another layout")
        out.state[:] = values[1:]
        return out

    def estimate(self, metric: str) -> tuple[float, float, float, float, int] | None:
        """``metric`` (``ctr``, ``ndcg`` or ``mrr``): both arms' means, the mean paired
        difference (candidate - champion), its standard error, and the pairs behind them
        (None without any)."""
        m = METRICS.index("rr" if metric == "mrr" else metric)
        base = _HEAD + _PER * m
        ca, _, ka, _, da, dq, n = self.state[base : base + _PER].tolist()
        if n < 1:
            return None
        var = max(dq / n - (da / n) ** 2, 0.0) * n / max(n - 1.0, 1.0)
        return ca / n, ka / n, da / n, math.sqrt(var / n), round(n)

    def report(self, *, z: float = Z95, min_count: int = 1) -> RankingQualityReport:
        s = self.state
        figures: dict[str, Any] = {}
        for m, name in enumerate(METRICS):
            base = _HEAD + _PER * m
            ca, cq, ka, kq, da, dq, n = s[base : base + _PER].tolist()
            label = "mrr" if name == "rr" else name
            if n < max(min_count, 1):
                none = insufficient(int(n))
                figures |= {f"{label}_champion": none, f"{label}_candidate": none}
                figures[f"{label}_diff"] = none
                continue
            figures[f"{label}_champion"] = _mean(ca, cq, n, z, 0.0, 1.0)
            figures[f"{label}_candidate"] = _mean(ka, kq, n, z, 0.0, 1.0)
            figures[f"{label}_diff"] = _mean(da, dq, n, z, -1.0, 1.0)
        return RankingQualityReport(k=self.k, requests=int(s[0]), no_clicks=int(s[1]), **figures)


__all__ = [
    "METRICS",
    "PairedRankingQuality",
    "RankingQualityReport",
    "ctr_at_k",
    "hits",
    "ndcg_at_k",
    "reciprocal_rank",
]
