"""Process-wide set-up of the long-running commands (``sidecar run``, ``sidecar aggregate``):
the event loop and the garbage collector. The benchmarks call the same function, so they
measure what the commands run."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os

log = logging.getLogger(__name__)

#: Young-generation threshold and the two older ones (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (200_000, 50, 1_000)
#: Set to ``0`` to keep CPython's default collector settings.
GC_TUNING_ENV = "SIDECAR_GC_TUNING"


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


__all__ = ["GC_THRESHOLDS", "GC_TUNING_ENV", "install_uvloop", "prepare_process", "tune_gc"]
