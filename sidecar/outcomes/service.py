"""``sidecar outcomes``: the Kafka edge of the join of comparisons with delayed outcomes.

::

    outcomes topic --router (group <g>.router)--> <g>.by-task (partition = the request's task)
    comparisons topic --+
    <g>.by-task --------+--> tasks (group <g>, partition p of both: co-partitioned)
                                 | poll -> InputChunk -> <g>.changelog[p] (acks) -> store (RocksDB)
                                 +-> QualityReport (provisional / final) -> quality topic
                                 +-> guards on final reports -> signed commands -> control topic
                                 +-> QualityVerdict per final window -> verdicts topic
                                 (comparisons keyed by routing key: each task's
                                  QualityPartial -> <g>.partials -> merge stage (group
                                  <g>.merge, one per rollout) -> reports, guards, verdicts;
                                  see ``partials`` and ``merge_stage``)

A *task* is one partition number: partition p of the comparisons topic and of ``<g>.by-task``
(the consumer group uses the range assignor, which gives a member the same partition numbers
of both topics). Its state is a RocksDB store in ``outcomes.state_dir/task-<p>`` and its
changelog partition p. Every poll of a task becomes changelog records first (acknowledged),
then is applied to the store in one atomic batch with the changelog offset and the input
offsets it covers; so after a SIGKILL, a restart replays the changelog from where its store
stopped (at most the last poll) and resumes the inputs after what the changelog holds: nothing
is lost and no request is counted twice. A member that gets a partition without the store (a
rebalance, a new machine) replays that partition's whole changelog first (its inputs stay
paused meanwhile). A rollout pair whose windows are all final and that had no comparison for
``outcomes.retire_after_ms`` is retired through the changelog too (a ``RetireMark``), so the
tasks' state, the caps and the metric series follow the live pairs, not every pair ever seen.
Reports are at-least-once (a final report may be published again after a crash between it and
its changelog mark: key them by rollout, window and status).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from ..aggregate.actions import command_id
from ..aggregate.guards import GuardEngine, GuardEvent
from ..config import SidecarConfig
from ..control.commands import CommandArgs, ControlCommand, Verdict, encode_command, sign_command
from ..control.keys import SigningKey
from ..errors import ConfigError
from ..hashing import kafka_partition
from ..health import (
    BrokerProbe,
    Check,
    HealthState,
    HealthWatcher,
    assignment_check,
    group_joined,
    tasks_check,
)
from ..kafka import (
    RebalanceListener,
    Supervisor,
    client_kwargs,
    ensure_topics,
    fetch_bytes,
    new_consumer,
    new_producer,
    stop_quietly,
    topic_configs,
    topic_partitions,
)
from ..timefmt import utc, utc_window
from ..untrusted import clip, error_text, printable
from .build_pool import BuildPool
from .chunks import (
    ChangelogRecord,
    ExpireMark,
    FinalMark,
    InputChunk,
    RetireMark,
    decode,
    encode,
)
from .decode import ChunkBuilder, Skipped
from .heartbeat import RouterHeartbeat, heartbeat_of, outcomes_bound
from .join import ApplyStats, JoinTask, PairRecord, Retired, Windows, stream_bound
from .merge_stage import QualityMergeStage
from .metrics import OutcomesMetrics
from .partials import MergeOutput, merged_key, partial_key, partial_of
from .publish import Publisher, Send
from .ranking import PairedRankingQuality
from .report import (
    QUALITY_FIGURES,
    PairKey,
    QualityReport,
    QualityVerdict,
    ReportStatus,
    quality_report,
    quality_verdict,
)
from .router import OutcomeRouter
from .store import Store, StoreError, cache_advice

log = logging.getLogger(__name__)

_JSON = msgspec.json.Encoder()
#: ``issued_by`` of the commands quality guards publish.
ISSUER = "outcomes"
#: Reports kept in memory for callers (the demo's panel); older ones are only on the topic.
RECENT_REPORTS = 256
#: Comparisons left out for naming too many rollout pairs are logged at most this often.
REFUSED_LOG_S = 60.0
COMMAND_ACTIONS = ("rollback", "pause")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def configured_pair(config: SidecarConfig) -> PairKey | None:
    """The rollout pair the config runs (None without a candidate)."""
    pair = config.rollout_pair()
    return None if pair is None else PairKey(*pair)


def signing_key(cfg: SidecarConfig, key: SigningKey | None) -> SigningKey | None:
    """The key quality guard commands and quality verdicts are signed with; None when nothing
    needs signing.

    Raises ConfigError (saying what to set) when something is to be signed but no key of role
    ``guard`` is usable.
    """
    s = cfg.outcomes
    commands = any(r.action in COMMAND_ACTIONS for r in s.rules)
    if s.dry_run or not (commands or s.control_verdicts):
        return key
    if key is None:
        if not s.signing_key_file:
            raise ConfigError(
                "the outcomes stage signs quality guard commands and quality verdicts: set "
                "outcomes.signing_key_file to a key of role guard (`sidecar ctl keygen --role "
                "guard`), or set outcomes.dry_run = true (or make outcomes.rules alerts and "
                "set outcomes.control_verdicts = false)"
            )
        key = SigningKey.from_file(s.signing_key_file)
    if key.role not in ("guard", "operator"):
        raise ConfigError(
            f"outcomes.signing_key_file holds a key of role {key.role}; quality guard commands "
            "and verdicts need role guard"
        )
    return key


def quality_command(verdict: QualityVerdict, issued_at_ms: int) -> ControlCommand:
    """The (unsigned) ``verdict`` command that carries ``verdict``'s own gate to the control
    plane as ``quality_ok``: about the two models, not a policy epoch (no expected epoch), so
    it still counts after a ramp step. It names the two versions judged: a promotion gated on
    quality counts it only for the candidate version it promotes."""
    gate = verdict.gate
    detail = (
        f"{verdict.candidate_model} {verdict.candidate_version} vs {verdict.champion_model} "
        f"{verdict.champion_version}: {gate.code}: {gate.reason}"
    )[:256]
    return ControlCommand(
        command_id=f"quality-verdict:{verdict.rollout}:{verdict.candidate_version}:"
        f"{verdict.last_window_end_ms}"[:256],
        rollout=verdict.rollout,
        action="verdict",
        issued_by=ISSUER,
        reason=(
            f"quality verdict over {verdict.windows} final windows to "
            f"{utc_window(verdict.first_window_start_ms, verdict.last_window_end_ms)}"
        )[:256],
        issued_at_ms=issued_at_ms,
        args=CommandArgs(
            verdict=Verdict(
                quality_ok=gate.ok,
                window_end_ms=verdict.last_window_end_ms,
                detail=detail,
                candidate_version=verdict.candidate_version or None,
                champion_version=verdict.champion_version or None,
            )
        ),
    )


def _merge_ranking(
    acc: PairedRankingQuality | None, more: PairedRankingQuality | None
) -> PairedRankingQuality | None:
    """Two tasks' ranking accumulators of one pair merged (a task whose pair started with
    another ``ranking_k`` after a config change is left out: its figures are of another k)."""
    if more is None or acc is None:
        return acc if more is None else more
    return acc.merge(more) if more.k == acc.k else acc


def changelog_key(record: ChangelogRecord, task: int) -> bytes:
    """Unique per record (the topic is compacted: nothing but a rewrite of the same record may
    share its key)."""
    if isinstance(record, FinalMark):
        pair = zlib.crc32(repr(tuple(record.pair)).encode())
        return f"final/{record.pair.rollout}/{pair:08x}/{record.window_start_ms}".encode()
    if isinstance(record, ExpireMark):
        return f"expire/{task}/{record.before_ms}".encode()
    if isinstance(record, RetireMark):
        pair = zlib.crc32(repr(tuple(record.pair)).encode())
        return f"retire/{record.pair.rollout}/{pair:08x}/{task}/{record.pair_id}".encode()
    first = ",".join(f"{k}{a}" for k, (a, _) in sorted(record.offsets.items()))
    return f"input/{task}/{first}".encode()


BARRIER_KEY = b"barrier"


@dataclass
class TaskRuntime:
    """A task this member owns: its join once restored."""

    partition: int
    join: JoinTask | None = None
    restoring: asyncio.Task[None] | None = None
    last_expire_cutoff: int = 0
    #: Wall clock (ms) when the task last got comparisons, or was restored.
    last_record_ms: int = 0
    #: The latest heartbeat of each router member (read from the task's by-task partition).
    beats: dict[str, RouterHeartbeat] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.join is not None and self.restoring is None


@dataclass(slots=True)
class PollOf:
    """One task's records of a poll, and the build of their chunks (in the helper process)."""

    task: TaskRuntime
    comparisons: list[Any]
    outcomes: list[Any]
    skipped: Skipped
    built: asyncio.Future[list[tuple[InputChunk, bytes]]]


@dataclass(frozen=True, slots=True)
class Holder:
    """A task holding a rollout pair (the pair's id and record are the task's own)."""

    task: TaskRuntime
    pair: PairRecord


class OutcomesService:
    """One ``sidecar outcomes`` process: the router and the join tasks it owns."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        key: SigningKey | None = None,
        metrics: OutcomesMetrics | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.config = config
        self.settings = s = config.outcomes
        self.dry_run = s.dry_run
        self.key = signing_key(config, key)
        #: Per rollout: the quality gate last published to the control plane, and when.
        self._control_verdicts: dict[str, tuple[bool, int]] = {}
        self.layout = s.layout()
        self.windows = Windows(s.report_window_ms, s.comparison_lateness_ms, s.outcome_grace_ms)
        self.judging = s.judging()
        self.guards = GuardEngine(s.rules, QUALITY_FIGURES)
        self.metrics = metrics or OutcomesMetrics()
        self.health = HealthState("outcomes")
        self.clock = clock
        self.builder = ChunkBuilder(s)
        self._pool: BuildPool | None = None
        self.state_dir = Path(s.state_dir)
        self.tasks: dict[int, TaskRuntime] = {}
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._publisher: Publisher | None = None
        self.router: OutcomeRouter | None = None
        self._supervisor = Supervisor("outcomes", lambda failure: self._stopping.set())
        self._topics = (config.topics.comparisons, s.by_task_topic)
        self._partitions = 0
        #: Shared rollouts: the merge stage, the partials topic's partition count, and the
        #: empty final partials sent for tasks without the pair (pair, window, task).
        self.merge: QualityMergeStage | None = None
        self._partials_partitions = 0
        self._empty_finals: set[tuple[PairKey, int, int]] = set()
        self._last_provisional = 0.0
        self._last_commit = 0.0
        #: What this process published (bounded); ``subscribers`` see every one as it goes.
        self.recent: collections.deque[QualityReport] = collections.deque(maxlen=RECENT_REPORTS)
        self.verdicts: dict[str, QualityVerdict] = {}
        self.commands: collections.deque[ControlCommand] = collections.deque(maxlen=64)
        #: Quality verdicts published to the control plane (``outcomes.control_verdicts``).
        self.verdict_commands: collections.deque[ControlCommand] = collections.deque(maxlen=64)
        self.subscribers: list[Callable[[QualityReport | QualityVerdict], None]] = []
        self.applied = ApplyStats()
        self._refused_logged = -math.inf
        #: ``time.monotonic()`` when the first input records were applied (the benchmark).
        self.first_input_at: float | None = None
        #: Per task, polls fetched but not applied yet (with a build helper, the poll built
        #: while the previous one is applied): its inputs are not read to their end while
        #: any is (see :meth:`_read_to_end`).
        self._unapplied: collections.Counter[int] = collections.Counter()

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self._consumer

    async def run(self, install_signal_handlers: bool = False) -> None:
        """Consume until stopped (or a background task dies: then raise its error)."""
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        watcher = self._watch()
        try:
            await self._start()
            self.ready.set()
            log.info(
                "outcomes: joining %s with %s (%d ms windows, labels within %d ms at most), "
                "state in %s%s",
                self.config.topics.comparisons,
                self.settings.topic,
                self.settings.report_window_ms,
                self.settings.max_label_window_ms(),
                self.state_dir,
                " (DRY RUN: reports, verdicts and commands are only logged)"
                if self.dry_run
                else "",
            )
            await self._loop()
        finally:
            self._stopping.set()
            await self._supervisor.stop()
            with contextlib.suppress(Exception):
                async with self._lock:
                    await self._commit(force=True)
            await watcher.stop()
            await self._close()
        self._supervisor.raise_failure()

    async def _ensure_topics(self) -> int:
        """The internal topics, partitioned like the comparisons; their partition count."""
        cfg, s = self.config, self.settings
        probe = new_consumer(cfg, "outcomes")
        await probe.start()
        try:
            n = len(await topic_partitions(probe, cfg.topics.comparisons, wait_s=10.0))
            kafka = client_kwargs(cfg.kafka)
            await ensure_topics(
                topics=[s.by_task_topic],
                partitions=n,
                replication_factor=cfg.topics.replication_factor,
                **kafka,
            )
            await ensure_topics(
                topics=[s.changelog_topic],
                partitions=n,
                replication_factor=cfg.topics.replication_factor,
                configs={
                    "cleanup.policy": "compact,delete",
                    "retention.ms": str(s.changelog_retention_ms()),
                },
                **kafka,
            )
            configs = (await topic_configs(cfg, [s.changelog_topic]))[s.changelog_topic]
            if not configs:
                log.info(
                    "could not read %s's configs (DescribeConfigs): its retention is not "
                    "checked against the label windows",
                    s.changelog_topic,
                )
            for problem in s.changelog_problems(configs):
                log.warning("changelog %s: %s", s.changelog_topic, problem)
            if cfg.shared_rollouts:
                await ensure_topics(
                    topics=[s.partials_topic_name],
                    partitions=n,
                    replication_factor=cfg.topics.replication_factor,
                    configs={"cleanup.policy": "compact"},
                    **kafka,
                )
                self._partials_partitions = len(
                    await topic_partitions(probe, s.partials_topic_name, wait_s=10.0)
                )
            for topic in (s.by_task_topic, s.changelog_topic):
                m = len(await topic_partitions(probe, topic, wait_s=10.0))
                if m != n:
                    raise ConfigError(
                        f"{topic} has {m} partitions but {cfg.topics.comparisons} has {n}: the "
                        "join needs them equal (partition p of each is one task); delete it "
                        "(and outcomes.state_dir) so that it is recreated, or change its "
                        "partition count"
                    )
        finally:
            await stop_quietly(probe)
        return n

    async def _start(self) -> None:
        cfg, s = self.config, self.settings
        self._partitions = await self._ensure_topics()
        if s.decode_processes:
            self._pool = BuildPool(s.decode_processes, self.builder)
            await self._pool.start()
        batch_bytes = min(1 << 20, cfg.kafka.max_record_bytes)
        self._producer = new_producer(cfg, "outcomes", linger_ms=2, max_batch_size=batch_bytes)
        await self._producer.start()
        self._publisher = Publisher(
            self._producer,
            3 * cfg.kafka.request_timeout_ms / 1000,
            # Record batches built whole in C, unless aiokafka has to compress them.
            batch_bytes=batch_bytes if cfg.kafka.compression_type == "none" else None,
        )
        self.router = OutcomeRouter(cfg, self._publisher, self.metrics, self.clock)
        await self.router.start(self._partitions)
        self._supervisor.spawn(self.router.run(), "outcomes-router")
        if cfg.shared_rollouts:
            self.merge = QualityMergeStage(
                cfg,
                self._publisher,
                self._publish_merged,
                self.clock,
                self._forget_rollouts,
                tasks=self._partitions,
                on_unusable=self.metrics.skipped.labels("partials", "unusable").inc,
            )
            await self.merge.start()
            self._supervisor.spawn(self.merge.run(), "outcomes-merge")
        self._consumer = new_consumer(
            cfg,
            "outcomes",
            group_id=s.group_id,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            # Small fetches keep the buffers out of the way of the heap's fragmentation
            # (16 MiB less at the peak than 8/64 MiB, at the same rate: bench_outcomes.py).
            max_partition_fetch_bytes=fetch_bytes(cfg.kafka.max_record_bytes),
            fetch_max_bytes=2 * fetch_bytes(cfg.kafka.max_record_bytes),
        )
        await self._consumer.start()
        for topic in self._topics:
            await topic_partitions(self._consumer, topic, wait_s=10.0)
        self._consumer.subscribe(
            list(self._topics),
            listener=RebalanceListener(
                "outcomes", on_revoked=self._revoked, on_assigned=self._assigned
            ),
        )

    async def _close(self) -> None:
        for rt in list(self.tasks.values()):
            await self._drop_task(rt)
        if self.router is not None:
            await self.router.close()
        if self.merge is not None:
            await self.merge.close()
        for client in (self._consumer, self._producer):
            await stop_quietly(client)
        self._consumer = self._producer = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- rebalance -------------------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked}
        async with self._lock:
            await self._commit(force=True)
            for p in parts:
                rt = self.tasks.pop(p, None)
                if rt is not None:
                    await self._drop_task(rt)

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        parts = sorted({tp.partition for tp in assigned})
        for p in parts:
            if p in self.tasks:
                continue
            tps = [TopicPartition(t, p) for t in self._topics]
            consumer.pause(*[tp for tp in tps if tp in assigned])
            rt = TaskRuntime(p)
            self.tasks[p] = rt
            rt.restoring = self._supervisor.spawn(
                self._restore(rt), f"outcomes-restore-{p}", finite=True
            )

    async def _drop_task(self, rt: TaskRuntime) -> None:
        if rt.restoring is not None:
            await self._supervisor.cancel([rt.restoring])
            rt.restoring = None
        if rt.join is not None:
            rt.join.store.close()
            rt.join = None

    async def _restore(self, rt: TaskRuntime) -> None:
        """Bring task ``rt``'s store up to its changelog's end, then resume its inputs."""
        s, p = self.settings, rt.partition
        started = time.monotonic()
        path = self.state_dir / f"task-{p}"
        join = await asyncio.to_thread(self._open, path, p)
        assert self._publisher is not None
        barrier = await self._publisher.send(
            Send(
                s.changelog_topic,
                _JSON.encode({"barrier": self.config.kafka.client_id, "at": self.clock()}),
                BARRIER_KEY,
                partition=p,
            )
        )
        end = barrier.offset
        if join.meta.changelog_next > end + 1:
            log.warning(
                "task %d: store at %s has applied changelog offset %d but %s[%d] ends at %d "
                "(the changelog was recreated?); rebuilding the store from the changelog",
                p,
                path,
                join.meta.changelog_next,
                s.changelog_topic,
                p,
                end,
            )
            join.store.close()
            await asyncio.to_thread(Store.destroy, path)
            join = await asyncio.to_thread(self._open, path, p)
        replayed = await self._replay(join, p, end)
        consumer = self._consumer
        assert consumer is not None
        async with self._lock:
            for key, topic in (("c", self._topics[0]), ("o", self._topics[1])):
                tp = TopicPartition(topic, p)
                if tp not in consumer.assignment():
                    continue
                offset = join.meta.inputs.get(key)
                if offset is not None:
                    consumer.seek(tp, offset)
                consumer.resume(tp)
            rt.join = join
            rt.last_record_ms = self.clock()
            rt.restoring = None
        took = time.monotonic() - started
        self.metrics.restore_seconds.set(took)
        advice = cache_advice(join.store.filter_mb(), s.cache_mb)
        if advice is not None:
            log.warning("task %d: %s", p, advice)
        log.info(
            "task %d restored in %.2fs: %d changelog records replayed, %d requests stored, "
            "changelog at %d",
            p,
            took,
            replayed,
            join.meta.stored,
            join.meta.changelog_next,
        )

    def _open(self, path: Path, p: int) -> JoinTask:
        s = self.settings
        store = Store(path, cache_mb=s.cache_mb, write_buffer_mb=s.write_buffer_mb)
        return JoinTask(
            store,
            p,
            self.layout,
            self.windows,
            self.judging,
            max_label_window_ms=s.max_label_window_ms(),
            max_pairs=s.max_pairs_per_task,
            max_rollouts=s.max_rollouts_per_task,
            retire_after_ms=s.retire_after_ms,
            configured=configured_pair(self.config),
        )

    async def _replay(self, join: JoinTask, p: int, end: int) -> int:
        """Apply changelog records ``join.meta.changelog_next`` .. ``end`` (the barrier)."""
        s = self.settings
        tp = TopicPartition(s.changelog_topic, p)
        consumer = new_consumer(
            self.config,
            "outcomes-restore",
            instance=str(p),
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 << 20,
            fetch_max_wait_ms=50,
        )
        await consumer.start()
        replayed = 0
        try:
            consumer.assign([tp])
            if join.meta.changelog_next:
                consumer.seek(tp, join.meta.changelog_next)
            else:
                await consumer.seek_to_beginning(tp)
            done = False
            while not done:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=500)
                for rec in batch.get(tp, []):
                    if rec.offset >= end:
                        join.skip(rec.offset)
                        done = True
                        break
                    if rec.key == BARRIER_KEY:
                        join.skip(rec.offset)
                        continue
                    await asyncio.to_thread(self._apply_one, join, rec.value, rec.offset)
                    replayed += 1
        finally:
            await stop_quietly(consumer)
        self.metrics.restored_records.inc(replayed)
        return replayed

    def _apply_one(
        self,
        join: JoinTask,
        raw: bytes | None,
        offset: int,
        record: ChangelogRecord | None = None,
    ) -> ApplyStats | None:
        """Apply one changelog record (``record``: already decoded from ``raw``); a record that
        cannot be read or applied is skipped, logged and counted: a stage that stopped on it
        would stop on it again at every restart. A store that cannot be written (a full
        disk) stops the stage instead: the record is not at fault, and a restart once the
        disk is fixed applies it."""
        if record is None:
            try:
                record = decode(raw or b"")
            except Exception as exc:
                log.error(
                    "%s[%d] offset %d is not a changelog record (%s); skipped",
                    self.settings.changelog_topic,
                    join.task,
                    offset,
                    error_text(exc),
                )
                self.metrics.skipped.labels("changelog", "undecodable").inc()
                join.skip(offset)
                return None
        try:
            return join.apply(record, offset)
        except StoreError:
            raise  # the disk, not the record: skipping would lose the record for good
        except Exception:
            log.exception(
                "%s[%d] offset %d could not be applied; skipped",
                self.settings.changelog_topic,
                join.task,
                offset,
            )
            self.metrics.skipped.labels("changelog", "apply_error").inc()
            join.reload()
            join.skip(offset)
            return None

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Poll, turn each task's records into changelog chunks, write them, apply them.

        With a build helper (``outcomes.decode_processes``) a poll's chunks are built there
        while this loop writes and applies the previous poll's: a task's polls are still
        written and applied in order, one at a time. A poll built for a task that was
        revoked (or restored again) meanwhile is dropped unwritten: its records are read
        again from the offsets the store holds. (Fetching the next poll while one is applied
        was measured too: in one process the two only contend for the GIL, and it was
        slower.)"""
        consumer = self._consumer
        assert consumer is not None
        s = self.settings
        comparisons = self._topics[0]
        previous: list[PollOf] = []
        todo: list[PollOf] = []
        try:
            while not self._stopping.is_set():
                polled = await consumer.getmany(
                    timeout_ms=s.fetch_timeout_ms, max_records=s.max_batch
                )
                async with self._lock:
                    # Per task, its poll of each input (getmany gives one list per
                    # partition: used as it is, not copied).
                    work: dict[int, list[list[Any]]] = {}
                    for tp, records in polled.items():
                        rt = self.tasks.get(tp.partition)
                        if rt is None or not rt.ready:
                            continue  # fetched before the pause: re-read after the restore
                        inputs = work.setdefault(tp.partition, [[], []])
                        inputs[0 if tp.topic == comparisons else 1] = records
                    current = [self._build(self.tasks[p], c, o) for p, (c, o) in work.items()]
                    for poll in current:
                        self._unapplied[poll.task.partition] += 1
                    if self._pool is None or not self._pool.alive:
                        todo, previous = [*previous, *current], []
                    else:
                        todo, previous = previous, current
                    while todo:
                        await self._write(todo[0])
                        self._dropped([todo.pop(0)])
                    await self._tick()
        finally:
            left = [*todo, *previous]  # never written: read again from the stores' offsets
            self._dropped(left)
            with contextlib.suppress(BaseException):
                await asyncio.gather(*(poll.built for poll in left), return_exceptions=True)

    def _dropped(self, polls: list[PollOf]) -> None:
        """``polls`` are no longer in hand (applied, or dropped unwritten: their builds are
        cancelled, which does nothing to a finished one)."""
        for poll in polls:
            poll.built.cancel()
            p = poll.task.partition
            self._unapplied[p] -= 1
            if self._unapplied[p] <= 0:
                del self._unapplied[p]

    def _build(self, rt: TaskRuntime, comps: list[Any], outs: list[Any]) -> PollOf:
        """Start building a task's poll into changelog chunks (in the helper, else now)."""
        if self.first_input_at is None:
            self.first_input_at = time.monotonic()
        skipped = Skipped()
        limit = self.config.kafka.max_record_bytes - 4096
        now = self.clock()
        built: asyncio.Future[list[tuple[InputChunk, bytes]]]
        if self._pool is not None and self._pool.alive:
            built = asyncio.ensure_future(
                self._pool.build(rt.partition, comps, outs, now, skipped, limit)
            )
        else:
            built = asyncio.get_running_loop().create_future()
            built.set_result(
                self.builder.build(rt.partition, comps, outs, now, skipped, max_bytes=limit)
            )
        return PollOf(rt, comps, outs, skipped, built)

    async def _write(self, poll: PollOf) -> None:
        """Write a task's built poll to the changelog, then apply it (dropped, unwritten,
        when the task is no longer this one: revoked or restored again since)."""
        rt = poll.task
        chunks = await poll.built
        if self.tasks.get(rt.partition) is not rt or not rt.ready:
            return
        join = rt.join
        assert join is not None and self._publisher is not None
        comps, outs = poll.comparisons, poll.outcomes
        self.metrics.consumed.labels("comparisons").inc(len(comps))
        self.metrics.consumed.labels("outcomes").inc(len(outs))
        for (source, reason), n in poll.skipped.counts.items():
            self.metrics.skipped.labels(source, reason).inc(n)
        topic = self.settings.changelog_topic
        # The poll's chunks go to the changelog together (one round trip); each is applied
        # once acknowledged, in changelog order.
        sent = await self._publisher.send_all(
            [
                Send(topic, raw, changelog_key(chunk, rt.partition), partition=rt.partition)
                for chunk, raw in chunks
            ]
        )
        self.metrics.changelog_records.labels("input").inc(len(chunks))
        for (chunk, raw), md in zip(chunks, sent, strict=True):
            stats = await asyncio.to_thread(self._apply_one, join, raw, md.offset, chunk)
            if stats is not None:
                self._observe(stats)
        for rec in outs:
            beat = heartbeat_of(rec)
            if beat is not None:
                rt.beats[beat.member] = beat
        if comps:
            rt.last_record_ms = self.clock()

    def _observe(self, stats: ApplyStats) -> None:
        self.applied.add(stats)
        m = self.metrics
        m.duplicates.inc(stats.duplicates)
        m.outside_window.inc(stats.outside_window)
        for rollout, n in stats.late.items():
            m.late.labels(rollout).inc(n)
        for rollout, n in stats.joined.items():
            m.joined.labels(rollout).inc(n)
        if stats.refused:
            m.skipped.labels("comparisons", "too_many_pairs").inc(stats.refused)
            if time.monotonic() - self._refused_logged >= REFUSED_LOG_S:
                self._refused_logged = time.monotonic()
                pair = stats.refused_pair
                log.warning(
                    "%d comparisons left out: a task holds at most %d rollout pairs and %d "
                    "rollouts (outcomes.max_pairs_per_task, max_rollouts_per_task), and they "
                    "name more (e.g. %s). Is something writing made-up rollout names or "
                    "versions to %s? Counted in "
                    'sidecar_outcomes_skipped{reason="too_many_pairs"}',
                    stats.refused,
                    self.settings.max_pairs_per_task,
                    self.settings.max_rollouts_per_task,
                    printable(clip(repr(tuple(pair)) if pair is not None else "?", 300)),
                    self.config.topics.comparisons,
                )

    async def _mark(
        self, rt: TaskRuntime, record: FinalMark | ExpireMark | RetireMark
    ) -> ApplyStats | None:
        assert rt.join is not None and self._publisher is not None
        raw = encode(record)
        md = await self._publisher.send(
            Send(
                self.settings.changelog_topic,
                raw,
                changelog_key(record, rt.partition),
                partition=rt.partition,
            )
        )
        kind = (
            "final"
            if isinstance(record, FinalMark)
            else "expire"
            if isinstance(record, ExpireMark)
            else "retire"
        )
        self.metrics.changelog_records.labels(kind).inc()
        return await asyncio.to_thread(self._apply_one, rt.join, raw, md.offset, record)

    def _check_partitions(self) -> None:
        """Stop when the comparisons topic no longer has the partitions the tasks were built
        for (it was grown, or deleted and recreated): comparisons on a new partition would
        never meet their outcomes (routed to ``by-task`` partitions by the old count), and
        nothing would say so. Seen when the client refreshes its metadata
        (``kafka.metadata_max_age_ms``); the start-up check then refuses to start until the
        internal topics match again."""
        consumer = self._consumer
        comparisons = self._topics[0]
        found = consumer.partitions_for_topic(comparisons) if consumer is not None else None
        if not found or len(found) == self._partitions:
            return
        s = self.settings
        raise ConfigError(
            f"{comparisons} now has {len(found)} partitions, but this stage's tasks, "
            f"{s.by_task_topic} and {s.changelog_topic} have {self._partitions}: comparisons "
            "on the new partitions would never meet their outcomes, so the stage stops. "
            f"Stop every `sidecar outcomes run` of group {s.group_id}, then give "
            f"{s.by_task_topic} and {s.changelog_topic} {len(found)} partitions too (or delete "
            "them and outcomes.state_dir to rebuild), and start again; requests pending across "
            "the change may close without their outcome (see README: Ground truth)"
        )

    async def _tick(self) -> None:
        """Stream time, final windows, provisional reports, unmatched outcomes, commits."""
        self._check_partitions()
        s = self.settings
        now = self.clock()
        mono = time.monotonic()
        provisional = mono - self._last_provisional >= s.provisional_interval_ms / 1000
        ready = [rt for rt in self.tasks.values() if rt.ready]
        for rt in ready:
            join = rt.join
            assert join is not None
            join.advance(
                stream_bound(
                    join.meta.input_ms.get("c", join.meta.stream_ms),
                    await self._read_to_end(rt.partition, self._topics[0]),
                    now - rt.last_record_ms - s.idle_timeout_ms,
                    outcomes_bound(rt.beats.values(), now, s.idle_timeout_ms),
                )
            )
        if self.config.shared_rollouts:
            await self._share(ready, now, provisional)
        else:
            for holders, ws in self._due(ready):
                await self._finalize(holders, ws, now)
            if provisional:
                for holders, ws in self._mature(ready):
                    report = await asyncio.to_thread(self._report, holders, ws, "provisional", now)
                    await self._publish_report(report, now)
                    self._reported(holders, ws)
        await self._retire(ready)
        if provisional:
            for rt in ready:
                assert rt.join is not None
                cutoff = rt.join.orphan_cutoff(rt.join.stream_ms)
                if rt.join.meta.orphans and cutoff > rt.last_expire_cutoff:
                    await self._mark(rt, ExpireMark(before_ms=cutoff, stream_ms=rt.join.stream_ms))
                    rt.last_expire_cutoff = cutoff
            self._last_provisional = mono
        self._gauges()
        await self._commit()

    async def _retire(self, ready: list[TaskRuntime]) -> None:
        """Retire each task's finished, idle rollout pairs (``outcomes.retire_after_ms``)
        through the changelog. Shared rollouts: not while another task here still has a
        window of the pair open (its empty final partial would stand for this task's)."""
        if not self.settings.retire_after_ms:
            return
        holders = self._holders(ready) if self.config.shared_rollouts else {}
        gone: set[str] = set()
        for rt in ready:
            join = rt.join
            assert join is not None
            for pair in join.retirable(join.stream_ms):
                key = PairKey(*pair.key)
                if any(h.pair.open for h in holders.get(key, [])):
                    continue
                mark = RetireMark(pair=key, pair_id=pair.id, stream_ms=join.stream_ms)
                stats = await self._mark(rt, mark)
                for retired in stats.retired if stats is not None else []:
                    self._log_retired(rt.partition, retired)
                    gone.add(key.rollout)
        self._forget_rollouts(gone)

    def _log_retired(self, task: int, retired: Retired) -> None:
        pair, verdict = retired.pair, retired.verdict
        key = pair.key
        last = (
            "no final window had data"
            if verdict is None
            else f"last verdict {verdict.gate.code} over {verdict.windows} final windows to "
            f"{utc(verdict.last_window_end_ms)}, {verdict.judged_pairs} judged pairs: "
            f"{verdict.gate.reason}"
        )
        log.info(
            "rollout pair retired on task %d: %s (%s %s vs %s %s): every window final and no "
            "comparison since %s (outcomes.retire_after_ms); %s. A later comparison of it "
            "starts it afresh",
            task,
            printable(clip(key.rollout, 200)),
            printable(clip(key.candidate_model, 100)),
            printable(clip(key.candidate_version, 100)),
            printable(clip(key.champion_model, 100)),
            printable(clip(key.champion_version, 100)),
            utc(pair.idle_since()) if pair.idle_since() >= 0 else "its start",
            printable(clip(last, 600)),
        )

    def _forget_rollouts(self, rollouts: set[str]) -> None:
        """Drop the metric series and in-memory verdicts of ``rollouts`` that no task here
        (and no merge stage here) holds a pair of any more."""
        if not rollouts:
            return
        joins = [rt.join for rt in self.tasks.values() if rt.join is not None]
        live = {p.key.rollout for join in joins for p in join.pairs.values()}
        if self.merge is not None:
            live |= self.merge.merger.rollouts
        for rollout in rollouts - live:
            self.metrics.forget_rollout(rollout)
            self.verdicts.pop(rollout, None)
            self._control_verdicts.pop(rollout, None)

    async def _read_to_end(self, partition: int, topic: str) -> bool:
        """Whether the task's partition of ``topic`` is read up to the high watermark of its
        last fetch answer (Tansu's fetch responses carry a right one; its ListOffsets answers
        can be wrong)."""
        consumer = self._consumer
        if consumer is None:
            return False
        tp = TopicPartition(topic, partition)
        if tp not in consumer.assignment() or self._unapplied.get(partition):
            return False  # not ours, or records fetched to the end are not applied yet
        high = consumer.highwater(tp)
        return high is not None and await consumer.position(tp) >= high

    def _holders(self, ready: list[TaskRuntime]) -> dict[PairKey, list[Holder]]:
        """Per rollout pair, the tasks that hold it (one, unless keyed by routing key)."""
        out: dict[PairKey, list[Holder]] = {}
        for rt in ready:
            assert rt.join is not None
            for pair in rt.join.pairs.values():
                out.setdefault(PairKey(*pair.key), []).append(Holder(rt, pair))
        return out

    def _stream(self, holders: list[Holder], ready: list[TaskRuntime]) -> int:
        """A pair's stream time: its task's (rollout-keyed: one task holds a rollout)."""
        return min(h.task.join.stream_ms for h in holders if h.task.join is not None)

    async def _share(self, ready: list[TaskRuntime], now: int, provisional: bool) -> None:
        """Shared rollouts: each task's partials of the windows its instance has open.

        Per rollout pair and window open in any task here, a task sends a final partial (its
        accumulator, or an empty one when it has nothing of the window) once its own stream
        time passes the window's final time, then marks the window final in its store (a task
        without the pair at all remembers it in memory: after a restart it sends the same
        empty partial again, which changes nothing). With ``provisional``, a task's mature
        windows that changed get a provisional partial."""
        assert self._publisher is not None
        topic = self.settings.partials_topic_name
        partition = self._partials_partitions
        sends: list[Send] = []
        marks: list[tuple[TaskRuntime, FinalMark]] = []
        empties: list[tuple[PairKey, int, int]] = []
        live: set[tuple[PairKey, int]] = set()
        for key, holders in self._holders(ready).items():
            settings = holders[0].pair.settings
            by_task = {h.task.partition: h.pair.id for h in holders}
            for ws in sorted({ws for h in holders for ws in h.pair.open}):
                live.add((key, ws))
                final_at = self.windows.final_at(ws, settings)
                for rt in ready:
                    join = rt.join
                    assert join is not None
                    pid = by_task.get(rt.partition)
                    pair = join.pairs.get(pid) if pid is not None else None
                    held = pair is not None and ws in pair.open
                    if final_at <= join.stream_ms:
                        if pair is not None and not held and ws < pair.finalized_through:
                            continue  # final here already
                        if pair is None and (key, ws, rt.partition) in self._empty_finals:
                            continue
                        status: ReportStatus = "final"
                    elif (
                        provisional
                        and pair is not None
                        and held
                        and self.windows.mature_at(ws) <= join.stream_ms
                        and (pair.id, ws) in join.dirty
                    ):
                        status = "provisional"
                        join.dirty.discard((pair.id, ws))
                    else:
                        continue
                    if held:
                        assert pair is not None
                        acc = join.window_accumulator(pair.id, ws)
                        ranking = join.ranking_window(pair.id, ws)
                    else:
                        acc, ranking = self.layout.zeros(), None
                    part = partial_of(
                        key,
                        ws,
                        ws + self.windows.report_window_ms,
                        task=rt.partition,
                        tasks_total=self._partitions,
                        status=status,
                        stream_time_ms=join.stream_ms,
                        final_at_ms=final_at,
                        label_window_ms=settings.label_window_ms,
                        missing=settings.missing,
                        requirement=settings.non_inferiority,
                        acc=acc,
                        ranking=ranking,
                        emitted_at_ms=now,
                    )
                    sends.append(
                        Send(
                            topic,
                            _JSON.encode(part),
                            partial_key(key, ws, rt.partition, status),
                            partition=kafka_partition(key.rollout.encode(), partition),
                        )
                    )
                    if status == "final":
                        if pair is not None:
                            mark = FinalMark(pair=key, window_start_ms=ws, stream_ms=join.stream_ms)
                            marks.append((rt, mark))
                        else:
                            empties.append((key, ws, rt.partition))
        if sends:
            # Acknowledged before any window leaves a store: a crash between the two sends
            # the same partials again (they replace themselves in the merger).
            await self._publisher.send_all(sends)
            self.metrics.partials.inc(len(sends))
        for rt, mark in marks:
            if self.tasks.get(rt.partition) is rt and rt.join is not None:
                await self._mark(rt, mark)
        self._empty_finals.update(empties)
        self._empty_finals = {e for e in self._empty_finals if (e[0], e[1]) in live}

    async def _publish_merged(self, out: MergeOutput, now: int) -> None:
        """What the merge stage says: provisional reports, then per final window its report,
        the pair's verdict, the record that the window is merged (a crash before it merges and
        publishes the window again: at-least-once, like the reports), and last a tombstone
        for each task's partial of it, which a rebuild no longer needs (compaction drops them:
        the topic keeps one record per merged window, not one per task)."""
        assert self._publisher is not None
        for report in out.provisional:
            await self._publish_report(report, now)
        for merged in out.final:
            await self._publish_report(merged.report, now)
            if merged.verdict is not None:
                await self._publish_verdict(merged.verdict)
            rollout, ws = merged.record.rollout, merged.record.window_start_ms
            key = PairKey(*merged.record.key)
            topic = self.settings.partials_topic_name
            partition = kafka_partition(rollout.encode(), self._partials_partitions)
            await self._publisher.send(
                Send(topic, _JSON.encode(merged.record), merged_key(key, ws), partition=partition)
            )
            await self._publisher.send_all(
                [
                    Send(topic, None, partial_key(key, ws, task, status), partition=partition)
                    for task in range(self._partitions)
                    for status in ("provisional", "final")
                ]
            )

    def _due(self, ready: list[TaskRuntime]) -> list[tuple[list[Holder], int]]:
        due = []
        for holders in self._holders(ready).values():
            stream = self._stream(holders, ready)
            settings = holders[0].pair.settings
            starts = sorted({ws for h in holders for ws in h.pair.open})
            due += [(holders, ws) for ws in starts if self.windows.final_at(ws, settings) <= stream]
        return sorted(due, key=lambda d: d[1])

    def _mature(self, ready: list[TaskRuntime]) -> list[tuple[list[Holder], int]]:
        """Mature windows that changed since their last provisional report (every one once):
        with a label window of months there are thousands open, most of them quiet."""
        out = []
        for holders in self._holders(ready).values():
            stream = self._stream(holders, ready)
            starts = sorted({ws for h in holders for ws in h.pair.open})
            for ws in starts:
                if self.windows.mature_at(ws) > stream:
                    continue
                changed = any(
                    h.task.join is not None and (h.pair.id, ws) in h.task.join.dirty
                    for h in holders
                )
                if changed:
                    out.append((holders, ws))
        return out

    def _reported(self, holders: list[Holder], ws: int) -> None:
        for h in holders:
            if h.task.join is not None:
                h.task.join.dirty.discard((h.pair.id, ws))

    def _report(
        self, holders: list[Holder], ws: int, status: ReportStatus, now: int
    ) -> QualityReport:
        """A window's report, merged over the tasks that hold its pair."""
        acc = self.layout.zeros()
        ranking: PairedRankingQuality | None = None
        for h in holders:
            assert h.task.join is not None
            acc += h.task.join.window_accumulator(h.pair.id, ws)
            ranking = _merge_ranking(ranking, h.task.join.ranking_window(h.pair.id, ws))
        settings = holders[0].pair.settings
        ready = [rt for rt in self.tasks.values() if rt.ready]
        return quality_report(
            PairKey(*holders[0].pair.key),
            ws,
            ws + self.windows.report_window_ms,
            self.layout,
            acc,
            status=status,
            label_window_ms=settings.label_window_ms,
            missing=settings.missing,
            stream_time_ms=self._stream(holders, ready),
            final_at_ms=self.windows.final_at(ws, settings),
            now_ms=now,
            judging=self.judging,
            ranking=ranking,
        )

    def _verdict(self, key: PairKey, now: int) -> QualityVerdict | None:
        """The pair's verdict over its final windows, merged over the tasks that hold it."""
        holders = self._holders([rt for rt in self.tasks.values() if rt.ready]).get(key, [])
        finals = [h.pair for h in holders if h.pair.first_final_start is not None]
        if not finals:
            return None
        acc = self.layout.zeros()
        ranking: PairedRankingQuality | None = None
        for h in holders:
            assert h.task.join is not None
            acc += h.task.join.total_accumulator(h.pair.id)
            ranking = _merge_ranking(ranking, h.task.join.ranking_total(h.pair.id))
        return quality_verdict(
            key,
            self.layout,
            acc,
            windows=max(p.windows_final for p in finals),
            first_window_start_ms=min(p.first_final_start or 0 for p in finals),
            last_window_end_ms=max(p.last_final_end or 0 for p in finals),
            requirement=holders[0].pair.settings.non_inferiority,
            now_ms=now,
            judging=self.judging,
            ranking=ranking,
        )

    def _gauges(self) -> None:
        joins = [rt.join for rt in self.tasks.values() if rt.join is not None]
        m = self.metrics
        m.stored.set(sum(j.meta.stored for j in joins))
        m.orphans.set(sum(j.meta.orphans for j in joins))
        m.open_windows.set(
            len({(tuple(p.key), w) for j in joins for p in j.pairs.values() for w in p.open})
        )
        if joins:
            m.stream_time.set(max(j.stream_ms for j in joins) / 1000)

    async def _finalize(self, holders: list[Holder], ws: int, now: int) -> None:
        """Publish a window's final report, then mark it final in every task that holds it
        (its requests leave the stores; its figures join the verdict)."""
        report = await asyncio.to_thread(self._report, holders, ws, "final", now)
        await self._publish_report(report, now)
        key = PairKey(*holders[0].pair.key)
        for h in holders:
            join = h.task.join
            assert join is not None
            if ws in join.pairs[h.pair.id].open:
                mark = FinalMark(pair=key, window_start_ms=ws, stream_ms=join.stream_ms)
                await self._mark(h.task, mark)
        verdict = await asyncio.to_thread(self._verdict, key, self.clock())
        if verdict is not None:
            await self._publish_verdict(verdict)

    async def _publish_report(self, report: QualityReport, now: int) -> None:
        assert self._publisher is not None
        sends: list[Send] = []
        if not self.dry_run:
            sends.append(
                Send(self.settings.quality_topic, _JSON.encode(report), report.rollout.encode())
            )
        else:
            log.info(
                "dry run: %s quality report %s %s: %d judged pairs, coverage %s",
                report.status,
                report.rollout,
                utc_window(report.window_start_ms, report.window_end_ms),
                report.counts.records,
                report.label_coverage.value,
            )
        if report.status == "final":
            for event in self.guards.evaluate(report):
                sends += self._on_event(event, report, now)
        self.metrics.observe_report(report, self.guards)
        await self._publisher.send_all(sends)
        self.recent.append(report)
        for callback in self.subscribers:
            callback(report)

    async def _publish_verdict(self, verdict: QualityVerdict) -> None:
        assert self._publisher is not None
        self.verdicts[verdict.rollout] = verdict
        self.metrics.observe_verdict(verdict)
        log.info(
            "quality verdict %s (%s %s vs %s %s): %s: %s",
            verdict.rollout,
            verdict.candidate_model,
            verdict.candidate_version,
            verdict.champion_model,
            verdict.champion_version,
            verdict.gate.code,
            verdict.gate.reason,
        )
        if not self.dry_run:
            await self._publisher.send_all(
                [
                    Send(
                        self.settings.verdicts_topic,
                        _JSON.encode(verdict),
                        verdict.rollout.encode(),
                    ),
                    *self._control_verdict(verdict),
                ]
            )
        for callback in self.subscribers:
            callback(verdict)

    def _control_verdict(self, verdict: QualityVerdict) -> list[Send]:
        """The signed ``verdict`` command of ``verdict`` for the control topic, when its gate
        changed since the last one published for the rollout or that one is older than
        ``control_verdict_interval_s``; else nothing."""
        if not self.settings.control_verdicts or self.key is None:
            return []
        now = self.clock()
        last = self._control_verdicts.get(verdict.rollout)
        interval_ms = self.settings.control_verdict_interval_s * 1000
        if last is not None and last[0] == verdict.gate.ok and now - last[1] < interval_ms:
            return []
        self._control_verdicts[verdict.rollout] = (verdict.gate.ok, now)
        signed = sign_command(quality_command(verdict, now), self.key)
        self.verdict_commands.append(signed)
        from ..control.plane import CONTROL_PARTITION

        return [
            Send(
                self.config.topics.control,
                encode_command(signed),
                verdict.rollout.encode(),
                partition=CONTROL_PARTITION,
            )
        ]

    def _on_event(self, event: GuardEvent, report: QualityReport, now: int) -> list[Send]:
        self.metrics.observe_event(event)
        action = event.rule.action
        if event.kind == "cleared":
            log.info("quality guard cleared for %s: %s", event.rollout, event.reason)
            return []
        if action == "alert":
            log.warning("quality guard alert for %s: %s", event.rollout, event.reason)
            return []
        coverage = report.label_coverage.value
        reason = (
            f"quality guard {event.reason}"
            + (f"; label coverage {coverage:.1%}" if coverage is not None else "")
            + f"; final quality window, labels within {report.label_window_ms / 1000:g}s"
        )[:256]
        cmd = ControlCommand(
            command_id=command_id(event),
            rollout=event.rollout,
            action=action,
            issued_by=ISSUER,
            reason=reason,
            issued_at_ms=now,
        )
        if self.dry_run or self.key is None:
            self.metrics.commands.labels(event.rollout, action, "dry_run").inc()
            log.warning("dry run: would publish %s %s: %s", action, cmd.command_id, reason)
            self.commands.append(cmd)
            return []
        from ..control.plane import CONTROL_PARTITION

        signed = sign_command(cmd, self.key)
        self.commands.append(signed)
        self.metrics.commands.labels(event.rollout, action, "published").inc()
        log.warning("quality guard fired: publishing %s %s: %s", action, cmd.command_id, reason)
        return [
            Send(
                self.config.topics.control,
                encode_command(signed),
                event.rollout.encode(),
                partition=CONTROL_PARTITION,
            )
        ]

    async def _commit(self, *, force: bool = False) -> None:
        """Commit the stores' input offsets to the group (for lag monitoring and tools: the
        stores and the changelog hold the offsets the join resumes from)."""
        consumer = self._consumer
        if consumer is None:
            return
        if not force and time.monotonic() - self._last_commit < 1.0:
            return
        self._last_commit = time.monotonic()
        owned = consumer.assignment()
        todo: dict[TopicPartition, int] = {}
        for rt in self.tasks.values():
            if rt.join is None:
                continue
            for key, topic in (("c", self._topics[0]), ("o", self._topics[1])):
                tp = TopicPartition(topic, rt.partition)
                off = rt.join.meta.inputs.get(key)
                if off is not None and tp in owned:
                    todo[tp] = off
        if todo:
            try:
                await consumer.commit(todo)
            except Exception as exc:  # informational only: the stores hold the truth
                log.debug("outcomes: commit failed: %s", error_text(exc))

    # -- health ----------------------------------------------------------------------------

    def _watch(self) -> HealthWatcher:
        probe = BrokerProbe()
        topic = self._topics[0]

        async def collect() -> tuple[str, list[Check]]:
            consumer = self._consumer
            if consumer is not None and probe.due():
                await probe.probe(consumer)
            phase = (
                "stopping" if self.stopping else "serving" if self.ready.is_set() else "starting"
            )
            if consumer is None:
                assigned, parts, joined = None, None, False
            else:
                assigned = sum(1 for tp in consumer.assignment() if tp.topic == topic)
                known = consumer.partitions_for_topic(topic)
                parts, joined = (len(known) if known else None), group_joined(consumer)
            restoring = sorted(p for p, rt in self.tasks.items() if not rt.ready)
            merge = self.merge
            merging = sorted(merge.catching_up) if merge is not None else []
            checks = [
                assignment_check(assigned, topic, parts, joined),
                probe.check(),
                Check(
                    "restore",
                    not restoring,
                    f"restoring task(s) {restoring} from {self.settings.changelog_topic}"
                    if restoring
                    else "every task's store is up to date with its changelog",
                ),
                Check(
                    "merge",
                    not merging,
                    f"merge stage reading partitions {merging} of "
                    f"{self.settings.partials_topic_name} back"
                    if merging
                    else "the merge stage is up to date"
                    if merge is not None
                    else "no merge stage (rollouts are keyed by rollout)",
                ),
                tasks_check(self._supervisor.failure),
            ]
            return phase, checks

        return HealthWatcher(self.health, collect).start()


__all__ = ["ISSUER", "OutcomesService", "changelog_key", "quality_command", "signing_key"]
