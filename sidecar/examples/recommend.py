"""Recommendations: a seeded world of users and items, and two real re-ranking models.

A request is a user (features ``user`` and ``segment``) with ``candidates``: the item ids an
upstream retrieval stage found for them (100 by default). Both models re-rank those
candidates and return the top ``k`` (``output_kind = "ranking"``, ``items_from =
"request"``). They are fitted, numpy only, on interactions sampled from the same seeded
world, so their quality is real and reproducible without any download:

* the **champion** (:func:`popularity`) orders the candidates by how popular each item is in
  the user's segment (counts of the training interactions);
* the **candidate** (:func:`matrix_factorisation`) orders them by user and item factors fitted
  by alternating least squares on the user-item matrix: it is personal. Its
  ``popularity_boost`` option adds that many times the item's log popularity overall to the
  score; a large boost swamps the factors and every user gets the same few best-sellers --
  the diversity collapse the ranking guards exist to catch.

:func:`click_sets` gives, per request, the candidates the user would click if shown them
(sampled from the world's true preferences): the ground truth of the demo and of the ranking
quality figures (:mod:`sidecar.outcomes.ranking`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..output_kinds import CandidateItems

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FEATURES: tuple[str, ...] = ("user", "segment")
USERS = 2_000
ITEMS = 1_000
SEGMENTS = 8
TRUE_FACTORS = 8
CANDIDATES = 100
K = 10


def item_id(index: int) -> str:
    return f"item-{index:04d}"


ITEM_IDS: tuple[str, ...] = tuple(item_id(j) for j in range(ITEMS))
_ITEM_INDEX = {x: j for j, x in enumerate(ITEM_IDS)}


@dataclass(frozen=True)
class World:
    """Users, items and the true preferences between them (log-odds of a click)."""

    user_segment: IntArray  # (USERS,)
    item_segment: IntArray  # (ITEMS,)
    #: The true affinity, ``(USERS, ITEMS)``: taste (factors), segment match, popularity.
    affinity: FloatArray
    #: Items' overall popularity (log scale), which retrieval also leans on.
    popularity: FloatArray


@functools.lru_cache(maxsize=4)
def world(seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    user_segment = rng.integers(0, SEGMENTS, USERS)
    item_segment = rng.integers(0, SEGMENTS, ITEMS)
    seg_taste = rng.normal(0, 1, (SEGMENTS, TRUE_FACTORS))
    users = seg_taste[user_segment] + rng.normal(0, 0.8, (USERS, TRUE_FACTORS))
    items = rng.normal(0, 1, (ITEMS, TRUE_FACTORS)) / np.sqrt(TRUE_FACTORS) * 2.0
    popularity = -np.log(np.arange(1, ITEMS + 1)) * 0.8  # Zipf-like
    popularity = popularity[rng.permutation(ITEMS)]
    same_segment = user_segment[:, None] == item_segment[None, :]
    affinity = users @ items.T + 1.5 * same_segment + 0.5 * popularity[None, :]
    return World(user_segment, item_segment, affinity, popularity)


def interactions(w: World, n: int, seed: int = 1) -> tuple[IntArray, IntArray]:
    """``n`` (user, item) interactions sampled from the true preferences."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, n)
    items = np.empty(n, dtype=np.int64)
    probs = np.exp(w.affinity - w.affinity.max(axis=1, keepdims=True))
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    for start in range(0, n, 4_096):  # inverse-CDF sampling, a chunk at a time
        u = users[start : start + 4_096]
        r = rng.random(u.size)[:, None]
        items[start : start + 4_096] = np.minimum((cum[u] < r).sum(axis=1), ITEMS - 1)
    return users, items


@dataclass(frozen=True)
class Requests:
    users: IntArray
    segments: IntArray
    #: ``(n, CANDIDATES)`` item indices from the retrieval stage.
    candidates: IntArray


def retrieve(w: World, users: IntArray, m: int, rng: np.random.Generator) -> IntArray:
    """``m`` distinct candidates per user: a retrieval stage that leans on popularity and on
    the user's segment, never on their taste (that is the re-ranker's job)."""
    logits = np.broadcast_to(0.6 * w.popularity, (users.size, ITEMS)) + 1.5 * (
        w.user_segment[users][:, None] == w.item_segment[None, :]
    )
    gumbel = rng.gumbel(size=(users.size, ITEMS))
    return np.argpartition(-(logits + gumbel), m - 1, axis=1)[:, :m].astype(np.int64)


def generate(n: int, seed: int = 0, m: int = CANDIDATES, world_seed: int = 0) -> Requests:
    """``n`` seeded requests (users and their retrieved candidates)."""
    w = world(world_seed)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, n)
    return Requests(users, w.user_segment[users], retrieve(w, users, m, rng))


def request_dicts(data: Requests, start_id: int = 0) -> list[dict[str, Any]]:
    """InferenceRequest v1 objects (ids ``rec-<n>``, routed by user)."""
    users, segments = data.users.tolist(), data.segments.tolist()
    ids = np.asarray(ITEM_IDS, dtype=object)[data.candidates].tolist()
    return [
        {
            "request_id": f"rec-{start_id + i}",
            "routing_key": f"user-{u}",
            "features": {"user": u, "segment": s},
            "candidates": c,
        }
        for i, (u, s, c) in enumerate(zip(users, segments, ids, strict=True))
    ]


def click_sets(data: Requests, seed: int = 0, world_seed: int = 0) -> list[set[str]]:
    """Per request, the candidates its user would click if shown (each independently, with
    the probability the world's true affinity gives): ground truth for both arms alike."""
    w = world(world_seed)
    rng = np.random.default_rng(seed)
    logit = w.affinity[data.users[:, None], data.candidates] - 4.0
    clicked = rng.random(logit.shape) < 1.0 / (1.0 + np.exp(-logit))
    ids = np.asarray(ITEM_IDS, dtype=object)
    return [set(ids[data.candidates[i][clicked[i]]].tolist()) for i in range(len(data.users))]


# --------------------------------------------------------------------------- models


def _indices(items: CandidateItems) -> IntArray:
    """The catalogue index of every candidate slot (-1: padding or unknown to the model)."""
    codes, vocab = items.codes()
    known = np.fromiter((_ITEM_INDEX.get(x, -1) for x in vocab), dtype=np.int64, count=len(vocab))
    return np.where(codes >= 0, known[np.maximum(codes, 0)], -1)


#: Score of a candidate the model does not know: ranked last, still an item.
UNKNOWN = -1e9


class SegmentPopularity:
    """The champion: each candidate's popularity in the user's segment."""

    def __init__(self, counts: FloatArray) -> None:
        self.log_counts = np.log1p(counts)  # (SEGMENTS, ITEMS)

    def predict(self, batch: FloatArray, items: CandidateItems) -> FloatArray:
        segment = np.clip(batch[:, 1], 0, SEGMENTS - 1).astype(np.int64)
        idx = _indices(items)
        scores = self.log_counts[segment[:, None], np.maximum(idx, 0)]
        return np.where(idx >= 0, scores, UNKNOWN)


class MatrixFactorisation:
    """The candidate: ``user factors . item factors (+ boost x log popularity)``."""

    def __init__(self, users: FloatArray, items: FloatArray, log_pop: FloatArray, boost: float):
        self.users, self.items = users, items
        self.bias = boost * log_pop

    def predict(self, batch: FloatArray, items: CandidateItems) -> FloatArray:
        user = np.clip(batch[:, 0], 0, USERS - 1).astype(np.int64)
        idx = _indices(items)
        safe = np.maximum(idx, 0)
        scores = np.einsum("nf,nmf->nm", self.users[user], self.items[safe]) + self.bias[safe]
        return np.where(idx >= 0, scores, UNKNOWN)


@functools.lru_cache(maxsize=4)
def _training(seed: int) -> tuple[IntArray, IntArray]:
    return interactions(world(0), 60_000, seed=seed)


def popularity(seed: int = 1) -> SegmentPopularity:
    users, items = _training(seed)
    counts = np.zeros((SEGMENTS, ITEMS))
    np.add.at(counts, (world(0).user_segment[users], items), 1.0)
    return SegmentPopularity(counts)


@functools.lru_cache(maxsize=4)
def _factors(seed: int, factors: int, reg: float, iterations: int) -> tuple[FloatArray, FloatArray]:
    """Alternating least squares on ``log(1 + counts)`` (numpy only, ~0.2 s)."""
    users, items = _training(seed)
    r = np.zeros((USERS, ITEMS))
    np.add.at(r, (users, items), 1.0)
    r = np.log1p(r)
    rng = np.random.default_rng(seed)
    v: FloatArray = rng.normal(0, 0.1, (ITEMS, factors))
    eye = reg * np.eye(factors)
    u: FloatArray = np.zeros((USERS, factors))
    for _ in range(iterations):
        u = np.asarray(np.linalg.solve(v.T @ v + eye, v.T @ r.T).T, dtype=np.float64)
        v = np.asarray(np.linalg.solve(u.T @ u + eye, u.T @ r).T, dtype=np.float64)
    return u, v


def matrix_factorisation(
    seed: int = 1,
    factors: int = 16,
    reg: float = 5.0,
    iterations: int = 8,
    popularity_boost: float = 0.0,
) -> MatrixFactorisation:
    u, v = _factors(seed, factors, reg, iterations)
    _users, items = _training(seed)
    log_pop = np.log1p(np.bincount(items, minlength=ITEMS).astype(np.float64))
    return MatrixFactorisation(u, v, log_pop, popularity_boost)


__all__ = [
    "CANDIDATES",
    "FEATURES",
    "ITEM_IDS",
    "K",
    "MatrixFactorisation",
    "Requests",
    "SegmentPopularity",
    "World",
    "click_sets",
    "generate",
    "matrix_factorisation",
    "popularity",
    "request_dicts",
    "world",
]
