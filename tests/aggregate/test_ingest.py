"""Decoding a poll of comparison records: the interning decoder and its fallbacks."""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np
from agg_support import comparisons
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.aggregate.batch import ComparisonView, comparison_batch
from sidecar.aggregate.ingest import MAX_INTERNED, ComparisonDecoder, Poll, decode_columns, ingest
from sidecar.contracts import Comparison

PLAIN = msgspec.json.Decoder(ComparisonView)


class Rec(NamedTuple):
    partition: int
    offset: int
    value: bytes | None


def encoded(comps: list[Comparison]) -> list[bytes]:
    return [msgspec.json.encode(c) for c in comps]


def with_version(comps: list[Comparison], version: str) -> list[Comparison]:
    return [
        msgspec.structs.replace(c, candidate=msgspec.structs.replace(c.candidate, version=version))
        for c in comps
    ]


def assert_same_columns(values: list[bytes], decoder: ComparisonDecoder) -> None:
    """Decoding with ``decoder`` gives the columns of plain one-by-one decoding."""
    comps, bad = decoder.decode(values)
    assert bad == []
    want = comparison_batch([PLAIN.decode(v) for v in values], 0, np.arange(len(values)))
    got = comparison_batch(comps, 0, np.arange(len(values)))
    assert got.keys == want.keys
    for name in ("key_code", "ts", "request_hash", "served_by"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    for arm in ("champion", "candidate"):
        g, w = getattr(got, arm), getattr(want, arm)
        assert np.array_equal(g.score, w.score, equal_nan=True)
        assert np.array_equal(g.decision, w.decision)
        assert np.array_equal(g.latency_ms, w.latency_ms, equal_nan=True)
        assert np.array_equal(g.error, w.error)


def test_group_key_strings_are_interned_after_the_first_poll() -> None:
    rng = np.random.default_rng(0)
    values = encoded(comparisons(rng, 50))
    decoder = ComparisonDecoder()
    first, _ = decoder.decode(values)  # learns the names
    assert first[0].rollout is not first[1].rollout
    second, _ = decoder.decode(values)
    assert all(c.rollout is second[0].rollout for c in second)
    assert all(c.candidate.version is second[0].candidate.version for c in second)
    assert_same_columns(values, decoder)


def test_a_new_version_mid_stream_is_learned_and_decoded_right() -> None:
    rng = np.random.default_rng(1)
    decoder = ComparisonDecoder()
    decoder.decode(encoded(comparisons(rng, 20)))
    promoted = encoded(with_version(comparisons(rng, 20), "3.0.0"))
    mixed = encoded(comparisons(rng, 10)) + promoted
    comps, bad = decoder.decode(mixed)
    assert bad == [] and [c.candidate.version for c in comps[-3:]] == ["3.0.0"] * 3
    assert_same_columns(mixed, decoder)
    again, _ = decoder.decode(promoted)
    assert again[0].candidate.version is again[1].candidate.version == "3.0.0"


def test_past_the_cap_names_restart_and_decoding_stays_right() -> None:
    rng = np.random.default_rng(2)
    decoder = ComparisonDecoder()
    for i in range(MAX_INTERNED + 5):
        values = encoded(comparisons(rng, 3, rollout=f"rollout-{i}"))
        assert_same_columns(values, decoder)
        assert decoder.interned <= MAX_INTERNED + 4  # rollouts capped; 1 model, 2 versions, 1 mode
    many = [encoded(comparisons(rng, 1, rollout=f"r{i}"))[0] for i in range(MAX_INTERNED + 1)]
    assert_same_columns(many, decoder)  # more names in one poll than the cap: plain str
    assert decoder.interned <= 3 * MAX_INTERNED


def test_escaped_and_raw_unicode_names_decode_alike() -> None:
    rng = np.random.default_rng(3)
    raw = encoded(comparisons(rng, 2, rollout="fraud-é"))
    escaped = [v.replace("é".encode(), b"\\u00e9") for v in raw]
    decoder = ComparisonDecoder()
    comps, bad = decoder.decode(raw + escaped)
    assert bad == [] and {c.rollout for c in comps} == {"fraud-é"}
    comps, bad = decoder.decode(escaped + raw)
    assert bad == [] and all(c.rollout is comps[0].rollout for c in comps)


def test_values_with_newlines_or_bad_records_fall_back_to_one_by_one() -> None:
    rng = np.random.default_rng(4)
    comps = comparisons(rng, 4)
    pretty = msgspec.json.format(msgspec.json.encode(comps[1]), indent=2)
    assert b"\n" in pretty
    values: list[bytes | None] = [
        msgspec.json.encode(comps[0]),
        pretty,  # valid, but spans lines
        b"",  # empty: with a two-line value this would realign lines without the guard
        None,
        b"not json",
        msgspec.json.encode(comps[2]),
    ]
    got, bad = ComparisonDecoder().decode(values)
    assert bad == [2, 3, 4]
    assert [c.request_id for c in got] == [comps[i].request_id for i in (0, 1, 2)]


def test_two_objects_in_one_value_never_shift_records_onto_other_offsets() -> None:
    # Lines would be [c0, c1, c2, "", c3]: as many decodable lines as values (blank lines
    # are skipped), so without the newline count the fast path would misalign them.
    rng = np.random.default_rng(8)
    c = encoded(comparisons(rng, 4))
    values = [c[0], c[1] + b"\n" + c[2], b"", c[3]]
    got, bad = ComparisonDecoder().decode(values)
    assert bad == [1, 2]
    assert [g.request_id for g in got] == [PLAIN.decode(c[i]).request_id for i in (0, 3)]


def test_ingest_keeps_records_and_positions_aligned_around_bad_ones() -> None:
    rng = np.random.default_rng(5)
    good = encoded(comparisons(rng, 4))
    recs = [
        Rec(1, 10, good[0]),
        Rec(1, 11, b"{"),
        Rec(2, 5, good[1]),
        Rec(2, 6, None),
        Rec(1, 12, good[2]),
        Rec(2, 7, good[3]),
    ]
    got = ingest(recs, ComparisonDecoder())
    assert got.undecodable == 2
    assert [(r.partition, r.offset) for r in got.records] == [(1, 10), (2, 5), (1, 12), (2, 7)]
    assert got.batch.partition.tolist() == [1, 2, 1, 2]
    assert got.batch.offset.tolist() == [10, 5, 12, 7]
    assert got.next_offsets == {1: 13, 2: 8}


def test_poll_split_and_decode_columns_match_ingest() -> None:
    rng = np.random.default_rng(6)
    recs = [Rec(0, i, v) for i, v in enumerate(encoded(comparisons(rng, 30)))]
    poll = Poll.of(recs)
    split = poll.ingested(decode_columns(poll.values, poll.partitions, poll.offsets))
    whole = ingest(recs)
    assert split.next_offsets == whole.next_offsets == {0: 30}
    assert np.array_equal(split.batch.request_hash, whole.batch.request_hash)
    assert ingest([]).next_offsets == {} and len(ingest([]).batch) == 0


names = st.sampled_from(["a", "b", "fraud-v2", "é", "x\ny", 'q"uote'])


@settings(max_examples=60, deadline=None)
@given(
    polls=st.lists(
        st.lists(st.tuples(names, names, names), min_size=1, max_size=12), min_size=1, max_size=5
    ),
)
def test_interning_never_changes_what_is_decoded(polls: list[list[tuple[str, str, str]]]) -> None:
    rng = np.random.default_rng(7)
    decoder = ComparisonDecoder()
    for poll in polls:
        comps = []
        for rollout, model, version in poll:
            c = comparisons(rng, 1, rollout=rollout)[0]
            comps.append(
                msgspec.structs.replace(
                    c, champion=msgspec.structs.replace(c.champion, model=model, version=version)
                )
            )
        assert_same_columns(encoded(comps), decoder)
