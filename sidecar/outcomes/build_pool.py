"""Building a poll's changelog chunks in a helper process, so that the stage uses two cores.

Decoding a poll's comparisons and building its chunk (:class:`~.decode.ChunkBuilder`) is
about a third of the stage's Python time per comparison, and the rest (the consumer, the
changelog round trip, the store) holds the GIL too: one process tops out at their sum. With
``outcomes.decode_processes = 1`` the service hands each poll's values (with their offsets)
to a helper process, fetches and applies the previous poll meanwhile, and gets the chunks
back as their changelog encoding. Only values, offsets and the outcome records' headers
cross the process boundary; the chunks are decoded again here (a list of ids and a few byte
columns) so what is applied is exactly what the changelog holds.

A helper that dies (OOM kill, crash) is not fatal: its poll is built in process and the pool
is dropped for the rest of the run, with an error in the log. The helper is spawned (nothing
of the event loop is forked) and imports the parent's ``__main__`` module: a script embedding
``OutcomesService`` needs the usual ``if __name__ == "__main__":`` guard, or
``decode_processes = 0``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..runtime import start_helpers
from .chunks import InputChunk, decode
from .decode import ChunkBuilder, RecordLike, Skipped
from .settings import OutcomesSettings

log = logging.getLogger(__name__)


class Rec(NamedTuple):
    """A consumed record, as much of it as the chunk builder reads."""

    value: bytes | None
    offset: int
    headers: tuple[tuple[str, Any], ...] = ()


#: (values, offsets, headers or None) of one input's records.
Packed = tuple[list[bytes | None], list[int], list[tuple[tuple[str, Any], ...]] | None]


def pack(records: Sequence[RecordLike], headers: bool) -> Packed:
    values = [r.value for r in records]
    offsets = [r.offset for r in records]
    if not headers:
        return values, offsets, None
    return values, offsets, [tuple(getattr(r, "headers", None) or ()) for r in records]


def unpack(packed: Packed) -> list[Rec]:
    values, offsets, headers = packed
    if headers is None:
        return [Rec(v, o) for v, o in zip(values, offsets, strict=True)]
    return [Rec(v, o, h) for v, o, h in zip(values, offsets, headers, strict=True)]


#: Built in the helper: each chunk's changelog encoding, and what was skipped.
Built = tuple[list[bytes], dict[tuple[str, str], int]]

_BUILDER: ChunkBuilder | None = None


def _start_worker(settings: OutcomesSettings) -> None:
    global _BUILDER
    _BUILDER = ChunkBuilder(settings)


def _build_in_worker(
    task: int, comparisons: Packed, outcomes: Packed, now_ms: int, max_bytes: int
) -> Built:
    assert _BUILDER is not None
    skipped = Skipped()
    chunks = _BUILDER.build(
        task, unpack(comparisons), unpack(outcomes), now_ms, skipped, max_bytes=max_bytes
    )
    return [raw for _, raw in chunks], skipped.counts


class BuildPool:
    """``processes`` helper processes building polls' chunks."""

    def __init__(self, processes: int, fallback: ChunkBuilder) -> None:
        if processes < 1:
            raise ValueError("a build pool needs at least one process")
        self.processes = processes
        self._fallback = fallback
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Spawn the helpers and wait until each has imported the builder (~0.5 s)."""
        self._executor = await start_helpers(
            self.processes, _start_worker, (self._fallback.settings,)
        )

    @property
    def alive(self) -> bool:
        return self._executor is not None

    async def build(
        self,
        task: int,
        comparisons: Sequence[RecordLike],
        outcomes: Sequence[RecordLike],
        now_ms: int,
        skipped: Skipped,
        max_bytes: int,
    ) -> list[tuple[InputChunk, bytes]]:
        """What ``ChunkBuilder.build`` returns, built in a helper (in process once the pool
        has broken)."""
        executor = self._executor
        if executor is not None:
            loop = asyncio.get_running_loop()
            try:
                raws, counts = await loop.run_in_executor(
                    executor,
                    _build_in_worker,
                    task,
                    pack(comparisons, headers=False),
                    pack(outcomes, headers=True),
                    now_ms,
                    max_bytes,
                )
            except concurrent.futures.BrokenExecutor as exc:
                log.error(
                    "outcomes build helper process died (%s); building chunks in process from "
                    "now on (throughput drops; restart the stage to get the helper back)",
                    exc,
                )
                self.close()
            else:
                for (source, reason), n in counts.items():
                    skipped.add(source, reason, n)
                chunks = []
                for raw in raws:
                    chunk = decode(raw)
                    assert isinstance(chunk, InputChunk)
                    chunks.append((chunk, raw))
                return chunks
        return self._fallback.build(
            task, comparisons, outcomes, now_ms, skipped, max_bytes=max_bytes
        )

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["BuildPool", "Rec", "pack", "unpack"]
