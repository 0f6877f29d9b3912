"""Paired figures of rankings, labels and regression values: checked against direct
computations, exact to merge (also through the partials' wire form), and guarded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import pytest
from kafka_helpers import make_config
from records import Rec
from scipy import stats

from sidecar.aggregate.batch import hash_strings
from sidecar.aggregate.config import AggregatorConfig
from sidecar.aggregate.guards import GuardEngine, default_rules
from sidecar.aggregate.ingest import ingest
from sidecar.aggregate.kinds import (
    DistinctSketch,
    HeavyHitters,
    KindColumns,
    KindState,
    kind_arm,
)
from sidecar.aggregate.partials import WindowPartial, aggregate_of, partial_of
from sidecar.aggregate.report import WindowReport, figure_of
from sidecar.aggregate.stats import PairedTable, paired_ratio
from sidecar.aggregate.window import WindowAggregate
from sidecar.examples import recommend
from sidecar.models import load_model
from sidecar.pipeline import Pipeline
from sidecar.routing import Mode, RoutingPolicy

CFG = AggregatorConfig(min_pairs=50)


def rankings(champion: list[list[str]], candidate: list[list[str]]) -> KindColumns:
    n = len(champion)
    none: list[Any] = [None] * n
    return KindColumns(
        kind_arm(none, none, champion, hash_strings),
        kind_arm(none, none, candidate, hash_strings),
    )


def rbo_direct(a: list[str], b: list[str], p: float) -> float:
    k = max(len(a), len(b))
    x = [len(set(a[:d]) & set(b[:d])) for d in range(1, k + 1)]
    total = sum(x[d - 1] / d * p**d for d in range(1, k + 1)) * (1 - p) / p
    return total + x[-1] / k * p**k


def random_lists(rng: np.random.Generator, n: int, k: int, pool: int) -> list[list[str]]:
    return [[f"i{j}" for j in rng.choice(pool, k, replace=False)] for _ in range(n)]


def test_ranking_figures_match_direct_computations() -> None:
    rng = np.random.default_rng(1)
    champ, cand = random_lists(rng, 300, 10, 25), random_lists(rng, 300, 10, 25)
    state = KindState()
    state.add(rankings(champ, cand))
    assert state.ranking is not None
    report = state.ranking.report(z=1.96, min_pairs=1)
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(champ, cand, strict=True)]
    assert report.overlap.value == pytest.approx(np.mean(overlap))
    assert report.overlap.lo < np.mean(overlap) < report.overlap.hi
    rbo = [rbo_direct(a, b, 0.9) for a, b in zip(champ, cand, strict=True)]
    assert report.rbo.value == pytest.approx(np.mean(rbo))
    taus = []
    for a, b in zip(champ, cand, strict=True):
        shared = [x for x in a if x in b]
        if len(shared) >= 2:
            taus.append(stats.kendalltau(range(len(shared)), [b.index(x) for x in shared])[0])
    assert report.kendall_tau.value == pytest.approx(np.mean(taus))
    assert report.kendall_tau.n == len(taus)
    kept = np.mean([a[0] == b[0] for a, b in zip(champ, cand, strict=True)])
    dropped = np.mean([a[0] not in b for a, b in zip(champ, cand, strict=True)])
    assert report.top_item_kept.value == pytest.approx(kept)
    assert report.top_item_dropped.value == pytest.approx(dropped)
    pos = [b.index(a[0]) if a[0] in b else 10 for a, b in zip(champ, cand, strict=True)]
    assert report.top_item_position_change.value == pytest.approx(np.mean(pos))
    distinct_c = len({x for r in champ for x in r})
    assert report.champion_distinct_items.value == distinct_c
    assert report.coverage_ratio.value == pytest.approx(
        len({x for r in cand for x in r}) / distinct_c
    )


def test_identical_and_disjoint_lists() -> None:
    lists = [["a", "b", "c"], ["d", "e", "f"]]
    same = KindState()
    same.add(rankings(lists, lists))
    assert same.ranking is not None
    r = same.ranking.report(z=1.96, min_pairs=1)
    assert (r.overlap.value, r.rbo.value, r.kendall_tau.value) == (1.0, pytest.approx(1.0), 1.0)
    assert r.exposure_psi.value == pytest.approx(0.0) and r.top_exposure_jump.value == 0.0
    other = KindState()
    other.add(rankings(lists, [["x", "y", "z"], ["u", "v", "w"]]))
    assert other.ranking is not None
    d = other.ranking.report(z=1.96, min_pairs=1)
    assert (d.overlap.value, d.rbo.value) == (0.0, 0.0)
    assert d.kendall_tau.status == "insufficient_data" and d.top_item_dropped.value == 1.0


def test_uneven_lists_and_rows_without_a_ranking() -> None:
    champ = [["a", "b", "c", "d"], [], ["a"]]
    cand = [["b", "a"], ["x"], ["a", "q", "r", "s"]]
    state = KindState()
    state.add(rankings(champ, cand))
    assert state.ranking is not None
    r = state.ranking.report(z=1.96, min_pairs=1)
    assert r.pairs == 2  # the empty list pairs with nothing
    assert r.overlap.value == pytest.approx((2 / 4 + 1 / 4) / 2)


def test_heavy_hitters_are_exact_below_capacity_and_bounded_above() -> None:
    rng = np.random.default_rng(3)
    names = [f"item-{j}" for j in rng.zipf(1.3, 20_000) % 5000]
    hashes = hash_strings(names)
    h = HeavyHitters(capacity=64)
    for chunk in range(0, len(names), 1000):
        part = HeavyHitters(capacity=64)
        part.add(hashes[chunk : chunk + 1000], names[chunk : chunk + 1000])
        h.merge(part)
    true = {x: names.count(x) for x in set(names[:2000])}
    top = max(true, key=lambda x: names.count(x))
    got = dict(zip([h.names[k] for k in h.keys.tolist()], h.counts.tolist(), strict=True))
    count = names.count(top)
    assert count - len(names) / 65 <= got[top] <= count
    small = HeavyHitters(capacity=64)
    small.add(hashes[:50], names[:50])
    assert sorted(small.counts.tolist()) == sorted(
        names[:50].count(x) for x in dict.fromkeys(names[:50])
    )


def test_distinct_sketch_estimates_and_merges() -> None:
    hashes = hash_strings([f"x{i}" for i in range(20_000)])
    a, b = DistinctSketch(), DistinctSketch()
    a.add(hashes[:12_000])
    b.add(hashes[8_000:])
    assert a.merge(b).estimate() == pytest.approx(20_000, rel=0.1)
    exact = DistinctSketch()
    exact.add(hashes[:500])
    exact.add(hashes[:300])
    assert exact.estimate() == 500


def test_labels_confusion_agreement_and_rates() -> None:
    rng = np.random.default_rng(5)
    labels = ["low", "mid", "high"]
    champ = rng.choice(labels, 3000, p=[0.6, 0.3, 0.1]).tolist()
    cand = [x if rng.random() < 0.8 else "high" for x in champ]
    none: list[Any] = [None] * 3000
    state = KindState()
    state.add(
        KindColumns(
            kind_arm(champ, none, none, hash_strings), kind_arm(cand, none, none, hash_strings)
        )
    )
    assert state.labels is not None
    r = state.labels.report(z=1.96, min_pairs=1)
    agree = np.mean([a == b for a, b in zip(champ, cand, strict=True)])
    assert r.agreement.value == pytest.approx(agree)
    high = next(x for x in r.rates if x.label == "high")
    both = sum(a == b == "high" for a, b in zip(champ, cand, strict=True))
    table = PairedTable(both, champ.count("high") - both, cand.count("high") - both, 0)
    table = PairedTable(
        table.both_yes,
        table.champion_only,
        table.candidate_only,
        3000 - table.both_yes - table.champion_only - table.candidate_only,
    )
    assert high.ratio == paired_ratio(table, z=1.96, min_count=1)
    assert r.rate_ratio_extreme_label == "high" and (r.rate_ratio_extreme.value or 0) > 2
    assert sum(c.count for c in r.confusion) == 3000
    assert (r.psi.value or 0) > 0.1


def test_regression_differences_quantiles_and_psi() -> None:
    rng = np.random.default_rng(7)
    a = rng.lognormal(4, 1, 5000)
    b = a * rng.normal(1.05, 0.1, 5000)
    none: list[Any] = [None] * 5000
    state = KindState(tolerance_rel=0.1)
    state.add(
        KindColumns(
            kind_arm(none, a.tolist(), none, hash_strings),
            kind_arm(none, b.tolist(), none, hash_strings),
        )
    )
    assert state.regression is not None
    r = state.regression.report(z=1.96, min_pairs=1)
    d = b - a
    assert r.mean_diff.value == pytest.approx(d.mean())
    assert r.mean_diff.lo < d.mean() < r.mean_diff.hi
    assert r.diff_share.value == pytest.approx(np.mean(np.abs(d) > 0.1 * a))
    for p in (10, 50, 90):
        got = getattr(r, f"candidate_p{p}").value
        assert got == pytest.approx(np.quantile(b, p / 100), rel=0.06)
    assert (r.psi.value or 1) < 0.1 and r.ks.value is not None


def test_window_merge_and_partials_round_trip_are_exact() -> None:
    rng = np.random.default_rng(9)
    champ, cand = random_lists(rng, 400, 10, 200), random_lists(rng, 400, 10, 200)
    whole = KindState()
    whole.add(rankings(champ, cand))
    parts = [KindState(), KindState()]
    parts[0].add(rankings(champ[:150], cand[:150]))
    parts[1].add(rankings(champ[150:], cand[150:]))
    wire = [
        msgspec.json.decode(msgspec.json.encode(p.to_wire()), type=type(p.to_wire())) for p in parts
    ]
    merged = KindState().load(wire[0]).merge(KindState().load(wire[1]))
    assert whole.ranking is not None and merged.ranking is not None
    a = whole.ranking.report(z=1.96, min_pairs=1)
    b = merged.ranking.report(z=1.96, min_pairs=1)
    assert same(msgspec.to_builtins(a), msgspec.to_builtins(b))


def same(a: Any, b: Any) -> bool:
    """Equal, floats up to summation order (counts and sketches are exact)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-15)
    return bool(a == b)


# -- from the pipeline's bytes to the guards ------------------------------------------------


@dataclass
class _Record:
    partition: int
    offset: int
    value: bytes | None


ENC = msgspec.json.Encoder()


def recommender(version: str, target: str, **options: Any) -> dict[str, Any]:
    return {
        "name": "recs",
        "version": version,
        "target": target,
        "options": options,
        "output_kind": "ranking",
        "k": 10,
        "items_from": "request",
        "features": [{"name": "user"}, {"name": "segment"}],
    }


async def window_reports(candidate: dict[str, Any], windows: int = 3) -> list[WindowReport]:
    cfg = make_config(
        "unused:9092",
        models={
            "champion": recommender("1.0.0", "sidecar.examples.recommend:popularity"),
            "candidate": candidate,
        },
    )
    assert cfg.models.candidate is not None
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    policy = RoutingPolicy(rollout="recs-v2", mode=Mode.SHADOW, canary_share_bp=0, epoch=1)
    reports = []
    for w in range(windows):
        data = recommend.generate(800, seed=100 + w)
        recs = [
            Rec(ENC.encode({**d, "ts": 60_000 * w + i}), offset=i)
            for i, d in enumerate(recommend.request_dicts(data, start_id=1000 * w))
        ]
        result = await p.process(recs, policy)
        got = ingest([_Record(0, i, v) for i, v in enumerate(result.comparisons.values)])
        assert got.undecodable == 0 and got.batch.kinds is not None
        agg = WindowAggregate(got.batch.keys[0], 60_000 * w, 60_000 * (w + 1), CFG)
        agg.add(got.batch)
        partial = partial_of(agg, 0, 1, 0)
        again = aggregate_of(msgspec.json.decode(ENC.encode(partial), type=WindowPartial), CFG)
        report = again.result()
        assert same(msgspec.to_builtins(report.ranking), msgspec.to_builtins(agg.result().ranking))
        reports.append(report)
    return reports


def guard_actions(reports: list[WindowReport]) -> list[tuple[str, str]]:
    engine = GuardEngine(default_rules())
    return [
        (e.rule.name, e.rule.action)
        for r in reports
        for e in engine.evaluate(r)
        if e.kind == "fired"
    ]


async def test_a_diversity_collapsing_candidate_is_rolled_back() -> None:
    reports = await window_reports(
        recommender(
            "2.0.0", "sidecar.examples.recommend:matrix_factorisation", popularity_boost=8.0
        )
    )
    r = reports[-1].ranking
    assert r is not None and r.pairs == 800
    assert (r.coverage_ratio.value or 1) < 0.5
    fired = guard_actions(reports)
    assert ("catalogue_coverage", "rollback") in fired


async def test_a_better_personal_candidate_passes_the_ranking_guards() -> None:
    reports = await window_reports(
        recommender("2.1.0", "sidecar.examples.recommend:matrix_factorisation")
    )
    r = reports[-1].ranking
    assert r is not None and (r.coverage_ratio.value or 0) > 1.0
    assert 0.3 < (r.overlap.value or 0) < 0.95
    assert [a for a in guard_actions(reports) if a[1] != "alert"] == []
    assert figure_of(reports[-1], "overlap_at_k") == r.overlap
    assert reports[-1].champion.model == "recs" and reports[-1].candidate.version == "2.1.0"
    assert len(r.candidate_top_items) == 5


def test_hostile_comparisons_stay_bounded_and_encodable() -> None:
    """Made-up labels, the longest lists, huge values and an unknown kind: no crash, bounded
    state, a report that encodes."""
    rng = np.random.default_rng(11)
    values = []
    for i in range(400):
        arm: dict[str, Any] = {"model": "m", "version": "1", "output_kind": "ranking"}
        other = dict(arm)
        arm["items"] = [f"{'x' * 240}{j}-{i}" for j in range(1000)]
        other["items"] = [f"{'x' * 240}{j}-{i}" for j in rng.permutation(1000)[:1000]]
        arm["label"], other["label"] = f"made-up-{i}", f"other-{i % 3}"
        arm["value"], other["value"] = 1e308, -1e308
        if i % 7 == 0:
            other["output_kind"] = "embedding"  # a kind this aggregator does not know
        doc = {
            "request_id": f"r{i}",
            "routing_key": None,
            "rollout": "r",
            "ts": 1000 + i,
            "policy_epoch": 1,
            "policy_mode": "shadow",
            "served_by": "champion",
            "champion": arm,
            "candidate": other,
        }
        values.append(msgspec.json.encode(doc))
    got = ingest([_Record(0, i, v) for i, v in enumerate(values)])
    assert got.undecodable == 0 and got.batch.kinds is not None
    assert got.batch.kinds.champion.items.shape[1] == 100  # compared to RANK_DEPTH only
    agg = WindowAggregate(got.batch.keys[0], 0, 60_000, CFG)
    agg.add(got.batch)
    report = agg.result()
    assert report.labels is not None and len(report.labels.rates) <= 64 + 3 + 1
    assert report.ranking is not None and report.ranking.pairs == 400
    assert report.regression is not None
    encoded = msgspec.json.encode(report)
    assert len(encoded) < 200_000
    partial = partial_of(agg, 0, 1, 0)
    again = msgspec.json.decode(msgspec.json.encode(partial), type=WindowPartial)
    assert aggregate_of(again, CFG).result().ranking is not None


def scalar(version: str, target: str, **kw: Any) -> dict[str, Any]:
    return {"name": "risk", "version": version, "target": target, "features": [{"name": "x"}], **kw}


async def kind_reports(champion: dict[str, Any], candidate: dict[str, Any]) -> list[WindowReport]:
    """Two windows of 1,000 requests through the pipeline, the aggregator and a partial."""
    cfg = make_config("unused:9092", models={"champion": champion, "candidate": candidate})
    assert cfg.models.candidate is not None
    p = Pipeline(cfg, load_model(cfg.models.champion), load_model(cfg.models.candidate))
    policy = RoutingPolicy(rollout="risk-v2", mode=Mode.SHADOW, canary_share_bp=0, epoch=1)
    rng = np.random.default_rng(4)
    reports = []
    for w in range(2):
        xs = rng.uniform(0, 3, 1000).tolist()
        recs = [
            Rec(ENC.encode({"request_id": f"r{w}-{i}", "features": {"x": x}, "ts": 60_000 * w}))
            for i, x in enumerate(xs)
        ]
        result = await p.process(recs, policy)
        got = ingest([_Record(0, i, v) for i, v in enumerate(result.comparisons.values)])
        agg = WindowAggregate(got.batch.keys[0], 60_000 * w, 60_000 * (w + 1), CFG)
        agg.add(got.batch)
        wire = msgspec.json.encode(partial_of(agg, 0, 1, 0))
        reports.append(aggregate_of(msgspec.json.decode(wire, type=WindowPartial), CFG).result())
    return reports


LABELS = ["low", "mid", "high"]


async def test_a_multiclass_candidate_that_shifts_a_label_is_rolled_back() -> None:
    champ = scalar("1.0.0", "kind_models:multiclass", output_kind="multiclass", labels=LABELS)
    shifted = scalar(
        "1.1.0",
        "kind_models:multiclass",
        output_kind="multiclass",
        labels=LABELS,
        options={"centres": [0.5, 2.6, 2.9]},
    )
    same = scalar("1.1.1", "kind_models:multiclass", output_kind="multiclass", labels=LABELS)
    bad = await kind_reports(champ, shifted)
    labels = bad[-1].labels
    assert labels is not None and labels.rate_ratio_extreme_label in ("mid", "high")
    assert ("label_rate_ratio", "rollback") in guard_actions(bad)
    good = await kind_reports(champ, same)
    assert good[-1].labels is not None and good[-1].labels.agreement.value == 1.0
    assert [a for a in guard_actions(good) if a[1] != "alert"] == []


async def test_a_regression_candidate_off_by_a_third_is_paused() -> None:
    champ = scalar("1.0.0", "kind_models:regression", output_kind="regression", bands=[50.0, 150.0])
    off = scalar(
        "1.1.0",
        "kind_models:regression",
        output_kind="regression",
        bands=[50.0, 150.0],
        options={"slope": 133.0},
    )
    close = scalar(
        "1.1.1",
        "kind_models:regression",
        output_kind="regression",
        bands=[50.0, 150.0],
        options={"slope": 102.0},
    )
    bad = await kind_reports(champ, off)
    value = bad[-1].regression
    assert value is not None and value.mean_diff.lo is not None and value.mean_diff.lo > 0
    assert ("value_differences", "pause") in guard_actions(bad)
    good = await kind_reports(champ, close)
    assert good[-1].regression is not None and good[-1].regression.diff_share.value == 0.0
    assert [a for a in guard_actions(good) if a[1] != "alert"] == []
