"""What the join's changelog holds: the inputs a task accepted, and the decisions it took.

The store of a task is a pure function of its changelog: replaying the records in order into an
empty store (or into a store that has applied a prefix of them) gives the same state. So the
changelog carries *inputs*, not store writes: one :class:`InputChunk` per applied poll (the
poll's comparisons and outcomes as compact columns, their input offsets and the settings a new
rollout pair starts with), a :class:`FinalMark` when a window becomes final (after its final
report was published), an :class:`ExpireMark` when unmatched outcomes are dropped, a
:class:`RetireMark` when a finished, idle rollout pair leaves the store. One record
per poll instead of one per request keeps the changelog cheap (a few bytes a request), and
its per-partition order makes each poll atomic: a chunk is applied whole or not at all.

Records are MessagePack (``msgspec``); arrays travel as raw little-endian bytes. They are read
back as untrusted input like any record (a decode failure stops the restore with an error
naming the offset: a changelog we cannot read is a state we cannot trust).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from .report import PairKey, PairNames
from .settings import RolloutQuality

CHUNK_VERSION = 1
#: Rows per input chunk at most: a chunk must fit one record (ids ~20-40 bytes, columns
#: 34 bytes a comparison, 26 an outcome: 10,000 rows ~550-750 kB; longer ids are split by
#: size). As many as ``outcomes.max_batch``'s default, so that a poll is one chunk: each
#: chunk is a changelog record, a store write and an apply of its own.
MAX_CHUNK_ROWS = 10_000

Id = Annotated[str, msgspec.Meta(max_length=256)]


class PairSpec(PairNames, array_like=True, frozen=True):
    """A rollout pair named by a chunk, with the settings it starts with if it is new."""

    settings: RolloutQuality


class RankedLists(msgspec.Struct, array_like=True, frozen=True):
    """Item lists of some rows of a chunk: ``rows`` (int32) indexes the chunk's ids; per row,
    ``first`` and ``second`` hold item ids (comparisons: the champion's and the candidate's
    ranking, best first, at most the rollout's ``ranking_k``; outcomes: the items acted on,
    sorted and distinct in ``first``, ``second`` empty)."""

    rows: bytes
    first: list[list[Id]]
    second: list[list[Id]]


class ComparisonColumns(msgspec.Struct, frozen=True, omit_defaults=True):
    """Comparisons of one poll. ``pair``: index into the chunk's pairs (int32); ``ts`` int64;
    ``champion``/``candidate`` scores float64 (NaN: none); decisions int8 (-1: none);
    ``ranking``: both arms' item lists of the ranking comparisons (absent when none is)."""

    ids: list[Id]
    pair: bytes
    ts: bytes
    champion: bytes
    candidate: bytes
    champion_decision: bytes
    candidate_decision: bytes
    ranking: RankedLists | None = None


class OutcomeColumns(msgspec.Struct, frozen=True, omit_defaults=True):
    """Outcomes of one poll: ``ts`` int64, ``label`` float64 (NaN for a ranking label),
    ``value`` float64 (NaN: none); ``items``: the item sets of the ranking labels (absent
    when none is)."""

    ids: list[Id]
    ts: bytes
    label: bytes
    value: bytes
    items: RankedLists | None = None


class InputChunk(msgspec.Struct, tag="input", frozen=True):
    task: int
    pairs: list[PairSpec]
    comparisons: ComparisonColumns
    outcomes: OutcomeColumns
    #: Per input (``c``: comparisons, ``o``: repartitioned outcomes), the offsets the chunk
    #: covers on the task's partition: ``[first, next]`` (records skipped as undecodable
    #: included).
    offsets: dict[Literal["c", "o"], tuple[int, int]]
    #: Largest event time among the chunk's records.
    stream_ms: int
    #: Largest event time per input (each input's watermark; ``stream_ms`` when absent).
    input_ms: dict[Literal["c", "o"], int] = {}
    v: int = CHUNK_VERSION


class FinalMark(msgspec.Struct, tag="final", frozen=True):
    """The final report of a window was published: its requests leave the store and its
    figures join the pair's verdict."""

    pair: PairKey
    window_start_ms: int
    stream_ms: int
    v: int = CHUNK_VERSION


class ExpireMark(msgspec.Struct, tag="expire", frozen=True):
    """Outcomes that matched no comparison and happened before ``before_ms`` are dropped."""

    before_ms: int
    stream_ms: int
    v: int = CHUNK_VERSION


class RetireMark(msgspec.Struct, tag="retire", frozen=True):
    """Rollout pair ``pair`` (the task's pair ``pair_id``) is retired: every window of it is
    final and it had no comparison for ``outcomes.retire_after_ms`` at ``stream_ms``. Its
    state leaves the store; applied only while the task's pair of that key is still that id
    and still finished, so a repeated mark never retires the pair started afresh after it."""

    pair: PairKey
    pair_id: int
    stream_ms: int
    v: int = CHUNK_VERSION


ChangelogRecord = InputChunk | FinalMark | ExpireMark | RetireMark

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(ChangelogRecord)


def encode(record: ChangelogRecord) -> bytes:
    return _ENCODER.encode(record)


def decode(raw: bytes) -> ChangelogRecord:
    """A changelog record; raises ``msgspec.DecodeError``/``ValidationError`` on garbage."""
    return _DECODER.decode(raw)


def _bytes(a: npt.NDArray[Any], dtype: str) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


def ranked_lists(
    rows: list[int], first: list[list[str]], second: list[list[str]]
) -> RankedLists | None:
    """The lists of ``rows`` (None when there are none)."""
    if not rows:
        return None
    return RankedLists(_bytes(np.asarray(rows), "<i4"), first, second)


def ranked_arrays(r: RankedLists | None, n: int) -> tuple[list[int], RankedLists | None]:
    """The row indexes of ``r`` (checked against ``n`` ids and the lists)."""
    if r is None:
        return [], None
    rows = np.frombuffer(r.rows, dtype="<i4")
    if rows.size != len(r.first) or rows.size != len(r.second):
        raise ColumnError(f"{rows.size} ranked rows for {len(r.first)}/{len(r.second)} lists")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ColumnError("a ranked row is not one of the chunk's rows")
    return rows.tolist(), r


def comparison_columns(
    ids: list[str],
    pair: npt.NDArray[np.int32],
    ts: npt.NDArray[np.int64],
    champion: npt.NDArray[np.float64],
    candidate: npt.NDArray[np.float64],
    champion_decision: npt.NDArray[np.int8],
    candidate_decision: npt.NDArray[np.int8],
    ranking: RankedLists | None = None,
) -> ComparisonColumns:
    return ComparisonColumns(
        ids,
        _bytes(pair, "<i4"),
        _bytes(ts, "<i8"),
        _bytes(champion, "<f8"),
        _bytes(candidate, "<f8"),
        _bytes(champion_decision, "i1"),
        _bytes(candidate_decision, "i1"),
        ranking,
    )


def outcome_columns(
    ids: list[str],
    ts: npt.NDArray[np.int64],
    label: npt.NDArray[np.float64],
    value: npt.NDArray[np.float64],
    items: RankedLists | None = None,
) -> OutcomeColumns:
    return OutcomeColumns(ids, _bytes(ts, "<i8"), _bytes(label, "<f8"), _bytes(value, "<f8"), items)


EMPTY_COMPARISONS = comparison_columns(
    [],
    np.zeros(0, np.int32),
    np.zeros(0, np.int64),
    np.zeros(0),
    np.zeros(0),
    np.zeros(0, np.int8),
    np.zeros(0, np.int8),
)
EMPTY_OUTCOMES = outcome_columns([], np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


class ColumnError(ValueError):
    """A chunk whose columns do not line up with its ids."""


def _array(raw: bytes, dtype: str, n: int, name: str) -> npt.NDArray[Any]:
    a = np.frombuffer(raw, dtype=dtype)
    if a.size != n:
        raise ColumnError(f"column {name} has {a.size} values for {n} ids")
    return a


def comparison_arrays(c: ComparisonColumns) -> dict[str, npt.NDArray[Any]]:
    n = len(c.ids)
    return {
        "pair": _array(c.pair, "<i4", n, "pair"),
        "ts": _array(c.ts, "<i8", n, "ts"),
        "champion": _array(c.champion, "<f8", n, "champion"),
        "candidate": _array(c.candidate, "<f8", n, "candidate"),
        "champion_decision": _array(c.champion_decision, "i1", n, "champion_decision"),
        "candidate_decision": _array(c.candidate_decision, "i1", n, "candidate_decision"),
    }


def outcome_arrays(o: OutcomeColumns) -> dict[str, npt.NDArray[Any]]:
    n = len(o.ids)
    return {
        "ts": _array(o.ts, "<i8", n, "ts"),
        "label": _array(o.label, "<f8", n, "label"),
        "value": _array(o.value, "<f8", n, "value"),
    }


__all__ = [
    "CHUNK_VERSION",
    "EMPTY_COMPARISONS",
    "EMPTY_OUTCOMES",
    "MAX_CHUNK_ROWS",
    "ChangelogRecord",
    "ColumnError",
    "ComparisonColumns",
    "ExpireMark",
    "FinalMark",
    "InputChunk",
    "OutcomeColumns",
    "PairSpec",
    "RankedLists",
    "RetireMark",
    "comparison_arrays",
    "comparison_columns",
    "decode",
    "encode",
    "outcome_arrays",
    "outcome_columns",
    "ranked_arrays",
    "ranked_lists",
]
