"""Event-time windows, watermarks and bounded-memory request dedupe (pure logic, no clocks).

Wall-clock time is always passed in (``now_ms``); nothing here reads a clock, so the whole
module is deterministic and replayable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]
UInt64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


class WindowSpec:
    """Tumbling (``step_ms`` None or == size) or hopping event-time windows.

    Window starts are ``origin_ms + k * step_ms``; a window covers ``[start, start + size)``.
    A window closes once the watermark reaches ``end + grace_ms``.
    """

    __slots__ = ("grace_ms", "origin_ms", "size_ms", "step_ms")

    def __init__(
        self, size_ms: int, step_ms: int | None = None, *, origin_ms: int = 0, grace_ms: int = 0
    ) -> None:
        step = size_ms if step_ms is None else step_ms
        if size_ms <= 0 or step <= 0 or step > size_ms or grace_ms < 0:
            raise ValueError("need size_ms > 0, 0 < step_ms <= size_ms, grace_ms >= 0")
        self.size_ms = size_ms
        self.step_ms = step
        self.origin_ms = origin_ms
        self.grace_ms = grace_ms

    @property
    def per_record(self) -> int:
        """Maximum number of windows one timestamp belongs to."""
        return math.ceil(self.size_ms / self.step_ms)

    def windows_for(self, ts_ms: int) -> list[int]:
        """Starts of every window containing ``ts_ms``, oldest first."""
        _, starts = self.assign(np.array([ts_ms], dtype=np.int64))
        return [int(s) for s in starts[::-1]]

    def assign(self, ts_ms: Int64Array) -> tuple[Int64Array, Int64Array]:
        """Vectorised ``windows_for``: (record index, window start) pairs, one per membership."""
        ts = np.asarray(ts_ms, dtype=np.int64)
        last = ts - (ts - self.origin_ms) % self.step_ms  # floor-aligned, also for ts < origin
        if self.per_record == 1:
            return np.arange(ts.size, dtype=np.int64), last
        idx_parts: list[Int64Array] = []
        start_parts: list[Int64Array] = []
        base = np.arange(ts.size, dtype=np.int64)
        for j in range(self.per_record):
            starts = last - j * self.step_ms
            keep = starts > ts - self.size_ms
            idx_parts.append(base[keep])
            start_parts.append(starts[keep])
        return np.concatenate(idx_parts), np.concatenate(start_parts)

    def closes_at(self, start_ms: int) -> int:
        """Watermark at which the window starting at ``start_ms`` is closed and emitted."""
        return start_ms + self.size_ms + self.grace_ms

    def closed(self, starts: Int64Array, watermark: int) -> BoolArray:
        """Vectorised: whether each window start is already closed at ``watermark``."""
        return np.asarray(starts + (self.size_ms + self.grace_ms) <= watermark, dtype=np.bool_)


class Watermark:
    """Per-partition event-time watermarks combined into one that never moves backwards.

    A partition's watermark is the max event time seen on it minus ``allowed_lateness_ms``.
    The overall watermark is the min over *active* partitions; a partition with no record for
    ``idle_timeout_ms`` of wall-clock time is idle and stops holding it back. When every
    partition is idle, the max over partitions is used (nothing is in flight, so windows may
    close); records that later arrive behind it are late, not lost.
    With ``clock_bound`` (the live aggregator) a partition's event time counts only up to the
    clock (``now_ms``): a record dated ahead (a request's ``ts`` is the producer's to choose)
    is aggregated in its window, but event time that has not happened yet moves no watermark,
    or a single record dated minutes ahead would make every record of those minutes late.
    Replay has no clock (it passes 0) and leaves it off.
    Assigned partitions that have not produced anything yet hold the watermark (at "unknown")
    until they turn idle, or until the consumer finds them caught up (:meth:`caught_up`: at
    their end, nothing to read): then they hold nothing until a record arrives on them. That
    is what lets the first windows close right after start, where a partition without
    comparisons would otherwise hold every window back for ``idle_timeout_ms``.
    """

    __slots__ = (
        "_current",
        "_empty",
        "_last_seen",
        "_max_ts",
        "_now",
        "allowed_lateness_ms",
        "clock_bound",
        "idle_timeout_ms",
    )

    def __init__(
        self,
        *,
        allowed_lateness_ms: int = 0,
        idle_timeout_ms: int = 30_000,
        clock_bound: bool = False,
    ) -> None:
        self.allowed_lateness_ms = allowed_lateness_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.clock_bound = clock_bound
        #: The latest ``now_ms`` seen (the bound, with ``clock_bound``).
        self._now: int | None = None
        self._max_ts: dict[int, int | None] = {}
        self._last_seen: dict[int, int] = {}
        #: Partitions found caught up before any record of theirs was seen.
        self._empty: set[int] = set()
        self._current: int | None = None

    @property
    def current(self) -> int | None:
        """The overall watermark last computed (None until any partition has data)."""
        return self._current

    def assign(self, partitions: Iterable[int], now_ms: int) -> None:
        """Register partitions (e.g. on rebalance) so they hold the watermark until idle."""
        for p in partitions:
            self._max_ts.setdefault(int(p), None)
            self._last_seen.setdefault(int(p), now_ms)

    def revoke(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self._max_ts.pop(int(p), None)
            self._last_seen.pop(int(p), None)
            self._empty.discard(int(p))

    def caught_up(self, partitions: Iterable[int]) -> None:
        """Partitions the consumer read to their end without finding a record: they stop
        holding the watermark (until they deliver one). Ignored for partitions that already
        had records (those turn idle by time, as before)."""
        for p in partitions:
            if int(p) in self._last_seen and self._max_ts.get(int(p)) is None:
                self._empty.add(int(p))

    @property
    def empty_partitions(self) -> list[int]:
        """Assigned partitions found caught up with no record seen (they hold nothing)."""
        return sorted(self._empty)

    @property
    def partitions(self) -> list[int]:
        """The partitions assigned or seen (revoked ones excluded)."""
        return list(self._last_seen)

    def _event_time(self, ts: int) -> int:
        """``ts`` as far as it counts for a watermark: up to the clock, with ``clock_bound``."""
        if self.clock_bound and self._now is not None and ts > self._now:
            return self._now
        return ts

    def partition_watermark(self, partition: int) -> int | None:
        ts = self._max_ts.get(partition)
        return None if ts is None else self._event_time(ts) - self.allowed_lateness_ms

    def observe(self, partitions: npt.ArrayLike, ts_ms: npt.ArrayLike, now_ms: int) -> int | None:
        """Record a batch's event times per partition and return the new overall watermark."""
        part = np.asarray(partitions, dtype=np.int64).ravel()
        ts = np.asarray(ts_ms, dtype=np.int64).ravel()
        if ts.size:
            part = np.broadcast_to(part, ts.shape)
            uniq, inv = np.unique(part, return_inverse=True)
            maxima = np.full(uniq.size, np.iinfo(np.int64).min, dtype=np.int64)
            np.maximum.at(maxima, inv, ts)
            for p, m in zip(uniq.tolist(), maxima.tolist(), strict=True):
                prev = self._max_ts.get(p)
                self._max_ts[p] = m if prev is None else max(prev, m)
                self._last_seen[p] = max(self._last_seen.get(p, now_ms), now_ms)
                self._empty.discard(p)
        return self.advance(now_ms)

    def advance(self, now_ms: int) -> int | None:
        """Recompute with idleness at ``now_ms`` (call on every poll, even an empty one)."""
        self._now = now_ms if self._now is None else max(self._now, now_ms)
        active = [
            p
            for p, seen in self._last_seen.items()
            if now_ms - seen < self.idle_timeout_ms and p not in self._empty
        ]
        candidate: int | None
        if active:
            held = [self._max_ts[p] for p in active]
            candidate = (
                None
                if any(h is None for h in held)
                else self._event_time(min(h for h in held if h is not None))
            )
        else:
            known = [m for m in self._max_ts.values() if m is not None]
            candidate = self._event_time(max(known)) if known else None
        if candidate is not None:
            candidate -= self.allowed_lateness_ms
            if self._current is None or candidate > self._current:
                self._current = candidate
        return self._current


#: Default exact-dedupe capacity per window, and Bloom filter size beyond it (2**24 bits = 2 MiB).
DEDUPE_EXACT_CAP = 200_000
DEDUPE_BLOOM_BITS = 1 << 24
DEDUPE_BLOOM_HASHES = 5


class RequestDeduper:
    """Request-id dedupe with bounded memory: exact up to ``exact_cap`` ids, then a Bloom filter.

    The first ``exact_cap`` distinct 64-bit request-id hashes are kept in a sorted array (exact,
    except for 64-bit hash collisions, ~n^2/2^65). Further ids go to a fixed Bloom filter of
    ``bloom_bits`` bits with ``bloom_hashes`` probes, allocated only when the cap is reached.
    A Bloom false positive marks a *new* request as a duplicate (it is then counted as a
    duplicate and not aggregated); the rate is about ``(1 - exp(-k m / bits))**k`` for ``m`` ids
    in the filter: ~0.1% at 1M ids with the defaults, ~1% at 1.7M, ~16% at 4M, so size
    ``bloom_bits`` to ~10 bits per expected id per window beyond the cap for <= 1%. Duplicates
    are never missed. Memory: ``8 * exact_cap + bloom_bits / 8`` bytes at most.
    """

    __slots__ = ("_bloom", "_exact", "bloom_bits", "bloom_hashes", "exact_cap", "in_bloom")

    def __init__(
        self,
        exact_cap: int = DEDUPE_EXACT_CAP,
        bloom_bits: int = DEDUPE_BLOOM_BITS,
        bloom_hashes: int = DEDUPE_BLOOM_HASHES,
    ) -> None:
        if bloom_bits < 8 or bloom_bits & (bloom_bits - 1):
            raise ValueError("bloom_bits must be a power of two >= 8")
        self.exact_cap = exact_cap
        self.bloom_bits = bloom_bits
        self.bloom_hashes = bloom_hashes
        self._exact: UInt64Array = np.zeros(0, dtype=np.uint64)
        self._bloom: npt.NDArray[np.uint8] | None = None
        self.in_bloom = 0

    def __len__(self) -> int:
        return int(self._exact.size) + self.in_bloom

    @property
    def false_positive_rate(self) -> float:
        """Current estimated probability that a new id is wrongly taken as a duplicate."""
        if not self.in_bloom:
            return 0.0
        k = self.bloom_hashes
        return float((1.0 - math.exp(-k * self.in_bloom / self.bloom_bits)) ** k)

    def _positions(self, h: UInt64Array) -> UInt64Array:
        h1 = h & np.uint64(0xFFFFFFFF)
        h2 = (h >> np.uint64(32)) | np.uint64(1)
        k = np.arange(self.bloom_hashes, dtype=np.uint64)
        with np.errstate(over="ignore"):
            pos = h1[:, None] + k[None, :] * h2[:, None]
        return pos & np.uint64(self.bloom_bits - 1)

    def _bloom_contains(self, h: UInt64Array) -> BoolArray:
        if self._bloom is None or h.size == 0:
            return np.zeros(h.size, dtype=np.bool_)
        pos = self._positions(h)
        bits = (self._bloom[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return np.asarray(bits.all(axis=1), dtype=np.bool_)

    def _bloom_add(self, h: UInt64Array) -> None:
        if h.size == 0:
            return
        if self._bloom is None:
            self._bloom = np.zeros(self.bloom_bits // 8, dtype=np.uint8)
        pos = self._positions(h).ravel()
        masks = np.left_shift(1, (pos & np.uint64(7)).astype(np.uint8)).astype(np.uint8)
        np.bitwise_or.at(self._bloom, (pos >> np.uint64(3)).astype(np.int64), masks)
        self.in_bloom += int(h.size)

    def _contains(self, uniq: UInt64Array) -> BoolArray:
        found = np.zeros(uniq.size, dtype=np.bool_)
        if self._exact.size:
            i = np.searchsorted(self._exact, uniq)
            i_clip = np.minimum(i, self._exact.size - 1)
            found = self._exact[i_clip] == uniq
        return found | self._bloom_contains(uniq)

    def _insert(self, new_sorted: UInt64Array) -> None:
        room = max(self.exact_cap - int(self._exact.size), 0)
        if room:
            head = new_sorted[:room]
            self._exact = np.sort(np.concatenate([self._exact, head]), kind="stable")
        self._bloom_add(new_sorted[room:])

    def check_and_add(self, hashes: UInt64Array) -> BoolArray:
        """Mark duplicates (True) in ``hashes`` and remember the rest; first occurrence wins."""
        dup = np.ones(hashes.size, dtype=np.bool_)
        if hashes.size == 0:
            return dup
        uniq, first = np.unique(hashes, return_index=True)
        seen = self._contains(uniq)
        dup[first[~seen]] = False
        self._insert(uniq[~seen])
        return dup

    def merge(self, other: RequestDeduper) -> RequestDeduper:
        """Union of both id sets (the exact part overflows into the Bloom filter if needed)."""
        if (self.bloom_bits, self.bloom_hashes) != (other.bloom_bits, other.bloom_hashes):
            raise ValueError("cannot merge dedupers with different Bloom parameters")
        fresh = other._exact[~self._contains(other._exact)] if other._exact.size else other._exact
        self._insert(fresh)
        if other._bloom is not None:
            if self._bloom is None:
                self._bloom = other._bloom.copy()
            else:
                self._bloom |= other._bloom
            self.in_bloom += other.in_bloom
        return self
