"""Paired comparisons of non-binary outputs: rankings, labels (multiclass, regression bands) and
regression values, as mergeable window state.

Like the rest of a window's state these are counters, fixed-edge histograms and bounded
sketches, added to a whole columnar batch at a time (numpy) and merged exactly across
partitions; memory is bounded whatever the traffic, the catalogue or what a hostile record
says. Only *pairs* count: requests where both arms returned the kind's output.

**Rankings** (both arms' top-k item ids, compared up to ``RANK_DEPTH`` ranks):

* ``overlap`` -- shared items / list length (overlap@k), mean per request with a 95% interval;
* ``rbo`` -- rank-biased overlap (Webber et al. 2010, extrapolated, persistence ``p``): top
  ranks weigh most, 1 for identical lists, 0 for disjoint ones;
* ``kendall_tau`` -- Kendall's tau-a of the shared items' two orders (requests with at least
  two shared items);
* the champion's top item in the candidate's list: still first (``top_item_kept``), gone
  (``top_item_dropped``), mean position change (absent counts as k);
* exposure -- how often each item is shown per arm. Items are hashed into ``EXPOSURE_BUCKETS``
  buckets (exact to merge; colliding items are counted together, which can only hide drift,
  never invent it): PSI and Jensen-Shannon distance of the candidate's exposure against the
  champion's, and the popularity lift (the mean champion exposure share of the items each arm
  shows, candidate over champion: above 1 the candidate leans on what is already shown most);
* catalogue coverage -- distinct items each arm showed (a bottom-k sketch, exact below
  ``DISTINCT_SKETCH`` items), as a share of the items either arm showed, and their ratio;
* the largest exposure jump -- per item, the share of requests whose candidate list shows it
  minus the share whose champion list does, for the items shown most (Misra-Gries summaries
  of ``HEAVY_HITTERS`` items per arm, mergeable; counts exact while a window shows fewer
  distinct items, else low by at most pairs x k / (capacity + 1)).

**Labels** (multiclass labels, or regression bands): the paired confusion table (labels
beyond ``MAX_LABELS`` pooled as ``(other)``), agreement rate, per-label decision-rate ratios
with paired intervals, the most extreme of them, and the PSI of the label distribution.

**Regression values**: the paired differences' mean with an interval, the share of pairs
differing by more than ``tolerance_abs + tolerance_rel * |champion|`` (Wilson), both arms'
value histograms (``asinh``-spaced, about 5% relative resolution from 1e-3 to 1e12) for
quantiles, their differences, PSI (over the champion's deciles) and binned KS. Values beyond
``VALUE_LIMIT`` in magnitude are clamped to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from .stats import (
    Figure,
    PairedTable,
    insufficient,
    js_distance,
    ks_binned,
    paired_ratio,
    psi,
    wilson,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]
UInt64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]

#: Ranks compared per list (deeper items are left out of the ranking figures).
RANK_DEPTH = 100
EXPOSURE_BUCKETS = 1024
DISTINCT_SKETCH = 1024
HEAVY_HITTERS = 512
#: Distinct labels per arm and window; the rest are pooled.
MAX_LABELS = 64
OTHER_LABEL = "(other)"
#: Rank-biased overlap persistence: the top 10 ranks carry ~86% of the weight.
RBO_P = 0.9
#: Regression value histogram: ``asinh(x / VALUE_SCALE)`` in ``VALUE_BINS`` equal bins.
VALUE_SCALE = 1e-3
VALUE_BINS = 1024
#: Regression values beyond this magnitude are clamped to it.
VALUE_LIMIT = 1e100
_VALUE_SPAN = math.asinh(1e15)
#: A label needs this many paired requests on either arm for the extreme-ratio figure.
MIN_LABEL_COUNT = 20


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True, slots=True)
class KindArm:
    """One arm's non-binary outputs of a batch, as columns."""

    #: Per row, an index into ``label_names`` (-1: none).
    label: Int32Array
    label_names: tuple[str, ...]
    #: Regression value (NaN: none).
    value: FloatArray
    #: ``(n, depth)`` item-id hashes, 0 past each row's ``item_count`` (0: no ranking).
    items: UInt64Array
    item_count: Int32Array
    #: The names behind the hashes (flat, row-major over the non-empty slots) -- only used
    #: for the items that become heavy hitters.
    item_names: tuple[list[str], UInt64Array] | None = None

    def take(self, idx: npt.NDArray[np.intp] | IntArray) -> KindArm:
        names = None
        if self.item_names is not None:  # keep the names of the rows kept
            flat_names, flat_hashes = self.item_names
            keep = np.zeros(self.item_count.size, dtype=np.bool_)
            keep[idx] = True
            slot_row = np.repeat(np.arange(self.item_count.size), self.item_count)
            chosen = np.flatnonzero(keep[slot_row])
            names = ([flat_names[i] for i in chosen.tolist()], flat_hashes[chosen])
        return KindArm(
            self.label[idx],
            self.label_names,
            self.value[idx],
            self.items[idx],
            self.item_count[idx],
            names,
        )


@dataclass(frozen=True, slots=True)
class KindColumns:
    champion: KindArm
    candidate: KindArm

    def take(self, idx: npt.NDArray[np.intp] | IntArray) -> KindColumns:
        return KindColumns(self.champion.take(idx), self.candidate.take(idx))


def kind_arm(
    labels: Sequence[str | None],
    values: Sequence[float | None],
    items: Sequence[Sequence[str] | None],
    hash_strings: Callable[[Sequence[str]], UInt64Array],
) -> KindArm:
    """Columns of one arm's labels, values and item lists (``hash_strings``: the batch
    module's vectorised string hash, passed in to avoid an import cycle)."""
    n = len(labels)
    label = np.full(n, -1, dtype=np.int32)
    names: dict[str, int] = {}
    if labels.count(None) != n:
        for i, x in enumerate(labels):
            if x is not None:
                label[i] = names.setdefault(x, len(names))
    value = np.full(n, np.nan)
    if values.count(None) != n:
        value = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    counts = np.fromiter(
        (0 if r is None else min(len(r), RANK_DEPTH) for r in items), dtype=np.int32, count=n
    )
    depth = int(counts.max()) if n else 0
    matrix = np.zeros((n, depth), dtype=np.uint64)
    flat: list[str] = []
    hashes = np.zeros(0, dtype=np.uint64)
    if depth:
        for r in items:
            if r:
                flat.extend(r[:RANK_DEPTH])
        hashes = hash_strings(flat)
        hashes = np.where(hashes == 0, np.uint64(1), hashes)  # 0 marks an empty slot
        mask = np.arange(depth) < counts[:, None]
        matrix[mask] = hashes
    return KindArm(label, tuple(names), value, matrix, counts, (flat, hashes) if depth else None)


# --------------------------------------------------------------------------- sketches


class DistinctSketch:
    """Bottom-k of 64-bit hashes: distinct count exact up to ``capacity``, estimated above;
    merges exactly (the union's bottom-k)."""

    __slots__ = ("capacity", "keys")

    def __init__(self, capacity: int = DISTINCT_SKETCH) -> None:
        self.capacity = capacity
        self.keys: UInt64Array = np.zeros(0, dtype=np.uint64)

    def add(self, hashes: UInt64Array) -> None:
        if hashes.size:
            self.keys = np.unique(np.concatenate([self.keys, _mix(hashes)]))[: self.capacity]

    def merge(self, other: DistinctSketch) -> DistinctSketch:
        self.keys = np.unique(np.concatenate([self.keys, other.keys]))[: self.capacity]
        return self

    def estimate(self) -> float:
        if self.keys.size < self.capacity:
            return float(self.keys.size)
        return (self.capacity - 1) / (float(self.keys[-1]) / 2.0**64)


def _mix(h: UInt64Array) -> UInt64Array:
    """A second, independent mix of item hashes (bucket = low bits of the first)."""
    with np.errstate(over="ignore"):
        x = h * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(29)
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        return x ^ (x >> np.uint64(32))


class HeavyHitters:
    """A Misra-Gries summary of item hashes (mergeable: Agarwal et al. 2012), with names."""

    __slots__ = ("capacity", "counts", "keys", "names")

    def __init__(self, capacity: int = HEAVY_HITTERS) -> None:
        self.capacity = capacity
        self.keys: UInt64Array = np.zeros(0, dtype=np.uint64)
        self.counts: IntArray = np.zeros(0, dtype=np.int64)
        self.names: dict[int, str] = {}

    def add(self, hashes: UInt64Array, names: list[str] | None = None) -> None:
        if not hashes.size:
            return
        keys, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        new_names: dict[int, str] = {}
        if names is not None:
            fresh = ~np.isin(keys, self.keys)
            for k, i in zip(keys[fresh].tolist(), first[fresh].tolist(), strict=True):
                new_names[k] = names[i]
        self._combine(keys, counts.astype(np.int64), new_names)

    def merge(self, other: HeavyHitters) -> HeavyHitters:
        self._combine(other.keys, other.counts, other.names)
        return self

    def _combine(self, keys: UInt64Array, counts: IntArray, names: dict[int, str]) -> None:
        all_keys = np.concatenate([self.keys, keys])
        uniq, inv = np.unique(all_keys, return_inverse=True)
        summed = np.bincount(inv, weights=np.concatenate([self.counts, counts]))
        summed = summed.astype(np.int64)
        if uniq.size > self.capacity:
            cut = int(np.partition(summed, uniq.size - self.capacity - 1)[-self.capacity - 1])
            summed = summed - cut
            keep = summed > 0
            uniq, summed = uniq[keep], summed[keep]
        self.keys, self.counts = uniq, summed
        merged = {**names, **self.names}
        self.names = {k: merged[k] for k in uniq.tolist() if k in merged}

    def count_of(self, keys: UInt64Array) -> IntArray:
        """Summary counts of ``keys`` (0 for keys not held)."""
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, max(self.keys.size - 1, 0))
        found = self.keys.size > 0
        hit = (self.keys[pos] == keys) if found else np.zeros(keys.size, dtype=np.bool_)
        return np.where(hit, self.counts[pos] if found else 0, 0).astype(np.int64)


# --------------------------------------------------------------------------- rankings


def _rank_figures(
    c: UInt64Array, k: UInt64Array, cc: Int32Array, kc: Int32Array, p: float
) -> tuple[FloatArray, FloatArray, FloatArray, BoolArray, FloatArray, BoolArray, BoolArray]:
    """Per pair: overlap@k, RBO, Kendall tau (valid mask), top-item position (absent = k),
    top kept, top dropped. Vectorised over ``(rows, ranks, ranks)``."""
    n = c.shape[0]
    dc, dk = c.shape[1], k.shape[1]
    eq = (c[:, :, None] == k[:, None, :]) & (c[:, :, None] != 0)
    depth = np.maximum(cc, kc).astype(np.int64)
    d = max(dc, dk)
    if dc < d:
        eq = np.concatenate([eq, np.zeros((n, d - dc, dk), dtype=np.bool_)], axis=1)
    if dk < d:
        eq = np.concatenate([eq, np.zeros((n, d, d - dk), dtype=np.bool_)], axis=2)
    cum = eq.cumsum(axis=1, dtype=np.int32).cumsum(axis=2, dtype=np.int32)
    ranks = np.arange(d)
    x = cum[:, ranks, ranks].astype(np.float64)  # X_d: shared items within depth d + 1
    last = np.maximum(depth - 1, 0)
    shared = x[np.arange(n), last]
    overlap = shared / np.maximum(depth, 1)
    agree = x / (ranks + 1.0)
    weights = (1.0 - p) / p * p ** (ranks + 1.0)
    within = ranks[None, :] < depth[:, None]
    rbo = (agree * weights * within).sum(axis=1) + agree[np.arange(n), last] * p**depth
    rbo = np.clip(rbo, 0.0, 1.0)
    # Kendall's tau-a over the shared items: positions in the candidate's list, pairs in
    # the champion's order.
    in_k = eq.any(axis=2)
    pos_k = eq.argmax(axis=2)
    upper = ranks[:, None] < ranks[None, :]
    both = in_k[:, :, None] & in_k[:, None, :] & upper[None, :, :]
    conc = np.count_nonzero(both & (pos_k[:, :, None] < pos_k[:, None, :]), axis=(1, 2))
    disc = np.count_nonzero(both & (pos_k[:, :, None] > pos_k[:, None, :]), axis=(1, 2))
    pairs = conc + disc
    tau_ok = pairs > 0
    tau = np.where(tau_ok, (conc - disc) / np.maximum(pairs, 1), 0.0)
    top_in = in_k[:, 0] & (cc > 0)
    top_pos = np.where(top_in, pos_k[:, 0], depth).astype(np.float64)
    kept = top_in & (pos_k[:, 0] == 0)
    dropped = ~top_in & (cc > 0)
    return overlap, rbo, tau, tau_ok, top_pos, kept, dropped


class RankingReport(msgspec.Struct, frozen=True, kw_only=True):
    """Both arms' rankings of the same requests (see :mod:`sidecar.aggregate.kinds`)."""

    pairs: int
    #: Longest list compared.
    k: int
    overlap: Figure
    rbo: Figure
    kendall_tau: Figure
    top_item_kept: Figure
    top_item_dropped: Figure
    top_item_position_change: Figure
    exposure_psi: Figure
    exposure_js: Figure
    popularity_lift: Figure
    champion_distinct_items: Figure
    candidate_distinct_items: Figure
    champion_coverage: Figure
    candidate_coverage: Figure
    coverage_ratio: Figure
    #: The item whose exposure rose most (candidate share of requests minus champion's),
    #: with Wilson-bound differences (conservative).
    top_exposure_jump: Figure
    top_exposure_jump_item: str | None = None
    #: The items each arm showed most: item -> share of requests.
    champion_top_items: dict[str, float] = {}
    candidate_top_items: dict[str, float] = {}


class RankingPartial(msgspec.Struct, frozen=True, kw_only=True):
    """A ``RankingState`` on the wire (per-partition window partials)."""

    sums: list[float]
    champion_exposure: dict[int, int]
    candidate_exposure: dict[int, int]
    champion_distinct: list[int]
    candidate_distinct: list[int]
    champion_heavy: list[tuple[int, int, str]]
    candidate_heavy: list[tuple[int, int, str]]


#: ``RankingState.sums`` layout.
_SUMS = (
    "pairs",
    "overlap",
    "overlap_sq",
    "rbo",
    "rbo_sq",
    "tau",
    "tau_sq",
    "tau_n",
    "top_pos_change",
    "top_pos_change_sq",
    "top_n",
    "kept",
    "dropped",
    "depth_max",
)
_S = {name: i for i, name in enumerate(_SUMS)}


class RankingState:
    __slots__ = (
        "candidate_distinct",
        "candidate_exposure",
        "candidate_heavy",
        "champion_distinct",
        "champion_exposure",
        "champion_heavy",
        "p",
        "sums",
    )

    def __init__(self, p: float = RBO_P) -> None:
        self.p = p
        self.sums: FloatArray = np.zeros(len(_SUMS))
        self.champion_exposure: IntArray = np.zeros(EXPOSURE_BUCKETS, dtype=np.int64)
        self.candidate_exposure: IntArray = np.zeros(EXPOSURE_BUCKETS, dtype=np.int64)
        self.champion_distinct = DistinctSketch()
        self.candidate_distinct = DistinctSketch()
        self.champion_heavy = HeavyHitters()
        self.candidate_heavy = HeavyHitters()

    def add(self, champion: KindArm, candidate: KindArm) -> None:
        pair = (champion.item_count > 0) & (candidate.item_count > 0)
        if not pair.any():
            return
        rows = np.flatnonzero(pair)
        c, k = champion.items[rows], candidate.items[rows]
        cc, kc = champion.item_count[rows], candidate.item_count[rows]
        s = self.sums
        # Chunks of rows keep the (rows, ranks, ranks) arrays small whatever the depth.
        step = max(1, 2_000_000 // max(c.shape[1] * k.shape[1], 1))
        for lo in range(0, rows.size, step):
            hi = lo + step
            ov, rbo, tau, tau_ok, top_pos, kept, dropped = _rank_figures(
                c[lo:hi], k[lo:hi], cc[lo:hi], kc[lo:hi], self.p
            )
            top = cc[lo:hi] > 0
            s[_S["overlap"]] += ov.sum()
            s[_S["overlap_sq"]] += (ov * ov).sum()
            s[_S["rbo"]] += rbo.sum()
            s[_S["rbo_sq"]] += (rbo * rbo).sum()
            s[_S["tau"]] += tau[tau_ok].sum()
            s[_S["tau_sq"]] += (tau[tau_ok] ** 2).sum()
            s[_S["tau_n"]] += np.count_nonzero(tau_ok)
            s[_S["top_pos_change"]] += top_pos[top].sum()
            s[_S["top_pos_change_sq"]] += (top_pos[top] ** 2).sum()
            s[_S["top_n"]] += np.count_nonzero(top)
            s[_S["kept"]] += np.count_nonzero(kept)
            s[_S["dropped"]] += np.count_nonzero(dropped)
        s[_S["pairs"]] += rows.size
        s[_S["depth_max"]] = max(s[_S["depth_max"]], float(max(cc.max(), kc.max())))
        for arm, exposure, distinct, heavy in (
            (champion, self.champion_exposure, self.champion_distinct, self.champion_heavy),
            (candidate, self.candidate_exposure, self.candidate_distinct, self.candidate_heavy),
        ):
            flat = arm.items[rows]
            flat = flat[flat != 0]
            exposure += np.bincount(
                (flat % np.uint64(EXPOSURE_BUCKETS)).astype(np.int64), minlength=EXPOSURE_BUCKETS
            )
            distinct.add(flat)
            names = None
            if arm.item_names is not None:
                all_names = arm.item_names[0]
                if rows.size == arm.item_count.size:
                    names = all_names
                else:  # the names of the paired rows' slots, in the same order as ``flat``
                    kept_arm = arm.take(rows)
                    names = kept_arm.item_names[0] if kept_arm.item_names else None
            heavy.add(flat, names)

    def merge(self, other: RankingState) -> RankingState:
        depth = max(self.sums[_S["depth_max"]], other.sums[_S["depth_max"]])
        self.sums += other.sums
        self.sums[_S["depth_max"]] = depth
        self.champion_exposure += other.champion_exposure
        self.candidate_exposure += other.candidate_exposure
        self.champion_distinct.merge(other.champion_distinct)
        self.candidate_distinct.merge(other.candidate_distinct)
        self.champion_heavy.merge(other.champion_heavy)
        self.candidate_heavy.merge(other.candidate_heavy)
        return self

    def to_wire(self) -> RankingPartial:
        def sparse(x: IntArray) -> dict[int, int]:
            nz = np.flatnonzero(x)
            return dict(zip(nz.tolist(), x[nz].tolist(), strict=True))

        def heavy(h: HeavyHitters) -> list[tuple[int, int, str]]:
            return [
                (k, c, h.names.get(k, ""))
                for k, c in zip(h.keys.tolist(), h.counts.tolist(), strict=True)
            ]

        return RankingPartial(
            sums=self.sums.tolist(),
            champion_exposure=sparse(self.champion_exposure),
            candidate_exposure=sparse(self.candidate_exposure),
            champion_distinct=self.champion_distinct.keys.tolist(),
            candidate_distinct=self.candidate_distinct.keys.tolist(),
            champion_heavy=heavy(self.champion_heavy),
            candidate_heavy=heavy(self.candidate_heavy),
        )

    @classmethod
    def from_wire(cls, part: RankingPartial) -> RankingState:
        out = cls()
        if len(part.sums) != len(_SUMS):
            raise ValueError("ranking partial has another layout than this aggregator")
        out.sums[:] = part.sums
        for dest, src in (
            (out.champion_exposure, part.champion_exposure),
            (out.candidate_exposure, part.candidate_exposure),
        ):
            if any(not 0 <= b < EXPOSURE_BUCKETS for b in src):
                raise ValueError("ranking partial has exposure buckets this aggregator lacks")
            dest[list(src)] = list(src.values())
        out.champion_distinct.add(np.zeros(0, dtype=np.uint64))
        out.champion_distinct.keys = np.unique(np.asarray(part.champion_distinct, dtype=np.uint64))[
            :DISTINCT_SKETCH
        ]
        out.candidate_distinct.keys = np.unique(
            np.asarray(part.candidate_distinct, dtype=np.uint64)
        )[:DISTINCT_SKETCH]
        for heavy, rows in (
            (out.champion_heavy, part.champion_heavy),
            (out.candidate_heavy, part.candidate_heavy),
        ):
            keys = np.asarray([r[0] for r in rows], dtype=np.uint64)
            counts = np.asarray([r[1] for r in rows], dtype=np.int64)
            heavy._combine(keys, counts, {r[0]: r[2][:256] for r in rows})
        return out

    def report(self, *, z: float, min_pairs: int) -> RankingReport:
        s = self.sums
        n = int(s[_S["pairs"]])
        k = int(s[_S["depth_max"]])
        if n < max(min_pairs, 1):
            none: dict[str, Any] = {
                f: insufficient(n) for f in RankingReport.__struct_fields__ if f not in _NOT_FIGURES
            }
            return RankingReport(pairs=n, k=k, **none)
        tau_n = s[_S["tau_n"]]
        top_n = s[_S["top_n"]]
        ce, ke = self.champion_exposure, self.candidate_exposure
        shares = ce / max(ce.sum(), 1)
        arp_c = float((ce * shares).sum() / max(ce.sum(), 1))
        arp_k = float((ke * shares).sum() / max(ke.sum(), 1))
        union = DistinctSketch()
        union.merge(self.champion_distinct).merge(self.candidate_distinct)
        dc, dk, du = (
            self.champion_distinct.estimate(),
            self.candidate_distinct.estimate(),
            max(union.estimate(), 1.0),
        )
        jump, jump_item = self._jump(n, z)
        return RankingReport(
            pairs=n,
            k=k,
            overlap=_mean(s[_S["overlap"]], s[_S["overlap_sq"]], n, z, 0.0, 1.0),
            rbo=_mean(s[_S["rbo"]], s[_S["rbo_sq"]], n, z, 0.0, 1.0),
            kendall_tau=(
                _mean(s[_S["tau"]], s[_S["tau_sq"]], tau_n, z, -1.0, 1.0)
                if tau_n >= 1
                else insufficient(0, "no_shared_pairs")
            ),
            top_item_kept=wilson(int(s[_S["kept"]]), int(top_n), z=z),
            top_item_dropped=wilson(int(s[_S["dropped"]]), int(top_n), z=z),
            top_item_position_change=_mean(
                s[_S["top_pos_change"]], s[_S["top_pos_change_sq"]], top_n, z, 0.0, float(k)
            ),
            exposure_psi=psi(ce, ke, min_count=1),
            exposure_js=js_distance(ce, ke, min_count=1),
            popularity_lift=(
                Figure(value=arp_k / arp_c, n=n) if arp_c > 0 else insufficient(n, "no_exposure")
            ),
            champion_distinct_items=Figure(value=dc, n=n),
            candidate_distinct_items=Figure(value=dk, n=n),
            champion_coverage=Figure(value=min(dc / du, 1.0), n=n),
            candidate_coverage=Figure(value=min(dk / du, 1.0), n=n),
            coverage_ratio=Figure(value=dk / dc, n=n) if dc > 0 else insufficient(n),
            top_exposure_jump=jump,
            top_exposure_jump_item=jump_item,
            champion_top_items=_top_items(self.champion_heavy, n),
            candidate_top_items=_top_items(self.candidate_heavy, n),
        )

    def _jump(self, n: int, z: float) -> tuple[Figure, str | None]:
        heavy_k, heavy_c = self.candidate_heavy, self.champion_heavy
        if not heavy_k.keys.size:
            return Figure(value=0.0, n=n), None
        kc = heavy_k.counts
        cc = heavy_c.count_of(heavy_k.keys)
        diff = (kc - cc) / n
        best = int(np.argmax(diff))
        a, b = int(kc[best]), int(cc[best])
        lo_k, hi_k = _wilson_pair(a, n, z)
        lo_c, hi_c = _wilson_pair(b, n, z)
        item = heavy_k.names.get(int(heavy_k.keys[best]))
        fig = Figure(value=float(diff[best]), lo=lo_k - hi_c, hi=hi_k - lo_c, n=n)
        return fig, item


_NOT_FIGURES = frozenset(
    {"pairs", "k", "top_exposure_jump_item", "champion_top_items", "candidate_top_items"}
)


def _wilson_pair(k: int, n: int, z: float) -> tuple[float, float]:
    f = wilson(min(k, n), n, z=z)
    return (f.lo or 0.0, f.hi or 0.0)


def _top_items(heavy: HeavyHitters, n: int, top: int = 5) -> dict[str, float]:
    if not heavy.keys.size:
        return {}
    order = np.argsort(-heavy.counts, kind="stable")[:top]
    return {
        heavy.names.get(int(heavy.keys[i]), f"#{int(heavy.keys[i]):x}"): round(
            float(heavy.counts[i]) / n, 6
        )
        for i in order.tolist()
    }


def _mean(total: float, squares: float, n: float, z: float, lo: float, hi: float) -> Figure:
    """Mean of per-request values from their sum and sum of squares, normal 95% interval."""
    if n < 1:
        return insufficient(0)
    total, squares, n = float(total), float(squares), float(n)
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
    half = z * math.sqrt(var / n)
    return Figure(value=mean, lo=max(lo, mean - half), hi=min(hi, mean + half), n=int(n))


# --------------------------------------------------------------------------- labels


class LabelRate(msgspec.Struct, frozen=True, kw_only=True):
    """One label's paired decision rates: candidate / champion share of the same requests."""

    label: str
    champion: int
    candidate: int
    ratio: Figure


class ConfusionCell(msgspec.Struct, frozen=True, kw_only=True):
    champion: str
    candidate: str
    count: int


class LabelReport(msgspec.Struct, frozen=True, kw_only=True):
    """Both arms' labels on the same requests (multiclass, or regression bands)."""

    pairs: int
    agreement: Figure
    psi: Figure
    #: The label whose rate moved most (largest |log ratio|, labels with enough requests).
    rate_ratio_extreme: Figure
    rate_ratio_extreme_label: str | None = None
    rates: list[LabelRate] = []
    confusion: list[ConfusionCell] = []


class LabelState:
    """The paired confusion table, keyed by label names (bounded)."""

    __slots__ = ("candidate_labels", "cells", "champion_labels")

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], int] = {}
        self.champion_labels: set[str] = set()
        self.candidate_labels: set[str] = set()

    def _name(self, seen: set[str], name: str) -> str:
        if name in seen:
            return name
        if len(seen) >= MAX_LABELS:
            return OTHER_LABEL
        seen.add(name)
        return name

    def add(self, champion: KindArm, candidate: KindArm) -> None:
        both = (champion.label >= 0) & (candidate.label >= 0)
        if not both.any():
            return
        width = max(len(candidate.label_names), 1)
        code = champion.label[both].astype(np.int64) * width + candidate.label[both]
        uniq, counts = np.unique(code, return_counts=True)
        for u, count in zip(uniq.tolist(), counts.tolist(), strict=True):
            self._add(champion.label_names[u // width], candidate.label_names[u % width], count)

    def _add(self, a: str, b: str, count: int) -> None:
        key = (self._name(self.champion_labels, a), self._name(self.candidate_labels, b))
        self.cells[key] = self.cells.get(key, 0) + count

    def merge(self, other: LabelState) -> LabelState:
        for (a, b), count in other.cells.items():
            self._add(a, b, count)
        return self

    def to_wire(self) -> list[ConfusionCell]:
        return [ConfusionCell(champion=a, candidate=b, count=c) for (a, b), c in self.cells.items()]

    @classmethod
    def from_wire(cls, cells: list[ConfusionCell]) -> LabelState:
        out = cls()
        for cell in cells:
            out._add(cell.champion[:256], cell.candidate[:256], max(cell.count, 0))
        return out

    def report(self, *, z: float, min_pairs: int) -> LabelReport:
        n = sum(self.cells.values())
        confusion = [
            ConfusionCell(champion=a, candidate=b, count=c)
            for (a, b), c in sorted(self.cells.items())
        ]
        if n < max(min_pairs, 1):
            none = insufficient(n)
            return LabelReport(
                pairs=n, agreement=none, psi=none, rate_ratio_extreme=none, confusion=confusion
            )
        agree = sum(c for (a, b), c in self.cells.items() if a == b)
        labels = sorted(self.champion_labels | self.candidate_labels)
        champ = {x: 0 for x in labels}
        cand = {x: 0 for x in labels}
        for (a, b), c in self.cells.items():
            champ[a] = champ.get(a, 0) + c
            cand[b] = cand.get(b, 0) + c
        rates = []
        extreme: tuple[float, LabelRate] | None = None
        for x in labels:
            both = self.cells.get((x, x), 0)
            table = PairedTable(
                both_yes=both,
                champion_only=champ[x] - both,
                candidate_only=cand[x] - both,
                both_no=n - champ[x] - cand[x] + both,
            )
            rate = LabelRate(
                label=x,
                champion=champ[x],
                candidate=cand[x],
                ratio=paired_ratio(table, z=z, min_count=min_pairs),
            )
            rates.append(rate)
            if rate.ratio.value and max(champ[x], cand[x]) >= MIN_LABEL_COUNT:
                size = abs(math.log(rate.ratio.value))
                if extreme is None or size > extreme[0]:
                    extreme = (size, rate)
        return LabelReport(
            pairs=n,
            agreement=wilson(agree, n, z=z),
            psi=psi([champ[x] for x in labels], [cand[x] for x in labels], min_count=1),
            rate_ratio_extreme=extreme[1].ratio if extreme else insufficient(n),
            rate_ratio_extreme_label=extreme[1].label if extreme else None,
            rates=rates,
            confusion=confusion,
        )


# --------------------------------------------------------------------------- regression


def _value_bins(x: FloatArray) -> IntArray:
    t = np.arcsinh(x / VALUE_SCALE) / _VALUE_SPAN  # in about [-1, 1]
    return np.clip(((t + 1.0) / 2.0 * VALUE_BINS).astype(np.int64), 0, VALUE_BINS - 1)


def _bin_value(b: int) -> float:
    t = (b + 0.5) / VALUE_BINS * 2.0 - 1.0
    return float(np.sinh(t * _VALUE_SPAN) * VALUE_SCALE)


class RegressionReport(msgspec.Struct, frozen=True, kw_only=True):
    """Both arms' numbers on the same requests."""

    pairs: int
    #: Candidate minus champion, mean over pairs with a 95% interval.
    mean_diff: Figure
    mean_abs_diff: Figure
    #: Share of pairs differing by more than ``tolerance_abs + tolerance_rel * |champion|``.
    diff_share: Figure
    tolerance_abs: float
    tolerance_rel: float
    champion_p10: Figure
    champion_p50: Figure
    champion_p90: Figure
    candidate_p10: Figure
    candidate_p50: Figure
    candidate_p90: Figure
    #: Candidate minus champion quantiles (about 5% relative resolution).
    p10_diff: Figure
    p50_diff: Figure
    p90_diff: Figure
    #: Of the output distributions: PSI over the champion's deciles, binned KS.
    psi: Figure
    ks: Figure


class RegressionPartial(msgspec.Struct, frozen=True, kw_only=True):
    sums: list[float]
    champion_bins: dict[int, int]
    candidate_bins: dict[int, int]


class RegressionState:
    __slots__ = ("candidate", "champion", "sums", "tolerance_abs", "tolerance_rel")

    def __init__(self, tolerance_abs: float = 0.0, tolerance_rel: float = 0.1) -> None:
        self.tolerance_abs, self.tolerance_rel = tolerance_abs, tolerance_rel
        #: pairs, sum d, sum d^2, sum |d|, sum |d|^2 (same), beyond tolerance
        self.sums: FloatArray = np.zeros(5)
        self.champion: IntArray = np.zeros(VALUE_BINS, dtype=np.int64)
        self.candidate: IntArray = np.zeros(VALUE_BINS, dtype=np.int64)

    def add(self, champion: KindArm, candidate: KindArm) -> None:
        a, b = champion.value, candidate.value
        both = np.isfinite(a) & np.isfinite(b)
        if not both.any():
            return
        # Clamped so that squares and sums stay finite (the report and the partials must
        # encode; a hostile or broken model may send 1e308).
        a = np.clip(a[both], -VALUE_LIMIT, VALUE_LIMIT)
        b = np.clip(b[both], -VALUE_LIMIT, VALUE_LIMIT)
        d = b - a
        ad = np.abs(d)
        beyond = ad > self.tolerance_abs + self.tolerance_rel * np.abs(a)
        self.sums += np.array(
            [a.size, d.sum(), (d * d).sum(), ad.sum(), np.count_nonzero(beyond)], dtype=np.float64
        )
        self.champion += np.bincount(_value_bins(a), minlength=VALUE_BINS)
        self.candidate += np.bincount(_value_bins(b), minlength=VALUE_BINS)

    def merge(self, other: RegressionState) -> RegressionState:
        self.sums += other.sums
        self.champion += other.champion
        self.candidate += other.candidate
        return self

    def to_wire(self) -> RegressionPartial:
        def sparse(x: IntArray) -> dict[int, int]:
            nz = np.flatnonzero(x)
            return dict(zip(nz.tolist(), x[nz].tolist(), strict=True))

        return RegressionPartial(
            sums=self.sums.tolist(),
            champion_bins=sparse(self.champion),
            candidate_bins=sparse(self.candidate),
        )

    @classmethod
    def from_wire(
        cls, part: RegressionPartial, tolerance_abs: float, tolerance_rel: float
    ) -> RegressionState:
        out = cls(tolerance_abs, tolerance_rel)
        if len(part.sums) != out.sums.size:
            raise ValueError("regression partial has another layout than this aggregator")
        out.sums[:] = part.sums
        for dest, src in ((out.champion, part.champion_bins), (out.candidate, part.candidate_bins)):
            if any(not 0 <= b < VALUE_BINS for b in src):
                raise ValueError("regression partial has bins this aggregator lacks")
            dest[list(src)] = list(src.values())
        return out

    def _quantile(self, counts: IntArray, q: float) -> float:
        n = int(counts.sum())
        rank = max(1, math.ceil(q * n))
        return _bin_value(int(np.searchsorted(np.cumsum(counts), rank)))

    def report(self, *, z: float, min_pairs: int) -> RegressionReport:
        n_f, sd, sd2, sad, beyond = self.sums.tolist()
        n = int(n_f)
        tol: dict[str, Any] = {
            "tolerance_abs": self.tolerance_abs,
            "tolerance_rel": self.tolerance_rel,
        }
        if n < max(min_pairs, 1):
            none_fig = insufficient(n)
            empty: dict[str, Any] = {
                f: none_fig
                for f in RegressionReport.__struct_fields__
                if f not in ("pairs", "tolerance_abs", "tolerance_rel")
            }
            return RegressionReport(pairs=n, **tol, **empty)
        q: dict[str, Any] = {}
        for arm, counts in (("champion", self.champion), ("candidate", self.candidate)):
            for p in (10, 50, 90):
                q[f"{arm}_p{p}"] = Figure(value=self._quantile(counts, p / 100), n=n)
        for p in (10, 50, 90):
            a, b = q[f"champion_p{p}"].value, q[f"candidate_p{p}"].value
            assert a is not None and b is not None
            q[f"p{p}_diff"] = Figure(value=b - a, n=n)
        # PSI over the champion's deciles: fine bins grouped where its CDF crosses tenths.
        cum = np.cumsum(self.champion) / n
        group = np.minimum((cum * 10).astype(np.int64), 9)
        group = np.maximum.accumulate(group)
        champ_g = np.bincount(group, weights=self.champion, minlength=10)
        cand_g = np.bincount(group, weights=self.candidate, minlength=10)
        return RegressionReport(
            pairs=n,
            mean_diff=_mean(sd, sd2, n, z, -math.inf, math.inf),
            mean_abs_diff=Figure(value=sad / n, n=n),
            diff_share=wilson(int(beyond), n, z=z),
            **tol,
            **q,
            psi=psi(champ_g, cand_g, min_count=1),
            ks=ks_binned(self.champion, self.candidate, min_count=1),
        )


# --------------------------------------------------------------------------- window state


class KindsPartial(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    ranking: RankingPartial | None = None
    labels: list[ConfusionCell] | None = None
    regression: RegressionPartial | None = None


class KindState:
    """A window's non-binary state; parts are created by the first batch that needs them."""

    __slots__ = ("labels", "ranking", "rbo_p", "regression", "tolerance_abs", "tolerance_rel")

    def __init__(
        self, rbo_p: float = RBO_P, tolerance_abs: float = 0.0, tolerance_rel: float = 0.1
    ) -> None:
        self.rbo_p, self.tolerance_abs, self.tolerance_rel = rbo_p, tolerance_abs, tolerance_rel
        self.ranking: RankingState | None = None
        self.labels: LabelState | None = None
        self.regression: RegressionState | None = None

    def add(self, cols: KindColumns) -> None:
        c, k = cols.champion, cols.candidate
        if c.items.shape[1] and k.items.shape[1]:
            if self.ranking is None:
                self.ranking = RankingState(self.rbo_p)
            self.ranking.add(c, k)
        if c.label_names and k.label_names:
            if self.labels is None:
                self.labels = LabelState()
            self.labels.add(c, k)
        if np.isfinite(c.value).any() and np.isfinite(k.value).any():
            if self.regression is None:
                self.regression = RegressionState(self.tolerance_abs, self.tolerance_rel)
            self.regression.add(c, k)

    def merge(self, other: KindState) -> KindState:
        if other.ranking is not None:
            self.ranking = (
                other.ranking if self.ranking is None else self.ranking.merge(other.ranking)
            )
        if other.labels is not None:
            self.labels = other.labels if self.labels is None else self.labels.merge(other.labels)
        if other.regression is not None:
            self.regression = (
                other.regression
                if self.regression is None
                else self.regression.merge(other.regression)
            )
        return self

    def to_wire(self) -> KindsPartial:
        return KindsPartial(
            ranking=None if self.ranking is None else self.ranking.to_wire(),
            labels=None if self.labels is None else self.labels.to_wire(),
            regression=None if self.regression is None else self.regression.to_wire(),
        )

    def load(self, part: KindsPartial) -> KindState:
        if part.ranking is not None:
            self.ranking = RankingState.from_wire(part.ranking)
            self.ranking.p = self.rbo_p
        if part.labels is not None:
            self.labels = LabelState.from_wire(part.labels)
        if part.regression is not None:
            self.regression = RegressionState.from_wire(
                part.regression, self.tolerance_abs, self.tolerance_rel
            )
        return self


__all__ = [
    "EXPOSURE_BUCKETS",
    "RANK_DEPTH",
    "ConfusionCell",
    "DistinctSketch",
    "HeavyHitters",
    "KindArm",
    "KindColumns",
    "KindState",
    "KindsPartial",
    "LabelReport",
    "LabelState",
    "RankingReport",
    "RankingState",
    "RegressionReport",
    "RegressionState",
    "kind_arm",
]
