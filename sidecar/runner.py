"""The Kafka edge of the sidecar: consume requests, run the pipeline, produce, commit.

Delivery is at-least-once: offsets of a consumed batch are committed only after the producer
has acknowledged (acks=all) every decision, comparison and dead letter that batch produced.
Batches are committed strictly in order by one committer task, so a commit never covers a
record whose outputs are not yet durable. At most ``pipeline.max_in_flight_records`` consumed
records wait to be committed, and at most ``pipeline.max_sending_records`` of them for their
outputs to reach the broker (what holds memory; batches that wait only for the candidate do not
count there, so a slow candidate does not throttle decisions); at either bound the consumer
pauses its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError

from .config import SidecarConfig
from .errors import BrokerError, ContractError
from .health import HealthServer, HealthState, watch_sidecar
from .kafka import (
    BackgroundTaskFailed,
    Backoff,
    BatchSender,
    Delivery,
    MissingTopics,
    RebalanceListener,
    Supervisor,
    TaskFailure,
    fetch_bytes,
    is_permanent,
    new_consumer,
    new_producer,
    record_batch_path,
    record_limits,
    refusal,
    require_topics,
    stop_quietly,
)
from .metrics import SidecarMetrics
from .models import ScoringModel, load_model
from .models.contract import check_startup
from .models.health import watch_health
from .pipeline import BatchResult, Pipeline, StagedBatch
from .routing import PolicyHolder, RoutingPolicy
from .tracing import new_tracer
from .untrusted import error_text

if TYPE_CHECKING:
    from .control.plane import ControlPlane
    from .progress import PartitionLag
    from .tracing.spans import BatchTrace, BatchTracer

log = logging.getLogger(__name__)

#: Largest producer batch (bytes). Outputs are small; big batches are what make Python fast.
_PRODUCER_BATCH_BYTES = 1 << 20


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _InFlight:
    """One consumed batch whose outputs are being acknowledged. ``lane`` finishes its
    candidate stage (the comparisons, the candidate's decisions) and adds its deliveries;
    the batch commits once the lane is done and every delivery acknowledged."""

    offsets: dict[TopicPartition, int]
    deliveries: list[Delivery]
    records: int
    lane: asyncio.Task[None] | None = None
    #: Its lane waits for the candidate's answer (batches behind it wait for it too).
    asking_candidate: bool = False
    #: Its trace when tracing is on and the batch sampled (``sidecar.tracing``).
    trace: BatchTrace | None = None

    def sending(self) -> bool:
        """Outputs on their way to the broker: unacknowledged, or a lane producing them."""
        if self.lane is not None and not self.lane.done():
            return True
        return any(not d.future.done() for d in self.deliveries)


class Sidecar:
    """One sidecar instance: a consumer-group member scoring requests for one rollout."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        policy: PolicyHolder | None = None,
        champion: ScoringModel | None = None,
        candidate: ScoringModel | None = None,
        metrics: SidecarMetrics | None = None,
        instance_id: str | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        self.config = config
        self.instance_id = instance_id or new_instance_id()
        #: Spans per batch when ``tracing.enabled`` (None otherwise: nothing imported).
        self.tracer = tracer if tracer is not None else new_tracer(config, self.instance_id)
        self.champion = champion or load_model(config.models.champion)
        cand_cfg = config.models.candidate
        self.candidate = candidate or (load_model(cand_cfg) if cand_cfg else None)
        try:
            self.contract_warnings = check_startup(
                config, self.champion.manifest, self.candidate.manifest if self.candidate else None
            )
        except ContractError:
            self.close_models()
            raise
        self.pipeline = Pipeline(config, self.champion, self.candidate)
        r = config.rollout
        self.policy = policy or PolicyHolder(
            RoutingPolicy(
                rollout=r.name,
                mode=r.mode,
                canary_share_bp=r.canary_share_bp,
                score_shadow_arm=r.score_shadow_arm,
                since_ms=time.time_ns() // 1_000_000,
            )
        )
        self.metrics = metrics or SidecarMetrics()
        self.metrics.version_of = {v.topic: v.version for v in config.outputs.versions}
        self.metrics.observe_policy(self.policy.current)
        self.policy.on_swap(lambda _old, new: self.metrics.observe_policy(new))
        self._names = {"champion": (self.champion.name, self.champion.version)}
        if self.candidate is not None:
            self._names["candidate"] = (self.candidate.name, self.candidate.version)
        watch_health(self.metrics.model_health, self.champion, self.candidate)
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_records = 0
        #: Candidate stages running, and the policy epoch they were started under.
        self._lanes_running = 0
        self._lane_epoch: int | None = None
        self._last_lane: asyncio.Task[None] | None = None
        #: Most consumed-but-uncommitted records seen at once, and most of them on their way
        #: to the broker (backpressure evidence).
        self.peak_in_flight_records = 0
        self.peak_sending_records = 0
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        #: A second stop signal came: drain no longer (see ``_on_signal``).
        self._hurry = False
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._sender: BatchSender | None = None
        self._control: ControlPlane | None = None
        #: Background tasks (committer, control plane): one dying stops the instance.
        self.supervisor = Supervisor("sidecar", self._on_task_failure)
        self.ready = asyncio.Event()
        #: Readiness snapshot served on ``/readyz`` (see ``sidecar.health``).
        self.health = HealthState("sidecar")
        self.processed = 0
        #: The /metrics, /healthz, /readyz server when one serves this instance (supervised).
        self.http_server: HealthServer | None = None
        #: Timestamp of the last record consumed per partition (for lag in seconds).
        self.last_consumed_ms: dict[TopicPartition, int] = {}
        #: The latest lag sample (``sidecar.progress``); None until sampled.
        self.lag: list[PartitionLag] | None = None
        #: Champion decisions the candidate made because the champion failed (heartbeats
        #: and ``ctl status`` show it: a degrading champion must not go unnoticed).
        self.champion_fallbacks = 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group consumer while connected (health checks read its assignment)."""
        return self._consumer

    @property
    def control(self) -> ControlPlane | None:
        return self._control

    @property
    def in_flight_records(self) -> int:
        """Consumed records whose outputs are not yet acknowledged and committed."""
        return self._in_flight_records

    @property
    def failure(self) -> TaskFailure | None:
        """Why the instance stopped on its own (a background task died), if it did."""
        return self.supervisor.failure

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop consuming; ``run`` then drains, commits and returns. Safe from signal handlers."""
        self._stopping.set()

    def _on_signal(self) -> None:
        """SIGTERM/SIGINT: stop (drain, commit); a second one while draining stops without
        waiting for the rest (their records are consumed again: at-least-once), so an operator
        is never stuck for ``pipeline.drain_timeout_s`` behind a hung model or broker."""
        if self._stopping.is_set() and not self._hurry:
            self._hurry = True
            log.warning(
                "second stop signal: not waiting for %d records in flight; they will be "
                "consumed again",
                self._in_flight_records,
            )
            self._changed.set()
        self.request_stop()

    def _on_task_failure(self, failure: TaskFailure) -> None:
        self._stopping.set()
        self._changed.set()

    async def run(self, install_signal_handlers: bool = False) -> None:
        """Connect (retrying while the broker is unreachable), then serve until stopped.

        Raises when a background task died (:class:`~sidecar.kafka.BackgroundTaskFailed`, or
        the error that killed it when it is ours, e.g. :class:`~sidecar.kafka.ProduceRefused`)
        so that the process exits non-zero and is restarted.
        """
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
        watcher = watch_sidecar(self)
        try:
            if not await self._connect():
                return
            if self.config.control.enabled:
                # Rebuild the policy from the control topic before the first batch is consumed.
                from .control.plane import ControlPlane

                self._control = ControlPlane.for_sidecar(self)
                await self._control.start()
            self.supervisor.spawn(self._commit_loop(), "committer")
            if self.http_server is not None:
                self.supervisor.spawn(self.http_server.watch(), "http-server")
            self._watch_readers()
            self.ready.set()
            path = record_batch_path()
            if path is None:
                log.warning(
                    "the C record batch extension (sidecar/kafka/_batches.c) is not compiled: "
                    "aiokafka's record builder and reader are used, ~20%% slower; reinstall "
                    "the package where a C compiler is available"
                )
            else:
                log.debug("%s", path)
            log.info(
                "sidecar %s serving %s (rollout %s, epoch %d, mode %s)",
                self.instance_id,
                self.config.topics.requests,
                self.policy.current.rollout,
                self.policy.current.epoch,
                self.policy.current.mode.value,
            )
            await self._consume_loop()
            if self.failure is None:
                await self.drain()
        finally:
            await watcher.stop()
            await self._close()
            if self.tracer is not None:
                await asyncio.to_thread(self.tracer.flush)
        self.supervisor.raise_failure()

    def _watch_readers(self) -> None:
        """Older output versions: count who still reads them (a gauge; never fails)."""
        outputs = self.config.outputs
        if not outputs.versions or outputs.readers_interval_s <= 0:
            return
        from .outputs.lifecycle import configured_outputs
        from .outputs.watch import ReaderWatch

        configured = configured_outputs(outputs.versions)
        control = self._control
        watch = ReaderWatch(
            self.config,
            self.metrics,
            lambda: control.state.outputs if control is not None else configured,
        )
        self.supervisor.spawn(watch.run(), "output-readers")

    async def _connect(self) -> bool:
        cfg = self.config
        deadline = (
            time.monotonic() + cfg.kafka.connect_timeout_s if cfg.kafka.connect_timeout_s else None
        )
        backoff = Backoff(0.5, 10.0)
        while not self._stopping.is_set():
            try:
                await self._start_clients()
                return True
            except MissingTopics as exc:
                await self._close()
                if deadline is not None and time.monotonic() + backoff.delay > deadline:
                    raise MissingTopics(
                        f"{exc} (waited kafka.connect_timeout_s={cfg.kafka.connect_timeout_s:g}s)"
                    ) from exc
                log.warning("%s; waiting for them, next look in %.1fs", exc, backoff.delay)
            except (KafkaConnectionError, KafkaError, OSError, BrokerError) as exc:
                await self._close()
                if deadline is not None and time.monotonic() + backoff.delay > deadline:
                    raise BrokerError(
                        f"broker {cfg.kafka.bootstrap_servers} unreachable for "
                        f"{cfg.kafka.connect_timeout_s:.0f}s: {exc}"
                    ) from exc
                log.warning(
                    "broker %s unreachable (%s); retrying in %.1fs",
                    cfg.kafka.bootstrap_servers,
                    exc,
                    backoff.delay,
                )
            await backoff.wait(self._stopping)
        return False

    async def _start_clients(self) -> None:
        cfg = self.config
        outputs = (
            cfg.topics.decisions,
            cfg.topics.comparisons,
            cfg.topics.dead_letter,
            *cfg.outputs.topics(),
        )
        limits = await record_limits(cfg, outputs)
        self.pipeline.set_record_limits(limits)
        # A batch never exceeds what the smallest output topic takes.
        batch_bytes = min(_PRODUCER_BATCH_BYTES, *limits.values())
        self._producer = new_producer(
            cfg,
            "sidecar",
            instance=self.instance_id,
            acks="all" if cfg.kafka.acks == "all" else int(cfg.kafka.acks),
            linger_ms=cfg.kafka.linger_ms,
            max_batch_size=batch_bytes,
            compression_type=None
            if cfg.kafka.compression_type == "none"
            else cfg.kafka.compression_type,
        )
        await self._producer.start()
        # Before joining the group: every topic there, or a clear word naming the missing.
        named = {cfg.topics.requests: "topics.requests"} | output_settings(cfg)
        partitions = await require_topics(self._producer.client, named)
        partitions.pop(cfg.topics.requests, None)
        fetched = fetch_bytes(cfg.input.max_message_bytes)
        self._consumer = new_consumer(
            cfg,
            "sidecar",
            group_id=cfg.kafka.group_id,
            instance=self.instance_id,
            auto_offset_reset=cfg.kafka.auto_offset_reset,
            # What one fetch may bring, per partition and over all (brokers that ignore the
            # per-partition bound, like the embedded one, send up to the total).
            max_partition_fetch_bytes=fetched,
            fetch_max_bytes=fetched,
            fetch_max_wait_ms=cfg.kafka.fetch_max_wait_ms,
        )
        await self._consumer.start()
        self._consumer.subscribe(
            [cfg.topics.requests],
            listener=RebalanceListener(f"sidecar {self.instance_id}", on_revoked=self._revoked),
        )
        self._sender = BatchSender(
            self._producer,
            partitions,
            # Whole batches built in C, unless aiokafka has to compress them.
            prebuilt_batch_bytes=batch_bytes if cfg.kafka.compression_type == "none" else None,
        )

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        await self.drain()

    async def _close(self) -> None:
        if self._control is not None:
            await self._control.stop()
            self._control = None
        await self.supervisor.stop()
        for client in (self._consumer, self._producer):
            await stop_quietly(client)
        self._consumer = self._producer = None

    def close_models(self) -> None:
        self.champion.close()
        if self.candidate is not None:
            self.candidate.close()

    # -- the loop --------------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        cfg = self.config.pipeline
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            if not self._has_room():
                await self._wait_for_room(consumer)
                continue
            batches = await consumer.getmany(
                timeout_ms=cfg.fetch_timeout_ms, max_records=cfg.max_batch
            )
            if not batches:
                continue
            records = [record for part in batches.values() for record in part]
            policy = self.policy.current
            if policy.epoch != self._lane_epoch:
                # Keep each key's decisions in order across a change of who decides it: the
                # candidate stages of the old policy finish (within the candidate's timeout)
                # before any decision of the new one leaves.
                await self._finish_lanes()
                self._lane_epoch = policy.epoch
            shed = self._lanes_running >= cfg.candidate_backlog
            if shed:
                self.metrics.candidate_shed.inc(len(records))
            tracer = self.tracer
            trace = None if tracer is None else tracer.batch(batches, records, policy, shed)
            staged = await self.pipeline.start(records, policy, shed_candidate=shed)
            if trace is not None:
                trace.staged(staged)
            deliveries = await self._send_until_accepted(staged.early)
            if deliveries is None:  # stopping during an outage: not committed, re-consumed
                break
            if trace is not None:
                trace.sent(deliveries)
            offsets = {}
            for tp, part in batches.items():
                offsets[tp] = part[-1].offset + 1
                self.last_consumed_ms[tp] = part[-1].timestamp
            entry = _InFlight(offsets, deliveries, len(records), trace=trace)
            self._wake_on(deliveries)
            if staged.pending is not None:
                if not shed:
                    self._lanes_running += 1
                entry.asking_candidate = True
                entry.lane = asyncio.create_task(
                    self._candidate_lane(entry, staged, self._last_lane, counted=not shed)
                )
                self._last_lane = entry.lane
            self._in_flight.append(entry)
            self._in_flight_records += len(records)
            self.peak_in_flight_records = max(self.peak_in_flight_records, self._in_flight_records)
            self.metrics.in_flight.set(self._in_flight_records)
            self._observe(staged.early, len(records))
            self.processed += len(records)
            self._changed.set()

    def _observe(self, result: BatchResult, consumed: int) -> None:
        self.metrics.observe_batch(self.config.topics.requests, consumed, result, self._names)
        self.champion_fallbacks += result.champion_fallbacks

    async def _candidate_lane(
        self,
        entry: _InFlight,
        staged: StagedBatch,
        previous: asyncio.Task[None] | None,
        *,
        counted: bool,
    ) -> None:
        """A batch's candidate stage: wait for the candidate (its own timeout bounds this),
        then -- after the previous batch's stage, so the decisions of each key routed to the
        candidate leave in order -- send the comparisons and the decisions that needed it.
        ``counted``: this stage asks the candidate (it counts towards the backlog)."""
        try:
            try:
                late = await staged.finish()
            finally:
                entry.asking_candidate = False
                if counted:  # the candidate answered (or timed out): no longer its backlog
                    self._lanes_running -= 1
            if entry.trace is not None:
                entry.trace.finished(late)
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if late is not None:
                deliveries = await self._send_until_accepted(late)
                if deliveries is not None:
                    self._wake_on(deliveries)
                if entry.trace is not None and deliveries is not None:
                    entry.trace.sent(deliveries)
                if deliveries is not None:
                    entry.deliveries = entry.deliveries + deliveries
                    self._observe(late, 0)
        finally:
            self._changed.set()

    async def _finish_lanes(self) -> None:
        lanes = [e.lane for e in self._in_flight if e.lane is not None and not e.lane.done()]
        if lanes:
            await asyncio.wait(lanes)

    async def _send(self, result: BatchResult) -> list[Delivery]:
        sender = self._sender
        assert sender is not None
        t = self.config.topics
        deliveries = await sender.send(t.decisions, result.decisions)
        deliveries += await sender.send(t.comparisons, result.comparisons)
        deliveries += await sender.send(t.dead_letter, result.dead_letters)
        for topic, output in result.versions.items():  # older output versions, if any
            deliveries += await sender.send(topic, output)
        return deliveries

    async def _send_until_accepted(self, result: BatchResult) -> list[Delivery] | None:
        """Hand a batch's outputs to the producer, retrying while the broker is away.

        aiokafka refuses new batches (``KafkaTimeoutError``) once it has held the previous ones
        for ``request_timeout_ms`` without a broker. The batch is then sent again after a
        backoff; parts that did get through may repeat (at-least-once), nothing is dropped and
        nothing is committed meanwhile. Returns None when asked to stop first. A permanent
        refusal raises :class:`~sidecar.kafka.ProduceRefused`.
        """
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                return await self._send(result)
            except KafkaError as exc:
                if is_permanent(exc):
                    raise refusal(exc, "the output topics", len(result.decisions), 0) from exc
                log.warning(
                    "producer refused outputs (%s: %s); broker unreachable? retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff.delay,
                )
                self.metrics.produce_retries.inc()
                if not await backoff.wait(self._stopping):
                    return None

    def _has_room(self) -> bool:
        cfg = self.config.pipeline
        if self._in_flight_records >= cfg.max_in_flight_records:
            return False
        sending = sending_records(self._in_flight)
        self.peak_sending_records = max(self.peak_sending_records, sending)
        return sending < cfg.max_sending_records

    def _wake_on(self, deliveries: list[Delivery]) -> None:
        """Look for room again when one of ``deliveries`` is acknowledged."""
        for delivery in deliveries:
            delivery.future.add_done_callback(self._wake)

    def _wake(self, _: object) -> None:
        self._changed.set()

    async def _wait_for_room(self, consumer: AIOKafkaConsumer) -> None:
        """Backpressure: pause fetching until acknowledgements or the committer free room."""
        paused = consumer.assignment()
        consumer.pause(*paused)
        try:
            while not self._has_room() and not self._stopping.is_set():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)
        finally:
            consumer.resume(*(tp for tp in paused if tp in consumer.assignment()))

    async def _commit_loop(self) -> None:
        """Commit batches in order, each once all its outputs are acknowledged.

        A delivery that failed transiently is sent again (with backoff) and nothing behind it
        is committed meanwhile; a permanent refusal raises, which stops the instance.
        """
        backoff = Backoff(0.2, 10.0)
        while True:
            if not self._in_flight:
                self._changed.clear()
                await self._changed.wait()
                continue
            head = self._in_flight[0]
            if head.lane is not None:
                await asyncio.wait([head.lane])
                lane_error = head.lane.exception()
                if lane_error is not None:  # a bug: stop, the batch is consumed again
                    raise BackgroundTaskFailed(
                        TaskFailure("candidate-lane", error_text(lane_error), 0.0, lane_error)
                    ) from lane_error
            failed = await _failed_deliveries(head.deliveries)
            if failed:
                delivery, exc = failed[0]
                if is_permanent(exc):
                    raise refusal(exc, delivery.topic, len(delivery.indices), delivery.size)
                # Not acknowledged: send those outputs again; never commit past them.
                log.warning(
                    "producing %d output batch(es) failed (%s: %s); sending again in %.1fs",
                    len(failed),
                    type(exc).__name__,
                    exc,
                    backoff.delay,
                )
                self.metrics.produce_retries.inc()
                await backoff.wait()
                head.deliveries = await self._resend(head, [d for d, _ in failed])
                continue
            backoff.reset()
            await self._commit(head.offsets)
            if head.trace is not None:
                head.trace.committed()
            self._in_flight.popleft()
            self._in_flight_records -= head.records
            self.metrics.in_flight.set(self._in_flight_records)
            self._changed.set()

    async def _resend(self, head: _InFlight, failed: list[Delivery]) -> list[Delivery]:
        """``head``'s deliveries with each of ``failed`` sent again (acknowledged ones are
        kept: awaiting them again returns at once)."""
        sender = self._sender
        assert sender is not None
        again: list[Delivery] = []
        for delivery in failed:
            try:
                again += await sender.resend(delivery)
            except KafkaError as exc:  # the producer refuses new batches still: next round
                log.debug("re-sending to %s refused: %s", delivery.topic, exc)
                again.append(delivery)
        keep = [d for d in head.deliveries if all(d is not f for f in failed)]
        return keep + again

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        owned = consumer.assignment()
        offsets = {tp: off for tp, off in offsets.items() if tp in owned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            self.metrics.commits.inc()
        except CommitFailedError as exc:
            # The group rebalanced: another member owns these partitions now and will read
            # from the last committed offset. Outputs are durable; at worst they repeat.
            log.warning("offset commit rejected after a rebalance (%s); records may repeat", exc)
        except KafkaError as exc:
            log.warning("offset commit failed (%s); records may repeat after a restart", exc)

    async def drain(self) -> None:
        """Wait until every in-flight batch is acknowledged and committed (bounded wait)."""
        deadline = time.monotonic() + self.config.pipeline.drain_timeout_s
        while (
            self._in_flight
            and time.monotonic() < deadline
            and self.failure is None
            and not self._hurry
        ):
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)
        if self._in_flight and self.failure is None and not self._hurry:
            log.warning(
                "gave up draining after %.0fs with %d records unacknowledged; they will be "
                "consumed again",
                self.config.pipeline.drain_timeout_s,
                self._in_flight_records,
            )


def output_settings(cfg: SidecarConfig) -> dict[str, str]:
    """Each output topic and the setting that names it (for errors an operator acts on)."""
    t = cfg.topics
    named = {
        t.decisions: "topics.decisions",
        t.comparisons: "topics.comparisons",
        t.dead_letter: "topics.dead_letter",
    }
    for v in cfg.outputs.versions:
        named.setdefault(v.topic, f"outputs.versions {v.version}")
    return named


def sending_records(in_flight: Iterable[_InFlight]) -> int:
    """Records of the batches in flight (oldest first) whose outputs are on their way to the
    broker, up to the first batch waiting for the candidate's answer: the batches from it on
    wait for it (a lane sends after the previous one; commits go in order), so they are the
    candidate's backlog (bounded by ``max_in_flight_records``), not the producer's."""
    sending = 0
    for entry in in_flight:
        if entry.asking_candidate:
            break
        if entry.sending():
            sending += entry.records
    return sending


async def _failed_deliveries(deliveries: list[Delivery]) -> list[tuple[Delivery, KafkaError]]:
    """Wait for every delivery; the ones the producer failed, with their errors."""
    failed = []
    for delivery in deliveries:
        try:
            await delivery.future
        except KafkaError as exc:
            failed.append((delivery, exc))
    return failed
