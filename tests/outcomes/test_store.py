"""The RocksDB store: its sizing advice (bloom filters that no longer fit the block cache), the
size of the files its compactions write, and what a failing disk does to the stage."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec

from sidecar.outcomes.store import Batch, Store, cache_advice


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


def test_the_later_write_of_a_key_wins_between_bulk_and_single_writes(tmp_path: Path) -> None:
    """A chunk stores its new requests in bulk and may write some of them again (their
    outcome came in the same chunk): the store ends with the later value, deletes included."""
    store = Store(tmp_path / "s", cache_mb=8)
    try:
        batch = Batch()
        batch.put(b"x", b"single, then bulk")
        batch.put_many([b"a", b"b", b"c", b"x", b"y"], [b"1", b"2", b"3", b"bulk", b"4"])
        assert batch.get(b"b") == b"2"  # read, then rewritten: as the join does
        batch.put(b"b", b"outcome")
        batch.delete(b"c")
        batch.put(b"y", b"single")
        batch.put_many([b"y"], [b"bulk again"])  # a later bulk write wins over the single one
        assert [batch.get(k) for k in (b"a", b"b", b"c", b"x")] == [b"1", b"outcome", None, b"bulk"]
        store.write(batch)
        assert store.get_many([b"a", b"b", b"c", b"x"]) == [b"1", b"outcome", None, b"bulk"]
        assert store.get(b"y") == b"bulk again"
    finally:
        store.close()


def test_compactions_write_files_of_a_bounded_size(tmp_path: Path) -> None:
    """A compaction's memory grows with the files it writes: RocksDB's 64 MiB default made
    the stage's resident size grow with its pending requests (bench_outcomes.py memory)."""
    rng = random.Random(7)
    store = Store(tmp_path / "s", cache_mb=8, write_buffer_mb=1)
    try:
        for _ in range(40):  # ~40 MiB of request-like records, in request id (random) order
            batch = Batch()
            keys = [b"r\x00\x07rollout" + rng.randbytes(16).hex().encode() for _ in range(10_000)]
            batch.put_many(keys, [rng.randbytes(61) for _ in keys])
            store.write(batch)
        store._db.compact_range(None, None)  # everything into the last level: sizes settled
    finally:
        store.close()
    sizes = [f.stat().st_size / (1 << 20) for f in (tmp_path / "s").glob("*.sst")]
    assert sum(sizes) > 30
    assert max(sizes) < 9, sorted(sizes)


# A process whose store writes fail for real (RLIMIT_FSIZE: every file write past 64 KiB is
# refused, EFBIG, as a full volume refuses it with ENOSPC) applies chunks through the stage's
# own ``_apply_one`` until one fails, and says what became of it.
_FAILING_WRITES = """
import json, resource, signal, sys
sys.path[:0] = sys.argv[2:]
from pathlib import Path
from outcome_support import outcomes_config
from test_join import NOW, comparison
from records import Rec
from sidecar.outcomes.decode import Skipped
from sidecar.outcomes.service import OutcomesService

service = OutcomesService(outcomes_config("localhost:1", Path(sys.argv[1])))
join = service._open(Path(sys.argv[1]) / "task-0", 0)
service.builder.min_event_ms = 0  # synthetic event times from 0
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
failed_at, error = None, None
for offset in range(200):
    if offset == 3:  # three records applied: now the disk fills up
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    values = [comparison(f"c{offset}-{i}", 1000 + i) for i in range(200)]
    recs = [Rec(v, offset=offset * 200 + i) for i, v in enumerate(values)]
    ((chunk, raw),) = service.builder.build(0, recs, [], NOW, Skipped())
    try:
        service._apply_one(join, raw, offset, chunk)
    except Exception as exc:
        failed_at, error = offset, f"{type(exc).__name__}: {exc}"
        break
join.store.close()
skipped = service.metrics.skipped.labels("changelog", "apply_error")._value.get()
print(json.dumps({"failed_at": failed_at, "error": error, "skipped": skipped}))
"""


def test_a_store_that_cannot_be_written_stops_the_stage_and_loses_no_record(
    tmp_path: Path,
) -> None:
    """It used to be handled like a bad record: logged "could not be applied; skipped" and
    marked applied (gone for good, had that write got through), then the stage died of the
    raw RocksDB error of ``Store.close()``, which hid the cause. Now the stage stops with
    what to do, and a restart applies the record."""
    import json
    import subprocess
    import sys

    tests = Path(__file__).parent
    paths = [str(tests), str(tests.parent)]
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITES, str(tmp_path), *paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["failed_at"] is not None and got["failed_at"] >= 3 and got["skipped"] == 0
    assert got["error"].startswith("StoreError: cannot write the store at")
    assert "outcomes.state_dir" in got["error"]
    # With room again: the failed record is not marked applied (a restart replays it).
    from sidecar.outcomes.join import META_KEY, Meta

    store = Store(tmp_path / "task-0")
    try:
        raw = store.get(META_KEY)
        assert raw is not None
        assert msgspec.msgpack.decode(raw, type=Meta).changelog_next == got["failed_at"]
    finally:
        store.close()


def test_store_errors_say_what_to_do() -> None:
    from sidecar.outcomes.store import _advice

    assert "is full" in _advice(Exception("IO error: No space left on device: While appending"))
    assert "its own" in _advice(Exception("IO error: lock hold by current process"))
    assert "writable" in _advice(Exception("IO error: Permission denied"))
