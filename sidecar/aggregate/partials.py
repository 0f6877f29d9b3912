"""Per-partition window aggregates on the wire, and the merge stage that turns them into reports.

This is what lets several aggregator instances share one rollout. With
``topics.comparisons_key = "routing_key"`` the sidecar spreads a rollout's comparisons over every
partition of the comparison topic, so no instance sees a whole rollout. Stage 1 (every instance,
its own partitions) windows them as usual but closes each window into one ``WindowPartial`` per
(comparison partition, rollout pair, window), produced to ``aggregate.partials_topic`` keyed by
rollout. Stage 2 (the instance that owns the rollout's partition of that topic) merges a window's
partials, exactly (fixed histogram edges and counters), once every comparison partition has
reported or ``aggregate.merge_timeout_ms`` has passed since its first partial, then reports and
guards the merged window as a single instance would have.

Duplicates from at-least-once delivery stay exact: a duplicate comparison has the same routing
key, hence the same partition, and is removed there. A partial delivered twice (a crash between
producing it and committing) replaces the first copy rather than adding to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from ..contracts import OUTPUT_SCHEMA_VERSION
from .batch import GroupKey
from .config import AggregatorConfig
from .kinds import KindsPartial
from .references import References
from .report import ClosedBy, OffsetRange, WindowReport
from .window import WindowAggregate, _ArmState, _count_feature, _count_mode


class ArmPartial(msgspec.Struct, frozen=True, kw_only=True):
    """One arm's counters and histograms (latency bins sparse: most are empty)."""

    score_counts: list[int]
    score_nan: int
    score_missing: int
    latency_bins: dict[int, int]
    latency_missing: int
    #: Index 0: no error, then one count per error kind (``ERROR_KINDS`` order).
    errors: list[int]
    decided: int


class WindowPartial(msgspec.Struct, frozen=True, kw_only=True):
    """One comparison partition's share of a window, keyed by rollout on the partials topic."""

    rollout: str
    champion_model: str
    champion_version: str
    candidate_model: str
    candidate_version: str
    window_start_ms: int
    window_end_ms: int
    #: The comparison-topic partition this covers, and how many the topic has.
    partition: int
    partitions_total: int
    records: int
    duplicates: int
    late: int
    #: Served by none, champion, candidate.
    served: list[int]
    #: Paired decisions (champion, candidate): no/no, no/yes, yes/no, yes/yes.
    paired: list[int]
    champion: ArmPartial
    candidate: ArmPartial
    offsets: list[OffsetRange]
    min_ts_ms: int | None
    max_ts_ms: int | None
    out_of_range: int = 0
    out_of_range_features: dict[str, int] = {}
    emitted_at_ms: int = 0
    #: Lowest and highest ``policy_epoch`` of the records, the mode of the highest, records
    #: per mode (see ``WindowReport``).
    policy_epoch_min: int | None = None
    policy_epoch_max: int | None = None
    policy_mode: str | None = None
    policy_modes: dict[str, int] = {}
    #: Records under a mode where the champion decides, and the candidate's fallbacks among
    #: them.
    champion_decides: int = 0
    candidate_fallbacks: int = 0
    #: The paired failure table (``paired.FAILURE_SLOTS`` counters; empty: none reported),
    #: and the hashes of the distinct calls the candidate alone failed / timed out on.
    failures: list[int] = []
    failed_error_calls: list[int] = []
    failed_timeout_calls: list[int] = []
    #: The distinct batches' latencies (a bottom-k sample, see ``paired.BatchLatencies``).
    batch_champion_ms: list[float] = []
    batch_candidate_ms: list[float] = []
    schema_version: str = OUTPUT_SCHEMA_VERSION
    #: Non-binary models' state (rankings, labels, regression values; see
    #: ``sidecar.aggregate.kinds``); None when the window had none.
    kinds: KindsPartial | None = None

    @property
    def key(self) -> GroupKey:
        return GroupKey(
            self.rollout,
            self.champion_model,
            self.champion_version,
            self.candidate_model,
            self.candidate_version,
        )


def _arm_partial(arm: _ArmState) -> ArmPartial:
    bins = np.flatnonzero(arm.latency.counts)
    return ArmPartial(
        score_counts=arm.hist.counts.tolist(),
        score_nan=arm.hist.nan,
        score_missing=arm.hist.missing,
        latency_bins=dict(zip(bins.tolist(), arm.latency.counts[bins].tolist(), strict=True)),
        latency_missing=arm.latency.missing,
        errors=arm.errors.tolist(),
        decided=arm.decided,
    )


def _load_arm(arm: _ArmState, part: ArmPartial) -> None:
    if len(part.score_counts) != arm.hist.counts.size or len(part.errors) != arm.errors.size:
        raise ValueError(
            "partial has other score bins or error kinds than this aggregator: run every "
            "instance with the same [aggregate] settings and version"
        )
    size = arm.latency.counts.size
    if any(not 0 <= b < size for b in part.latency_bins):
        raise ValueError("partial has latency bins this aggregator does not have")
    arm.hist.counts[:] = part.score_counts
    arm.hist.nan, arm.hist.missing = part.score_nan, part.score_missing
    arm.latency.counts[list(part.latency_bins)] = list(part.latency_bins.values())
    arm.latency.missing = part.latency_missing
    arm.errors[:] = part.errors
    arm.decided = part.decided


def partial_of(
    agg: WindowAggregate, partition: int, partitions_total: int, emitted_at_ms: int
) -> WindowPartial:
    """``agg`` (one partition's aggregate) as a wire partial; its dedupe set stays behind."""
    k = agg.key
    return WindowPartial(
        rollout=k.rollout,
        champion_model=k.champion_model,
        champion_version=k.champion_version,
        candidate_model=k.candidate_model,
        candidate_version=k.candidate_version,
        window_start_ms=agg.start_ms,
        window_end_ms=agg.end_ms,
        partition=partition,
        partitions_total=partitions_total,
        records=agg.records,
        duplicates=agg.duplicates,
        late=agg.late,
        served=agg.served.tolist(),
        paired=agg.table.tolist(),
        champion=_arm_partial(agg.champion),
        candidate=_arm_partial(agg.candidate),
        offsets=[OffsetRange(partition=p, first=f, last=la) for p, (f, la) in agg.offsets.items()],
        min_ts_ms=agg.min_ts,
        max_ts_ms=agg.max_ts,
        out_of_range=agg.out_of_range,
        out_of_range_features=dict(agg.out_of_range_features),
        emitted_at_ms=emitted_at_ms,
        policy_epoch_min=agg.policy.epoch_min,
        policy_epoch_max=agg.policy.epoch_max,
        policy_mode=agg.policy.mode,
        policy_modes=dict(agg.policy.modes),
        champion_decides=agg.policy.champion_decides,
        candidate_fallbacks=agg.policy.candidate_fallbacks,
        failures=agg.failures.counts.tolist(),
        failed_error_calls=agg.failures.error_calls.keys.tolist(),
        failed_timeout_calls=agg.failures.timeout_calls.keys.tolist(),
        batch_champion_ms=agg.batches.champion.tolist(),
        batch_candidate_ms=agg.batches.candidate.tolist(),
        kinds=None if agg.kinds is None else agg.kinds.to_wire(),
    )


#: More partitions than any comparisons topic has: a partial claiming more is refused (the
#: merge stage would wait for, and list as missing, every one of them).
MAX_PARTITIONS = 65_536


def aggregate_of(partial: WindowPartial, config: AggregatorConfig) -> WindowAggregate:
    """The ``WindowAggregate`` a partial was made from (without its dedupe set). Raises
    ``ValueError`` for a partial no aggregator of these settings makes (the partials topic
    is untrusted like any other)."""
    if not 0 <= partial.partition < partial.partitions_total <= MAX_PARTITIONS:
        raise ValueError(
            f"partial claims partition {partial.partition} of {partial.partitions_total} "
            f"(at most {MAX_PARTITIONS} partitions)"
        )
    size = config.window_spec().size_ms
    if partial.window_end_ms - partial.window_start_ms != size:
        raise ValueError(
            f"partial window [{partial.window_start_ms}, {partial.window_end_ms}) is not "
            f"{size} ms long: run every instance with the same [aggregate] settings and version"
        )
    agg = WindowAggregate(partial.key, partial.window_start_ms, partial.window_end_ms, config)
    if len(partial.served) != 3 or len(partial.paired) != 4:
        raise ValueError("partial has a malformed served or paired table")
    agg.records, agg.duplicates, agg.late = partial.records, partial.duplicates, partial.late
    agg.served[:] = partial.served
    agg.table[:] = partial.paired
    _load_arm(agg.champion, partial.champion)
    _load_arm(agg.candidate, partial.candidate)
    agg.offsets = {o.partition: (o.first, o.last) for o in partial.offsets}
    agg.min_ts, agg.max_ts = partial.min_ts_ms, partial.max_ts_ms
    agg.out_of_range = partial.out_of_range
    for name, count in partial.out_of_range_features.items():
        _count_feature(agg.out_of_range_features, name, count)  # bounded, like a window's own
    policy = agg.policy
    if (partial.policy_epoch_min is None) != (partial.policy_epoch_max is None):
        raise ValueError("partial has only one of policy_epoch_min and policy_epoch_max")
    policy.epoch_min, policy.epoch_max = partial.policy_epoch_min, partial.policy_epoch_max
    policy.mode = partial.policy_mode
    for name, count in partial.policy_modes.items():
        _count_mode(policy.modes, name, count)  # bounded, like a window's own
    policy.champion_decides = partial.champion_decides
    policy.candidate_fallbacks = partial.candidate_fallbacks
    if partial.failures:
        if len(partial.failures) != agg.failures.counts.size:
            raise ValueError("partial has another failure table than this aggregator")
        agg.failures.counts[:] = partial.failures
    agg.failures.error_calls.add(np.asarray(partial.failed_error_calls, dtype=np.uint64))
    agg.failures.timeout_calls.add(np.asarray(partial.failed_timeout_calls, dtype=np.uint64))
    agg.batches.load(partial.batch_champion_ms, partial.batch_candidate_ms)
    if partial.kinds is not None:
        agg._kind_state().load(partial.kinds)
    counters = (
        agg.records, agg.duplicates, agg.late, agg.out_of_range, agg.champion.hist.nan,
        agg.champion.hist.missing, agg.candidate.hist.nan, agg.candidate.hist.missing,
        agg.champion.latency.missing, agg.candidate.latency.missing, agg.champion.decided,
        agg.candidate.decided, policy.champion_decides, policy.candidate_fallbacks,
    )  # fmt: skip
    tables = (
        agg.served, agg.table, agg.failures.counts, agg.champion.hist.counts,
        agg.candidate.hist.counts, agg.champion.latency.counts, agg.candidate.latency.counts,
        agg.champion.errors, agg.candidate.errors,
    )  # fmt: skip
    named = (*agg.out_of_range_features.values(), *policy.modes.values())
    if (
        min(counters) < 0
        or min(named, default=0) < 0
        or any(t.size and t.min() < 0 for t in tables)
    ):
        raise ValueError("partial has negative counts")
    return agg


@dataclass(slots=True)
class _Pending:
    """A window waiting for the partials of every comparison partition (each kept as the
    aggregate it was checked into on arrival)."""

    partials: dict[int, WindowAggregate]
    total: int
    first_arrival_ms: int
    #: Partials-topic (partition, offset) of each partial held, for safe commits.
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class MergeResult:
    reports: list[WindowReport]
    #: Partials for windows already reported (arrived after their merge): counted, dropped.
    late_partials: int = 0


class PartialMerger:
    """Stage 2: collects ``WindowPartial``s per window, merges and reports complete windows.

    Each partial is checked on arrival (:func:`aggregate_of`): one that raises changes
    nothing (it neither replaces a good partial nor takes its window down with it at the
    merge). At most ``max_open_windows`` windows wait at once (made-up rollout names could
    otherwise hold any number): past it the oldest is reported early (``closed_by =
    "capacity"``), as stage 1 does.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        timeout_ms: int,
        partitions: Callable[[], int | None] | None = None,
    ) -> None:
        self.config = config
        self.timeout_ms = timeout_ms
        #: The comparisons topic's partition count as the stage's client knows it now (None:
        #: not known). A window waits for at most that many partitions, whatever a partial
        #: claims: one record claiming 65,536 would otherwise hold its window until the merge
        #: timeout (and the guards on it) and list ~65,000 missing partitions. Read live, so
        #: a grown topic counts as soon as the client's metadata shows it.
        self._partitions = partitions
        self._pending: dict[tuple[GroupKey, int], _Pending] = {}
        #: Windows already reported (bounded, oldest first): a partial for one is late.
        self._done: dict[tuple[GroupKey, int], None] = {}
        self._first_seen: dict[GroupKey, int] = {}
        self.references = References(config)

    @property
    def pending_windows(self) -> int:
        return len(self._pending)

    def known_partitions(self) -> int | None:
        """The comparisons topic's partition count as known now (None: not known)."""
        return self._partitions() if self._partitions is not None else None

    def add(self, partial: WindowPartial, position: tuple[int, int], now_ms: int) -> MergeResult:
        """Take one partial (``position``: its partials-topic partition and offset)."""
        wkey = (partial.key, partial.window_start_ms)
        if wkey in self._done:
            return MergeResult([], late_partials=1)
        agg = aggregate_of(partial, self.config)  # raises before anything changes
        if partial.min_ts_ms is not None:
            seen = self._first_seen.pop(partial.key, None)
            self._first_seen[partial.key] = (
                partial.min_ts_ms if seen is None else min(seen, partial.min_ts_ms)
            )
            while len(self._first_seen) > self._limit:
                del self._first_seen[next(iter(self._first_seen))]
        claimed = partial.partitions_total
        known = self.known_partitions()
        if known:
            claimed = min(claimed, known)
        pending = self._pending.get(wkey)
        if pending is None:
            pending = self._pending[wkey] = _Pending({}, claimed, now_ms)
        pending.partials[partial.partition] = agg  # a re-delivered partial replaces itself
        pending.positions[partial.partition] = position
        pending.total = max(pending.total, claimed)
        reports = []
        held = pending.partials
        if len(held) >= pending.total and all(p in held for p in range(pending.total)):
            reports.append(self._report(wkey, now_ms, "watermark"))
        while len(self._pending) > self._limit:
            oldest = min(
                self._pending, key=lambda k: (self._pending[k].first_arrival_ms, *_order(k))
            )
            reports.append(self._report(oldest, now_ms, "capacity"))
        return MergeResult(reports)

    @property
    def _limit(self) -> int:
        return max(self.config.max_open_windows, 1)

    def tick(self, now_ms: int) -> list[WindowReport]:
        """Report windows whose partials stopped coming (``merge_timeout``), oldest first."""
        due = [
            k for k, p in self._pending.items() if now_ms - p.first_arrival_ms >= self.timeout_ms
        ]
        return [self._report(k, now_ms, "merge_timeout") for k in sorted(due, key=_order)]

    def open_first_offsets(self) -> dict[int, int]:
        """Per partials-topic partition, the first offset still held by a pending window."""
        out: dict[int, int] = {}
        for pending in self._pending.values():
            for part, offset in pending.positions.values():
                out[part] = min(out.get(part, offset), offset)
        return out

    def _report(self, wkey: tuple[GroupKey, int], now_ms: int, closed_by: ClosedBy) -> WindowReport:
        pending = self._pending.pop(wkey)
        parts = iter(agg for _, agg in sorted(pending.partials.items()))
        merged = next(parts)
        for agg in parts:
            merged.merge(agg)
        self._done[wkey] = None
        while len(self._done) > max(self.config.max_open_windows, 1):
            del self._done[next(iter(self._done))]
        missing = sorted(set(range(pending.total)) - set(pending.partials))
        return self.references.report(
            merged,
            first_seen_ms=self._first_seen.get(wkey[0]),
            emitted_at_ms=now_ms,
            closed_by=closed_by,
            partitions_missing=missing,
        )


def _order(wkey: tuple[GroupKey, int]) -> tuple[int, GroupKey]:
    return wkey[1], wkey[0]


__all__ = [
    "MAX_PARTITIONS",
    "ArmPartial",
    "MergeResult",
    "PartialMerger",
    "WindowPartial",
    "aggregate_of",
    "partial_of",
]
