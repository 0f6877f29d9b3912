"""Process-wide set-up of the long-running commands (``sidecar run``, ``sidecar aggregate``):
the event loop and the garbage collector. The benchmarks call the same function, so they
measure what the commands run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Young-generation threshold and the two older ones (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (200_000, 50, 1_000)
#: Set to ``0`` to keep CPython's default collector settings.
GC_TUNING_ENV = "SIDECAR_GC_TUNING"
#: glibc's ``mallopt`` parameter for the number of malloc arenas.
_M_ARENA_MAX = -8
#: Arenas of the processes that embed RocksDB (``sidecar outcomes``); ``MALLOC_ARENA_MAX`` in
#: the environment wins.
MALLOC_ARENAS = 2


def prepare_process() -> None:
    """uvloop when installed, and the collector tuned for record-at-a-time Kafka clients."""
    install_uvloop()
    tune_gc()


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_gc() -> bool:
    """Fewer, cheaper garbage collections; returns whether the settings were applied.

    Every poll creates tens of thousands of short-lived tracked objects (aiokafka's consumer
    records and their header tuples, produce futures). Under CPython's default thresholds a
    young collection runs every 700 of them, records still alive are promoted, and full
    collections, which traverse every object of the process, run every few polls. Freezing
    the start-up heap (modules, numpy, config, models) out of the collector and raising the
    thresholds makes collections rare and small: about +20-40% for the aggregator here
    (``bench/bench_aggregate.py``). Reference cycles are still collected, in bigger, rarer
    passes. ``SIDECAR_GC_TUNING=0`` keeps the defaults.
    """
    if os.environ.get(GC_TUNING_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("garbage collector left at its defaults (%s=0)", GC_TUNING_ENV)
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return True


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (before threads start); returns whether it was applied.

    glibc gives threads their own arenas (up to 8 per core); with RocksDB's flush and
    compaction threads and the worker threads the join applies chunks in, freed memory stays
    spread over arenas that are rarely returned, and the resident size crept up with the
    data processed (267 -> 604 MiB from 0.2 to 2 million pending requests, while RocksDB's own
    caches stayed under 40 MiB). Two arenas keep it flat (``bench/bench_outcomes.py memory``).
    Does nothing off glibc, or when ``MALLOC_ARENA_MAX`` is set (glibc read it already).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False


async def start_helpers(
    processes: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
) -> concurrent.futures.ProcessPoolExecutor:
    """``processes`` helper processes, spawned (nothing of the event loop is forked), each
    past ``initializer(*initargs)`` when this returns (~0.5 s: they import their modules).

    Ctrl-C reaches the whole process group, so helpers ignore it (the parent drains and shuts
    them down); a parent that dies without doing so (SIGKILL) takes them with it."""
    executor = concurrent.futures.ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_helper,
        initargs=(os.getpid(), initializer, initargs),
    )
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(executor, _ready) for _ in range(processes)))
    return executor


def _start_helper(
    parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def _ready() -> bool:
    return True


def exit_with_parent(parent: int) -> None:
    """In a helper process (a ``ProcessPoolExecutor`` worker): exit as soon as ``parent`` is
    no longer this process's parent. A parent killed with SIGKILL cannot shut its pool down,
    and a pool worker waits on its call queue forever (it holds the queue's write end
    itself, so it never sees the pipe close): without this it outlives the parent."""
    threading.Thread(target=_follow_parent, args=(parent,), daemon=True).start()


def _follow_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


__all__ = [
    "GC_THRESHOLDS",
    "GC_TUNING_ENV",
    "MALLOC_ARENAS",
    "exit_with_parent",
    "install_uvloop",
    "limit_malloc_arenas",
    "prepare_process",
    "start_helpers",
    "tune_gc",
]
