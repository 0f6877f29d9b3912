"""``WindowAggregate``: one (rollout, champion version, candidate version, window), and its
``WindowReport``.

It follows the Quix Streams aggregator shape (initialize / add / merge / result) but over
whole columnar batches, so the per-record cost is a few numpy operations. Its state is
counters, fixed-edge histograms and bounded samples only (plus the bounded dedupe set), so
memory is bounded by the number of open windows, never by the number of records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .batch import (
    ERROR_KINDS,
    SERVED_CANDIDATE,
    SERVED_CHAMPION,
    SERVED_NONE,
    ArmColumns,
    ComparisonBatch,
    GroupKey,
)
from .config import AggregatorConfig
from .histograms import (
    LatencySketch,
    ScoreHistogram,
)
from .kinds import KindState
from .paired import (
    BatchLatencies,
    FailureTable,
    latency_rows,
    paired_failures,
    paired_latency,
)
from .report import (
    ArmReport,
    ClosedBy,
    DriftReport,
    LatencyReport,
    OffsetRange,
    PairedReport,
    ReportCounts,
    WindowReport,
)
from .stats import (
    Figure,
    PairedTable,
    conditional_flip_rates,
    insufficient,
    js_distance,
    ks_binned,
    mcnemar,
    paired_difference,
    paired_ratio,
    psi,
    psi_band,
    ratio_figure,
    wilson,
)
from .windows import (
    RequestDeduper,
)

_INVALID_OUTPUT = ERROR_KINDS.index("invalid_output") + 1

Int64Array = npt.NDArray[np.int64]


class _ArmState:
    """One arm's counters and histograms inside a window."""

    __slots__ = ("decided", "errors", "hist", "latency")

    def __init__(self, config: AggregatorConfig, edges: npt.NDArray[np.float64]) -> None:
        self.hist = ScoreHistogram(edges)
        self.latency = LatencySketch(
            config.latency_min_ms, config.latency_max_ms, config.latency_gamma
        )
        #: Index 0 counts records without error, then one slot per ``ERROR_KINDS`` entry.
        self.errors: Int64Array = np.zeros(len(ERROR_KINDS) + 1, dtype=np.int64)
        self.decided = 0

    def add(self, cols: ArmColumns) -> None:
        self.hist.add(cols.score, cols.score_missing)
        self.latency.add(cols.latency_ms)
        self.errors += np.bincount(cols.error, minlength=self.errors.size)
        self.decided += int(np.count_nonzero(cols.decision >= 0))

    def merge(self, other: _ArmState) -> None:
        self.hist.merge(other.hist)
        self.latency.merge(other.latency)
        self.errors += other.errors
        self.decided += other.decided

    @property
    def error_total(self) -> int:
        """Records the model failed on; ``skipped`` and ``shed`` are not failures (the model
        was not asked)."""
        return int(self.errors[1:].sum() - self.errors[_NOT_ASKED].sum())


#: ``errors`` slots of the kinds where the model was not asked at all.
_NOT_ASKED = [ERROR_KINDS.index(k) + 1 for k in ("skipped", "shed")]


@dataclass(frozen=True, slots=True)
class Reference:
    """A model's reference score histogram and where it came from (None = supplied)."""

    hist: ScoreHistogram
    window_start_ms: int | None = None


#: Most feature names counted per window in ``out_of_range_features``; the rest are summed
#: under ``OTHER_FEATURES``. Names come from comparison records, which anyone with write
#: access to the topic can fill with made-up names: a report must stay small regardless.
MAX_OUT_OF_RANGE_FEATURES = 100
OTHER_FEATURES = "(other)"


def _count_feature(features: dict[str, int], name: str, count: int) -> None:
    if name not in features and len(features) >= MAX_OUT_OF_RANGE_FEATURES:
        name = OTHER_FEATURES
    features[name] = features.get(name, 0) + count


#: Policy modes in which the champion decides every request: a record the candidate served
#: then is a fallback (the champion failed and ``rollout.champion_failure`` let it decide).
CHAMPION_DECIDES = frozenset({"shadow", "rolled_back"})
#: Most policy modes counted per window (mode names come from untrusted records too).
MAX_POLICY_MODES = 16


def _count_mode(modes: dict[str, int], name: str, count: int) -> None:
    if name not in modes and len(modes) >= MAX_POLICY_MODES:
        name = OTHER_FEATURES
    modes[name] = modes.get(name, 0) + count


class PolicySeen:
    """Which routing policies (epochs and modes) a window's records were decided under.

    Mergeable: epochs by min/max, the mode of the highest epoch with it, counts by adding.
    """

    __slots__ = (
        "candidate_fallbacks",
        "champion_decides",
        "epoch_max",
        "epoch_min",
        "mode",
        "modes",
    )

    def __init__(self) -> None:
        self.epoch_min: int | None = None
        self.epoch_max: int | None = None
        #: The mode of the highest epoch seen (the policy the window ended under).
        self.mode: str | None = None
        #: Records per policy mode.
        self.modes: dict[str, int] = {}
        #: Records decided under a mode where the champion decides, and of those the ones the
        #: candidate served (fallbacks).
        self.champion_decides = 0
        self.candidate_fallbacks = 0

    def add(self, batch: ComparisonBatch) -> None:
        epochs, names, codes = batch.policy_epoch, batch.policy_modes, batch.policy_mode_code
        hi = int(epochs.max())
        self._epochs(int(epochs.min()), hi)
        served_candidate = batch.served_by == SERVED_CANDIDATE
        if len(names) == 1:  # the usual batch: one mode
            if self.epoch_max == hi:
                self.mode = names[0]
            _count_mode(self.modes, names[0], len(batch))
            if names[0] in CHAMPION_DECIDES:
                self.champion_decides += len(batch)
                self.candidate_fallbacks += int(np.count_nonzero(served_candidate))
            return
        if self.epoch_max == hi:
            self.mode = names[int(codes[np.flatnonzero(epochs == hi)[-1]])]
        counts = np.bincount(codes, minlength=len(names)).tolist()
        for name, count in zip(names, counts, strict=False):
            if count:
                _count_mode(self.modes, name, count)
        decides = np.fromiter((m in CHAMPION_DECIDES for m in names), dtype=np.bool_)[codes]
        self.champion_decides += int(np.count_nonzero(decides))
        self.candidate_fallbacks += int(np.count_nonzero(decides & served_candidate))

    def _epochs(self, lo: int, hi: int) -> None:
        self.epoch_min = lo if self.epoch_min is None else min(self.epoch_min, lo)
        if self.epoch_max is None or hi > self.epoch_max:
            self.epoch_max = hi

    def merge(self, other: PolicySeen) -> None:
        if other.epoch_min is not None and other.epoch_max is not None:
            before = self.epoch_max
            self._epochs(other.epoch_min, other.epoch_max)
            if before is None or other.epoch_max > before:
                self.mode = other.mode
        for name, count in other.modes.items():
            _count_mode(self.modes, name, count)
        self.champion_decides += other.champion_decides
        self.candidate_fallbacks += other.candidate_fallbacks


class WindowAggregate:
    """Aggregate of one (rollout, champion version, candidate version, window)."""

    def __init__(
        self,
        key: GroupKey,
        start_ms: int,
        end_ms: int,
        config: AggregatorConfig | None = None,
    ) -> None:
        self.key = key
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.config = config or AggregatorConfig()
        self._edges = self.config.edges()
        self.initialize()

    def initialize(self) -> WindowAggregate:
        """Reset to the empty state."""
        c = self.config
        self.records = 0
        self.duplicates = 0
        self.late = 0
        self.served: Int64Array = np.zeros(3, dtype=np.int64)
        self.champion = _ArmState(c, self._edges)
        self.candidate = _ArmState(c, self._edges)
        #: Paired decisions, index ``champion * 2 + candidate``: no/no, no/yes, yes/no, yes/yes.
        self.table: Int64Array = np.zeros(4, dtype=np.int64)
        self.offsets: dict[int, tuple[int, int]] = {}
        #: Records with any feature out of range, and per feature.
        self.out_of_range = 0
        self.out_of_range_features: dict[str, int] = {}
        self.min_ts: int | None = None
        self.max_ts: int | None = None
        self.dedupe = RequestDeduper(c.dedupe_exact_cap, c.dedupe_bloom_bits, c.dedupe_bloom_hashes)
        self.policy = PolicySeen()
        #: Paired failure table (``paired.FAILURE_SLOTS`` counters and failed calls).
        self.failures = FailureTable(c.timeout_host_share)
        #: Distinct batches' latency pairs (a bottom-k sample).
        self.batches = BatchLatencies(c.latency_batch_sample)
        #: Labels, values and rankings of non-binary models (created when first seen).
        self.kinds: KindState | None = None
        return self

    def _kind_state(self) -> KindState:
        if self.kinds is None:
            c = self.config
            self.kinds = KindState(c.rbo_p, c.regression_tolerance_abs, c.regression_tolerance_rel)
        return self.kinds

    def add(self, batch: ComparisonBatch) -> None:
        """Add a batch whose rows all belong to this aggregate (the manager routes them)."""
        if len(batch) == 0:
            return
        # Evidence covers every consumed record, duplicates included.
        lo, hi = int(batch.ts.min()), int(batch.ts.max())
        self.min_ts = lo if self.min_ts is None else min(self.min_ts, lo)
        self.max_ts = hi if self.max_ts is None else max(self.max_ts, hi)
        self._add_offsets(batch.partition, batch.offset)
        dup = self.dedupe.check_and_add(batch.request_hash)
        n_dup = int(np.count_nonzero(dup))
        if n_dup:
            self.duplicates += n_dup
            batch = batch.take(np.flatnonzero(~dup))
            if len(batch) == 0:
                return
        self.records += len(batch)
        self.served += np.bincount(batch.served_by, minlength=3)[:3]
        self.champion.add(batch.champion)
        self.candidate.add(batch.candidate)
        cd, kd = batch.champion.decision, batch.candidate.decision
        both = (cd >= 0) & (kd >= 0)
        code = cd[both].astype(np.int64) * 2 + kd[both]
        self.table += np.bincount(code, minlength=4)
        if batch.out_of_range_code.any():  # rare
            self._add_out_of_range(batch)
        if batch.kinds is not None:  # non-binary models
            self._kind_state().add(batch.kinds)
        self.policy.add(batch)
        champion, candidate = batch.champion, batch.candidate
        self.failures.add(champion, candidate)
        rows = latency_rows(champion, candidate)
        if rows.all():
            self.batches.add(champion.latency_ms, candidate.latency_ms)
        else:
            self.batches.add(champion.latency_ms[rows], candidate.latency_ms[rows])

    def _add_out_of_range(self, batch: ComparisonBatch) -> None:
        sets = batch.out_of_range_sets
        counts = np.bincount(batch.out_of_range_code, minlength=len(sets)).tolist()
        self.out_of_range += len(batch) - counts[0]
        features = self.out_of_range_features
        for names, count in zip(sets[1:], counts[1:], strict=True):
            for name in names:
                _count_feature(features, name, count)

    def _add_offsets(self, partitions: npt.NDArray[np.int32], offsets: Int64Array) -> None:
        if (partitions == partitions[0]).all():  # the usual batch: one partition
            self._merge_offset(int(partitions[0]), int(offsets.min()), int(offsets.max()))
            return
        uniq, inv = np.unique(partitions, return_inverse=True)
        first = np.full(uniq.size, np.iinfo(np.int64).max, dtype=np.int64)
        last = np.full(uniq.size, np.iinfo(np.int64).min, dtype=np.int64)
        np.minimum.at(first, inv, offsets)
        np.maximum.at(last, inv, offsets)
        for p, f, la in zip(uniq.tolist(), first.tolist(), last.tolist(), strict=True):
            self._merge_offset(p, f, la)

    def _merge_offset(self, partition: int, first: int, last: int) -> None:
        prev = self.offsets.get(partition)
        self.offsets[partition] = (
            (first, last) if prev is None else (min(prev[0], first), max(prev[1], last))
        )

    def merge(self, other: WindowAggregate) -> WindowAggregate:
        """Fold ``other`` (same key and window, disjoint records) into this aggregate.

        Counters and histograms add exactly; the dedupe sets are unioned so later adds are
        deduped against both, but a request present on *both* sides is counted twice (merge
        cannot un-add it): merge inputs are expected to be disjoint, e.g. per partition.
        """
        if (self.key, self.start_ms, self.end_ms) != (other.key, other.start_ms, other.end_ms):
            raise ValueError("can only merge aggregates of the same key and window")
        self.records += other.records
        self.duplicates += other.duplicates
        self.late += other.late
        self.served += other.served
        self.champion.merge(other.champion)
        self.candidate.merge(other.candidate)
        self.table += other.table
        self.out_of_range += other.out_of_range
        for name, count in other.out_of_range_features.items():
            _count_feature(self.out_of_range_features, name, count)
        for p, (f, la) in other.offsets.items():
            self._merge_offset(p, f, la)
        if other.min_ts is not None:
            self.min_ts = other.min_ts if self.min_ts is None else min(self.min_ts, other.min_ts)
        if other.max_ts is not None:
            self.max_ts = other.max_ts if self.max_ts is None else max(self.max_ts, other.max_ts)
        self.dedupe.merge(other.dedupe)
        self.policy.merge(other.policy)
        self.failures.merge(other.failures)
        self.batches.merge(other.batches)
        if other.kinds is not None:
            self._kind_state().merge(other.kinds)
        return self

    @property
    def paired_table(self) -> PairedTable:
        no_no, no_yes, yes_no, yes_yes = (int(x) for x in self.table)
        return PairedTable(yes_yes, yes_no, no_yes, no_no)

    # ------------------------------------------------------------------ result

    def _drift(self, ref: ScoreHistogram | None, cur: ScoreHistogram) -> DriftReport:
        if ref is None:
            none = insufficient(0, "no_reference")
            return DriftReport(psi=none, psi_band=None, js_distance=none, ks=none)
        m = self.config.min_pairs
        p = psi(ref.counts, cur.counts, eps=self.config.psi_eps, min_count=m)
        return DriftReport(
            psi=p,
            psi_band=psi_band(p.value),
            js_distance=js_distance(ref.counts, cur.counts, min_count=m),
            ks=ks_binned(ref.counts, cur.counts, min_count=m),
        )

    def _quantile(self, sketch: LatencySketch, q: float) -> Figure:
        n = sketch.total
        value = sketch.quantile(q)
        if n < max(self.config.min_latency_count, 1) or value is None:
            return insufficient(n)
        return Figure(value=value, n=n)

    def _latency(self, sketch: LatencySketch) -> LatencyReport:
        return LatencyReport(
            count=sketch.total,
            missing=sketch.missing,
            p50=self._quantile(sketch, 0.50),
            p95=self._quantile(sketch, 0.95),
            p99=self._quantile(sketch, 0.99),
        )

    def _arm_report(
        self,
        arm: _ArmState,
        model: str,
        version: str,
        decision_rate: Figure,
        ref: Reference | None,
    ) -> ArmReport:
        c = self.config
        return ArmReport(
            model=model,
            version=version,
            scored=arm.hist.total,
            score_nan=arm.hist.nan,
            score_missing=arm.hist.missing,
            decided=arm.decided,
            errors={k: int(v) for k, v in zip(ERROR_KINDS, arm.errors[1:].tolist(), strict=True)},
            error_rate=wilson(arm.error_total, self.records, z=c.z, min_count=c.min_pairs),
            nan_rate=wilson(
                int(arm.errors[_INVALID_OUTPUT]) + arm.hist.nan,
                self.records,
                z=c.z,
                min_count=c.min_pairs,
            ),
            decision_rate=decision_rate,
            latency=self._latency(arm.latency),
            drift_vs_reference=self._drift(None if ref is None else ref.hist, arm.hist),
            reference_window_start_ms=None if ref is None else ref.window_start_ms,
        )

    def result(
        self,
        *,
        champion_reference: Reference | None = None,
        candidate_reference: Reference | None = None,
        emitted_at_ms: int = 0,
        closed_by: ClosedBy = "watermark",
        partitions_missing: Sequence[int] = (),
    ) -> WindowReport:
        """The window's report; drift-vs-reference figures need the references passed in."""
        c = self.config
        m = c.min_pairs
        t = self.paired_table
        n = t.n
        champ_rate = wilson(t.both_yes + t.champion_only, n, z=c.z, min_count=m)
        cand_rate = wilson(t.both_yes + t.candidate_only, n, z=c.z, min_count=m)
        yes_to_no, no_to_yes = conditional_flip_rates(t, z=c.z, min_count=m)
        paired = PairedReport(
            pairs=n,
            both_yes=t.both_yes,
            champion_yes_candidate_no=t.champion_only,
            champion_no_candidate_yes=t.candidate_only,
            both_no=t.both_no,
            champion_decision_rate=champ_rate,
            candidate_decision_rate=cand_rate,
            decision_rate_diff=paired_difference(t, z=c.z, min_count=m),
            decision_rate_ratio=paired_ratio(t, z=c.z, min_count=m),
            flip_yes_to_no=yes_to_no,
            flip_no_to_yes=no_to_yes,
            mcnemar=mcnemar(
                t.champion_only,
                t.candidate_only,
                exact_below=c.mcnemar_exact_below,
                n=n,
                min_count=m,
            ),
        )
        k = self.key
        champion = self._arm_report(
            self.champion, k.champion_model, k.champion_version, champ_rate, champion_reference
        )
        candidate = self._arm_report(
            self.candidate, k.candidate_model, k.candidate_version, cand_rate, candidate_reference
        )
        policy = self.policy
        counts = ReportCounts(
            records=self.records,
            duplicates=self.duplicates,
            late=self.late,
            served_champion=int(self.served[SERVED_CHAMPION]),
            served_candidate=int(self.served[SERVED_CANDIDATE]),
            served_none=int(self.served[SERVED_NONE]),
            dedupe_false_positive_rate=self.dedupe.false_positive_rate,
            out_of_range=self.out_of_range,
            out_of_range_features=dict(sorted(self.out_of_range_features.items())),
            champion_decides=policy.champion_decides,
            candidate_fallbacks=policy.candidate_fallbacks,
        )
        return WindowReport(
            rollout=k.rollout,
            window_start_ms=self.start_ms,
            window_end_ms=self.end_ms,
            champion=champion,
            candidate=candidate,
            counts=counts,
            paired=paired,
            drift_candidate_vs_champion=self._drift(self.champion.hist, self.candidate.hist),
            latency_p99_ratio=ratio_figure(candidate.latency.p99, champion.latency.p99),
            min_ts_ms=self.min_ts,
            max_ts_ms=self.max_ts,
            offsets=[
                OffsetRange(partition=p, first=f, last=la)
                for p, (f, la) in sorted(self.offsets.items())
            ],
            emitted_at_ms=emitted_at_ms,
            closed_by=closed_by,
            partitions_missing=list(partitions_missing),
            out_of_range_rate=wilson(self.out_of_range, self.records, z=c.z, min_count=m),
            policy_epoch_min=policy.epoch_min,
            policy_epoch_max=policy.epoch_max,
            policy_mode=policy.mode,
            policy_modes=dict(sorted(policy.modes.items())),
            champion_fallback_rate=wilson(
                policy.candidate_fallbacks, policy.champion_decides, z=c.z, min_count=m
            ),
            failures=paired_failures(self.failures, z=c.z, min_count=m),
            latency_paired=paired_latency(
                self.batches,
                margin=c.latency_margin,
                min_diff_ms=c.latency_min_diff_ms,
                min_batches=c.min_latency_batches,
                z=c.z,
            ),
            **self._kind_reports(),
        )

    def _kind_reports(self) -> dict[str, Any]:
        kinds = self.kinds
        if kinds is None:
            return {}
        c = self.config
        out: dict[str, Any] = {}
        if kinds.ranking is not None:
            out["ranking"] = kinds.ranking.report(z=c.z, min_pairs=c.min_pairs)
        if kinds.labels is not None:
            out["labels"] = kinds.labels.report(z=c.z, min_pairs=c.min_pairs)
        if kinds.regression is not None:
            out["regression"] = kinds.regression.report(z=c.z, min_pairs=c.min_pairs)
        return out


def merge_all(aggregates: Iterable[WindowAggregate]) -> WindowAggregate | None:
    """Merge several aggregates of the same window (e.g. one per partition) into the first."""
    it = iter(aggregates)
    first = next(it, None)
    if first is None:
        return None
    for other in it:
        first.merge(other)
    return first


__all__ = [
    "CHAMPION_DECIDES",
    "MAX_OUT_OF_RANGE_FEATURES",
    "MAX_POLICY_MODES",
    "OTHER_FEATURES",
    "PolicySeen",
    "Reference",
    "WindowAggregate",
    "merge_all",
]
