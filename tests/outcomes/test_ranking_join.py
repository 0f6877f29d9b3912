"""Ranking rollouts in the join: both arms' item lists meet the items acted on (in either
order), each request counts once whatever is repeated, a later outcome replaces the set it
judged, and the figures are ``sidecar.outcomes.ranking``'s functions on exactly the requests
that should count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from records import Rec
from test_join import NOW, Feed, W, comparison, outcome

from sidecar.contracts import MAX_CANDIDATES, Comparison, ModelResult
from sidecar.outcomes.chunks import ExpireMark, decode
from sidecar.outcomes.contract import decode_outcome
from sidecar.outcomes.decode import ChunkBuilder, Skipped
from sidecar.outcomes.gates import quality_gate
from sidecar.outcomes.ranking import (
    PairedRankingQuality,
    ctr_at_k,
    hits,
    ndcg_at_k,
    reciprocal_rank,
)
from sidecar.outcomes.report import QUALITY_FIGURES, QualityRequirement

K = 5


def ranked(
    rid: str, ts: int, champion: list[str], candidate: list[str], rollout: str = "ro"
) -> bytes:
    def arm(version: str, items: list[str]) -> ModelResult:
        return ModelResult(
            model="rec",
            version=version,
            output_kind="ranking",
            items=items,
            item_scores=[1.0 / (i + 1) for i in range(len(items))],
        )

    return msgspec.json.encode(
        Comparison(
            request_id=rid,
            routing_key=None,
            rollout=rollout,
            ts=ts,
            policy_epoch=0,
            policy_mode="shadow",
            served_by="champion",
            champion=arm("1.0.0", champion),
            candidate=arm("2.0.0", candidate),
        )
    )


def pick(rng: np.random.Generator, pool: list[str], size: Any) -> list[str]:
    return [str(x) for x in rng.choice(pool, size=int(size), replace=False)]


def ranking_feed(path: Path, **quality: Any) -> Feed:
    return Feed(path, ranking_k=K, **quality)


def report(feed: Feed, ws: int = 0) -> Any:
    return feed.task.report(feed.pair, ws, "provisional", 0)


def direct(champion: list[list[str]], candidate: list[list[str]], clicked: list[set[str]]) -> Any:
    """The figures straight from ranking.py's per-request functions."""
    n_clicked = np.array([len(c) for c in clicked])
    out = {}
    for arm, lists in (("champion", champion), ("candidate", candidate)):
        h = hits(lists, clicked, K)
        ndcg = ndcg_at_k(h, n_clicked)
        out[arm] = (ctr_at_k(h).mean(), np.nanmean(ndcg), reciprocal_rank(h).mean())
    return out


def assert_figures(got: Any, want: Any, n: int, no_clicks: int) -> None:
    assert got is not None and got.k == K
    assert (got.requests, got.no_clicks) == (n, no_clicks)
    for arm in ("champion", "candidate"):
        ctr, ndcg, mrr = want[arm]
        assert getattr(got, f"ctr_{arm}").value == pytest.approx(ctr, abs=1e-12)
        assert getattr(got, f"ndcg_{arm}").value == pytest.approx(ndcg, abs=1e-12)
        assert getattr(got, f"mrr_{arm}").value == pytest.approx(mrr, abs=1e-12)
    assert got.ndcg_diff.value == pytest.approx(
        want["candidate"][1] - want["champion"][1], abs=1e-12
    )


def test_figures_are_the_ranking_functions_over_exactly_the_joined_requests(tmp_path: Path) -> None:
    """Outcomes before and after their comparisons, repeated ones, late ones, requests with
    none (nothing clicked under ``missing = "negative"``), redelivered comparisons."""
    feed = ranking_feed(tmp_path / "t", missing="negative")
    rng = np.random.default_rng(3)
    n = 400
    pool = [f"sku-{i}" for i in range(25)]
    champion = [pick(rng, pool, 8) for _ in range(n)]
    candidate = [pick(rng, pool, rng.integers(2, 9)) for _ in range(n)]
    truth = [set(pick(rng, pool, rng.integers(1, 4))) for _ in range(n)]
    when = rng.choice(["before", "after", "late", "none"], size=n, p=[0.2, 0.6, 0.1, 0.1])
    labels = [sorted(t) + sorted(t)[:1] for t in truth]  # a repeated item counts once
    feed.outcomes(
        *(outcome(f"r{i}", labels[i], 1000 + i + 50) for i in range(n) if when[i] == "before")
    )
    comps = [ranked(f"r{i}", 1000 + i, champion[i], candidate[i]) for i in range(n)]
    feed.comparisons(*comps[:200], *comps[:5])
    feed.comparisons(*comps[200:])
    after = [outcome(f"r{i}", labels[i], 1000 + i + 3000) for i in range(n) if when[i] == "after"]
    late = [outcome(f"r{i}", ["sku-0"], 1000 + i + 5001) for i in range(n) if when[i] == "late"]
    feed.outcomes(*after, *late, *after[:40])  # some outcomes twice
    clicked = [truth[i] if when[i] in ("before", "after") else set() for i in range(n)]
    got = report(feed)
    assert_figures(
        got.ranking,
        direct(champion, candidate, clicked),
        n,
        int((when == "late").sum() + (when == "none").sum()),
    )
    c = got.counts
    labelled = int(np.isin(when, ["before", "after"]).sum())
    assert (c.requests, c.labelled, c.unsupported_labels, c.records) == (n, labelled, 0, 0)
    assert c.assumed_negative == n - labelled and c.outside_window == len(late)
    assert got.champion.auc.status == "insufficient_data"  # no binary figures


def test_without_the_negative_rule_only_requests_with_an_outcome_are_judged(tmp_path: Path) -> None:
    feed = ranking_feed(tmp_path / "t")  # missing = "unlabelled"
    feed.comparisons(ranked("a", 1000, ["x", "y"], ["y", "x"]), ranked("b", 1000, ["x"], ["y"]))
    assert report(feed).ranking is None  # nothing judged yet
    feed.outcomes(outcome("a", ["y"], 1500))
    got = report(feed)
    assert_figures(got.ranking, direct([["x", "y"]], [["y", "x"]], [{"y"}]), 1, 0)
    assert (got.counts.labelled, got.counts.unlabelled) == (1, 1)


@pytest.mark.parametrize(("rule", "final"), [("last", {"z"}), ("max", {"x", "y", "z"})])
def test_a_later_outcome_replaces_the_set_and_repeats_count_once(
    tmp_path: Path, rule: str, final: set[str]
) -> None:
    """``last``: the latest set; ``max``: the union. In any order, any number of times."""
    champion, candidate = ["x", "y", "z", "w"], ["z", "w", "y", "x"]
    orders = [
        [("x", 2000), ("y", 2500), ("z", 3000)],
        [("z", 3000), ("x", 2000), ("z", 3000), ("y", 2500), ("x", 2000)],
    ]
    for n, order in enumerate(orders):
        feed = ranking_feed(tmp_path / f"{rule}{n}", combine=rule)
        if n:  # the outcomes first, held until the comparison comes
            feed.outcomes(*(outcome("a", [item], at) for item, at in order[:2]))
        feed.comparisons(ranked("a", 1000, champion, candidate))
        for item, at in order[2 if n else 0 :]:
            feed.outcomes(outcome("a", [item], at))
        stats = feed.outcomes(*(outcome("a", [item], at) for item, at in order))  # a replay
        assert stats.joined == {} and stats.updated == 0
        got = report(feed)
        assert_figures(got.ranking, direct([champion], [candidate], [final]), 1, 0)
        assert got.counts.labelled == 1
        # What the store holds is the same set, judged once.
        want = PairedRankingQuality(K)
        want.add([champion], [candidate], [final])
        acc = feed.task.ranking_window(feed.pair.id, 0)
        assert acc is not None
        np.testing.assert_allclose(acc.state, want.state, atol=1e-12)


def test_an_outcome_first_is_held_with_its_items_and_expires(tmp_path: Path) -> None:
    feed = ranking_feed(tmp_path / "t")
    stats = feed.outcomes(
        outcome("a", ["y"], 1500), outcome("a", True, 1400), outcome("b", ["q"], 1600)
    )
    assert stats.orphaned == 2
    assert (feed.task.meta.orphans, feed.task.meta.ranking_orphans) == (2, 2)
    stats = feed.comparisons(ranked("a", 1000, ["x", "y"], ["y"]))
    assert stats.joined == {"ro": 1}
    got = report(feed)
    assert_figures(got.ranking, direct([["x", "y"]], [["y"]], [{"y"}]), 1, 0)  # the set beats True
    feed.write(ExpireMark(before_ms=1601, stream_ms=50_000))
    assert (feed.task.meta.orphans, feed.task.meta.ranking_orphans) == (0, 0)
    assert feed.task.meta.orphans_expired == 2
    assert not list(feed.task.store.scan(b"o")) and not list(feed.task.store.scan(b"q"))


def test_labels_of_the_other_kind_are_counted_not_judged(tmp_path: Path) -> None:
    feed = ranking_feed(tmp_path / "t", missing="negative")
    feed.comparisons(ranked("a", 1000, ["x"], ["y"]), comparison("b", 1000))
    feed.outcomes(outcome("a", True, 1500), outcome("b", ["x"], 1500))
    for pair in feed.task.pairs.values():
        c = feed.task.report(pair, 0, "provisional", 0).counts
        assert (c.requests, c.labelled, c.unsupported_labels) == (1, 0, 1)
    ranking_pair = next(p for p in feed.task.pairs.values() if p.ranking)
    got = feed.task.report(ranking_pair, 0, "provisional", 0).ranking
    assert got is not None and got.requests == 0  # its numeric outcome took it out


def test_a_final_window_drops_the_lists_and_joins_the_verdict(tmp_path: Path) -> None:
    feed = ranking_feed(
        tmp_path / "t",
        missing="negative",
        non_inferiority={"metric": "ndcg", "margin": 0.05, "min_pairs": 20},
    )
    rng = np.random.default_rng(8)
    pool = [f"i{j}" for j in range(12)]
    lists = [pick(rng, pool, 6) for _ in range(60)]
    truth = [set(pick(rng, pool, 2)) for _ in range(60)]
    feed.comparisons(*(ranked(f"r{i}", 1000 + i, lists[i], lists[i]) for i in range(60)))
    feed.comparisons(ranked("next", W + 5, ["i1"], ["i2"]))
    feed.outcomes(*(outcome(f"r{i}", sorted(truth[i]), 2000) for i in range(60)))
    pair = feed.pair
    assert sum(1 for _ in feed.task.store.scan(b"l")) == 61
    feed.finalize(0)
    assert sum(1 for _ in feed.task.store.scan(b"l")) == 1  # only the next window's
    assert feed.task.ranking_window(pair.id, 0) is None
    verdict = feed.task.verdict(feed.task.pairs[pair.id], 0)
    assert verdict is not None and verdict.judged_pairs == 60
    est = verdict.metrics["ndcg"]
    assert est.diff == pytest.approx(0.0, abs=1e-12) and est.se == pytest.approx(0.0, abs=1e-12)
    assert verdict.gate.ok and verdict.gate.code == "met"  # identical lists: no worse
    worse = quality_gate(verdict, QualityRequirement(metric="ctr", margin=0.0, min_pairs=61))
    assert worse.code == "too_few_pairs"
    assert "auc" in verdict.metrics and verdict.metrics["auc"].diff is None


def test_ranking_figures_for_guards_and_binary_reports(tmp_path: Path) -> None:
    feed = ranking_feed(tmp_path / "t")
    feed.comparisons(ranked("a", 1000, ["x", "y"], ["y", "x"]))
    feed.outcomes(outcome("a", ["y"], 1500))
    got = report(feed)
    assert QUALITY_FIGURES["ndcg_diff"](got) == got.ranking.ndcg_diff
    assert QUALITY_FIGURES["candidate_mrr"](got).value == 1.0
    assert QUALITY_FIGURES["champion_ctr"](got).value == pytest.approx(1 / K)
    binary = Feed(tmp_path / "b")
    binary.comparisons(comparison("a", 1000))
    binary.outcomes(outcome("a", True, 1500))
    plain = binary.task.report(binary.pair, 0, "provisional", 0)
    assert plain.ranking is None
    assert QUALITY_FIGURES["ndcg_diff"](plain).status == "insufficient_data"
    binary.finalize(0)
    verdict = binary.task.verdict(binary.task.pairs[binary.pair.id], 0)
    assert verdict is not None and "ndcg" not in verdict.metrics
    gate = quality_gate(verdict, QualityRequirement(metric="ndcg", min_pairs=1))
    assert gate.code == "insufficient_data"


def test_the_changelog_rebuilds_the_same_ranking_store(tmp_path: Path) -> None:
    feed = ranking_feed(tmp_path / "live", missing="negative", combine="max")
    rng = np.random.default_rng(21)
    pool = [f"p{j}" for j in range(15)]
    for part in range(3):
        ids = [f"r{part}-{i}" for i in range(40)]
        feed.outcomes(*(outcome(r, [str(rng.choice(pool))], 3000) for r in ids[:8]))  # early
        feed.comparisons(
            *(
                ranked(
                    r,
                    1000 + i,
                    pick(rng, pool, 5),
                    pick(rng, pool, 4),
                )
                for i, r in enumerate(ids)
            )
        )
        feed.outcomes(*(outcome(r, [str(rng.choice(pool))], 4000) for r in ids[4:30]))
        feed.outcomes(*(outcome(r, [str(rng.choice(pool))], 4500) for r in ids[20:35]))  # more
        if part == 1:
            feed.reopen()  # a crash: the store stays
    feed.comparisons(*(ranked(f"n{i}", W + i, ["p1"], ["p2"]) for i in range(3)))
    feed.finalize(0)
    feed.outcomes(outcome("n1", ["p2"], W + 100), outcome("n1", ["p2"], W + 100))
    feed.write(ExpireMark(before_ms=3500, stream_ms=60_000))
    live = feed.task
    for where in ("fresh", "half"):
        other = feed.open(tmp_path / where)
        start = 0
        if where == "half":
            for offset, raw in enumerate(feed.log[:5]):
                other.apply(decode(raw), offset)
            other.store.close()
            other = feed.open(tmp_path / where)
            start = 3
        for offset, raw in enumerate(feed.log[start:], start=start):
            other.apply(decode(raw), offset)
        assert other.meta == live.meta and other.pairs == live.pairs
        assert dict(other.store.scan(b"")) == dict(live.store.scan(b""))
        other.store.close()
    (pid,) = live.pairs
    total = live.ranking_total(pid)
    assert total is not None and total.report().requests == 120
    assert live.ranking_window(pid, W) is not None


def test_hostile_ranking_records_are_bounded_or_refused(tmp_path: Path) -> None:
    # Labels: too many items, ids that are not strings, an id too long: dead-lettered.
    for label in (["i"] * 1001, [1, 2], [None], ["x" * 257], [["nested"]]):
        got = decode_outcome(msgspec.json.encode({"request_id": "a", "label": label, "ts": 1}))
        assert isinstance(got, tuple) and got[0] == "schema", label
    feed = ranking_feed(tmp_path / "t")
    builder = ChunkBuilder(feed.settings, min_event_ms=0)
    # A model list far longer than k, repeating items: the first k distinct are kept.
    long = ["dup"] * 50 + [f"i{j}" for j in range(5000)]
    doc = ranked("a", 1000, long, ["i3", "i3", "i1"])
    ((chunk, _),) = builder.build(0, [Rec(doc)], [], NOW, Skipped())
    assert chunk.comparisons.ranking is not None
    assert chunk.comparisons.ranking.first == [["dup", "i0", "i1", "i2", "i3"]]
    assert chunk.comparisons.ranking.second == [["i3", "i1"]]
    # More items than any request may carry: no lists read, so never judged (unscored).
    huge = ranked("b", 1000, ["i"] * (MAX_CANDIDATES + 1), ["i"])
    ((chunk, _),) = builder.build(0, [Rec(huge)], [], NOW, Skipped())
    assert chunk.comparisons.ids == ["b"] and chunk.comparisons.ranking is None
    # One arm without a list (it failed): unscored, never judged.
    half = msgspec.json.decode(ranked("c", 1000, ["x"], ["y"]))
    del half["candidate"]["items"]
    feed.comparisons(msgspec.json.encode(half), doc, huge)
    labels = [Rec(outcome("a", ["i3", "i3", "dup"], 1200))]  # duplicates: a set
    ((chunk, _),) = builder.build(0, [], labels, NOW, Skipped())
    assert chunk.outcomes.items is not None and chunk.outcomes.items.first == [["dup", "i3"]]
    feed.outcomes(outcome("a", ["i3", "i3", "dup"], 1200))
    got = report(feed)
    assert (got.counts.unscored, got.counts.requests) == (2, 1)
    assert_figures(
        got.ranking,
        direct([["dup", "i0", "i1", "i2", "i3"]], [["i3", "i1"]], [{"i3", "dup"}]),
        1,
        0,
    )
