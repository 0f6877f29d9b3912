"""The data path for multiclass, regression and ranking models: decisions and comparisons carry
each kind's output, templated bytes equal msgspec's, failures stay where they belong."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from kafka_helpers import make_config
from records import Rec

from sidecar.contracts import Comparison, DeadLetter, Decision
from sidecar.examples import recommend
from sidecar.models import load_model
from sidecar.output_kinds import CandidateItems
from sidecar.pipeline import Pipeline
from sidecar.routing import Mode, RoutingPolicy

ENC = msgspec.json.Encoder()


def models(champion: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    return {"champion": champion, "candidate": candidate}


def recommender(name: str, version: str, target: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "target": target,
        "output_kind": "ranking",
        "k": 10,
        "items_from": "request",
        "features": [{"name": "user"}, {"name": "segment"}],
        **kw,
    }


RECS = models(
    recommender("recs", "1.0.0", "sidecar.examples.recommend:popularity"),
    recommender("recs", "2.0.0", "sidecar.examples.recommend:matrix_factorisation"),
)


def pipeline(model_tree: dict[str, Any], **sections: Any) -> Pipeline:
    cfg = make_config("unused:9092", models=model_tree, **sections)
    assert cfg.models.candidate is not None
    return Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))


def policy(mode: Mode = Mode.CANARY, share: int = 3000) -> RoutingPolicy:
    return RoutingPolicy(rollout="r", mode=mode, canary_share_bp=share, epoch=3)


def rec_records(n: int, seed: int = 5) -> tuple[recommend.Requests, list[Rec]]:
    data = recommend.generate(n, seed=seed)
    docs = recommend.request_dicts(data)
    return data, [Rec(ENC.encode(d), offset=i) for i, d in enumerate(docs)]


def decoded(result: Any) -> tuple[list[Decision], list[Comparison]]:
    ds = [msgspec.json.decode(v, type=Decision) for v in result.decisions.values]
    cs = [msgspec.json.decode(v, type=Comparison) for v in result.comparisons.values]
    return ds, cs


def assert_msgspec_bytes(result: Any) -> None:
    """Templated outputs hold the same fields, in the same order, as msgspec would write."""
    for value, type_ in [(v, Decision) for v in result.decisions.values] + [
        (v, Comparison) for v in result.comparisons.values
    ]:
        struct = msgspec.json.decode(value, type=type_)
        assert list(msgspec.json.decode(value).items()) == list(
            msgspec.json.decode(ENC.encode(struct)).items()
        )


async def test_ranking_decisions_and_comparisons_carry_the_top_k() -> None:
    p = pipeline(RECS)
    data, recs = rec_records(600)
    result = await p.process(recs, policy())
    ds, cs = decoded(result)
    assert len(ds) == len(cs) == 600 and not result.dead_letters.values
    ids = np.asarray(recommend.ITEM_IDS, dtype=object)[data.candidates].tolist()
    items = CandidateItems.of(ids)
    x = np.column_stack([data.users, data.segments]).astype(float)
    champ = recommend.popularity().predict(x, items)
    cand = recommend.matrix_factorisation().predict(x, items)
    arms = {"champion": champ, "candidate": cand}
    for i, (d, c) in enumerate(zip(ds, cs, strict=True)):
        assert d.output_kind == c.champion.output_kind == c.candidate.output_kind == "ranking"
        assert d.decision is None and d.threshold is None and d.score is None
        for arm, result_of in (("champion", c.champion), ("candidate", c.candidate)):
            order = np.argsort(-arms[arm][i], kind="stable")[:10]
            assert result_of.items == [ids[i][j] for j in order]
            assert result_of.item_scores == pytest.approx(arms[arm][i][order].tolist())
        chosen = c.candidate if d.arm == "candidate" else c.champion
        assert d.items == chosen.items and d.item_scores == chosen.item_scores
    assert {d.arm for d in ds} == {"champion", "candidate"}
    assert_msgspec_bytes(result)


async def test_the_two_stage_path_writes_the_same_ranking_outputs() -> None:
    p = pipeline(RECS)
    _, recs = rec_records(300, seed=9)
    whole = await p.process(recs, policy())
    staged = await p.start(recs, policy())
    late = await staged.finish()
    assert late is not None
    parts = staged.early.decisions.values + late.decisions.values

    def strip(values: list[bytes]) -> list[dict[str, Any]]:
        out = []
        for v in values:
            doc = msgspec.json.decode(v)
            doc.pop("decided_at"), doc.pop("latency_ms")
            out.append(doc)
        return sorted(out, key=lambda d: d["request_id"])

    assert strip(parts) == strip(whole.decisions.values)
    assert len(late.comparisons.values) == 300


async def test_a_request_without_candidates_is_a_dead_letter_naming_them() -> None:
    p = pipeline(RECS)
    _, recs = rec_records(3)
    doc = {"request_id": "no-cands", "features": {"user": 1, "segment": 2}}
    bad_id = {**doc, "request_id": "bad", "candidates": ["ok", ""]}
    result = await p.process([*recs, Rec(ENC.encode(doc)), Rec(ENC.encode(bad_id))], policy())
    letters = [msgspec.json.decode(v, type=DeadLetter) for v in result.dead_letters.values]
    assert [(x.kind, x.request_id) for x in letters] == [
        ("feature_missing", "no-cands"),
        ("schema", "bad"),
    ]
    assert "candidates" in letters[0].reason
    assert len(result.decisions.values) == 3


async def test_a_broken_ranking_candidate_never_harms_champion_traffic() -> None:
    tree = models(
        RECS["champion"], recommender("recs", "2.0.1", "kind_models:broken", items_from="request")
    )
    p = pipeline(tree)
    _, recs = rec_records(200)
    result = await p.process(recs, policy(share=5000))
    ds, cs = decoded(result)
    assert len(ds) == 200 and all(d.arm == "champion" for d in ds)
    assert all(len(d.items or []) == 10 for d in ds)
    assert all(c.candidate.error is not None for c in cs)
    assert cs[0].candidate.error is not None and "shape" in cs[0].candidate.error.message
    routed = [d for d in ds if d.routed_arm == "candidate"]
    assert routed and all((d.fallback or "").startswith("candidate_failed") for d in routed)
    assert_msgspec_bytes(result)  # the templated fallbacks carry the champion's ranking too


def scalar_model(name: str, version: str, target: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "version": version, "target": target, "features": [{"name": "x"}], **kw}


def scalar_records(values: list[float], meta: bool = False) -> list[Rec]:
    out = []
    for i, v in enumerate(values):
        doc: dict[str, Any] = {"request_id": f"r{i}", "features": {"x": v}}
        if meta and i % 3 == 0:
            doc["metadata"] = {"i": i}  # takes the full-Struct path
        out.append(Rec(ENC.encode(doc), offset=i))
    return out


async def test_multiclass_decisions_are_labels() -> None:
    labels = ["low", "mid", "high"]
    tree = models(
        scalar_model(
            "risk", "1.0.0", "kind_models:multiclass", output_kind="multiclass", labels=labels
        ),
        scalar_model(
            "risk",
            "1.1.0",
            "kind_models:multiclass",
            output_kind="multiclass",
            labels=labels,
            options={"centres": [1.0, 2.0, 3.0]},
        ),
    )
    p = pipeline(tree)
    xs = np.linspace(0.0, 3.0, 90).tolist()
    result = await p.process(scalar_records(xs, meta=True), policy(share=5000))
    ds, cs = decoded(result)
    assert len(ds) == 90
    for x, d, c in zip(xs, ds, cs, strict=True):
        assert c.champion.label == labels[int(np.argmin(np.abs(x - np.array([0.5, 1.5, 2.5]))))]
        assert c.candidate.label == labels[int(np.argmin(np.abs(x - np.array([1.0, 2.0, 3.0]))))]
        assert c.champion.probabilities is not None and len(c.champion.probabilities) == 3
        assert c.champion.score == pytest.approx(max(c.champion.probabilities))
        chosen = c.candidate if d.arm == "candidate" else c.champion
        assert d.label == chosen.label and d.probabilities == chosen.probabilities
        assert d.decision is None and d.output_kind == "multiclass"
    assert {d.metadata is not None for d in ds} == {True, False}
    assert_msgspec_bytes(result)


async def test_regression_values_and_bands() -> None:
    tree = models(
        scalar_model(
            "amount",
            "1.0.0",
            "kind_models:regression",
            output_kind="regression",
            bands=[50.0, 150.0],
            labels=["small", "medium", "large"],
        ),
        scalar_model(
            "amount",
            "1.1.0",
            "kind_models:regression",
            output_kind="regression",
            bands=[50.0, 150.0],
            labels=["small", "medium", "large"],
            options={"offset": 20.0},
        ),
    )
    p = pipeline(tree)
    xs = [0.1, 0.4, 0.9, 1.4, 2.0]
    result = await p.process(scalar_records(xs), policy(Mode.SHADOW))
    ds, cs = decoded(result)
    assert [c.champion.value for c in cs] == pytest.approx([10, 40, 90, 140, 200])
    assert [c.candidate.value for c in cs] == pytest.approx([30, 60, 110, 160, 220])
    assert [d.label for d in ds] == ["small", "small", "medium", "medium", "large"]
    assert [c.candidate.label for c in cs] == ["small", "medium", "medium", "large", "large"]
    assert all(d.score is None and d.value is not None for d in ds)
    assert_msgspec_bytes(result)


async def test_binary_outputs_carry_no_kind_fields() -> None:
    cfg = make_config("unused:9092")
    assert cfg.models.candidate is not None
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    from sidecar.examples import fraud

    data = fraud.generate(50, seed=1)
    recs = [Rec(ENC.encode(r)) for r in fraud.request_dicts(data)]
    result = await p.process(recs, policy())
    for value in result.decisions.values + result.comparisons.values:
        assert b"output_kind" not in value and b'"decision":null' not in value


async def test_a_ranking_from_the_models_own_catalogue() -> None:
    """``items_from = "model"``: the model returns (item ids, scores); integer ids become
    strings; requests need no candidates."""
    ranker = {
        "output_kind": "ranking",
        "k": 3,
        "features": [{"name": "x"}],
    }
    tree = models(
        {"name": "cat", "version": "1.0.0", "target": "kind_models:catalogue", **ranker},
        {
            "name": "cat",
            "version": "1.1.0",
            "target": "kind_models:catalogue",
            "options": {"integer_ids": True, "m": 12},
            **ranker,
        },
    )
    p = pipeline(tree)
    result = await p.process(scalar_records([0.1, 0.52, 2.0]), policy(Mode.SHADOW))
    ds, cs = decoded(result)
    assert [d.items for d in ds] == [["1", "2", "3"], ["5", "6", "4"], ["20", "19", "21"]]
    assert [c.candidate.items for c in cs] == [["1", "2", "3"], ["5", "6", "4"], ["12", "11", "10"]]
    assert ds[1].item_scores == pytest.approx([-0.2, -0.8, -1.2])
    assert_msgspec_bytes(result)
