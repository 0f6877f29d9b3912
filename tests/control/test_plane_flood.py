"""The live control plane under a flood of garbage: a rollback behind it applies without
waiting for a broker round trip per record before it, and the log stays readable."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from control_helpers import control_config, operator_key

from sidecar.control import encode_command, sign_command
from sidecar.control.client import build_command
from sidecar.control.plane import CONTROL_PARTITION, ControlPlane, RejectionLog, now_ms
from sidecar.routing import Mode, PolicyHolder, RoutingPolicy

GARBAGE = 2_000


@dataclass
class Rec:
    value: bytes | None
    offset: int
    timestamp: int
    timestamp_type: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class StallingProducer:
    """Accepts records at once and acknowledges none until ``release``: a broker whose acks
    take a while (acks=all across zones), exaggerated."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[None]] = []
        self.sent = 0

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        await asyncio.sleep(0)  # a real producer's send takes its time too
        self.sent += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        return fut

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await (await self.send(topic, value, key))

    def release(self) -> None:
        for fut in self.pending:
            if not fut.done():
                fut.set_result(None)


class OneBatchConsumer:
    def __init__(self, tp: Any, records: list[Rec]) -> None:
        self.tp, self.records = tp, records

    async def getmany(self, *tps: Any, timeout_ms: int = 0) -> dict[Any, list[Rec]]:
        records, self.records = self.records, []
        if not records:
            await asyncio.sleep(timeout_ms / 1000)
        return {self.tp: records}


async def test_a_rollback_behind_a_flood_of_garbage_applies_before_their_audits_are_acked(
    tmp_path: Path,
) -> None:
    """Every control record is audited, but a fetched batch is applied first and audited
    after, its audits acknowledged together: 50,000 garbage records (written in 0.1 s) held a
    rollback behind them for ~25 s on the embedded broker (a signature and a broker round
    trip each; minutes at acks=all latencies)."""
    cfg = control_config("unused:9092", tmp_path)
    holder = PolicyHolder(RoutingPolicy(rollout=cfg.rollout.name))
    plane = ControlPlane(cfg, holder, "i1")
    rollback = sign_command(
        build_command("rollback", cfg.rollout.name, reason="flood test"), operator_key(cfg)
    )
    now = now_ms()
    records = [Rec(b'{"garbage":%d}' % i, i, now) for i in range(GARBAGE)]
    records.append(Rec(encode_command(rollback), GARBAGE, now))
    producer = StallingProducer()
    plane._producer = producer  # type: ignore[assignment]
    plane._consumer = OneBatchConsumer(plane._tp, records)  # type: ignore[assignment]
    assert plane._tp.partition == CONTROL_PARTITION
    tail = asyncio.create_task(plane._tail())
    try:
        await asyncio.wait_for(plane.applied.wait(), 10)
        assert holder.current.mode is Mode.ROLLED_BACK
        assert producer.sent < GARBAGE  # applied before the audits ahead of it were sent
        while producer.sent < GARBAGE + 2:  # then every record audited, and the status
            await asyncio.sleep(0.01)
        assert not any(f.done() for f in producer.pending)  # none acknowledged meanwhile
    finally:
        producer.release()
        tail.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tail


async def test_a_flood_of_rejected_records_is_logged_as_a_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = control_config("unused:9092", tmp_path)
    holder = PolicyHolder(RoutingPolicy(rollout=cfg.rollout.name))
    plane = ControlPlane(cfg, holder, "i1")
    producer = StallingProducer()
    plane._producer = producer  # type: ignore[assignment]
    now = now_ms()
    records = [Rec(b'{"garbage":%d}' % i, i, now) for i in range(GARBAGE)]
    plane._consumer = OneBatchConsumer(plane._tp, records)  # type: ignore[assignment]
    caplog.set_level(logging.INFO, logger="sidecar.control.plane")
    tail = asyncio.create_task(plane._tail())
    try:
        while producer.sent < GARBAGE:
            producer.release()
            await asyncio.sleep(0.01)
        producer.release()
        plane.rejections.flush()
    finally:
        tail.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tail
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.control.plane"]
    assert len(lines) == RejectionLog.EACH + 1, lines[-3:]
    summary = lines[-1]
    assert f"{GARBAGE - RejectionLog.EACH:,} more control records rejected" in summary
    assert f"schema {GARBAGE - RejectionLog.EACH:,}" in summary
    assert plane.config.audit_topic in summary


def test_the_rejection_log_logs_the_first_ones_then_sums_up_per_interval() -> None:
    clock = [0.0]
    logged: list[str] = []
    log = RejectionLog(
        emit=lambda _level, msg: logged.append(msg), clock=lambda: clock[0], audit_topic="ctl.a"
    )
    for i in range(RejectionLog.EACH + 5):
        log.rejected("schema", logging.WARNING, f"record {i}")
    log.rejected("bad_signature", logging.WARNING, "forged")
    assert logged == [f"record {i}" for i in range(RejectionLog.EACH)]
    log.flush_if_due()  # not yet
    assert len(logged) == RejectionLog.EACH
    clock[0] = RejectionLog.INTERVAL_S + 1
    log.flush_if_due()
    assert "6 more control records rejected" in logged[-1]
    assert "schema 5, bad_signature 1" in logged[-1] and "ctl.a" in logged[-1]
    log.rejected("schema", logging.WARNING, "a new interval")  # logged one by one again
    assert logged[-1] == "a new interval"
    log.flush()
    assert logged[-1] == "a new interval"  # nothing held back: no summary


async def test_a_tombstone_on_the_control_topic_is_refused_as_one(tmp_path: Path) -> None:
    """A null value was refused as "DecodeError: Input data was truncated", which sends an
    operator looking for a truncated command."""
    cfg = control_config("unused:9092", tmp_path)
    plane = ControlPlane(cfg, PolicyHolder(RoutingPolicy(rollout=cfg.rollout.name)), "i1")
    plane._producer = producer = StallingProducer()  # type: ignore[assignment]
    task = asyncio.create_task(plane.handle_record(Rec(None, 7, now_ms())))
    while not task.done():
        producer.release()
        await asyncio.sleep(0.01)
    outcome = task.result()
    assert outcome is not None and outcome.reason.value == "malformed"  # type: ignore[union-attr]
    assert "no value" in outcome.detail and "tombstone" in outcome.detail  # type: ignore[union-attr]


async def test_the_event_loop_gets_turns_while_a_flood_is_decided(tmp_path: Path) -> None:
    """Commands signed with a key the instances do not trust cost a signature check each
    (~0.1 ms): a batch of thousands is decided in slices, the data path of the process runs
    between them instead of stalling for the whole flood."""
    from sidecar.control import SigningKey

    cfg = control_config("unused:9092", tmp_path)
    holder = PolicyHolder(RoutingPolicy(rollout=cfg.rollout.name))
    plane = ControlPlane(cfg, holder, "i1")
    plane._producer = producer = StallingProducer()  # type: ignore[assignment]
    forger = SigningKey.generate(operator_key(cfg).id, "operator")
    now = now_ms()
    records = [
        Rec(encode_command(sign_command(build_command("pause", cfg.rollout.name), forger)), i, now)
        for i in range(GARBAGE)
    ]
    turns = 0
    decided = asyncio.Event()

    async def data_path() -> None:
        nonlocal turns
        while not decided.is_set():
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(data_path())
    await asyncio.sleep(0)
    handling = asyncio.create_task(plane.handle_records(records))
    while producer.sent == 0:  # every record is decided before the first audit is sent
        await asyncio.sleep(0)
    decided.set()
    before_audits = turns
    await other
    while not handling.done():
        producer.release()
        await asyncio.sleep(0.01)
    handling.result()
    assert holder.current.epoch == 0  # nothing forged applied
    assert all(o.reason.value == "bad_signature" for o in plane.outcomes)  # type: ignore[union-attr]
    assert before_audits >= GARBAGE // 64 - 1, before_audits
