"""How a model's raw output becomes its per-kind output, a whole batch at a time.

A binary model's output is one score per request, decided by its threshold (that path lives in
:meth:`sidecar.models.base.ScoringModel._check_output` and is unchanged). The other kinds
(:data:`sidecar.manifest.OutputKind`) are checked and shaped here, vectorised with numpy:

* ``multiclass``: an ``(n, labels)`` matrix of probabilities; the decision is the arg-max
  label, the score its probability.
* ``regression``: ``n`` numbers; with bands the decision is the band each falls in.
* ``ranking``: a batch is a matrix. The model returns ``(item ids, scores)``, two ``(n, m)``
  arrays, or -- a re-ranker given the request's candidates -- just the ``(n, m)`` scores of
  those candidates. The top ``k`` per row are chosen with one ``argpartition`` and one
  stable sort (ties keep the model's order); ``-inf`` marks a padding slot (no item).

:class:`KindOutput` holds the result as arrays and renders each record's extra JSON fields
(``,"output_kind":...``) once per batch; the pipeline appends them to its templated decisions
and comparisons, whose Structs declare these fields last for that reason.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from .contracts import ModelError
from .encoding import json_numbers
from .manifest import OutputKind

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ObjectArray = npt.NDArray[np.object_]

_ENCODER = msgspec.json.Encoder()
#: Longest item id a model may return (the request contract bounds the candidates alike).
MAX_ITEM_ID = 256


@dataclass(slots=True)
class CandidateItems:
    """The ``candidates`` of a batch's requests as an ``(n, m)`` object matrix of item ids,
    padded with ``""`` past each row's ``counts``; what a re-ranker is given."""

    ids: ObjectArray
    counts: IntArray
    _codes: tuple[IntArray, list[str]] | None = field(default=None, repr=False)
    #: Both arms' models run at once, in threads: the second waits for the first's codes.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def of(cls, lists: Sequence[Sequence[str]]) -> CandidateItems:
        n = len(lists)
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=n)
        m = int(counts.max()) if n else 0
        if n and int(counts.min()) == m:  # the usual batch: every request has m candidates
            ids = np.empty((n, m), dtype=object)
            if m:
                ids[:] = lists
            return cls(ids, counts)
        ids = np.full((n, m), "", dtype=object)
        for i, row in enumerate(lists):
            ids[i, : len(row)] = row
        return cls(ids, counts)

    def __len__(self) -> int:
        return int(self.counts.size)

    @property
    def mask(self) -> BoolArray:
        """True where a slot holds an item (not padding)."""
        return np.arange(self.ids.shape[1]) < self.counts[:, None]

    def codes(self) -> tuple[IntArray, list[str]]:
        """Each slot's index into the batch's distinct item ids (-1 for padding), and those
        ids: a model maps the (few) distinct ids to its own indices once, then gathers with
        numpy. Computed once per batch and shared by both arms."""
        with self._lock:
            return self._codes_locked()

    def _codes_locked(self) -> tuple[IntArray, list[str]]:
        if self._codes is None:
            flat = self.ids.ravel().tolist()
            vocab = list(dict.fromkeys(flat))
            index = {item: i for i, item in enumerate(vocab)}
            codes = np.fromiter(map(index.__getitem__, flat), dtype=np.int64, count=len(flat))
            codes = codes.reshape(self.ids.shape)
            if "" in index:  # padding (an empty id is no item)
                codes[codes == index[""]] = -1
            self._codes = (codes, vocab)
        return self._codes

    def rows(self, start: int, stop: int) -> CandidateItems:
        return CandidateItems(self.ids[start:stop], self.counts[start:stop])

    def take(self, idx: npt.NDArray[np.intp]) -> CandidateItems:
        return CandidateItems(self.ids[idx], self.counts[idx])


@dataclass(frozen=True, slots=True)
class KindOutput:
    """A non-binary model's output for one batch (rows meaningful where the batch's ``valid``
    is set)."""

    kind: OutputKind
    #: multiclass: the arg-max label; regression with bands: the band (-1: none).
    label_index: IntArray | None = None
    labels: tuple[str, ...] | None = None
    probabilities: FloatArray | None = None
    values: FloatArray | None = None
    #: ranking: ``(n, k)`` item ids and scores, best first; ``counts`` items per row.
    items: ObjectArray | None = None
    item_scores: FloatArray | None = None
    counts: IntArray | None = None

    def fields(self, i: int) -> dict[str, Any]:
        """Record ``i``'s kind fields, as keyword arguments of ``Decision``/``ModelResult``."""
        out: dict[str, Any] = {"output_kind": self.kind}
        if self.label_index is not None and self.labels is not None:
            j = int(self.label_index[i])
            if j >= 0:
                out["label"] = self.labels[j]
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities[i].tolist()
        if self.values is not None:
            out["value"] = float(self.values[i])
        if self.items is not None and self.item_scores is not None and self.counts is not None:
            c = int(self.counts[i])
            out["items"] = self.items[i, :c].tolist()
            out["item_scores"] = self.item_scores[i, :c].tolist()
        return out

    def fragments(self, valid: BoolArray) -> list[str]:
        """Per record, its kind fields as JSON text to append to an encoded Struct (starting
        with a comma); invalid records only say the kind."""
        n = int(valid.size)
        head = f',"output_kind":"{self.kind}"'
        parts: list[list[str]] = []
        if self.label_index is not None and self.labels is not None:
            names = [f',"label":{_ENCODER.encode(x).decode()}' for x in self.labels] + [""]
            parts.append([names[j] for j in self.label_index.tolist()])
        if self.probabilities is not None:
            width = self.probabilities.shape[1]
            nums = json_numbers(self.probabilities.ravel().tolist())
            parts.append(
                [
                    ',"probabilities":[' + ",".join(nums[i * width : (i + 1) * width]) + "]"
                    for i in range(n)
                ]
            )
        if self.values is not None:
            parts.append([',"value":' + v for v in json_numbers(self.values.tolist())])
        if self.items is not None and self.item_scores is not None and self.counts is not None:
            parts.append(self._ranking_fragments(n))
        if not parts:
            return [head] * n
        valid_list = valid.tolist()
        return [head + "".join(p[i] for p in parts) if valid_list[i] else head for i in range(n)]

    def _ranking_fragments(self, n: int) -> list[str]:
        assert self.items is not None and self.item_scores is not None
        assert self.counts is not None
        k = self.items.shape[1] if self.items.ndim == 2 else 0
        encode = _ENCODER.encode
        counts = self.counts.tolist()
        nums = json_numbers(self.item_scores.ravel().tolist()) if k else []
        rows = self.items.tolist()
        out = []
        for i in range(n):
            c = counts[i]
            ids = rows[i] if c == k else rows[i][:c]
            out.append(
                ',"items":'
                + encode(ids).decode()
                + ',"item_scores":['
                + ",".join(nums[i * k : i * k + c])
                + "]"
            )
        return out

    def take(self, idx: npt.NDArray[np.intp]) -> KindOutput:
        return KindOutput(
            self.kind,
            None if self.label_index is None else self.label_index[idx],
            self.labels,
            None if self.probabilities is None else self.probabilities[idx],
            None if self.values is None else self.values[idx],
            None if self.items is None else self.items[idx],
            None if self.item_scores is None else self.item_scores[idx],
            None if self.counts is None else self.counts[idx],
        )


def concat(parts: Sequence[KindOutput]) -> KindOutput:
    """One output from those of a split batch (same kind; ranking rows padded to one k)."""
    first = parts[0]

    def cat(name: str) -> Any:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return KindOutput(
        first.kind,
        cat("label_index"),
        first.labels,
        cat("probabilities"),
        cat("values"),
        cat("items"),
        cat("item_scores"),
        cat("counts"),
    )


def failed_output(kind: OutputKind, n: int) -> KindOutput:
    """The output of a batch that failed: the kind only."""
    return KindOutput(kind)


@dataclass(frozen=True, slots=True)
class Shaped:
    """What :func:`shape_output` makes of a raw output."""

    scores: FloatArray
    valid: BoolArray
    output: KindOutput | None = None
    #: The whole batch failed (wrong shape, not numeric).
    error: ModelError | None = None
    #: Some records are invalid.
    record_error: ModelError | None = None


def _invalid(message: str) -> ModelError:
    return ModelError(kind="invalid_output", message=message[:500])


def shape_output(
    kind: OutputKind,
    raw: Any,
    n: int,
    *,
    labels: Sequence[str] | None = None,
    bands: Sequence[float] | None = None,
    k: int | None = None,
    items: CandidateItems | None = None,
) -> Shaped:
    """Check a non-binary model's raw output for a batch of ``n`` and shape it."""
    if kind == "multiclass":
        assert labels is not None
        return _multiclass(raw, n, tuple(labels))
    if kind == "regression":
        return _regression(raw, n, bands, None if labels is None else tuple(labels))
    if kind == "ranking":
        assert k is not None
        return _ranking(raw, n, k, items)
    raise ValueError(f"not a shaped kind: {kind}")


def _failed(n: int, message: str) -> Shaped:
    return Shaped(np.full(n, np.nan), np.zeros(n, dtype=bool), error=_invalid(message))


def _multiclass(raw: Any, n: int, labels: tuple[str, ...]) -> Shaped:
    try:
        probs = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return _failed(n, f"probabilities are not numeric: {exc}")
    if probs.shape != (n, len(labels)):
        return _failed(
            n,
            f"expected probabilities of shape ({n}, {len(labels)}) (one column per label), "
            f"got {probs.shape}",
        )
    valid: BoolArray = np.asarray(np.isfinite(probs).all(axis=1) & (probs >= 0).all(axis=1))
    safe = np.where(valid[:, None], probs, 0.0)
    index = safe.argmax(axis=1).astype(np.int64) if len(labels) else np.zeros(n, np.int64)
    index[~valid] = -1
    scores = np.where(valid, safe.max(axis=1), np.nan)
    record_error = None if valid.all() else _invalid("a probability is NaN, infinite or negative")
    return Shaped(
        scores,
        valid,
        KindOutput("multiclass", label_index=index, labels=labels, probabilities=safe),
        record_error=record_error,
    )


def _regression(
    raw: Any, n: int, bands: Sequence[float] | None, labels: tuple[str, ...] | None
) -> Shaped:
    try:
        values = np.asarray(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        return _failed(n, f"values are not numeric: {exc}")
    if values.shape[0] != n:
        return _failed(n, f"expected {n} values, got {values.shape[0]} (shape {np.shape(raw)})")
    valid = np.isfinite(values)
    index = None
    names = labels
    if bands is not None:
        index = np.searchsorted(np.asarray(bands, dtype=np.float64), values, side="right")
        index = index.astype(np.int64)
        index[~valid] = -1
        if names is None:
            names = band_names(bands)
    record_error = None if valid.all() else _invalid("value is NaN or infinite")
    return Shaped(
        np.full(n, np.nan),
        valid,
        KindOutput("regression", label_index=index, labels=names, values=values),
        record_error=record_error,
    )


def band_names(bands: Sequence[float]) -> tuple[str, ...]:
    """Default names of the bands cut at ``bands``: ``<10``, ``10..100``, ``>=100``."""
    b = [f"{x:g}" for x in bands]
    return (f"<{b[0]}", *(f"{lo}..{hi}" for lo, hi in itertools.pairwise(b)), f">={b[-1]}")


def _ranking(raw: Any, n: int, k: int, items: CandidateItems | None) -> Shaped:
    if isinstance(raw, tuple | list) and len(raw) == 2:
        ids_raw, scores_raw = raw
        try:
            scores = np.asarray(scores_raw, dtype=np.float64)
            ids = np.asarray(ids_raw)
        except (TypeError, ValueError) as exc:
            return _failed(n, f"ranking is not (item ids, scores): {exc}")
        if scores.ndim != 2 or ids.shape != scores.shape or scores.shape[0] != n:
            return _failed(
                n,
                f"expected item ids and scores of one shape ({n}, items), got {ids.shape} "
                f"and {scores.shape}",
            )
        if ids.dtype != object:
            ids = ids.astype(str).astype(object)  # integer or fixed-width ids -> str
        present = scores != -np.inf
    else:
        if items is None:
            return _failed(
                n,
                "a ranking model returns (item ids, scores); only a re-ranker "
                "(items_from = request) may return the scores of the request's candidates",
            )
        try:
            scores = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            return _failed(n, f"scores are not numeric: {exc}")
        if scores.shape != items.ids.shape:
            return _failed(
                n,
                f"expected scores of the candidates' shape {items.ids.shape}, got {scores.shape}",
            )
        ids = items.ids
        present = items.mask & (scores != -np.inf)
    # A NaN or +inf score on an item invalidates its row; -inf (or padding) is no item.
    bad = present & ~np.isfinite(scores)
    valid = ~bad.any(axis=1)
    present &= ~bad
    key = np.where(present, scores, -np.inf)
    m = key.shape[1]
    take = min(k, m)
    if take == 0:
        top = np.zeros((n, 0), dtype=np.int64)
    elif m > take:
        # The k best in position order (of items tied with the k-th best, the first ones),
        # then a stable sort by score: ties keep the order the model gave.
        kth = -np.partition(-key, take - 1, axis=1)[:, take - 1 : take]
        above = key > kth
        tied = key == kth
        room = take - np.count_nonzero(above, axis=1, keepdims=True)
        chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
        top = np.nonzero(chosen)[1].reshape(n, take)
    else:
        top = np.broadcast_to(np.arange(m), (n, m))
    top_scores = np.take_along_axis(key, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    top_scores = np.take_along_axis(top_scores, order, axis=1)
    top_ids = np.take_along_axis(ids, top, axis=1)
    counts = np.minimum(np.count_nonzero(present, axis=1), take).astype(np.int64)
    # The request's candidates were checked by the decoder (ItemId); a model's own are not.
    if items is None and top_ids.size and not _ids_ok(top_ids, counts):
        return _failed(n, f"item ids must be non-empty strings of at most {MAX_ITEM_ID} chars")
    record_error = None if valid.all() else _invalid("an item score is NaN or infinite")
    return Shaped(
        np.full(n, np.nan),
        valid,
        KindOutput("ranking", items=top_ids, item_scores=top_scores, counts=counts),
        record_error=record_error,
    )


def _ids_ok(ids: ObjectArray, counts: IntArray) -> bool:
    """Whether the returned item ids are strings of a sane length (one pass of C calls)."""
    k = ids.shape[1]
    flat = ids[np.arange(k) < counts[:, None]].tolist()
    if not flat:
        return True
    if set(map(type, flat)) != {str}:
        return False
    lengths = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
    return bool(lengths.min() > 0 and lengths.max() <= MAX_ITEM_ID)


__all__ = [
    "CandidateItems",
    "KindOutput",
    "Shaped",
    "band_names",
    "concat",
    "failed_output",
    "shape_output",
]
