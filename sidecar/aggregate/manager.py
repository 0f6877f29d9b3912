"""``WindowManager``: routes batches to window aggregates, tracks the watermark, closes due
windows into reports (or, for a shared rollout, into per-partition partials)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .batch import (
    ComparisonBatch,
    GroupKey,
)
from .config import AggregatorConfig
from .histograms import (
    ScoreHistogram,
)
from .references import References
from .report import (
    ClosedBy,
    WindowReport,
)
from .window import Reference, WindowAggregate
from .windows import (
    Watermark,
)

log = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ClosedPartial:
    """A window closed in partials mode: one comparison partition's aggregate (maybe empty)."""

    partition: int
    aggregate: WindowAggregate
    closed_by: ClosedBy


@dataclass(slots=True)
class ProcessResult:
    """What one ``WindowManager.process`` call produced."""

    #: Windows closed by this call, oldest first: produce them to the reports topic.
    reports: list[WindowReport]
    #: Row indices (into the batch) of late records, whose windows had all closed already:
    #: dead-letter them; they are also counted in the next report of their rollout.
    late_indices: Int64Array
    #: Late records in this batch, per rollout.
    late_by_rollout: dict[str, int] = field(default_factory=dict)


class WindowManager:
    """Routes batches to window aggregates, tracks watermarks, closes windows, keeps references
    (see :class:`References`).

    With ``partials=True`` (stage 1 of a shared rollout, see ``partials``) windows are kept per
    comparison partition too, and a closed window is not reported: it is queued as one
    :class:`ClosedPartial` per assigned partition (empty for partitions without its records, so
    the merge stage need not wait for them) for :meth:`take_partials`.
    """

    def __init__(
        self,
        config: AggregatorConfig | None = None,
        *,
        partials: bool = False,
        clock_bound: bool = False,
        protected: GroupKey | None = None,
    ) -> None:
        self.config = config or AggregatorConfig()
        #: The pair the config runs: its windows are the last closed for capacity (made-up
        #: pairs filling ``max_open_windows`` must not close its window early, which makes
        #: the rest of that window's records late).
        self.protected = protected
        self.partials = partials
        self.spec = self.config.window_spec()
        self.watermark = Watermark(
            allowed_lateness_ms=self.config.allowed_lateness_ms,
            idle_timeout_ms=self.config.idle_timeout_ms,
            clock_bound=clock_bound,
        )
        #: Window keys: (group, comparison partition in partials mode, else None).
        self._keys: dict[tuple[GroupKey, int | None], int] = {}
        self._key_list: list[GroupKey] = []
        self._key_partition: list[int | None] = []
        self._first_seen: dict[int, int] = {}
        self._open: dict[tuple[int, int], WindowAggregate] = {}
        self._pending_late: dict[int, int] = {}
        self._closed_wm: int | None = None
        #: Windows closed early for capacity (oldest first, as many as may be open).
        self._closed_early: dict[tuple[int, int], None] = {}
        self._references = References(self.config)
        self._closed_partials: list[ClosedPartial] = []
        #: Partials already emitted (bounded, oldest first), so that a window closing on
        #: several partitions at once sends one partial (real or empty) per partition.
        self._emitted: dict[tuple[int, int], None] = {}
        #: Late records since start, per rollout (for metrics).
        self.late_total: dict[str, int] = {}

    # ------------------------------------------------------------------ configuration

    def set_reference(self, rollout: str, model: str, version: str, hist: ScoreHistogram) -> None:
        """Supply a model's reference score histogram (must use the configured edges)."""
        self._references.set((rollout, model, version), hist)

    def reference(self, rollout: str, model: str, version: str) -> Reference | None:
        return self._references.get((rollout, model, version))

    def take_partials(self) -> list[ClosedPartial]:
        """Windows closed in partials mode since the last call, oldest first."""
        out, self._closed_partials = self._closed_partials, []
        return out

    def assign_partitions(self, partitions: Iterable[int], now_ms: int) -> None:
        self.watermark.assign(partitions, now_ms)

    def revoke_partitions(self, partitions: Iterable[int]) -> None:
        self.watermark.revoke(partitions)

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def open_first_offsets(self) -> dict[int, int]:
        """Per partition, the first offset held by any open window.

        Committing no further than this makes the log the checkpoint of open windows: a
        restarted or rebalanced consumer re-reads and rebuilds them, nothing is lost.
        """
        out: dict[int, int] = {}
        for agg in self._open.values():
            for p, (first, _last) in agg.offsets.items():
                prev = out.get(p)
                out[p] = first if prev is None else min(prev, first)
        return out

    @property
    def closed_watermark(self) -> int | None:
        """Watermark up to which windows have been closed (records behind it are late)."""
        return self._closed_wm

    # ------------------------------------------------------------------ data path

    def _code(self, key: GroupKey, partition: int | None) -> int:
        code = self._keys.get((key, partition))
        if code is None:
            code = self._keys[(key, partition)] = len(self._key_list)
            self._key_list.append(key)
            self._key_partition.append(partition)
        return code

    def _row_codes(self, batch: ComparisonBatch) -> Int64Array:
        """Each row's window key code."""
        if not self.partials:
            codes = [self._code(k, None) for k in batch.keys]
            return np.asarray(codes, dtype=np.int64)[batch.key_code]
        pair = (batch.key_code.astype(np.int64) << 32) | batch.partition.astype(np.int64)
        uniq, inv = np.unique(pair, return_inverse=True)
        codes = [self._code(batch.keys[u >> 32], u & 0xFFFFFFFF) for u in uniq.tolist()]
        return np.asarray(codes, dtype=np.int64)[inv]

    def process(self, batch: ComparisonBatch, now_ms: int) -> ProcessResult:
        """Aggregate a batch, advance the watermark with it, and close due windows.

        Lateness is judged against the watermark reached *before* this batch (batch-granular
        watermarks: a batch never makes its own records late).
        """
        n = len(batch)
        if n == 0:
            return ProcessResult(self.advance(now_ms), np.zeros(0, dtype=np.int64))
        gcode = self._row_codes(batch)
        self._note_first_seen(gcode, batch.ts)
        rec, starts = self.spec.assign(batch.ts)
        late_idx = np.zeros(0, dtype=np.int64)
        late_by_rollout: dict[str, int] = {}
        if self._closed_wm is not None:
            closed = self.spec.closed(starts, self._closed_wm)
            if closed.any():
                open_count = np.bincount(rec[~closed], minlength=n)
                late_idx = np.flatnonzero(open_count == 0).astype(np.int64)
                rec, starts = rec[~closed], starts[~closed]
                late_by_rollout = self._count_late(gcode[late_idx])
        for rollout, count in self._route(batch, gcode, rec, starts).items():
            late_by_rollout[rollout] = late_by_rollout.get(rollout, 0) + count
        self.watermark.observe(batch.partition, batch.ts, now_ms)
        reports = self._close_due(now_ms)
        reports += self._close_over_capacity(now_ms)
        return ProcessResult(reports, late_idx, late_by_rollout)

    def advance(self, now_ms: int) -> list[WindowReport]:
        """Re-evaluate idleness without data (call on empty polls) and close due windows."""
        self.watermark.advance(now_ms)
        return self._close_due(now_ms)

    def flush(self, now_ms: int) -> list[WindowReport]:
        """Close every open window now (shutdown); their reports may cover partial windows."""
        return self._close(list(self._open), now_ms, "flush")

    def _close_over_capacity(self, now_ms: int) -> list[WindowReport]:
        excess = len(self._open) - self.config.max_open_windows
        if excess <= 0:
            return []
        keys = self._key_list
        oldest = sorted(self._open, key=lambda k: (keys[k[0]] == self.protected, k[1], k[0]))[
            :excess
        ]
        log.warning(
            "%d windows open, more than aggregate.max_open_windows=%d: closing the %d oldest "
            "early (is a partition's event time far behind the others?)",
            len(self._open),
            self.config.max_open_windows,
            excess,
        )
        for key in oldest:
            self._closed_early[key] = None
        while len(self._closed_early) > self.config.max_open_windows:
            del self._closed_early[next(iter(self._closed_early))]
        return self._close(oldest, now_ms, "capacity")

    def _note_first_seen(self, gcode: Int64Array, ts: Int64Array) -> None:
        uniq, inv = np.unique(gcode, return_inverse=True)
        if all(int(u) in self._first_seen for u in uniq):
            return
        mins = np.full(uniq.size, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(mins, inv, ts)
        for u, m in zip(uniq.tolist(), mins.tolist(), strict=True):
            self._first_seen.setdefault(u, m)

    def _count_late(self, late_codes: Int64Array) -> dict[str, int]:
        out: dict[str, int] = {}
        uniq, counts = np.unique(late_codes, return_counts=True)
        for code, cnt in zip(uniq.tolist(), counts.tolist(), strict=True):
            self._pending_late[code] = self._pending_late.get(code, 0) + cnt
            rollout = self._key_list[code].rollout
            out[rollout] = out.get(rollout, 0) + cnt
            self.late_total[rollout] = self.late_total.get(rollout, 0) + cnt
        return out

    def _route(
        self, batch: ComparisonBatch, gcode: Int64Array, rec: Int64Array, starts: Int64Array
    ) -> dict[str, int]:
        """Add rows to their windows; returns rows per rollout that fell in windows closed
        early for capacity (late: counted, not aggregated)."""
        if rec.size == 0:
            return {}
        codes = gcode[rec]
        order = np.lexsort((starts, codes))  # stable: keeps arrival order within a group
        codes, starts, rec = codes[order], starts[order], rec[order]
        cut = np.flatnonzero((np.diff(codes) != 0) | (np.diff(starts) != 0)) + 1
        bounds = np.concatenate(([0], cut, [rec.size]))
        # Fast path: one group holding the whole batch in arrival order needs no copy.
        whole = bounds.size == 2 and rec.size == len(batch) and self.spec.per_record == 1
        late: dict[str, int] = {}
        for i in range(bounds.size - 1):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            code, start = int(codes[lo]), int(starts[lo])
            agg = self._open.get((code, start))
            if agg is None:
                if self._closed_early and (code, start) in self._closed_early:
                    self._pending_late[code] = self._pending_late.get(code, 0) + hi - lo
                    rollout = self._key_list[code].rollout
                    late[rollout] = late.get(rollout, 0) + hi - lo
                    self.late_total[rollout] = self.late_total.get(rollout, 0) + hi - lo
                    continue
                agg = WindowAggregate(
                    self._key_list[code], start, start + self.spec.size_ms, self.config
                )
                self._open[(code, start)] = agg
            agg.add(batch if whole else batch.take(rec[lo:hi]))
        return late

    def _close_due(self, now_ms: int) -> list[WindowReport]:
        wm = self.watermark.current
        if wm is None or (self._closed_wm is not None and wm <= self._closed_wm):
            return []
        self._closed_wm = wm
        due = [k for k in self._open if self.spec.closes_at(k[1]) <= wm]
        return self._close(due, now_ms)

    def _close(
        self, due: list[tuple[int, int]], now_ms: int, closed_by: ClosedBy = "watermark"
    ) -> list[WindowReport]:
        reports = []
        for code, start in sorted(due, key=lambda k: (k[1], k[0])):
            agg = self._open.pop((code, start))
            agg.late += self._pending_late.pop(code, 0)
            if self.partials:
                self._close_partial(code, agg, closed_by)
                continue
            reports.append(
                self._references.report(
                    agg,
                    first_seen_ms=self._first_seen.get(code),
                    emitted_at_ms=now_ms,
                    closed_by=closed_by,
                )
            )
        return reports

    def _close_partial(self, code: int, agg: WindowAggregate, closed_by: ClosedBy) -> None:
        partition = self._key_partition[code]
        assert partition is not None
        self._closed_partials.append(ClosedPartial(partition, agg, closed_by))
        self._emitted[(code, agg.start_ms)] = None
        # Assigned partitions without this window get an empty partial (once, from whichever
        # partition closes first), so the merge stage does not wait out its timeout for them.
        start = agg.start_ms
        for other in self.watermark.partitions:
            if other == partition:
                continue
            other_code = self._code(agg.key, other)
            if (other_code, start) in self._open or (other_code, start) in self._emitted:
                continue
            empty = WindowAggregate(agg.key, start, agg.end_ms, self.config)
            empty.late += self._pending_late.pop(other_code, 0)
            self._closed_partials.append(ClosedPartial(other, empty, closed_by))
            self._emitted[(other_code, start)] = None
        while len(self._emitted) > 4 * self.config.max_open_windows:
            del self._emitted[next(iter(self._emitted))]


__all__ = ["ClosedPartial", "ProcessResult", "WindowManager"]
