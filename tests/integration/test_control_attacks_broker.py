"""An attacker with write access to the control, status and audit topics but without the
right private key, on a real broker: nothing they write changes the rollout, and every attempt
is audited with its reason (issue: control-plane security)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from control_helpers import (
    audits,
    control_config,
    ctl,
    key_set,
    operator_key,
    running,
    setup,
    trust_of,
)
from kafka_helpers import read_topic, wait_until

from sidecar.config import SidecarConfig
from sidecar.control import (
    AuditRecord,
    InstanceStatus,
    SigningKey,
    encode_command,
    sign_command,
)
from sidecar.control.client import EXIT_OK, EXIT_REJECTED, build_command
from sidecar.control.keys import trust_entry_text
from sidecar.control.plane import BARRIER_HEADER, CONTROL_PARTITION, now_ms
from sidecar.errors import ConfigError
from sidecar.routing import Mode
from sidecar.runner import Sidecar

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


async def publish(
    cfg: SidecarConfig,
    value: bytes,
    *,
    topic: str | None = None,
    timestamp_ms: int | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    key: bytes | None = None,
) -> None:
    """Write a record as the attacker: any bytes, any CreateTime, any headers."""
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, linger_ms=0)
    await producer.start()
    try:
        target = topic or cfg.topics.control
        await producer.send_and_wait(
            target,
            value,
            key=key,
            partition=CONTROL_PARTITION if target == cfg.topics.control else None,
            timestamp_ms=timestamp_ms,
            headers=headers,
        )
    finally:
        await producer.stop()


async def control_values(cfg: SidecarConfig) -> list[bytes]:
    records = await read_topic(cfg.kafka.bootstrap_servers, cfg.topics.control, idle_s=0.5)
    return [r.value for r in records if r.value]


def rejections(records: list[AuditRecord], instance: str = "inst-0") -> list[str | None]:
    return [r.reason for r in records if r.instance_id == instance and r.outcome == "rejected"]


async def test_replayed_and_back_dated_commands_never_apply(bootstrap: str, tmp_path: Path) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    async with running(cfg, 1) as (sidecar,):
        plane = sidecar.control
        assert plane is not None
        assert (await ctl(cfg, "canary", share_bp=600)).code == EXIT_OK
        again = await ctl(cfg, "canary", share_bp=600)  # the operator's no-op, refused
        assert again.code == EXIT_REJECTED and "no_change" in again.message
        promote = await ctl(cfg, "promote", expected_epoch=0)  # issued on a stale view
        assert promote.code == EXIT_REJECTED and "epoch_conflict" in promote.message
        assert (await ctl(cfg, "rollback", reason="drill")).code == EXIT_OK
        state = plane.state
        assert state.mode is Mode.ROLLED_BACK and state.epoch == 2
        # The attacker re-publishes the exact bytes of every command on the topic: the refused
        # canary, the refused promote (back-dated: CreateTime one second after issue), and the
        # applied ones.
        values = await control_values(cfg)
        refused = [v for v in values if again.command.command_id.encode() in v]
        stale_promote = [v for v in values if promote.command.command_id.encode() in v]
        assert refused and stale_promote
        issued = promote.command.issued_at_ms
        await publish(cfg, stale_promote[0], timestamp_ms=issued + 1000)
        for value in values:
            await publish(cfg, value)
        await wait_until(lambda: len(plane.outcomes) >= 4 + 1 + len(values), 15)
        assert plane.state == state  # nothing changed
        assert sidecar.policy.current.mode is Mode.ROLLED_BACK
    records = await audits(cfg)
    reasons = rejections(records)
    assert reasons.count("replayed") >= 2, reasons  # the refused canary and the promote
    assert "replayed" in reasons[-len(values) - 1 :]
    duplicates = [r for r in records if r.instance_id == "inst-0" and r.outcome == "duplicate"]
    assert len(duplicates) == 2  # the applied canary and rollback, re-published
    assert all(r.record_offset is not None and r.signature for r in records)


async def test_keys_act_only_within_their_role_dates_and_revocation(
    bootstrap: str, tmp_path: Path
) -> None:
    keys = key_set(tmp_path)
    expired = SigningKey.generate("ops-old", "operator")
    revoked = SigningKey.generate("ops-lost", "operator")
    with keys.trust_file.open("a") as trust:
        trust.write(trust_entry_text(expired.trusted()) + 'not_after = "2024-01-01T00:00:00Z"\n')
        trust.write(trust_entry_text(revoked.trusted()) + 'revoked_at = "2025-01-01T00:00:00Z"\n')
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    guard = SigningKey.from_file(keys.guard)
    sidecar_key = SigningKey.from_file(keys.sidecar)
    async with running(cfg, 1) as (sidecar,):
        plane = sidecar.control
        assert plane is not None
        tries: list[tuple[SigningKey, str]] = [
            (guard, "promote"),  # a guard may only stop things
            (sidecar_key, "promote"),  # a sidecar may only advance
            (sidecar_key, "rollback"),
            (expired, "promote"),
            (revoked, "promote"),
        ]
        for key, action in tries:
            result = await ctl(cfg, action, key=key, reason="x", timeout_s=5)
            assert result.code == EXIT_REJECTED, result.message
        assert plane.state.epoch == 0 and plane.state.mode is Mode.CANARY
        # The guard's own job still works: rollback (and pause) are its to sign.
        assert (await ctl(cfg, "rollback", key=guard, reason="guard drill")).code == EXIT_OK
    assert rejections(await audits(cfg)) == [
        "role",
        "role",
        "role",
        "key_expired",
        "key_revoked",
    ]


async def test_records_that_are_no_commands_of_this_rollout_are_audited_too(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    operator = operator_key(cfg)
    async with running(cfg, 1) as (sidecar,):
        plane = sidecar.control
        assert plane is not None
        other = sign_command(
            build_command("promote", "another-rollout", expected_epoch=0), operator
        )
        await publish(cfg, encode_command(other))
        # A command hidden behind the barrier header (barriers are skipped by the replay).
        hidden = sign_command(
            build_command("promote", cfg.rollout.name, expected_epoch=0), operator
        )
        await publish(cfg, encode_command(hidden), headers=[(BARRIER_HEADER, b"x")])
        await wait_until(lambda: len(plane.outcomes) >= 2, 10)
        assert plane.state.epoch == 0
    assert rejections(await audits(cfg)) == ["other_rollout", "barrier"]


async def test_forged_heartbeats_and_audit_records_confirm_nothing(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    phantom = InstanceStatus(
        instance_id="phantom-1",
        rollout=cfg.rollout.name,
        epoch=0,
        mode="canary",
        share_bp=2000,
        ts_ms=now_ms(),
    )
    async with running(cfg, 2) as (a, b):
        await publish(cfg, msgspec.json.encode(phantom), topic=cfg.status_topic, key=b"p")
        # A rollback every real instance applies: the phantom is not waited for.
        result = await ctl(cfg, "rollback", reason="phantoms are ignored")
        assert result.code == EXIT_OK, result.message
        assert set(result.confirmed) == {"inst-0", "inst-1"}
        assert result.unverified == ["phantom-1"]
        # A forged "applied" audit record for a real instance cannot confirm a command it
        # never saw: stop inst-1's control tail, then canary; ctl waits for inst-1 and times
        # out although a forged record says it applied.
        assert b.control is not None
        await b.control.supervisor.cancel(b.control._tasks)
        command = sign_command(
            build_command("canary", cfg.rollout.name, share_bp=100, expected_epoch=1),
            operator_key(cfg),
        )
        forged = AuditRecord(
            outcome="applied",
            instance_id="inst-1",
            applied_at_ms=now_ms(),
            command_id=command.command_id,
            to_epoch=2,
        )
        await publish(cfg, msgspec.json.encode(forged), topic=cfg.audit_topic, key=b"inst-1")
        from sidecar.control.client import issue

        late = await issue(cfg, command, key=operator_key(cfg), trust=trust_of(cfg), timeout_s=3)
        assert late.code != EXIT_OK and "inst-1" in late.waiting_for, late.message
        assert a.policy.current.canary_share_bp == 100


async def test_a_control_topic_with_producer_times_is_refused_unless_allowed(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path, control={"allow_create_time": False})
    await setup(cfg)
    sidecar = Sidecar(cfg)
    try:
        with pytest.raises(ConfigError, match="allow_create_time") as err:
            await sidecar.run()
        assert "untrusted_time" in str(err.value)
    finally:
        sidecar.close_models()
