"""What instances write about themselves: heartbeats (status topic) and audit records.

Both are signed by the instance's own key (role ``sidecar``), so ``sidecar ctl`` counts only
records it can verify: a forged heartbeat of a phantom instance, or a forged "applied" audit
record for a real one, is shown as unverified and never confirms a command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import msgspec

from .commands import ControlCommand, Duplicate, Rejected
from .keys import INSTANCE_ROLES, Refusal, SigningKey, TrustedKey, TrustStore

if TYPE_CHECKING:
    from .state_machine import RolloutState

#: Prefixes of the signed bytes of each record type (a signature never crosses types).
AUDIT_DOMAIN = b"sidecar-audit-v1\n"
STATUS_DOMAIN = b"sidecar-status-v1\n"

OutcomeKind = Literal["applied", "rejected", "duplicate", "noted"]


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the audit topic: what happened to one control record, on one instance."""

    outcome: OutcomeKind
    instance_id: str
    applied_at_ms: int
    command_id: str | None = None
    rollout: str | None = None
    action: str | None = None
    issued_by: str | None = None
    issued_at_ms: int | None = None
    key_id: str | None = None
    #: The operator's reason for the command.
    command_reason: str | None = None
    #: Rejection code (``RejectReason`` value) and its human-readable detail.
    reason: str | None = None
    detail: str | None = None
    from_epoch: int | None = None
    to_epoch: int | None = None
    mode: str | None = None
    share_bp: int | None = None
    #: Offset of the control record (partition 0) this line is about.
    record_offset: int | None = None
    #: The instance's key and its signature over this record (see the module docstring).
    signer: str | None = None
    signature: str | None = None
    schema_version: str = "1.0"


class ModelHealth(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One model arm as an instance runs it: which exact model (the manifest digest names its
    contract and, for registry loaders, the registry version) and its circuit breaker."""

    arm: Literal["champion", "candidate"]
    model: str
    version: str
    manifest_digest: str | None = None
    #: ``off`` when the breaker is disabled (the model is called whatever happens).
    breaker: Literal["off", "closed", "half_open", "open"] = "off"
    #: Times the breaker opened since the instance started.
    breaker_opened: int = 0
    #: Registry loaders (``mlflow``): the registry version the target resolved to.
    registry_version: str | None = None


class InstanceStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Heartbeat of one sidecar instance: the policy it runs, so operators (and ``sidecar ctl
    status``) can see every instance converge on the same epoch."""

    instance_id: str
    rollout: str
    epoch: int
    mode: str
    share_bp: int
    ts_ms: int
    last_command_id: str | None = None
    paused: bool = False
    ramp_step: int | None = None  # 1-based
    ramp_steps: int | None = None
    score_shadow_arm: bool = True
    retired: bool = False
    host: str | None = None
    pid: int | None = None
    assigned_partitions: int | None = None
    started_at_ms: int | None = None
    version: str | None = None
    #: The models' health (absent in heartbeats of older instances).
    models: list[ModelHealth] | None = None
    #: Records whose champion was down and the candidate decided, though the rollout had not
    #: given the candidate those records (``rollout.champion_failure = fallback_candidate``).
    champion_fallbacks: int = 0
    signer: str | None = None
    signature: str | None = None
    schema_version: str = "1.0"


InstanceRecord = AuditRecord | InstanceStatus


def instance_status(
    state: RolloutState,
    *,
    instance_id: str,
    ts_ms: int,
    host: str | None = None,
    pid: int | None = None,
    assigned_partitions: int | None = None,
    started_at_ms: int | None = None,
    version: str | None = None,
    models: list[ModelHealth] | None = None,
    champion_fallbacks: int = 0,
) -> InstanceStatus:
    """The heartbeat of an instance running ``state``."""
    return InstanceStatus(
        instance_id=instance_id,
        rollout=state.rollout,
        epoch=state.epoch,
        mode=state.mode.value,
        share_bp=state.share_bp,
        ts_ms=ts_ms,
        last_command_id=state.last_command_id,
        paused=state.paused,
        ramp_step=None if state.ramp is None else state.ramp.step + 1,
        ramp_steps=None if state.ramp is None else len(state.ramp.plan),
        score_shadow_arm=state.score_shadow_arm,
        retired=state.retired,
        host=host,
        pid=pid,
        assigned_partitions=assigned_partitions,
        started_at_ms=started_at_ms,
        version=version,
        models=models,
        champion_fallbacks=champion_fallbacks,
    )


def _domain(record: InstanceRecord) -> bytes:
    return AUDIT_DOMAIN if isinstance(record, AuditRecord) else STATUS_DOMAIN


def _signed_bytes(record: InstanceRecord) -> bytes:
    unsigned = msgspec.structs.replace(record, signature=None)
    return _domain(record) + msgspec.json.encode(msgspec.to_builtins(unsigned), order="sorted")


def sign_record(record: InstanceRecord, key: SigningKey) -> InstanceRecord:
    """``record`` signed by the instance's ``key``."""
    with_signer = msgspec.structs.replace(record, signer=key.id, signature=None)
    return msgspec.structs.replace(with_signer, signature=key.sign(_signed_bytes(with_signer)))


def verify_record(record: InstanceRecord, trust: TrustStore, at_ms: int) -> TrustedKey | None:
    """The instance key that signed ``record`` (of a role that may sign instance records), or
    None when it is unsigned, forged, or signed by a key that may not."""
    try:
        key = trust.check(
            record.signer, record.signature, _signed_bytes(record), at_ms, action=None
        )
    except Refusal:
        return None
    return key if key.role in INSTANCE_ROLES else None


def audit_record(
    outcome: object,
    *,
    instance_id: str,
    applied_at_ms: int,
    record_offset: int | None = None,
) -> AuditRecord:
    """The audit-topic record for ``outcome`` (an ``Applied``, ``Noted``, ``Rejected`` or
    ``Duplicate`` of the state machine)."""
    from .state_machine import Applied, Noted

    record: AuditRecord
    if isinstance(outcome, Applied):
        record = AuditRecord(
            outcome="applied",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            from_epoch=outcome.from_epoch,
            to_epoch=outcome.to_epoch,
            mode=outcome.new_state.mode.value,
            share_bp=outcome.new_state.share_bp,
        )
    elif isinstance(outcome, Noted):
        epoch = outcome.new_state.epoch  # a verdict changes no epoch: the one it was noted at
        record = AuditRecord(
            outcome="noted",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            from_epoch=epoch,
            to_epoch=epoch,
        )
    elif isinstance(outcome, Duplicate):
        record = AuditRecord(
            outcome="duplicate",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            reason="duplicate",
        )
    elif isinstance(outcome, Rejected):
        record = AuditRecord(
            outcome="rejected",
            instance_id=instance_id,
            applied_at_ms=applied_at_ms,
            reason=outcome.reason.value,
            detail=outcome.detail,
        )
    else:
        raise TypeError(f"not an outcome: {outcome!r}")
    record = msgspec.structs.replace(record, record_offset=record_offset)
    cmd: ControlCommand | None = getattr(outcome, "command", None)
    if cmd is None:
        return record
    return msgspec.structs.replace(
        record,
        command_id=cmd.command_id,
        rollout=cmd.rollout,
        action=cmd.action,
        issued_by=cmd.issued_by,
        issued_at_ms=cmd.issued_at_ms,
        key_id=cmd.key_id,
        command_reason=cmd.reason,
    )
