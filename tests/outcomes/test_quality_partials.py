"""The merge of a shared rollout's quality partials (pure): whatever the order, duplicates or
restarts, a window's final report and the pair's verdict are those of the summed
accumulators, each task's share counted once; a missing task is waited for until the merge
timeout, then named."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest

from sidecar.outcomes.partials import (
    DECODER,
    MergedQualityWindow,
    QualityMerger,
    QualityPartial,
    merged_key,
    partial_key,
    partial_of,
    sparse,
)
from sidecar.outcomes.quality import Costs, FloatArray, Layout, contribution
from sidecar.outcomes.report import (
    Judging,
    PairKey,
    QualityRequirement,
    ReportStatus,
    quality_report,
    quality_verdict,
)

LAYOUT = Layout(16, 10, 64)
JUDGING = Judging(min_pairs=20, min_positives=3, resamples=20)
KEY = PairKey("fraud-v2", "lr", "1.4.0", "lr", "2.1.0")
REQ = QualityRequirement(metric="auc", margin=0.05, min_pairs=50)
WINDOW = 1000
TASKS = 3
TIMEOUT = 5_000


def accumulator(n: int, seed: int) -> FloatArray:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int8)
    z = rng.normal(size=n) + 1.5 * y
    p1, p2 = 1 / (1 + np.exp(-(z - 1.5))), 1 / (1 + np.exp(-(1.3 * z - 1.8)))
    value = np.full(n, np.nan)
    d1, d2 = (p1 >= 0.3).astype(np.int8), (p2 >= 0.3).astype(np.int8)
    return contribution(LAYOUT, p1, p2, d1, d2, y, value, Costs())


def part(
    task: int, ws: int, acc: FloatArray | None, status: ReportStatus = "final", at: int = 0
) -> QualityPartial:
    return partial_of(
        KEY,
        ws,
        ws + WINDOW,
        task=task,
        tasks_total=TASKS,
        status=status,
        stream_time_ms=ws + 5 * WINDOW,
        final_at_ms=ws + 4 * WINDOW,
        label_window_ms=2 * WINDOW,
        missing="negative",
        requirement=REQ,
        acc=acc if acc is not None else LAYOUT.zeros(),
        ranking=None,
        emitted_at_ms=at,
    )


def merger() -> QualityMerger:
    return QualityMerger(LAYOUT, JUDGING, TIMEOUT)


def expected_report(ws: int, acc: FloatArray) -> dict:
    report = quality_report(
        KEY,
        ws,
        ws + WINDOW,
        LAYOUT,
        acc,
        status="final",
        label_window_ms=2 * WINDOW,
        missing="negative",
        stream_time_ms=0,
        final_at_ms=ws + 4 * WINDOW,
        now_ms=0,
        judging=JUDGING,
    )
    return figures_of(report)


def figures_of(report: object) -> dict:
    """A report's or verdict's figures (times of making it left out)."""
    out = msgspec.to_builtins(report)
    for name in ("stream_time_ms", "emitted_at_ms", "tasks_missing"):
        out.pop(name, None)
    return out


# Per window, per task, an accumulator (task 1 has nothing of window 1000: an empty partial).
ACCS: dict[int, dict[int, FloatArray | None]] = {
    0: {0: accumulator(300, 1), 1: accumulator(250, 2), 2: accumulator(280, 3)},
    1000: {0: accumulator(310, 4), 1: None, 2: accumulator(260, 5)},
}


def total(ws: int) -> FloatArray:
    acc = LAYOUT.zeros()
    for t in range(TASKS):
        a = ACCS[ws][t]
        if a is not None:
            acc += a
    return acc


@pytest.mark.parametrize("seed", range(5))
def test_partials_in_any_order_with_duplicates_give_the_summed_windows_and_verdict(
    seed: int,
) -> None:
    records: list[QualityPartial] = []
    for ws, tasks in ACCS.items():
        for t, acc in tasks.items():
            if acc is not None:  # provisional shares first (half of it), then the final one
                records.append(part(t, ws, acc * 0.5, "provisional", at=1))
            records.append(part(t, ws, acc, "final", at=2))
    rng = random.Random(seed)
    records += rng.sample(records, 4)  # redelivered: finals and provisionals again
    rng.shuffle(records)
    m = merger()
    finals = []
    for r in records:
        m.add(r, now_ms=10)
        finals += m.due(10, provisional=True).final
    by_window = {f.report.window_start_ms: f for f in finals}
    assert sorted(by_window) == [0, 1000] and len(finals) == 2
    for ws, f in by_window.items():
        assert f.report.tasks_missing == []
        assert figures_of(f.report) == expected_report(ws, total(ws))
    last = finals[-1].verdict  # after both windows, whichever completed first
    assert last is not None
    want = quality_verdict(
        KEY,
        LAYOUT,
        total(0) + total(1000),
        windows=2,
        first_window_start_ms=0,
        last_window_end_ms=2 * WINDOW,
        requirement=REQ,
        now_ms=0,
        judging=JUDGING,
    )
    assert figures_of(last) == figures_of(want)
    assert last.judged_pairs == 300 + 250 + 280 + 310 + 260
    assert m.open_windows == 0


def test_a_missing_task_is_waited_for_until_the_timeout_then_named() -> None:
    m = merger()
    m.add(part(0, 0, ACCS[0][0], "provisional"), now_ms=0)  # days before: no timeout yet
    assert m.due(10 * TIMEOUT, provisional=False).final == []
    m.add(part(0, 0, ACCS[0][0]), now_ms=100)
    m.add(part(1, 0, ACCS[0][1]), now_ms=200)
    m.add(part(2, 0, ACCS[0][2], "provisional"), now_ms=300)
    out = m.due(100 + TIMEOUT - 1, provisional=True)
    assert out.final == [] and len(out.provisional) == 1  # from the first final partial on
    assert m.due(100 + TIMEOUT - 1, provisional=True).provisional == []  # nothing changed
    (merged,) = m.due(100 + TIMEOUT, provisional=True).final
    assert merged.report.tasks_missing == [2] and merged.record.tasks_missing == [2]
    assert figures_of(merged.report) == expected_report(0, total(0))  # its provisional share
    (held,) = merged.record.held
    assert held.task == 2 and (held.index, held.values) == sparse(ACCS[0][2])
    m.add(part(2, 0, ACCS[0][2], "provisional"), now_ms=TIMEOUT + 400)  # still not final: late
    assert m.late_partials == 1 and m.due(10**9, provisional=True).final == []
    verdict = m.verdict(KEY, 0)
    assert verdict is not None and verdict.judged_pairs == 300 + 250 + 280


def compact(topic: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """What a compacted topic keeps: the latest record per key, in the order of those."""
    latest = {key: i for i, (key, _) in enumerate(topic)}
    return [rec for i, rec in enumerate(topic) if latest[rec[0]] == i]


def replay(topic: list[tuple[bytes, bytes]], m: QualityMerger, now: int) -> None:
    for _, raw in topic:
        item = DECODER.decode(raw)
        if isinstance(item, MergedQualityWindow):
            m.add_merged(item)
        else:
            m.add(item, now)


@pytest.mark.parametrize("compacted", [False, True])
def test_a_merger_rebuilt_from_the_topic_counts_each_window_once(compacted: bool) -> None:
    enc = msgspec.json.encode
    topic: list[tuple[bytes, bytes]] = []

    def send(p: QualityPartial) -> None:
        topic.append((partial_key(KEY, p.window_start_ms, p.task, p.status), enc(p)))

    first = merger()
    for t in range(TASKS):  # window 0 complete, window 1000 missing task 2 so far
        send(part(t, 0, ACCS[0][t], "provisional"))
        send(part(t, 0, ACCS[0][t]))
    send(part(0, 1000, ACCS[1000][0]))
    send(part(1, 1000, None))
    replay(topic, first, 0)
    (done,) = first.due(0, provisional=False).final
    topic.append((merged_key(KEY, 0), enc(done.record)))
    # A task restarted before its mark: its final partial of window 0 comes again.
    send(part(1, 0, ACCS[0][1]))

    again = merger()
    replay(compact(topic) if compacted else topic, again, 50)
    out = again.due(50, provisional=True)
    assert out.final == []  # window 0 is not reported again
    assert [r.window_start_ms for r in out.provisional] == [1000]
    before = again.verdict(KEY, 0)
    assert before is not None and figures_of(before) == figures_of(first.verdict(KEY, 0))
    assert again.late_partials == 1  # the re-sent final partial of window 0
    again.add(part(2, 1000, ACCS[1000][2]), now_ms=60)
    (merged,) = again.due(60, provisional=True).final
    assert merged.report.tasks_missing == []
    assert figures_of(merged.report) == expected_report(1000, total(1000))
    assert merged.verdict is not None
    assert merged.verdict.judged_pairs == 300 + 250 + 280 + 310 + 260
    assert merged.verdict.windows == 2


def test_a_stale_provisional_written_after_the_final_partial_survives_compaction_harmlessly() -> (
    None
):
    """In a rebalance a task's old owner may write a provisional partial after the new owner
    wrote the final one. Provisional and final partials have their own keys, so compaction
    keeps the final one, and a merger rebuilt from the compacted topic merges the window."""
    enc = msgspec.json.encode
    topic: list[tuple[bytes, bytes]] = []
    for t in range(TASKS):
        final = part(t, 0, ACCS[0][t])
        topic.append((partial_key(KEY, 0, t, "final"), enc(final)))
    stale = part(1, 0, ACCS[0][1], "provisional")
    topic.append((partial_key(KEY, 0, 1, stale.status), enc(stale)))
    rebuilt = merger()
    replay(compact(topic), rebuilt, 0)
    (done,) = rebuilt.due(0, provisional=False).final
    assert done.report.tasks_missing == []
    assert figures_of(done.report) == expected_report(0, total(0))


def test_hostile_partials_are_refused_before_they_change_anything() -> None:
    m = merger()
    good = part(0, 0, ACCS[0][0])
    for bad in (
        msgspec.structs.replace(good, size=LAYOUT.size + 1),
        msgspec.structs.replace(good, index=[LAYOUT.size + 5], values=[1.0]),
        msgspec.structs.replace(good, index=[1, 2], values=[1.0]),
        msgspec.structs.replace(good, index=[3, 3], values=[1.0, 2.0]),
        msgspec.structs.replace(good, task=7),
        # The merge would wait for, then list as missing, every one of 2**40 tasks.
        msgspec.structs.replace(good, tasks_total=2**40),
    ):
        with pytest.raises(ValueError):
            m.add(bad, 0)
    assert m.open_windows == 0


def test_a_partial_or_merged_record_naming_more_tasks_than_partitions_is_refused() -> None:
    """Where the stage knows the comparisons topic's partitions, a partial claiming more tasks
    (65,536 would be waited for, listed missing and tombstoned at retirement) is refused."""
    m = QualityMerger(LAYOUT, JUDGING, TIMEOUT, max_tasks=TASKS)
    good = part(0, 0, ACCS[0][0])
    with pytest.raises(ValueError, match=f"at most {TASKS} tasks"):
        m.add(msgspec.structs.replace(good, tasks_total=TASKS + 1), 0)
    assert m.open_windows == 0
    m.add(good, 0)  # the topic's own count is fine
    assert m.open_windows == 1
    (without,) = merged_without(merger(), {2})
    beyond = msgspec.structs.replace(without.record, tasks_missing=[2, TASKS], held=[])
    with pytest.raises(ValueError, match=f"outside 0..{TASKS - 1}"):
        QualityMerger(LAYOUT, JUDGING, TIMEOUT, max_tasks=TASKS).add_merged(beyond)
    merger().add_merged(beyond)  # without the count: only the 65,536 bound


def close(a: object, b: object) -> bool:
    """Figures equal up to float rounding (a late share replaces a counted one by
    subtraction: the sums may differ in their last bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12) or (a != a and b != b)
    return a == b


def verdict_of(ws_list: list[int], windows: int) -> dict:
    acc = LAYOUT.zeros()
    for ws in ws_list:
        acc += total(ws)
    want = quality_verdict(
        KEY,
        LAYOUT,
        acc,
        windows=windows,
        first_window_start_ms=min(ws_list),
        last_window_end_ms=max(ws_list) + WINDOW,
        requirement=REQ,
        now_ms=0,
        judging=JUDGING,
    )
    return figures_of(want)


def merged_without(m: QualityMerger, missing: set[int], now: int = 0) -> list[object]:
    """Window 0 merged at the timeout without ``missing``, which sent only half their share
    (provisionally); returns the outputs."""
    for t in range(TASKS):
        if t in missing:
            m.add(part(t, 0, ACCS[0][t] * 0.5, "provisional", at=1), now_ms=now)
        else:
            m.add(part(t, 0, ACCS[0][t], at=2), now_ms=now)
    return list(m.due(now + TIMEOUT, provisional=False).final)


def test_a_missing_tasks_final_partial_arriving_after_the_merge_replaces_its_share() -> None:
    """A task merged without (lagging, restoring) sends its final partial after all: the
    window is reported final again with its final share instead of the provisional one
    counted, no longer naming it, and the pair's verdict counts the window once, with it."""
    m = merger()
    (first,) = merged_without(m, {2})
    assert first.report.tasks_missing == [2]
    half = total(0) - ACCS[0][2] * 0.5
    assert close(figures_of(first.report), expected_report(0, half))
    m.add(part(2, 0, ACCS[0][2], at=3), now_ms=TIMEOUT + 10)
    (again,) = m.due(TIMEOUT + 10, provisional=False).final
    assert again.report.tasks_missing == [] and again.record.tasks_missing == []
    assert again.record.held == [] and again.report.status == "final"
    assert close(figures_of(again.report), expected_report(0, total(0)))
    assert again.verdict is not None and again.verdict.windows == 1
    assert close(figures_of(again.verdict), verdict_of([0], 1))
    # Once in, its final word stands: sent again, or anything after it, is late.
    m.add(part(2, 0, ACCS[0][2], at=4), now_ms=TIMEOUT + 20)
    m.add(part(1, 0, ACCS[0][1], at=4), now_ms=TIMEOUT + 20)
    assert m.due(TIMEOUT + 30, provisional=True).final == []
    assert m.late_partials == 2
    assert close(figures_of(m.verdict(KEY, 0)), verdict_of([0], 1))


def test_two_missing_tasks_come_in_one_at_a_time_and_a_later_window_counts_as_usual() -> None:
    m = merger()
    (first,) = merged_without(m, {0, 2})
    assert first.report.tasks_missing == [0, 2]
    assert [h.task for h in first.record.held] == [0, 2]
    m.add(part(2, 0, ACCS[0][2], at=3), now_ms=TIMEOUT + 10)
    (second,) = m.due(TIMEOUT + 10, provisional=False).final
    assert second.report.tasks_missing == [0] and [h.task for h in second.record.held] == [0]
    # Read back with the partials gone (tombstoned), both records of the window still there:
    # the newer one, naming fewer tasks, replaces the older one's count.
    rebuilt = merger()
    rebuilt.add_merged(first.record)
    rebuilt.add_merged(second.record)
    rebuilt.add_merged(first.record)  # an old one again: changes nothing
    assert close(figures_of(rebuilt.verdict(KEY, 0)), figures_of(m.verdict(KEY, 0)))
    assert rebuilt.due(TIMEOUT + 10, provisional=False).final == []
    for t in range(TASKS):  # window 1000 complete meanwhile
        m.add(part(t, 1000, ACCS[1000][t], at=3), now_ms=TIMEOUT + 20)
    m.add(part(0, 0, ACCS[0][0], at=4), now_ms=TIMEOUT + 30)
    out = m.due(TIMEOUT + 30, provisional=False).final
    assert [(o.report.window_start_ms, o.report.tasks_missing) for o in out] == [
        (0, []),
        (1000, []),
    ]
    assert close(figures_of(out[0].report), expected_report(0, total(0)))
    assert close(figures_of(out[-1].verdict), verdict_of([0, 1000], 2))


@pytest.mark.parametrize("compacted", [False, True])
def test_a_rebuilt_merger_counts_a_late_share_once_whatever_the_topic_kept(
    compacted: bool,
) -> None:
    """The topic as the stage writes it: partials, the merged record without task 2, task
    2's late final partial, the merged record with it, tombstones of the partials. Read back
    whole or compacted, before or after the second merged record was written, a new merger
    counts task 2's final share once and reports the window again only if that record is
    not in the topic yet."""
    enc = msgspec.json.encode
    topic: list[tuple[bytes, bytes | None]] = []

    def send(p: QualityPartial) -> None:
        topic.append((partial_key(KEY, p.window_start_ms, p.task, p.status), enc(p)))

    def merged(record: MergedQualityWindow) -> None:
        topic.append((merged_key(KEY, 0), enc(record)))
        topic.extend(
            (partial_key(KEY, 0, t, status), None)
            for t in range(TASKS)
            for status in ("provisional", "final")
        )

    first = merger()
    send(part(0, 0, ACCS[0][0], at=2))
    send(part(1, 0, ACCS[0][1], at=2))
    send(part(2, 0, ACCS[0][2] * 0.5, "provisional", at=1))
    for _, raw in topic:
        first.add(DECODER.decode(raw), 0)
    (without,) = first.due(TIMEOUT, provisional=False).final
    merged(without.record)
    send(part(2, 0, ACCS[0][2], at=3))
    middle = len(topic)  # the stage stopped here: the late share not merged yet
    first.add(DECODER.decode(topic[-1][1]), TIMEOUT + 10)
    (amended,) = first.due(TIMEOUT + 10, provisional=False).final
    merged(amended.record)

    def rebuilt(records: list[tuple[bytes, bytes | None]]) -> tuple[QualityMerger, list]:
        m = merger()
        kept = compact(records) if compacted else records
        for _, raw in kept:
            if raw is None:
                continue
            item = DECODER.decode(raw)
            if isinstance(item, MergedQualityWindow):
                m.add_merged(item)
            else:
                m.add(item, TIMEOUT + 50)
        return m, m.due(TIMEOUT + 50, provisional=False).final

    for records, reports_again in ((topic[:middle], True), (topic, False)):
        m, out = rebuilt(records)
        if reports_again:
            (again,) = out
            assert again.report.tasks_missing == []
            assert close(figures_of(again.report), expected_report(0, total(0)))
        else:
            assert out == []
        assert close(figures_of(m.verdict(KEY, 0)), verdict_of([0], 1))
        # its own records read back (it consumes the topic it writes): nothing changes
        m.add_merged(without.record)
        m.add_merged(amended.record)
        assert m.due(TIMEOUT + 60, provisional=False).final == []
        assert close(figures_of(m.verdict(KEY, 0)), verdict_of([0], 1))


def test_a_merged_record_holding_shares_of_tasks_it_does_not_name_missing_is_refused() -> None:
    m = merger()
    (without,) = merged_without(m, {2})
    bad = msgspec.structs.replace(without.record, tasks_missing=[])
    with pytest.raises(ValueError):
        merger().add_merged(bad)
    huge = msgspec.structs.replace(
        without.record,
        held=[msgspec.structs.replace(without.record.held[0], index=[LAYOUT.size + 3])],
    )
    with pytest.raises(ValueError):
        merger().add_merged(huge)
    twice = msgspec.structs.replace(without.record, held=without.record.held * 2)
    far = msgspec.structs.replace(without.record, tasks_missing=[2, 2**40])
    for bad in (twice, far):
        with pytest.raises(ValueError):
            merger().add_merged(bad)
