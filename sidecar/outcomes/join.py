"""The join of comparisons with outcomes for one task (one partition of the comparisons topic,
with the outcomes repartitioned onto it), over the task's store. No Kafka: changelog records
in, store writes, quality reports and verdicts out.

Store layout (keys by first byte; numbers big-endian so keys sort by them):

* ``m``: the task's meta (changelog position, input offsets, stream time, counters);
* ``p`` + pair id: a rollout pair (its key, the settings it started with, open windows, how far
  its windows are final);
* ``r`` + rollout (length-prefixed) + request id: a request waiting in its window (pair, event
  time, both scores and decisions, and its outcome so far). By rollout too: two rollouts
  (two sidecar deployments on one request stream) may score the same request;
* ``j`` + pair + window start + changelog offset: the window's index of the requests a
  changelog record stored (MessagePack list of their ids; to drop them when the window is
  final). Stores written before this layout hold ``i`` + pair + window start + request id
  (empty value) per request instead; both are read when a window is final;
* ``w`` + pair + window start: the window's quality accumulator (``quality.Layout``);
* ``t`` + pair: the accumulator of every final window of the pair (the verdict's basis);
* ``o`` + request id: outcomes that arrived before a comparison of their request (kept until
  no comparison could still need them);
* ``q`` + request id: the same for ranking outcomes, with their item sets (MessagePack
  ``[[ts, value, items], ...]``; a request id may hold both ``o`` and ``q``; it counts once in
  ``orphans``);
* ``l`` + rollout (length-prefixed) + request id: a ranking request's item lists, next to its
  ``r`` record (MessagePack ``[champion items, candidate items, clicked items or null]``: both
  arms' top ``ranking_k`` and the item set of the outcome that counts); deleted with it when
  its window is final;
* ``x`` + pair + window start: the window's ranking accumulator
  (``ranking.PairedRankingQuality.to_list`` as float64), for windows with ranking requests;
* ``y`` + pair: the ranking accumulator of every final window of the pair.

A ranking request (both arms returned item lists) is stored with no scores and decisions -1
(which is how the join tells it from a binary one) and judged by CTR@k, NDCG@k and
reciprocal rank against its outcome's item set; ``combine`` for item sets: ``last`` keeps the
latest set (ties: the larger set, then the larger items), ``max`` the union of the sets. An
item-set outcome beats a numeric one for a ranking request, and a numeric outcome of a ranking
request (or an item-set outcome of a binary one) is counted as ``unsupported``, not judged.

A pair whose every window is final and that had no comparison for ``retire_after_ms`` (event
time, at least its label window) is retired by a ``RetireMark``: its ``p``, ``t`` and ``y``
keys leave the store (nothing else of it is left once its windows are final) and it no longer
counts against ``max_pairs``/``max_rollouts``. A comparison of it later starts a new pair (a
new id); a new pair's windows that the task's stream time already made final are final for it
too (its comparisons there are late).

Each request is counted once: a request id is stored once per rollout (a repeated comparison
is a duplicate, counted and dropped); its contribution to its window is added when it arrives and
replaced (subtract old, add new) when its outcome changes, so a replay of outcomes already
applied changes nothing. Applying a changelog record writes the store in one atomic batch,
together with the record's offset, so a store is always exactly "the changelog up to
``changelog_next``" -- which is what makes a restart (replay the tail) and a new owner
(replay everything) land on the same state.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from .chunks import (
    ChangelogRecord,
    ColumnError,
    ExpireMark,
    FinalMark,
    InputChunk,
    RetireMark,
    comparison_arrays,
    outcome_arrays,
    ranked_arrays,
)
from .quality import COUNTERS, Costs, FloatArray, Layout, contribution
from .ranking import PairedRankingQuality
from .report import (
    Judging,
    PairKey,
    QualityReport,
    QualityVerdict,
    ReportStatus,
    quality_report,
    quality_verdict,
)
from .settings import RolloutQuality
from .store import Batch, Store

#: A stored request: pair id, event time, both scores, both decisions, outcome state, label,
#: value (NaN: none) and the outcome's event time.
REQUEST = struct.Struct("<Iqddbbbddq")
#: The same layout as a numpy record (packed: no padding), to pack a chunk's requests at once.
REQUEST_DTYPE = np.dtype(
    [
        ("pid", "<u4"),
        ("ts", "<i8"),
        ("p1", "<f8"),
        ("p2", "<f8"),
        ("d1", "i1"),
        ("d2", "i1"),
        ("state", "i1"),
        ("label", "<f8"),
        ("value", "<f8"),
        ("ots", "<i8"),
    ]
)
assert REQUEST_DTYPE.itemsize == REQUEST.size
#: One outcome kept for a request whose comparison has not arrived.
ORPHAN = struct.Struct("<bddq")
#: Outcomes kept per unmatched request (the latest by event time).
MAX_ORPHAN_OUTCOMES = 8
#: Up to this many request ids holding unmatched outcomes are also kept in memory (a few MiB),
#: so that a new comparison is checked against them without a store lookup; beyond it the
#: store's bloom filters answer (memory stays bounded whatever the unmatched outcomes).
MAX_ORPHAN_IDS = 100_000
#: Most rollout pairs (rollout, champion and candidate model and version) a task holds, and
#: most distinct rollouts among them, by default (``outcomes.max_pairs_per_task``,
#: ``max_rollouts_per_task``). The comparisons topic is written by others too: made-up
#: rollout names or versions would otherwise grow the task's pairs (memory, store, reports,
#: metric labels) without bound, and every outcome is looked up under every rollout of its
#: task. A comparison of a new pair beyond either limit is left out and counted
#: (``ApplyStats.refused``; the service logs it and counts it as skipped, ``too_many_pairs``).
MAX_PAIRS = 1_024
MAX_ROLLOUTS = 64
#: An outcome dated more than this before its request is outside the request's label window
#: (``outside_window``), like one after it: the clocks of two systems disagree by less, and
#: an outcome dated in seconds instead of milliseconds is decades early.
MAX_OUTCOME_LEAD_MS = 300_000

#: Outcome states of a request.
NO_OUTCOME, NUMERIC, RANKING = 0, 1, 2

META_KEY = b"m"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def request_prefix(rollout: str) -> bytes:
    """The key prefix of a rollout's requests (the length makes it unambiguous)."""
    name = rollout.encode()
    return b"r" + _U16.pack(len(name)) + name


def lists_prefix(rollout: str) -> bytes:
    """The key prefix of a rollout's ranking requests' item lists."""
    name = rollout.encode()
    return b"l" + _U16.pack(len(name)) + name


def _ranking_window_key(pid: int, ws: int) -> bytes:
    return b"x" + _U32.pack(pid) + _U64.pack(ws)


def _ranking_total_key(pid: int) -> bytes:
    return b"y" + _U32.pack(pid)


def _pair_key(pid: int) -> bytes:
    return b"p" + _U32.pack(pid)


def _window_key(pid: int, ws: int) -> bytes:
    return b"w" + _U32.pack(pid) + _U64.pack(ws)


def _index_prefix(pid: int, ws: int) -> bytes:
    """Legacy per-request index keys (stores written before the ``j`` index)."""
    return b"i" + _U32.pack(pid) + _U64.pack(ws)


def _ids_prefix(pid: int, ws: int) -> bytes:
    return b"j" + _U32.pack(pid) + _U64.pack(ws)


def pack_requests(
    pid: npt.NDArray[np.int64],
    ts: npt.NDArray[np.int64],
    p1: FloatArray,
    p2: FloatArray,
    d1: npt.NDArray[np.int8],
    d2: npt.NDArray[np.int8],
    state: npt.NDArray[np.int8],
    label: FloatArray,
    value: FloatArray,
    ots: npt.NDArray[np.int64],
) -> list[bytes]:
    """One ``REQUEST`` value per row (what ``REQUEST.pack`` gives, without a call per row)."""
    rows = np.empty(pid.size, dtype=REQUEST_DTYPE)
    for name, column in zip(
        REQUEST_DTYPE.names or (), (pid, ts, p1, p2, d1, d2, state, label, value, ots), strict=True
    ):
        rows[name] = column
    raw = rows.tobytes()
    size = REQUEST.size
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _total_key(pid: int) -> bytes:
    return b"t" + _U32.pack(pid)


class Meta(msgspec.Struct, kw_only=True):
    """What a task's store has applied, and running counts (for metrics)."""

    #: Offset of the next changelog record to apply.
    changelog_next: int = 0
    #: Next offset to read per input (``c``: comparisons, ``o``: repartitioned outcomes).
    inputs: dict[str, int] = {}
    #: Stream time when the last final/expire mark was decided.
    stream_ms: int = 0
    #: Largest event time applied per input (``c``, ``o``): the inputs' watermarks.
    input_ms: dict[str, int] = {}
    next_pair: int = 0
    #: Requests stored, and request ids holding outcomes that came before a comparison.
    stored: int = 0
    orphans: int = 0
    #: Request ids among ``orphans`` holding ranking outcomes (``q`` keys).
    ranking_orphans: int = 0
    #: Totals since the store was created.
    duplicates: int = 0
    late: int = 0
    orphans_expired: int = 0
    #: Rollout pairs retired (finished and idle for ``outcomes.retire_after_ms``).
    retired: int = 0


class PairRecord(msgspec.Struct, kw_only=True):
    """A rollout pair in a task's store."""

    id: int
    key: PairKey
    settings: RolloutQuality
    #: Windows starting before this are final (late comparisons for them are dropped).
    finalized_through: int = -1
    #: Starts of the windows not final yet, ascending.
    open: list[int] = []
    windows_final: int = 0
    first_final_start: int | None = None
    last_final_end: int | None = None
    #: Whether ranking requests were stored (their item lists leave with their window).
    ranking: bool = False
    #: Largest event time of a comparison of the pair (late and repeated ones included): how
    #: long it has been idle (-1: none since this field exists; ``finalized_through`` then).
    last_seen_ms: int = -1
    #: Windows starting before this were already final when the pair started (by the task's
    #: stream time): its comparisons there are late too. Apart from ``finalized_through``,
    #: which says which windows this task marked final (and sent final partials of).
    final_before_start: int = -1

    def idle_since(self) -> int:
        """Event time its idle time runs from: its latest comparison (a pair stored before
        that was noted: the end of its last final window)."""
        return self.last_seen_ms if self.last_seen_ms >= 0 else self.finalized_through


_META = msgspec.msgpack.Decoder(Meta)
_PAIR = msgspec.msgpack.Decoder(PairRecord)
_ENC = msgspec.msgpack.Encoder()
_IDS = msgspec.msgpack.Decoder(list[bytes])


@dataclass(frozen=True)
class Retired:
    """A pair that left a task's store, and what it held last."""

    pair: PairRecord
    #: The task's verdict over its final windows when it left (None: no final window had
    #: data), and the stream time of the retirement.
    verdict: QualityVerdict | None
    stream_ms: int


@dataclass
class ApplyStats:
    """What applying changelog records did (for metrics and logs)."""

    comparisons: int = 0
    duplicates: int = 0
    unscored: int = 0
    #: Comparisons for windows already final, by rollout.
    late: dict[str, int] = field(default_factory=dict)
    #: Requests whose first outcome arrived (after or with their comparison).
    joined: dict[str, int] = field(default_factory=dict)
    #: Outcomes that changed an already labelled request.
    updated: int = 0
    #: Outcomes with no comparison yet.
    orphaned: int = 0
    outside_window: int = 0
    skipped_records: int = 0
    #: Comparisons left out because their pair would exceed ``MAX_PAIRS``/``MAX_ROLLOUTS``,
    #: and the key of one of those pairs (for the log).
    refused: int = 0
    refused_pair: PairKey | None = None
    #: Pairs retired, with what they reported last (for the log and the metrics).
    retired: list[Retired] = field(default_factory=list)

    def add(self, other: ApplyStats) -> None:
        self.refused_pair = self.refused_pair or other.refused_pair
        self.retired += other.retired
        for name in ("comparisons", "duplicates", "unscored", "updated", "orphaned", "refused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outside_window += other.outside_window
        self.skipped_records += other.skipped_records
        for mine, theirs in ((self.late, other.late), (self.joined, other.joined)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


@dataclass(frozen=True)
class Windows:
    """Time settings of the stage (the same for every pair)."""

    report_window_ms: int
    comparison_lateness_ms: int
    outcome_grace_ms: int

    def start(self, ts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return ts - ts % self.report_window_ms

    def final_at(self, ws: int, settings: RolloutQuality) -> int:
        """Stream time at which window ``ws`` of a pair with ``settings`` is final."""
        return ws + self.report_window_ms + settings.label_window_ms + self.outcome_grace_ms

    def mature_at(self, ws: int) -> int:
        return ws + self.report_window_ms + self.comparison_lateness_ms


@dataclass
class _Rows:
    """Requests whose judged contribution is added (sign +1) or taken back (-1)."""

    pid: list[npt.NDArray[np.int64]] = field(default_factory=list)
    ws: list[npt.NDArray[np.int64]] = field(default_factory=list)
    cols: list[tuple[npt.NDArray[Any], ...]] = field(default_factory=list)
    sign: list[float] = field(default_factory=list)


def _combine(
    old: tuple[int, float, float, int], new: tuple[int, float, float, int], rule: str
) -> tuple[int, float, float, int]:
    """Which of two outcomes of one request counts (commutative and idempotent, so order and
    repetition do not matter): ``last`` is the latest by event time (then the larger label,
    then value); ``max`` the larger numeric label (then the later)."""

    def order(o: tuple[int, float, float, int]) -> tuple[float, ...]:
        state, label, value, ts = o
        lab = label if state == NUMERIC and math.isfinite(label) else -math.inf
        val = value if math.isfinite(value) else -math.inf
        if rule == "max":
            return (lab, float(ts), float(state), val)
        return (float(ts), lab, float(state), val)

    return new if order(new) > order(old) else old


#: An outcome with its item set (None: a numeric outcome, or no outcome).
Full = tuple[int, float, float, int, tuple[str, ...] | None]
#: A ranking request's contribution to take back (-1) or add (+1): pair, window start, sign,
#: both arms' lists and the items acted on.
Ranked = tuple[int, int, float, list[str], list[str], frozenset[str]]
NAN = float("nan")
_LISTS = msgspec.msgpack.Decoder(tuple[list[str], list[str], list[str] | None])
_HELD = msgspec.msgpack.Decoder(list[tuple[int, float | None, list[str]]])


def _same(a: Full, b: Full) -> bool:
    """Whether two outcomes are the same (NaN labels and values equal)."""
    return ORPHAN.pack(*a[:4]) == ORPHAN.pack(*b[:4]) and a[4] == b[4]


def _combine_ranking(old: Full, new: Full, rule: str) -> Full:
    """Which outcome counts for a ranking request (commutative, associative and idempotent,
    like :func:`_combine`): an item set beats a numeric label (never judged for a ranking);
    of two item sets, ``last`` keeps the later (then the larger set, then the larger items),
    ``max`` their union, dated by the later. Two numeric labels combine as for a binary
    request."""
    if old[0] == NO_OUTCOME or new[0] == NO_OUTCOME:
        return new if old[0] == NO_OUTCOME else old
    if (old[0] == RANKING) != (new[0] == RANKING):
        return old if old[0] == RANKING else new
    if old[0] != RANKING:
        return (*_combine(old[:4], new[:4], rule), None)
    a, b = old[4] or (), new[4] or ()
    values = [v for v in (old[2], new[2]) if math.isfinite(v)]
    if rule == "max":
        items = tuple(sorted({*a, *b}))
        return (RANKING, NAN, max(values) if values else NAN, max(old[3], new[3]), items)

    def order(o: Full, items: tuple[str, ...]) -> tuple[Any, ...]:
        return (o[3], len(items), items, o[2] if math.isfinite(o[2]) else -math.inf)

    return new if order(new, b) > order(old, a) else old


def _held(raw: bytes) -> list[Full]:
    """The ranking outcomes kept for a request with no comparison yet (a ``q`` value)."""
    held = _HELD.decode(raw)
    return [(RANKING, NAN, NAN if v is None else v, ts, tuple(items)) for ts, v, items in held]


def _ranking_part(state: int, items: tuple[str, ...] | None, missing: str) -> frozenset[str] | None:
    """What a ranking request is judged against: its item set, nothing clicked when it has no
    outcome and ``missing = "negative"``, else None (not judged)."""
    if state == RANKING:
        return frozenset(items or ())
    if state == NO_OUTCOME and missing == "negative":
        return frozenset()
    return None


def ranking_from_bytes(raw: bytes) -> PairedRankingQuality:
    return PairedRankingQuality.from_list(np.frombuffer(raw, dtype=np.float64).tolist())


def ranking_to_bytes(acc: PairedRankingQuality) -> bytes:
    return np.asarray(acc.to_list(), dtype=np.float64).tobytes()


def _groups(
    pid: npt.NDArray[np.int64], ws: npt.NDArray[np.int64]
) -> list[tuple[tuple[int, int], npt.NDArray[np.bool_] | None]]:
    """The distinct (pair, window start) of rows, each with its rows (None: all of them, the
    usual case of one pair and one window per chunk)."""
    if not pid.size:
        return []
    if (pid == pid[0]).all() and (ws == ws[0]).all():
        return [((int(pid[0]), int(ws[0])), None)]
    key = (pid << 48) | ws  # window starts are epoch ms below 2**48
    return [((int(k) >> 48, int(k) & ((1 << 48) - 1)), key == k) for k in np.unique(key).tolist()]


def stream_bound(
    comparisons_ms: int, comparisons_caught_up: bool, quiet_ms: int, outcomes_ms: int | None
) -> int:
    """How far stream time may go: what makes windows final and held outcomes expire.

    The comparisons always bound it, by their watermark (the largest event time applied), plus
    the time they have been quiet once they are read to the end (``quiet_ms``: time goes on at
    the wall clock's pace from the last comparison, so the last windows of a stream that stops
    become final; a lull while a backlog is read moves nothing). The outcomes bound it by
    ``outcomes_ms`` (:func:`sidecar.outcomes.heartbeat.outcomes_bound`: the smallest event time
    routed over the outcome partitions not routed to their end; None when all are), so no
    window is final before its outcomes are in, and no held outcome is dropped while its
    comparison may still come.
    """
    bound = comparisons_ms + (max(quiet_ms, 0) if comparisons_caught_up else 0)
    return bound if outcomes_ms is None else min(bound, outcomes_ms)


class JoinTask:
    """One task's join state over its store."""

    def __init__(
        self,
        store: Store,
        task: int,
        layout: Layout,
        windows: Windows,
        judging: Judging,
        *,
        max_label_window_ms: int,
        max_pairs: int = MAX_PAIRS,
        max_rollouts: int = MAX_ROLLOUTS,
        retire_after_ms: int = 0,
        configured: PairKey | None = None,
    ) -> None:
        self.store = store
        #: The pair the config runs: taken whatever the caps (made-up versions of its
        #: rollout filling every slot must not leave it unjudged until they retire). A
        #: replay under a config naming another pair decides the caps as that config says.
        self.configured = configured
        #: A finished pair idle this long (event time; at least its label window) is
        #: retired (0: never).
        self.retire_after_ms = retire_after_ms
        self.max_pairs = max_pairs
        self.max_rollouts = max_rollouts
        self.task = task
        self.layout = layout
        self.windows = windows
        self.judging = judging
        self.max_label_window_ms = max_label_window_ms
        self.meta = Meta()
        self.pairs: dict[int, PairRecord] = {}
        self._by_key: dict[PairKey, int] = {}
        #: Stream time: what makes windows mature and final. The service moves it (see
        #: :meth:`advance`); it never goes back.
        self.stream_ms = 0
        #: Windows (pair id, start) changed since the service last reported them.
        self.dirty: set[tuple[int, int]] = set()
        #: Ids holding unmatched outcomes (``o``/``q`` keys), None when there are more than
        #: ``MAX_ORPHAN_IDS`` (the store is asked). Derived from the store: a superset of
        #: its ids at all times (rebuilt by :meth:`reload`).
        self.orphan_ids: set[bytes] | None = set()
        self.reload()

    @property
    def rollouts(self) -> set[str]:
        """The rollouts this task holds requests of."""
        return {p.key.rollout for p in self.pairs.values()}

    def reload(self) -> None:
        """Read the meta and the pairs from the store again (after an apply that failed
        half-way: the store never saw its batch, the in-memory copies may have)."""
        raw = self.store.get(META_KEY)
        self.meta = _META.decode(raw) if raw is not None else Meta()
        self.pairs = {}
        self._by_key = {}
        for _, value in self.store.scan(b"p"):
            pair = _PAIR.decode(value)
            self.pairs[pair.id] = pair
            self._by_key[PairKey(*pair.key)] = pair.id
        self.stream_ms = max(self.stream_ms, self.meta.stream_ms)
        self._load_orphan_ids()

    def _load_orphan_ids(self) -> None:
        self.orphan_ids = None
        if self.meta.orphans > MAX_ORPHAN_IDS:
            return
        ids: set[bytes] = set()
        for prefix in (b"o", b"q"):
            for key, _ in self.store.scan(prefix):
                ids.add(key[1:])
                if len(ids) > MAX_ORPHAN_IDS:
                    return
        self.orphan_ids = ids

    def _note_orphan(self, rid: bytes) -> None:
        if self.orphan_ids is not None:
            self.orphan_ids.add(rid)
            if len(self.orphan_ids) > MAX_ORPHAN_IDS:
                self.orphan_ids = None

    # -- applying changelog records ---------------------------------------------------------

    def apply(self, record: ChangelogRecord, offset: int) -> ApplyStats:
        """Apply the changelog record at ``offset`` (in offset order; records below
        ``meta.changelog_next`` are ignored)."""
        stats = ApplyStats()
        if offset < self.meta.changelog_next:
            return stats
        batch = Batch()
        if isinstance(record, InputChunk):
            if not self._already_applied(record):
                self._apply_input(record, offset, batch, stats)
        elif isinstance(record, FinalMark):
            self._apply_final(record, batch)
        elif isinstance(record, ExpireMark):
            self._apply_expire(record, batch)
        elif isinstance(record, RetireMark):
            self._apply_retire(record, batch, stats)
        self.meta.changelog_next = offset + 1
        batch.put(META_KEY, _ENC.encode(self.meta))
        self.store.write(batch)
        self.stream_ms = max(self.stream_ms, self.meta.stream_ms)
        return stats

    def skip(self, offset: int) -> None:
        """Mark the changelog record at ``offset`` as applied without applying it (a barrier,
        or a record this build cannot read)."""
        if offset >= self.meta.changelog_next:
            self.meta.changelog_next = offset + 1
            batch = Batch()
            batch.put(META_KEY, _ENC.encode(self.meta))
            self.store.write(batch)

    def _already_applied(self, chunk: InputChunk) -> bool:
        """A chunk whose every input range ends at or before what the store has applied (the
        producer wrote it twice)."""
        if not chunk.offsets:
            return False
        return all(self.meta.inputs.get(k, -1) >= nxt for k, (_, nxt) in chunk.offsets.items())

    def _pair_id(self, spec_key: PairKey, settings: RolloutQuality, batch: Batch) -> int:
        """The id of the pair ``spec_key`` (a new one when it is new), or -1 when a new pair
        would exceed ``max_pairs`` or ``max_rollouts`` (never for the configured pair)."""
        pid = self._by_key.get(spec_key)
        if pid is not None:
            return pid
        rollouts = self.rollouts
        if spec_key != self.configured and (
            len(self.pairs) >= self.max_pairs
            or (spec_key.rollout not in rollouts and len(rollouts) >= self.max_rollouts)
        ):
            return -1
        pid = self.meta.next_pair
        self.meta.next_pair += 1
        pair = PairRecord(
            id=pid, key=spec_key, settings=settings, final_before_start=self._final_before(settings)
        )
        self.pairs[pid] = pair
        self._by_key[spec_key] = pid
        batch.put(_pair_key(pid), _ENC.encode(pair))
        return pid

    def _final_before(self, settings: RolloutQuality) -> int:
        """Windows starting before this are final for a pair new now (-1: none): those whose
        final time the task's stream time (as of its last mark) has passed. Final for every
        pair, new or not: outcomes of their requests may have been dropped as unmatched
        already, and a retired pair's straggler must not open one of its old windows again."""
        w = self.windows
        x = self.meta.stream_ms - (
            w.report_window_ms + settings.label_window_ms + w.outcome_grace_ms
        )
        if self.meta.stream_ms <= 0 or x < 0:
            return -1
        return x - x % w.report_window_ms + w.report_window_ms

    def _apply_input(self, chunk: InputChunk, offset: int, batch: Batch, stats: ApplyStats) -> None:
        pair_ids = [self._pair_id(p.key, p.settings, batch) for p in chunk.pairs]
        deltas: dict[tuple[int, int], FloatArray] = {}
        rows = _Rows()
        ranked: list[Ranked] = []
        self._apply_comparisons(chunk, offset, pair_ids, batch, deltas, rows, ranked, stats)
        self._apply_outcomes(chunk, batch, deltas, rows, ranked, stats)
        self._judge(rows, deltas)
        for (pid, ws), delta in deltas.items():
            self._add_window(pid, ws, delta, batch)
        if ranked:
            self._judge_ranking(ranked, batch)
        for key, (_, nxt) in chunk.offsets.items():
            self.meta.inputs[key] = max(self.meta.inputs.get(key, 0), nxt)
            ms = chunk.input_ms.get(key, chunk.stream_ms)
            self.meta.input_ms[key] = max(self.meta.input_ms.get(key, 0), ms)

    def _judge_ranking(self, ranked: list[Ranked], batch: Batch) -> None:
        """Add (or take back) ranking requests' contributions to their windows' ranking
        accumulators."""
        groups: dict[tuple[int, int, float], list[Ranked]] = {}
        for r in ranked:
            groups.setdefault((r[0], r[1], r[2]), []).append(r)
        deltas: dict[tuple[int, int], PairedRankingQuality] = {}
        for (pid, ws, sign), group in groups.items():
            k = self.pairs[pid].settings.ranking_k
            part = PairedRankingQuality(k)
            part.add([g[3] for g in group], [g[4] for g in group], [g[5] for g in group])
            delta = deltas.setdefault((pid, ws), PairedRankingQuality(k))
            delta.state += sign * part.state
        for (pid, ws), delta in deltas.items():
            key = _ranking_window_key(pid, ws)
            raw = batch.get(key) or self.store.get(key)
            acc = ranking_from_bytes(raw) if raw is not None else PairedRankingQuality(delta.k)
            batch.put(key, ranking_to_bytes(acc.merge(delta)))
            self.dirty.add((pid, ws))

    def _add_window(self, pid: int, ws: int, delta: FloatArray, batch: Batch) -> None:
        pair = self.pairs[pid]
        key = _window_key(pid, ws)
        raw = batch.get(key) or self.store.get(key)
        acc = self.layout.from_bytes(raw) if raw is not None else self.layout.zeros()
        if raw is None and ws not in pair.open:
            pair.open = sorted([*pair.open, ws])
            batch.put(_pair_key(pid), _ENC.encode(pair))
        batch.put(key, (acc + delta).tobytes())
        self.dirty.add((pid, ws))

    def _counter(
        self, deltas: dict[tuple[int, int], FloatArray], pid: int, ws: int, name: str, n: int
    ) -> None:
        if not n:
            return
        delta = deltas.get((pid, ws))
        if delta is None:
            delta = deltas[(pid, ws)] = self.layout.zeros()
        delta[COUNTERS.index(name)] += n

    def _apply_comparisons(
        self,
        chunk: InputChunk,
        offset: int,
        pair_ids: list[int],
        batch: Batch,
        deltas: dict[tuple[int, int], FloatArray],
        rows: _Rows,
        ranked: list[Ranked],
        stats: ApplyStats,
    ) -> None:
        c = chunk.comparisons
        n = len(c.ids)
        if not n:
            return
        cols = comparison_arrays(c)
        ranked_rows, lists = ranked_arrays(c.ranking, n)
        index = cols["pair"].astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(pair_ids)):
            raise ColumnError("a comparison names a pair the chunk does not list")
        pid = np.asarray(pair_ids, dtype=np.int64)[index]
        refused = pid < 0
        if refused.any():
            stats.refused += int(refused.sum())
            stats.refused_pair = stats.refused_pair or PairKey(
                *chunk.pairs[int(index[np.flatnonzero(refused)[0]])].key
            )
        ts = cols["ts"]
        self._seen(pair_ids, index, ts, batch)
        ws = self.windows.start(ts)
        p1, p2 = cols["champion"], cols["candidate"]
        d1, d2 = cols["champion_decision"], cols["candidate_decision"]
        through = np.array(
            [
                max(self.pairs[p].finalized_through, self.pairs[p].final_before_start)
                if p >= 0
                else -1
                for p in pair_ids
            ],
            dtype=np.int64,
        )
        late = (ws < through[index]) & ~refused
        scored = np.isfinite(p1) & np.isfinite(p2) & (d1 >= 0) & (d1 <= 1) & (d2 >= 0) & (d2 <= 1)
        rank_at: dict[int, int] = {}
        if ranked_rows:
            # Ranking requests: judged by their lists; stored with no scores and decisions -1
            # (which is how the store tells them from binary ones).
            rank_at = {row: j for j, row in enumerate(ranked_rows)}
            is_ranked = np.zeros(n, dtype=np.bool_)
            is_ranked[ranked_rows] = True
            p1, p2 = np.where(is_ranked, np.nan, p1), np.where(is_ranked, np.nan, p2)
            d1 = np.where(is_ranked, -1, d1).astype(np.int8)
            d2 = np.where(is_ranked, -1, d2).astype(np.int8)
            scored |= is_ranked
        if late.any():
            for i in np.flatnonzero(late).tolist():
                rollout = self.pairs[int(pid[i])].key.rollout
                stats.late[rollout] = stats.late.get(rollout, 0) + 1
            self.meta.late += int(late.sum())
        for i in np.flatnonzero(~late & ~scored & ~refused).tolist():
            self._counter(deltas, int(pid[i]), int(ws[i]), "unscored", 1)
            stats.unscored += 1
        ids = c.ids
        accepted = ~late & scored & ~refused
        if accepted.all() and len(set(ids)) == n:  # the usual chunk: every row, distinct ids
            keep = list(range(n))
            id_bytes = list(map(str.encode, ids))
        else:
            candidates = np.flatnonzero(accepted).tolist()
            first: dict[str, int] = {}
            for i in candidates:  # the first of each request id in the chunk
                first.setdefault(ids[i], i)
            keep = list(first.values())
            stats.duplicates += len(candidates) - len(keep)
            id_bytes = [ids[i].encode() for i in keep]
        prefix_of = {p: request_prefix(self.pairs[p].key.rollout) for p in set(pair_ids) if p >= 0}
        if len(prefix_of) == 1:
            keys = list(map(next(iter(prefix_of.values())).__add__, id_bytes))
        else:
            keys = [prefix_of[int(pid[i])] + b for i, b in zip(keep, id_bytes, strict=True)]
        # Request ids stored already (redelivered comparisons): the bloom filters answer
        # "absent" for a new id without reading a block.
        stored = self.store.present(keys)
        if True in stored:
            fresh = [j for j, there in enumerate(stored) if not there]
            stats.duplicates += len(keep) - len(fresh)
            keep = [keep[j] for j in fresh]
            id_bytes = [id_bytes[j] for j in fresh]
            keys = [keys[j] for j in fresh]
        self.meta.duplicates += stats.duplicates
        if not keep:
            return
        rows_i = np.asarray(keep, dtype=np.int64)
        m = rows_i.size
        state = np.zeros(m, dtype=np.int8)
        label = np.full(m, np.nan)
        value = np.full(m, np.nan)
        ots = np.zeros(m, dtype=np.int64)
        r_pid, r_ws, r_ts = pid[rows_i], ws[rows_i], ts[rows_i]
        clicked: dict[int, tuple[str, ...] | None] = {}
        if self.meta.orphans:
            # Outcomes that came first stay until no comparison could need them (another
            # rollout may score the same request later): matched here, dropped on expiry.
            held = self._held_for(id_bytes, b"o")
            held_r = self._held_for(id_bytes, b"q") if self.meta.ranking_orphans else {}
            for j in sorted(held.keys() | held_r.keys()):
                pair = self.pairs[int(r_pid[j])]
                is_rank = int(rows_i[j]) in rank_at
                got = self._orphan_outcome(
                    held.get(j), held_r.get(j), int(r_ts[j]), pair.settings, is_rank
                )
                if got is None:
                    self._counter(deltas, int(r_pid[j]), int(r_ws[j]), "outside_window", 1)
                    stats.outside_window += 1
                    continue
                state[j], label[j], value[j], ots[j] = got[:4]
                clicked[j] = got[4]
                stats.joined[pair.key.rollout] = stats.joined.get(pair.key.rollout, 0) + 1
        c1, c2 = p1[rows_i], p2[rows_i]
        clipped = (c1 < 0) | (c1 > 1) | (c2 < 0) | (c2 > 1)
        c1, c2 = np.clip(c1, 0.0, 1.0), np.clip(c2, 0.0, 1.0)
        r_d1, r_d2 = d1[rows_i], d2[rows_i]
        batch.put_many(
            keys, pack_requests(r_pid, r_ts, c1, c2, r_d1, r_d2, state, label, value, ots)
        )
        groups = _groups(r_pid, r_ws)
        # The windows' index: one record per window this changelog record stored requests in.
        at = _U64.pack(offset)
        for (g_pid, g_ws), sel in groups:
            ids_in = id_bytes if sel is None else [id_bytes[j] for j in np.flatnonzero(sel)]
            batch.put(_ids_prefix(g_pid, g_ws) + at, _ENC.encode(ids_in))
        pids, starts = r_pid.tolist(), r_ws.tolist()
        if rank_at and lists is not None:
            prefix_l = {p: lists_prefix(self.pairs[p].key.rollout) for p in set(pids)}
            for j, i in enumerate(rows_i.tolist()):
                r = rank_at.get(i)
                if r is None:
                    continue
                pair = self.pairs[pids[j]]
                champ_l, cand_l, acted = lists.first[r], lists.second[r], clicked.get(j)
                lv = (champ_l, cand_l, None if acted is None else list(acted))
                batch.put(prefix_l[pids[j]] + id_bytes[j], _ENC.encode(lv))
                if not pair.ranking:
                    pair.ranking = True
                    batch.put(_pair_key(pair.id), _ENC.encode(pair))
                part = _ranking_part(int(state[j]), acted, pair.settings.missing)
                if part is not None:
                    ranked.append((pids[j], starts[j], 1.0, champ_l, cand_l, part))
        self.meta.stored += m
        stats.comparisons += m
        for (g_pid, g_ws), sel in groups:
            self._counter(deltas, g_pid, g_ws, "requests", int(sel.sum()) if sel is not None else m)
            n_clipped = int((clipped if sel is None else clipped & sel).sum())
            self._counter(deltas, g_pid, g_ws, "clipped", n_clipped)
        rows.pid.append(r_pid)
        rows.ws.append(r_ws)
        rows.cols.append((c1, c2, r_d1, r_d2, state, label, value))
        rows.sign.append(1.0)

    def _seen(
        self,
        pair_ids: list[int],
        index: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        batch: Batch,
    ) -> None:
        """Note each pair's latest comparison (what its idle time runs from)."""
        if len(pair_ids) == 1:  # the usual chunk: one pair (no scatter needed)
            latest = np.asarray([ts.max() if ts.size else -1], dtype=np.int64)
        else:
            latest = np.full(len(pair_ids), -1, dtype=np.int64)
            np.maximum.at(latest, index, ts)
        for j, t in enumerate(latest.tolist()):
            pid = pair_ids[j]
            if pid < 0 or t < 0:
                continue
            pair = self.pairs[pid]
            if t > pair.last_seen_ms:
                pair.last_seen_ms = t
                batch.put(_pair_key(pid), _ENC.encode(pair))

    def _held_for(self, id_bytes: list[bytes], prefix: bytes) -> dict[int, bytes]:
        """The values under ``prefix`` + each id that exist, by position (the bloom filters
        answer "absent" for most ids without reading a block)."""
        known = self.orphan_ids
        if known is not None:  # the usual case: no store lookup for ids never orphaned
            if known.isdisjoint(id_bytes):
                return {}
            maybe = [j for j, b in enumerate(id_bytes) if b in known]
            got = self.store.get_many([prefix + id_bytes[j] for j in maybe])
            return {j: raw for j, raw in zip(maybe, got, strict=True) if raw is not None}
        keys = [prefix + b for b in id_bytes]
        maybe = [j for j, m in enumerate(self.store.may_exist(keys)) if m]
        got = self.store.get_many([keys[j] for j in maybe])
        return {j: raw for j, raw in zip(maybe, got, strict=True) if raw is not None}

    def _orphan_outcome(
        self,
        raw: bytes | None,
        raw_ranking: bytes | None,
        request_ts: int,
        settings: RolloutQuality,
        ranking: bool,
    ) -> Full | None:
        """The outcome that counts among those kept for a request (numeric ones in ``raw``,
        item sets in ``raw_ranking``), or None when none happened within its label window."""
        held: list[Full] = [(*o, None) for o in ORPHAN.iter_unpack(raw)] if raw else []
        if raw_ranking:
            held += _held(raw_ranking)
        best: Full | None = None
        limit = request_ts + settings.label_window_ms
        earliest = request_ts - MAX_OUTCOME_LEAD_MS
        for outcome in held:
            if not earliest <= outcome[3] <= limit:
                continue
            if best is None:
                best = outcome if ranking else (*outcome[:4], None)
            elif ranking:
                best = _combine_ranking(best, outcome, settings.combine)
            else:
                best = (*_combine(best[:4], outcome[:4], settings.combine), None)
        return best

    def _apply_outcomes(
        self,
        chunk: InputChunk,
        batch: Batch,
        deltas: dict[tuple[int, int], FloatArray],
        rows: _Rows,
        ranked: list[Ranked],
        stats: ApplyStats,
    ) -> None:
        o = chunk.outcomes
        n = len(o.ids)
        if not n:
            return
        cols = outcome_arrays(o)
        ts, label, value = cols["ts"], cols["label"], cols["value"]
        ranked_rows, lists = ranked_arrays(o.items, n)
        items_of: dict[int, tuple[str, ...]] = {}
        if lists is not None:
            items_of = {row: tuple(lists.first[j]) for j, row in enumerate(ranked_rows)}
        distinct = list(dict.fromkeys(o.ids))
        # Every rollout of the task may hold the request: look it up under each.
        prefixes = [request_prefix(r) for r in sorted(self.rollouts)]
        holding: dict[str, list[bytes]]
        if len(prefixes) == 1:  # the usual task: one rollout
            rkeys = list(map(prefixes[0].__add__, map(str.encode, distinct)))
            found = self._read(rkeys, batch)
            current: dict[bytes, bytes | None] = dict(zip(rkeys, found, strict=True))
            holding = {
                rid: [k] if v is not None else []
                for rid, k, v in zip(distinct, rkeys, found, strict=True)
            }
        else:
            rkeys = [p + rid.encode() for rid in distinct for p in prefixes]
            current = dict(zip(rkeys, self._read(rkeys, batch), strict=True))
            holding = {
                rid: [k for k in (p + rid.encode() for p in prefixes) if current[k] is not None]
                for rid in distinct
            }
        absent = [rid for rid in distinct if not holding[rid]]
        okeys = [b"o" + i.encode() for i in absent]
        orphans: dict[str, bytes | None] = dict(zip(absent, self._read(okeys, batch), strict=True))
        held_r: dict[str, bytes | None] = {}
        if items_of or self.meta.ranking_orphans:
            qkeys = [b"q" + i.encode() for i in absent]
            held_r = dict(zip(absent, self._read(qkeys, batch), strict=True))
        old_rows: list[tuple[Any, ...]] = []
        new_rows: list[tuple[Any, ...]] = []
        labels, values, times = label.tolist(), value.tolist(), ts.tolist()
        for j, rid in enumerate(o.ids):
            lab = labels[j]
            outcome = (NUMERIC if math.isfinite(lab) else RANKING, lab, values[j], times[j])
            items = items_of.get(j)
            if not holding[rid]:
                if items is None:
                    self._keep_orphan(rid, outcome, orphans, held_r, batch, stats)
                else:
                    self._keep_ranking_orphan(rid, outcome, items, orphans, held_r, batch, stats)
                continue
            for key in holding[rid]:
                raw = current[key]
                assert raw is not None
                rec = REQUEST.unpack(raw)
                pid, rts = rec[0], rec[1]
                pair = self.pairs[pid]
                ws = rts - rts % self.windows.report_window_ms
                if (
                    not rts - MAX_OUTCOME_LEAD_MS
                    <= outcome[3]
                    <= rts + pair.settings.label_window_ms
                ):
                    self._counter(deltas, pid, ws, "outside_window", 1)
                    stats.outside_window += 1
                    continue
                if rec[4] < 0:  # a ranking request
                    got = self._ranking_outcome(
                        rid, rec, pair, ws, (*outcome, items), batch, stats, ranked
                    )
                    if got is not None:
                        current[key], old_row, new_row = got
                        old_rows.append(old_row)
                        new_rows.append(new_row)
                    continue
                old = (rec[6], rec[7], rec[8], rec[9])
                best = (
                    outcome
                    if old[0] == NO_OUTCOME
                    else _combine(old, outcome, pair.settings.combine)
                )
                if best == old:
                    continue
                if old[0] == NO_OUTCOME:
                    stats.joined[pair.key.rollout] = stats.joined.get(pair.key.rollout, 0) + 1
                else:
                    stats.updated += 1
                updated = REQUEST.pack(*rec[:6], *best)
                current[key] = updated
                batch.put(key, updated)
                old_rows.append((pid, ws, *rec[2:6], *old[:3]))
                new_rows.append((pid, ws, *rec[2:6], *best[:3]))
        for sign, table in ((-1.0, old_rows), (1.0, new_rows)):
            if not table:
                continue
            cols_t = list(zip(*table, strict=True))
            rows.pid.append(np.asarray(cols_t[0], dtype=np.int64))
            rows.ws.append(np.asarray(cols_t[1], dtype=np.int64))
            rows.cols.append(
                (
                    np.asarray(cols_t[2], dtype=np.float64),
                    np.asarray(cols_t[3], dtype=np.float64),
                    np.asarray(cols_t[4], dtype=np.int8),
                    np.asarray(cols_t[5], dtype=np.int8),
                    np.asarray(cols_t[6], dtype=np.int8),
                    np.asarray(cols_t[7], dtype=np.float64),
                    np.asarray(cols_t[8], dtype=np.float64),
                )
            )
            rows.sign.append(sign)

    def _ranking_outcome(
        self,
        rid: str,
        rec: tuple[Any, ...],
        pair: PairRecord,
        ws: int,
        outcome: Full,
        batch: Batch,
        stats: ApplyStats,
        ranked: list[Ranked],
    ) -> tuple[bytes, tuple[Any, ...], tuple[Any, ...]] | None:
        """Apply an outcome to a stored ranking request: its item lists' contribution is
        replaced (taken back, added anew) when the outcome that counts changes. Returns the
        request's new record and its old and new rows for the counters (None: no change)."""
        rollout = pair.key.rollout
        lkey = lists_prefix(rollout) + rid.encode()
        (raw,) = self._read([lkey], batch)
        first, second, had = _LISTS.decode(raw) if raw is not None else ([], [], None)
        old: Full = (rec[6], rec[7], rec[8], rec[9], None if had is None else tuple(had))
        best = _combine_ranking(old, outcome, pair.settings.combine)
        if _same(best, old):
            return None
        if old[0] == NO_OUTCOME:
            stats.joined[rollout] = stats.joined.get(rollout, 0) + 1
        else:
            stats.updated += 1
        key = request_prefix(rollout) + rid.encode()
        updated = REQUEST.pack(*rec[:6], *best[:4])
        batch.put(key, updated)
        got = best[4]
        batch.put(lkey, _ENC.encode((first, second, None if got is None else list(got))))
        for sign, o in ((-1.0, old), (1.0, best)):
            part = _ranking_part(o[0], o[4], pair.settings.missing)
            if part is not None:
                ranked.append((pair.id, ws, sign, first, second, part))
        return updated, (pair.id, ws, *rec[2:6], *old[:3]), (pair.id, ws, *rec[2:6], *best[:3])

    def _read(self, keys: list[bytes], batch: Batch) -> list[bytes | None]:
        """Values of ``keys``, this batch's writes first."""
        stored = self.store.get_many(keys)
        return [batch.get(k, v) for k, v in zip(keys, stored, strict=True)]

    def _keep_orphan(
        self,
        rid: str,
        outcome: tuple[int, float, float, int],
        orphans: dict[str, bytes | None],
        held_r: dict[str, bytes | None],
        batch: Batch,
        stats: ApplyStats,
    ) -> None:
        raw = orphans[rid]
        kept = list(ORPHAN.iter_unpack(raw)) if raw else []
        if outcome in kept:
            return
        if not kept and not held_r.get(rid):
            self.meta.orphans += 1
            stats.orphaned += 1
        kept = sorted([*kept, outcome], key=lambda o: o[3])[-MAX_ORPHAN_OUTCOMES:]
        value = b"".join(ORPHAN.pack(*o) for o in kept)
        orphans[rid] = value
        self._note_orphan(rid.encode())
        batch.put(b"o" + rid.encode(), value)

    def _keep_ranking_orphan(
        self,
        rid: str,
        outcome: tuple[int, float, float, int],
        items: tuple[str, ...],
        orphans: dict[str, bytes | None],
        held_r: dict[str, bytes | None],
        batch: Batch,
        stats: ApplyStats,
    ) -> None:
        raw = held_r.get(rid)
        kept = _HELD.decode(raw) if raw else []
        entry = (outcome[3], outcome[2] if math.isfinite(outcome[2]) else None, list(items))
        if entry in kept:
            return
        if not kept:
            self.meta.ranking_orphans += 1
            if not orphans.get(rid):
                self.meta.orphans += 1
                stats.orphaned += 1
        kept = sorted([*kept, entry], key=lambda e: (e[0], e[2]))[-MAX_ORPHAN_OUTCOMES:]
        value = _ENC.encode(kept)
        held_r[rid] = value
        self._note_orphan(rid.encode())
        batch.put(b"q" + rid.encode(), value)

    def _judge(self, rows: _Rows, deltas: dict[tuple[int, int], FloatArray]) -> None:
        """Add the judged contributions of ``rows`` (with their signs) to ``deltas``."""
        if not rows.pid:
            return
        pid = np.concatenate(rows.pid)
        ws = np.concatenate(rows.ws)
        cols = [np.concatenate([c[k] for c in rows.cols]) for k in range(7)]
        sign = np.concatenate(
            [np.full(p.size, s) for p, s in zip(rows.pid, rows.sign, strict=True)]
        )
        for (g_pid, g_ws), sel_group in _groups(pid, ws):
            group = np.ones(pid.size, dtype=np.bool_) if sel_group is None else sel_group
            settings = self.pairs[g_pid].settings
            for s in (1.0, -1.0):
                sel = group & (sign == s)
                if not sel.any():
                    continue
                delta = self._judged(settings, *(c[sel] for c in cols))
                key = (g_pid, g_ws)
                if key not in deltas:
                    deltas[key] = self.layout.zeros()
                deltas[key] += s * delta

    def _judged(
        self,
        settings: RolloutQuality,
        p1: FloatArray,
        p2: FloatArray,
        d1: npt.NDArray[np.int8],
        d2: npt.NDArray[np.int8],
        state: npt.NDArray[np.int8],
        label: FloatArray,
        value: FloatArray,
    ) -> FloatArray:
        numeric = state == NUMERIC
        none = state == NO_OUTCOME
        ranks = state == RANKING
        ranking = d1 < 0  # ranking requests: judged apart (``_judge_ranking``)
        binary = ~ranking
        include = (numeric | none if settings.missing == "negative" else numeric) & binary
        y = (numeric & (label >= settings.positive_at_least)).astype(np.int8)
        acc = contribution(
            self.layout,
            p1[include],
            p2[include],
            d1[include],
            d2[include],
            y[include],
            value[include],
            Costs(settings.fp_cost, settings.fn_cost, settings.cost_value),
        )
        acc[COUNTERS.index("labelled")] += (numeric & binary).sum() + (ranks & ranking).sum()
        acc[COUNTERS.index("unsupported")] += (ranks & binary).sum() + (numeric & ranking).sum()
        missing = "assumed_negative" if settings.missing == "negative" else "unlabelled"
        acc[COUNTERS.index(missing)] += none.sum()
        return acc

    def _apply_final(self, mark: FinalMark, batch: Batch) -> None:
        pid = self._by_key.get(PairKey(*mark.pair))
        self.meta.stream_ms = max(self.meta.stream_ms, mark.stream_ms)
        if pid is None:
            return
        pair = self.pairs[pid]
        ws = mark.window_start_ms
        if ws < pair.finalized_through:
            return  # applied already
        acc = self.window_accumulator(pid, ws)
        total_raw = self.store.get(_total_key(pid))
        total = self.layout.from_bytes(total_raw) if total_raw else self.layout.zeros()
        batch.put(_total_key(pid), (total + acc).tobytes())
        batch.delete(_window_key(pid, ws))
        rkey = _ranking_window_key(pid, ws)
        ranking_raw = self.store.get(rkey)
        if ranking_raw is not None:
            racc = ranking_from_bytes(ranking_raw)
            rtotal = self.ranking_total(pid) or PairedRankingQuality(racc.k)
            batch.put(_ranking_total_key(pid), ranking_to_bytes(rtotal.merge(racc)))
            batch.delete(rkey)
        requests = request_prefix(pair.key.rollout)
        lists = lists_prefix(pair.key.rollout) if pair.ranking else None
        dropped = 0
        for ids in self._window_ids(pid, ws):
            batch.delete_many([requests + i for i in ids])
            if lists is not None:
                batch.delete_many([lists + i for i in ids])
            dropped += len(ids)
        batch.delete_range(_ids_prefix(pid, ws), _ids_prefix(pid, ws + 1))
        batch.delete_range(_index_prefix(pid, ws), _index_prefix(pid, ws + 1))
        self.meta.stored -= dropped
        end = ws + self.windows.report_window_ms
        pair.finalized_through = max(pair.finalized_through, end)
        pair.open = [w for w in pair.open if w != ws]
        self.dirty.discard((pid, ws))
        if acc.any():
            pair.windows_final += 1
            pair.first_final_start = (
                ws if pair.first_final_start is None else min(pair.first_final_start, ws)
            )
            pair.last_final_end = (
                end if pair.last_final_end is None else max(pair.last_final_end, end)
            )
        batch.put(_pair_key(pid), _ENC.encode(pair))

    def _window_ids(self, pid: int, ws: int) -> Iterator[list[bytes]]:
        """The ids of the requests stored in window ``ws`` of pair ``pid``, a list per index
        record (legacy per-request ``i`` keys: one list of them all)."""
        prefix = _ids_prefix(pid, ws)
        for _, value in self.store.scan(prefix):
            yield _IDS.decode(value)
        prefix = _index_prefix(pid, ws)
        legacy = [key[len(prefix) :] for key, _ in self.store.scan(prefix)]
        if legacy:
            yield legacy

    def _apply_expire(self, mark: ExpireMark, batch: Batch) -> None:
        self.meta.stream_ms = max(self.meta.stream_ms, mark.stream_ms)
        surviving: set[bytes] = set()
        if not self.meta.ranking_orphans:
            for key, raw in self.store.scan(b"o"):
                kept = list(ORPHAN.iter_unpack(raw))
                if max(o[3] for o in kept) < mark.before_ms:
                    batch.delete(key)
                    self.meta.orphans -= 1
                    self.meta.orphans_expired += 1
                elif len(surviving) <= MAX_ORPHAN_IDS:
                    surviving.add(key[1:])
            self.orphan_ids = surviving if len(surviving) <= MAX_ORPHAN_IDS else None
            return
        # Numeric (``o``) and ranking (``q``) outcomes of a request id leave together.
        latest: dict[bytes, int] = {}
        for key, raw in self.store.scan(b"o"):
            latest[key[1:]] = max(o[3] for o in ORPHAN.iter_unpack(raw))
        ranking: set[bytes] = set()
        for key, raw in self.store.scan(b"q"):
            ranking.add(key[1:])
            t = max(e[0] for e in _HELD.decode(raw))
            latest[key[1:]] = max(latest.get(key[1:], t), t)
        for rid, t in latest.items():
            if t >= mark.before_ms:
                if len(surviving) <= MAX_ORPHAN_IDS:
                    surviving.add(rid)
                continue
            batch.delete(b"o" + rid)
            if rid in ranking:
                batch.delete(b"q" + rid)
                self.meta.ranking_orphans -= 1
            self.meta.orphans -= 1
            self.meta.orphans_expired += 1
        self.orphan_ids = surviving if len(surviving) <= MAX_ORPHAN_IDS else None

    def retire_at(self, pair: PairRecord) -> int | None:
        """Stream time from which ``pair`` may be retired (None: not while a window of it is
        open, or never: ``retire_after_ms`` is 0)."""
        if not self.retire_after_ms or pair.open:
            return None
        idle = max(self.retire_after_ms, pair.settings.label_window_ms)
        return pair.idle_since() + idle

    def retirable(self, stream_ms: int) -> list[PairRecord]:
        """Pairs to retire at ``stream_ms``, by id: every window final (its label window and
        grace passed: no outcome can change it, no request of it is stored) and no comparison
        of it for the idle time."""
        out = []
        for pid in sorted(self.pairs):
            at = self.retire_at(self.pairs[pid])
            if at is not None and at <= stream_ms:
                out.append(self.pairs[pid])
        return out

    def _apply_retire(self, mark: RetireMark, batch: Batch, stats: ApplyStats) -> None:
        """Drop a finished, idle pair's state (its verdict basis included), so that it no
        longer counts against the caps. A mark for a pair that is gone, was started afresh
        since (another id) or is no longer finished changes nothing but stream time."""
        self.meta.stream_ms = max(self.meta.stream_ms, mark.stream_ms)
        pid = self._by_key.get(PairKey(*mark.pair))
        if pid is None or pid != mark.pair_id:
            return
        pair = self.pairs[pid]
        at = self.retire_at(pair)
        if at is None or at > mark.stream_ms:
            return
        verdict = self.verdict(pair, 0)
        batch.delete(_pair_key(pid))
        batch.delete(_total_key(pid))
        batch.delete(_ranking_total_key(pid))
        for prefix in (b"w", b"x", b"j", b"i"):  # none left: every window is final
            batch.delete_range(prefix + _U32.pack(pid), prefix + _U32.pack(pid + 1))
        del self.pairs[pid]
        del self._by_key[PairKey(*pair.key)]
        self.dirty = {d for d in self.dirty if d[0] != pid}
        self.meta.retired += 1
        stats.retired.append(Retired(pair, verdict, mark.stream_ms))

    def advance(self, bound_ms: int) -> int:
        """Move stream time up to ``bound_ms`` (see :func:`stream_bound`); it never goes back."""
        self.stream_ms = max(self.stream_ms, bound_ms)
        return self.stream_ms

    # -- reading ---------------------------------------------------------------------------

    def window_accumulator(self, pid: int, ws: int) -> FloatArray:
        raw = self.store.get(_window_key(pid, ws))
        return self.layout.from_bytes(raw) if raw is not None else self.layout.zeros()

    def ranking_window(self, pid: int, ws: int) -> PairedRankingQuality | None:
        """The window's ranking accumulator (None: no ranking request judged in it)."""
        raw = self.store.get(_ranking_window_key(pid, ws))
        return ranking_from_bytes(raw) if raw is not None else None

    def ranking_total(self, pid: int) -> PairedRankingQuality | None:
        raw = self.store.get(_ranking_total_key(pid))
        return ranking_from_bytes(raw) if raw is not None else None

    def total_accumulator(self, pid: int) -> FloatArray:
        raw = self.store.get(_total_key(pid))
        return self.layout.from_bytes(raw) if raw is not None else self.layout.zeros()

    def due_final(self, stream_ms: int) -> list[tuple[PairRecord, int]]:
        """Open windows whose label windows (and grace) have all closed, oldest first."""
        due = [
            (pair, ws)
            for pair in self.pairs.values()
            for ws in pair.open
            if self.windows.final_at(ws, pair.settings) <= stream_ms
        ]
        return sorted(due, key=lambda d: (d[1], d[0].id))

    def mature(self, stream_ms: int) -> Iterator[tuple[PairRecord, int]]:
        """Open windows whose comparisons have arrived (provisional reports)."""
        for pair in self.pairs.values():
            for ws in pair.open:
                if self.windows.mature_at(ws) <= stream_ms:
                    yield pair, ws

    def report(self, pair: PairRecord, ws: int, status: ReportStatus, now_ms: int) -> QualityReport:
        s = pair.settings
        return quality_report(
            PairKey(*pair.key),
            ws,
            ws + self.windows.report_window_ms,
            self.layout,
            self.window_accumulator(pair.id, ws),
            status=status,
            label_window_ms=s.label_window_ms,
            missing=s.missing,
            stream_time_ms=self.stream_ms,
            final_at_ms=self.windows.final_at(ws, s),
            now_ms=now_ms,
            judging=self.judging,
            ranking=self.ranking_window(pair.id, ws),
        )

    def verdict(self, pair: PairRecord, now_ms: int) -> QualityVerdict | None:
        """The pair's verdict over its final windows (None before the first one)."""
        if pair.first_final_start is None or pair.last_final_end is None:
            return None
        return quality_verdict(
            PairKey(*pair.key),
            self.layout,
            self.total_accumulator(pair.id),
            windows=pair.windows_final,
            first_window_start_ms=pair.first_final_start,
            last_window_end_ms=pair.last_final_end,
            requirement=pair.settings.non_inferiority,
            now_ms=now_ms,
            judging=self.judging,
            ranking=self.ranking_total(pair.id),
        )

    def orphan_cutoff(self, stream_ms: int) -> int:
        """Unmatched outcomes that happened before this cannot meet a comparison whose window
        is still open."""
        w = self.windows
        return stream_ms - (
            w.report_window_ms
            + self.max_label_window_ms
            + w.comparison_lateness_ms
            + w.outcome_grace_ms
        )


__all__ = [
    "MAX_ORPHAN_OUTCOMES",
    "MAX_OUTCOME_LEAD_MS",
    "MAX_PAIRS",
    "MAX_ROLLOUTS",
    "META_KEY",
    "ApplyStats",
    "JoinTask",
    "Meta",
    "PairRecord",
    "Retired",
    "Windows",
    "stream_bound",
]
