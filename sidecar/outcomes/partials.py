"""Quality windows of a shared rollout on the wire, and their merge (pure: no Kafka).

With ``topics.comparisons_key = "routing_key"`` a rollout's comparisons are spread over every
partition, so every task holds a share of each of its windows, and any number of ``sidecar
outcomes`` instances may own the tasks. Each task sends, per rollout pair and window, a
``QualityPartial`` to ``outcomes.partials_topic`` (compacted, on the partition of the rollout,
key ``partial/<pair>/<window>/<task>/<status>``: a task's newer provisional partial replaces
its older ones, its final one is kept apart):
provisional ones while the window is mature and changing, and one final one (empty when the
task has nothing of the window) once the task's stream time passes the window's final time;
only then does the task mark the window final in its store.

The merge stage (one owner per partition of the partials topic, hence per rollout) keeps the
latest partial of each task per window (:class:`QualityMerger`): a provisional report when
the partials changed, the final report when every task's final partial is in (or
``outcomes.merge_timeout_ms`` after its first final partial: ``tasks_missing`` says which
were not, and their latest provisional partials are counted), then the pair's verdict over its
final windows. A merged window goes back to the partials topic as a ``MergedQualityWindow``
(key ``merged/<pair>/<window>``): rebuilt from the topic, the merger counts that window once,
from that record, whatever partials of it are read again or arrive late; tombstones for the
window's partials follow it. The one exception: a missing task's final partial arriving
after the merge (a lagging or restoring instance) replaces the provisional share counted for
it, and the window is merged and reported final again, naming fewer missing tasks (the
record keeps the shares it counted for missing tasks, ``held``, so that a rebuilt merger can
still do so).

A pair whose windows are all merged, once the tasks' stream time (the latest a partial carried)
is ``outcomes.retire_after_ms`` past the end of its last merged window (plus the longest label
window, lateness and grace: see ``OutcomesSettings.merge_retire_horizon_ms``), is retired: the
merger forgets it (:meth:`QualityMerger.retire`) and the stage tombstones its merged windows and
partials, so that reading the topic back stays bounded by the live pairs' windows. A partial of
a window that old and not open is too late (counted in ``late_partials``): it never opens a
retired pair's window again; a partial of a newer window starts the pair afresh.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import msgspec
import numpy as np
import numpy.typing as npt

from ..contracts import OUTPUT_SCHEMA_VERSION
from .heartbeat import MAX_PARTITIONS
from .quality import FloatArray, Layout
from .ranking import PairedRankingQuality
from .report import (
    Judging,
    MissingRule,
    PairKey,
    PairNames,
    QualityReport,
    QualityRequirement,
    QualityVerdict,
    ReportStatus,
    quality_report,
    quality_verdict,
)


class _PairWindow(PairNames, frozen=True, kw_only=True):
    """A rollout pair's quality window: what both records of the partials topic are about."""

    window_start_ms: int
    window_end_ms: int


class QualityPartial(_PairWindow, frozen=True, kw_only=True, tag="partial", tag_field="kind"):
    """One task's share of a rollout pair's quality window (``outcomes.partials_topic``)."""

    #: The task (comparison-topic partition) this covers, and how many tasks there are.
    task: int
    tasks_total: int
    #: ``final``: the task's last word on the window (its stream time passed ``final_at_ms``).
    status: ReportStatus
    #: The task's stream time when it sent this, and when the window is final.
    stream_time_ms: int
    final_at_ms: int
    #: The judging settings the pair started with (the report's and verdict's).
    label_window_ms: int
    missing: MissingRule
    requirement: QualityRequirement
    #: The window's quality accumulator, sparse: its size (checked against the merger's
    #: layout) and the positions and values of its non-zero entries.
    size: int
    index: list[int] = []
    values: list[float] = []
    #: The window's ranking accumulator (``PairedRankingQuality.to_list()``); null: none.
    ranking: list[float] | None = None
    emitted_at_ms: int = 0
    schema_version: str = OUTPUT_SCHEMA_VERSION


class HeldShare(msgspec.Struct, frozen=True, kw_only=True):
    """A task's provisional share that a window merged without its final partial counted."""

    task: int
    index: list[int] = []
    values: list[float] = []
    ranking: list[float] | None = None


class MergedQualityWindow(_PairWindow, frozen=True, kw_only=True, tag="merged", tag_field="kind"):
    """A window the merge stage reported final (same topic): what it counted, so that a
    merger rebuilt from the topic counts it once and reports it no more. When tasks were
    missing, a later record of the window (same key) names fewer: their final partials came
    after all and replaced the provisional shares counted for them (``held``)."""

    requirement: QualityRequirement
    size: int
    index: list[int] = []
    values: list[float] = []
    ranking: list[float] | None = None
    #: Tasks whose final partial was not in when the window was merged (merge timeout).
    tasks_missing: list[int] = []
    #: The shares of tasks in ``tasks_missing`` that are counted above (their latest
    #: provisional partials; a missing task with none has none here).
    held: list[HeldShare] = []
    emitted_at_ms: int = 0
    schema_version: str = OUTPUT_SCHEMA_VERSION


PartialsRecord = QualityPartial | MergedQualityWindow
DECODER = msgspec.json.Decoder(PartialsRecord)


def pair_hash(key: PairKey) -> str:
    return f"{zlib.crc32(repr(tuple(key)).encode()):08x}"


def partial_key(key: PairKey, window_start_ms: int, task: int, status: str = "final") -> bytes:
    """Per (pair, window, task, status): a task's newer provisional partial replaces its older
    ones, and its final one is kept apart, so that compaction never lets a stale provisional
    (written late, in a rebalance) replace the final one (the merger never lets it either)."""
    return f"partial/{key.rollout}/{pair_hash(key)}/{window_start_ms}/{task}/{status}".encode()


def merged_key(key: PairKey, window_start_ms: int) -> bytes:
    return f"merged/{key.rollout}/{pair_hash(key)}/{window_start_ms}".encode()


def sparse(acc: FloatArray) -> tuple[list[int], list[float]]:
    index = np.flatnonzero(acc)
    return index.tolist(), acc[index].tolist()


def dense(layout: Layout, size: int, index: list[int], values: list[float]) -> FloatArray:
    """The accumulator of a sparse one; ValueError when it is of another layout or malformed
    (the topic is read like any other: untrusted)."""
    if size != layout.size:
        raise ValueError(
            f"accumulator of {size} values, expected {layout.size}: run every outcomes "
            "instance with the same [outcomes] bins"
        )
    if len(index) != len(values):
        raise ValueError("accumulator index and values differ in length")
    acc = layout.zeros()
    if index:
        at = np.asarray(index, dtype=np.int64)
        if at.min() < 0 or at.max() >= size:
            raise ValueError("accumulator index out of range")
        if np.unique(at).size != at.size:
            raise ValueError("accumulator index repeats a position")
        acc[at] = values
    return acc


def ranking_of(values: list[float] | None) -> PairedRankingQuality | None:
    return None if values is None else PairedRankingQuality.from_list(values)


def merge_ranking(
    acc: PairedRankingQuality | None, more: PairedRankingQuality | None
) -> PairedRankingQuality | None:
    """Two ranking accumulators merged into a new one (one of another ``k``, after a config
    change, is left out: its figures are of another k)."""
    if more is None:
        return acc
    if acc is None:
        return PairedRankingQuality.from_list(more.to_list())
    return acc.merge(more) if more.k == acc.k else acc


def partial_of(
    key: PairKey,
    window_start_ms: int,
    window_end_ms: int,
    *,
    task: int,
    tasks_total: int,
    status: ReportStatus,
    stream_time_ms: int,
    final_at_ms: int,
    label_window_ms: int,
    missing: MissingRule,
    requirement: QualityRequirement,
    acc: FloatArray,
    ranking: PairedRankingQuality | None,
    emitted_at_ms: int,
) -> QualityPartial:
    index, values = sparse(acc)
    return QualityPartial(
        **key._asdict(),
        window_start_ms=window_start_ms,
        window_end_ms=window_end_ms,
        task=task,
        tasks_total=tasks_total,
        status=status,
        stream_time_ms=stream_time_ms,
        final_at_ms=final_at_ms,
        label_window_ms=label_window_ms,
        missing=missing,
        requirement=requirement,
        size=acc.size,
        index=index,
        values=values,
        ranking=None if ranking is None else ranking.to_list(),
        emitted_at_ms=emitted_at_ms,
    )


@dataclass(slots=True)
class _Share:
    """A task's partial as the merger holds it: its fields, its accumulator's non-zero entries
    as numpy arrays (12 bytes an entry, not a Python float and int each: a merge stage may hold
    thousands of windows of a long label window)."""

    meta: QualityPartial  # without its index and values
    index: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]

    @classmethod
    def of(cls, partial: QualityPartial) -> _Share:
        return cls(
            msgspec.structs.replace(partial, index=[], values=[]),
            np.asarray(partial.index, dtype=np.int32),
            np.asarray(partial.values, dtype=np.float64),
        )

    def same(self, other: _Share) -> bool:
        return (
            self.meta == other.meta
            and np.array_equal(self.index, other.index)
            and np.array_equal(self.values, other.values)
        )


@dataclass(slots=True)
class _Window:
    """A window of a pair not reported final yet: the latest partial of each task."""

    partials: dict[int, _Share]
    total: int
    #: When the first final partial arrived (the merge timeout runs from it: provisional
    #: partials may come for days before a window is final).
    first_final_ms: int | None = None
    #: Partials changed since the last provisional report.
    changed: bool = True

    def finals(self) -> set[int]:
        return {t for t, p in self.partials.items() if p.meta.status == "final"}


@dataclass(slots=True)
class _Late:
    """A window merged final without some tasks' final partials (the merge timeout passed):
    what it counted, so that a missing task's final partial arriving later replaces the
    provisional share counted for it (each missing task at most once)."""

    acc: FloatArray
    ranking: PairedRankingQuality | None
    missing: set[int]
    #: Per missing task: its share counted in ``acc`` (its latest provisional partial).
    held: dict[int, _Held]
    window_end_ms: int
    requirement: QualityRequirement
    #: The settings the window's report is made with (the latest partial's; None when the
    #: window was read back from the topic: the amending partial's are used).
    meta: QualityPartial | None = None

    def record_held(self) -> list[HeldShare]:
        return [
            HeldShare(
                task=task,
                index=h.index.tolist(),
                values=h.values.tolist(),
                ranking=None if h.ranking is None else h.ranking.to_list(),
            )
            for task, h in sorted(self.held.items())
        ]


@dataclass(slots=True)
class _Held:
    """A share counted for a task that was missing: its accumulator's non-zero entries."""

    index: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    ranking: PairedRankingQuality | None

    def dense(self, layout: Layout) -> FloatArray:
        acc = layout.zeros()
        acc[self.index] = self.values
        return acc


def _ranking_minus(
    acc: PairedRankingQuality | None, less: PairedRankingQuality | None
) -> PairedRankingQuality | None:
    """``acc`` without ``less`` (a new accumulator; one of another ``k`` was never merged
    into it: see :func:`merge_ranking`)."""
    if acc is None or less is None or less.k != acc.k:
        return acc
    out = PairedRankingQuality.from_list(acc.to_list())
    out.state -= less.state
    return out


@dataclass(slots=True)
class _Totals:
    """A pair's final windows, merged (the verdict's)."""

    acc: FloatArray
    requirement: QualityRequirement
    ranking: PairedRankingQuality | None = None
    windows: int = 0
    first_start: int | None = None
    last_end: int | None = None

    def add(
        self,
        acc: FloatArray,
        ranking: PairedRankingQuality | None,
        start: int,
        end: int,
        requirement: QualityRequirement,
    ) -> None:
        self.acc += acc
        self.ranking = merge_ranking(self.ranking, ranking)
        self.requirement = requirement
        if acc.any():  # as a task counts its final windows
            self._count(start, end)

    def replace(
        self,
        old: tuple[FloatArray, PairedRankingQuality | None],
        new: tuple[FloatArray, PairedRankingQuality | None],
        start: int,
        end: int,
    ) -> None:
        """A final window counted as ``old`` counts as ``new`` (a late task's share in)."""
        self.acc += new[0] - old[0]
        self.ranking = merge_ranking(_ranking_minus(self.ranking, old[1]), new[1])
        if new[0].any() and not old[0].any():
            self._count(start, end)

    def _count(self, start: int, end: int) -> None:
        self.windows += 1
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = end if self.last_end is None else max(self.last_end, end)


@dataclass(slots=True)
class Merged:
    """A window merged final: its report, the record that says so (for the partials topic),
    and the pair's verdict after it (None while no final window had data)."""

    report: QualityReport
    record: MergedQualityWindow
    verdict: QualityVerdict | None


@dataclass(slots=True)
class MergeOutput:
    provisional: list[QualityReport] = field(default_factory=list)
    final: list[Merged] = field(default_factory=list)


class QualityMerger:
    """Stage 2 of a shared rollout: per pair and window, the latest partial of each task."""

    def __init__(
        self,
        layout: Layout,
        judging: Judging,
        timeout_ms: int,
        retire_horizon_ms: int = 0,
        max_future_ms: int | None = None,
        max_tasks: int = MAX_PARTITIONS,
    ) -> None:
        self.layout = layout
        #: The tasks a rollout can have: the comparisons topic's partitions, where the stage
        #: knows them. A partial or merged record naming more is refused: the merge waits
        #: for, lists as missing, and at retirement deletes the partials of every task named.
        self.max_tasks = min(max_tasks, MAX_PARTITIONS)
        self.judging = judging
        self.timeout_ms = timeout_ms
        #: A pair with no open window is retired once the stream time is this far past the
        #: end of its last merged window (0: never).
        self.retire_horizon_ms = retire_horizon_ms
        #: A partial's stream time counts at most this far ahead of the clock it is added at
        #: (None: any): one hostile or broken record dated in the year 3000 must not make
        #: every pair look idle for ever (retired, its next partials refused as too old).
        self.max_future_ms = max_future_ms
        self._open: dict[tuple[PairKey, int], _Window] = {}
        #: Windows merged final (from this merger or the topic), per pair: start -> end.
        #: Later partials of them are late.
        self._done: dict[PairKey, dict[int, int]] = {}
        self._totals: dict[PairKey, _Totals] = {}
        #: Merged windows some tasks were missing from, and those of them whose late final
        #: partial came in since (reported final again by the next :meth:`due`).
        self._late: dict[tuple[PairKey, int], _Late] = {}
        self._amended: dict[tuple[PairKey, int], None] = {}
        #: Most tasks a partial of the pair named (which partial keys it may have).
        self._tasks: dict[PairKey, int] = {}
        #: Partials for windows already merged final (or too old to open): counted, dropped.
        self.late_partials = 0
        #: The latest stream time a partial carried (the tasks' clock, as far as known).
        self.stream_ms = 0
        #: Pairs retired so far.
        self.retired = 0

    @property
    def pairs(self) -> set[PairKey]:
        """The pairs this merger holds (open or merged windows)."""
        return set(self._done) | {k for k, _ in self._open}

    @property
    def rollouts(self) -> set[str]:
        """Rollouts with a pair this merger holds (open or merged windows)."""
        return {k.rollout for k in self.pairs}

    def _is_done(self, key: PairKey, ws: int) -> bool:
        done = self._done.get(key)
        return done is not None and ws in done

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def add(self, partial: QualityPartial, now_ms: int) -> None:
        """Take one partial (any order; read again: it replaces itself). Raises ValueError
        for one of another layout (before it changes anything)."""
        dense(self.layout, partial.size, partial.index, partial.values)
        ranking_of(partial.ranking)
        if not 0 <= partial.task < partial.tasks_total <= self.max_tasks:
            raise ValueError(
                f"partial of task {partial.task} of {partial.tasks_total} (at most "
                f"{self.max_tasks} tasks: one per comparisons partition)"
            )
        wkey = (partial.key, partial.window_start_ms)
        stream = partial.stream_time_ms
        if self.max_future_ms is not None:
            stream = min(stream, now_ms + self.max_future_ms)
        self.stream_ms = max(self.stream_ms, stream)
        if self._is_done(*wkey):
            late = self._late.get(wkey)
            if late is not None and partial.status == "final" and partial.task in late.missing:
                self._amend(wkey, late, partial)
            else:
                self.late_partials += 1
            return
        window = self._open.get(wkey)
        if window is None:
            if self._too_old(partial.window_end_ms):
                self.late_partials += 1  # e.g. a retired pair's straggler
                return
            window = self._open[wkey] = _Window({}, partial.tasks_total)
        self._tasks[partial.key] = max(self._tasks.get(partial.key, 0), partial.tasks_total)
        held = window.partials.get(partial.task)
        if held is not None and held.meta.status == "final":
            if partial.status != "final":
                return  # a task's final word stands
            if (held.index.size or held.meta.ranking is not None) and not (
                partial.index or partial.ranking is not None
            ):
                return  # and an empty one (a task that retired the pair) never replaces it
        share = _Share.of(partial)
        if held is None or not held.same(share):
            window.partials[partial.task] = share
            window.changed = True
        if partial.status == "final" and window.first_final_ms is None:
            window.first_final_ms = now_ms
        window.total = max(window.total, partial.tasks_total)

    def _amend(self, wkey: tuple[PairKey, int], late: _Late, partial: QualityPartial) -> None:
        """A missing task's final partial, after its window was merged: it replaces the
        share counted for the task, in the window and in the pair's totals."""
        key, ws = wkey
        held = late.held.pop(partial.task, None)
        acc = late.acc + dense(self.layout, partial.size, partial.index, partial.values)
        ranking = merge_ranking(late.ranking, ranking_of(partial.ranking))
        if held is not None:
            acc -= held.dense(self.layout)
            ranking = _ranking_minus(ranking, held.ranking)
        self._total(key, late.requirement).replace(
            (late.acc, late.ranking), (acc, ranking), ws, late.window_end_ms
        )
        late.acc, late.ranking = acc, ranking
        late.missing.discard(partial.task)
        late.meta = msgspec.structs.replace(partial, index=[], values=[])
        self._amended[wkey] = None

    def add_merged(self, record: MergedQualityWindow) -> None:
        """A window merged final before (read back from the topic): count it once. A record
        of a window counted already counts only when it names fewer missing tasks than
        counted (a late task's share came in: see :meth:`_amend`); it then replaces it."""
        acc = dense(self.layout, record.size, record.index, record.values)
        ranking = ranking_of(record.ranking)
        held = {h.task: _held(self.layout, record, h) for h in record.held}
        missing = set(record.tasks_missing)
        if not set(held) <= missing or len(held) != len(record.held):
            raise ValueError("merged window holds shares of tasks it does not name missing")
        if missing and not 0 <= min(missing) <= max(missing) < self.max_tasks:
            raise ValueError(f"merged window names a task outside 0..{self.max_tasks - 1}")
        wkey = (record.key, record.window_start_ms)
        self._open.pop(wkey, None)
        late = self._late.get(wkey)
        if self._is_done(*wkey):
            counted = late.missing if late is not None else set()
            if missing == counted:  # published already (this merger's own, read back)
                self._amended.pop(wkey, None)
            if late is None or not missing < counted:
                return
            self._total(record.key, record.requirement).replace(
                (late.acc, late.ranking), (acc, ranking), *wkey[1:], record.window_end_ms
            )
            self._amended.pop(wkey, None)
        else:
            self._done.setdefault(record.key, {})[record.window_start_ms] = record.window_end_ms
            self._total(record.key, record.requirement).add(
                acc, ranking, record.window_start_ms, record.window_end_ms, record.requirement
            )
        if missing:
            self._late[wkey] = _Late(
                acc, ranking, missing, held, record.window_end_ms, record.requirement
            )
        else:
            self._late.pop(wkey, None)

    def forget_merged(self, key: bytes) -> None:
        """A tombstone of a merged window's record (``merged_key``) read back: the window was
        forgotten with its retired pair (a read-back before compaction sees both)."""
        head, _, start = key.rpartition(b"/")
        head, _, digest = head.rpartition(b"/")
        prefix = b"merged/"
        if not head.startswith(prefix) or not start.isdigit():
            return
        rollout, ws = head[len(prefix) :].decode(errors="replace"), int(start)
        for pair in [k for k in self._done if k.rollout == rollout]:
            if pair_hash(pair).encode() == digest and ws in self._done[pair]:
                self._forget_window(pair, ws)

    def _forget_window(self, key: PairKey, ws: int) -> None:
        done = self._done[key]
        del done[ws]
        self._late.pop((key, ws), None)
        self._amended.pop((key, ws), None)
        if not done:
            del self._done[key]
            self._totals.pop(key, None)
            if not any(k == key for k, _ in self._open):
                self._tasks.pop(key, None)

    def _too_old(self, window_end_ms: int) -> bool:
        return bool(self.retire_horizon_ms) and (
            window_end_ms + self.retire_horizon_ms <= self.stream_ms
        )

    def retire(self) -> list[tuple[PairKey, list[int], int]]:
        """Forget the pairs with no open window whose last merged window ended
        ``retire_horizon_ms`` before the stream time: per pair, its merged window starts and
        the most tasks its partials named (the stage tombstones their records)."""
        if not self.retire_horizon_ms:
            return []
        live = {k for k, _ in self._open}
        out = []
        for key in sorted(self._done):
            done = self._done[key]
            if key in live or not self._too_old(max(done.values())):
                continue
            out.append((key, sorted(done), self._tasks.pop(key, 0)))
            for ws in done:
                self._late.pop((key, ws), None)
                self._amended.pop((key, ws), None)
            del self._done[key]
            self._totals.pop(key, None)
            self.retired += 1
        return out

    def _total(self, key: PairKey, requirement: QualityRequirement) -> _Totals:
        totals = self._totals.get(key)
        if totals is None:
            totals = self._totals[key] = _Totals(self.layout.zeros(), requirement)
        return totals

    def _merge(self, window: _Window) -> tuple[FloatArray, PairedRankingQuality | None]:
        acc = self.layout.zeros()
        ranking: PairedRankingQuality | None = None
        for task in sorted(window.partials):
            p = window.partials[task]
            acc[p.index] += p.values
            ranking = merge_ranking(ranking, ranking_of(p.meta.ranking))
        return acc, ranking

    def _report(
        self, key: PairKey, ws: int, window: _Window, status: ReportStatus, now_ms: int
    ) -> tuple[QualityReport, FloatArray, PairedRankingQuality | None, QualityPartial]:
        """A window's report, its merged accumulators (new objects, nobody else's) and its
        latest partial (whose settings the report was made with)."""
        acc, ranking = self._merge(window)
        latest = max((p.meta for p in window.partials.values()), key=_recency)
        stream = min(p.meta.stream_time_ms for p in window.partials.values())
        report = self._window_report(key, ws, acc, ranking, latest, stream, status, now_ms)
        return report, acc, ranking, latest

    def _window_report(
        self,
        key: PairKey,
        ws: int,
        acc: FloatArray,
        ranking: PairedRankingQuality | None,
        meta: QualityPartial,
        stream_time_ms: int,
        status: ReportStatus,
        now_ms: int,
    ) -> QualityReport:
        """A window's report, with the settings ``meta`` (a partial of it) carries."""
        return quality_report(
            key,
            ws,
            meta.window_end_ms,
            self.layout,
            acc,
            status=status,
            label_window_ms=meta.label_window_ms,
            missing=meta.missing,
            stream_time_ms=stream_time_ms,
            final_at_ms=meta.final_at_ms,
            now_ms=now_ms,
            judging=self.judging,
            ranking=ranking,
        )

    def due(self, now_ms: int, *, provisional: bool) -> MergeOutput:
        """Windows to report now, oldest first: final ones (every task's final partial in,
        or the merge timeout passed) and, with ``provisional``, the others whose partials
        changed since their last report."""
        out = MergeOutput()
        for wkey in sorted(self._amended, key=lambda k: (k[1], k[0])):
            out.final.append(self._amended_window(*wkey, now_ms))
        self._amended.clear()
        for wkey in sorted(self._open, key=lambda k: (k[1], k[0])):
            key, ws = wkey
            window = self._open[wkey]
            finals = window.finals()
            complete = len(finals) >= window.total
            waited = window.first_final_ms is not None and (
                now_ms - window.first_final_ms >= self.timeout_ms
            )
            if complete or waited:
                out.final.append(self._final(key, ws, window, finals, now_ms))
            elif provisional and window.changed:
                report, *_ = self._report(key, ws, window, "provisional", now_ms)
                out.provisional.append(report)
                window.changed = False
        return out

    def _final(
        self, key: PairKey, ws: int, window: _Window, finals: set[int], now_ms: int
    ) -> Merged:
        del self._open[(key, ws)]
        missing = sorted(set(range(window.total)) - finals)
        report, acc, ranking, latest = self._report(key, ws, window, "final", now_ms)
        self._done.setdefault(key, {})[ws] = report.window_end_ms
        totals = self._total(key, latest.requirement)
        totals.add(acc, ranking, ws, report.window_end_ms, latest.requirement)
        # The shares counted for missing tasks (their provisional partials, never changed
        # once held: a newer partial replaces a share, it does not edit it).
        held = {
            t: _Held(p.index.astype(np.int64, copy=False), p.values, ranking_of(p.meta.ranking))
            for t in missing
            if (p := window.partials.get(t)) is not None
        }
        late = _Late(
            acc,
            ranking,
            set(missing),
            held,
            report.window_end_ms,
            latest.requirement,
            latest,
        )
        if missing:
            self._late[(key, ws)] = late
        return self._merged(key, ws, late, report, now_ms)

    def _amended_window(self, key: PairKey, ws: int, now_ms: int) -> Merged:
        """A window merged without some tasks, reported final again with the late ones in."""
        late = self._late[(key, ws)]
        assert late.meta is not None  # set by the amending partial
        if not late.missing:
            del self._late[(key, ws)]
        report = self._window_report(
            key, ws, late.acc, late.ranking, late.meta, late.meta.stream_time_ms, "final", now_ms
        )
        return self._merged(key, ws, late, report, now_ms)

    def _merged(
        self, key: PairKey, ws: int, late: _Late, report: QualityReport, now_ms: int
    ) -> Merged:
        """A final window's report naming the tasks it lacks, its record, the pair's verdict."""
        missing = sorted(late.missing)
        if missing:
            report = msgspec.structs.replace(report, tasks_missing=missing)
        index, values = sparse(late.acc)
        record = MergedQualityWindow(
            **key._asdict(),
            window_start_ms=ws,
            window_end_ms=late.window_end_ms,
            requirement=late.requirement,
            size=late.acc.size,
            index=index,
            values=values,
            ranking=None if late.ranking is None else late.ranking.to_list(),
            tasks_missing=missing,
            held=late.record_held(),
            emitted_at_ms=now_ms,
        )
        return Merged(report, record, self.verdict(key, now_ms))

    def verdict(self, key: PairKey, now_ms: int) -> QualityVerdict | None:
        """The pair's verdict over its merged final windows (None before one had data)."""
        totals = self._totals.get(key)
        if totals is None or totals.first_start is None or totals.last_end is None:
            return None
        return quality_verdict(
            key,
            self.layout,
            totals.acc,
            windows=totals.windows,
            first_window_start_ms=totals.first_start,
            last_window_end_ms=totals.last_end,
            requirement=totals.requirement,
            now_ms=now_ms,
            judging=self.judging,
            ranking=totals.ranking,
        )


def _held(layout: Layout, record: MergedQualityWindow, held: HeldShare) -> _Held:
    acc = dense(layout, record.size, held.index, held.values)  # checked like any share
    index = np.flatnonzero(acc)
    return _Held(index, acc[index], ranking_of(held.ranking))


def _recency(p: QualityPartial) -> tuple[int, int]:
    return p.emitted_at_ms, p.task


__all__ = [
    "DECODER",
    "HeldShare",
    "MergeOutput",
    "Merged",
    "MergedQualityWindow",
    "PartialsRecord",
    "QualityMerger",
    "QualityPartial",
    "merge_ranking",
    "merged_key",
    "pair_hash",
    "partial_key",
    "partial_of",
]
