"""A progress line every few seconds while ``sidecar run`` serves, and the consumer-lag gauge.

Between "partitions assigned" and Ctrl-C the sidecar would otherwise say nothing. Every
``logging.progress_interval_s`` seconds (default 10) one INFO line reads, e.g.::

    progress: 1,998 records/s, lag 412, 3 dead letters (+0), mode canary 10%, epoch 4,
    3 partitions, 0 in flight, 120,000 records in all

:func:`summary` is pure (two :class:`Sample` s -> the line); :func:`sample` reads a running
:class:`~sidecar.runner.Sidecar` without changing it, and :func:`watch_progress` is the task
``sidecar run`` starts beside it. Lag, per assigned partition of the requests topic, is the
high watermark of the consumer's last fetch minus its position (records) and, while behind,
the age of the last record consumed there (seconds): no extra request to the broker. Every
:data:`SAMPLE_EVERY_S` seconds, even when the log line is off, it sets
``sidecar_consumer_lag_records`` (the sum, for alerts), ``sidecar_partition_lag_records`` and
``sidecar_partition_lag_seconds``, and the lag detail of ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

if TYPE_CHECKING:
    from .runner import Sidecar

log = logging.getLogger("sidecar.progress")

#: How often the lag gauge is refreshed (the log line may be rarer).
SAMPLE_EVERY_S = 5.0
#: Longest wait for one partition's position (it is known once a fetch was made).
_POSITION_TIMEOUT_S = 0.05
#: A partition whose last fetch answer is older than this has an unknown lag: its high
#: watermark is the one the broker gave then (while a broker is away, "lag 0" would say
#: all is well). An idle partition is answered every ``kafka.fetch_max_wait_ms``.
STALE_FETCH_MS = 15_000


@dataclass(frozen=True, slots=True)
class Sample:
    #: ``time.monotonic()`` when taken.
    at: float
    processed: int
    dead_letters: int
    #: None while unknown (nothing fetched yet on some assigned partition, or no fetch
    #: answered for ``STALE_FETCH_MS``).
    lag: int | None
    mode: str
    share_bp: int
    epoch: int
    partitions: int
    in_flight: int


def summary(previous: Sample | None, current: Sample) -> str:
    """The progress line: rates over the time since ``previous`` (or none yet)."""
    elapsed = current.at - previous.at if previous is not None else 0.0
    if previous is not None and elapsed > 0:
        rate = f"{(current.processed - previous.processed) / elapsed:,.0f} records/s"
        new_dead = current.dead_letters - previous.dead_letters
    else:
        rate, new_dead = "starting", current.dead_letters
    lag = "lag unknown" if current.lag is None else f"lag {current.lag:,}"
    mode = current.mode
    if mode == "canary":
        mode += f" {current.share_bp / 100:g}%"
    return (
        f"progress: {rate}, {lag}, {current.dead_letters:,} dead letters (+{new_dead:,}), "
        f"mode {mode}, epoch {current.epoch}, {current.partitions} partitions, "
        f"{current.in_flight:,} in flight, {current.processed:,} records in all"
    )


def counter_total(counter: Counter) -> int:
    """Sum of a (labelled) counter over all its label values."""
    return int(
        sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))
    )


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """How far one assigned partition is behind. ``records``: high watermark of the last
    fetch minus the position (None until both are known). ``seconds``: while records are
    behind, the age of the last record consumed from it (the next one is at most that old:
    an upper bound that is exact when the producer writes steadily); 0 when caught up; None
    when nothing was consumed from it yet."""

    partition: int
    records: int | None
    seconds: float | None


def partition_lag(
    partition: int,
    highwater: int | None,
    position: int | None,
    last_consumed_ms: int | None,
    now_ms: int,
    fetched_ms: int | None = None,
) -> PartitionLag:
    """One partition's :class:`PartitionLag` from what the consumer knows (pure);
    ``fetched_ms``: when the broker last answered a fetch of it (the high watermark's age)."""
    if highwater is None or position is None:
        return PartitionLag(partition, None, None)
    if fetched_ms is not None and now_ms - fetched_ms > STALE_FETCH_MS:
        return PartitionLag(partition, None, None)
    records = max(0, highwater - position)
    if records == 0:
        return PartitionLag(partition, 0, 0.0)
    if last_consumed_ms is None or last_consumed_ms < 0:
        return PartitionLag(partition, records, None)
    return PartitionLag(partition, records, max(0.0, (now_ms - last_consumed_ms) / 1000))


def lag_detail(lags: list[PartitionLag] | None, worst: int = 5) -> str:
    """``/readyz``'s lag detail: the total and the ``worst`` partitions (bounded size)."""
    if lags is None:
        return "not sampled yet"
    if not lags:
        return "no partitions assigned"
    known = [x for x in lags if x.records is not None]
    total = sum(x.records or 0 for x in known)
    ranked = sorted(known, key=lambda x: (-(x.seconds or 0.0), -(x.records or 0)))[:worst]
    parts = [
        f"p{x.partition} {x.records:,} records"
        + ("" if x.seconds is None else f" {x.seconds:.1f}s")
        for x in ranked
        if x.records
    ]
    unknown = len(lags) - len(known)
    return (
        f"{total:,} records behind on {len(lags)} partitions"
        + (f" ({unknown} unknown)" if unknown else "")
        + (": " + ", ".join(parts) if parts else "")
    )


async def partition_lags(
    consumer: Any, topic: str, last_consumed_ms: dict[Any, int], now_ms: int
) -> list[PartitionLag]:
    """Every assigned partition of ``topic``: its :class:`PartitionLag`."""
    if consumer is None:
        return []
    out = []
    for tp in sorted((tp for tp in consumer.assignment() if tp.topic == topic), key=_partition):
        try:
            position = await asyncio.wait_for(consumer.position(tp), _POSITION_TIMEOUT_S)
        except Exception:  # not fetched yet, or revoked meanwhile: unknown, never fatal
            position = None
        out.append(
            partition_lag(
                tp.partition,
                consumer.highwater(tp),
                position,
                last_consumed_ms.get(tp),
                now_ms,
                consumer.last_poll_timestamp(tp) if now_ms else None,
            )
        )
    return out


def _partition(tp: Any) -> int:
    return int(tp.partition)


async def consumer_lag(consumer: Any, topic: str) -> tuple[int | None, int]:
    """(records behind on the assigned partitions of ``topic`` or None, partitions)."""
    lags = await partition_lags(consumer, topic, {}, 0)
    if any(x.records is None for x in lags):
        return None, len(lags)
    return sum(x.records or 0 for x in lags), len(lags)


async def sample(sidecar: Sidecar, clock: Any = time.monotonic) -> Sample:
    topic = sidecar.config.topics.requests
    lags = await partition_lags(
        sidecar.consumer, topic, sidecar.last_consumed_ms, time.time_ns() // 1_000_000
    )
    sidecar.lag = lags
    sidecar.metrics.observe_lag(topic, lags)
    partitions = len(lags)
    lag = None if any(x.records is None for x in lags) else sum(x.records or 0 for x in lags)
    policy = sidecar.policy.current
    return Sample(
        at=clock(),
        processed=sidecar.processed,
        dead_letters=counter_total(sidecar.metrics.dead_letters),
        lag=lag,
        mode=policy.mode.value,
        share_bp=policy.candidate_share_bp,
        epoch=policy.epoch,
        partitions=partitions,
        in_flight=sidecar.in_flight_records,
    )


async def watch_progress(sidecar: Sidecar, interval_s: float) -> None:
    """Until cancelled: refresh the lag gauge and log :func:`summary` every ``interval_s``
    (0: no log line) once the sidecar serves."""
    await sidecar.ready.wait()
    every = min(SAMPLE_EVERY_S, interval_s) if interval_s > 0 else SAMPLE_EVERY_S
    previous = await sample(sidecar)
    while not sidecar.stopping:
        await asyncio.sleep(every)
        try:
            current = await sample(sidecar)
        except Exception:  # a bug here must never take the sidecar down
            log.exception("progress: sampling failed")
            continue
        if interval_s > 0 and current.at - previous.at >= interval_s - 1e-3:
            log.info("%s", summary(previous, current))
            previous = current


@contextlib.asynccontextmanager
async def progress_task(sidecar: Sidecar, interval_s: float) -> AsyncIterator[asyncio.Task[None]]:
    """Run :func:`watch_progress` beside the body of the ``async with``."""
    task = asyncio.create_task(watch_progress(sidecar, interval_s), name="progress")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


__all__ = [
    "PartitionLag",
    "Sample",
    "consumer_lag",
    "counter_total",
    "lag_detail",
    "partition_lag",
    "partition_lags",
    "progress_task",
    "sample",
    "summary",
    "watch_progress",
]
