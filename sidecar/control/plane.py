"""The control plane's Kafka edge, run inside every sidecar instance.

Start-up: read the whole control topic from the beginning and :func:`replay` it, so the
instance routes its first batch under the same policy (same epoch) as every running instance.
"The end" is found with a *barrier*: the instance produces a record with a unique id to the
control topic and reads until that record comes back. This works on any broker (Tansu's end
offsets are wrong for multi-record batches; a barrier needs no offsets at all).

Live: every control record goes through :func:`process_record` with the **record timestamp**
as ``now_ms``; an applied command swaps the routing policy at once (the rollback path), then
an :class:`AuditRecord` and an :class:`InstanceStatus` are published.

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
from collections.abc import Callable, Mapping
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
    unreadable_of,
)
from ..routing import Mode, PolicyHolder
from .commands import Freshness, Keyring, KeyringError, Rejected, RejectReason, encode_command
from .state_machine import (
    Applied,
    ControlConfig,
    ModelHealth,
    Outcome,
    RolloutState,
    audit_record,
    initial_state,
    instance_status,
    process_record,
    replay,
    tick,
    to_policy,
)

if TYPE_CHECKING:
    from ..metrics import SidecarMetrics
    from ..models import ScoringModel
    from ..pipeline import BatchResult
    from ..runner import Sidecar

log = logging.getLogger(__name__)

#: Commands live in this partition of the control topic (see the module docstring).
CONTROL_PARTITION = 0
#: Header that marks a start-up barrier record; barriers are not commands and never audited.
BARRIER_HEADER = "sidecar-control-barrier"
#: An instance re-publishes the same ``advance`` at most this often (it may be rejected as
#: ``too_early`` when clocks differ slightly; the id stays the same, so retries dedupe).
ADVANCE_RETRY_S = 5.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- settings


def load_keyring(
    settings: ControlSettings, *, required: bool, environ: Mapping[str, str] | None = None
) -> Keyring:
    """The keyring from ``control.keys_file`` or the ``control.keys_env`` variable.

    A sidecar without keys (``required=False``) gets an empty keyring: it runs its configured
    policy and rejects (and audits) every command as ``unknown_key`` -- it fails closed.
    """
    env = os.environ if environ is None else environ
    if settings.keys_file:
        return Keyring.from_file(settings.keys_file)
    if env.get(settings.keys_env, "").strip():
        return Keyring.from_env(settings.keys_env, env)
    if required:
        raise KeyringError(
            f"no control keys: set control.keys_file in the config or ${settings.keys_env} "
            "to `key_id:hexsecret[,key_id:hexsecret]`"
        )
    return Keyring({})


def control_config(settings: ControlSettings) -> ControlConfig:
    """State-machine rules from the settings (identical on every instance)."""
    return ControlConfig(
        min_promoted_age_s=settings.min_promoted_age_s,
        freshness=Freshness(
            max_age_s=settings.max_command_age_s, max_future_s=settings.max_command_future_s
        ),
        require_signature=settings.require_signature,
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
    )


def is_barrier(headers: Any) -> bool:
    return any(name == BARRIER_HEADER for name, _ in headers or ())


async def read_to_barrier(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    tp: TopicPartition,
    timeout_s: float = 30.0,
) -> list[Any]:
    """Every record of ``tp`` from the consumer's position up to a barrier produced now.

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
                    return records
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


class ControlPlane:
    """Keeps one instance's routing policy in step with the control topic.

    Audit: every instance writes its own audit record (keyed by its instance id) for every
    live control record of its rollout -- applied, rejected or duplicate. One writer per
    instance needs no election, and the audit then *proves* each instance applied a command,
    which is what ``sidecar ctl`` waits for. Records replayed at start-up are not audited
    again (the instances live at the time did); records for other rollouts are not audited.
    """

    def __init__(
        self,
        config: SidecarConfig,
        policy: PolicyHolder,
        instance_id: str,
        *,
        keyring: Keyring | None = None,
        samples: Callable[[int], int] | None = None,
        assigned_partitions: Callable[[], int | None] | None = None,
        started_at_ms: int | None = None,
        models: Callable[[], list[ModelHealth] | None] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        self.settings = config.control
        self.policy = policy
        self.instance_id = instance_id
        self.keyring = (
            keyring if keyring is not None else load_keyring(self.settings, required=False)
        )
        self.rules = control_config(self.settings)
        self.state = configured_state(config)
        self._samples = samples or (lambda _epoch: 0)
        self._assigned = assigned_partitions or (lambda: None)
        self._models = models or (lambda: None)
        self._started_at_ms = started_at_ms or now_ms()
        self._host = socket.gethostname()
        self._tp = TopicPartition(config.topics.control, CONTROL_PARTITION)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        #: Runs the tail, heartbeat and tick tasks: the owner's, so that one of them dying
        #: stops the whole instance (a sidecar deaf to rollbacks must not keep serving).
        self.supervisor = supervisor or Supervisor("control plane", self._on_task_failure)
        self._tasks: list[asyncio.Task[None]] = []
        self._last_advance: tuple[str, float] | None = None
        self._warned_no_key = False
        #: Outcomes seen live (tests and benchmarks look at them).
        self.outcomes: list[Outcome] = []
        self.applied = asyncio.Event()
        #: True once the start-up replay reached its barrier (``/readyz`` reads it).
        self.caught_up = False

    @classmethod
    def for_sidecar(cls, sidecar: Sidecar) -> ControlPlane:
        """The plane of a :class:`~sidecar.runner.Sidecar`, counting its comparisons."""
        counter = SampleCounter()
        counter.attach(sidecar.metrics)

        def assigned() -> int | None:
            consumer = sidecar._consumer  # read-only peek, for the heartbeat
            return None if consumer is None else len(consumer.assignment())

        return cls(
            sidecar.config,
            sidecar.policy,
            sidecar.instance_id,
            samples=counter.since,
            assigned_partitions=assigned,
            models=lambda: models_health(sidecar.champion, sidecar.candidate),
            supervisor=sidecar.supervisor,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the control topic and install its policy; then tail it in the background."""
        cfg = self.config
        if not len(self.keyring):
            log.warning(
                "no control keys configured (control.keys_file or $%s): every control command "
                "will be rejected and the configured policy stays in force",
                self.settings.keys_env,
            )
        await ensure_control_topics(cfg)
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
        history = await read_to_barrier(self._consumer, self._producer, self._tp)
        self.state, outcomes = replay(
            [(rec.value or b"", rec.timestamp) for rec in history],
            initial=self.state,
            keyring=self.keyring,
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

    def _install(self) -> None:
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
            for rec in batch.get(self._tp, []):
                skipped = unreadable_of(rec)
                if skipped is not None:
                    await self._refuse(Rejected(RejectReason.UNREADABLE, skipped.describe()))
                elif not is_barrier(rec.headers):
                    await self.handle(rec.value or b"", rec.timestamp)

    async def _refuse(self, outcome: Rejected) -> None:
        """Audit a control record that never reached the state machine."""
        log.warning("control: rejected a record: %s: %s", outcome.reason.value, outcome.detail)
        self.outcomes.append(outcome)
        await self._publish_audit(outcome)

    async def handle(self, value: bytes, record_ts_ms: int) -> Outcome:
        """One live control record: apply it (swapping the policy first), then audit it."""
        outcome = process_record(
            self.state, value, record_ts_ms, keyring=self.keyring, config=self.rules
        )
        if isinstance(outcome, Applied):
            self.state = outcome.new_state
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
        elif isinstance(outcome, Rejected):
            if outcome.reason is RejectReason.OTHER_ROLLOUT:
                return outcome
            cmd_id = outcome.command.command_id if outcome.command else "(undecodable)"
            log.warning(
                "control: rejected %s: %s: %s", cmd_id, outcome.reason.value, outcome.detail
            )
        self.outcomes.append(outcome)
        await self._publish_audit(outcome)
        if isinstance(outcome, Applied):
            await self._publish_status()
        return outcome

    async def _publish_audit(self, outcome: Outcome) -> None:
        record = audit_record(outcome, instance_id=self.instance_id, applied_at_ms=now_ms())
        await self._send(self.config.audit_topic, msgspec.json.encode(record))

    def status(self) -> bytes:
        return msgspec.json.encode(
            instance_status(
                self.state,
                instance_id=self.instance_id,
                ts_ms=now_ms(),
                host=self._host,
                pid=os.getpid(),
                assigned_partitions=self._assigned(),
                started_at_ms=self._started_at_ms,
                version=__version__,
                models=self._models(),
            )
        )

    async def _publish_status(self) -> None:
        await self._send(self.config.status_topic, self.status())

    async def _send(self, topic: str, value: bytes) -> None:
        producer = self._producer
        if producer is None:
            return
        try:
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
        """Publish a signed ``advance`` when the ramp's floors are met; True if published."""
        ramp = self.state.ramp
        if ramp is None:
            return False
        samples = self._samples(ramp.step_epoch)
        proposal = tick(
            self.state,
            now_ms(),
            samples,
            guard_ok=True,
            config=self.rules,
            issued_by=f"sidecar/{self.instance_id}",
        )
        if proposal is None:
            return False
        key_id = self.settings.key_id
        if key_id is None or key_id not in self.keyring:
            if not self._warned_no_key:
                log.warning(
                    "control: ramp step %d is ready to advance but control.key_id is %s; "
                    "set it to a key in the keyring so this instance can sign advances",
                    ramp.step + 1,
                    "unset" if key_id is None else f"{key_id!r} (unknown)",
                )
                self._warned_no_key = True
            return False
        cmd = proposal.command
        now = time.monotonic()
        if (
            self._last_advance
            and self._last_advance[0] == cmd.command_id
            and (now - self._last_advance[1] < ADVANCE_RETRY_S)
        ):
            return False
        self._last_advance = (cmd.command_id, now)
        assert self._producer is not None
        await self._producer.send_and_wait(
            self._tp.topic,
            encode_command(self.keyring.sign(cmd, key_id)),
            key=self.state.rollout.encode(),
            partition=CONTROL_PARTITION,
        )
        log.info("control: published %s (%s)", cmd.command_id, cmd.reason)
        return True
