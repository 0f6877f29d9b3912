"""Consumed records -> :class:`~sidecar.outcomes.chunks.InputChunk`s: what a task applies.

Both inputs are untrusted. A comparison that does not decode is skipped and counted (the
aggregator dead-letters comparison records already; a second dead letter per record would only
duplicate it); an outcome on the repartitioned topic that does not decode is skipped and
counted too (the router dead-lettered what it could not read; anything else there was written
by someone other than the router). Records dated more than ``outcomes.max_future_ms`` ahead
of the wall clock are skipped: they would move stream time and finalise windows early; those
dated ahead by less are applied, but a chunk's event time (``stream_ms``, what moves stream
time) counts only up to the clock, so a request whose ``ts`` its producer set minutes ahead
cannot make windows final minutes early. Records dated before 1973 (``MIN_PLAUSIBLE_MS``: a
``ts`` in seconds) are skipped as ``implausible_time``: they would open windows of 1970 that
turn final at once. Nothing here raises because of a record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from ..contracts import MAX_CANDIDATES, MAX_EPOCH_MS, MIN_PLAUSIBLE_MS
from .chunks import (
    EMPTY_COMPARISONS,
    EMPTY_OUTCOMES,
    MAX_CHUNK_ROWS,
    InputChunk,
    PairSpec,
    RankedLists,
    comparison_arrays,
    comparison_columns,
    encode,
    outcome_columns,
    ranked_lists,
)
from .contract import Outcome, decode_outcome, numeric_label
from .heartbeat import heartbeat_of
from .settings import OutcomesSettings

#: Quality windows (rollout pair x window) one chunk of comparisons may touch. A task applies
#: a chunk in one atomic store batch that holds every window it touches (an accumulator of
#: ~100 kB each, and its delta while it is built): comparisons of a thousand pairs spread over
#: a few windows each (anyone who can write the comparisons topic can write them) took the
#: stage past a GB in one poll. The usual poll touches one or two.
MAX_CHUNK_WINDOWS = 128

Name = Annotated[str, msgspec.Meta(max_length=256)]


class RecordLike(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


class ArmView(msgspec.Struct, kw_only=True, gc=False):
    """The part of a ``ModelResult`` the join reads: a binary arm's score and decision."""

    model: Name
    version: Name
    score: float | None = None
    decision: bool | None = None


class RankedArmView(ArmView, kw_only=True, gc=False):
    """...and a ranking arm's output kind and item ids (best first)."""

    output_kind: Name = "binary"
    items: Annotated[list[Name], msgspec.Meta(max_length=MAX_CANDIDATES)] | None = None


class ComparisonView(msgspec.Struct, kw_only=True, gc=False):
    """The part of a ``Comparison`` the join reads (the rest is skipped at decode)."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    rollout: Name
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH_MS)]
    champion: ArmView
    candidate: ArmView


class RankedView(msgspec.Struct, kw_only=True, gc=False):
    """A comparison's arms with their ranking fields: read again, only for comparisons whose
    arms have no score (a ranking model's arm has none), so binary comparisons cost what
    they did."""

    champion: RankedArmView
    candidate: RankedArmView


_VIEW = msgspec.json.Decoder(ComparisonView)
_RANKED = msgspec.json.Decoder(RankedView)


def decode_comparisons(values: Sequence[bytes | None]) -> list[ComparisonView | None]:
    """One decoded view per value, None where a value is not a comparison.

    The usual poll (every value a comparison) is one ``map`` of the decoder over the values:
    no joined copy of the poll and no scan of it for stray newlines, which cost about a
    quarter of the decoding itself (``decode_lines`` of the values joined by newlines, or a
    JSON array of them, was measured slower). Any record that does not decode (or a null
    value) sends the poll record by record, where each bad one becomes None."""
    try:
        return list(map(_VIEW.decode, values))  # type: ignore[arg-type]
    except Exception:  # any bad record (or a null value): the slow path finds which
        pass
    out: list[ComparisonView | None] = []
    for v in values:
        try:
            out.append(_VIEW.decode(v) if v is not None else None)
        except Exception:  # untrusted: DecodeError, RecursionError, ...
            out.append(None)
    return out


@dataclass
class Skipped:
    """Records left out of the chunks, by input and reason (counted in metrics)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, source: str, reason: str, n: int = 1) -> None:
        if n:
            key = (source, reason)
            self.counts[key] = self.counts.get(key, 0) + n


_REQUEST_ID, _TS = attrgetter("request_id"), attrgetter("ts")


def _top(items: list[str], k: int) -> list[str]:
    """The first ``k`` distinct items (a repeated item counts at its best rank only)."""
    out: dict[str, None] = {}
    for item in items:
        if len(out) >= k:
            break
        out.setdefault(item)
    return list(out)


#: A comparison's rollout pair (one C call per row: no per-arm lists, no tuple zip).
_PAIR_OF = attrgetter(
    "rollout", "champion.model", "champion.version", "candidate.model", "candidate.version"
)
_SCORE_1, _SCORE_2, _DECISION_1, _DECISION_2 = (
    attrgetter(f"{arm}.{name}")
    for name in ("score", "decision")
    for arm in ("champion", "candidate")
)


def _scores(views: list[ComparisonView], get: Callable[[Any], Any]) -> npt.NDArray[np.float64]:
    """Scores as float64 (None -> NaN, as numpy converts it)."""
    return np.fromiter(map(get, views), dtype=np.float64, count=len(views))


def _decisions(views: list[ComparisonView], get: Callable[[Any], Any]) -> npt.NDArray[np.int8]:
    """Decisions as int8 (None -> -1)."""
    try:  # the usual poll: every arm decided (a None stops ``fromiter``)
        return np.fromiter(map(get, views), dtype=np.int8, count=len(views))
    except TypeError:
        as_float = np.array(list(map(get, views)), dtype=np.float64)  # None -> NaN
        return np.where(np.isnan(as_float), -1, as_float).astype(np.int8)


class ChunkBuilder:
    """Turns one poll of a task's two inputs into changelog chunks."""

    def __init__(self, settings: OutcomesSettings, *, min_event_ms: int = MIN_PLAUSIBLE_MS) -> None:
        self.settings = settings
        #: Event times below this are skipped as ``implausible_time`` (a ``ts`` in seconds);
        #: tests of synthetic time that starts at 0 pass 0.
        self.min_event_ms = min_event_ms

    def build(
        self,
        task: int,
        comparisons: Sequence[RecordLike],
        outcomes: Sequence[RecordLike],
        now_ms: int,
        skipped: Skipped,
        max_bytes: int = 900_000,
    ) -> list[tuple[InputChunk, bytes]]:
        """The chunks of one poll (comparisons first), each with its encoding, each at most
        ``MAX_CHUNK_ROWS`` rows and ``max_bytes`` encoded (a poll is split as needed)."""
        limit = now_ms + self.settings.max_future_ms
        if comparisons and outcomes and len(comparisons) + len(outcomes) <= MAX_CHUNK_ROWS:
            trial = Skipped()
            a = self._comparisons(task, comparisons, limit, trial)
            b = self._outcomes(task, outcomes, limit, trial)
            both = msgspec.structs.replace(
                a,
                outcomes=b.outcomes,
                offsets={**a.offsets, **b.offsets},
                stream_ms=max(a.stream_ms, b.stream_ms),
                input_ms={"c": a.stream_ms, "o": b.stream_ms},
            )
            raw = encode(both)
            built = [(both, raw)]  # the usual poll: one chunk, one changelog record
            if len(raw) > max_bytes:  # too big together: each input apart, if it fits
                built = [(a, encode(a)), (b, encode(b))]
            if all(len(r) <= max_bytes for _, r in built) and self._few_windows(a):
                for key, n in trial.counts.items():
                    skipped.add(*key, n)
                return built
        out: list[tuple[InputChunk, bytes]] = []
        for records, make in ((comparisons, self._comparisons), (outcomes, self._outcomes)):
            for start in range(0, len(records), MAX_CHUNK_ROWS):
                part = records[start : start + MAX_CHUNK_ROWS]
                out += self._fitting(task, part, make, limit, skipped, max_bytes)
        return out

    def _fitting(
        self,
        task: int,
        records: Sequence[RecordLike],
        make: Callable[[int, Sequence[RecordLike], int, Skipped], InputChunk],
        limit: int,
        skipped: Skipped,
        max_bytes: int,
    ) -> list[tuple[InputChunk, bytes]]:
        trial = Skipped()
        chunk = make(task, records, limit, trial)
        raw = encode(chunk)
        if (len(raw) <= max_bytes and self._few_windows(chunk)) or len(records) == 1:
            for key, n in trial.counts.items():
                skipped.add(*key, n)
            return [(chunk, raw)]
        half = len(records) // 2
        return self._fitting(task, records[:half], make, limit, skipped, max_bytes) + (
            self._fitting(task, records[half:], make, limit, skipped, max_bytes)
        )

    def _few_windows(self, chunk: InputChunk) -> bool:
        """Whether ``chunk``'s comparisons touch at most ``MAX_CHUNK_WINDOWS`` quality
        windows (rollout pair x window start)."""
        n = len(chunk.comparisons.ids)
        if n <= MAX_CHUNK_WINDOWS:
            return True
        cols = comparison_arrays(chunk.comparisons)
        ws = cols["ts"] // self.settings.report_window_ms
        span = int(ws.max()) - int(ws.min()) + 1
        if span * len(chunk.pairs) <= MAX_CHUNK_WINDOWS:  # the usual poll: no sort needed
            return True
        if len(chunk.pairs) == 1:
            return int(np.unique(ws).size) <= MAX_CHUNK_WINDOWS
        keys = np.stack(
            [cols["pair"].astype(np.int64), cols["ts"] // self.settings.report_window_ms]
        )
        return int(np.unique(keys, axis=1).shape[1]) <= MAX_CHUNK_WINDOWS

    def _event_time(self, ts: npt.NDArray[np.int64], limit: int) -> int:
        """How far a chunk of these event times moves stream time: their largest, but no
        further than the clock (``limit`` less ``max_future_ms``; 0 for no rows)."""
        if not ts.size:
            return 0
        return min(int(ts.max()), limit - self.settings.max_future_ms)

    def _comparisons(
        self, task: int, records: Sequence[RecordLike], limit: int, skipped: Skipped
    ) -> InputChunk:
        values = [r.value for r in records]
        views = decode_comparisons(values)
        kept: list[ComparisonView]
        kept_values: list[bytes | None]
        ts_arr: npt.NDArray[np.int64] | None = None
        if None not in views:  # the usual poll: every record decoded
            kept = views  # type: ignore[assignment]
            kept_values = values
            ts_arr = np.fromiter(map(_TS, kept), dtype=np.int64, count=len(kept))
            if ts_arr.size and (int(ts_arr.max()) > limit or int(ts_arr.min()) < MIN_PLAUSIBLE_MS):
                ts_arr = None  # some are dated ahead or in 1970: record by record below
        if ts_arr is None:
            kept, kept_values = [], []
            for v, raw in zip(views, values, strict=True):
                if v is None:
                    skipped.add("comparisons", "undecodable")
                elif v.ts > limit:
                    skipped.add("comparisons", "future")
                elif v.ts < self.min_event_ms:
                    skipped.add("comparisons", "implausible_time")
                else:
                    kept.append(v)
                    kept_values.append(raw)
            ts_arr = np.fromiter(map(_TS, kept), dtype=np.int64, count=len(kept))
        keys: list[tuple[str, str, str, str, str]] = list(map(_PAIR_OF, kept))
        pairs: dict[tuple[str, str, str, str, str], int] = {}
        if keys and keys.count(keys[0]) == len(keys):  # one rollout pair: the usual chunk
            pairs[keys[0]] = 0
            pair_idx = np.zeros(len(keys), dtype=np.int32)
        else:
            pair_idx = np.fromiter(
                (pairs.setdefault(k, len(pairs)) for k in keys), dtype=np.int32, count=len(keys)
            )
        specs = [PairSpec(*k, self.settings.for_rollout(k[0])) for k in pairs]
        p1, p2 = _scores(kept, _SCORE_1), _scores(kept, _SCORE_2)
        unscored = np.flatnonzero(np.isnan(p1) | np.isnan(p2))
        ranking = self._ranked(kept, kept_values, unscored.tolist()) if unscored.size else None
        return InputChunk(
            task=task,
            pairs=specs,
            comparisons=comparison_columns(
                list(map(_REQUEST_ID, kept)),
                pair_idx,
                ts_arr,
                p1,
                p2,
                _decisions(kept, _DECISION_1),
                _decisions(kept, _DECISION_2),
                ranking,
            ),
            outcomes=EMPTY_OUTCOMES,
            offsets={"c": (records[0].offset, records[-1].offset + 1)},
            stream_ms=self._event_time(ts_arr, limit),
        )

    def _ranked(
        self, kept: list[ComparisonView], values: list[bytes | None], unscored: list[int]
    ) -> RankedLists | None:
        """Both arms' lists of the ranking comparisons among the ``unscored`` rows (both arms
        returned a ranking), each cut to its rollout's ``ranking_k`` distinct items."""
        rows: list[int] = []
        first: list[list[str]] = []
        second: list[list[str]] = []
        k_of: dict[str, int] = {}
        for i in unscored:
            try:
                arms = _RANKED.decode(values[i])  # type: ignore[arg-type]
            except Exception:  # decoded once already; a list too long or of non-strings
                continue
            a, b = arms.champion, arms.candidate
            if a.items is None or b.items is None:
                continue
            if a.output_kind != "ranking" or b.output_kind != "ranking":
                continue
            rollout = kept[i].rollout
            k = k_of.get(rollout)
            if k is None:
                k = k_of[rollout] = self.settings.for_rollout(rollout).ranking_k
            rows.append(i)
            first.append(_top(a.items, k))
            second.append(_top(b.items, k))
        return ranked_lists(rows, first, second)

    def _outcomes(
        self, task: int, records: Sequence[RecordLike], limit: int, skipped: Skipped
    ) -> InputChunk:
        ids: list[str] = []
        ts: list[int] = []
        labels: list[float] = []
        values: list[float] = []
        ranked: list[int] = []
        clicked: list[list[str]] = []
        nan = float("nan")
        for rec in records:
            if heartbeat_of(rec) is not None:
                continue  # the router's heartbeat: read by the service, nothing to apply
            got = decode_outcome(rec.value)
            if not isinstance(got, Outcome):
                skipped.add("outcomes", "undecodable")
                continue
            if got.ts > limit:
                skipped.add("outcomes", "future")
                continue
            if got.ts < self.min_event_ms:
                skipped.add("outcomes", "implausible_time")
                continue
            label = numeric_label(got.label)
            if label is None:  # a ranking label: the items acted on, as a sorted set
                ranked.append(len(ids))
                clicked.append(sorted(set(got.label)))  # type: ignore[arg-type]
            ids.append(got.request_id)
            ts.append(got.ts)
            labels.append(nan if label is None else label)
            values.append(nan if got.value is None else got.value)
        ts_arr = np.array(ts, dtype=np.int64)
        return InputChunk(
            task=task,
            pairs=[],
            comparisons=EMPTY_COMPARISONS,
            outcomes=outcome_columns(
                ids,
                ts_arr,
                np.array(labels, dtype=np.float64),
                np.array(values),
                ranked_lists(ranked, clicked, [[] for _ in ranked]),
            ),
            offsets={"o": (records[0].offset, records[-1].offset + 1)},
            stream_ms=self._event_time(ts_arr, limit),
        )


__all__ = [
    "MAX_CHUNK_WINDOWS",
    "ArmView",
    "ChunkBuilder",
    "ComparisonView",
    "RecordLike",
    "Skipped",
    "decode_comparisons",
]
