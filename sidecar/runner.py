"""The Kafka edge of the sidecar: consume requests, run the pipeline, produce, commit.

Delivery is at-least-once: offsets of a consumed batch are committed only after the producer
has acknowledged (acks=all) every decision, comparison and dead letter that batch produced.
Batches are committed strictly in order by one committer task, so a commit never covers a
record whose outputs are not yet durable. At most ``pipeline.max_in_flight_records`` consumed
records wait for acknowledgement; at that bound the consumer pauses its partitions.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError

from ._clients import stop_quietly
from .config import KafkaConfig, SidecarConfig
from .errors import BrokerError, ConfigError, ContractError
from .hashing import kafka_partitions
from .health import HealthState, watch_sidecar
from .metrics import SidecarMetrics
from .models import ScoringModel, load_model
from .models.contract import check_startup
from .models.health import watch_health
from .pipeline import BatchResult, Pipeline, TopicOutput
from .routing import PolicyHolder, RoutingPolicy

if TYPE_CHECKING:
    from .control.plane import ControlPlane

log = logging.getLogger(__name__)

#: Largest producer batch (bytes). Outputs are small; big batches are what make Python fast.
_PRODUCER_BATCH_BYTES = 1 << 20


#: SASL mechanisms passed through (all take ``sasl_plain_username``/``sasl_plain_password``).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def kafka_client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by every aiokafka client we create (sidecar,
    control plane, ``sidecar ctl``, aggregator, replay, topic creation).

    Inconsistent settings are a ConfigError naming the setting (never showing the password):
    a half-configured TLS/SASL setup would otherwise fail later as an opaque connection error.
    """
    protocol = cfg.security_protocol
    sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
    tls = protocol in ("SSL", "SASL_SSL")
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "security_protocol": protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
    }
    if sasl:
        mechanism = (cfg.sasl_mechanism or "").upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"kafka.security_protocol={protocol} needs kafka.sasl_mechanism set to one of "
                f"{', '.join(SASL_MECHANISMS)} (got {cfg.sasl_mechanism!r})"
            )
        if not cfg.sasl_plain_username or cfg.sasl_plain_password is None:
            raise ConfigError(
                f"kafka.sasl_mechanism={mechanism} needs kafka.sasl_plain_username and "
                "kafka.sasl_plain_password (e.g. $SIDECAR_KAFKA__SASL_PLAIN_PASSWORD)"
            )
        kwargs["sasl_mechanism"] = mechanism
        kwargs["sasl_plain_username"] = cfg.sasl_plain_username
        kwargs["sasl_plain_password"] = cfg.sasl_plain_password
    elif cfg.sasl_mechanism:
        raise ConfigError(
            f"kafka.sasl_mechanism is set but kafka.security_protocol={protocol}; use "
            "SASL_SSL (or SASL_PLAINTEXT)"
        )
    ssl_files = {
        "ssl_cafile": cfg.ssl_cafile,
        "ssl_certfile": cfg.ssl_certfile,
        "ssl_keyfile": cfg.ssl_keyfile,
    }
    if tls:
        from aiokafka.helpers import create_ssl_context

        if cfg.ssl_keyfile and not cfg.ssl_certfile:
            raise ConfigError("kafka.ssl_keyfile is set without kafka.ssl_certfile")
        try:
            # No cafile: the system's CA bundle verifies the brokers (never verification off).
            kwargs["ssl_context"] = create_ssl_context(
                cafile=cfg.ssl_cafile, certfile=cfg.ssl_certfile, keyfile=cfg.ssl_keyfile
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                "kafka TLS settings unusable (ssl_cafile/ssl_certfile/ssl_keyfile): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    elif any(ssl_files.values()):
        set_names = ", ".join(f"kafka.{k}" for k, v in ssl_files.items() if v)
        raise ConfigError(
            f"{set_names} set but kafka.security_protocol={protocol}; use SSL or SASL_SSL"
        )
    return kwargs


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _InFlight:
    """One consumed batch whose outputs are being acknowledged."""

    offsets: dict[TopicPartition, int]
    futures: list[asyncio.Future[Any]]
    result: BatchResult
    records: int


class OutputSender:
    """Produces a batch's outputs with aiokafka's batch API, partitioned like Kafka would."""

    def __init__(self, producer: AIOKafkaProducer, partitions: dict[str, int]) -> None:
        self._producer = producer
        self._partitions = partitions

    async def send(self, topic: str, output: TopicOutput) -> list[asyncio.Future[Any]]:
        if not len(output):
            return []
        keys, values, headers = output
        count = self._partitions[topic]
        if len(set(keys[:2])) == 1 and len(set(keys)) == 1:
            groups = [(int(kafka_partitions(keys[:1], count)[0]), range(len(keys)))]
        else:
            parts = kafka_partitions(keys, count)
            order = np.argsort(parts, kind="stable")
            bounds = np.searchsorted(parts[order], np.arange(count + 1))
            groups = [
                (p, order[bounds[p] : bounds[p + 1]].tolist())
                for p in range(count)
                if bounds[p + 1] > bounds[p]
            ]
        futures = []
        producer = self._producer
        for partition, indices in groups:
            builder = producer.create_batch()
            for i in indices:
                if (
                    builder.append(key=keys[i], value=values[i], timestamp=None, headers=headers[i])
                    is None
                ):
                    futures.append(await producer.send_batch(builder, topic, partition=partition))
                    builder = producer.create_batch()
                    builder.append(key=keys[i], value=values[i], timestamp=None, headers=headers[i])
            futures.append(await producer.send_batch(builder, topic, partition=partition))
        return futures


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked: %s; draining in-flight work", _fmt_tps(revoked))
            await self._sidecar.drain()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _fmt_tps(assigned))


def _fmt_tps(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


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
    ) -> None:
        self.config = config
        self.instance_id = instance_id or new_instance_id()
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
        self.metrics.observe_policy(self.policy.current)
        self.policy.on_swap(lambda _old, new: self.metrics.observe_policy(new))
        self._names = {"champion": (self.champion.name, self.champion.version)}
        if self.candidate is not None:
            self._names["candidate"] = (self.candidate.name, self.candidate.version)
        watch_health(self.metrics.model_health, self.champion, self.candidate)
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_records = 0
        #: Most consumed-but-unacknowledged records seen at once (backpressure evidence).
        self.peak_in_flight_records = 0
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._sender: OutputSender | None = None
        self._committer: asyncio.Task[None] | None = None
        self._control: ControlPlane | None = None
        self.ready = asyncio.Event()
        #: Readiness snapshot served on ``/readyz`` (see ``sidecar.health``).
        self.health = HealthState("sidecar")
        self.processed = 0

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

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop consuming; ``run`` then drains, commits and returns. Safe from signal handlers."""
        self._stopping.set()

    async def run(self, install_signal_handlers: bool = False) -> None:
        """Connect (retrying while the broker is unreachable), then serve until stopped."""
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        watcher = watch_sidecar(self)
        try:
            if not await self._connect():
                return
            if self.config.control.enabled:
                # Rebuild the policy from the control topic before the first batch is consumed.
                from .control.plane import ControlPlane

                self._control = ControlPlane.for_sidecar(self)
                await self._control.start()
            self._committer = asyncio.create_task(self._commit_loop(), name="committer")
            self.ready.set()
            log.info(
                "sidecar %s serving %s (rollout %s, epoch %d, mode %s)",
                self.instance_id,
                self.config.topics.requests,
                self.policy.current.rollout,
                self.policy.current.epoch,
                self.policy.current.mode.value,
            )
            await self._consume_loop()
            await self.drain()
        finally:
            await watcher.stop()
            await self._close()

    async def _connect(self) -> bool:
        cfg = self.config
        deadline = (
            time.monotonic() + cfg.kafka.connect_timeout_s if cfg.kafka.connect_timeout_s else None
        )
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._start_clients()
                return True
            except (KafkaConnectionError, KafkaError, OSError, BrokerError) as exc:
                await self._close()
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise BrokerError(
                        f"broker {cfg.kafka.bootstrap_servers} unreachable for "
                        f"{cfg.kafka.connect_timeout_s:.0f}s: {exc}"
                    ) from exc
                log.warning(
                    "broker %s unreachable (%s); retrying in %.1fs",
                    cfg.kafka.bootstrap_servers,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 10.0)
        return False

    async def _start_clients(self) -> None:
        cfg = self.config
        common = kafka_client_kwargs(cfg.kafka)
        self._producer = AIOKafkaProducer(
            **common,
            client_id=f"{cfg.kafka.client_id}-{self.instance_id}",
            acks="all" if cfg.kafka.acks == "all" else int(cfg.kafka.acks),
            linger_ms=cfg.kafka.linger_ms,
            max_batch_size=_PRODUCER_BATCH_BYTES,
            max_request_size=max(_PRODUCER_BATCH_BYTES, cfg.input.max_message_bytes + 65536),
            compression_type=None
            if cfg.kafka.compression_type == "none"
            else cfg.kafka.compression_type,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **common,
            client_id=f"{cfg.kafka.client_id}-{self.instance_id}",
            group_id=cfg.kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.kafka.auto_offset_reset,
            session_timeout_ms=cfg.kafka.session_timeout_ms,
            heartbeat_interval_ms=cfg.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.kafka.max_poll_interval_ms,
            max_partition_fetch_bytes=max(1 << 20, cfg.input.max_message_bytes + 65536),
            fetch_max_bytes=max(50 << 20, cfg.input.max_message_bytes * 4),
        )
        await self._consumer.start()
        self._consumer.subscribe([cfg.topics.requests], listener=_Rebalance(self))
        partitions = {}
        for topic in (cfg.topics.decisions, cfg.topics.comparisons, cfg.topics.dead_letter):
            found = await self._producer.partitions_for(topic)
            if not found:
                raise BrokerError(f"output topic {topic} has no partitions; create it first")
            partitions[topic] = len(found)
        self._sender = OutputSender(self._producer, partitions)

    async def _close(self) -> None:
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None
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
        topics = self.config.topics
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                if self._in_flight_records >= cfg.max_in_flight_records:
                    await self._wait_for_room(consumer)
                    continue
                batches = await consumer.getmany(
                    timeout_ms=cfg.fetch_timeout_ms, max_records=cfg.max_batch
                )
                if not batches:
                    continue
                records = [record for part in batches.values() for record in part]
                policy = self.policy.current
                result = await self.pipeline.process(records, policy)
                futures = await self._send_until_accepted(result)
                if futures is None:  # stopping during an outage: not committed, re-consumed
                    break
                offsets = {tp: part[-1].offset + 1 for tp, part in batches.items()}
                self._in_flight.append(_InFlight(offsets, futures, result, len(records)))
                self._in_flight_records += len(records)
                self.peak_in_flight_records = max(
                    self.peak_in_flight_records, self._in_flight_records
                )
                self.metrics.in_flight.set(self._in_flight_records)
                self.metrics.observe_batch(topics.requests, len(records), result, self._names)
                self.processed += len(records)
                self._changed.set()
        finally:
            stop_wait.cancel()

    async def _send(self, result: BatchResult) -> list[asyncio.Future[Any]]:
        sender = self._sender
        assert sender is not None
        t = self.config.topics
        futures = await sender.send(t.decisions, result.decisions)
        futures += await sender.send(t.comparisons, result.comparisons)
        futures += await sender.send(t.dead_letter, result.dead_letters)
        return futures

    async def _send_until_accepted(self, result: BatchResult) -> list[asyncio.Future[Any]] | None:
        """Hand a batch's outputs to the producer, retrying while the broker is away.

        aiokafka refuses new batches (``KafkaTimeoutError``) once it has held the previous ones
        for ``request_timeout_ms`` without a broker. The batch is then sent again after a
        backoff; parts that did get through may repeat (at-least-once), nothing is dropped and
        nothing is committed meanwhile. Returns None when asked to stop first.
        """
        delay = 0.5
        while True:
            try:
                return await self._send(result)
            except KafkaError as exc:
                log.warning(
                    "producer refused outputs (%s: %s); broker unreachable? retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self.metrics.produce_retries.inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return None
                delay = min(delay * 2, 10.0)

    async def _wait_for_room(self, consumer: AIOKafkaConsumer) -> None:
        """Backpressure: pause fetching until the committer frees room."""
        paused = consumer.assignment()
        consumer.pause(*paused)
        try:
            while (
                self._in_flight_records >= self.config.pipeline.max_in_flight_records
                and not self._stopping.is_set()
            ):
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)
        finally:
            consumer.resume(*(tp for tp in paused if tp in consumer.assignment()))

    async def _commit_loop(self) -> None:
        """Commit batches in order, each once all its outputs are acknowledged."""
        delay = 0.2
        while True:
            if not self._in_flight:
                self._changed.clear()
                await self._changed.wait()
                continue
            head = self._in_flight[0]
            try:
                await asyncio.gather(*head.futures)
            except KafkaError as exc:
                # Not acknowledged: send the same outputs again; never commit past them.
                log.warning("producing outputs failed (%s); sending again in %.1fs", exc, delay)
                self.metrics.produce_retries.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                with contextlib.suppress(KafkaError):
                    head.futures = await self._send(head.result)
                continue
            delay = 0.2
            await self._commit(head.offsets)
            self._in_flight.popleft()
            self._in_flight_records -= head.records
            self.metrics.in_flight.set(self._in_flight_records)
            self._changed.set()

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
        while self._in_flight and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)
        if self._in_flight:
            log.warning(
                "gave up draining after %.0fs with %d records unacknowledged; they will be "
                "consumed again",
                self.config.pipeline.drain_timeout_s,
                self._in_flight_records,
            )
