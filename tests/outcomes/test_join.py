"""The join over a real RocksDB store: every request counted once whatever is repeated, the
combine and missing rules, final windows, and a store rebuilt from its changelog equal to the
one that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest
from records import Rec
from sklearn import metrics

from sidecar.contracts import Comparison, ModelResult
from sidecar.outcomes import join
from sidecar.outcomes.chunks import ChangelogRecord, ExpireMark, FinalMark, decode, encode
from sidecar.outcomes.contract import Outcome
from sidecar.outcomes.decode import ChunkBuilder, Skipped
from sidecar.outcomes.join import ApplyStats, JoinTask, PairRecord, Windows, stream_bound
from sidecar.outcomes.quality import score_bins
from sidecar.outcomes.report import PairKey
from sidecar.outcomes.settings import OutcomesSettings
from sidecar.outcomes.store import Batch, Store

W = 10_000  # report window
NOW = 10**13  # far ahead: nothing is "in the future" for the builder


def comparison(
    rid: str,
    ts: int,
    p1: float | None = 0.2,
    p2: float | None = 0.6,
    rollout: str = "ro",
    cand: str = "2.0.0",
) -> bytes:
    return msgspec.json.encode(
        Comparison(
            request_id=rid,
            routing_key=None,
            rollout=rollout,
            ts=ts,
            policy_epoch=0,
            policy_mode="shadow",
            served_by="champion",
            champion=ModelResult(
                model="m", version="1.0.0", score=p1, decision=None if p1 is None else p1 >= 0.5
            ),
            candidate=ModelResult(
                model="m", version=cand, score=p2, decision=None if p2 is None else p2 >= 0.5
            ),
        )
    )


def outcome(rid: str, label: Any, ts: int, value: float | None = None) -> bytes:
    return msgspec.json.encode(Outcome(request_id=rid, label=label, ts=ts, value=value))


class Feed:
    """A task fed through the same path as the service: records -> chunks -> changelog
    (kept here as a list) -> apply."""

    def __init__(self, path: Path, **quality: Any) -> None:
        self.path = path
        tree = {
            "report_window_ms": W,
            "comparison_lateness_ms": 0,
            "outcome_grace_ms": 0,
            "min_pairs": 1,
            "min_positives": 1,
            "quality": {"label_window_ms": 5_000, **quality},
        }
        self.settings = msgspec.convert(tree, OutcomesSettings)
        self.builder = ChunkBuilder(self.settings, min_event_ms=0)  # time from 0
        self.log: list[bytes] = []
        self.offsets = {"c": 0, "o": 0}
        self.task = self.open(path)

    #: Further keyword arguments of the tasks it opens (caps, retirement).
    task_options: ClassVar[dict[str, int]] = {}

    def open(self, path: Path) -> JoinTask:
        s = self.settings
        return JoinTask(
            Store(path),
            0,
            s.layout(),
            Windows(s.report_window_ms, s.comparison_lateness_ms, s.outcome_grace_ms),
            s.judging(),
            max_label_window_ms=s.max_label_window_ms(),
            **self.task_options,
        )

    def _records(self, key: str, values: list[bytes]) -> list[Rec]:
        first = self.offsets[key]
        self.offsets[key] += len(values)
        return [Rec(v, offset=first + i) for i, v in enumerate(values)]

    def write(self, record: ChangelogRecord) -> ApplyStats:
        self.log.append(encode(record))
        return self.task.apply(decode(self.log[-1]), len(self.log) - 1)

    def comparisons(self, *values: bytes) -> ApplyStats:
        stats = ApplyStats()
        for chunk, _ in self.builder.build(0, self._records("c", list(values)), [], NOW, Skipped()):
            stats.add(self.write(chunk))
        return stats

    def outcomes(self, *values: bytes) -> ApplyStats:
        stats = ApplyStats()
        for chunk, _ in self.builder.build(0, [], self._records("o", list(values)), NOW, Skipped()):
            stats.add(self.write(chunk))
        return stats

    @property
    def pair(self) -> PairRecord:
        (pair,) = self.task.pairs.values()
        return pair

    def counts(self, ws: int = 0) -> Any:
        return self.task.report(self.task.pairs[self.pair.id], ws, "provisional", 0).counts

    def finalize(self, ws: int = 0) -> None:
        self.write(FinalMark(pair=self.pair.key, window_start_ms=ws, stream_ms=ws + 3 * W))

    def reopen(self) -> None:
        self.task.store.close()
        self.task = self.open(self.path)


@pytest.fixture
def feed(tmp_path: Path) -> Feed:
    return Feed(tmp_path / "task")


def test_an_outcome_after_its_comparison_is_joined(feed: Feed) -> None:
    feed.comparisons(comparison("a", 1000), comparison("b", 1100))
    stats = feed.outcomes(outcome("a", True, 2000))
    assert stats.joined == {"ro": 1}
    c = feed.counts()
    assert (c.requests, c.labelled, c.unlabelled, c.records, c.positives) == (2, 1, 1, 1, 1)


def test_an_outcome_before_its_comparison_waits_for_it(feed: Feed) -> None:
    stats = feed.outcomes(outcome("a", 1, 2000), outcome("a", 0, 1500))
    assert stats.orphaned == 1 and feed.task.meta.orphans == 1
    stats = feed.comparisons(comparison("a", 1000))
    assert stats.joined == {"ro": 1}
    assert feed.task.meta.orphans == 1  # kept: another rollout may score "a" too
    c = feed.counts()
    assert (c.labelled, c.positives) == (1, 1)  # the later outcome (label 1) counts


def test_a_request_counts_once_whatever_is_repeated(feed: Feed) -> None:
    feed.comparisons(comparison("a", 1000), comparison("a", 1000), comparison("b", 1200))
    stats = feed.comparisons(comparison("a", 1000, p1=0.9))  # redelivered, rescored
    assert stats.duplicates == 1 and stats.comparisons == 0
    feed.outcomes(outcome("a", True, 2000))
    stats = feed.outcomes(outcome("a", True, 2000))  # the same outcome again
    assert stats.joined == {} and stats.updated == 0
    before = feed.task.window_accumulator(feed.pair.id, 0).copy()
    # The producer wrote a chunk twice: the second copy covers offsets already applied.
    feed.task.apply(decode(feed.log[-1]), len(feed.log))
    feed.log.append(feed.log[-1])
    # And an offset below what the store applied is ignored outright.
    position = feed.task.meta.changelog_next
    feed.task.apply(decode(feed.log[0]), 0)
    assert feed.task.meta.changelog_next == position
    np.testing.assert_array_equal(feed.task.window_accumulator(feed.pair.id, 0), before)
    c = feed.counts()
    assert (c.requests, c.labelled, c.records) == (2, 1, 1)
    assert feed.task.meta.duplicates == 2


def test_the_last_outcome_wins_by_event_time_in_any_order(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "last")
    feed.comparisons(comparison("a", 1000), comparison("b", 1000))
    feed.outcomes(outcome("a", False, 3000), outcome("b", True, 2000))
    feed.outcomes(outcome("a", True, 2000), outcome("b", False, 3000))  # a: older; b: newer
    c = feed.counts()
    assert (c.labelled, c.positives, c.negatives) == (2, 0, 2)
    feed = Feed(tmp_path / "max", combine="max")
    feed.comparisons(comparison("a", 1000))
    feed.outcomes(outcome("a", True, 2000), outcome("a", False, 3000))
    assert feed.counts().positives == 1


def test_outcomes_after_the_label_window_do_not_count(feed: Feed) -> None:
    feed.comparisons(comparison("a", 1000))
    stats = feed.outcomes(outcome("a", True, 1000 + 5_001))
    assert stats.outside_window == 1
    c = feed.counts()
    assert (c.labelled, c.outside_window) == (0, 1)
    feed.outcomes(outcome("a", True, 1000 + 5_000))
    assert feed.counts().labelled == 1


def test_missing_outcomes_follow_the_rollouts_rule(tmp_path: Path) -> None:
    for rule, records, assumed, unlabelled in (("negative", 3, 2, 0), ("unlabelled", 1, 0, 2)):
        feed = Feed(tmp_path / rule, missing=rule)
        feed.comparisons(*(comparison(r, 1000) for r in "abc"))
        feed.outcomes(outcome("a", True, 1500))
        c = feed.counts()
        assert (c.records, c.assumed_negative, c.unlabelled, c.labelled) == (
            records,
            assumed,
            unlabelled,
            1,
        )
        cov = feed.task.report(feed.pair, 0, "provisional", 0).label_coverage
        assert cov.value == pytest.approx(1 / 3)


def test_unscored_comparisons_and_scores_out_of_range_are_counted(feed: Feed) -> None:
    feed.comparisons(comparison("a", 1000, p1=None), comparison("b", 1000, p2=1.7))
    c = feed.counts()
    assert (c.unscored, c.requests, c.clipped_scores) == (1, 1, 1)


def test_a_final_window_leaves_the_store_and_joins_the_verdict(feed: Feed) -> None:
    feed.comparisons(*(comparison(f"r{i}", 1000 + i, p1=i / 20, p2=(i % 7) / 7) for i in range(20)))
    feed.comparisons(comparison("next", W + 5))
    feed.outcomes(*(outcome(f"r{i}", i % 3 == 0, 2000) for i in range(20)))
    pair = feed.pair
    assert feed.task.due_final(W + 5_000 - 1) == []  # window end + label window
    assert [ws for _, ws in feed.task.due_final(W + 5_000)] == [0]
    assert sum(1 for _ in feed.task.store.scan(b"r")) == 21
    feed.finalize(0)
    assert sum(1 for _ in feed.task.store.scan(b"r")) == 1  # only the next window's
    assert sum(1 for _ in feed.task.store.scan(b"j")) == 1  # the next window's index
    assert feed.task.pairs[pair.id].open == [W]
    verdict = feed.task.verdict(feed.task.pairs[pair.id], 0)
    assert verdict is not None and verdict.judged_pairs == 20 and verdict.windows == 1
    stats = feed.comparisons(comparison("late", 999))  # its window is final
    assert stats.late == {"ro": 1} and stats.comparisons == 0
    stats = feed.outcomes(outcome("r3", False, 2500))  # its request is gone: waits unmatched
    assert stats.orphaned == 1
    feed.write(ExpireMark(before_ms=2501, stream_ms=50_000))
    assert feed.task.meta.orphans == 0 and feed.task.meta.orphans_expired == 1


def test_the_changelog_rebuilds_the_same_store(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "live", missing="negative")
    rng = np.random.default_rng(11)
    ids = [f"r{i}" for i in range(300)]
    for part in range(3):
        sel = ids[part * 100 : (part + 1) * 100]
        feed.outcomes(*(outcome(r, bool(rng.random() < 0.3), 4000) for r in sel[:10]))  # early
        feed.comparisons(
            *(
                comparison(r, 1000 + int(r[1:]), float(rng.random()), float(rng.random()))
                for r in sel
            )
        )
        feed.outcomes(*(outcome(r, bool(rng.random() < 0.3), 5000) for r in sel[10:60]))
        if part == 1:  # a crash: the process dies, the store stays
            feed.reopen()
    feed.comparisons(*(comparison(f"n{i}", W + i) for i in range(5)))
    feed.finalize(0)
    feed.outcomes(outcome("n1", True, W + 100))
    live = feed.task
    for where in ("fresh", "half"):
        path = tmp_path / where
        other = feed.open(path)
        start = 0
        if where == "half":  # a store that has applied part of the changelog, then restarts
            for offset, raw in enumerate(feed.log[:4]):
                other.apply(decode(raw), offset)
            other.store.close()
            other = feed.open(path)
            start = 2  # re-applying records it has is harmless
        for offset, raw in enumerate(feed.log[start:], start=start):
            other.apply(decode(raw), offset)
        assert other.meta == live.meta
        assert other.pairs == live.pairs
        (pid,) = live.pairs
        np.testing.assert_array_equal(other.total_accumulator(pid), live.total_accumulator(pid))
        np.testing.assert_array_equal(
            other.window_accumulator(pid, W), live.window_accumulator(pid, W)
        )
        assert dict(other.store.scan(b"")) == dict(live.store.scan(b""))
        other.store.close()


def test_figures_are_scikit_learns_over_exactly_the_joined_requests(tmp_path: Path) -> None:
    """A messy stream (outcomes before and after, repeats, late outcomes, a redelivered
    comparison): the final report equals scikit-learn on the requests that should count."""
    feed = Feed(tmp_path / "t", missing="negative")
    rng = np.random.default_rng(5)
    n = 2000
    y = rng.random(n) < 0.15
    z = rng.normal(size=n) + 1.4 * y
    p1 = 1 / (1 + np.exp(-(z - 1.5)))
    p2 = 1 / (1 + np.exp(-(1.2 * z - 1.8)))
    when = rng.choice(["before", "after", "late", "none"], size=n, p=[0.2, 0.6, 0.1, 0.1])
    truth = np.where(np.isin(when, ["before", "after"]), y, False)  # late/none: negative
    before = [outcome(f"r{i}", bool(y[i]), 1000 + i + 100) for i in range(n) if when[i] == "before"]
    feed.outcomes(*before)
    for start in range(0, n, 500):
        batch = [
            comparison(f"r{i}", 1000 + i, float(p1[i]), float(p2[i]))
            for i in range(start, min(n, start + 500))
        ]
        feed.comparisons(*batch, *batch[:7])  # some redelivered
    after = [outcome(f"r{i}", bool(y[i]), 1000 + i + 3000) for i in range(n) if when[i] == "after"]
    late = [outcome(f"r{i}", True, 1000 + i + 5001) for i in range(n) if when[i] == "late"]
    feed.outcomes(*after, *late, *after[:50])
    report = feed.task.report(feed.pair, 0, "final", 0)
    assert report.counts.records == n and report.counts.outside_window == len(late)
    assert report.counts.labelled == int(np.isin(when, ["before", "after"]).sum())
    t = truth.astype(int)
    assert report.champion.auc.value == pytest.approx(
        metrics.roc_auc_score(t, score_bins(p1, 1024)), abs=1e-12
    )
    assert report.candidate.average_precision.value == pytest.approx(
        metrics.average_precision_score(t, score_bins(p2, 1024)), abs=1e-12
    )
    assert report.candidate.log_loss.value == pytest.approx(metrics.log_loss(t, p2), rel=1e-9)
    assert report.champion.recall.value == pytest.approx(metrics.recall_score(t, p1 >= 0.5))
    assert report.label_coverage.value == pytest.approx(report.counts.labelled / n)


def test_several_rollout_pairs_keep_their_own_settings(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "t")
    feed.settings = msgspec.convert(
        {**msgspec.to_builtins(feed.settings), "rollouts": {"other": {"missing": "negative"}}},
        OutcomesSettings,
    )
    feed.builder = ChunkBuilder(feed.settings, min_event_ms=0)
    feed.comparisons(
        comparison("a", 1000),
        comparison("b", 1000, rollout="other"),
        comparison("c", 1000, cand="2.1.0"),
    )
    by_key = {p.key: p for p in feed.task.pairs.values()}
    assert len(by_key) == 3
    other = by_key[PairKey("other", "m", "1.0.0", "m", "2.0.0")]
    assert other.settings.missing == "negative"
    assert feed.task.report(other, 0, "provisional", 0).counts.assumed_negative == 1


def test_stream_time_is_bounded_by_what_is_not_read_yet() -> None:
    # Comparisons being read (a backlog): their watermark, however quiet they look.
    assert stream_bound(50_000, False, 9_000, None) == 50_000
    # Read to the end and quiet: time goes on from the last comparison, never jumps.
    assert stream_bound(50_000, True, 3_000, None) == 53_000
    assert stream_bound(50_000, True, -5, None) == 50_000
    # Outcome partitions not routed to their end hold it back.
    assert stream_bound(50_000, True, 3_000, 20_000) == 20_000
    # Outcomes far ahead never pull it past the comparisons.
    assert stream_bound(50_000, False, 0, 900_000) == 50_000


def test_stream_time_never_goes_back(feed: Feed) -> None:
    assert feed.task.advance(53_000) == 53_000
    assert feed.task.advance(20_000) == 53_000


def test_a_poll_of_both_inputs_is_one_chunk_that_keeps_each_inputs_watermark(feed: Feed) -> None:
    comps = feed._records("c", [comparison("a", 1000), comparison("b", 90_000)])
    outs = feed._records("o", [outcome("a", True, 2000)])
    ((chunk, _),) = feed.builder.build(0, comps, outs, NOW, Skipped())
    assert chunk.offsets == {"c": (0, 2), "o": (0, 1)}
    feed.write(chunk)
    assert feed.task.meta.input_ms == {"c": 90_000, "o": 2000}
    assert feed.counts().labelled == 1  # the outcome met the comparison of the same chunk


def test_windows_changed_since_their_last_report_are_marked(feed: Feed) -> None:
    feed.comparisons(comparison("a", 1000), comparison("b", W + 1))
    pid = feed.pair.id
    assert feed.task.dirty == {(pid, 0), (pid, W)}
    feed.task.dirty.clear()  # reported
    feed.outcomes(outcome("b", True, W + 100))
    assert feed.task.dirty == {(pid, W)}  # only the window whose request got its label
    feed.finalize(W)
    assert feed.task.dirty == set()


def test_two_rollouts_scoring_the_same_requests_each_count_them(tmp_path: Path) -> None:
    """Two sidecar deployments (rollouts) on one request stream: the same request ids, both
    judged, and one outcome labels the request in both."""
    feed = Feed(tmp_path / "t", missing="negative")
    feed.outcomes(outcome("a", True, 1500))  # before either comparison
    feed.comparisons(comparison("a", 1000), comparison("b", 1000))
    feed.comparisons(comparison("a", 1000, rollout="other"), comparison("b", 1000, rollout="other"))
    assert feed.task.rollouts == {"ro", "other"}
    feed.outcomes(outcome("b", True, 1600))
    for pair in feed.task.pairs.values():
        c = feed.task.report(pair, 0, "provisional", 0).counts
        assert (pair.key.rollout, c.requests, c.labelled, c.positives) == (
            pair.key.rollout,
            2,
            2,
            2,
        )


@pytest.mark.parametrize("cap", [100_000, 1], ids=["ids in memory", "beyond the cap"])
def test_outcomes_waiting_for_their_comparison_are_found_after_a_reopen_and_an_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    monkeypatch.setattr(join, "MAX_ORPHAN_IDS", cap)
    feed = Feed(tmp_path / "task")
    feed.outcomes(outcome("a", True, 2000), outcome("b", True, 9000), outcome("c", False, 9500))
    assert feed.task.meta.orphans == 3
    assert (feed.task.orphan_ids is None) == (cap == 1)
    feed.reopen()  # the ids in memory are rebuilt from the store
    assert (feed.task.orphan_ids is None) == (cap == 1)
    stats = feed.comparisons(comparison("a", 1000), comparison("x", 1000))
    assert stats.joined == {"ro": 1}
    feed.write(ExpireMark(before_ms=5000, stream_ms=50_000))  # "a" leaves
    assert feed.task.meta.orphans == 2
    assert feed.task.orphan_ids == ({b"b", b"c"} if cap > 1 else None)
    stats = feed.comparisons(comparison("b", 8000), comparison("a", 1500, rollout="other"))
    assert stats.joined == {"ro": 1}  # "a"'s outcome expired before the other rollout's came


def test_a_store_with_the_per_request_window_index_still_drops_its_requests(
    feed: Feed,
) -> None:
    """Stores written before the packed index hold one ``i`` key per request."""
    feed.comparisons(comparison("a", 1000), comparison("b", 1100))
    feed.comparisons(comparison("next", W + 5))
    pid = feed.pair.id
    # Rewrite window 0's index the old way: one empty ``i`` record per request id.
    batch = Batch()
    for key, _ in feed.task.store.scan(b"j" + join._U32.pack(pid) + join._U64.pack(0)):
        batch.delete(key)
    for rid in (b"a", b"b"):
        batch.put(b"i" + join._U32.pack(pid) + join._U64.pack(0) + rid, b"")
    feed.task.store.write(batch)
    assert sum(1 for _ in feed.task.store.scan(b"r")) == 3
    feed.finalize(0)
    assert sum(1 for _ in feed.task.store.scan(b"r")) == 1
    assert sum(1 for _ in feed.task.store.scan(b"i")) == 0
    assert feed.task.meta.stored == 1
