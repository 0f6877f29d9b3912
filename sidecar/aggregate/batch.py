"""Columnar view of a batch of decoded comparisons: built once, then everything is numpy.

The one unavoidable per-record Python step is pulling fields out of the decoded structs; it is
done here, column by column with comprehensions, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Annotated, Literal, NamedTuple, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from ..contracts import MAX_EPOCH_MS, Arm
from .kinds import RANK_DEPTH, KindColumns, kind_arm

#: Error kinds in code order (code 0 means "no error"); mirrors ``ModelError.kind``.
ERROR_KINDS: tuple[str, ...] = (
    "exception",
    "timeout",
    "invalid_output",
    "unavailable",
    "skipped",
    "shed",
)
_ERROR_CODE: dict[str, int] = {k: i + 1 for i, k in enumerate(ERROR_KINDS)}
#: ``served_by`` codes: 0 none (shadow only or both failed), 1 champion, 2 candidate.
SERVED_NONE, SERVED_CHAMPION, SERVED_CANDIDATE = 0, 1, 2
_SERVED_CODE: dict[str | None, int] = {None: 0, "champion": 1, "candidate": 2}
#: Decision codes: -1 missing, 0 no, 1 yes.
#: Largest policy epoch accepted from a comparison (it must fit an int64 column).
MAX_POLICY_EPOCH = 2**62

Int8Array = npt.NDArray[np.int8]
Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]
UInt64Array = npt.NDArray[np.uint64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IndexArray = npt.NDArray[np.intp] | Int64Array


#: Stands for the rest when a batch carries more distinct policy modes than a code holds.
OTHER_MODE = "(other)"


class GroupKey(NamedTuple):
    """What a window aggregates over, besides time: one rollout between two model versions."""

    rollout: str
    champion_model: str
    champion_version: str
    candidate_model: str
    candidate_version: str


@dataclass(frozen=True, slots=True)
class ArmColumns:
    """One arm's results as columns. ``score`` is NaN for both None and NaN scores."""

    score: FloatArray
    score_missing: BoolArray
    decision: Int8Array
    latency_ms: FloatArray
    error: Int8Array

    def take(self, idx: IndexArray) -> ArmColumns:
        return ArmColumns(
            self.score[idx],
            self.score_missing[idx],
            self.decision[idx],
            self.latency_ms[idx],
            self.error[idx],
        )


@dataclass(frozen=True, slots=True)
class ComparisonBatch:
    """A batch of comparisons as aligned numpy columns plus a small table of group keys."""

    keys: tuple[GroupKey, ...]
    key_code: Int32Array
    ts: Int64Array
    partition: Int32Array
    offset: Int64Array
    request_hash: UInt64Array
    served_by: Int8Array
    champion: ArmColumns
    candidate: ArmColumns
    #: Per row, an index into ``out_of_range_sets`` (0: no feature out of range).
    out_of_range_code: Int32Array
    #: ``Comparison.policy_epoch`` per row (the routing policy the sidecar decided under).
    policy_epoch: Int64Array
    #: Per row, an index into ``policy_modes`` (``Comparison.policy_mode``).
    policy_mode_code: Int8Array
    #: Distinct policy modes of the batch, in code order.
    policy_modes: tuple[str, ...]
    #: Distinct ``Comparison.out_of_range`` lists of the batch; entry 0 is the empty one.
    out_of_range_sets: tuple[tuple[str, ...], ...] = ((),)
    #: Labels, values and rankings of non-binary models (None: every row is binary).
    kinds: KindColumns | None = None

    def __len__(self) -> int:
        return int(self.ts.size)

    def take(self, idx: IndexArray) -> ComparisonBatch:
        """Rows ``idx`` (in that order); the key table is shared."""
        return ComparisonBatch(
            self.keys,
            self.key_code[idx],
            self.ts[idx],
            self.partition[idx],
            self.offset[idx],
            self.request_hash[idx],
            self.served_by[idx],
            self.champion.take(idx),
            self.candidate.take(idx),
            self.out_of_range_code[idx],
            self.policy_epoch[idx],
            self.policy_mode_code[idx],
            self.policy_modes,
            self.out_of_range_sets,
            None if self.kinds is None else self.kinds.take(idx),
        )

    def with_used_keys(self) -> ComparisonBatch:
        """The same rows with a key table of only the keys they use (after a ``take`` that
        left some keys without rows: the window manager registers every key of the table)."""
        used, code = np.unique(self.key_code, return_inverse=True)
        keys = tuple(self.keys[i] for i in used.tolist())
        return replace(self, keys=keys, key_code=code.astype(self.key_code.dtype))


class _ErrorLike(Protocol):
    @property
    def kind(self) -> str: ...


class _ResultLike(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def score(self) -> float | None: ...
    @property
    def decision(self) -> bool | None: ...
    @property
    def latency_ms(self) -> float | None: ...
    @property
    def error(self) -> _ErrorLike | None: ...
    @property
    def output_kind(self) -> str: ...
    @property
    def label(self) -> str | None: ...
    @property
    def value(self) -> float | None: ...
    @property
    def items(self) -> list[str] | None: ...


class ComparisonLike(Protocol):
    """What ``comparison_batch`` reads: a ``Comparison`` or a ``ComparisonView``."""

    @property
    def request_id(self) -> str: ...
    @property
    def rollout(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def served_by(self) -> Arm | None: ...
    @property
    def champion(self) -> _ResultLike: ...
    @property
    def candidate(self) -> _ResultLike: ...
    @property
    def out_of_range(self) -> list[str] | None: ...
    @property
    def policy_epoch(self) -> int: ...
    @property
    def policy_mode(self) -> str: ...


class ErrorView(msgspec.Struct, gc=False):
    """``ModelError`` reduced to what the aggregator reads."""

    kind: Literal["exception", "timeout", "invalid_output", "unavailable", "skipped", "shed"]


#: Bounded strings: the comparisons topic is untrusted like every other (a megabyte request
#: id would make the request-hash column a gigabyte).
Name = Annotated[str, msgspec.Meta(max_length=256)]


class ResultView(msgspec.Struct, kw_only=True, gc=False):
    """``ModelResult`` reduced to what the aggregator reads."""

    model: Name
    version: Name
    score: float | None = None
    decision: bool | None = None
    latency_ms: float | None = None
    error: ErrorView | None = None
    #: Non-binary outputs (``ModelResult``'s last fields; probabilities and item scores are
    #: not read).
    #: A kind this aggregator does not know (a newer sidecar's) is read as a name: its
    #: fields are what count, and they are absent.
    output_kind: Name = "binary"
    label: Name | None = None
    value: float | None = None
    items: Annotated[list[Name], msgspec.Meta(max_length=1000)] | None = None


class ComparisonView(msgspec.Struct, kw_only=True, gc=False):
    """The fields of a ``Comparison`` the aggregator reads; the rest are skipped at decode.

    Decoding into these untracked (``gc=False``) structs is several times cheaper than full
    ``Comparison`` objects: no per-record strings for unused fields and no GC passes.
    """

    request_id: Name
    rollout: Name
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH_MS)]
    #: Bounded so that it fits the int64 column (an epoch is a count of control commands).
    policy_epoch: Annotated[int, msgspec.Meta(ge=0, le=MAX_POLICY_EPOCH)]
    policy_mode: Name
    served_by: Arm | None
    champion: ResultView
    candidate: ResultView
    out_of_range: list[Name] | None = None


def _fmix64(h: UInt64Array) -> UInt64Array:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _position_multipliers(width: int) -> UInt64Array:
    # Fixed odd 64-bit multipliers per character position, derived deterministically.
    return _fmix64(np.arange(1, width + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | (
        np.uint64(1)
    )


def hash_strings(values: Sequence[str]) -> UInt64Array:
    """Deterministic 64-bit hashes of strings, vectorised (stable across processes).

    ``fmix64(sum_i codepoint_i * M_i)`` with fixed odd multipliers per position: the NUL
    padding of numpy's fixed-width strings contributes nothing, so a value hashes the same
    whatever the longest string in its batch.
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    arr = np.array(values, dtype=np.str_)
    width = arr.dtype.itemsize // 4
    if width == 0:
        return _fmix64(np.zeros(n, dtype=np.uint64))
    codes = arr.view(np.uint32).reshape(n, width).astype(np.uint64)
    with np.errstate(over="ignore"):
        summed = (codes * _position_multipliers(width)).sum(axis=1, dtype=np.uint64)
        return _fmix64(summed)


# Column passes are ``map(attrgetter(...))``: no Python frame per record (hot path).
_SCORE, _DECISION, _LATENCY, _ERROR = (
    attrgetter(f) for f in ("score", "decision", "latency_ms", "error")
)
_KIND, _LABEL, _VALUE, _ITEMS = (attrgetter(f) for f in ("output_kind", "label", "value", "items"))


def _kind_columns(
    champions: Sequence[_ResultLike], candidates: Sequence[_ResultLike]
) -> KindColumns | None:
    """The non-binary columns, or None when every result is binary (one count per arm)."""
    n = len(champions)
    kinds_c = list(map(_KIND, champions))
    kinds_k = list(map(_KIND, candidates))
    if kinds_c.count("binary") == n and kinds_k.count("binary") == n:
        return None
    arms = []
    for results in (champions, candidates):
        items = list(map(_ITEMS, results))
        arms.append(
            kind_arm(
                list(map(_LABEL, results)),
                list(map(_VALUE, results)),
                [None if r is None else r[:RANK_DEPTH] for r in items],
                hash_strings,
            )
        )
    return KindColumns(arms[0], arms[1])


_ROLLOUT, _MODEL, _VERSION, _TS, _SERVED, _REQUEST_ID, _EPOCH, _MODE = (
    attrgetter(f)
    for f in (
        "rollout",
        "model",
        "version",
        "ts",
        "served_by",
        "request_id",
        "policy_epoch",
        "policy_mode",
    )
)


def _floats(values: Sequence[_ResultLike], get: attrgetter[float | None], n: int) -> FloatArray:
    """A float column; None becomes NaN (the fast ``fromiter`` path fails on a None)."""
    try:
        return np.fromiter(map(get, values), dtype=np.float64, count=n)
    except TypeError:
        return np.array(list(map(get, values)), dtype=np.float64)


def _arm_columns(results: Sequence[_ResultLike]) -> ArmColumns:
    n = len(results)
    scores = list(map(_SCORE, results))
    # None -> NaN on conversion to float; True/False -> 1.0/0.0.
    decision = np.array(list(map(_DECISION, results)), dtype=np.float64)
    errors = list(map(_ERROR, results))
    error = np.zeros(n, dtype=np.int8)
    if errors.count(None) != n:  # errors are rare: only failed rows pay a Python lookup
        for i, err in enumerate(errors):
            if err is not None:
                error[i] = _ERROR_CODE[err.kind]
    missing = np.zeros(n, dtype=np.bool_)
    if scores.count(None):  # rare: a failed or score-less arm
        missing = np.fromiter((s is None for s in scores), dtype=np.bool_, count=n)
    return ArmColumns(
        score=np.array(scores, dtype=np.float64),
        score_missing=missing,
        decision=np.where(np.isnan(decision), -1, decision).astype(np.int8),
        latency_ms=_floats(results, _LATENCY, n),
        error=error,
    )


def _epochs(comparisons: Sequence[ComparisonLike], n: int) -> Int64Array:
    """The policy-epoch column; a poll usually holds a single epoch (no array pass then)."""
    epochs = list(map(_EPOCH, comparisons))
    if n and epochs.count(epochs[0]) == n:
        return np.full(n, epochs[0], dtype=np.int64)
    return np.array(epochs, dtype=np.int64)


def comparison_batch(
    comparisons: Sequence[ComparisonLike],
    partitions: npt.ArrayLike,
    offsets: npt.ArrayLike,
) -> ComparisonBatch:
    """Columns of ``comparisons``; ``partitions``/``offsets``: their comparison-topic positions.

    ``partitions`` may be a scalar (whole batch from one partition). Offsets are kept only as
    per-window min/max evidence for the reports.
    """
    n = len(comparisons)
    champions = list(map(attrgetter("champion"), comparisons))
    candidates = list(map(attrgetter("candidate"), comparisons))
    rollouts = list(map(_ROLLOUT, comparisons))
    key_cols = (
        rollouts,
        list(map(_MODEL, champions)),
        list(map(_VERSION, champions)),
        list(map(_MODEL, candidates)),
        list(map(_VERSION, candidates)),
    )
    index: dict[tuple[str, str, str, str, str], int] = {}
    if n and all(col.count(col[0]) == n for col in key_cols):  # one key: the usual batch
        index[(key_cols[0][0], key_cols[1][0], key_cols[2][0], key_cols[3][0], key_cols[4][0])] = 0
        codes = np.zeros(n, dtype=np.int32)
    else:
        codes = np.fromiter(
            (index.setdefault(k, len(index)) for k in zip(*key_cols, strict=True)),
            dtype=np.int32,
            count=n,
        )
    part = np.broadcast_to(np.asarray(partitions, dtype=np.int32), (n,)).copy()
    offs = np.broadcast_to(np.asarray(offsets, dtype=np.int64), (n,)).copy()
    served = _SERVED_CODE
    flagged = list(map(attrgetter("out_of_range"), comparisons))
    sets: dict[tuple[str, ...], int] = {(): 0}
    if any(flagged):  # rare: only batches with out-of-range records pay for the codes
        oor = np.fromiter(
            (sets.setdefault(tuple(f), len(sets)) if f else 0 for f in flagged),
            dtype=np.int32,
            count=n,
        )
    else:
        oor = np.zeros(n, dtype=np.int32)
    modes = list(map(_MODE, comparisons))
    mode_index: dict[str, int] = {}
    if n and modes.count(modes[0]) == n:  # one mode: the usual batch (interned: identity)
        mode_index[modes[0]] = 0
        mode_code = np.zeros(n, dtype=np.int8)
    else:
        mode_code = np.fromiter(
            (mode_index.setdefault(m, len(mode_index)) for m in modes), dtype=np.int64, count=n
        )
        if len(mode_index) > 127:  # untrusted: made-up modes beyond what a code holds
            kept = [*list(mode_index)[:126], OTHER_MODE]
            mode_index = {m: i for i, m in enumerate(kept)}
            mode_code = np.minimum(mode_code, 126)
        mode_code = mode_code.astype(np.int8)
    return ComparisonBatch(
        keys=tuple(GroupKey(*k) for k in index),
        key_code=codes,
        ts=np.fromiter(map(_TS, comparisons), dtype=np.int64, count=n),
        partition=part,
        offset=offs,
        request_hash=hash_strings(list(map(_REQUEST_ID, comparisons))),
        served_by=np.fromiter(
            map(served.__getitem__, map(_SERVED, comparisons)), dtype=np.int8, count=n
        ),
        champion=_arm_columns(champions),
        candidate=_arm_columns(candidates),
        out_of_range_code=oor,
        out_of_range_sets=tuple(sets),
        policy_epoch=_epochs(comparisons, n),
        policy_mode_code=mode_code,
        policy_modes=tuple(mode_index),
        kinds=_kind_columns(champions, candidates),
    )
