"""Decoding in helper processes: same columns as in process, survival of a dead helper, and
no helper outliving its parent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pytest
from agg_support import comparisons

from sidecar.aggregate.decode_pool import DecodePool
from sidecar.aggregate.ingest import ComparisonDecoder, Ingested, ingest


class Rec(NamedTuple):
    partition: int
    offset: int
    value: bytes | None


def poll(seed: int, n: int = 200) -> list[Rec]:
    rng = np.random.default_rng(seed)
    recs = [Rec(seed % 3, i, msgspec.json.encode(c)) for i, c in enumerate(comparisons(rng, n))]
    recs[7] = Rec(recs[7].partition, 7, b"garbage")
    return recs


def assert_same(a: Ingested, b: Ingested) -> None:
    assert a.undecodable == b.undecodable and a.next_offsets == b.next_offsets
    assert a.records == b.records
    assert a.batch.keys == b.batch.keys
    for name in ("ts", "offset", "partition", "request_hash", "served_by"):
        assert np.array_equal(getattr(a.batch, name), getattr(b.batch, name)), name
    assert np.array_equal(a.batch.candidate.score, b.batch.candidate.score, equal_nan=True)
    assert np.array_equal(a.batch.champion.decision, b.batch.champion.decision)


async def test_helpers_decode_exactly_what_the_loop_would() -> None:
    pool = DecodePool(2, ComparisonDecoder())
    await pool.start()
    try:
        for seed in range(4):
            recs = poll(seed)
            got = await pool.ingest(recs)
            assert got.undecodable == 1 and len(got.batch) == len(recs) - 1
            assert_same(got, ingest(recs, ComparisonDecoder()))
    finally:
        pool.close()


async def test_a_killed_helper_falls_back_to_decoding_in_process() -> None:
    pool = DecodePool(1, ComparisonDecoder())
    await pool.start()
    try:
        helpers = multiprocessing.active_children()
        assert helpers
        for helper in helpers:
            assert helper.pid is not None
            os.kill(helper.pid, signal.SIGKILL)
            helper.join(5)
        recs = poll(1)
        got = await pool.ingest(recs)  # the pool breaks here; this poll is still decoded
        assert not pool.alive
        assert_same(got, ingest(recs, ComparisonDecoder()))
        assert_same(await pool.ingest(poll(2)), ingest(poll(2), ComparisonDecoder()))
    finally:
        pool.close()


def test_a_pool_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DecodePool(0, ComparisonDecoder())


_PARENT = """
import asyncio, sys, time
from sidecar.aggregate.decode_pool import DecodePool
from sidecar.aggregate.ingest import ComparisonDecoder

async def main() -> None:
    pool = DecodePool(1, ComparisonDecoder())
    await pool.start()
    print("ready", flush=True)
    await asyncio.sleep(120)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_helpers_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL cannot shut its pool down: its helper must not live on
    (blocked on its call queue forever, as a plain ProcessPoolExecutor worker would)."""
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        children: list[int] = []
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            try:  # a thread may end between the listing and the read
                children += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
        assert children, "the pool runs a helper process"
    finally:
        proc.kill()
        proc.wait(30)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [c for c in children if Path(f"/proc/{c}").exists()]
    assert not left, f"helper processes {left} outlived their SIGKILLed parent"
