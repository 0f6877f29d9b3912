"""Read a :class:`Recording` from a broker: the reports, control and audit topics.

Records are read from ``start_ms`` (by Kafka record timestamp) until the topic is idle, then
cut at ``end_ms`` -- end offsets are not used (Tansu reports them wrong). Undecodable records
are skipped and counted, never fatal: a report should still come out of a messy topic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import msgspec

from ..aggregate.report import WindowReport
from ..config import SidecarConfig
from ..control.commands import ControlCommand
from ..control.plane import is_barrier
from ..control.state_machine import AuditRecord
from ..errors import BrokerError
from .model import Recording


@dataclass
class ReadResult:
    recording: Recording
    skipped: int


def _in_range(ts: int, start_ms: int | None, end_ms: int | None) -> bool:
    return (start_ms is None or ts >= start_ms) and (end_ms is None or ts < end_ms)


async def read_recording(
    cfg: SidecarConfig,
    start_ms: int | None = None,
    end_ms: int | None = None,
    *,
    idle_s: float = 1.0,
    with_audit: bool = True,
) -> ReadResult:
    """Reports, commands and (when the topic exists) audits recorded in [start_ms, end_ms)."""
    from ..control.ctl import read_until_idle

    rec = Recording()
    skipped = 0

    async def read(topic: str) -> list[Any]:
        return [
            r
            for r in await read_until_idle(cfg, topic, since_ms=start_ms, idle_s=idle_s)
            if _in_range(r.timestamp, start_ms, end_ms)
        ]

    for r in await read(cfg.aggregate.reports_topic):
        try:
            rec.reports.append(msgspec.json.decode(r.value or b"", type=WindowReport))
        except (msgspec.DecodeError, msgspec.ValidationError):
            skipped += 1
    for r in await read(cfg.topics.control):
        if is_barrier(r.headers):
            continue
        try:
            rec.commands.append(
                (r.timestamp, msgspec.json.decode(r.value or b"", type=ControlCommand))
            )
        except (msgspec.DecodeError, msgspec.ValidationError):
            skipped += 1
    if with_audit:
        with contextlib.suppress(BrokerError):  # no audit topic: the report does without
            for r in await read(cfg.audit_topic):
                try:
                    rec.audits.append(msgspec.json.decode(r.value or b"", type=AuditRecord))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    skipped += 1
    rec.meta["rules"] = msgspec.to_builtins(cfg.aggregate.rules)
    initial = {"mode": cfg.rollout.mode.value, "share_bp": cfg.rollout.canary_share_bp}
    rec.meta["initial"] = {cfg.rollout.name: initial}
    return ReadResult(rec.normalised(), skipped)


__all__ = ["ReadResult", "read_recording"]
