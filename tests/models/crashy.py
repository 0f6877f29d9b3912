"""Drill models for the ``process`` loader (imported inside worker processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from sidecar.examples.fraud import candidate


class CrashOnce:
    """Kills its worker process on the first call anywhere (a marker file remembers it)."""

    def __init__(self, marker: str, always: bool = False) -> None:
        self._marker, self._always = Path(marker), always
        self._inner = candidate()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self._always or not self._marker.exists():
            self._marker.touch()
            os._exit(9)
        return self._inner.predict(batch)


class Hang:
    """Hangs on batches whose first value is negative (a poison record)."""

    def __init__(self) -> None:
        self._inner = candidate()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch[0, 0] < 0:
            time.sleep(60)
        return self._inner.predict(batch)


class PurePythonForest:
    """A GIL-holding model: a pure-Python loop over rows (what the process loader is for)."""

    def __init__(self, trees: int = 20) -> None:
        self._trees = trees
        self._inner = candidate()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        rows = batch.tolist()
        acc = [0.0] * len(rows)
        for t in range(self._trees):
            for i, row in enumerate(rows):
                acc[i] += (row[t % len(row)] > 1.0) * 0.0
        return self._inner.predict(batch) + np.asarray(acc)


def crash_once(marker: str, always: bool = False) -> CrashOnce:
    return CrashOnce(marker, always)


def hang() -> Hang:
    return Hang()


def forest(trees: int = 20) -> PurePythonForest:
    return PurePythonForest(trees)
