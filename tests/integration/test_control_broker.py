"""The control plane on a real broker: operators steer every instance at once, signed and
audited; forged or replayed commands change nothing; a late instance rebuilds the same state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from control_helpers import (
    audits,
    control_config,
    ctl,
    running,
    setup,
    traffic,
    trust_of,
)
from kafka_helpers import decode_values, read_topic, wait_until

from sidecar.contracts import Decision
from sidecar.control import InstanceStatus, SigningKey, sign_record
from sidecar.control.cli import run_ctl
from sidecar.control.client import EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT, load_view
from sidecar.control.format import format_status
from sidecar.control.plane import now_ms
from sidecar.hashing import BUCKETS
from sidecar.routing import Mode

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


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


async def test_ctl_times_out_naming_a_live_instance_that_never_reports(
    bootstrap: str, tmp_path: Path
) -> None:
    # A real instance (its heartbeat is signed with the sidecars' key) that stopped reading.
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    assert cfg.control.signing_key_file is not None
    sidecar_key = SigningKey.from_file(cfg.control.signing_key_file)
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
        signed = msgspec.json.encode(sign_record(ghost, sidecar_key))
        await producer.send_and_wait(cfg.status_topic, signed, key=b"ghost-1")
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
        assert (await ctl(cfg, "resume")).code == EXIT_REJECTED  # not held: audited, refused
        ramp = await ctl(cfg, "ramp", plan="10%:1h:1M,50%:1h:1M")
        assert ramp.code == EXIT_OK, ramp.message
        assert (await ctl(cfg, "pause", reason="hold")).code == EXIT_OK
        assert (await ctl(cfg, "shadow")).code == EXIT_REJECTED  # held: resume first
        for action in ("resume", "rollback"):
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
        view = await load_view(cfg, trust_of(cfg))
        assert {b.status.instance_id for b in view.instances} == {"inst-0", "inst-1"}
        assert all(b.status.epoch == 1 and b.verified for b in view.instances)
        text = format_status(view, cfg.rollout.name, last=5)
        path = write_toml(cfg, tmp_path / "sidecar.toml")
        args = build_parser().parse_args(["ctl", "status", "--config", str(path)])
        capsys.readouterr()
        assert await run_ctl(args) == EXIT_OK
        printed = capsys.readouterr().out
    for out in (text, printed):
        assert "rollout fraud-v2: canary 10% (1000 bp), epoch 1" in out
        assert "inst-0" in out and "inst-1" in out and "live" in out and "signed dev-sidecar" in out
        assert "'ten percent'" in out and "applied -> epoch 1" in out
        assert "champion  fraud-lr 1.4.0" in out and "breaker closed" in out  # the models' health


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
    advances = {(r.command_id, r.to_epoch) for r in applied if r.action == "advance"}
    # One advance per step, whichever instance proposed it first; both applied it.
    assert sorted(epoch for _, epoch in advances) == [2, 3]
    for command_id, epoch in advances:
        assert command_id.startswith(f"advance:{cfg.rollout.name}:{epoch - 1}:dev-sidecar:")
        assert {r.instance_id for r in applied if r.command_id == command_id} == {
            "inst-0",
            "inst-1",
        }


async def test_a_ramp_under_the_verdict_gate_moves_only_on_the_aggregators_go(
    bootstrap: str, tmp_path: Path
) -> None:
    """``control.ramp_gate = "verdict"``: with no aggregator the ramp holds its first step
    however long; once the aggregator runs, its signed guard verdicts (go: no guard in breach)
    let each step advance, up to promotion."""
    from kafka_helpers import unique

    from sidecar.aggregate.service import AggregatorService
    from sidecar.routing import Mode

    cfg = control_config(
        bootstrap,
        tmp_path,
        control={"tick_interval_s": 0.2, "ramp_gate": "verdict"},
        aggregate={
            "group_id": unique("agg"),
            "reports_topic": f"{unique('t')}.reports",
            "window_ms": 1000,
            "allowed_lateness_ms": 100,
            "idle_timeout_ms": 500,
            "metrics_port": 0,
            "commit_interval_ms": 200,
            "verdict_min_records": 50,
            "verdict_interval_s": 1.0,
        },
    )
    models = cfg.models  # a benign candidate: the champion's model, retrained (same scores)
    candidate = msgspec.structs.replace(models.champion, version="1.4.1")
    cfg = msgspec.structs.replace(cfg, models=msgspec.structs.replace(models, candidate=candidate))
    await setup(cfg)
    async with running(cfg, 1) as (side,), traffic(cfg, rate=600):
        ramp = await ctl(cfg, "ramp", plan="10%:1s:0,100%:1s:0")
        assert ramp.code == EXIT_OK, ramp.message
        await asyncio.sleep(4)
        assert side.policy.current.canary_share_bp == 1000  # held: nobody said go
        assert side._control is not None and side._control.state.epoch == 1
        service = AggregatorService(cfg)
        task = asyncio.create_task(service.run())
        try:
            await wait_until(lambda: side.policy.current.mode is Mode.PROMOTED, 60)
        finally:
            service.request_stop()
            await asyncio.wait_for(task, 30)
    assert service.verdicts and not service.commands  # verdicts only: nothing breached
    records = await audits(cfg)
    noted = [r for r in records if r.outcome == "noted"]
    advances = [r for r in records if r.outcome == "applied" and r.action == "advance"]
    assert noted and len(advances) == 2
    # Each advance followed a go verdict noted at the epoch it advanced from.
    for adv in advances:
        assert any(
            n.from_epoch == adv.from_epoch and n.applied_at_ms <= adv.applied_at_ms for n in noted
        ), (adv, noted)


async def test_ctl_promote_needs_a_quality_verdict_about_the_running_candidate(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``control.promote_gate = "quality"``: a passing verdict about another candidate version
    (the one a redeploy replaced) promotes nothing; ``sidecar ctl promote`` names the version
    the live instances report, and promotes once the verdict is about it."""
    from kafka_helpers import write_toml

    from sidecar.cli import build_parser
    from sidecar.control import CommandArgs, ControlCommand, Verdict
    from sidecar.control.client import issue

    cfg = control_config(bootstrap, tmp_path, control={"promote_gate": "quality"})
    assert cfg.models.candidate is not None
    running_version = cfg.models.candidate.version
    guard = SigningKey.from_file(tmp_path / "keys" / "dev-guard.key")
    path = write_toml(cfg, tmp_path / "sidecar.toml")
    operator = str(tmp_path / "keys" / "dev-operator.key")
    promote = ["ctl", "promote", "--config", str(path), "--key", operator, "--reason", "wins"]

    async def quality_verdict(candidate: str, window_end_ms: int) -> None:
        cmd = ControlCommand(
            command_id=f"quality-verdict:{cfg.rollout.name}:{candidate}:{window_end_ms}",
            rollout=cfg.rollout.name,
            action="verdict",
            issued_by=guard.principal or guard.id,
            reason="quality window",
            issued_at_ms=now_ms(),
            args=CommandArgs(
                verdict=Verdict(
                    quality_ok=True,
                    window_end_ms=window_end_ms,
                    detail="met",
                    candidate_version=candidate,
                    champion_version=cfg.models.champion.version,
                )
            ),
        )
        result = await issue(cfg, cmd, key=guard, trust=trust_of(cfg))
        assert result.code == EXIT_OK, result.message

    await setup(cfg)
    async with running(cfg, 1) as (inst,):
        await quality_verdict("0.9.0", now_ms())  # the candidate before the redeploy
        capsys.readouterr()
        assert await run_ctl(build_parser().parse_args(promote)) == EXIT_REJECTED
        refused = capsys.readouterr().err
        assert f"about candidate 0.9.0, not {running_version}" in refused
        assert inst.policy.current.mode is not Mode.PROMOTED

        await quality_verdict(running_version, now_ms())
        assert await run_ctl(build_parser().parse_args(promote)) == EXIT_OK
        assert inst.policy.current.mode is Mode.PROMOTED
    applied = [r for r in await audits(cfg) if r.outcome == "applied" and r.action == "promote"]
    assert len(applied) == 1
