"""Decoding in helper processes, so that consuming and decoding use two cores.

Per record, aiokafka's consumer (record objects, CRC checks) costs about as much Python time
as decoding a comparison and building its columns, and both hold the GIL: one process tops
out at their sum. With ``aggregate.decode_processes`` >= 1 a poll's values go to helper
processes (spawned, so nothing of the event loop is forked) and come back as
``ComparisonBatch`` columns while the loop fetches the next poll. The service applies the
results strictly in poll order; only the values and their positions cross the process
boundary, the records themselves stay here (late ones are copied from them).

A helper that dies (OOM kill, crash) is not fatal: its poll is decoded in process and the
pool is dropped for the rest of the run, with an error in the log. Spawned helpers import the
parent's ``__main__`` module: a script embedding ``AggregatorService`` needs the usual
``if __name__ == "__main__":`` guard, or ``decode_processes = 0``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Sequence

from ..runtime import start_helpers
from .batch import Int32Array, Int64Array
from .ingest import ComparisonDecoder, Decoded, Ingested, Poll, RecordLike
from .ingest import decode_columns as _decode_here

log = logging.getLogger(__name__)

#: The helper process's own decoder (its interned names live there).
_WORKER_DECODER = ComparisonDecoder()


def _decode_in_worker(
    values: list[bytes | None], partitions: Int32Array, offsets: Int64Array
) -> Decoded:
    return _decode_here(values, partitions, offsets, _WORKER_DECODER)


class DecodePool:
    """``processes`` helper processes decoding polls; ``submit`` keeps poll order to callers
    that await the returned futures in submission order."""

    def __init__(self, processes: int, fallback: ComparisonDecoder) -> None:
        if processes < 1:
            raise ValueError("a decode pool needs at least one process")
        self.processes = processes
        self._fallback = fallback
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Spawn the helpers and wait until each has imported the decoder (~0.5 s)."""
        self._executor = await start_helpers(self.processes)

    @property
    def alive(self) -> bool:
        return self._executor is not None

    async def ingest(self, records: Sequence[RecordLike]) -> Ingested:
        """Decode one poll in a helper (in process once the pool has broken)."""
        poll = Poll.of(records)
        executor = self._executor
        if executor is not None:
            loop = asyncio.get_running_loop()
            try:
                decoded = await loop.run_in_executor(
                    executor, _decode_in_worker, poll.values, poll.partitions, poll.offsets
                )
                return poll.ingested(decoded)
            except concurrent.futures.BrokenExecutor as exc:
                log.error(
                    "decode helper process died (%s); decoding in process from now on "
                    "(throughput drops; restart the aggregator to get the helpers back)",
                    exc,
                )
                self.close()
        return poll.ingested(
            _decode_here(poll.values, poll.partitions, poll.offsets, self._fallback)
        )

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["DecodePool"]
