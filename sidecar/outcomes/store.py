"""The embedded on-disk store of a join task: RocksDB through ``rocksdict`` (the store Quix
Streams uses), in raw mode (bytes keys and values, no pickling).

Memory is bounded by RocksDB's block cache (shared by every task of the process) and each
store's memtables, whatever the label window: pending requests live on disk. Writes go in
atomic :class:`Batch`es; the write-ahead log makes a batch survive a SIGKILL of the process
(a machine crash may lose the last batches; the store then comes back at an older consistent
point and the task replays the changelog from there).
"""

from __future__ import annotations

import collections
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import SidecarError

log = logging.getLogger(__name__)


class StoreError(SidecarError):
    """The state directory cannot be used; the message says which and why."""


class Batch:
    """Puts, deletes and range deletes applied atomically by :meth:`Store.write`; reads made
    through it (:meth:`get`) see its own writes first.

    Bulk puts (:meth:`put_many`: a chunk's new requests, thousands at a time) are kept as the
    lists they come in and written before the single puts and deletes (a single write of a key
    wins over a bulk one, whatever the order of the calls)."""

    def __init__(self) -> None:
        self.writes: dict[bytes, bytes | None] = {}
        self.ranges: list[tuple[bytes, bytes]] = []
        self.bulk: list[tuple[list[bytes], list[bytes]]] = []
        self._bulk_index: dict[bytes, bytes] | None = None
        self._bulk_len = 0

    def put(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def put_many(self, keys: list[bytes], values: list[bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        if self.writes and not self.writes.keys().isdisjoint(keys):
            for key in keys:  # a bulk put after a single one: the later write wins
                self.writes.pop(key, None)
        self.bulk.append((keys, values))
        self._bulk_len += len(keys)
        self._bulk_index = None

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        """The value this batch writes for ``key`` (None: deleted), else ``default``."""
        if key in self.writes:
            return self.writes[key]
        if not self.bulk:
            return default
        if self._bulk_index is None:
            index: dict[bytes, bytes] = {}
            for keys, values in self.bulk:
                index.update(zip(keys, values, strict=True))
            self._bulk_index = index
        return self._bulk_index.get(key, default)

    def delete(self, key: bytes) -> None:
        self.writes[key] = None

    def delete_many(self, keys: list[bytes]) -> None:
        self.writes.update(dict.fromkeys(keys))

    def delete_range(self, start: bytes, end: bytes) -> None:
        """Delete every stored key in [start, end) (not keys put in this batch)."""
        self.ranges.append((start, end))

    def __len__(self) -> int:
        return len(self.writes) + len(self.ranges) + self._bulk_len


class Store:
    """One task's RocksDB database at ``path``."""

    def __init__(self, path: Path, *, cache_mb: int = 64, write_buffer_mb: int = 16) -> None:
        from rocksdict import BlockBasedOptions, Options, Rdict

        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the state directory {path}: {exc.strerror} "
                "(outcomes.state_dir must be a writable directory)"
            ) from exc
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        table = BlockBasedOptions()
        # Membership checks of new request ids: no disk read.
        table.set_bloom_filter(_BLOOM_BITS_PER_KEY, False)
        table.set_block_cache(_shared_cache(cache_mb))
        # Filters and indexes live in the (bounded) block cache, not beside it: they grow with
        # the data (about 3 bytes a request), and a day of pending requests must not grow
        # the process. Level-0 ones stay pinned: they are read on every lookup.
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        opts.set_block_based_table_factory(table)
        opts.set_write_buffer_size(write_buffer_mb << 20)
        opts.set_max_write_buffer_number(2)
        # Compactions write files of this size. With RocksDB's 64 MiB they were long and big:
        # 1M -> 10M pending requests took the peak from 156 to 194 MiB (cache_mb 16) and
        # applying 10M ran at 45-51k comparisons/s; with 8 MiB, 152 -> 172 MiB and 122k/s
        # (bench/bench_outcomes.py memory).
        opts.set_target_file_size_base(_TARGET_FILE_MB << 20)
        # A bloom filter over the memtable too: "is this request id new?" is asked of every
        # comparison, and recent ids are in the memtable (0.5 us instead of 1.4-1.7 us).
        opts.set_memtable_whole_key_filtering(True)
        opts.set_memtable_prefix_bloom_ratio(0.1)
        try:
            #: Raw mode: keys and values are bytes (the stubs type them for pickling mode).
            self._db: Any = Rdict(str(path), opts)
        except Exception as exc:  # rocksdict raises plain exceptions (lock held, corruption)
            raise StoreError(f"cannot open the store at {path}: {exc} ({_advice(exc)})") from exc
        from rocksdict import WriteBatch

        self._batch_type = WriteBatch

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        values: list[bytes | None] = self._db.get(keys)
        return values

    def may_exist(self, keys: list[bytes]) -> list[bool]:
        """False: the key is certainly absent (bloom filters, no disk read); True: it may be
        present."""
        return list(map(self._db.key_may_exist, keys))

    def present(self, keys: list[bytes]) -> list[bool]:
        """Whether each key is stored: bloom filters first, a read only for the rare maybe."""
        maybe = self.may_exist(keys)
        if True not in maybe:
            return maybe
        check = [k for k, m in zip(keys, maybe, strict=True) if m]
        found = {k for k, v in zip(check, self.get_many(check), strict=True) if v is not None}
        return [m and k in found for k, m in zip(keys, maybe, strict=True)]

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with ``prefix``, in order, with their values."""
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key, value

    def write(self, batch: Batch) -> None:
        if not len(batch):
            return
        wb = self._batch_type(raw_mode=True)
        for start, end in batch.ranges:
            wb.delete_range(start, end)
        put = wb.put
        writes = batch.writes
        for keys, values in batch.bulk:
            if writes and not writes.keys().isdisjoint(keys):
                # Written again below (a request and its outcome in one chunk): one entry,
                # not two, for RocksDB to insert.
                pairs = [(k, v) for k, v in zip(keys, values, strict=True) if k not in writes]
                keys, values = [k for k, _ in pairs], [v for _, v in pairs]
            collections.deque(map(put, keys, values), maxlen=0)  # the loop in C
        for key, value in batch.writes.items():
            if value is None:
                wb.delete(key)
            else:
                put(key, value)
        try:
            self._db.write(wb)
        except Exception as exc:  # rocksdict raises plain exceptions (IO error, read-only)
            raise StoreError(
                f"cannot write the store at {self.path}: {exc} ({_advice(exc)})"
            ) from exc

    def filter_mb(self) -> float:
        """Estimated size (MiB) of this store's bloom filters (10 bits a key). They live in
        the bounded block cache: when they do not fit, "is this request id new?" reads the
        store instead of answering from memory (a day of pending requests at 1000/s replayed
        at 55k/s instead of ~400k/s with a 64 MiB cache)."""
        keys = self._db.property_int_value("rocksdb.estimate-num-keys") or 0
        return keys * _BLOOM_BITS_PER_KEY / 8 / (1 << 20)

    def memory(self) -> dict[str, float]:
        """RocksDB's own memory figures (MiB): memtables, block cache (shared by the stores of
        the process), and the table readers outside the cache."""
        prop = self._db.property_int_value
        return {
            "memtables": (prop("rocksdb.size-all-mem-tables") or 0) / (1 << 20),
            "block cache": (prop("rocksdb.block-cache-usage") or 0) / (1 << 20),
            "table readers": (prop("rocksdb.estimate-table-readers-mem") or 0) / (1 << 20),
        }

    def close(self) -> None:
        """Close the database; never raises (a flush that fails on a full disk leaves the
        data in the write-ahead log, which the next open replays): the stage's own error,
        not this one, is what the operator must see."""
        try:
            self._db.close()
        except Exception as exc:
            log.warning("closing the store at %s: %s (%s)", self.path, exc, _advice(exc))

    @staticmethod
    def destroy(path: Path) -> None:
        """Delete a store's directory (a new owner found it inconsistent, or a reset)."""
        shutil.rmtree(path, ignore_errors=True)


_BLOOM_BITS_PER_KEY = 10
_TARGET_FILE_MB = 8


def _advice(exc: BaseException) -> str:
    """What the operator can do about a RocksDB error (its text is all rocksdict gives)."""
    text = str(exc)
    if "No space left" in text or "Disk quota" in text:
        return (
            "the volume of outcomes.state_dir is full: free space on it or give it a bigger "
            "one, then restart; the store carries on from its changelog"
        )
    if "lock" in text.lower():
        return (
            "another sidecar outcomes process using the same outcomes.state_dir? each "
            "process needs its own"
        )
    if "Permission denied" in text or "Read-only file system" in text:
        return "outcomes.state_dir must be a writable directory"
    return (
        "is the volume of outcomes.state_dir healthy? a store deleted while the stage is "
        "stopped is rebuilt from its changelog"
    )


def cache_advice(filter_mb: float, cache_mb: int) -> str | None:
    """What to tell the operator when a store's bloom filters would crowd the block cache
    (``outcomes.cache_mb``) out, or None while they fit with room for data blocks."""
    if filter_mb <= cache_mb / 2:
        return None
    need = int(filter_mb * 2) + 1
    return (
        f"its bloom filters take ~{filter_mb:.0f} MiB, more than half of outcomes.cache_mb "
        f"({cache_mb}): checks of new request ids will read the store and the stage slows "
        f"down; raise outcomes.cache_mb to at least {need} (the filters take about 3 bytes "
        "a pending request)"
    )


_CACHES: dict[int, Any] = {}


def _shared_cache(mb: int) -> Any:
    """One block cache per size for the whole process: every task's store shares it."""
    from rocksdict import Cache

    cache = _CACHES.get(mb)
    if cache is None:
        cache = _CACHES[mb] = Cache(mb << 20)
    return cache


__all__ = ["Batch", "Store", "StoreError"]
