"""The operator's side of the control plane, as a library (``sidecar ctl`` is its CLI).

* :func:`load_view`: the control topic replayed with the trust file (the verdicts every
  instance reaches) and the latest heartbeat of every instance, verified or not;
* :func:`issue`: sign a command with the operator's key, bound to the rollout's current epoch
  (read from the control topic unless given), publish it to partition 0, and wait until every
  live instance *proves* it applied it -- by a signed audit record or heartbeat -- or one
  refused it (see :mod:`sidecar.control.wait`).
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ..config import SidecarConfig
from ..errors import SidecarError
from ..kafka import (
    new_consumer,
    new_producer,
    read_until_idle,
    seek_since,
    stop_quietly,
    topic_partitions,
    unreadable_of,
)
from ..untrusted import decoded_or_none
from .commands import (
    Action,
    CommandArgs,
    ControlCommand,
    Rejected,
    RejectReason,
    decode_command,
    encode_command,
    parse_ramp_plan,
    sign_command,
)
from .keys import SigningKey, TrustStore
from .plane import (
    CONTROL_PARTITION,
    configured_state,
    control_config,
    control_record,
    is_barrier,
    now_ms,
)
from .records import AuditRecord, InstanceStatus, verify_record
from .state_machine import Outcome, RolloutState, replay
from .wait import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    STALE_HEARTBEATS,
    CtlResult,
    Progress,
    verdict,
)


def default_issuer() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def build_command(
    action: Action,
    rollout: str,
    *,
    issued_by: str = "sidecar ctl",
    reason: str | None = None,
    share_bp: int | None = None,
    plan: str | None = None,
    expected_epoch: int | None = None,
    output_version: str | None = None,
    sunset_ms: int | None = None,
    deprecation_ms: int | None = None,
    link: str | None = None,
    active_readers: int | None = None,
    force: bool | None = None,
    candidate_version: str | None = None,
) -> ControlCommand:
    """An unsigned command with a fresh unique id, issued now (signing sets ``issued_by`` to
    the key's holder)."""
    args = CommandArgs(
        share_bp=share_bp,
        plan=parse_ramp_plan(plan) if plan else None,
        output_version=output_version,
        sunset_ms=sunset_ms,
        deprecation_ms=deprecation_ms,
        link=link,
        active_readers=active_readers,
        force=force or None,
        candidate_version=candidate_version,
    )
    return ControlCommand(
        command_id=f"ctl:{action}:{uuid.uuid4().hex[:16]}",
        rollout=rollout,
        action=action,
        args=args,
        issued_by=issued_by,
        reason=reason or f"{action} via sidecar ctl",
        issued_at_ms=now_ms(),
        expected_epoch=expected_epoch,
    )


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The latest heartbeat of one instance, and the key that signed it (None: unverified)."""

    status: InstanceStatus
    signer: str | None

    @property
    def verified(self) -> bool:
        return self.signer is not None


@dataclass
class HistoryEntry:
    """One control record in topic order with the verdict the instances reach on it."""

    ts_ms: int
    offset: int
    command: ControlCommand | None
    outcome: Outcome


@dataclass
class ControlView:
    """The control topic replayed, plus recent heartbeats: what ``status`` prints."""

    states: dict[str, RolloutState]
    history: list[HistoryEntry]
    instances: list[Heartbeat]
    now_ms: int
    stale_ms: int


def candidate_to_promote(view: ControlView, rollout: str, configured: str | None) -> str | None:
    """The candidate version a ``promote`` names: the one every live, verified instance of
    ``rollout`` reports in its heartbeat, else ``configured`` (the config's candidate). Raises
    when live instances run different candidates: a deploy is under way, and the quality
    verdict can be about one of them only."""
    versions = sorted(
        {
            m.version
            for beat in view.instances
            if beat.verified
            and beat.status.rollout == rollout
            and view.now_ms - beat.status.ts_ms <= view.stale_ms
            for m in beat.status.models or ()
            if m.arm == "candidate"
        }
    )
    if len(versions) > 1:
        raise SidecarError(
            f"live instances of {rollout} run candidate versions {', '.join(versions)}: finish "
            "the deploy first, or name the one to promote with --candidate-version"
        )
    return versions[0] if versions else configured


def _rollout_of(rec: Any, default: str) -> str:
    decoded = decode_command(rec.value or b"")
    return decoded.rollout if isinstance(decoded, ControlCommand) else default


async def load_view(cfg: SidecarConfig, trust: TrustStore) -> ControlView:
    """Replay the control topic with ``trust`` (the same verdicts the instances reach), and
    read the recent heartbeats."""
    hb_ms = int(cfg.control.heartbeat_interval_s * 1000)
    now = now_ms()
    states, history = await load_states(cfg, trust)
    since = now - max(10 * 60_000, 20 * hb_ms)
    decode = msgspec.json.Decoder(InstanceStatus).decode
    latest: dict[tuple[str, bool], Heartbeat] = {}
    for rec in await read_until_idle(cfg, cfg.status_topic, role="ctl", since_ms=since):
        status = decoded_or_none(decode, rec.value)
        if status is None:
            continue
        signer = verify_record(status, trust, rec.timestamp)
        beat = Heartbeat(status, None if signer is None else signer.id)
        key = (status.instance_id, beat.verified)
        if key not in latest or status.ts_ms >= latest[key].status.ts_ms:
            latest[key] = beat
    return ControlView(
        states,
        history,
        sorted(latest.values(), key=lambda b: (b.status.instance_id, not b.verified)),
        now,
        STALE_HEARTBEATS * hb_ms,
    )


async def load_states(
    cfg: SidecarConfig, trust: TrustStore
) -> tuple[dict[str, RolloutState], list[HistoryEntry]]:
    """Every rollout's state, replayed from the control topic, and its history."""
    records = await read_until_idle(
        cfg, cfg.topics.control, role="ctl", only_partition=CONTROL_PARTITION
    )
    rules = control_config(cfg.control)
    by_rollout: dict[str, list[Any]] = {}
    history: list[HistoryEntry] = []
    for rec in records:
        skipped = unreadable_of(rec)
        if skipped is not None:
            refused = Rejected(RejectReason.UNREADABLE, skipped.describe())
            history.append(HistoryEntry(rec.timestamp, rec.offset, None, refused))
        elif is_barrier(rec.headers):
            if rec.value:
                refused = Rejected(RejectReason.BARRIER, "barrier header on a record with a value")
                history.append(HistoryEntry(rec.timestamp, rec.offset, None, refused))
        else:
            by_rollout.setdefault(_rollout_of(rec, cfg.rollout.name), []).append(rec)
    states: dict[str, RolloutState] = {}
    for name, recs in by_rollout.items():
        initial = configured_state(cfg)
        if name != cfg.rollout.name:
            initial = msgspec.structs.replace(initial, rollout=name)
        states[name], outcomes = replay(
            [control_record(r) for r in recs], initial=initial, trust=trust, config=rules
        )
        for rec, outcome in zip(recs, outcomes, strict=True):
            history.append(
                HistoryEntry(rec.timestamp, rec.offset, getattr(outcome, "command", None), outcome)
            )
    states.setdefault(cfg.rollout.name, configured_state(cfg))
    history.sort(key=lambda h: h.offset)
    return states, history


async def current_epoch(cfg: SidecarConfig, trust: TrustStore, rollout: str) -> int:
    """The epoch ``rollout`` is at, replayed from the control topic."""
    states, _ = await load_states(cfg, trust)
    state = states.get(rollout)
    return 0 if state is None else state.epoch


# --------------------------------------------------------------------------- issue & wait


def _consumer(cfg: SidecarConfig) -> AIOKafkaConsumer:
    return new_consumer(cfg, "ctl", fetch_max_wait_ms=20)


def _producer(cfg: SidecarConfig) -> AIOKafkaProducer:
    return new_producer(cfg, "ctl")


async def publish(
    cfg: SidecarConfig, command: ControlCommand, producer: AIOKafkaProducer | None = None
) -> int:
    """Produce a signed command to the control topic; returns its record timestamp (ms)."""
    own = producer is None
    if producer is None:
        producer = _producer(cfg)
        await producer.start()
    try:
        md = await producer.send_and_wait(
            cfg.topics.control,
            encode_command(command),
            key=command.rollout.encode(),
            partition=CONTROL_PARTITION,
        )
        return int(md.timestamp) if md.timestamp and md.timestamp > 0 else now_ms()
    finally:
        if own:
            await stop_quietly(producer)


async def issue(
    cfg: SidecarConfig,
    command: ControlCommand,
    *,
    key: SigningKey,
    trust: TrustStore,
    timeout_s: float = 10.0,
    wait: bool = True,
) -> CtlResult:
    """Sign, publish and (unless ``wait`` is False) wait for every live instance.

    A command without ``expected_epoch`` (other than ``rollback``) is bound to the epoch the
    control topic shows now: it applies only if nobody moved the rollout meanwhile.
    """
    if command.expected_epoch is None and command.action != "rollback":
        epoch = await current_epoch(cfg, trust, command.rollout)
        command = msgspec.structs.replace(command, expected_epoch=epoch)
    signed = sign_command(command, key)
    hb_ms = int(cfg.control.heartbeat_interval_s * 1000)
    stale_ms = STALE_HEARTBEATS * hb_ms
    start = time.monotonic()
    if not wait:
        published = await publish(cfg, signed)
        return CtlResult(EXIT_OK, f"published {signed.command_id}", signed, published)
    consumer = _consumer(cfg)
    producer = _producer(cfg)
    try:
        await consumer.start()
        await producer.start()
        await producer.partitions_for(cfg.topics.control)  # metadata now, not after publishing
        status_tps = await topic_partitions(consumer, cfg.status_topic)
        audit_tps = await topic_partitions(consumer, cfg.audit_topic)
        consumer.assign([*status_tps, *audit_tps])
        t0 = now_ms()
        await seek_since(consumer, status_tps, t0 - stale_ms - 1000)
        await seek_since(consumer, audit_tps, t0 - 5000)
        publishing = time.monotonic()
        published = await publish(cfg, signed, producer)
        progress = Progress(signed, max(published, t0), stale_ms)
        deadline = start + timeout_s
        status_caught_up = False
        status_decode = msgspec.json.Decoder(InstanceStatus).decode
        audit_decode = msgspec.json.Decoder(AuditRecord).decode
        while True:
            batch = await consumer.getmany(timeout_ms=50)
            saw_status = False
            for tp, recs in batch.items():
                for rec in recs:
                    if tp.topic == cfg.status_topic:
                        saw_status = True
                        status = decoded_or_none(status_decode, rec.value)
                        if status is not None:
                            verified = verify_record(status, trust, rec.timestamp) is not None
                            progress.status(status, verified)
                    else:
                        audit = decoded_or_none(audit_decode, rec.value)
                        if audit is not None:
                            verified = verify_record(audit, trust, rec.timestamp) is not None
                            progress.audit(audit, verified)
            status_caught_up = status_caught_up or not saw_status
            elapsed = time.monotonic() - start
            answer = verdict(progress, status_caught_up, elapsed, hb_ms)
            if answer is not None:
                code, message = answer
                return progress.result(code, message, published, elapsed, publishing)
            if time.monotonic() >= deadline:
                return progress.result(
                    EXIT_TIMEOUT,
                    progress.timeout_message(timeout_s),
                    published,
                    elapsed,
                    publishing,
                )
    finally:
        await stop_quietly(consumer)
        await stop_quietly(producer)


__all__ = [
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_TIMEOUT",
    "ControlView",
    "CtlResult",
    "Heartbeat",
    "HistoryEntry",
    "build_command",
    "current_epoch",
    "default_issuer",
    "issue",
    "load_states",
    "load_view",
    "publish",
]
