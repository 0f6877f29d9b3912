"""Small models of each output kind, loadable as ``python`` targets (``kind_models:...``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sidecar.output_kinds import CandidateItems


class Softmax:
    """Multiclass: three classes from one feature (``x`` < 1 low, < 2 mid, else high)."""

    def __init__(self, centres: tuple[float, ...] = (0.5, 1.5, 2.5), scale: float = 4.0) -> None:
        self.centres = np.asarray(centres)
        self.scale = scale

    def predict(self, batch: np.ndarray) -> np.ndarray:
        logits = -self.scale * (batch[:, :1] - self.centres[None, :]) ** 2
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def multiclass(**options: Any) -> Softmax:
    return Softmax(**options)


class Linear:
    """Regression: ``slope * x + offset``."""

    def __init__(self, slope: float = 100.0, offset: float = 0.0) -> None:
        self.slope, self.offset = slope, offset

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.slope * batch[:, 0] + self.offset


def regression(**options: Any) -> Linear:
    return Linear(**options)


class Catalogue:
    """Ranking from its own catalogue: items ``1..m`` scored by distance to ``x``."""

    def __init__(self, m: int = 30, integer_ids: bool = False) -> None:
        self.m, self.integer_ids = m, integer_ids

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = batch.shape[0]
        ids = np.broadcast_to(np.arange(1, self.m + 1), (n, self.m))
        scores = -np.abs(ids - batch[:, :1] * 10)
        return (ids if self.integer_ids else ids.astype(str)), scores


def catalogue(**options: Any) -> Catalogue:
    return Catalogue(**options)


class Lengths:
    """A re-ranker that prefers long item ids (ties: the request's order)."""

    def predict(self, batch: np.ndarray, items: CandidateItems) -> np.ndarray:
        lengths = np.vectorize(len, otypes=[float])(items.ids)
        return np.where(items.mask, lengths, -np.inf)


def lengths() -> Lengths:
    return Lengths()


class Broken:
    """A ranking model whose output has the wrong shape."""

    def predict(self, batch: np.ndarray, items: CandidateItems | None = None) -> np.ndarray:
        return np.zeros(batch.shape[0] + 1)


def broken() -> Broken:
    return Broken()
