"""The RocksDB store's sizing advice: bloom filters that no longer fit the block cache."""

from __future__ import annotations

from pathlib import Path

from sidecar.outcomes.store import Store, cache_advice


def test_filters_that_fit_need_no_advice() -> None:
    assert cache_advice(10.0, 64) is None
    assert cache_advice(32.0, 64) is None


def test_filters_crowding_the_cache_get_a_size_to_set() -> None:
    advice = cache_advice(260.0, 64)
    assert advice is not None
    assert "outcomes.cache_mb (64)" in advice and "at least 521" in advice


def test_the_estimate_grows_with_the_keys_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", cache_mb=8)
    try:
        empty = store.filter_mb()
        for i in range(200_000):
            store._db.put(b"k%08d" % i, b"v")  # filled directly: the join is not under test
        grown = store.filter_mb()
    finally:
        store.close()
    assert empty < 0.01
    # 10 bits a key: ~0.24 MiB for 200,000 keys (RocksDB's key count is an estimate).
    assert 0.15 < grown < 0.35
