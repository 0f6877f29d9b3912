"""Columnar view of a batch of decoded comparisons: built once, then everything is numpy.

The one unavoidable per-record Python step is pulling fields out of the decoded structs; it is
done here, column by column with comprehensions, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from ..contracts import Arm

#: Error kinds in code order (code 0 means "no error"); mirrors ``ModelError.kind``.
ERROR_KINDS: tuple[str, ...] = ("exception", "timeout", "invalid_output", "unavailable", "skipped")
_ERROR_CODE: dict[str, int] = {k: i + 1 for i, k in enumerate(ERROR_KINDS)}
#: ``served_by`` codes: 0 none (shadow only or both failed), 1 champion, 2 candidate.
SERVED_NONE, SERVED_CHAMPION, SERVED_CANDIDATE = 0, 1, 2
_SERVED_CODE: dict[str | None, int] = {None: 0, "champion": 1, "candidate": 2}
#: Decision codes: -1 missing, 0 no, 1 yes.

Int8Array = npt.NDArray[np.int8]
Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]
UInt64Array = npt.NDArray[np.uint64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IndexArray = npt.NDArray[np.intp] | Int64Array


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
        )


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


class ErrorView(msgspec.Struct, gc=False):
    """``ModelError`` reduced to what the aggregator reads."""

    kind: Literal["exception", "timeout", "invalid_output", "unavailable", "skipped"]


class ResultView(msgspec.Struct, kw_only=True, gc=False):
    """``ModelResult`` reduced to what the aggregator reads."""

    model: str
    version: str
    score: float | None = None
    decision: bool | None = None
    latency_ms: float | None = None
    error: ErrorView | None = None


class ComparisonView(msgspec.Struct, kw_only=True, gc=False):
    """The fields of a ``Comparison`` the aggregator reads; the rest are skipped at decode.

    Decoding into these untracked (``gc=False``) structs is several times cheaper than full
    ``Comparison`` objects: no per-record strings for unused fields and no GC passes.
    """

    request_id: str
    rollout: str
    ts: int
    served_by: Arm | None
    champion: ResultView
    candidate: ResultView


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


def _arm_columns(results: Sequence[_ResultLike]) -> ArmColumns:
    n = len(results)
    scores = [r.score for r in results]
    errors = [r.error for r in results]
    # None -> NaN on conversion to float; True/False -> 1.0/0.0.
    decision = np.array([r.decision for r in results], dtype=np.float64)
    error = np.zeros(n, dtype=np.int8)
    failed = np.flatnonzero(np.fromiter((e is not None for e in errors), np.bool_, count=n))
    for i in failed.tolist():  # errors are rare: only failed rows pay a Python lookup
        err = errors[i]
        assert err is not None
        error[i] = _ERROR_CODE[err.kind]
    return ArmColumns(
        score=np.array(scores, dtype=np.float64),
        score_missing=np.fromiter((s is None for s in scores), dtype=np.bool_, count=n),
        decision=np.where(np.isnan(decision), -1, decision).astype(np.int8),
        latency_ms=np.array([r.latency_ms for r in results], dtype=np.float64),
        error=error,
    )


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
    index: dict[tuple[str, str, str, str, str], int] = {}
    champions = [c.champion for c in comparisons]
    candidates = [c.candidate for c in comparisons]
    codes = np.fromiter(
        (
            index.setdefault((c.rollout, a.model, a.version, b.model, b.version), len(index))
            for c, a, b in zip(comparisons, champions, candidates, strict=True)
        ),
        dtype=np.int32,
        count=n,
    )
    part = np.broadcast_to(np.asarray(partitions, dtype=np.int32), (n,)).copy()
    offs = np.broadcast_to(np.asarray(offsets, dtype=np.int64), (n,)).copy()
    served = _SERVED_CODE
    return ComparisonBatch(
        keys=tuple(GroupKey(*k) for k in index),
        key_code=codes,
        ts=np.fromiter((c.ts for c in comparisons), dtype=np.int64, count=n),
        partition=part,
        offset=offs,
        request_hash=hash_strings([c.request_id for c in comparisons]),
        served_by=np.fromiter((served[c.served_by] for c in comparisons), dtype=np.int8, count=n),
        champion=_arm_columns(champions),
        candidate=_arm_columns(candidates),
    )
