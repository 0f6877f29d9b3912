"""The control plane's Kafka edge, run inside every sidecar instance.

Start-up: read the whole control topic from the beginning and :func:`replay` it, so the
instance routes its first batch under the same policy (same epoch) as every running instance.
"The end" is found with a *barrier*: the instance produces a record with a unique id to the
control topic and reads until that record comes back. This works on any broker (Tansu's end
offsets are wrong for multi-record batches; a barrier needs no offsets at all).

Live: every control record goes through :func:`process_record` with the **record timestamp**
as ``now_ms``; an applied command swaps the routing policy at once (the rollback path), then
an :class:`AuditRecord` and an :class:`InstanceStatus` are published. The records of one
fetched batch are all applied (or refused) first, then audited in the same order, and the
audits' acknowledgements are awaited together after the batch: a flood of garbage on the
control topic (anyone who can write it can write thousands a second) must not hold a
rollback behind it for a signature and a broker round trip per record. Rejections are logged
one by one up to :attr:`RejectionLog.EACH` per :attr:`RejectionLog.INTERVAL_S`, then summed up
per interval (every one is audited all the same).

The control topic has **one partition**: the order of commands is the order they apply in,
and only one partition gives every instance the same order. Instances read (and ``sidecar
ctl`` writes) partition 0 only; if the topic has more partitions, records elsewhere are
ignored with a warning at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from .. import __version__
from ..config import ControlSettings, SidecarConfig
from ..errors import BrokerError, ConfigError
from ..kafka import (
    Backoff,
    Supervisor,
    TaskFailure,
    ensure_control_topics,
    new_consumer,
    new_producer,
    stop_quietly,
    topic_configs,
    unreadable_of,
)
from ..outputs.lifecycle import OutputState, configured_outputs
from ..routing import Mode, PolicyHolder
from .commands import (
    OUTPUT_ACTIONS,
    Freshness,
    Rejected,
    RejectReason,
    encode_command,
    sign_command,
)
from .keys import SigningKey, TrustStore
from .records import (
    AuditRecord,
    InstanceRecord,
    InstanceStatus,
    ModelHealth,
    audit_record,
    instance_status,
    sign_record,
)
from .state_machine import (
    Applied,
    ControlConfig,
    ControlRecord,
    Noted,
    Outcome,
    RolloutState,
    initial_state,
    next_state,
    process_record,
    ramp_gate_holds,
    replay,
    tick,
    to_policy,
)

if TYPE_CHECKING:
    from ..metrics import SidecarMetrics
    from ..models import ScoringModel
    from ..pipeline import BatchResult
    from ..runner import Sidecar
    from ..tracing.spans import BatchTracer

log = logging.getLogger(__name__)

#: Commands live in this partition of the control topic (see the module docstring).
CONTROL_PARTITION = 0
#: Header that marks a start-up barrier record; barriers are not commands and never audited.
BARRIER_HEADER = "sidecar-control-barrier"
#: Live outcomes an instance keeps in memory (:attr:`ControlPlane.outcomes`).
KEEP_OUTCOMES = 1_000
#: An instance proposes an ``advance`` for the same epoch at most this often (one may be
#: refused as ``too_early`` when clocks differ slightly; the next attempt has a new id).
ADVANCE_RETRY_S = 5.0
#: Control records decided between two yields to the event loop (see ``handle_records``).
DECIDE_YIELD_EVERY = 64


class RejectionLog:
    """Logs rejected control records one by one, up to :attr:`EACH` per :attr:`INTERVAL_S`
    seconds, then one line per interval that counts the rest by reason: a flood of garbage on
    the control topic would otherwise write a warning per record (tens of thousands a minute)
    and bury the lines an operator needs. Every record is audited whatever is logged."""

    #: Rejections logged one by one per interval.
    EACH = 20
    #: Seconds an interval lasts.
    INTERVAL_S = 10.0

    def __init__(
        self,
        emit: Callable[[int, str], None],
        *,
        audit_topic: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._clock = clock
        self._audit_topic = audit_topic
        self._start = clock()
        self._count = 0
        self._held: dict[str, int] = {}

    def rejected(self, reason: str, level: int, message: str) -> None:
        self.flush_if_due()
        self._count += 1
        if self._count <= self.EACH:
            self._emit(level, message)
        else:
            self._held[reason] = self._held.get(reason, 0) + 1

    def flush_if_due(self) -> None:
        """At the end of an interval: the summary of what it held back, and a new interval."""
        if self._clock() - self._start >= self.INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """The summary of what was held back (if anything), and a new interval."""
        now = self._clock()
        if self._held:
            counts = ", ".join(f"{reason} {n:,}" for reason, n in self._held.items())
            self._emit(
                logging.WARNING,
                f"control: {sum(self._held.values()):,} more control records rejected in the "
                f"last {max(now - self._start, 0.0):.0f}s, not logged one by one (each is "
                f"audited on {self._audit_topic}): {counts}; is something writing garbage to "
                "the control topic?",
            )
            self._held = {}
        self._start = now
        self._count = 0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- settings


def load_trust(settings: ControlSettings, *, required: bool) -> TrustStore:
    """The trust store of ``control.trust_file``.

    Without one (``required=False``) the store is empty: the instance runs its configured
    policy and refuses (and audits) every command as ``unknown_key`` -- it fails closed.
    """
    if settings.trust_file:
        return TrustStore.from_file(settings.trust_file)
    if required:
        raise ConfigError(
            "no trust file: set control.trust_file to the public keys that may sign commands "
            "(`sidecar ctl keygen` prints the entry of a new key)"
        )
    return TrustStore()


def load_signing_key(path: str | None) -> SigningKey | None:
    return SigningKey.from_file(path) if path else None


def control_config(settings: ControlSettings) -> ControlConfig:
    """State-machine rules from the settings (identical on every instance)."""
    return ControlConfig(
        min_promoted_age_s=settings.min_promoted_age_s,
        freshness=Freshness(
            max_age_s=settings.max_command_age_s, max_future_s=settings.max_command_future_s
        ),
        require_signature=settings.require_signature,
        allow_create_time=settings.allow_create_time,
        ramp_gate=settings.ramp_gate,
        promote_gate=settings.promote_gate,
    )


def configured_state(cfg: SidecarConfig) -> RolloutState:
    """Epoch 0: the rollout as configured, before any command. ``since_ms`` is 0 so every
    instance (and ``ctl``) builds exactly the same state."""
    r = cfg.rollout
    if r.mode is Mode.CANARY and r.canary_share_bp == 0:
        raise ConfigError(
            "rollout.mode=canary with rollout.canary_share_bp=0 routes nothing to the "
            "candidate; use mode=shadow, or set a share (1..10000 bp)"
        )
    return initial_state(
        r.name,
        mode=r.mode,
        share_bp=r.canary_share_bp if r.mode is Mode.CANARY else None,
        has_candidate=cfg.models.candidate is not None,
        score_shadow_arm=r.score_shadow_arm,
        outputs=configured_outputs(cfg.outputs.versions),
    )


def is_barrier(headers: Any) -> bool:
    return any(name == BARRIER_HEADER for name, _ in headers or ())


#: ``ConsumerRecord.timestamp_type`` of a broker-assigned time (LogAppendTime).
LOG_APPEND_TIME = 1


def control_record(rec: Any) -> ControlRecord:
    """A consumed control-topic record as the state machine sees it."""
    return ControlRecord(
        rec.value or b"", rec.timestamp, getattr(rec, "timestamp_type", 0) == LOG_APPEND_TIME
    )


async def read_to_barrier(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    tp: TopicPartition,
    timeout_s: float = 30.0,
) -> tuple[list[Any], Any]:
    """Every record of ``tp`` from the consumer's position up to a barrier produced now, and
    that barrier record (its timestamp type tells what the broker does with record times).

    Barriers themselves are left out. Raises BrokerError if the barrier does not come back.
    """
    token = uuid.uuid4().hex.encode()
    await producer.send_and_wait(
        tp.topic, b"", key=b"barrier", partition=tp.partition, headers=[(BARRIER_HEADER, token)]
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = await consumer.getmany(tp, timeout_ms=200)
        for rec in batch.get(tp, []):
            if is_barrier(rec.headers):
                if (BARRIER_HEADER, token) in list(rec.headers):
                    return records, rec
                continue
            records.append(rec)
    raise BrokerError(
        f"control topic {tp.topic}: our start-up barrier did not come back within "
        f"{timeout_s:.0f}s; check that the broker accepts writes to it"
    )


# --------------------------------------------------------------------------- samples


class SampleCounter:
    """Comparisons produced by *this* instance, per policy epoch.

    Ramp floors count comparisons with ``policy_epoch >= step_epoch``. Each instance counts
    only its own partitions, so with N instances a step's floor is met later than with a
    cluster-wide count: conservative, never early. The aggregator may later advance on the
    global count instead.
    """

    def __init__(self) -> None:
        self._by_epoch: dict[int, int] = {}

    def observe(self, epoch: int, comparisons: int) -> None:
        if comparisons:
            self._by_epoch[epoch] = self._by_epoch.get(epoch, 0) + comparisons

    def since(self, epoch: int) -> int:
        return sum(n for e, n in self._by_epoch.items() if e >= epoch)

    def attach(self, metrics: SidecarMetrics) -> None:
        """Count the batches the data loop reports to its metrics (once per batch), so the
        loop needs no change of its own."""
        observe_batch = metrics.observe_batch

        def observe(
            topic: str, consumed: int, result: BatchResult, names: dict[str, tuple[str, str]]
        ) -> None:
            observe_batch(topic, consumed, result, names)
            if result.policy is not None:
                self.observe(result.policy.epoch, len(result.comparisons))

        setattr(metrics, "observe_batch", observe)  # noqa: B010 - instance-level wrap


# --------------------------------------------------------------------------- the plane


def models_health(champion: ScoringModel, candidate: ScoringModel | None) -> list[ModelHealth]:
    """What the heartbeat says about the models: which exact model runs in each arm and its
    breaker state, so ``ctl status`` shows an open breaker without a metrics stack."""
    out = []
    for arm, model in (("champion", champion), ("candidate", candidate)):
        if model is None:
            continue
        breaker = model.breaker
        out.append(
            ModelHealth(
                arm=arm,  # type: ignore[arg-type]
                model=model.name,
                version=model.version,
                manifest_digest=model.manifest_digest,
                breaker=breaker.state.name.lower() if breaker.config.enabled else "off",  # type: ignore[arg-type]
                breaker_opened=breaker.opened,
                registry_version=model.manifest.registry_version,
            )
        )
    return out


def registry_write_back(sidecar: Sidecar) -> Callable[[str, Applied], None] | None:
    """The registry write-back of a sidecar whose models come from MLflow (None otherwise):
    run in a thread, off the control path; a failure is logged, never raised (the command is
    applied whatever the registry says)."""
    from ..registry import ModelRef, write_back

    settings = sidecar.config.registry

    def ref(model: ScoringModel | None) -> ModelRef | None:
        if model is None or model.config.loader != "mlflow":
            return None
        uri = model.config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return ModelRef.of(model.manifest, model.manifest_digest, uri)

    champion, candidate = ref(sidecar.champion), ref(sidecar.candidate)
    if not settings.write_back or (champion is None and candidate is None):
        return None
    tasks: set[asyncio.Task[None]] = set()

    async def run(action: str, outcome: Applied) -> None:
        cmd = outcome.command
        try:
            done = await asyncio.to_thread(
                write_back,
                action,  # type: ignore[arg-type]
                champion=champion,
                candidate=candidate if action == "promote" else None,
                at_ms=outcome.new_state.since_ms,
                issued_by=cmd.issued_by,
                rollout=cmd.rollout,
                settings=settings,
            )
            log.info("registry: %s written back: %s", action, "; ".join(done) or "nothing")
        except Exception as exc:  # the registry is advisory: never stop serving for it
            log.warning("registry: writing %s back failed: %s", action, exc)

    def schedule(action: str, outcome: Applied) -> None:
        task = asyncio.get_running_loop().create_task(run(action, outcome))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return schedule


class ControlPlane:
    """Keeps one instance's routing policy in step with the control topic.

    Audit: every instance writes its own signed audit record (keyed by its instance id) for
    every live record of the control topic that is not its own start-up barrier -- applied,
    rejected (for whatever reason, other rollouts and garbage included), duplicate or noted.
    One writer per instance needs no election, and the audit then *proves* each instance
    applied a command, which is what ``sidecar ctl`` waits for. Records replayed at start-up
    are not audited again (the instances live at the time did).
    """

    def __init__(
        self,
        config: SidecarConfig,
        policy: PolicyHolder,
        instance_id: str,
        *,
        trust: TrustStore | None = None,
        signing_key: SigningKey | None = None,
        samples: Callable[[int], int] | None = None,
        assigned_partitions: Callable[[], int | None] | None = None,
        started_at_ms: int | None = None,
        models: Callable[[], list[ModelHealth] | None] | None = None,
        champion_fallbacks: Callable[[], int] | None = None,
        supervisor: Supervisor | None = None,
        on_outputs: Callable[[tuple[OutputState, ...]], None] | None = None,
        on_lifecycle: Callable[[str, Applied], None] | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        self.config = config
        self.settings = config.control
        self.policy = policy
        self.instance_id = instance_id
        self.trust = trust if trust is not None else load_trust(self.settings, required=False)
        self.signing_key = (
            signing_key
            if signing_key is not None
            else load_signing_key(self.settings.signing_key_file)
        )
        if self.signing_key is not None and self.signing_key.role != "sidecar":
            raise ConfigError(
                f"control.signing_key_file holds a key of role {self.signing_key.role}; a "
                "sidecar signs with a key of role sidecar (`sidecar ctl keygen --role sidecar`)"
            )
        self.rules = control_config(self.settings)
        self.state = configured_state(config)
        self._samples = samples or (lambda _epoch: 0)
        self._assigned = assigned_partitions or (lambda: None)
        self._models = models or (lambda: None)
        self._champion_fallbacks = champion_fallbacks or (lambda: 0)
        #: Told the older output versions' states whenever they change (the pipeline
        #: serves, re-labels or unloads them).
        self._on_outputs = on_outputs
        self._outputs_installed: tuple[OutputState, ...] | None = None
        #: Told ``("promote" | "retire", outcome)`` when a live command promotes the
        #: candidate or retires the old champion (the registry write-back); never on replay.
        self._on_lifecycle = on_lifecycle
        #: A span per live control record handled, when tracing is on (``sidecar.tracing``).
        self._tracer = tracer
        self._started_at_ms = started_at_ms or now_ms()
        self._host = socket.gethostname()
        self._tp = TopicPartition(config.topics.control, CONTROL_PARTITION)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        #: Runs the tail, heartbeat and tick tasks: the owner's, so that one of them dying
        #: stops the whole instance (a sidecar deaf to rollbacks must not keep serving).
        self.supervisor = supervisor or Supervisor("control plane", self._on_task_failure)
        self._tasks: list[asyncio.Task[None]] = []
        self._advance_attempts = 0
        self._last_advance: tuple[int, float] | None = None
        self._warned_no_key = False
        self._barrier_token: bytes | None = None
        #: The latest outcomes seen live (tests and benchmarks look at them); bounded: the
        #: guards' verdicts alone add one a minute for the life of the process.
        self.outcomes: deque[Outcome] = deque(maxlen=KEEP_OUTCOMES)
        self.applied = asyncio.Event()
        #: True once the start-up replay reached its barrier (``/readyz`` reads it).
        self.caught_up = False
        #: Rejected records, logged one by one up to a rate, then summed up.
        self.rejections = RejectionLog(
            lambda level, msg: log.log(level, "%s", msg), audit_topic=config.audit_topic
        )
        #: While a fetched batch is handled: the acknowledgements of its audits and statuses,
        #: awaited together after it (None: each send is awaited at once).
        self._unacked: list[asyncio.Future[Any]] | None = None

    @classmethod
    def for_sidecar(cls, sidecar: Sidecar) -> ControlPlane:
        """The plane of a :class:`~sidecar.runner.Sidecar`, counting its comparisons."""
        counter = SampleCounter()
        counter.attach(sidecar.metrics)

        def assigned() -> int | None:
            consumer = sidecar.consumer
            return None if consumer is None else len(consumer.assignment())

        return cls(
            sidecar.config,
            sidecar.policy,
            sidecar.instance_id,
            samples=counter.since,
            assigned_partitions=assigned,
            models=lambda: models_health(sidecar.champion, sidecar.candidate),
            champion_fallbacks=lambda: sidecar.champion_fallbacks,
            supervisor=sidecar.supervisor,
            on_outputs=sidecar.pipeline.set_output_states,
            on_lifecycle=registry_write_back(sidecar),
            tracer=sidecar.tracer,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the control topic and install its policy; then tail it in the background."""
        cfg = self.config
        if not len(self.trust):
            log.warning(
                "no trust file (control.trust_file): every control command will be refused "
                "and the configured policy stays in force"
            )
        await ensure_control_topics(cfg)
        await self._check_timestamps()
        self._producer = new_producer(cfg, "control", instance=self.instance_id)
        await self._producer.start()
        self._consumer = new_consumer(
            cfg,
            "control",
            instance=self.instance_id,
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self._tp.topic)
        if partitions and len(partitions) > 1:
            log.warning(
                "control topic %s has %d partitions; only partition %d is read, commands "
                "elsewhere are ignored. Recreate it with 1 partition.",
                self._tp.topic,
                len(partitions),
                CONTROL_PARTITION,
            )
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        history, barrier = await read_to_barrier(self._consumer, self._producer, self._tp)
        self._check_barrier_time(barrier)
        self.state, outcomes = replay(
            [control_record(rec) for rec in history],
            initial=self.state,
            trust=self.trust,
            config=self.rules,
        )
        applied = sum(isinstance(o, Applied) for o in outcomes)
        self._install()
        self.caught_up = True
        log.info(
            "control: replayed %d records (%d applied) from %s: rollout %s at epoch %d (%s)",
            len(history),
            applied,
            self._tp.topic,
            self.state.rollout,
            self.state.epoch,
            self.state.mode.value,
        )
        await self._publish_status()
        self._tasks = [
            self.supervisor.spawn(self._tail(), "control-tail"),
            self.supervisor.spawn(self._heartbeat(), "control-heartbeat"),
            self.supervisor.spawn(self._ticker(), "control-tick"),
        ]

    async def _check_timestamps(self) -> None:
        """Refuse to start against a control topic whose record times its producers choose,
        unless ``control.allow_create_time`` says so (see ``ControlConfig``)."""
        configs = (await topic_configs(self.config, [self._tp.topic]))[self._tp.topic]
        kind = configs.get("message.timestamp.type")
        if kind == "LogAppendTime":
            return
        if self.settings.allow_create_time:
            log.warning(
                "control topic %s keeps producer-chosen record times (%s): freshness and key "
                "validity are judged by a time an attacker with write access could choose "
                "(control.allow_create_time = true); replays and back-dated commands are "
                "still refused by command ids and epochs",
                self._tp.topic,
                kind or "CreateTime (not reported)",
            )
            return
        raise ConfigError(
            f"control topic {self._tp.topic} has message.timestamp.type="
            f"{kind or 'CreateTime (not reported)'}: command freshness must be judged by the "
            "broker's append time. Set it with `kafka-configs --alter --entity-type topics "
            f"--entity-name {self._tp.topic} --add-config message.timestamp.type=LogAppendTime`,"
            " or, where the broker cannot (the embedded one), set control.allow_create_time = "
            "true"
        )

    def _check_barrier_time(self, barrier: Any) -> None:
        """Our own barrier shows what the broker does: a topic configured for LogAppendTime
        whose records still carry producer times (the embedded broker) would refuse every
        command as ``untrusted_time``; say so at start-up instead."""
        if getattr(barrier, "timestamp_type", 0) == LOG_APPEND_TIME:
            return
        if not self.settings.allow_create_time:
            raise ConfigError(
                f"the broker keeps producer-chosen record times on {self._tp.topic} (our "
                "start-up barrier came back with CreateTime although the topic asks for "
                "LogAppendTime; the embedded broker does this): every command would be refused "
                "as untrusted_time. Use a broker that honours message.timestamp.type, or set "
                "control.allow_create_time = true"
            )

    def _on_task_failure(self, failure: TaskFailure) -> None:
        """A plane running on its own supervisor (not a sidecar's): it stops being caught up,
        so ``/readyz`` says so, and the owner sees :attr:`failure`."""
        self.caught_up = False

    @property
    def failure(self) -> TaskFailure | None:
        return self.supervisor.failure

    async def stop(self) -> None:
        self.caught_up = False
        await self.supervisor.cancel(self._tasks)
        self._tasks = []
        for client in (self._consumer, self._producer):
            await stop_quietly(client)
        self._consumer = self._producer = None

    # -- live ------------------------------------------------------------------------------

    def _install_outputs(self) -> None:
        if self._on_outputs is not None and self.state.outputs != self._outputs_installed:
            self._on_outputs(self.state.outputs)
            self._outputs_installed = self.state.outputs

    def _install(self) -> None:
        self._install_outputs()
        policy = to_policy(self.state)
        try:
            self.policy.swap(policy)
        except ValueError as exc:  # someone else set a later epoch by hand; keep theirs
            log.error("control: cannot install epoch %d: %s", policy.epoch, exc)

    async def _tail(self) -> None:
        """Apply every live control record. A record can never end this loop: whatever it
        holds ends as an audited outcome (see :func:`process_record`)."""
        consumer = self._consumer
        assert consumer is not None
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=1000)
            except KafkaError as exc:
                log.warning(
                    "control: fetching %s failed (%s); retrying in %.1fs",
                    self._tp.topic,
                    exc,
                    backoff.delay,
                )
                await backoff.wait()
                continue
            backoff.reset()
            await self.handle_records(batch.get(self._tp, []))
            self.rejections.flush_if_due()

    async def handle_records(self, records: list[Any]) -> None:
        """A fetched batch of live records: every one applied (or refused) in order first,
        without any I/O, so a rollback takes effect as soon as it is read, however many
        records come before it; then their audits (and statuses) in the same order, whose
        acknowledgements are awaited together at the end (see the module docstring)."""
        if not records:
            return
        decided = []
        for i, rec in enumerate(records):
            if i and i % DECIDE_YIELD_EVERY == 0:
                # Each record may cost a signature check (~0.1 ms): the data path of this
                # process runs between slices of a flood, never stalled for its whole length.
                await asyncio.sleep(0)
            decided.append((self._decide_record(rec), rec.offset, time.time_ns()))
        self._unacked = []
        try:
            for outcome, offset, started in decided:
                if outcome is not None:
                    await self._report(outcome, offset, started)
        finally:
            unacked, self._unacked = self._unacked, None
        for fut in unacked:
            try:
                await fut
            except KafkaError as exc:
                log.warning("control: producing an audit or status failed: %s", exc)

    async def handle_record(self, rec: Any) -> Outcome | None:
        """One live consumer record of the control topic (None: a start-up barrier)."""
        started = time.time_ns()
        outcome = self._decide_record(rec)
        if outcome is not None:
            await self._report(outcome, rec.offset, started)
        return outcome

    def _decide_record(self, rec: Any) -> Outcome | None:
        """Apply or refuse one consumer record, no I/O (None: a start-up barrier)."""
        skipped = unreadable_of(rec)
        if skipped is not None:
            return self._refused(Rejected(RejectReason.UNREADABLE, skipped.describe()))
        if is_barrier(rec.headers):
            if not rec.value:
                return None  # an instance's start-up barrier: not a command, nothing to do
            return self._refused(
                Rejected(
                    RejectReason.BARRIER,
                    "a record with the start-up barrier header and a value: barriers carry "
                    "none, so it is no barrier and no command",
                )
            )
        if rec.value is None:
            return self._refused(
                Rejected(RejectReason.MALFORMED, "record has no value (a tombstone): no command")
            )
        return self._decide(control_record(rec))

    def _refused(self, outcome: Rejected) -> Rejected:
        """A control record that never reached the state machine (logged, not yet audited)."""
        self.rejections.rejected(
            outcome.reason.value,
            logging.WARNING,
            f"control: rejected a record: {outcome.reason.value}: {outcome.detail}",
        )
        return outcome

    def _decide(self, record: ControlRecord) -> Outcome:
        """Apply one control record to the state (swapping the policy at once) and log it;
        no I/O: :meth:`_report` audits it."""
        before = self.state
        outcome = process_record(self.state, record, trust=self.trust, config=self.rules)
        self.state = next_state(self.state, outcome)
        if isinstance(outcome, Applied):
            self._install()  # before any I/O: this is the rollback latency
            log.info(
                "control: applied %s %s (epoch %d -> %d) by %s: %s",
                outcome.command.action,
                outcome.command.command_id,
                outcome.from_epoch,
                outcome.to_epoch,
                outcome.command.issued_by,
                outcome.command.reason,
            )
            self.applied.set()
            self._lifecycle(before, outcome)
        elif isinstance(outcome, Noted) and outcome.command.action in OUTPUT_ACTIONS:
            self._install_outputs()
            args = outcome.command.args
            log.info(
                "control: %s output version %s (%s) by %s: %s",
                outcome.command.action,
                args.output_version,
                outcome.command.command_id,
                outcome.command.issued_by,
                outcome.command.reason,
            )
        elif isinstance(outcome, Noted):
            verdict = outcome.command.args.verdict
            log.info("control: guard verdict %s: %s", outcome.command.command_id, verdict)
        elif isinstance(outcome, Rejected):
            cmd_id = outcome.command.command_id if outcome.command else "(undecodable)"
            level = (
                logging.INFO if outcome.reason is RejectReason.OTHER_ROLLOUT else logging.WARNING
            )
            self.rejections.rejected(
                outcome.reason.value,
                level,
                f"control: rejected {cmd_id}: {outcome.reason.value}: {outcome.detail}",
            )
        return outcome

    async def _report(self, outcome: Outcome, offset: int | None, started: int) -> None:
        """Audit a decided record (and publish the status when it changed the state)."""
        self.outcomes.append(outcome)
        await self._publish_audit(outcome, offset)
        if isinstance(outcome, Applied) or (
            isinstance(outcome, Noted) and outcome.command.action in OUTPUT_ACTIONS
        ):
            await self._publish_status()
        if self._tracer is not None:
            self._tracer.command(outcome, started)

    def _lifecycle(self, before: RolloutState, outcome: Applied) -> None:
        new = outcome.new_state
        promoted = outcome.command.args.candidate_version
        mine = self.candidate_version()
        if (
            new.mode is Mode.PROMOTED
            and before.mode is not Mode.PROMOTED
            and promoted not in (None, mine)
        ):  # a deploy under way: this instance promotes another model than the one named
            log.error(
                "control: %s promoted candidate %s, but this instance runs candidate %s: it "
                "now decides every request with %s; finish the deploy (or roll back)",
                outcome.command.command_id,
                promoted,
                mine,
                mine,
            )
        if self._on_lifecycle is None:
            return
        if new.mode is Mode.PROMOTED and before.mode is not Mode.PROMOTED:
            self._on_lifecycle("promote", outcome)
        elif new.retired and not before.retired:
            self._on_lifecycle("retire", outcome)

    def _signed(self, record: InstanceRecord) -> bytes:
        if self.signing_key is not None:
            record = sign_record(record, self.signing_key)
        return msgspec.json.encode(record)

    async def _publish_audit(self, outcome: Outcome, offset: int | None = None) -> None:
        record: AuditRecord = audit_record(
            outcome, instance_id=self.instance_id, applied_at_ms=now_ms(), record_offset=offset
        )
        await self._send(self.config.audit_topic, self._signed(record))

    def status_record(self) -> InstanceStatus:
        return instance_status(
            self.state,
            instance_id=self.instance_id,
            ts_ms=now_ms(),
            host=self._host,
            pid=os.getpid(),
            assigned_partitions=self._assigned(),
            started_at_ms=self._started_at_ms,
            version=__version__,
            models=self._models(),
            champion_fallbacks=self._champion_fallbacks(),
        )

    def status(self) -> bytes:
        return self._signed(self.status_record())

    async def _publish_status(self) -> None:
        await self._send(self.config.status_topic, self.status())

    async def _send(self, topic: str, value: bytes) -> None:
        producer = self._producer
        if producer is None:
            return
        try:
            if self._unacked is not None:  # within a batch: acknowledged after it
                self._unacked.append(
                    await producer.send(topic, value, key=self.instance_id.encode())
                )
                return
            await producer.send_and_wait(topic, value, key=self.instance_id.encode())
        except KafkaError as exc:
            log.warning("control: producing to %s failed: %s", topic, exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._publish_status()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_interval_s)
            try:
                await self.tick_once()
            except KafkaError as exc:  # the advance is proposed again at the next tick
                log.warning("control: publishing a ramp advance failed: %s", exc)

    async def tick_once(self) -> bool:
        """Publish a signed ``advance`` when the ramp's floors are met and the guards do not
        hold it back (``control.ramp_gate``); True if published."""
        ramp = self.state.ramp
        if ramp is None:
            return False
        key = self.signing_key
        issuer = key.principal if key is not None and key.principal else self.instance_id
        samples = self._samples(ramp.step_epoch)
        now = time.monotonic()
        if (
            self._last_advance is not None
            and self._last_advance[0] == self.state.epoch
            and now - self._last_advance[1] < ADVANCE_RETRY_S
        ):
            return False
        proposal = tick(
            self.state,
            now_ms(),
            samples,
            config=self.rules,
            issued_by=issuer,
            attempt=self._advance_attempts,
            candidate_version=self.candidate_version(),
        )
        if proposal is None:
            return False
        if key is None:
            if not self._warned_no_key:
                log.warning(
                    "control: ramp step %d is ready to advance but this instance has no "
                    "signing key (control.signing_key_file, role sidecar): it never advances",
                    ramp.step + 1,
                )
                self._warned_no_key = True
            return False
        cmd = sign_command(proposal.command, key)
        self._advance_attempts += 1
        self._last_advance = (self.state.epoch, now)
        assert self._producer is not None
        await self._producer.send_and_wait(
            self._tp.topic,
            encode_command(cmd),
            key=self.state.rollout.encode(),
            partition=CONTROL_PARTITION,
        )
        log.info("control: published %s (%s)", cmd.command_id, cmd.reason)
        return True

    def candidate_version(self) -> str | None:
        """The candidate version this instance runs (the one its advances promote)."""
        for health in self._models() or ():
            if health.arm == "candidate":
                return health.version
        candidate = self.config.models.candidate
        return None if candidate is None else candidate.version

    def ramp_held_by(self) -> str | None:
        """Why the guards hold the running ramp back (for status), or None."""
        return ramp_gate_holds(self.state, self.rules)
