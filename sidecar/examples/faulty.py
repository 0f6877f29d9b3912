"""Models that misbehave on purpose, wrapped around a real one: for failure drills and tests.

Each factory takes the wrapped model's target (default: the fraud candidate) so the scores that
do come back are real.
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def _inner(target: str, options: dict[str, Any] | None) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(**(options or {}))


class Raising:
    """Raises on every ``every``-th batch (every batch by default)."""

    def __init__(self, inner: Any, every: int = 1) -> None:
        self._inner, self._every, self._calls = inner, every, 0
        self._lock = threading.Lock()

    def predict(self, batch: FloatArray) -> FloatArray:
        with self._lock:
            self._calls += 1
            calls = self._calls
        if calls % self._every == 0:
            raise RuntimeError("model exploded (drill)")
        return np.asarray(self._inner.predict(batch), dtype=np.float64)


class Slow:
    """Adds ``delay_s`` to every call: a latency regression, or a hang when larger than the
    model's timeout."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner, self._delay = inner, delay_s

    def predict(self, batch: FloatArray) -> FloatArray:
        time.sleep(self._delay)
        return np.asarray(self._inner.predict(batch), dtype=np.float64)


class NaNs:
    """Returns NaN for a ``fraction`` of the records (deterministically by row position)."""

    def __init__(self, inner: Any, fraction: float) -> None:
        self._inner, self._fraction = inner, fraction

    def predict(self, batch: FloatArray) -> FloatArray:
        scores = np.asarray(self._inner.predict(batch), dtype=np.float64).copy()
        n = len(scores)
        scores[: round(n * self._fraction)] = np.nan
        return scores


class WrongLength:
    """Returns one score too few: garbage the sidecar must refuse."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def predict(self, batch: FloatArray) -> FloatArray:
        return np.asarray(self._inner.predict(batch), dtype=np.float64)[:-1]


class Busy:
    """Spends ``us_per_record`` of CPU per record, holding the GIL (as a pure-Python tree
    ensemble would): a model whose cost, not the sidecar's, bounds a process, for capacity
    drills such as ``bench/bench_workers.py``."""

    def __init__(self, inner: Any, us_per_record: float) -> None:
        self._inner, self._cost_s = inner, us_per_record / 1e6

    def predict(self, batch: FloatArray) -> FloatArray:
        until = time.thread_time() + self._cost_s * len(batch)
        while time.thread_time() < until:  # CPU time: a busy machine does not shorten it
            pass
        return np.asarray(self._inner.predict(batch), dtype=np.float64)


_DEFAULT = "sidecar.examples.fraud:candidate"


def raising(
    target: str = _DEFAULT, every: int = 1, options: dict[str, Any] | None = None
) -> Raising:
    return Raising(_inner(target, options), every)


def slow(
    delay_s: float = 1.0, target: str = _DEFAULT, options: dict[str, Any] | None = None
) -> Slow:
    return Slow(_inner(target, options), delay_s)


def nans(
    fraction: float = 1.0, target: str = _DEFAULT, options: dict[str, Any] | None = None
) -> NaNs:
    return NaNs(_inner(target, options), fraction)


def wrong_length(target: str = _DEFAULT, options: dict[str, Any] | None = None) -> WrongLength:
    return WrongLength(_inner(target, options))


def busy(
    us_per_record: float = 20.0, target: str = _DEFAULT, options: dict[str, Any] | None = None
) -> Busy:
    return Busy(_inner(target, options), us_per_record)
