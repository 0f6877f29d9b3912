"""Retiring rollout pairs (pure, over a real RocksDB store): a pair leaves only once every
window of it is final and it has been idle for ``retire_after_ms``; its slot is free again for
the caps; the changelog replays to the same store; and the merge stage forgets it too."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from outcomes.test_join import Feed, W, comparison, outcome
from outcomes.test_quality_partials import ACCS, JUDGING, KEY, LAYOUT, TASKS, WINDOW, part
from outcomes.test_quality_partials import compact as compacted

from sidecar.outcomes.chunks import FinalMark, RetireMark, decode
from sidecar.outcomes.join import JoinTask
from sidecar.outcomes.partials import (
    DECODER,
    MergedQualityWindow,
    QualityMerger,
    merged_key,
    partial_key,
)
from sidecar.outcomes.report import PairKey
from sidecar.outcomes.settings import OutcomesSettings

IDLE = 20_000  # retire_after_ms (label window 5_000, report window W = 10_000, no grace)
OLD = PairKey("ro", "m", "1.0.0", "m", "2.0.0")


class CappedFeed(Feed):
    """A task holding at most one pair of one rollout, retiring pairs idle for ``IDLE``."""

    task_options: ClassVar[dict[str, int]] = {
        "max_pairs": 1,
        "max_rollouts": 1,
        "retire_after_ms": IDLE,
    }

    def final(self, key: PairKey, ws: int, stream_ms: int) -> None:
        self.write(FinalMark(pair=key, window_start_ms=ws, stream_ms=stream_ms))

    def retire(self, stream_ms: int) -> list[PairKey]:
        """What the service does at ``stream_ms``: a mark per retirable pair."""
        out = []
        for pair in self.task.retirable(stream_ms):
            key = PairKey(*pair.key)
            self.write(RetireMark(pair=key, pair_id=pair.id, stream_ms=stream_ms))
            out.append(key)
        return out


@pytest.fixture
def capped(tmp_path: Path) -> CappedFeed:
    return CappedFeed(tmp_path / "task")


def keys(task: JoinTask, prefix: bytes) -> int:
    return sum(1 for _ in task.store.scan(prefix))


def test_a_pair_retires_only_once_every_window_is_final_and_it_is_idle(capped: CappedFeed) -> None:
    capped.comparisons(comparison("a", 1000), comparison("b", 1500))
    capped.outcomes(outcome("a", True, 2000))
    # Its window is open (provisional): never, however late.
    assert capped.task.retirable(10**12) == []
    capped.final(OLD, 0, W + 5_000)
    # A comparison of a later window: pending requests that may still get outcomes.
    capped.comparisons(comparison("c", W + 100))
    assert capped.task.retirable(10**12) == []
    # A mark decided too early (or replayed out of place) changes nothing.
    capped.write(RetireMark(pair=OLD, pair_id=capped.pair.id, stream_ms=10**12))
    assert len(capped.task.pairs) == 1 and capped.task.meta.retired == 0
    capped.final(OLD, W, 2 * W + 5_000)
    assert capped.pair.open == [] and capped.pair.last_seen_ms == W + 100
    # Every window final, nothing pending: idle time from the last comparison (event time).
    assert capped.task.retirable(W + 100 + IDLE - 1) == []
    capped.write(RetireMark(pair=OLD, pair_id=capped.pair.id, stream_ms=W + 100 + IDLE - 1))
    assert len(capped.task.pairs) == 1  # a mark is checked against its own stream time
    verdict = capped.task.verdict(capped.pair, 0)
    assert verdict is not None and verdict.judged_pairs == 1  # a (b, c: unlabelled)
    assert capped.retire(W + 100 + IDLE) == [OLD]
    assert capped.task.pairs == {} and capped.task.meta.retired == 1
    for prefix in (b"p", b"t", b"w", b"j", b"r"):
        assert keys(capped.task, prefix) == 0, prefix
    # The mark again (a producer retry) does nothing more.
    capped.write(RetireMark(pair=OLD, pair_id=0, stream_ms=W + 100 + IDLE))
    assert capped.task.meta.retired == 1


def test_the_idle_time_is_never_shorter_than_the_label_window(tmp_path: Path) -> None:
    feed = CappedFeed(tmp_path / "long", label_window_ms=50_000)
    feed.comparisons(comparison("a", 1000))
    feed.final(OLD, 0, W + 50_000)
    assert feed.task.retirable(1000 + 50_000 - 1) == []  # IDLE (20 s) < label window (50 s)
    assert [p.key for p in feed.task.retirable(1000 + 50_000)] == [OLD]


def test_a_retired_pairs_slot_takes_a_pair_the_caps_refused(capped: CappedFeed) -> None:
    capped.comparisons(comparison("a", 1000))
    refused = capped.comparisons(comparison("x", 2000, cand="3.0.0"))
    other = capped.comparisons(comparison("y", 2000, rollout="other"))
    assert (refused.refused, refused.comparisons) == (1, 0)
    assert (other.refused, other.comparisons) == (1, 0)
    capped.final(OLD, 0, W + 5_000)
    assert capped.retire(1000 + IDLE) == [OLD]
    # The rollout no longer counts either: another rollout's pair is admitted...
    admitted = capped.comparisons(comparison("y", 30_000, rollout="other"))
    assert (admitted.refused, admitted.comparisons) == (0, 1)
    assert {p.key.rollout for p in capped.task.pairs.values()} == {"other"}


def test_a_retired_pair_starts_afresh_and_its_old_windows_stay_final(capped: CappedFeed) -> None:
    capped.comparisons(comparison("a", 1000))
    capped.outcomes(outcome("a", True, 1500))
    capped.final(OLD, 0, W + 5_000)
    old_id = capped.pair.id
    capped.retire(1000 + IDLE)
    # A straggler of window 0 (final long ago): late, it opens nothing.
    late = capped.comparisons(comparison("s", 999))
    assert late.late == {"ro": 1} and late.comparisons == 0
    assert capped.pair.open == [] and capped.pair.id != old_id
    # A new comparison: the pair starts afresh (a new id, no verdict until a final window).
    fresh = capped.comparisons(comparison("n", 40_000))
    assert fresh.comparisons == 1 and capped.pair.open == [40_000]
    assert capped.task.verdict(capped.pair, 0) is None
    # The old mark again, after the fresh start (finished and idle too): it names the old
    # id, so nothing happens.
    capped.final(OLD, 40_000, 40_000 + W + 5_000)
    capped.write(RetireMark(pair=OLD, pair_id=old_id, stream_ms=10**12))
    assert capped.pair.windows_final == 1 and capped.task.meta.retired == 1


def test_replaying_the_changelog_gives_the_same_store(capped: CappedFeed, tmp_path: Path) -> None:
    capped.comparisons(*(comparison(f"a{i}", 1000 + i) for i in range(20)))
    capped.outcomes(*(outcome(f"a{i}", i % 3 == 0, 2000) for i in range(20)))
    capped.final(OLD, 0, W + 5_000)
    capped.retire(1019 + IDLE)
    capped.comparisons(comparison("late", 500), comparison("n1", 50_000))
    capped.write(RetireMark(pair=OLD, pair_id=0, stream_ms=10**12))  # a retry: no effect
    capped.final(OLD, 50_000, 50_000 + W + 5_000)
    capped.retire(50_000 + IDLE)
    capped.comparisons(comparison("n2", 90_000))
    live = capped.task
    assert live.meta.retired == 2 and len(live.pairs) == 1
    for where, start in (("fresh", 0), ("half", 3)):
        other = capped.open(tmp_path / where)
        if start:  # a store that applied part of the changelog, then restarts
            for offset, raw in enumerate(capped.log[:start]):
                other.apply(decode(raw), offset)
            other.store.close()
            other = capped.open(tmp_path / where)
        for offset, raw in enumerate(capped.log):
            other.apply(decode(raw), offset)  # those it has already: ignored
        assert other.meta == live.meta
        assert other.pairs == live.pairs
        assert dict(other.store.scan(b"")) == dict(live.store.scan(b""))
        other.store.close()


def test_the_setting_and_the_merge_horizon() -> None:
    s = msgspec.convert({"quality": {"label_window_ms": 3_000}}, OutcomesSettings)
    assert s.retire_after_ms == 7 * 86_400_000
    s = msgspec.convert(
        {
            "retire_after_ms": 1_000,
            "outcome_grace_ms": 5,
            "comparison_lateness_ms": 7,
            "quality": {"label_window_ms": 3_000},
        },
        OutcomesSettings,
    )
    # The idle time raised to the longest label window, plus how long a window may wait.
    assert s.merge_retire_horizon_ms() == 3_000 + 3_000 + 7 + 5
    off = msgspec.convert({"retire_after_ms": 0}, OutcomesSettings)
    assert off.merge_retire_horizon_ms() == 0


# -- the merge stage ----------------------------------------------------------------------

HORIZON = 10 * WINDOW


def merger() -> QualityMerger:
    return QualityMerger(LAYOUT, JUDGING, 5_000, HORIZON)


def replay(topic: list[tuple[bytes, bytes | None]], m: QualityMerger) -> None:
    """What the stage does with each record read back (tombstones included)."""
    for key, raw in topic:
        if raw is None:
            if key.startswith(b"merged/"):
                m.forget_merged(key)
            continue
        item = DECODER.decode(raw)
        if isinstance(item, MergedQualityWindow):
            m.add_merged(item)
        else:
            m.add(item, 0)


def topic_of_two_merged_windows() -> tuple[list[tuple[bytes, bytes | None]], QualityMerger]:
    enc = msgspec.json.encode
    topic: list[tuple[bytes, bytes | None]] = []
    m = merger()
    for ws in (0, 1000):
        for t in range(TASKS):
            p = part(t, ws, ACCS[ws][t])
            topic.append((partial_key(KEY, ws, t, "final"), enc(p)))
            m.add(p, 0)
        for merged in m.due(0, provisional=False).final:
            topic.append((merged_key(KEY, merged.record.window_start_ms), enc(merged.record)))
    return topic, m


def test_the_merger_retires_a_pair_past_the_horizon_and_forgets_it_on_read_back() -> None:
    topic, m = topic_of_two_merged_windows()
    assert m.retire() == []  # the stream time is 6 windows in: not past the horizon yet
    # Another pair's partial moves the stream time past the last window's end + horizon.
    other = msgspec.structs.replace(
        part(0, 20_000, ACCS[0][0], "provisional"),
        candidate_version="3.0.0",
        stream_time_ms=1000 + WINDOW + HORIZON,
    )
    m.add(other, 0)
    ((key, starts, tasks),) = m.retire()
    assert (key, starts, tasks) == (KEY, [0, 1000], TASKS)
    assert m.verdict(KEY, 0) is None and m.rollouts == {KEY.rollout}  # the other pair's
    assert m.retire() == []  # once
    # A straggler of a retired window: too late, it opens nothing.
    m.add(part(1, 1000, ACCS[1000][0]), 0)
    assert m.late_partials == 1 and m.open_windows == 1
    # The stage tombstones the pair's records: a read-back, before or after compaction,
    # holds nothing of it.
    topic += [(merged_key(KEY, ws), None) for ws in starts]
    topic += [
        (partial_key(KEY, ws, t, s), None)
        for ws in starts
        for t in range(tasks)
        for s in ("provisional", "final")
    ]
    for records in (topic, compacted(topic)):
        again = merger()
        replay(records, again)
        again.due(0, provisional=False)  # the read-back partials merge again...
        assert again.verdict(KEY, 0) is None  # ...but not into a pair that is gone
    assert all(value is None for key, value in compacted(topic) if key.startswith(b"merged/"))


def test_a_partial_dated_far_ahead_of_the_clock_retires_nothing() -> None:
    _, m = topic_of_two_merged_windows()
    m.max_future_ms = 1_000
    hostile = msgspec.structs.replace(
        part(0, 20_000, ACCS[0][0], "provisional"), candidate_version="x", stream_time_ms=2**60
    )
    m.add(hostile, now_ms=1_000)
    assert m.stream_ms == 6_000 and m.retire() == []  # the earlier partials'
    assert m.verdict(KEY, 0) is not None


def test_a_merger_keeps_a_pair_with_an_open_window_or_without_the_setting() -> None:
    topic, m = topic_of_two_merged_windows()
    m.add(part(0, 5000, ACCS[0][0], "provisional"), 0)  # a new window of the pair is open
    m.stream_ms = 10**9
    assert m.retire() == []
    never = QualityMerger(LAYOUT, JUDGING, 5_000, 0)
    replay(topic, never)
    never.stream_ms = 10**9
    assert never.retire() == [] and never.verdict(KEY, 0) is not None


def test_an_empty_final_partial_never_replaces_a_tasks_final_share() -> None:
    m = merger()
    m.add(part(0, 0, ACCS[0][0]), 0)
    m.add(part(0, 0, None), 0)  # the task retired the pair meanwhile and says "nothing"
    for t in (1, 2):
        m.add(part(t, 0, ACCS[0][t]), 0)
    (merged,) = m.due(0, provisional=False).final
    assert merged.report.counts.records == 300 + 250 + 280
