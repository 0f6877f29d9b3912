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
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..config import ModelConfig
from ..contracts import ModelError

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

    @classmethod
    def failed(cls, n: int, error: ModelError, latency_ms: float) -> BatchScores:
        return cls(
            scores=np.full(n, np.nan),
            valid=np.zeros(n, dtype=bool),
            decisions=np.zeros(n, dtype=bool),
            latency_ms=latency_ms,
            error=error,
        )


class ScoringModel:
    """A declared model plus the predictor its loader produced.

    Scoring runs in a dedicated thread pool of ``concurrency`` threads. A call that does not
    finish within ``timeout_ms`` is reported as a timeout; the thread cannot be killed, so it
    keeps its concurrency slot until it returns, and later batches that cannot get a slot in
    time time out too instead of queueing without bound.
    """

    def __init__(self, config: ModelConfig, predictor: Predictor) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.threshold = float(config.threshold)
        self.feature_names = [f.name for f in config.features]
        self._predictor = predictor
        self._timeout_s = config.timeout_ms / 1000.0
        self._slots = asyncio.Semaphore(config.concurrency)
        self._pool = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix=f"model-{config.name}"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def score(self, batch: FloatArray) -> BatchScores:
        n = batch.shape[0]
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
                future = loop.run_in_executor(self._pool, self._predict, batch)
                future.add_done_callback(lambda _f: self._slots.release())
                raw = await asyncio.shield(future)
        except TimeoutError:
            elapsed = (time.perf_counter() - start) * 1000.0
            return BatchScores.failed(
                n,
                ModelError(kind="timeout", message=f"no result within {self.config.timeout_ms} ms"),
                elapsed,
            )
        except Exception as exc:  # a model may raise anything; it must never crash the loop
            elapsed = (time.perf_counter() - start) * 1000.0
            message = f"{type(exc).__name__}: {exc}"[:500]
            return BatchScores.failed(n, ModelError(kind="exception", message=message), elapsed)
        latency_ms = (time.perf_counter() - start) * 1000.0
        return self._check_output(raw, n, latency_ms)

    def _predict(self, batch: FloatArray) -> npt.ArrayLike:
        return self._predictor.predict(batch)

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
