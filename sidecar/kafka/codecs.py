"""Decompression with a bound: a compressed record batch that would inflate past
:data:`MAX_INFLATED_BYTES` is refused before it is inflated.

A fetch is bounded in compressed bytes only. zstd turns 10 MiB of zeros into 342 bytes (and
gzip a megabyte into a kilobyte), so one hostile record batch on an input topic could make a
process allocate gigabytes, be killed, restart, fetch the same batch and be killed again: the
partition would never move. aiokafka's decoders inflate whatever they are given; these
replace them in its record readers (:func:`install`). gzip is inflated with a cap; zstd, lz4
and snappy frames say enough about their blocks to bound the inflated size before any of it
is produced, and only then is aiokafka's decoder called. A refused batch raises
:class:`InflateRefused`, which the record reader turns into an ``unreadable`` dead letter
with the reason (:mod:`.records`), and the partition moves on.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

from aiokafka import codec as _codec

#: A legitimate batch inflates to what its producer batched: librdkafka and the Java client
#: cap batches at about a megabyte before compression by default. 64 MiB leaves room for
#: producers tuned for large batches and refuses bombs, which inflate hundreds to thousands
#: of times.
MAX_INFLATED_BYTES = 64 << 20


class InflateRefused(ValueError):
    """A compressed record batch would inflate past the bound, or its frame is malformed."""


def _refuse(codec: str, size: int, limit: int) -> InflateRefused:
    return InflateRefused(
        f"a {codec}-compressed record batch would inflate to more than {limit:,} bytes "
        f"(at least {size:,}): refused unread, as a decompression bomb would be; a producer "
        "batching that much must batch less"
    )


def gzip_decode(payload: Any, limit: int | None = None) -> bytes:
    """Inflate gzip members (one or more), at most ``limit`` bytes in all."""
    limit = MAX_INFLATED_BYTES if limit is None else limit
    data = bytes(payload)
    out: list[bytes] = []
    total = 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise InflateRefused(f"a gzip-compressed record batch does not inflate: {exc}") from exc
        total += len(chunk)
        if total > limit or inflater.unconsumed_tail:
            raise _refuse("gzip", total, limit)
        if not inflater.eof:
            raise InflateRefused("a gzip-compressed record batch ends mid-stream")
        out.append(chunk)
        data = inflater.unused_data
    return b"".join(out)


def _frame_start(data: bytes, pos: int, header: int, codec: str) -> tuple[int, int]:
    """The magic number of the frame at ``pos`` and, for a skippable frame (zstd and lz4
    share them), the position after it (else 0)."""
    if len(data) - pos < header:
        raise InflateRefused(f"a {codec}-compressed record batch ends inside a frame header")
    (magic,) = struct.unpack_from("<I", data, pos)
    if magic & 0xFFFFFFF0 == 0x184D2A50:
        return magic, pos + 8 + struct.unpack_from("<I", data, pos + 4)[0]
    return magic, 0


def zstd_bound(data: bytes) -> int:
    """An upper bound of what zstd frames ``data`` inflate to, from their block headers
    (RFC 8878): raw and RLE blocks say their size, a compressed block is at most 128 KiB."""
    total, pos, n = 0, 0, len(data)
    while pos < n:
        magic, skip = _frame_start(data, pos, 8, "zstd")
        if skip:
            pos = skip
            continue
        if magic != 0xFD2FB528:
            raise InflateRefused("a zstd-compressed record batch holds no zstd frame")
        fhd = data[pos + 4]
        single = (fhd >> 5) & 1
        if not single:  # the decoder allocates the window the frame asks for
            descriptor = data[pos + 5]
            base = 1 << (10 + (descriptor >> 3))
            if base + (base >> 3) * (descriptor & 7) > MAX_INFLATED_BYTES:
                raise _refuse("zstd", base, MAX_INFLATED_BYTES)
        fcs = (0, 2, 4, 8)[fhd >> 6] or single
        did = (0, 1, 2, 4)[fhd & 3]
        pos += 5 + (0 if single else 1) + did + fcs
        while True:
            if n - pos < 3:
                raise InflateRefused("a zstd-compressed record batch ends inside a block")
            header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise InflateRefused("a zstd-compressed record batch has a reserved block type")
            total += size if kind < 2 else 128 << 10
            pos += 3 + (1 if kind == 1 else size)
            if last:
                break
        pos += 4 if (fhd >> 2) & 1 else 0  # the content checksum
    return total


_LZ4_BLOCK_MAX = {4: 64 << 10, 5: 256 << 10, 6: 1 << 20, 7: 4 << 20}


def lz4_bound(data: bytes) -> int:
    """An upper bound of what LZ4 frames ``data`` inflate to, from their block headers: an
    uncompressed block says its size, a compressed one is at most the frame's block size."""
    total, pos, n = 0, 0, len(data)
    while pos < n:
        magic, skip = _frame_start(data, pos, 7, "lz4")
        if skip:
            pos = skip
            continue
        if magic != 0x184D2204:
            raise InflateRefused("an lz4-compressed record batch holds no lz4 frame")
        flg, bd = data[pos + 4], data[pos + 5]
        block_max = _LZ4_BLOCK_MAX.get((bd >> 4) & 7)
        if block_max is None:
            raise InflateRefused("an lz4-compressed record batch names no valid block size")
        pos += 6 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1
        block_checksum = 4 if flg & 0x10 else 0
        while True:
            if n - pos < 4:
                raise InflateRefused("an lz4-compressed record batch ends inside a block")
            (word,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if word == 0:  # the end mark
                break
            size = word & 0x7FFFFFFF
            total += size if word & 0x80000000 else block_max
            pos += size + block_checksum
        pos += 4 if flg & 0x04 else 0  # the content checksum
    return total


def _varint(data: bytes, pos: int) -> int:
    value = shift = 0
    for i in range(pos, min(pos + 5, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value
        shift += 7
    raise InflateRefused("a snappy-compressed record batch has no valid length")


_XERIAL = b"\x82SNAPPY\x00"


def snappy_bound(data: bytes) -> int:
    """What snappy data inflates to, from the lengths its blocks start with (raw snappy, or
    the xerial framing Kafka's Java client writes: length-prefixed raw blocks)."""
    if not data.startswith(_XERIAL) or len(data) < 16:
        return _varint(data, 0)
    total, pos, n = 0, 16, len(data)
    while pos < n:
        if n - pos < 4:
            raise InflateRefused("a snappy-compressed record batch ends inside a block")
        (size,) = struct.unpack_from(">i", data, pos)
        if size < 0:
            raise InflateRefused("a snappy-compressed record batch has a negative block size")
        total += _varint(data, pos + 4)
        pos += 4 + size
    return total


def _bounded(
    codec: str, bound: Callable[[bytes], int], decode: Callable[[bytes], bytes]
) -> Callable[[Any], bytes]:
    def decode_bounded(payload: Any) -> bytes:
        data = bytes(payload)
        size = bound(data)
        if size > MAX_INFLATED_BYTES:
            raise _refuse(codec, size, MAX_INFLATED_BYTES)
        return decode(data)

    decode_bounded.__name__ = f"{codec}_decode"
    decode_bounded.__doc__ = f"aiokafka's {codec} decoder, once the inflated size is bounded."
    return decode_bounded


zstd_decode = _bounded("zstd", zstd_bound, _codec.zstd_decode)
lz4_decode = _bounded("lz4", lz4_bound, _codec.lz4_decode)
snappy_decode = _bounded("snappy", snappy_bound, _codec.snappy_decode)

_DECODERS: dict[str, Callable[..., bytes]] = {
    "gzip_decode": gzip_decode,
    "zstd_decode": zstd_decode,
    "lz4_decode": lz4_decode,
    "snappy_decode": snappy_decode,
}


def install() -> list[str]:
    """Put the bounded decoders in aiokafka's record readers (its compiled and its pure
    Python ones, both record formats); returns the modules patched."""
    import importlib

    patched = []
    for name in (
        "aiokafka.record.default_records",
        "aiokafka.record.legacy_records",
        "aiokafka.record._crecords.default_records",
        "aiokafka.record._crecords.legacy_records",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:  # no compiled readers (AIOKAFKA_NO_EXTENSIONS builds)
            continue
        for attr, decoder in _DECODERS.items():
            if hasattr(module, attr):
                setattr(module, attr, decoder)
        patched.append(name)
    return patched


__all__ = ["MAX_INFLATED_BYTES", "InflateRefused", "install"]
