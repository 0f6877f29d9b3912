"""``sidecar aggregate``: the Kafka edge of the windowed aggregator.

Comparisons -> decode (one msgspec call per poll, in a helper process by default: see
``decode_pool``) -> ``comparison_batch`` -> ``WindowManager`` -> every closed ``WindowReport``
is produced (JSON, keyed by rollout) to the reports topic -> ``GuardEngine`` -> a fired
``rollback``/``pause`` becomes a signed ``ControlCommand`` on partition 0 of the control topic;
``alert`` is a log line and a metric.

Keying and scaling (``topics.comparisons_key``): keyed by rollout (the default), one rollout's
comparisons sit on one partition and one consumer-group member sees the whole rollout: its
windows need no cross-instance merge. The price: a rollout is limited to one partition and one
aggregator process. Keyed by routing key, a rollout spreads over every partition; each member
closes its partitions' windows into per-partition partials and a merge stage (``merge_stage``,
one owner per rollout) merges them exactly, so more instances mean more throughput.

Offsets and restarts: offsets are committed only after the reports (and commands) of the
windows closed so far are acknowledged, and never past the first record of a window still
open. Window state itself is not checkpointed: a restart or a rebalance drops the open
windows' partial state, and the next owner rebuilds them by re-reading from the committed
offset (at most about one window plus the allowed lateness of data). Guard streaks
(``consecutive``) and hysteresis also restart empty; a breach that fires again after a restart
produces the same deterministic ``command_id``, which the control plane ignores as a duplicate.
Reports are at-least-once: a consumer keys them by (rollout, window_start_ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from itertools import chain
from typing import Any, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from ..config import SidecarConfig
from ..contracts import MIN_PLAUSIBLE_MS, DeadLetterKind
from ..control.commands import ControlCommand, encode_command, sign_command
from ..control.keys import SigningKey
from ..dead_letters import DeadLetterWriter, keep_bytes
from ..errors import ConfigError
from ..health import HealthState, watch_aggregator
from ..kafka import (
    Backoff,
    RebalanceListener,
    is_permanent,
    new_consumer,
    new_producer,
    refusal,
    stop_quietly,
)
from ..timefmt import utc_window
from .actions import COMMAND_ACTIONS, VerdictPacer, commanding, guard_command, guard_verdict
from .admission import Admission
from .batch import GroupKey
from .commits import SafeCommitter
from .decode_pool import DecodePool
from .guards import GuardEngine, GuardEvent, GuardReset
from .ingest import ComparisonDecoder, Ingested, RecordLike, ingest
from .manager import WindowManager
from .merge_stage import MergeStage
from .metrics import AggregateMetrics
from .partials import partial_of
from .report import WindowReport

log = logging.getLogger(__name__)

_REPORT_ENCODER = msgspec.json.Encoder()
#: Reports, guard events and commands an ``AggregatorService`` keeps for inspection.
KEEP_RECENT = 10_000
#: Header on late records copied to ``aggregate.late_topic``.
LATE_HEADER = "sidecar-late"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def configured_pair(config: SidecarConfig) -> GroupKey | None:
    """The rollout pair the config runs (None without a candidate)."""
    pair = config.rollout_pair()
    return None if pair is None else GroupKey(*pair)


def signing_key(cfg: SidecarConfig, key: SigningKey | None) -> SigningKey | None:
    """The key guard commands are signed with; None when nothing needs signing.

    Raises ConfigError (saying what to set) when a rule can issue commands but no key of
    role ``guard`` is usable.
    """
    settings = cfg.aggregate
    if settings.dry_run or not any(r.action in COMMAND_ACTIONS for r in settings.rules):
        return key
    if key is None:
        if not settings.signing_key_file:
            raise ConfigError(
                "the aggregator signs rollback/pause commands: set aggregate.signing_key_file "
                "to a key of role guard (`sidecar ctl keygen --role guard`), or set "
                "aggregate.dry_run = true"
            )
        key = SigningKey.from_file(settings.signing_key_file)
    if key.role not in ("guard", "operator"):
        raise ConfigError(
            f"aggregate.signing_key_file holds a key of role {key.role}; guard commands need "
            "role guard"
        )
    return key


async def _until_either(main: Awaitable[None], other: asyncio.Task[None] | None) -> None:
    """Run ``main``; if ``other`` ends first (it failed), cancel ``main`` and let the caller
    collect ``other``'s error."""
    if other is None:
        await main
        return
    task = asyncio.ensure_future(main)
    await asyncio.wait((task, other), return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    else:
        task.result()


async def _unless_done(awaitable: Awaitable[object], watched: asyncio.Task[None]) -> bool:
    """Await ``awaitable`` unless ``watched`` ends first (then cancel it and return False)."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait((task, watched), return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return True
    task.cancel()
    return False


class _Send(NamedTuple):
    """One record to produce."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    partition: int | None = None


class AggregatorService:
    """One aggregator process: a consumer-group member of the comparisons topic."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        key: SigningKey | None = None,
        metrics: AggregateMetrics | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.config = config
        self.settings = config.aggregate
        self.dry_run = self.settings.dry_run
        self.key = signing_key(config, key)
        self.guards = GuardEngine(self.settings.rules)
        #: Shared rollouts (comparisons keyed by routing key): windows close into per-partition
        #: partials for the merge stage instead of reports (see ``partials``).
        self.shared = config.shared_rollouts
        self.manager = self._new_manager()
        #: Rollout pairs taken (a bound on per-pair state and per-rollout metric series).
        self.admission = Admission(
            config.rollout.name,
            self.settings.max_rollouts,
            self.settings.max_rollout_pairs,
            configured_pair(config),
        )
        self.merge: MergeStage | None = None
        self._decoder = ComparisonDecoder()
        self._pool: DecodePool | None = None
        #: Bumped on every revoke: polls decoded before it are dropped, not applied.
        self._generation = 0
        #: Polls handed to the decode pool and not applied yet.
        self._inflight = 0
        #: Assigned partitions that have delivered no record since their assignment.
        self._undelivered: set[int] = set()
        self.metrics = metrics or AggregateMetrics()
        self._clock = clock
        self._topic = config.topics.comparisons
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        #: When late records dated before 1973 were last explained (see ``_explain_late``).
        self._implausible_logged_ms = -(1 << 62)
        self._commits = SafeCommitter(self._topic)
        self._record_limit = config.kafka.max_record_bytes
        self._dead_letter_writer = DeadLetterWriter(
            keep_bytes(
                config.dead_letter.max_value_bytes,
                self._record_limit,
                config.dead_letter.max_header_bytes,
            ),
            config.dead_letter.max_header_bytes,
        )
        self._last_commit = 0.0
        self.ready = asyncio.Event()
        #: Readiness snapshot served on ``/readyz`` (see ``sidecar.health``).
        self.health = HealthState("aggregator")
        #: What this process did (tests and the benchmark read these). The latest
        #: ``KEEP_RECENT`` of each only: a long-lived aggregator must not grow with its age.
        self.consumed = 0
        #: ``time.monotonic()`` of the first poll that returned records (the benchmark).
        self.first_poll_at: float | None = None
        self.reports: deque[WindowReport] = deque(maxlen=KEEP_RECENT)
        self.events: deque[GuardEvent] = deque(maxlen=KEEP_RECENT)
        self.commands: deque[ControlCommand] = deque(maxlen=KEEP_RECENT)
        #: Guard verdicts published (signed), newest last.
        self.verdicts: deque[ControlCommand] = deque(maxlen=KEEP_RECENT)
        self._verdict_pacer = VerdictPacer(int(self.settings.verdict_interval_s * 1000))
        #: Totals since start (the deques above forget their oldest entries).
        self.reports_total = 0
        self.keep_reports = True

    def _new_manager(self) -> WindowManager:
        # Bounded by the clock: a comparison dated ahead (within max_future_ms) must not
        # make the records of the next minutes late (``Watermark``).
        return WindowManager(
            self.settings.aggregator_config(),
            partials=self.shared,
            clock_bound=True,
            protected=configured_pair(self.config),
        )

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer while running (health checks read its assignment)."""
        return self._consumer

    async def run(self, install_signal_handlers: bool = False) -> None:
        """Consume until stopped; then commit what is safe and return (open windows are
        not flushed: the next run rebuilds them from the committed offsets)."""
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        watcher = watch_aggregator(self)
        try:
            await self._start()
            self.ready.set()
            log.info(
                "aggregator consuming %s as group %s: %d ms windows, %d guard rules%s",
                self._topic,
                self.settings.group_id,
                self.settings.window_ms,
                len(self.guards.rules),
                " (DRY RUN: nothing is published)" if self.dry_run else "",
            )
            merging = asyncio.create_task(self.merge.run(self._stopping)) if self.merge else None
            try:
                await _until_either(self._loop(), merging)
            finally:
                self._stopping.set()
                if merging is not None:
                    await merging  # raises what failed in it
            async with self._lock:
                await self._commit(force=True)
        finally:
            await watcher.stop()
            await self._close()

    async def _start(self) -> None:
        cfg = self.config
        if not self.dry_run or self.shared:  # partials are data, produced even in a dry run
            self._producer = new_producer(
                cfg, "aggregator", linger_ms=5, max_batch_size=min(1 << 20, self._record_limit)
            )
            await self._producer.start()
        self._consumer = new_consumer(
            cfg,
            "aggregator",
            group_id=self.settings.group_id,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
        )
        if self.settings.decode_processes:
            self._pool = DecodePool(self.settings.decode_processes, self._decoder)
            await self._pool.start()
        await self._consumer.start()
        self._consumer.subscribe(
            [self._topic],
            listener=RebalanceListener(
                "aggregator", on_revoked=self._revoked, on_assigned=self._assigned
            ),
        )
        if self.shared:
            self.merge = MergeStage(
                cfg,
                lambda reports, now: self._publish(reports, [], now),
                self._clock,
                self.metrics,
                lambda refused: self._send_all(self._dead_letters(refused)),
                self.admission,
                self._comparison_partitions,
            )
            await self.merge.start()

    async def _close(self) -> None:
        if self.merge is not None:
            await self.merge.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for client in (self._consumer, self._producer):
            await stop_quietly(client)
        self._consumer = self._producer = None

    # -- rebalance -------------------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        await self.on_revoked({tp.partition for tp in revoked})

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        self.on_assigned({tp.partition for tp in assigned})

    async def on_revoked(self, partitions: set[int]) -> None:
        """Commit what is safe, then drop all window state (see the module docstring)."""
        async with self._lock:
            self._generation += 1
            await self._commit(force=True)
            if self.manager.open_windows:
                log.info(
                    "partitions %s revoked: dropping %d open windows; they are rebuilt from "
                    "the committed offsets",
                    sorted(partitions),
                    self.manager.open_windows,
                )
            self.manager = self._new_manager()
            self._commits.reset()

    def on_assigned(self, partitions: set[int]) -> None:
        log.info("partitions assigned: %s[%s]", self._topic, ",".join(map(str, sorted(partitions))))
        self.manager.assign_partitions(partitions, self._clock())
        self._undelivered = set(partitions)

    async def _find_caught_up(
        self, consumer: AIOKafkaConsumer, polled: dict[TopicPartition, list[Any]]
    ) -> None:
        """Assigned partitions that have delivered nothing since their assignment and sit at
        their end (position at the high watermark of the last fetch) stop holding the
        watermark back (see ``Watermark.caught_up``): the first windows then close as soon as
        the partitions with data pass them, not after ``aggregate.idle_timeout_ms``."""
        for tp in polled:
            self._undelivered.discard(tp.partition)
        if not self._undelivered:
            return
        found = []
        for p in sorted(self._undelivered):
            tp = TopicPartition(self._topic, p)
            highwater = consumer.highwater(tp)
            if highwater is None:  # not fetched yet
                continue
            with contextlib.suppress(Exception):  # e.g. revoked meanwhile: ask again later
                if await consumer.position(tp) >= highwater:
                    found.append(p)
        if found:
            self._undelivered.difference_update(found)
            async with self._lock:
                self.manager.watermark.caught_up(found)
            log.info(
                "%s[%s] at their end with nothing to read: they do not hold windows back",
                self._topic,
                ",".join(map(str, found)),
            )

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        s = self.settings
        if self._pool is None:
            while not self._stopping.is_set():
                polled = await consumer.getmany(
                    timeout_ms=s.fetch_timeout_ms, max_records=s.max_batch
                )
                records = list(chain.from_iterable(polled.values()))
                if records and self.first_poll_at is None:
                    self.first_poll_at = time.monotonic()
                await self._find_caught_up(consumer, polled)
                async with self._lock:
                    await self.process(records)
            return
        await self._pipelined_loop(consumer, self._pool)

    async def _pipelined_loop(self, consumer: AIOKafkaConsumer, pool: DecodePool) -> None:
        """Fetch the next poll while helpers decode earlier ones; an applier task applies the
        decoded polls in order, each as soon as it is ready (it never waits for a fetch)."""
        s = self.settings
        queue: asyncio.Queue[tuple[int, asyncio.Task[Ingested]] | None] = asyncio.Queue()
        slots = asyncio.Semaphore(pool.processes + 1)  # polls decoding or waiting to apply
        applier = asyncio.create_task(self._apply_decoded(queue, slots))
        try:
            while not self._stopping.is_set() and not applier.done():
                polled = await consumer.getmany(
                    timeout_ms=s.fetch_timeout_ms, max_records=s.max_batch
                )
                records = list(chain.from_iterable(polled.values()))
                await self._find_caught_up(consumer, polled)
                if records:
                    if self.first_poll_at is None:
                        self.first_poll_at = time.monotonic()
                    if not await _unless_done(slots.acquire(), applier):
                        break
                    self._inflight += 1
                    queue.put_nowait((self._generation, asyncio.create_task(pool.ingest(records))))
                elif not self._inflight:  # idle: still close windows on time
                    async with self._lock:
                        await self._apply(None)
        finally:
            if applier.done():  # it failed: nothing will apply the rest
                while not queue.empty():
                    if (item := queue.get_nowait()) is not None:
                        item[1].cancel()
            else:
                queue.put_nowait(None)
            await applier  # applies what was fetched (so it is committed); raises its failure

    async def _apply_decoded(
        self,
        queue: asyncio.Queue[tuple[int, asyncio.Task[Ingested]] | None],
        slots: asyncio.Semaphore,
    ) -> None:
        while (item := await queue.get()) is not None:
            generation, decoding = item
            try:
                got = await decoding
                async with self._lock:
                    if generation == self._generation:
                        await self._apply(got)
                    # else: fetched before a revoke, never committed: the new owner re-reads it
            finally:
                self._inflight -= 1
                slots.release()

    async def process(self, records: Sequence[RecordLike]) -> None:
        """One poll's records (possibly none), decoded here: windows, reports, guards,
        commands, commit."""
        await self._apply(ingest(records, self._decoder) if records else None)

    async def _apply(self, got: Ingested | None) -> None:
        now = self._clock()
        late: list[RecordLike] = []
        if got is not None:
            n = len(got.records) + got.undecodable
            self.consumed += n
            self.metrics.consumed.inc(n)
            got = self._admitted(self._without_future(got, now))
            if got.rejected:
                self.metrics.undecodable.inc(len(got.rejected))
                kinds: dict[str, int] = {}
                for _, kind, _ in got.rejected:
                    kinds[kind] = kinds.get(kind, 0) + 1
                log.warning(
                    "dead-lettering %d comparison records of %s (%s), the first: %s",
                    len(got.rejected),
                    self._topic,
                    ", ".join(f"{kind} {n:,}" for kind, n in kinds.items()),
                    got.rejected[0][2],
                )
                await self._send_all(self._dead_letters(got.rejected))
            result = self.manager.process(got.batch, now)
            reports = result.reports
            for rollout, count in result.late_by_rollout.items():
                self.metrics.late.labels(rollout).inc(count)
            late = [got.records[i] for i in result.late_indices.tolist()]
            if late:
                self._explain_late(got.batch.ts[result.late_indices], now)
        else:
            reports = self.manager.advance(now)
        self.metrics.open_windows.set(self.manager.open_windows)
        if reports or late:
            await self._publish(reports, late, now)
        if self.shared:
            await self._publish_partials(now)
        if got is not None:  # only now: a poll that failed above is never committed
            self._commits.applied(got.next_offsets)
        await self._commit(force=bool(reports))

    def _explain_late(self, late_ts: npt.NDArray[np.int64], now: int) -> None:
        """Say (at most once a minute) when late records are dated before 1973: a request
        ``ts`` in seconds reads as January 1970 in milliseconds, late for every window, and
        the late count alone does not say why."""
        implausible = late_ts < MIN_PLAUSIBLE_MS
        if not implausible.any() or now - self._implausible_logged_ms < 60_000:
            return
        self._implausible_logged_ms = now
        log.warning(
            "%d late comparisons are dated before 1973 (event time %d, ...): is the requests' "
            "ts in seconds? Event times are epoch milliseconds",
            int(implausible.sum()),
            int(late_ts[implausible][0]),
        )

    def _admitted(self, got: Ingested) -> Ingested:
        """``got`` less the records of rollout pairs beyond what the aggregator keeps state
        for (:mod:`.admission`; they join ``got.rejected``)."""
        refused = self.admission.refused_rows(got.batch)
        if refused is None:
            return got
        keys, codes = got.batch.keys, got.batch.key_code
        rejected = got.rejected + [
            (got.records[i], "out_of_range", self.admission.reason(keys[int(codes[i])]))
            for i in np.flatnonzero(refused).tolist()
        ]
        keep = np.flatnonzero(~refused)
        records = [got.records[i] for i in keep.tolist()]
        return Ingested(
            got.batch.take(keep).with_used_keys(),
            records,
            got.undecodable,
            got.next_offsets,
            rejected,
        )

    def _without_future(self, got: Ingested, now: int) -> Ingested:
        """``got`` less the records dated beyond ``aggregate.max_future_ms`` from now (they
        join ``got.rejected``)."""
        limit = now + self.settings.max_future_ms
        future = got.batch.ts > limit
        if not future.any():
            return got
        rows = np.flatnonzero(future).tolist()
        rejected = got.rejected + [
            (
                got.records[i],
                "event_time",
                f"event time {int(got.batch.ts[i])} is {(int(got.batch.ts[i]) - now) / 1000:.0f}s "
                "ahead of the aggregator's clock (aggregate.max_future_ms); it would move the "
                "watermark and make every later record late",
            )
            for i in rows
        ]
        keep = np.flatnonzero(~future)
        records = [got.records[i] for i in keep.tolist()]
        return Ingested(got.batch.take(keep), records, got.undecodable, got.next_offsets, rejected)

    def _dead_letters(self, rejected: list[tuple[RecordLike, DeadLetterKind, str]]) -> list[_Send]:
        if self.dry_run:
            return []
        topic = self.config.topics.dead_letter
        sends = []
        for record, kind, reason in rejected:
            key, value, headers = self._dead_letter_writer.encode(
                record,  # type: ignore[arg-type]
                kind,
                reason,
            )
            sends.append(_Send(topic, value, key, headers))
        return sends

    def _comparison_partitions(self) -> int | None:
        """The comparisons topic's partition count in the client's metadata (None: unknown)."""
        known = self._consumer.partitions_for_topic(self._topic) if self._consumer else None
        return len(known) if known else None

    async def _publish_partials(self, now: int) -> None:
        closed = self.manager.take_partials()
        if not closed:
            return
        total = max(self._comparison_partitions() or 0, *(c.partition + 1 for c in closed))
        topic = self.settings.partials_topic
        await self._send_all(
            [
                _Send(
                    topic,
                    _REPORT_ENCODER.encode(partial_of(c.aggregate, c.partition, total, now)),
                    c.aggregate.key.rollout.encode(),
                )
                for c in closed
            ]
        )

    async def _publish(self, reports: list[WindowReport], late: list[RecordLike], now: int) -> None:
        sends: list[_Send] = []
        publishing = self._producer is not None and not self.dry_run
        for report in reports:
            if publishing:
                value = _REPORT_ENCODER.encode(report)
                sends.append(_Send(self.settings.reports_topic, value, report.rollout.encode()))
            else:
                log.info(
                    "dry run: report %s [%d, %d) records=%d",
                    report.rollout,
                    report.window_start_ms,
                    report.window_end_ms,
                    report.counts.records,
                )
            events = self.guards.evaluate(report)
            for reset in self.guards.take_resets():
                self._on_reset(reset)
            acting = commanding(events)
            for event in events:
                sends += self._on_event(event, now, acts=any(event is e for e in acting))
            if not acting and self.settings.verdicts:
                sends += self._verdict(report, now)
            self.metrics.observe_report(report, self.guards)
            self.reports_total += 1
            if self.keep_reports:
                self.reports.append(report)
        late_topic = self.settings.late_topic
        if late and publishing and late_topic:
            headers = [(LATE_HEADER, self._topic.encode())]
            sends += [
                _Send(late_topic, rec.value, getattr(rec, "key", None), headers) for rec in late
            ]
        await self._send_all(sends)

    async def _send_all(self, sends: list[_Send]) -> None:
        """Produce every record; re-send those refused with a retriable error (a leader
        moving, a timeout) with backoff, for up to ``kafka.request_timeout_ms`` x 3.

        At-least-once: a record may be written twice, none is skipped. A non-retriable error,
        or one that outlasts the retries, stops the service (nothing behind it is committed).
        """
        producer = self._producer
        if not sends or producer is None:
            return
        deadline = time.monotonic() + 3 * self.config.kafka.request_timeout_ms / 1000
        backoff = Backoff(0.2, 5.0)
        while True:
            # Handed over one by one, in order (per-partition order is kept), then awaited.
            handed: list[tuple[_Send, asyncio.Future[Any] | KafkaError]] = []
            for send in sends:
                try:
                    future = await producer.send(
                        send.topic,
                        send.value,
                        key=send.key,
                        headers=send.headers,
                        partition=send.partition,
                    )
                    handed.append((send, future))
                except KafkaError as exc:
                    handed.append((send, exc))
            failed: list[tuple[_Send, KafkaError]] = []
            for send, outcome in handed:
                if isinstance(outcome, asyncio.Future):
                    try:
                        await outcome
                        continue
                    except KafkaError as exc:
                        outcome = exc
                failed.append((send, outcome))
            if not failed:
                return
            send, error = failed[0]
            if is_permanent(error):
                size = len(send.value or b"") + len(send.key or b"")
                raise refusal(error, send.topic, 1, size) from error
            if time.monotonic() > deadline:
                raise error
            log.warning(
                "%d of %d records refused (%s: %s); re-sending in %.1fs",
                len(failed),
                len(sends),
                type(error).__name__,
                error,
                backoff.delay,
            )
            await backoff.wait()
            sends = [send for send, _ in failed]

    def _verdict(self, report: WindowReport, now: int) -> list[_Send]:
        """The window's guard verdict as a signed command, when one is due (see
        ``actions.guard_verdict`` and ``VerdictPacer``)."""
        active = set(self.guards.active(report.rollout))
        breached = [
            r.name for r in self.guards.rules if r.action in COMMAND_ACTIONS and r.name in active
        ]
        cmd = guard_verdict(report, breached, self.settings.verdict_min_records, now)
        if cmd is None or not self._verdict_pacer.due(cmd, now):
            return []
        if self.dry_run or self._producer is None or self.key is None:
            log.info("dry run: would publish verdict %s: %s", cmd.command_id, cmd.args.verdict)
            return []
        from ..control.plane import CONTROL_PARTITION

        signed = sign_command(cmd, self.key)
        self.verdicts.append(signed)
        self.metrics.commands.labels(report.rollout, "verdict", "published").inc()
        log.info("guard verdict %s: %s", signed.command_id, cmd.args.verdict)
        return [
            _Send(
                self.config.topics.control,
                encode_command(signed),
                report.rollout.encode(),
                partition=CONTROL_PARTITION,
            )
        ]

    def _on_reset(self, reset: GuardReset) -> None:
        self.metrics.guard_resets.labels(reset.rollout).inc()
        log.info(
            "guard state of %s (%s -> %s) reset: policy epoch %d (%s) -> %d (%s) in window %s",
            reset.rollout,
            reset.champion_version,
            reset.candidate_version,
            reset.from_epoch,
            reset.from_mode,
            reset.to_epoch,
            reset.to_mode,
            utc_window(reset.window_start_ms, reset.window_end_ms),
        )

    def _on_event(self, event: GuardEvent, now: int, *, acts: bool = True) -> list[_Send]:
        """Log and count a guard event; a fired rollback/pause becomes a signed command
        (unless ``acts`` is False: another command of the same window covers it, see
        ``actions.commanding``)."""
        self.events.append(event)
        self.metrics.observe_event(event)
        action = event.rule.action
        if event.kind == "cleared":
            log.info("guard cleared for %s: %s", event.rollout, event.reason)
            return []
        if action not in COMMAND_ACTIONS:
            log.warning("guard alert for %s: %s", event.rollout, event.reason)
            return []
        if not acts:
            log.warning(
                "guard %s fired for %s; its %s is not sent: another command of the same window "
                "covers it: %s",
                event.rule.name,
                event.rollout,
                action,
                event.reason,
            )
            return []
        cmd = guard_command(event, self._topic, issued_at_ms=now)
        if self.dry_run or self._producer is None:
            self.metrics.commands.labels(event.rollout, action, "dry_run").inc()
            log.warning(
                "dry run: would publish %s %s to %s: %s",
                action,
                cmd.command_id,
                self.config.topics.control,
                cmd.reason,
            )
            self.commands.append(cmd)
            return []
        assert self.key is not None
        signed = sign_command(cmd, self.key)
        from ..control.plane import CONTROL_PARTITION

        if action == "pause":
            self.guards.published_pause(event)
        self.commands.append(signed)
        self.metrics.commands.labels(event.rollout, action, "published").inc()
        log.warning("guard fired: publishing %s %s: %s", action, signed.command_id, signed.reason)
        send = _Send(
            self.config.topics.control,
            encode_command(signed),
            event.rollout.encode(),
            partition=CONTROL_PARTITION,
        )
        return [send]

    async def _commit(self, *, force: bool = False) -> None:
        interval = self.settings.commit_interval_ms / 1000.0
        if not force and time.monotonic() - self._last_commit < interval:
            return
        self._last_commit = time.monotonic()
        await self._commits.commit(self._consumer, self.manager.open_first_offsets())


__all__ = ["KEEP_RECENT", "LATE_HEADER", "AggregatorService", "signing_key"]
