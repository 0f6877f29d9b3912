"""Deterministic hashes of string keys, vectorised over a whole batch with numpy.

Two hashes live here:

* the **routing bucket** (salted FNV-1a 64 finished with murmur3's fmix64, modulo 10,000):
  stable across processes, machines and languages, independent of Kafka's partitioner, and
  salted by the rollout name so two rollouts bucket the same entity independently;
* **Kafka's default partitioner** (murmur2, as in the Java client), so that outputs keyed by
  ``routing_key`` land on the partition any other Kafka client would pick for that key.

Per-record Python work is the whole throughput budget of the sidecar, so both run column by
column over a ``(records, bytes)`` matrix rather than record by record. The scalar versions are
the readable reference the vectorised ones are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

BUCKETS = 10_000

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    k ^= k >> 33
    return k


def _fnv1a(data: bytes, h: int = _FNV_OFFSET) -> int:
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def salt_state(salt: str) -> int:
    """FNV state after the salt and a NUL separator: the starting point for every key."""
    return _fnv1a(salt.encode() + b"\x00")


def bucket_of(key: str, salt: str) -> int:
    """Reference implementation: the bucket (0..9999) of one key under one salt."""
    return _fmix64(_fnv1a(key.encode(), salt_state(salt))) % BUCKETS


def _byte_matrix(keys: Sequence[bytes]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    width = int(lengths.max()) if len(keys) else 0
    if width == 0:
        return np.zeros((len(keys), 0), dtype=np.uint8), lengths
    # A fixed-width bytes array pads with NULs; lengths (not the padding) say where a key ends,
    # so keys that themselves end in NUL bytes still hash correctly.
    fixed = np.array(keys, dtype=f"S{width}")
    return fixed.view(np.uint8).reshape(len(keys), width), lengths


def buckets_of(keys: Sequence[bytes], salt: str) -> npt.NDArray[np.int64]:
    """Vectorised ``bucket_of`` for UTF-8 encoded keys; equal to it key by key."""
    matrix, lengths = _byte_matrix(keys)
    h = np.full(len(keys), salt_state(salt), dtype=np.uint64)
    prime = np.uint64(_FNV_PRIME)
    for col in range(matrix.shape[1]):
        live = lengths > col
        mixed = (h ^ matrix[:, col].astype(np.uint64)) * prime
        h = np.where(live, mixed, h)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return (h % np.uint64(BUCKETS)).astype(np.int64)


_M2 = 0x5BD1E995
_M2_SEED = 0x9747B28C
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Reference implementation of the Java client's ``Utils.murmur2``, as an unsigned int."""
    length = len(data)
    h = (_M2_SEED ^ length) & _MASK32
    for i in range(length // 4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * _M2) & _MASK32
        k ^= k >> 24
        k = (k * _M2) & _MASK32
        h = ((h * _M2) & _MASK32) ^ k
    tail = length & ~3
    extra = length % 4
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * _M2) & _MASK32
    h ^= h >> 13
    h = (h * _M2) & _MASK32
    h ^= h >> 15
    return h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def kafka_partitions(keys: Sequence[bytes], partitions: int) -> npt.NDArray[np.int64]:
    """Vectorised ``kafka_partition``; equal to it key by key."""
    matrix, lengths = _byte_matrix(keys)
    n = len(keys)
    m = np.uint32(_M2)
    h = (np.uint32(_M2_SEED) ^ lengths.astype(np.uint32)).astype(np.uint32)
    words = lengths // 4
    width4 = (matrix.shape[1] // 4) * 4
    if width4:
        packed = np.ascontiguousarray(matrix[:, :width4]).view("<u4")
        for i in range(packed.shape[1]):
            k = packed[:, i] * m
            k ^= k >> np.uint32(24)
            k *= m
            h = np.where(words > i, (h * m) ^ k, h)
    extra = lengths % 4
    tail = lengths & ~3
    rows = np.arange(n)
    padded = np.zeros((n, matrix.shape[1] + 3), dtype=np.uint32)
    padded[:, : matrix.shape[1]] = matrix
    b0 = padded[rows, tail]
    b1 = padded[rows, tail + 1]
    b2 = padded[rows, tail + 2]
    h = np.where(extra >= 3, h ^ (b2 << np.uint32(16)), h)
    h = np.where(extra >= 2, h ^ (b1 << np.uint32(8)), h)
    h = np.where(extra >= 1, (h ^ b0) * m, h)
    h ^= h >> np.uint32(13)
    h *= m
    h ^= h >> np.uint32(15)
    return ((h & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).astype(np.int64)
