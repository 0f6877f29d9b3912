"""Per-partition partials and their merge: the same reports as one aggregator seeing it all."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from agg_support import ROLLOUT, batch_of, comparisons

from sidecar.aggregate import AggregatorConfig, WindowManager, WindowReport
from sidecar.aggregate.partials import PartialMerger, WindowPartial, aggregate_of, partial_of
from sidecar.contracts import Comparison

CONFIG = AggregatorConfig(window_ms=1_000, allowed_lateness_ms=0, min_pairs=20)
ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(WindowPartial)


def traffic(seed: int, windows: int = 5, partitions: int = 3) -> list[tuple[int, list[Comparison]]]:
    """Batches of (partition, comparisons); each partition sees its own entities, with a few
    duplicates re-delivered on the same partition (as routing-key keying guarantees)."""
    rng = np.random.default_rng(seed)
    out = []
    for w in range(windows):
        for p in range(partitions):
            n = int(rng.integers(40, 120))
            comps = comparisons(
                rng,
                n,
                t0=w * 1_000 + p,
                spacing_ms=7,
                noise=0.1,
                id_prefix=f"p{p}w{w}",
                error_rate=0.03,
                champion_error_rate=0.05,
                batch=4,
                # the policy moves on mid-run, not on every partition at once
                policy_epoch=3 + (w + p) // 3,
                policy_mode="canary" if (w + p) // 3 else "shadow",
            )
            out.append((p, comps + comps[: int(rng.integers(0, 5))]))
    # Event time past the last window on every partition, so every window closes.
    out += [
        (p, comparisons(rng, 1, t0=windows * 1_000 + 500, id_prefix=f"end{p}")) for p in range(3)
    ]
    return out


def single_stage(batches: list[tuple[int, list[Comparison]]]) -> list[WindowReport]:
    mgr = WindowManager(CONFIG)
    mgr.assign_partitions(range(3), 0)
    reports: list[WindowReport] = []
    offsets = [0, 0, 0]
    for p, comps in batches:
        reports += mgr.process(batch_of(comps, partition=p, first_offset=offsets[p]), 0).reports
        offsets[p] += len(comps)
    return reports


def two_stage(
    batches: list[tuple[int, list[Comparison]]], merger: PartialMerger
) -> list[WindowReport]:
    mgr = WindowManager(CONFIG, partials=True)
    mgr.assign_partitions(range(3), 0)
    reports: list[WindowReport] = []
    offsets = [0, 0, 0]
    position = 0
    for p, comps in batches:
        result = mgr.process(batch_of(comps, partition=p, first_offset=offsets[p]), 0)
        assert result.reports == []  # partials mode reports nothing itself
        offsets[p] += len(comps)
        for closed in mgr.take_partials():
            wire = ENCODER.encode(partial_of(closed.aggregate, closed.partition, 3, 0))
            reports += merger.add(DECODER.decode(wire), (0, position), 0).reports
            position += 1
    return reports


def comparable(report: WindowReport) -> WindowReport:
    return msgspec.structs.replace(report, emitted_at_ms=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_partials_report_exactly_what_one_aggregator_would(seed: int) -> None:
    batches = traffic(seed)
    want = single_stage(batches)
    got = two_stage(batches, PartialMerger(CONFIG, timeout_ms=10_000))
    assert (
        [r.window_start_ms for r in got]
        == [r.window_start_ms for r in want]
        == [
            0,
            1_000,
            2_000,
            3_000,
            4_000,
        ]
    )
    assert [comparable(r) for r in got] == [comparable(r) for r in want]
    assert sum(r.counts.duplicates for r in got) > 0
    assert got[-1].candidate.drift_vs_reference.psi.status == "ok"  # references work too
    # the new state merges too: epochs, modes, fallbacks, paired failures and latencies
    assert {(r.policy_epoch_min, r.policy_epoch_max) for r in got} >= {(3, 4), (4, 5)}
    assert any(len(r.policy_modes) == 2 for r in got)
    assert all(r.counts.candidate_fallbacks > 0 for r in got if "shadow" in r.policy_modes)
    assert all(r.failures and r.failures.champion_only_errors > 0 for r in got)
    assert all(r.failures and r.failures.candidate_only_timeouts_host > 0 for r in got)
    assert all(r.latency_paired and r.latency_paired.batches > 20 for r in got)


def test_a_partition_without_the_rollout_sends_an_empty_partial() -> None:
    rng = np.random.default_rng(5)
    mgr = WindowManager(CONFIG, partials=True)
    mgr.assign_partitions([0, 1, 2], 0)
    mgr.process(batch_of(comparisons(rng, 50, t0=0, spacing_ms=10), partition=1), 0)
    mgr.process(batch_of(comparisons(rng, 1, t0=2_000, id_prefix="x"), partition=1), 0)
    assert mgr.take_partials() == []  # partitions 0 and 2 still hold the watermark
    closed = mgr.advance(10**9)  # ... until they are idle
    assert closed == []
    partials = mgr.take_partials()
    by_partition = {c.partition: c.aggregate.records for c in partials if c.aggregate.start_ms == 0}
    assert by_partition == {0: 0, 1: 50, 2: 0}
    merger = PartialMerger(CONFIG, timeout_ms=10_000)
    reports = [
        r
        for i, c in enumerate(partials)
        for r in merger.add(partial_of(c.aggregate, c.partition, 3, 0), (0, i), 0).reports
    ]
    assert [r.window_start_ms for r in reports] == [0]  # [2000, 3000) is still open
    assert reports[0].counts.records == 50 and reports[0].closed_by == "watermark"


def partial(partition: int, start: int = 0, records: int = 10, total: int = 3) -> WindowPartial:
    rng = np.random.default_rng(partition + start)
    mgr = WindowManager(CONFIG, partials=True)
    mgr.assign_partitions([partition], 0)
    comps = comparisons(rng, records, t0=start, id_prefix=f"q{partition}")
    mgr.process(batch_of(comps, partition=partition), 0)
    mgr.flush(0)
    (closed,) = mgr.take_partials()
    return partial_of(closed.aggregate, partition, total, 0)


def test_missing_partitions_are_waited_for_until_the_timeout() -> None:
    merger = PartialMerger(CONFIG, timeout_ms=5_000)
    assert merger.add(partial(0), (0, 10), now_ms=1_000).reports == []
    assert merger.add(partial(2), (0, 11), now_ms=2_000).reports == []
    assert merger.open_first_offsets() == {0: 10}
    assert merger.tick(5_999) == []
    (report,) = merger.tick(6_000)
    assert report.closed_by == "merge_timeout" and report.partitions_missing == [1]
    assert report.counts.records == 20 and merger.open_first_offsets() == {}
    late = merger.add(partial(1), (0, 12), now_ms=7_000)  # its window was reported already
    assert late.reports == [] and late.late_partials == 1


def test_a_redelivered_partial_replaces_itself_instead_of_counting_twice() -> None:
    merger = PartialMerger(CONFIG, timeout_ms=5_000)
    merger.add(partial(0), (0, 1), 0)
    merger.add(partial(0), (0, 2), 0)
    merger.add(partial(1), (0, 3), 0)
    (report,) = merger.add(partial(2), (0, 4), 0).reports
    assert report.counts.records == 30 and report.partitions_missing == []


def test_a_partial_from_an_incompatible_aggregator_is_refused() -> None:
    p = partial(0)
    bad = msgspec.structs.replace(
        p, champion=msgspec.structs.replace(p.champion, score_counts=[1, 2, 3])
    )
    with pytest.raises(ValueError, match="same \\[aggregate\\] settings"):
        aggregate_of(bad, CONFIG)
    assert aggregate_of(p, CONFIG).records == 10
    assert p.key.rollout == ROLLOUT


# -- hostile partials: the partials topic is untrusted like every topic --------------------

replace = msgspec.structs.replace


def _bad_partials() -> list[tuple[str, WindowPartial]]:
    p = partial(2)
    return [
        ("2**62 partitions", replace(p, partitions_total=2**62)),
        ("partition past the total", replace(p, partition=7)),
        ("negative partition", replace(p, partition=-1)),
        ("a window of another length", replace(p, window_end_ms=p.window_end_ms + 1)),
        ("a window ending before it starts", replace(p, window_end_ms=p.window_start_ms - 5)),
        ("negative records", replace(p, records=-(10**9))),
        ("negative served", replace(p, served=[-5, 0, 0])),
        ("malformed served", replace(p, served=[1])),
        ("negative score bins", replace(p, champion=replace(p.champion, score_nan=-1))),
    ]


@pytest.mark.parametrize(("name", "bad"), _bad_partials(), ids=[n for n, _ in _bad_partials()])
def test_a_malformed_partial_is_refused_on_arrival_and_harms_no_window(
    name: str, bad: WindowPartial
) -> None:
    """It used to be taken, then fail (or, with 2**62 partitions, hang) when its window was
    merged: a complete window raised in ``add`` and lost its good partials, an incomplete
    one raised from ``tick`` and stopped the merge stage (again after every restart: its
    offsets were never committed)."""
    merger = PartialMerger(CONFIG, timeout_ms=5_000)
    merger.add(partial(0), (0, 1), 0)
    merger.add(partial(1), (0, 2), 0)
    with pytest.raises(ValueError):
        merger.add(bad, (0, 3), 0)
    (timed_out,) = merger.tick(10**9)  # the good partials' window, nothing else
    assert timed_out.counts.records == 20 and timed_out.partitions_missing == [2]
    merger = PartialMerger(CONFIG, timeout_ms=5_000)
    merger.add(partial(0), (0, 1), 0)
    merger.add(partial(1), (0, 2), 0)
    with pytest.raises(ValueError):
        merger.add(bad, (0, 3), 0)
    (report,) = merger.add(partial(2), (0, 4), 0).reports
    assert report.counts.records == 30 and report.partitions_missing == []


def test_made_up_rollouts_on_the_partials_topic_cannot_grow_the_merger() -> None:
    config = AggregatorConfig(
        window_ms=1_000, allowed_lateness_ms=0, min_pairs=20, max_open_windows=4
    )
    merger = PartialMerger(config, timeout_ms=60_000)
    p = partial(0)
    reports = []
    for i in range(50):
        fake = replace(
            p, rollout=f"fake-{i}", out_of_range_features={f"f{j}": 1 for j in range(500)}
        )
        reports += merger.add(fake, (0, i), i).reports
    assert merger.pending_windows <= 4 and len(merger._first_seen) <= 4
    assert len(reports) == 46 and {r.closed_by for r in reports} == {"capacity"}
    assert all(len(r.counts.out_of_range_features) <= 101 for r in reports)


def test_a_partial_claiming_more_partitions_than_the_topic_has_cannot_hold_its_window() -> None:
    """One record claiming 65,536 partitions held its window until the merge timeout (and the
    guards on it) and listed ~65,000 missing partitions. With the topic's partition count
    known, the window waits for those partitions only."""
    known: list[int | None] = [3]
    merger = PartialMerger(CONFIG, timeout_ms=60_000, partitions=lambda: known[0])
    hostile = partial(60_000, total=65_536)
    assert merger.add(hostile, (0, 1), 0).reports == []
    merger.add(partial(0), (0, 2), 0)
    merger.add(partial(1), (0, 3), 0)  # three partials held, but partition 2 is not in
    (report,) = merger.add(partial(2), (0, 4), 0).reports
    assert report.closed_by == "watermark" and report.partitions_missing == []
    # The topic grew to 4 (the client's metadata says so): windows wait for partition 3.
    known[0] = 4
    merger.add(partial(0, start=5_000, total=4), (0, 5), 0)
    for p in (1, 2):
        assert merger.add(partial(p, start=5_000), (0, 5 + p), 0).reports == []
    (grown,) = merger.add(partial(3, start=5_000, total=4), (0, 8), 0).reports
    assert grown.closed_by == "watermark" and grown.counts.records == 40
    # Not known (no metadata yet): a partial's claim counts, as before.
    known[0] = None
    merger.add(partial(0, start=9_000, total=5), (0, 9), 0)
    (timed_out,) = merger.tick(60_000)
    assert timed_out.partitions_missing == [1, 2, 3, 4]
