"""A loaded model: scores a whole batch in a worker thread, never blocking the event loop.

Failures are data, not exceptions: :meth:`ScoringModel.score` always returns a
:class:`BatchScores` whose per-record ``valid`` mask and ``error`` say what went wrong, so a
failing candidate is recorded in the comparison and never reaches champion traffic.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..config import ModelConfig
from ..contracts import ModelError
from ..errors import SidecarError
from ..manifest import Manifest, digest
from ..output_kinds import CandidateItems, KindOutput, concat, shape_output
from .contract import model_manifest
from .health import CircuitBreaker

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@runtime_checkable
class Predictor(Protocol):
    """What a loader must return: scores for every row of a float64 matrix."""

    def predict(self, batch: FloatArray) -> npt.ArrayLike: ...


@dataclass(frozen=True, slots=True)
class BatchScores:
    """One model's result for one batch. ``scores[i]`` is meaningful only where ``valid[i]``."""

    scores: FloatArray
    valid: BoolArray
    decisions: BoolArray
    latency_ms: float
    #: Set when the whole batch failed (exception, timeout, wrong shape, skipped).
    error: ModelError | None = None
    #: Set when only some records are invalid (NaN or infinite scores).
    record_error: ModelError | None = None
    #: A non-binary model's output (labels, values, ranked items); None for binary models
    #: and failed batches ...
    output: KindOutput | None = None
    #: ... and per record, its fields as JSON text (``KindOutput.fragments``), rendered once
    #: and appended to the decisions and comparisons.
    fragments: list[str] | None = None

    @classmethod
    def failed(cls, n: int, error: ModelError, latency_ms: float) -> BatchScores:
        return cls(
            scores=np.full(n, np.nan),
            valid=np.zeros(n, dtype=bool),
            decisions=np.zeros(n, dtype=bool),
            latency_ms=latency_ms,
            error=error,
        )


class ModelUnavailable(SidecarError):
    """The model cannot be reached (server down, connection refused, 503): kind
    ``unavailable``. Raised by remote predictors; check the server named in the message."""

    retriable = True


@runtime_checkable
class AsyncPredictor(Protocol):
    """A predictor that does its own I/O (model servers): awaited on the event loop."""

    async def predict_async(self, batch: FloatArray) -> npt.ArrayLike: ...

    async def aclose(self) -> None: ...


class ScoringModel:
    """A declared model plus the predictor its loader produced.

    Synchronous predictors run in a dedicated thread pool of ``concurrency`` threads;
    asynchronous ones (model servers) are awaited, at most ``concurrency`` calls at once.
    A batch larger than ``max_batch`` is split into calls of at most that size. A call that
    does not finish within ``timeout_ms`` is reported as a timeout; a thread cannot be killed,
    so it keeps its concurrency slot until it returns, and later batches that cannot get a
    slot in time time out too instead of queueing without bound. The circuit breaker skips
    the model (kind ``unavailable``) while it is open.
    """

    def __init__(
        self,
        config: ModelConfig,
        predictor: Predictor | AsyncPredictor,
        *,
        manifest: Manifest | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.threshold = float(config.threshold)
        self.kind = config.output_kind
        #: Whether the model is given the request's candidates (a re-ranker).
        self.needs_items = config.output_kind == "ranking" and config.items_from == "request"
        self.feature_names = [f.name for f in config.features]
        self.manifest = manifest or model_manifest(config)
        self.manifest_digest = digest(self.manifest)
        self.breaker = CircuitBreaker(config.breaker)
        self._predictor = predictor
        self._async = isinstance(predictor, AsyncPredictor)
        self._timeout_s = config.timeout_ms / 1000.0
        self._max_batch = config.max_batch
        self._slots = asyncio.Semaphore(config.concurrency)
        self._pool = (
            None
            if self._async
            else ThreadPoolExecutor(
                max_workers=config.concurrency, thread_name_prefix=f"model-{config.name}"
            )
        )
        self._closing: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        closer = getattr(self._predictor, "close", None)
        if callable(closer):
            closer()
        if isinstance(self._predictor, AsyncPredictor):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            task = loop.create_task(self._predictor.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close from async code, waiting for remote connections to be released."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(self._predictor, AsyncPredictor):
            await self._predictor.aclose()

    async def score(
        self, batch: FloatArray, items: CandidateItems | None = None, *, patient: bool = False
    ) -> BatchScores:
        """Scores of ``batch``; never raises. ``items``: the requests' candidates, given to a
        re-ranker (ignored by other models). ``patient`` (a retry after a timeout): the call
        that timed out may still hold the model's slots, so waiting for a free slot gets its
        own ``timeout_ms`` before the call's ``timeout_ms`` starts."""
        n = batch.shape[0]
        if not self.needs_items:
            items = None
        elif items is None:
            error = ModelError(kind="invalid_output", message="no candidates given to a re-ranker")
            return BatchScores.failed(n, error, 0.0)
        if not self.breaker.allow():
            error = ModelError(
                kind="unavailable",
                message=f"circuit open after repeated failures; next probe within "
                f"{self.config.breaker.open_s:g} s",
            )
            return BatchScores.failed(n, error, 0.0)
        size = self._max_batch
        if size and n > size:
            parts = await asyncio.gather(
                *(
                    self._score_call(
                        batch[i : i + size],
                        None if items is None else items.rows(i, i + size),
                        patient,
                    )
                    for i in range(0, n, size)
                )
            )
            result = _concat(parts, n)
        else:
            result = await self._score_call(batch, items, patient)
        self.breaker.record(result.error is None)
        return result

    async def _score_call(
        self, batch: FloatArray, items: CandidateItems | None = None, patient: bool = False
    ) -> BatchScores:
        n = batch.shape[0]
        start = time.perf_counter()
        try:
            if patient:
                async with asyncio.timeout(self._timeout_s):
                    await self._slots.acquire()
                start = time.perf_counter()
            async with asyncio.timeout(self._timeout_s):
                if not patient:
                    await self._slots.acquire()
                if isinstance(self._predictor, AsyncPredictor):
                    try:
                        raw = await self._predictor.predict_async(batch)
                    finally:
                        self._slots.release()
                else:
                    loop = asyncio.get_running_loop()
                    future = loop.run_in_executor(self._pool, self._predict, batch, items)
                    future.add_done_callback(lambda _f: self._slots.release())
                    raw = await asyncio.shield(future)
        except TimeoutError:
            elapsed = (time.perf_counter() - start) * 1000.0
            return BatchScores.failed(
                n,
                ModelError(kind="timeout", message=f"no result within {self.config.timeout_ms} ms"),
                elapsed,
            )
        except ModelUnavailable as exc:
            elapsed = (time.perf_counter() - start) * 1000.0
            error = ModelError(kind="unavailable", message=str(exc)[:500])
            return BatchScores.failed(n, error, elapsed)
        except Exception as exc:  # a model may raise anything; it must never crash the loop
            elapsed = (time.perf_counter() - start) * 1000.0
            message = f"{type(exc).__name__}: {exc}"[:500]
            return BatchScores.failed(n, ModelError(kind="exception", message=message), elapsed)
        latency_ms = (time.perf_counter() - start) * 1000.0
        if self.kind != "binary":
            return self._shaped(raw, n, latency_ms, items)
        return self._check_output(raw, n, latency_ms)

    def _predict(self, batch: FloatArray, items: CandidateItems | None = None) -> npt.ArrayLike:
        assert isinstance(self._predictor, Predictor)
        if items is not None:
            return self._predictor.predict(batch, items)  # type: ignore[call-arg]
        return self._predictor.predict(batch)

    def _shaped(
        self, raw: Any, n: int, latency_ms: float, items: CandidateItems | None
    ) -> BatchScores:
        """A multiclass, regression or ranking output, checked and shaped (vectorised)."""
        c = self.config
        try:
            shaped = shape_output(
                self.kind, raw, n, labels=c.labels, bands=c.bands, k=c.k, items=items
            )
        except Exception as exc:  # a model's output may be anything: this batch fails alone
            message = f"output not usable: {type(exc).__name__}: {exc}"[:500]
            error = ModelError(kind="invalid_output", message=message)
            return BatchScores.failed(n, error, latency_ms)
        if shaped.error is not None:
            return BatchScores.failed(n, shaped.error, latency_ms)
        return BatchScores(
            scores=shaped.scores,
            valid=shaped.valid,
            decisions=np.zeros(n, dtype=bool),
            latency_ms=latency_ms,
            record_error=shaped.record_error,
            output=shaped.output,
            fragments=None if shaped.output is None else shaped.output.fragments(shaped.valid),
        )

    def _check_output(self, raw: npt.ArrayLike, n: int, latency_ms: float) -> BatchScores:
        try:
            scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            error = ModelError(kind="invalid_output", message=f"scores are not numeric: {exc}")
            return BatchScores.failed(n, error, latency_ms)
        if scores.shape[0] != n:
            error = ModelError(
                kind="invalid_output",
                message=f"expected {n} scores, got {scores.shape[0]} (shape {np.shape(raw)})",
            )
            return BatchScores.failed(n, error, latency_ms)
        valid = np.isfinite(scores)
        record_error = None
        if not valid.all():
            record_error = ModelError(kind="invalid_output", message="score is NaN or infinite")
        return BatchScores(
            scores=scores,
            valid=valid,
            decisions=valid & (scores >= self.threshold),
            latency_ms=latency_ms,
            record_error=record_error,
        )


def _concat(parts: list[BatchScores], n: int) -> BatchScores:
    """One result from the results of a split batch; any failed call fails the batch."""
    failed = next((p for p in parts if p.error is not None), None)
    latency = max(p.latency_ms for p in parts)
    if failed is not None and failed.error is not None:
        return BatchScores.failed(n, failed.error, latency)
    return BatchScores(
        scores=np.concatenate([p.scores for p in parts]),
        valid=np.concatenate([p.valid for p in parts]),
        decisions=np.concatenate([p.decisions for p in parts]),
        latency_ms=latency,
        record_error=next((p.record_error for p in parts if p.record_error), None),
        output=_concat_outputs([p.output for p in parts]),
        fragments=(
            None
            if any(p.fragments is None for p in parts)
            else [f for p in parts for f in p.fragments or ()]
        ),
    )


def _concat_outputs(outputs: list[KindOutput | None]) -> KindOutput | None:
    if any(o is None for o in outputs):
        return None
    parts = [o for o in outputs if o is not None]
    if parts and parts[0].items is not None:  # ranking: pad every part to the widest k
        k = max(p.items.shape[1] for p in parts if p.items is not None)
        parts = [_pad(p, k) for p in parts]
    return concat(parts)


def _pad(output: KindOutput, k: int) -> KindOutput:
    assert output.items is not None and output.item_scores is not None
    have = output.items.shape[1]
    if have == k:
        return output
    n = output.items.shape[0]
    items = np.full((n, k), "", dtype=object)
    items[:, :have] = output.items
    scores = np.full((n, k), -np.inf)
    scores[:, :have] = output.item_scores
    return KindOutput(output.kind, items=items, item_scores=scores, counts=output.counts)
