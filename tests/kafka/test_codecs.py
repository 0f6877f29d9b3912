"""Bounded decompression: batches of every codec inflate as aiokafka's decoders inflate them;
a batch that would inflate past the bound is refused before it is inflated."""

from __future__ import annotations

import random

import pytest
from aiokafka import codec

import sidecar.kafka  # noqa: F401  (installs the decoders)
from sidecar.kafka import codecs
from sidecar.kafka.codecs import InflateRefused

ENCODERS = {
    "gzip": codec.gzip_encode,
    "snappy": lambda data: codec.snappy_encode(data, xerial_compatible=False),
    "snappy-xerial": lambda data: codec.snappy_encode(data, xerial_compatible=True),
    "lz4": codec.lz4_encode,
    "zstd": codec.zstd_encode,
}
DECODERS = {
    "gzip": codecs.gzip_decode,
    "snappy": codecs.snappy_decode,
    "snappy-xerial": codecs.snappy_decode,
    "lz4": codecs.lz4_decode,
    "zstd": codecs.zstd_decode,
}
BOUNDS = {
    "snappy": codecs.snappy_bound,
    "snappy-xerial": codecs.snappy_bound,
    "lz4": codecs.lz4_bound,
    "zstd": codecs.zstd_bound,
}


def _records_like(n: int, seed: int) -> bytes:
    """JSON-ish bytes that compress as record batches do."""
    rng = random.Random(seed)
    return b"".join(
        b'{"request_id": "r-%d", "amount": %d, "country": "%s"}'
        % (i, rng.randrange(10**6), rng.choice([b"NL", b"DE", b"FR"]))
        for i in range(n)
    )


# (An empty xerial snappy stream is left out: aiokafka's own decoder cannot read one, and no
# producer writes one.)
@pytest.mark.parametrize(
    ("name", "size"),
    [
        (name, size)
        for name in ENCODERS
        for size in (0, 1, 1_000, 300_000)
        if (name, size) != ("snappy-xerial", 0)
    ],
)
def test_every_codec_inflates_what_it_deflated(name: str, size: int) -> None:
    data = _records_like(max(1, size // 50), seed=size) if size else b""
    packed = bytes(ENCODERS[name](data))
    assert DECODERS[name](packed) == data
    if name in BOUNDS:
        assert len(data) <= BOUNDS[name](packed) <= max(len(data), 1) * 3 + (256 << 10)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_bomb_is_refused_before_it_is_inflated(name: str) -> None:
    bomb = bytes(ENCODERS[name](bytes(codecs.MAX_INFLATED_BYTES + (1 << 20))))
    assert len(bomb) < codecs.MAX_INFLATED_BYTES // 10  # it is one: small, inflating past 64 MiB
    with pytest.raises(InflateRefused, match="refused unread"):
        DECODERS[name](bomb)
    if name in BOUNDS:  # bounded from the headers alone
        assert BOUNDS[name](bomb) > codecs.MAX_INFLATED_BYTES


def test_gzip_members_are_inflated_in_turn_within_one_bound() -> None:
    part = codec.gzip_encode(b"x" * 1000)
    assert codecs.gzip_decode(part + part) == b"x" * 2000
    with pytest.raises(InflateRefused, match="refused unread"):
        codecs.gzip_decode(part + part, limit=1500)


@pytest.mark.parametrize("name", ["lz4", "zstd", "snappy-xerial", "gzip"])
def test_a_truncated_or_foreign_frame_is_refused_with_a_reason(name: str) -> None:
    packed = bytes(ENCODERS[name](_records_like(2000, seed=1)))
    for broken in (packed[: len(packed) // 2], b"not compressed at all"):
        with pytest.raises(Exception) as caught:
            DECODERS[name](broken)
        assert str(caught.value)


def test_the_readers_of_aiokafka_use_the_bounded_decoders() -> None:
    from aiokafka.record import default_records, legacy_records

    assert default_records.zstd_decode is codecs.zstd_decode
    assert legacy_records.gzip_decode is codecs.gzip_decode
    try:
        from aiokafka.record._crecords import default_records as compiled
    except ImportError:
        pytest.skip("aiokafka without its compiled readers")
    assert compiled.lz4_decode is codecs.lz4_decode
    assert compiled.snappy_decode is codecs.snappy_decode


def test_a_zstd_frame_asking_for_a_window_past_the_bound_is_refused() -> None:
    """The decoder allocates the window a frame asks for, whatever the frame holds: a frame
    written with a window descriptor of 128 MiB (windowLog 27) is refused unread."""
    packed = codec.zstd_encode(_records_like(2000, seed=2))
    fhd = packed[4]
    single, fcs_flag = (fhd >> 5) & 1, fhd >> 6
    fcs = (0, 2, 4, 8)[fcs_flag] or single
    blocks = packed[5 + (0 if single else 1) + fcs :]
    windowed = packed[:4] + bytes([fhd & 0x07, (27 - 10) << 3]) + blocks  # no content size
    with pytest.raises(InflateRefused, match="refused unread"):
        codecs.zstd_decode(windowed)
    modest = packed[:4] + bytes([fhd & 0x07, (20 - 10) << 3]) + blocks  # a 1 MiB window
    assert codecs.zstd_decode(modest) == _records_like(2000, seed=2)
