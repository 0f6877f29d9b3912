"""The control plane on a real broker: operators steer every instance at once, signed and
audited; forged or replayed commands change nothing; a late instance rebuilds the same state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from kafka_helpers import create_topics, decode_values, make_config, read_topic, wait_until

from sidecar.config import SidecarConfig
from sidecar.contracts import Decision
from sidecar.control import AuditRecord, ControlCommand, InstanceStatus, Keyring, encode_command
from sidecar.control.ctl import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    build_command,
    format_status,
    issue,
    load_view,
    run_ctl,
)
from sidecar.control.plane import CONTROL_PARTITION, load_keyring, now_ms
from sidecar.hashing import BUCKETS
from sidecar.kafka import ensure_control_topics
from sidecar.routing import Mode
from sidecar.runner import Sidecar
from sidecar.traffic import produce_forever

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

HB_S = 0.5
SECRET_1 = "11" * 32
SECRET_2 = "22" * 32


def control_config(bootstrap: str, tmp_path: Path, **sections: dict[str, Any]) -> SidecarConfig:
    keys = tmp_path / "control.keys"
    keys.write_text(f"# test keys\nk1={SECRET_1}\nops={SECRET_2}\n")
    control = {"keys_file": str(keys), "key_id": "k1", "heartbeat_interval_s": HB_S}
    control.update(sections.pop("control", {}))
    return make_config(bootstrap, control=control, **sections)


@contextlib.asynccontextmanager
async def running(cfg: SidecarConfig, count: int) -> AsyncIterator[list[Sidecar]]:
    """``count`` in-process sidecars in one consumer group, stopped (drained) on exit."""
    sidecars = [Sidecar(cfg, instance_id=f"inst-{i}") for i in range(count)]
    tasks = [asyncio.create_task(s.run()) for s in sidecars]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sidecars)), 30)
        yield sidecars
    finally:
        for s in sidecars:
            s.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 40)
        for s in sidecars:
            s.close_models()


@contextlib.asynccontextmanager
async def traffic(cfg: SidecarConfig, rate: float) -> AsyncIterator[None]:
    task = asyncio.create_task(produce_forever(cfg, rate=rate))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def setup(cfg: SidecarConfig) -> None:
    await ensure_control_topics(cfg)  # control topic with one partition, first
    await create_topics(cfg)


async def ctl(cfg: SidecarConfig, action: Any, timeout_s: float = 10.0, **kw: Any) -> Any:
    keyring = load_keyring(cfg.control, required=True)
    cmd = build_command(action, cfg.rollout.name, issued_by="test@ci", **kw)
    return await issue(cfg, cmd, keyring=keyring, key_id="ops", timeout_s=timeout_s)


async def audits(cfg: SidecarConfig, idle_s: float = 1.0) -> list[AuditRecord]:
    records = await read_topic(cfg.kafka.bootstrap_servers, cfg.audit_topic, idle_s=idle_s)
    return list(decode_values(records, AuditRecord))


@pytest.mark.slow
async def test_canary_then_rollback_reaches_every_instance_and_routing_follows_epochs(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    async with traffic(cfg, rate=2000), running(cfg, 2) as (a, b):
        await wait_until(lambda: a.processed + b.processed > 500, 20)
        canary = await ctl(cfg, "canary", share_bp=5000, reason="try v2 on half")
        assert canary.code == EXIT_OK, canary.message
        assert canary.epoch == 1 and set(canary.confirmed) == {"inst-0", "inst-1"}
        assert a.policy.current.epoch == b.policy.current.epoch == 1
        before = a.processed + b.processed
        await wait_until(lambda: a.processed + b.processed > before + 1000, 20)
        rollback = await ctl(cfg, "rollback", reason="p99 latency regression")
        assert rollback.code == EXIT_OK, rollback.message
        assert rollback.epoch == 2 and set(rollback.confirmed) == {"inst-0", "inst-1"}
        for s in (a, b):
            assert s.policy.current.mode is Mode.ROLLED_BACK and s.policy.current.epoch == 2
        before = a.processed + b.processed
        await wait_until(lambda: a.processed + b.processed > before + 1000, 20)

    # The epoch -> policy map comes from the audit (what each instance applied).
    applied = [r for r in await audits(cfg) if r.outcome == "applied"]
    assert {(r.instance_id, r.to_epoch) for r in applied} == {
        (i, e) for i in ("inst-0", "inst-1") for e in (1, 2)
    }
    policies: dict[int, tuple[str, int]] = {0: ("canary", 2000)}
    for r in applied:
        assert r.to_epoch is not None and r.mode is not None and r.share_bp is not None
        assert policies.setdefault(r.to_epoch, (r.mode, r.share_bp)) == (r.mode, r.share_bp)
    decisions = decode_values(
        await read_topic(bootstrap, cfg.topics.decisions, idle_s=1.5), Decision
    )
    seen_epochs = {d.policy_epoch for d in decisions}
    assert seen_epochs == {0, 1, 2}, seen_epochs
    for d in decisions:
        mode, share = policies[d.policy_epoch]
        assert d.policy_mode == mode
        share = BUCKETS if mode == "promoted" else share if mode == "canary" else 0
        expected = "candidate" if d.bucket < share else "champion"
        assert d.routed_arm == expected, d
        assert d.arm == expected or d.fallback, d
        if d.policy_epoch >= rollback.epoch:
            assert d.arm != "candidate", d


async def test_forged_unsigned_replayed_and_malformed_commands_change_nothing(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    keyring = load_keyring(cfg.control, required=True)
    async with running(cfg, 1) as (sidecar,):
        ok = await ctl(cfg, "canary", share_bp=500)
        assert ok.code == EXIT_OK and ok.epoch == 1, ok.message
        plane = sidecar._control
        state_before = plane.state
        policy_before = sidecar.policy.current

        def cmd(command_id: str) -> ControlCommand:
            unsigned = build_command(
                "rollback", cfg.rollout.name, issued_by="mallory", reason="evil"
            )
            return msgspec.structs.replace(unsigned, command_id=command_id)

        attacker = Keyring.parse(f"ops={'ab' * 32}\nintruder={'cd' * 32}")
        stale = msgspec.structs.replace(cmd("stale"), issued_at_ms=now_ms() - 3_600_000)
        bad_rows: dict[str, bytes] = {
            "bad_signature": encode_command(attacker.sign(cmd("forged"), "ops")),
            "unknown_key": encode_command(attacker.sign(cmd("intruder"), "intruder")),
            "unsigned": encode_command(cmd("unsigned")),
            "stale": encode_command(keyring.sign(stale, "ops")),
            "malformed": b"{not json",
            "schema": b'{"command_id": "x", "action": "self-destruct"}',
        }
        # Tampering: a correctly signed command whose action was changed afterwards.
        genuine = msgspec.json.decode(encode_command(keyring.sign(cmd("tampered"), "ops")))
        genuine["action"] = "promote"
        bad_rows["tampered"] = msgspec.json.encode(genuine)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        await producer.start()
        try:
            for value in bad_rows.values():
                await producer.send_and_wait(cfg.topics.control, value, partition=CONTROL_PARTITION)
            # Replay: the exact record of the applied canary, published again.
            control = await read_topic(bootstrap, cfg.topics.control, idle_s=0.5)
            original = next(
                r.value for r in control if ok.command.command_id.encode() in (r.value or b"")
            )
            await producer.send_and_wait(cfg.topics.control, original, partition=CONTROL_PARTITION)
        finally:
            await producer.stop()
        await wait_until(lambda: len(plane.outcomes) >= 2 + len(bad_rows), 15)
        assert plane.state == state_before
        assert sidecar.policy.current is policy_before and policy_before.epoch == 1

        # Through ctl: a compare-and-set on a stale epoch is rejected with exit code 1.
        conflict = await ctl(cfg, "rollback", reason="cas", expected_epoch=0)
        assert conflict.code == EXIT_REJECTED and "epoch_conflict" in conflict.message

    records = [r for r in await audits(cfg) if r.instance_id == "inst-0"]
    reasons = [r.reason for r in records if r.outcome == "rejected"]
    assert sorted(reasons) == sorted(
        [
            "bad_signature",
            "unknown_key",
            "unsigned",
            "stale",
            "malformed",
            "schema",
            "bad_signature",
            "epoch_conflict",
        ]
    )
    assert [r.command_id for r in records if r.outcome == "duplicate"] == [ok.command.command_id]
    assert [r.to_epoch for r in records if r.outcome == "applied"] == [1]


async def test_ctl_times_out_naming_a_live_instance_that_never_reports(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    ghost = InstanceStatus(
        instance_id="ghost-1",
        rollout=cfg.rollout.name,
        epoch=0,
        mode="canary",
        share_bp=2000,
        ts_ms=now_ms(),
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        await producer.send_and_wait(cfg.status_topic, msgspec.json.encode(ghost), key=b"ghost-1")
    finally:
        await producer.stop()
    result = await ctl(cfg, "rollback", reason="drill", timeout_s=1.0)
    assert result.code == EXIT_TIMEOUT
    assert "ghost-1" in result.message and result.waiting_for == ["ghost-1"]


async def test_a_late_instance_rebuilds_the_same_state_from_ten_commands(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    async with running(cfg, 1) as (first,):
        for pct in (1, 2, 3, 4, 5, 6, 7):
            result = await ctl(cfg, "canary", share_bp=pct * 100)
            assert result.code == EXIT_OK, result.message
        for action in ("pause", "resume"):  # rejected: no ramp; audited, not applied
            assert (await ctl(cfg, action)).code == EXIT_REJECTED
        ramp = await ctl(cfg, "ramp", plan="10%:1h:1M,50%:1h:1M")
        assert ramp.code == EXIT_OK, ramp.message
        for action in ("pause", "shadow", "rollback"):
            result = await ctl(cfg, action, reason=f"{action} drill")
            assert result.code == EXIT_OK, result.message
        assert first.policy.current.epoch == 11
        async with running(cfg, 1) as (late,):
            assert late._control.state == first._control.state
            assert late.policy.current == first.policy.current
            assert late.policy.current.mode is Mode.ROLLED_BACK


async def test_ctl_status_shows_every_instance_and_the_last_commands(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kafka_helpers import write_toml

    from sidecar.cli import build_parser

    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    async with running(cfg, 2):
        assert (await ctl(cfg, "canary", share_bp=1000, reason="ten percent")).code == EXIT_OK
        view = await load_view(cfg, load_keyring(cfg.control, required=True))
        assert {s.instance_id for s in view.instances} == {"inst-0", "inst-1"}
        assert all(s.epoch == 1 for s in view.instances)
        text = format_status(view, cfg.rollout.name, last=5)
        path = write_toml(cfg, tmp_path / "sidecar.toml")
        args = build_parser().parse_args(["ctl", "status", "--config", str(path)])
        capsys.readouterr()
        assert await run_ctl(args) == EXIT_OK
        printed = capsys.readouterr().out
    for out in (text, printed):
        assert "rollout fraud-v2: canary 10% (1000 bp), epoch 1" in out
        assert "inst-0" in out and "inst-1" in out and "live" in out
        assert "'ten percent'" in out and "applied -> epoch 1" in out
        assert "champion  fraud-lr 1.4.0" in out and "breaker off" in out  # the models' health


@pytest.mark.slow
async def test_a_ramp_advances_through_signed_advances_once_per_step(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg = control_config(bootstrap, tmp_path, control={"tick_interval_s": 0.2})
    await setup(cfg)
    async with running(cfg, 2) as (a, b):
        ramp = await ctl(cfg, "ramp", plan="10%:0s:0,50%:0.5s:0")
        assert ramp.code == EXIT_OK, ramp.message
        # step 1 -> step 2 (advance), then the last step completes: canary 50%, no ramp.
        await wait_until(lambda: a._control.state.epoch == b._control.state.epoch == 3, 15)
        for s in (a, b):
            assert s._control.state.ramp is None and s.policy.current.canary_share_bp == 5000
    applied = [r for r in await audits(cfg) if r.outcome == "applied"]
    advances = sorted({(r.command_id, r.to_epoch) for r in applied if r.action == "advance"})
    assert advances == [(f"advance:{cfg.rollout.name}:1", 2), (f"advance:{cfg.rollout.name}:2", 3)]
