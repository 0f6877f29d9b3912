"""Reading fetched records a batch at a time (sidecar.kafka.records) against aiokafka's own
record-at-a-time path, on record sets built in memory (no broker): with the C reader
(sidecar.kafka._batches, over the fetched bytes) and with aiokafka's batch reader."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import (
    DefaultRecordBatchBuilder,
    _DefaultRecordBatchBuilderPy,
)
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

import sidecar.kafka  # noqa: F401  (installs the patches)
from sidecar.kafka import records as fast
from sidecar.kafka.records import Record
from sidecar.kafka.unreadable import unreadable_of

TP = TopicPartition("requests", 3)


class RawKey(str):
    """A header key whose bytes are not UTF-8 (aiokafka raises parsing it)."""

    def encode(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
        return b"\xff\xfe"


def batch(
    base: int,
    n: int,
    *,
    headers: dict[int, list[tuple[Any, bytes]]] | None = None,
    control: bool = False,
    corrupt: bool = False,
    codec: int = 0,
    log_append_time: bool = False,
) -> bytes:
    """One v2 record batch of ``n`` records at offsets ``base``..``base + n - 1``."""
    headers = headers or {}
    raw = any(isinstance(k, RawKey) for hs in headers.values() for k, _ in hs)
    builder_type: Any = _DefaultRecordBatchBuilderPy if raw else DefaultRecordBatchBuilder
    builder = builder_type(2, codec, 0, -1, -1, 0, 1 << 22)
    for i in range(n):
        builder.append(
            i,
            1_700_000_000_000 + i,
            b"k%d" % (base + i),
            b"v%d" % (base + i),
            headers.get(base + i, []),
        )
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, base)
    if control or log_append_time:  # attributes (int16 at byte 21), covered by the CRC:
        # bit 5 = control batch, bit 3 = LogAppendTime (every record has the max timestamp)
        attrs = struct.unpack_from(">h", buf, 21)[0] | (0x20 if control else 0x08)
        struct.pack_into(">h", buf, 21, attrs)
        struct.pack_into(">q", buf, 35, 1_800_000_000_000)
        from aiokafka.record.util import calc_crc32c

        struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    if corrupt:
        buf[-1] ^= 0xFF
    return bytes(buf)


#: The record set types the fetcher may hand over: ours keeps the bytes (the C reader parses
#: them), aiokafka's does not (its batch reader is used).
READERS = {"c": fast.FetchedRecords, "aiokafka": MemoryRecords}
if fast._batches is None:  # not compiled here
    del READERS["c"]


@pytest.fixture(params=list(READERS))
def reader(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def partition_records(data: bytes, fetch_offset: int, reader: str = "c", **kwargs: Any) -> Any:
    settings: dict[str, Any] = {
        "key_deserializer": None,
        "value_deserializer": None,
        "check_crcs": True,
        "isolation_level": fetcher.READ_UNCOMMITTED,
    }
    settings.update(kwargs)
    records = READERS.get(reader, MemoryRecords)(data)
    fetched = fetcher.PartitionRecords(
        TP,
        records,
        None,
        fetch_offset,
        settings["key_deserializer"],
        settings["value_deserializer"],
        settings["check_crcs"],
        settings["isolation_level"],
    )
    assert (fetched._sc_raw is not None) == (reader == "c" and fetched._sc_fast)
    return fetched


def slow_read(data: bytes, fetch_offset: int) -> tuple[list[tuple[Any, ...]], int]:
    """aiokafka's path (forced by a no-op deserializer): records and the final position."""
    records = partition_records(data, fetch_offset, "aiokafka", value_deserializer=lambda v: v)
    assert not records._sc_fast
    got = [shape(r) for r in records]
    return got, records.next_fetch_offset


def shape(r: Any) -> tuple[Any, ...]:
    marker = unreadable_of(r)
    if marker is not None:
        return ("unreadable", r.offset, marker.first, marker.last)
    return (r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, tuple(r.headers))


def take_all(records: Any, max_records: int | None) -> list[Any]:
    out: list[Any] = []
    while True:
        got = fast._take(records, max_records)
        if max_records is not None:
            assert len(got) <= max_records
        if not got:
            return out
        out += got


DATA = {
    "plain": batch(0, 5) + batch(5, 3) + batch(8, 1),
    "headers": batch(10, 4, headers={11: [("traceparent", b"00-ab"), ("x", b"")]}),
    "control in between": batch(0, 3) + batch(3, 1, control=True) + batch(4, 2),
    "unreadable header key": batch(0, 2)
    + batch(2, 3, headers={3: [(RawKey("k"), b"v")]})
    + batch(5, 2),
    "bad crc": batch(0, 2) + batch(2, 3, corrupt=True) + batch(5, 2),
    "gzip": batch(0, 6, codec=1) + batch(6, 7, codec=1, headers={8: [("h", b"x")]}),
    # A fetch response may end inside a batch: the rest comes with the next fetch.
    "truncated": batch(0, 3) + batch(3, 4)[:-7],
    "log append time": batch(0, 2) + batch(2, 3, log_append_time=True),
    "gzip between plain": batch(0, 2) + batch(2, 3, codec=1) + batch(5, 2),
}


@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("fetch_offset", [0, 3, 11])
@pytest.mark.parametrize("max_records", [None, 1, 2, 1000])
def test_batch_reading_returns_what_aiokafka_returns(
    name: str, fetch_offset: int, max_records: int | None, reader: str
) -> None:
    data = DATA[name]
    expected, end = slow_read(data, fetch_offset)
    records = partition_records(data, fetch_offset, reader)
    assert records._sc_fast
    got = take_all(records, max_records)
    assert [shape(r) for r in got] == expected
    assert records.next_fetch_offset == end
    assert all(isinstance(r, Record) for r in got)


def test_a_bad_batch_keeps_the_records_before_the_bad_one_and_marks_the_rest(
    reader: str,
) -> None:
    records = partition_records(DATA["unreadable header key"], 0, reader)
    got = take_all(records, None)
    assert [r.offset for r in got] == [0, 1, 2, 4, 5, 6]
    marker = unreadable_of(got[3])
    assert marker is not None and (marker.first, marker.last) == (3, 4)
    assert "UnicodeDecodeError" in marker.error


@pytest.mark.skipif(fast._batches is None, reason="the C reader is not compiled here")
@settings(max_examples=400, deadline=None)
@given(st.data())
def test_hostile_bytes_never_crash_the_c_reader(data: st.DataObject) -> None:
    """Whatever the fetched bytes (CRC checks off, so the parser sees them all), the C
    reader returns records and markers or raises CorruptRecordException (a batch whose
    offsets make no sense, as aiokafka's path does): never a crash, never a record the
    bytes do not hold."""
    raw = bytearray(DATA[data.draw(st.sampled_from(["plain", "headers", "log append time"]))])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    records = partition_records(bytes(raw), 0, "c", check_crcs=False)
    try:
        got = take_all(records, data.draw(st.sampled_from([None, 1, 3])))
    except CorruptRecordException:
        return
    except Exception as exc:  # a batch made "compressed" goes to aiokafka, which may raise
        assert not isinstance(exc, SystemError | TypeError | ValueError | IndexError)
        return
    for r in got:
        if unreadable_of(r) is None:
            assert r.key is None or r.key in raw
            assert r.value is None or r.value in raw


def test_one_at_a_time_and_batches_mix(reader: str) -> None:
    records = partition_records(DATA["plain"], 2, reader)
    first = next(records)
    assert first.offset == 2 and records.next_fetch_offset == 3
    rest = take_all(records, 4)
    assert [r.offset for r in rest] == [3, 4, 5, 6, 7, 8]
    assert records.next_fetch_offset == 9
    with pytest.raises(StopIteration):
        next(records)


def test_records_look_like_consumer_records(reader: str) -> None:
    data = batch(7, 1, headers={7: [("h", b"1")]})
    (r,) = take_all(partition_records(data, 0, reader), None)
    assert (r.topic, r.partition, r.offset, r.key, r.value) == ("requests", 3, 7, b"k7", b"v7")
    assert r.headers == (("h", b"1"),)
    assert (r.serialized_key_size, r.serialized_value_size, r.checksum) == (2, 2, None)
    assert r.timestamp == 1_700_000_000_000 and r.timestamp_type == 0


def test_aiokafka_shapes_are_the_known_ones() -> None:
    # Fails loudly here (not only as a warning at run time) when aiokafka changes.
    assert fast._shapes_ok() is None
    assert fast._installed


class CapturingProducer:
    """aiokafka's real ``BatchBuilder`` behind ``create_batch``; ``send_batch`` keeps the
    built batches instead of sending them (what BatchSender puts into them is under test)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.sent: list[tuple[str, int, Any]] = []

    def create_batch(self) -> Any:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(self.batch_size, 0)

    async def send_batch(self, builder: Any, topic: str, *, partition: int) -> Any:
        self.sent.append((topic, partition, builder))
        import asyncio

        return asyncio.get_running_loop().create_future()


@pytest.mark.parametrize("mode", ["prebuilt", "raw", "public"])
@pytest.mark.parametrize("batch_size", [1 << 20, 300])
async def test_batch_sender_writes_every_record_in_order_with_its_headers(
    batch_size: int, mode: str
) -> None:
    from sidecar.kafka import BatchSender
    from sidecar.pipeline import TopicOutput

    out = TopicOutput()
    for i in range(40):
        out.keys.append(b"key-%d" % (i % 7))
        out.values.append(b"value-%d" % i * (1 + i % 5))
        out.headers.append(
            [("schema_version", b"1")] + ([("traceparent", b"00-x")] if i % 3 else [])
        )
    producer = CapturingProducer(batch_size)
    if mode == "prebuilt" and fast._batches is None:
        pytest.skip("the C batch builder is not compiled here")
    sender = BatchSender(
        producer,  # type: ignore[arg-type]
        {"decisions": 4},
        raw_append=mode == "raw",
        prebuilt_batch_bytes=batch_size if mode == "prebuilt" else None,
    )
    deliveries = await sender.send("decisions", out)
    assert len(deliveries) == len(producer.sent)
    if batch_size < 1000:
        assert len(producer.sent) > 4  # full batches were split
    seen: dict[int, list[int]] = {}
    for delivery, (topic, partition, builder) in zip(deliveries, producer.sent, strict=True):
        assert (topic, partition) == ("decisions", delivery.partition)
        assert builder.record_count() == len(delivery.indices) > 0
        assert type(builder).__name__ == ("PrebuiltBatch" if mode == "prebuilt" else "BatchBuilder")
        data = bytes(builder._build())
        assert delivery.size == len(data) and (
            len(data) <= batch_size or len(delivery.indices) == 1
        )
        parsed = list(MemoryRecords(data).next_batch())
        assert [r.offset for r in parsed] == list(range(len(parsed)))
        for i, r in zip(delivery.indices, parsed, strict=True):
            assert (r.key, r.value, r.headers) == (out.keys[i], out.values[i], out.headers[i])
            assert r.timestamp > 1_700_000_000_000
        seen.setdefault(partition, []).extend(delivery.indices)
    # Every record once, each partition's in output order, each key on one partition.
    assert sorted(i for p in seen.values() for i in p) == list(range(40))
    for indices in seen.values():
        assert indices == sorted(indices)
    assert len({(out.keys[i], p) for p, ix in seen.items() for i in ix}) == 7


def test_the_start_up_log_says_which_record_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from sidecar.kafka import record_batch_path

    if fast._batches is not None:
        assert "built and read in C" in str(record_batch_path())
    # As if not compiled: the import fails.
    monkeypatch.setitem(sys.modules, "sidecar.kafka._batches", None)
    monkeypatch.delattr(sidecar.kafka, "_batches", raising=False)
    assert record_batch_path() is None
