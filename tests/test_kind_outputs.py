"""Shaping each output kind, vectorised: top-k, ties, padding, bad outputs, JSON fragments."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.contracts import ModelResult
from sidecar.output_kinds import CandidateItems, band_names, shape_output


def brute_top_k(ids: list[str], scores: list[float], k: int) -> list[str]:
    order = sorted(range(len(ids)), key=lambda j: (-scores[j], j))
    return [ids[j] for j in order[:k] if scores[j] != -np.inf]


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 12),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
)
def test_ranking_top_k_is_the_sorted_prefix_with_ties_in_model_order(
    n: int, m: int, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (n, m)).astype(float)  # many ties
    scores[rng.random((n, m)) < 0.2] = -np.inf  # some "no item" slots
    ids = np.array([[f"i{r}-{j}" for j in range(m)] for r in range(n)], dtype=object)
    shaped = shape_output("ranking", (ids, scores), n, k=k)
    out = shaped.output
    assert out is not None and out.items is not None and out.counts is not None
    assert shaped.valid.all()
    for r in range(n):
        expect = brute_top_k(ids[r].tolist(), scores[r].tolist(), k)
        c = int(out.counts[r])
        assert out.items[r, :c].tolist() == expect
        assert out.item_scores is not None
        assert list(out.item_scores[r, :c]) == sorted(out.item_scores[r, :c], reverse=True)


def test_reranker_scores_are_aligned_with_the_request_candidates() -> None:
    items = CandidateItems.of([["a", "b", "c", "d"], ["x", "y"]])
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.3, 0.8, 99.0, 99.0]])  # row 2: padding slots
    shaped = shape_output("ranking", scores, 2, k=3, items=items)
    out = shaped.output
    assert out is not None and out.items is not None and out.counts is not None
    assert out.items[0].tolist() == ["b", "d", "c"] and out.counts.tolist() == [3, 2]
    assert out.items[1, :2].tolist() == ["y", "x"]  # the 99s were padding, never items
    fields = out.fields(1)
    assert fields == {"output_kind": "ranking", "items": ["y", "x"], "item_scores": [0.8, 0.3]}


def test_integer_item_ids_become_strings() -> None:
    ids = np.array([[3, 1, 2]])
    shaped = shape_output("ranking", (ids, np.array([[0.1, 0.3, 0.2]])), 1, k=2)
    assert shaped.output is not None and shaped.output.items is not None
    assert shaped.output.items[0].tolist() == ["1", "2"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (np.zeros(3), "returns (item ids, scores)"),
        ((np.zeros((3, 2)), np.zeros((2, 2))), "one shape"),
        ((np.array([["a", ""]] * 3, dtype=object), np.zeros((3, 2))), "non-empty strings"),
        ((np.array([[{"x": 1}]] * 3, dtype=object), np.zeros((3, 1))), "non-empty strings"),
        ((np.array([["x" * 300]] * 3, dtype=object), np.zeros((3, 1))), "at most 256"),
    ],
)
def test_bad_rankings_fail_the_batch(raw: object, words: str) -> None:
    shaped = shape_output("ranking", raw, 3, k=2)
    assert shaped.error is not None and words in shaped.error.message
    assert not shaped.valid.any()


def test_a_nan_or_infinite_item_score_invalidates_its_row_only() -> None:
    ids = np.array([["a", "b"], ["c", "d"], ["e", "f"]], dtype=object)
    scores = np.array([[0.1, np.nan], [0.2, 0.1], [np.inf, 0.0]])
    shaped = shape_output("ranking", (ids, scores), 3, k=2)
    assert shaped.valid.tolist() == [False, True, False] and shaped.record_error is not None


def test_multiclass_picks_the_arg_max_label() -> None:
    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25], [np.nan, 0.5, 0.5]])
    shaped = shape_output("multiclass", probs, 3, labels=["a", "b", "c"])
    out = shaped.output
    assert out is not None and out.label_index is not None
    assert out.label_index.tolist() == [1, 0, -1] and shaped.valid.tolist() == [True, True, False]
    assert shaped.scores[:2].tolist() == [0.7, 0.5]
    wrong = shape_output("multiclass", probs[:, :2], 3, labels=["a", "b", "c"])
    assert wrong.error is not None and "(3, 3)" in wrong.error.message


def test_regression_bands_and_their_default_names() -> None:
    shaped = shape_output("regression", [5.0, 10.0, 150.0, np.inf], 4, bands=[10.0, 100.0])
    out = shaped.output
    assert out is not None and out.label_index is not None and out.labels is not None
    assert out.label_index.tolist() == [0, 1, 2, -1]
    assert out.labels == band_names([10.0, 100.0]) == ("<10", "10..100", ">=100")
    assert shaped.valid.tolist() == [True, True, True, False]


@pytest.mark.parametrize("kind", ["multiclass", "regression", "ranking"])
def test_fragments_are_what_msgspec_encodes(kind: str) -> None:
    """Appended to an encoded ModelResult, a fragment gives the Struct with those fields."""
    if kind == "multiclass":
        shaped = shape_output(kind, [[0.25, 0.75], [1.0, 0.0]], 2, labels=["no", 'sa"y'])
    elif kind == "regression":
        shaped = shape_output(kind, [1.5, -2e-7], 2, bands=[0.0], labels=["neg", "pos"])
    else:
        ids = np.array([["p\\1", "q"], ["r", "s"]], dtype=object)
        shaped = shape_output(kind, (ids, np.array([[0.5, 0.25], [0.1, 0.2]])), 2, k=2)
    out = shaped.output
    assert out is not None
    base = msgspec.json.encode(ModelResult(model="m", version="1.0.0")).decode()
    for i, fragment in enumerate(out.fragments(shaped.valid)):
        text = base[:-1] + fragment + "}"
        decoded = msgspec.json.decode(text, type=ModelResult)
        assert decoded == ModelResult(model="m", version="1.0.0", **out.fields(i))
