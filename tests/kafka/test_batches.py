"""The C record batch builder (sidecar/kafka/_batches.c) against aiokafka's own builder and
reader: the same bytes for the same records, the same place a full batch stops, a CRC-32C
equal to aiokafka's, and clear errors for what it cannot encode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from aiokafka.record._crecords.cutil import crc32c_cython
from aiokafka.record._crecords.default_records import (
    DefaultRecordBatch,
    DefaultRecordBatchBuilder,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.kafka.records import Record

_batches = pytest.importorskip("sidecar.kafka._batches")

TS = 1_700_000_000_123

field = st.one_of(st.none(), st.binary(max_size=300))
header = st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=40)))
record = st.tuples(field, field, st.lists(header, max_size=4))


def aiokafka_batch(records: list, max_bytes: int = 1 << 30, ts: int = TS) -> tuple[bytes, int]:
    """What aiokafka's producer (``BatchBuilder``: magic 2, no compression, no producer id)
    writes for ``records``, and how many it took."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, 0, max_bytes)
    taken = 0
    for offset, (key, value, headers) in enumerate(records):
        if builder.append(offset, ts, key, value, headers) is None:
            break
        taken += 1
    return bytes(builder.build()), taken


def columns(records: list) -> tuple[list, list, list]:
    return [r[0] for r in records], [r[1] for r in records], [r[2] for r in records]


@settings(max_examples=300, deadline=None)
@given(st.lists(record, min_size=1, max_size=30))
def test_same_bytes_as_aiokafka(records: list) -> None:
    keys, values, headers = columns(records)
    ours, end = _batches.build(keys, values, headers, None, 0, TS, 1 << 30)
    theirs, taken = aiokafka_batch(records)
    assert end == taken == len(records)
    assert ours == theirs


@settings(max_examples=200, deadline=None)
@given(st.lists(record, min_size=1, max_size=30), st.integers(min_value=0, max_value=4000))
def test_a_full_batch_stops_where_aiokafkas_does(records: list, max_bytes: int) -> None:
    keys, values, headers = columns(records)
    ours, end = _batches.build(keys, values, headers, None, 0, TS, max_bytes)
    theirs, taken = aiokafka_batch(records, max_bytes)
    assert end == taken >= 1  # the first record always goes in
    assert ours == theirs


@settings(max_examples=100, deadline=None)
@given(st.lists(record, min_size=1, max_size=20), st.data())
def test_indices_pick_and_order_the_records(records: list, data: st.DataObject) -> None:
    picks = data.draw(st.lists(st.integers(0, len(records) - 1), min_size=1, max_size=20))
    start = data.draw(st.integers(0, len(picks) - 1))
    keys, values, headers = columns(records)
    ours, end = _batches.build(keys, values, headers, picks, start, TS, 1 << 30)
    theirs, taken = aiokafka_batch([records[i] for i in picks[start:]])
    assert end == len(picks) and taken == len(picks) - start
    assert ours == theirs


def test_aiokafka_reads_the_batch_back_and_its_crc_holds() -> None:
    keys = [b"k", None, b"key-3"]
    values = [b"v" * 500, b"", None]
    headers = [[("trace", b"t1"), ("empty", None)], [], [("\u00e9t\u00e9", b"\x00\xff")]]
    data, end = _batches.build(keys, values, headers, None, 0, TS, 1 << 20)
    assert end == 3
    batch = DefaultRecordBatch(bytearray(data))
    assert batch.validate_crc()
    got = [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch]
    assert got == [
        (0, TS, b"k", b"v" * 500, [("trace", b"t1"), ("empty", None)]),
        (1, TS, None, b"", []),
        (2, TS, b"key-3", None, [("\u00e9t\u00e9", b"\x00\xff")]),
    ]


def test_the_reader_checks_the_crc_and_finds_batches_inside_a_larger_buffer() -> None:
    data, _ = _batches.build([b"k"], [b"value"], [[]], None, 0, TS, 1 << 20)
    fetched = b"xx" + data + data  # as fetched: batches back to back
    kind, records, next_pos, next_offset, error = _batches.read(fetched, 2, 0, "t", 0, Record, True)
    assert (kind, next_pos, next_offset, error) == (_batches.RECORDS, 2 + len(data), 1, None)
    assert [(r.offset, r.key, r.value) for r in records] == [(0, b"k", b"value")]
    broken = bytearray(fetched)
    broken[2 + len(data) - 2] ^= 0x01  # the first batch's value's last byte ("e" -> "d")
    kind, records, _, next_offset, error = _batches.read(bytes(broken), 2, 0, "t", 0, Record, True)
    assert (kind, records, next_offset) == (_batches.CORRUPT, [], 1)
    assert "CRC does not match" in str(error)
    # Without the check the changed value is read as it stands.
    kind, records, *_ = _batches.read(bytes(broken), 2, 0, "t", 0, Record, False)
    assert kind == _batches.RECORDS and records[0].value == b"valud"
    # A fetch that ends inside a batch: nothing more to read until the next fetch.
    assert _batches.read(fetched[:-3], 2 + len(data), 0, "t", 0, Record, True)[0] == _batches.END


def test_idempotent_producer_state_matches_aiokafka() -> None:
    records = [(b"k", b"v1", []), (None, b"v2", [("h", b"x")])]
    data, _ = _batches.build(*columns(records), None, 0, TS, 1 << 20)
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, 0, 1 << 20)
    for offset, (key, value, headers) in enumerate(records):
        builder.append(offset, TS, key, value, headers)
    builder.set_producer_state(4242, 7, 99)
    assert _batches.set_producer(data, 4242, 7, 99) == bytes(builder.build())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1))
def test_crc32c_equals_aiokafkas(data: bytes, seed: int) -> None:
    assert _batches.crc32c(data) == crc32c_cython(data)
    # Continuing a CRC over a split buffer gives the CRC of the whole.
    cut = seed % (len(data) + 1)
    assert _batches.crc32c(data[cut:], _batches.crc32c(data[:cut])) == crc32c_cython(data)


def test_crc32c_known_value_and_the_software_path() -> None:
    assert _batches.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    # The table-driven path (CPUs without SSE 4.2) gives the same values, at any alignment.
    fixed = "bytes(range(256)) * 391 + b'abc'"
    code = (
        f"from sidecar.kafka import _batches as b; d = {fixed};"
        "print(b.hardware_crc(), b.crc32c(b'123456789'), b.crc32c(d), b.crc32c(d[7:]))"
    )
    env = dict(os.environ, SIDECAR_CRC32C_SOFTWARE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    data = bytes(range(256)) * 391 + b"abc"
    expected = [str(0xE3069283), str(crc32c_cython(data)), str(crc32c_cython(data[7:]))]
    assert out == ["False", *expected]


@pytest.mark.parametrize(
    ("keys", "values", "headers", "message"),
    [
        ([bytearray(b"k")], [b"v"], [[]], "record 0: key must be bytes or None, not bytearray"),
        ([b"k"], ["text"], [[]], "record 0: value must be bytes or None, not str"),
        ([b"k"], [b"v"], [[("h", "text")]], "header value must be bytes or None"),
        ([b"k"], [b"v"], [[(b"h", b"x")]], r"header 0 must be a \(str, bytes \| None\) tuple"),
        ([b"k"], [b"v"], [{"h": b"x"}], "headers must be a list or tuple"),
    ],
)
def test_what_it_cannot_encode_is_a_clear_type_error(
    keys: list, values: list, headers: list, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        _batches.build(keys, values, headers, None, 0, TS, 1 << 20)


def test_bad_positions_are_refused() -> None:
    cols = ([b"k"], [b"v"], [[]])
    with pytest.raises(IndexError, match="index 3 out of range for 1 records"):
        _batches.build(*cols, [0, 3], 0, TS, 1 << 20)
    with pytest.raises(ValueError, match="start 1 out of range"):
        _batches.build(*cols, None, 1, TS, 1 << 20)
    with pytest.raises(ValueError, match="differ in length"):
        _batches.build([b"k", b"k"], [b"v"], [[]], None, 0, TS, 1 << 20)
