"""Hostile input to the outcomes stage, in the style of ``tests/test_hostile_input.py``: whatever
a record on the outcomes topic, the repartitioned topic, the comparisons topic or the changelog
holds, it ends as an accounted outcome (an Outcome or a dead-letter kind with its reason, a
skipped and counted record) and never as an exception, and a task fed such records still
counts every valid request once."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from records import Rec
from test_hostile_input import ENC, FUZZ, hostile_json, valid_comparison
from test_join import Feed, W, comparison, outcome

from sidecar.contracts import MAX_EPOCH_MS
from sidecar.outcomes.chunks import comparison_arrays, decode
from sidecar.outcomes.contract import MAX_VALUE, Outcome, decode_outcome
from sidecar.outcomes.decode import (
    MAX_CHUNK_WINDOWS,
    ChunkBuilder,
    Skipped,
    decode_comparisons,
)
from sidecar.outcomes.join import (
    MAX_OUTCOME_LEAD_MS,
    MAX_PAIRS,
    MAX_ROLLOUTS,
    JoinTask,
    Windows,
    request_prefix,
)
from sidecar.outcomes.report import PairKey
from sidecar.outcomes.settings import OutcomesSettings
from sidecar.outcomes.store import Store

SETTINGS = msgspec.convert({"min_pairs": 1, "min_positives": 1}, OutcomesSettings)
NOW = 1_700_000_100_000


def valid_outcome(i: int) -> dict[str, Any]:
    return {
        "request_id": f"r-{i}",
        "label": i % 2 == 0,
        "ts": 1_700_000_000_500 + i,
        "value": 12.5,
        "routing_key": f"card-{i}",
        "source": "chargebacks",
    }


@FUZZ
@given(st.data())
def test_no_outcome_record_escapes_decoding(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(st.none(), hostile_json(valid_outcome(3))))
    got = decode_outcome(raw)  # must not raise
    if isinstance(got, Outcome):
        assert 0 <= got.ts <= MAX_EPOCH_MS and 1 <= len(got.request_id) <= 256
        assert got.value is None or got.value >= 0
    else:
        kind, reason = got
        assert kind in ("decode", "schema", "schema_version") and reason


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        ({**valid_outcome(1), "label": "yes"}, "schema"),
        ({**valid_outcome(1), "request_id": ""}, "schema"),
        ({**valid_outcome(1), "value": -3}, "schema"),
        ({**valid_outcome(1), "schema_version": "2.0"}, "schema_version"),
        ({**valid_outcome(1), "schema_version": "\u0661"}, "schema_version"),
        ({**valid_outcome(1), "label": ["item"] * 1001}, "schema"),
    ],
)
def test_outcome_contract_violations_say_why(doc: dict[str, Any], kind: str) -> None:
    got = decode_outcome(ENC.encode(doc))
    assert isinstance(got, tuple) and got[0] == kind and got[1]


def test_labels_may_be_bools_numbers_or_ranked_items() -> None:
    for label in (True, 0, 0.7, ["sku-1", "sku-9"]):
        got = decode_outcome(ENC.encode({**valid_outcome(1), "label": label}))
        assert isinstance(got, Outcome) and got.label == label


@FUZZ
@given(data=st.data())
def test_no_record_escapes_a_task(tmp_path_factory: Any, data: st.DataObject) -> None:
    comparisons: list[bytes | None] = [ENC.encode(valid_comparison(i)) for i in range(3)]
    outcomes: list[bytes | None] = [ENC.encode(valid_outcome(i)) for i in range(3)]
    for values, base in ((comparisons, valid_comparison(9)), (outcomes, valid_outcome(9))):
        for _ in range(data.draw(st.integers(1, 3))):
            hostile = data.draw(st.one_of(st.none(), hostile_json(base)))
            values.insert(data.draw(st.integers(0, len(values))), hostile)
    assert len(decode_comparisons(comparisons)) == len(comparisons)
    skipped = Skipped()
    chunks = ChunkBuilder(SETTINGS).build(
        0,
        [Rec(v, offset=i) for i, v in enumerate(comparisons)],
        [Rec(v, offset=i) for i, v in enumerate(outcomes)],
        NOW,
        skipped,
    )
    path: Path = tmp_path_factory.mktemp("task")
    task = JoinTask(
        Store(path),
        0,
        SETTINGS.layout(),
        Windows(SETTINGS.report_window_ms, 0, 0),
        SETTINGS.judging(),
        max_label_window_ms=SETTINGS.max_label_window_ms(),
    )
    try:
        for offset, (chunk, raw) in enumerate(chunks):
            assert decode(raw) == chunk
            task.apply(chunk, offset)
        # The three valid comparisons are stored (a hostile one may be valid too, or repeat).
        prefix = request_prefix("fraud-v2")
        ids = {k[len(prefix) :].decode() for k, _ in task.store.scan(prefix)}
        assert {"r-0", "r-1", "r-2"} <= ids
        assert task.meta.inputs == {"c": len(comparisons), "o": len(outcomes)}
    finally:
        task.store.close()


@FUZZ
@given(st.binary(max_size=300))
def test_a_changelog_record_that_is_garbage_raises_only_what_the_restore_skips(raw: bytes) -> None:
    """The restore skips (and counts) a record ``decode`` refuses; it raises nothing else."""
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
        decode(raw)


def test_a_comparison_far_in_the_future_is_skipped_not_applied() -> None:
    doc = valid_comparison(1)
    doc["ts"] = NOW + SETTINGS.max_future_ms + 1
    skipped = Skipped()
    ((chunk, _),) = ChunkBuilder(SETTINGS).build(0, [Rec(ENC.encode(doc))], [], NOW, skipped)
    assert skipped.counts == {("comparisons", "future"): 1}
    assert chunk.comparisons.ids == [] and chunk.offsets == {"c": (0, 1)}


def test_a_poll_too_big_for_one_record_is_split() -> None:
    docs = [dict(valid_comparison(i), request_id=f"{i:0>200}") for i in range(3000)]
    records = [Rec(ENC.encode(d), offset=i) for i, d in enumerate(docs)]
    chunks = ChunkBuilder(SETTINGS).build(0, records, [], NOW, Skipped(), max_bytes=200_000)
    assert len(chunks) > 1 and all(len(raw) <= 200_000 for _, raw in chunks)
    assert sum(len(c.comparisons.ids) for c, _ in chunks) == 3000
    spans = [c.offsets["c"] for c, _ in chunks]
    assert spans[0][0] == 0 and spans[-1][1] == 3000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def _poll(values: list[bytes | None]) -> tuple[Any, Skipped]:
    skipped = Skipped()
    ((chunk, raw),) = ChunkBuilder(SETTINGS).build(
        0, [Rec(v, offset=10 + i) for i, v in enumerate(values)], [], NOW, skipped
    )
    assert decode(raw) == chunk
    return chunk, skipped


def test_one_bad_record_in_a_poll_leaves_only_itself_out() -> None:
    """A poll decodes in one pass while every record is a comparison; one record that is
    not (broken JSON, a null value, a wrong type) sends the poll record by record, and exactly
    those records are skipped and counted, the others kept in order."""
    values: list[bytes | None] = [ENC.encode(valid_comparison(i)) for i in range(6)]
    values[1] = values[1][:-5]  # cut short
    values[3] = None  # a tombstone
    wrong = valid_comparison(4)
    wrong["ts"] = "yesterday"
    values[4] = ENC.encode(wrong)
    views = decode_comparisons(values)
    assert [v is None for v in views] == [False, True, False, True, True, False]
    assert [v.request_id for v in views if v is not None] == ["r-0", "r-2", "r-5"]
    chunk, skipped = _poll(values)
    assert skipped.counts == {("comparisons", "undecodable"): 3}
    assert chunk.comparisons.ids == ["r-0", "r-2", "r-5"]
    assert chunk.offsets == {"c": (10, 16)}


def test_a_poll_of_good_records_is_decoded_as_record_by_record() -> None:
    values: list[bytes | None] = [ENC.encode(valid_comparison(i)) for i in range(5)]
    assert decode_comparisons(values) == [decode_comparisons([v])[0] for v in values]


def test_arms_without_scores_or_decisions_are_columns_of_nan_and_minus_one() -> None:
    """Scores and decisions are read a column at a time; an arm with none (null or absent)
    is NaN / -1 in them, the others as they were (decisions 0/1)."""
    docs = [valid_comparison(i) for i in range(4)]
    docs[1]["champion"]["score"] = None
    del docs[2]["candidate"]["decision"]
    docs[3]["candidate"]["decision"] = None
    chunk, skipped = _poll([ENC.encode(d) for d in docs])
    assert skipped.counts == {}
    c = comparison_arrays(chunk.comparisons)
    assert np.isnan(c["champion"]).tolist() == [False, True, False, False]
    assert c["candidate"].tolist() == [0.7] * 4
    assert c["champion_decision"].tolist() == [0, 0, 0, 0]
    assert c["candidate_decision"].tolist() == [1, 1, -1, -1]
    assert c["ts"].tolist() == [d["ts"] for d in docs]


def test_a_comparison_dated_ahead_among_good_ones_is_the_only_one_skipped() -> None:
    docs = [valid_comparison(i) for i in range(4)]
    docs[2]["ts"] = NOW + SETTINGS.max_future_ms + 1
    chunk, skipped = _poll([ENC.encode(d) for d in docs])
    assert skipped.counts == {("comparisons", "future"): 1}
    assert chunk.comparisons.ids == ["r-0", "r-1", "r-3"]
    assert comparison_arrays(chunk.comparisons)["ts"].tolist() == [docs[i]["ts"] for i in (0, 1, 3)]
    assert chunk.stream_ms == docs[3]["ts"]


def test_comparisons_and_outcomes_dated_in_seconds_are_skipped_as_implausible() -> None:
    """A ``ts`` in seconds reads as January 1970 in milliseconds: such a comparison would
    open a window of 1970 that turns final at once (a report and a verdict about nothing)."""
    docs = [valid_comparison(i) for i in range(4)]
    docs[1]["ts"] = docs[1]["ts"] // 1000
    chunk, skipped = _poll([ENC.encode(d) for d in docs])
    assert skipped.counts == {("comparisons", "implausible_time"): 1}
    assert chunk.comparisons.ids == ["r-0", "r-2", "r-3"]
    late = dict(valid_outcome(7), ts=valid_outcome(7)["ts"] // 1000)
    records = [Rec(ENC.encode(valid_outcome(6))), Rec(ENC.encode(late), offset=1)]
    skipped = Skipped()
    ((chunk, _),) = ChunkBuilder(SETTINGS).build(0, [], records, NOW, skipped)
    assert skipped.counts == {("outcomes", "implausible_time"): 1}
    assert chunk.outcomes.ids == ["r-6"]


def test_comparisons_of_several_rollout_pairs_name_their_pair() -> None:
    docs = [valid_comparison(i) for i in range(4)]
    docs[1]["candidate"]["version"] = "3.0.0"
    docs[3]["rollout"] = "other"
    chunk, _ = _poll([ENC.encode(d) for d in docs])
    keys = [(p.rollout, p.candidate_version) for p in chunk.pairs]
    assert keys == [("fraud-v2", "2.0.0"), ("fraud-v2", "3.0.0"), ("other", "2.0.0")]
    assert comparison_arrays(chunk.comparisons)["pair"].tolist() == [0, 1, 0, 2]


def test_a_poll_too_big_for_one_record_together_is_one_chunk_per_input() -> None:
    """A poll's comparisons and outcomes go in one chunk; when that is too big but each
    input fits alone, they are its two chunks (built once: skipped records counted once)."""
    comparisons = [ENC.encode(valid_comparison(i)) for i in range(40)] + [b"{"]
    outcomes = [ENC.encode(valid_outcome(i)) for i in range(40)]
    c_recs = [Rec(v, offset=i) for i, v in enumerate(comparisons)]
    o_recs = [Rec(v, offset=i) for i, v in enumerate(outcomes)]
    skipped = Skipped()
    ((one, raw),) = ChunkBuilder(SETTINGS).build(0, c_recs, o_recs, NOW, skipped)
    assert skipped.counts == {("comparisons", "undecodable"): 1}
    limit = len(raw) - 1
    skipped = Skipped()
    chunks = ChunkBuilder(SETTINGS).build(0, c_recs, o_recs, NOW, skipped, max_bytes=limit)
    assert skipped.counts == {("comparisons", "undecodable"): 1}
    assert [c.offsets for c, _ in chunks] == [{"c": (0, 41)}, {"o": (0, 40)}]
    assert all(len(r) <= limit and decode(r) == c for c, r in chunks)
    assert chunks[0][0].comparisons == one.comparisons
    assert chunks[1][0].outcomes == one.outcomes


# -- numbers out of range, outcomes dated in seconds, made-up rollout names ----------------


def test_an_outcome_value_near_the_float_maximum_is_refused_with_its_reason() -> None:
    """1.7e308 is valid JSON and a finite float: accepted, its cost (and the cost's square)
    overflowed to inf in the window's accumulator, and from there into the rollout's verdict,
    for good."""
    got = decode_outcome(ENC.encode({**valid_outcome(1), "value": 1.7e308}))
    assert isinstance(got, tuple) and got[0] == "schema" and "value" in got[1]
    top = decode_outcome(ENC.encode({**valid_outcome(1), "value": MAX_VALUE}))
    assert isinstance(top, Outcome) and top.value == MAX_VALUE


def test_one_huge_outcome_value_leaves_good_traffic_cost_figures_finite(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "t", cost_value="both")
    feed.comparisons(*(comparison(f"r{i}", 1000 + i) for i in range(20)))
    good = [outcome(f"r{i}", i % 2 == 0, 2000, value=10.0) for i in range(19)]
    feed.outcomes(*good, outcome("r19", True, 2000, value=1.7e308))
    report = feed.task.report(feed.pair, 0, "provisional", 0)
    assert report.champion.mean_cost.ok and report.diff.cost.ok
    assert report.counts.labelled == 19


@pytest.mark.parametrize(
    ("outcome_ts", "counts"),
    [
        (1_700_000_000, False),  # the same moment in seconds: decades before the request
        (0, False),
        (1_700_000_000_000 - MAX_OUTCOME_LEAD_MS - 1, False),
        (1_700_000_000_000 - 1_000, True),  # a second early: two clocks disagreeing
        (1_700_000_000_000 + 1_000, True),
    ],
)
def test_an_outcome_long_before_its_request_is_outside_its_window(
    tmp_path: Path, outcome_ts: int, counts: bool
) -> None:
    """The label window is *after* the request: an outcome dated decades earlier (a producer
    writing seconds) was joined and judged as the request's truth."""
    t = 1_700_000_000_000
    ws = t - t % W
    for order in ("comparison first", "outcome first"):
        feed = Feed(tmp_path / order.replace(" ", "-"))
        late = outcome("a", True, outcome_ts)
        if order == "outcome first":
            feed.outcomes(late)
        feed.comparisons(comparison("a", t))
        if order == "comparison first":
            feed.outcomes(late)
        c = feed.counts(ws)
        assert (c.labelled, c.outside_window) == ((1, 0) if counts else (0, 1)), order
        feed.task.store.close()


def test_made_up_rollout_names_cannot_grow_a_task_without_bound(tmp_path: Path) -> None:
    """Anyone who can write to the comparisons topic could name a new rollout (or version) in
    every record: each became a rollout pair for ever (memory, store, reports, metric
    labels), and every outcome was then looked up under every rollout (10,000 made-up
    rollouts: ~60 ms an outcome). Pairs beyond the limits are left out and counted; the real
    rollout's requests still count."""
    feed = Feed(tmp_path / "t")
    feed.comparisons(comparison("real-0", 1000))
    fakes = [
        comparison(f"x{i}", 1000, rollout=f"fake-{i % (MAX_ROLLOUTS + 5)}", cand=f"9.{i}")
        for i in range(MAX_PAIRS + 50)
    ]
    stats = feed.comparisons(*fakes)
    assert len(feed.task.pairs) <= MAX_PAIRS and len(feed.task.rollouts) <= MAX_ROLLOUTS
    assert stats.refused == MAX_PAIRS + 50 - (len(feed.task.pairs) - 1) > 0
    assert stats.refused_pair is not None and stats.refused_pair.rollout.startswith("fake-")
    # The real rollout still counts its requests and their outcomes, and a restart agrees.
    feed.comparisons(comparison("real-1", 1100), *fakes[-3:])
    feed.outcomes(outcome("real-0", True, 2000), outcome("real-1", False, 2000))
    feed.reopen()
    assert len(feed.task.pairs) <= MAX_PAIRS
    (real,) = (p for p in feed.task.pairs.values() if p.key.rollout == "ro")
    c = feed.task.report(real, 0, "provisional", 0).counts
    assert (c.requests, c.labelled, c.positives) == (2, 2, 1)


def test_a_record_dated_minutes_ahead_moves_stream_time_no_further_than_the_clock() -> None:
    """A comparison (or outcome) dated ahead but within ``max_future_ms`` is applied in its
    window, but its event time counts for stream time only up to the clock: one request whose
    ``ts`` its producer set 280 s ahead made windows final that early, so every comparison of
    those minutes was late (dropped) and held outcomes expired early."""
    docs = [valid_comparison(i) for i in range(3)]
    for d in docs:
        d["ts"] = NOW - 10_000 + d["ts"] % 1000
    docs[1]["ts"] = NOW + 280_000
    chunk, skipped = _poll([ENC.encode(d) for d in docs])
    assert skipped.counts == {}
    assert chunk.comparisons.ids == ["r-0", "r-1", "r-2"]  # applied, in its own window
    assert comparison_arrays(chunk.comparisons)["ts"].tolist()[1] == NOW + 280_000
    assert chunk.stream_ms == NOW
    ahead = {**valid_outcome(1), "ts": NOW + 200_000}
    ((out, _),) = ChunkBuilder(SETTINGS).build(0, [], [Rec(ENC.encode(ahead))], NOW, Skipped())
    assert out.outcomes.ids == ["r-1"] and out.stream_ms == NOW
    ((both, _),) = ChunkBuilder(SETTINGS).build(
        0, [Rec(ENC.encode(docs[1]))], [Rec(ENC.encode(ahead))], NOW, Skipped()
    )
    assert both.stream_ms == NOW and both.input_ms == {"c": NOW, "o": NOW}


class _ReservedFeed(Feed):
    task_options: ClassVar[dict[str, Any]] = {
        "configured": PairKey("ro", "m", "1.0.0", "m", "2.0.0"),
        "max_pairs": 8,
    }


def test_the_configured_pair_is_judged_after_a_flood_of_made_up_versions(tmp_path: Path) -> None:
    """Made-up versions of the configured rollout filled a task's pair slots, and the pair
    the config runs, coming after them (a new candidate deployed later), was left out until
    the made-up pairs retired (``retire_after_ms``, a week): no quality verdict, no quality
    guard, for that long. It is always taken now, after a restart too."""
    feed = _ReservedFeed(tmp_path / "t")
    fakes = [comparison(f"x{i}", 1000, cand=f"9.9.{i}") for i in range(20)]
    stats = feed.comparisons(*fakes)
    assert stats.refused == 20 - 8 and len(feed.task.pairs) == 8
    stats = feed.comparisons(comparison("real-0", 1000), comparison("x-more", 1000, cand="9.8"))
    assert stats.refused == 1  # another made-up one: still refused
    feed.outcomes(outcome("real-0", True, 2000))
    feed.reopen()
    (real,) = (p for p in feed.task.pairs.values() if p.key.candidate_version == "2.0.0")
    c = feed.task.report(real, 0, "provisional", 0).counts
    assert (c.requests, c.labelled, c.positives) == (1, 1, 1)


def test_a_poll_spread_over_many_windows_is_split_into_chunks_of_few_windows() -> None:
    """A task applies a chunk in one atomic batch that holds every window it touches (~100 kB
    of accumulator each, twice over with the delta): 3,072 forged comparisons over 1,024 pairs
    and 3 windows took the stage from 115 MB to 1.29 GB (and more windows, more: an OOM kill,
    then the same chunk again at restart). Chunks now touch at most MAX_CHUNK_WINDOWS."""
    docs = []
    for i in range(300):
        for k in range(3):
            d = valid_comparison(i * 3 + k)
            d["candidate"]["version"] = f"9.9.{i}"
            d["ts"] = NOW - k * SETTINGS.report_window_ms - 1
            docs.append(d)
    skipped = Skipped()
    recs = [Rec(ENC.encode(d), offset=i) for i, d in enumerate(docs)]
    built = ChunkBuilder(SETTINGS).build(0, recs, [], NOW, skipped)
    assert len(built) > 1
    rows, last = 0, 0
    for chunk, raw in built:
        assert decode(raw) == chunk
        first, end = chunk.offsets["c"]
        assert first == last  # contiguous, in order
        last = end
        cols = comparison_arrays(chunk.comparisons)
        ws = cols["ts"] - cols["ts"] % SETTINGS.report_window_ms
        assert len(set(zip(cols["pair"].tolist(), ws.tolist(), strict=True))) <= MAX_CHUNK_WINDOWS
        rows += len(chunk.comparisons.ids)
    assert rows == len(docs) and last == len(docs)
    # The usual poll (one pair, a window or two) stays one chunk, outcomes and all.
    usual = [Rec(ENC.encode(valid_comparison(i)), offset=i) for i in range(2000)]
    outs = [Rec(ENC.encode(valid_outcome(i)), offset=i) for i in range(2000)]
    assert len(ChunkBuilder(SETTINGS).build(0, usual, outs, NOW, Skipped())) == 1
