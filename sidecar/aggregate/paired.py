"""Paired evidence: what the candidate did on the same requests and batches as the champion.

Two things here, both mergeable window state (counters and a bounded sample, exact to merge):

* **Failures, paired per request.** A request whose call failed on both arms (a host stall that
  timed both out) blames neither model. Of the requests where only one arm failed, a timeout is
  put down to the host, not the model, when the other arm's call on the same batch was slow too
  (it took at least ``host_share`` of the timed-out call's time: both threads were starved).
  What is left is what the candidate did worse than the champion on the very same requests.
* **Latency, paired per batch.** Every record of one sidecar batch carries the same two
  latencies (each model's wall time on that batch), so records are not independent latency
  samples: one slow batch would weigh as much as its record count. A window keeps the distinct
  ``(champion ms, candidate ms)`` pairs instead, as a bottom-k sample (the ``capacity`` pairs
  with the smallest hash: a uniform sample of the distinct batches that merges exactly, by
  union). A host stall slows both arms of a batch, so comparing the arms batch by batch (a sign
  test on "the candidate took more than ``margin`` times the champion's time") is immune to it,
  where a p99 ratio is dominated by it.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt

from .batch import ERROR_KINDS, ArmColumns, _fmix64
from .stats import Figure, insufficient, sign_test_greater, wilson

FloatArray = npt.NDArray[np.float64]
UInt64Array = npt.NDArray[np.uint64]
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_TIMEOUT = ERROR_KINDS.index("timeout") + 1
_SKIPPED = ERROR_KINDS.index("skipped") + 1
#: The candidate was not asked: its lane's backlog was full (``pipeline.candidate_backlog``).
_SHED = ERROR_KINDS.index("shed") + 1

#: Default number of distinct batches a window keeps for the latency comparison.
BATCH_SAMPLE = 1_024
#: A batch counts as "candidate slower" when it took more than this many times the champion's
#: time on the same batch ...
LATENCY_MARGIN = 1.5
#: ... and at least this many milliseconds more (a 0.1 ms model doubling is no regression).
LATENCY_MIN_DIFF_MS = 1.0
#: Fewest distinct batches for the paired latency figures.
MIN_LATENCY_BATCHES = 10
#: A one-arm timeout is the host's when the other arm took at least this share of its time.
HOST_SHARE = 0.25

# Failure-table slots (``PairedFailures.counts``).
PAIRS = 0  # records where both arms were called (neither skipped nor shed)
BOTH_FAILED = 1
CANDIDATE_ONLY_ERROR = 2  # not a timeout
CHAMPION_ONLY_ERROR = 3
CANDIDATE_ONLY_TIMEOUT = 4  # the champion was fast on the same batch
CHAMPION_ONLY_TIMEOUT = 5
CANDIDATE_ONLY_TIMEOUT_HOST = 6  # the champion was slow too: the host's
CHAMPION_ONLY_TIMEOUT_HOST = 7
BOTH_TIMED_OUT = 8  # of BOTH_FAILED
FAILURE_SLOTS = 9


def pair_hash(champion_ms: FloatArray, candidate_ms: FloatArray) -> UInt64Array:
    """A 64-bit hash of each (champion, candidate) latency pair (the same in every process)."""
    a = np.ascontiguousarray(champion_ms, dtype=np.float64).view(np.uint64)
    b = np.ascontiguousarray(candidate_ms, dtype=np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        return _fmix64(_fmix64(a) ^ (b * np.uint64(0x9E3779B97F4A7C15)))


class BatchLatencies:
    """A bottom-k sample of a window's distinct batches: ``(champion ms, candidate ms)`` pairs.

    Kept sorted by hash; ``add`` and ``merge`` keep the ``capacity`` smallest hashes of the
    union, so the result does not depend on how the records were split or ordered.
    """

    __slots__ = ("candidate", "capacity", "champion", "keys")

    def __init__(self, capacity: int = BATCH_SAMPLE) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.keys: UInt64Array = np.zeros(0, dtype=np.uint64)
        self.champion: FloatArray = np.zeros(0, dtype=np.float64)
        self.candidate: FloatArray = np.zeros(0, dtype=np.float64)

    def __len__(self) -> int:
        return int(self.keys.size)

    def add(self, champion_ms: FloatArray, candidate_ms: FloatArray) -> None:
        """Add records' latency pairs (finite, both arms succeeded); repeats are one batch."""
        if not champion_ms.size:
            return
        keys = pair_hash(champion_ms, candidate_ms)
        if keys.size > 1:  # a batch's records arrive together: keep one row per run
            head = np.empty(keys.size, dtype=np.bool_)
            head[0] = True
            np.not_equal(keys[1:], keys[:-1], out=head[1:])
            if not head.all():
                keys, champion_ms, candidate_ms = keys[head], champion_ms[head], candidate_ms[head]
        if self.keys.size >= self.capacity:  # full: only smaller hashes can get in
            below = keys < self.keys[-1]
            if not below.any():
                return
            keys, champion_ms, candidate_ms = keys[below], champion_ms[below], candidate_ms[below]
        self._union(keys, champion_ms, candidate_ms)

    def merge(self, other: BatchLatencies) -> BatchLatencies:
        self._union(other.keys, other.champion, other.candidate)
        return self

    def _union(self, keys: UInt64Array, champion: FloatArray, candidate: FloatArray) -> None:
        all_keys = np.concatenate([self.keys, keys])
        uniq, first = np.unique(all_keys, return_index=True)  # sorted by hash
        first = first[: self.capacity]
        self.keys = uniq[: self.capacity]
        self.champion = np.concatenate([self.champion, champion])[first]
        self.candidate = np.concatenate([self.candidate, candidate])[first]

    def load(self, champion: list[float], candidate: list[float]) -> None:
        """Replace the sample with these pairs (a partial read back from the wire)."""
        self.keys = np.zeros(0, dtype=np.uint64)
        self.champion = np.zeros(0, dtype=np.float64)
        self.candidate = np.zeros(0, dtype=np.float64)
        if len(champion) != len(candidate):
            raise ValueError("batch latency sample: champion and candidate lengths differ")
        c = np.asarray(champion, dtype=np.float64)
        k = np.asarray(candidate, dtype=np.float64)
        ok = np.isfinite(c) & np.isfinite(k)
        self._union(pair_hash(c[ok], k[ok]), c[ok], k[ok])


def latency_rows(champion: ArmColumns, candidate: ArmColumns) -> BoolArray:
    """Rows whose two calls both succeeded with a known latency (the latency comparison)."""
    return np.asarray(
        (champion.error == 0)
        & (candidate.error == 0)
        & np.isfinite(champion.latency_ms)
        & np.isfinite(candidate.latency_ms),
        dtype=np.bool_,
    )


#: Distinct failed calls counted per window and kind (past it: "at least this many").
MAX_CALLS = 64


class DistinctCalls:
    """How many distinct model calls (batches) some records came from, up to ``capacity``.

    Records of one call share its latency pair, so one failed call of 200 records is one
    failure, not 200. Keeps the ``capacity`` smallest call hashes: exact to merge, and the
    count is exact up to ``capacity``.
    """

    __slots__ = ("capacity", "keys")

    def __init__(self, capacity: int = MAX_CALLS) -> None:
        self.capacity = capacity
        self.keys: UInt64Array = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return int(self.keys.size)

    def add(self, keys: UInt64Array) -> None:
        if keys.size:
            self.keys = np.unique(np.concatenate([self.keys, keys]))[: self.capacity]

    def merge(self, other: DistinctCalls) -> None:
        self.add(other.keys)


class FailureTable:
    """A window's paired failure counters (``FAILURE_SLOTS``) and the distinct calls behind
    the candidate's own failures."""

    __slots__ = ("counts", "error_calls", "host_share", "timeout_calls")

    def __init__(self, host_share: float = HOST_SHARE) -> None:
        self.host_share = host_share
        self.counts: Int64Array = np.zeros(FAILURE_SLOTS, dtype=np.int64)
        #: Calls where the candidate alone failed (not a timeout) / timed out (its fault).
        self.error_calls = DistinctCalls()
        self.timeout_calls = DistinctCalls()

    def add(self, champion: ArmColumns, candidate: ArmColumns) -> None:
        counts, k_err, k_to = failure_counts(champion, candidate, self.host_share)
        self.counts += counts
        if k_err is not None and k_err.any():
            self.error_calls.add(pair_hash(champion.latency_ms[k_err], candidate.latency_ms[k_err]))
        if k_to is not None and k_to.any():
            self.timeout_calls.add(pair_hash(champion.latency_ms[k_to], candidate.latency_ms[k_to]))

    def merge(self, other: FailureTable) -> None:
        self.counts += other.counts
        self.error_calls.merge(other.error_calls)
        self.timeout_calls.merge(other.timeout_calls)


def failure_counts(
    champion: ArmColumns, candidate: ArmColumns, host_share: float
) -> tuple[Int64Array, BoolArray | None, BoolArray | None]:
    """The paired failure table of a batch of records (``FAILURE_SLOTS`` counters), and the
    rows where the candidate alone failed with an error / timed out (its fault), if any."""
    out = np.zeros(FAILURE_SLOTS, dtype=np.int64)
    ce, ke = champion.error, candidate.error
    called = (ce != _SKIPPED) & (ke != _SKIPPED) & (ce != _SHED) & (ke != _SHED)
    out[PAIRS] = int(np.count_nonzero(called))
    if not (ce.any() or ke.any()):  # the usual batch: nothing failed
        return out, None, None
    cf, kf = (ce != 0) & called, (ke != 0) & called
    out[BOTH_FAILED] = int(np.count_nonzero(cf & kf))
    out[BOTH_TIMED_OUT] = int(np.count_nonzero((ce == _TIMEOUT) & (ke == _TIMEOUT)))
    k_only, c_only = kf & ~cf, cf & ~kf
    k_to, c_to = k_only & (ke == _TIMEOUT), c_only & (ce == _TIMEOUT)
    out[CANDIDATE_ONLY_ERROR] = int(np.count_nonzero(k_only & ~k_to))
    out[CHAMPION_ONLY_ERROR] = int(np.count_nonzero(c_only & ~c_to))
    cl, kl = champion.latency_ms, candidate.latency_ms
    with np.errstate(invalid="ignore"):
        k_host = k_to & (cl >= host_share * kl)  # NaN compares False: the model's
        c_host = c_to & (kl >= host_share * cl)
    out[CANDIDATE_ONLY_TIMEOUT_HOST] = int(np.count_nonzero(k_host))
    out[CHAMPION_ONLY_TIMEOUT_HOST] = int(np.count_nonzero(c_host))
    out[CANDIDATE_ONLY_TIMEOUT] = int(np.count_nonzero(k_to)) - out[CANDIDATE_ONLY_TIMEOUT_HOST]
    out[CHAMPION_ONLY_TIMEOUT] = int(np.count_nonzero(c_to)) - out[CHAMPION_ONLY_TIMEOUT_HOST]
    return out, k_only & ~k_to, k_to & ~k_host


class PairedFailures(msgspec.Struct, frozen=True, kw_only=True):
    """Failures on the same requests: who failed where the other arm did not."""

    #: Records where both arms were called (a ``skipped`` arm leaves a record out).
    pairs: int
    #: Both calls failed: a host or input problem, blamed on neither model ...
    both_failed: int
    #: ... of which both timed out (the host stalled).
    both_timed_out: int
    #: Only one arm failed with an exception, invalid output or an open circuit.
    candidate_only_errors: int
    champion_only_errors: int
    #: Only one arm timed out while the other was fast on the same batch: the model's.
    candidate_only_timeouts: int
    champion_only_timeouts: int
    #: Only one arm timed out but the other was slow too (host): blamed on neither.
    candidate_only_timeouts_host: int
    champion_only_timeouts_host: int
    #: (candidate-only errors - champion-only errors) / pairs, with a 95% interval.
    candidate_excess_error_rate: Figure
    #: Distinct calls (batches) behind ``candidate_only_errors`` / ``candidate_only_timeouts``
    #: (counted up to 64): one failed call of 200 records is one failure. The default rules
    #: need two before they count a window as a breach.
    candidate_error_calls: Figure
    candidate_timeout_calls: Figure
    #: (candidate-only timeouts - champion-only timeouts) / pairs, host timeouts left out.
    #: Insufficient data (reason ``host_stall``) in a window where both arms timed out
    #: together more often than the candidate alone: the host was stalling, and whatever the
    #: candidate's own timeouts were, they cannot be told from it.
    candidate_excess_timeout_rate: Figure


def _excess(b: int, c: int, n: int, *, z: float, min_count: int) -> Figure:
    """``(b - c) / n`` for paired discordant counts, Wald interval for matched proportions."""
    if n < max(min_count, 1):
        return insufficient(n)
    d = (b - c) / n
    var = max((b + c) / n - d * d, 0.0) / n
    half = z * math.sqrt(var)
    return Figure(value=d, lo=max(-1.0, d - half), hi=min(1.0, d + half), n=n)


def paired_failures(table: FailureTable, *, z: float, min_count: int) -> PairedFailures:
    c = [int(x) for x in table.counts.tolist()]
    n = c[PAIRS]
    timeouts = _excess(
        c[CANDIDATE_ONLY_TIMEOUT], c[CHAMPION_ONLY_TIMEOUT], n, z=z, min_count=min_count
    )
    stalled = c[BOTH_TIMED_OUT] > c[CANDIDATE_ONLY_TIMEOUT] + c[CANDIDATE_ONLY_TIMEOUT_HOST]
    if timeouts.ok and stalled:
        timeouts = insufficient(n, "host_stall")
    return PairedFailures(
        pairs=n,
        both_failed=c[BOTH_FAILED],
        both_timed_out=c[BOTH_TIMED_OUT],
        candidate_only_errors=c[CANDIDATE_ONLY_ERROR],
        champion_only_errors=c[CHAMPION_ONLY_ERROR],
        candidate_only_timeouts=c[CANDIDATE_ONLY_TIMEOUT],
        champion_only_timeouts=c[CHAMPION_ONLY_TIMEOUT],
        candidate_only_timeouts_host=c[CANDIDATE_ONLY_TIMEOUT_HOST],
        champion_only_timeouts_host=c[CHAMPION_ONLY_TIMEOUT_HOST],
        candidate_excess_error_rate=_excess(
            c[CANDIDATE_ONLY_ERROR], c[CHAMPION_ONLY_ERROR], n, z=z, min_count=min_count
        ),
        candidate_excess_timeout_rate=timeouts,
        candidate_error_calls=Figure(value=float(len(table.error_calls)), n=n),
        candidate_timeout_calls=Figure(value=float(len(table.timeout_calls)), n=n),
    )


class PairedLatency(msgspec.Struct, frozen=True, kw_only=True):
    """Both models' latency over the same batches (distinct model calls), compared batch by
    batch."""

    #: Distinct batches in the window's sample (at most ``aggregate.latency_batch_sample``).
    batches: int
    #: A batch counts as slower when the candidate took more than ``margin`` times the
    #: champion's time on it, and at least ``min_diff_ms`` more.
    margin: float
    min_diff_ms: float
    champion_p50: Figure
    candidate_p50: Figure
    champion_p95: Figure
    candidate_p95: Figure
    #: Candidate / champion median and p95 over the same batches.
    p50_ratio: Figure
    p95_ratio: Figure
    #: Share of batches where the candidate was slower (by the margin), Wilson interval;
    #: ``p_value``: one-sided sign test of "slower on more than half the batches". Its lower
    #: bound above 0.5 means the median paired ratio is above the margin.
    slower_share: Figure
    #: Tail excursions, paired: batches where the candidate was slower by the margin *and*
    #: above ``margin`` x the champion's p95, less batches where the champion was slower by
    #: the margin and above ``margin`` x the candidate's p95, over all batches (interval for
    #: matched proportions; ``p_value``: one-sided sign test between the two counts).
    #: Scheduling noise throws either arm into its tail now and then, so only a surplus on
    #: the candidate's side is a tail regression.
    tail_excess: Figure


def _q(x: FloatArray, q: float) -> float:
    return float(np.quantile(x, q, method="inverted_cdf"))


def paired_latency(
    sample: BatchLatencies,
    *,
    margin: float = LATENCY_MARGIN,
    min_diff_ms: float = LATENCY_MIN_DIFF_MS,
    min_batches: int = MIN_LATENCY_BATCHES,
    z: float,
) -> PairedLatency:
    n = len(sample)
    if n < max(min_batches, 1):
        none = insufficient(n)
        return PairedLatency(
            batches=n,
            margin=margin,
            min_diff_ms=min_diff_ms,
            champion_p50=none,
            candidate_p50=none,
            champion_p95=none,
            candidate_p95=none,
            p50_ratio=none,
            p95_ratio=none,
            slower_share=none,
            tail_excess=none,
        )
    c, k = sample.champion, sample.candidate
    slower = (k > margin * c) & (k - c >= min_diff_ms)
    faster = (c > margin * k) & (c - k >= min_diff_ms)
    c50, k50, c95, k95 = _q(c, 0.5), _q(k, 0.5), _q(c, 0.95), _q(k, 0.95)
    n_slower = int(np.count_nonzero(slower))
    tail_k = int(np.count_nonzero(slower & (k > margin * c95)))
    tail_c = int(np.count_nonzero(faster & (c > margin * k95)))
    share = wilson(n_slower, n, z=z)
    tail = _excess(tail_k, tail_c, n, z=z, min_count=1)
    return PairedLatency(
        batches=n,
        margin=margin,
        min_diff_ms=min_diff_ms,
        champion_p50=Figure(value=c50, n=n),
        candidate_p50=Figure(value=k50, n=n),
        champion_p95=Figure(value=c95, n=n),
        candidate_p95=Figure(value=k95, n=n),
        p50_ratio=_ratio(k50, c50, n),
        p95_ratio=_ratio(k95, c95, n),
        slower_share=Figure(
            value=share.value,
            lo=share.lo,
            hi=share.hi,
            p_value=sign_test_greater(n_slower, n),
            n=n,
        ),
        tail_excess=Figure(
            value=tail.value,
            lo=tail.lo,
            hi=tail.hi,
            p_value=sign_test_greater(tail_k, tail_k + tail_c),
            n=n,
        ),
    )


def _ratio(num: float, den: float, n: int) -> Figure:
    if den <= 0:
        return insufficient(n, "zero_latency")
    return Figure(value=num / den, n=n)


__all__ = [
    "BATCH_SAMPLE",
    "HOST_SHARE",
    "LATENCY_MARGIN",
    "LATENCY_MIN_DIFF_MS",
    "MIN_LATENCY_BATCHES",
    "BatchLatencies",
    "DistinctCalls",
    "FailureTable",
    "PairedFailures",
    "PairedLatency",
    "failure_counts",
    "latency_rows",
    "pair_hash",
    "paired_failures",
    "paired_latency",
]
