"""Read a :class:`Recording` from a broker: the reports, control and audit topics, and the
outcomes stage's quality and verdicts topics when they exist.

Records are read from ``start_ms`` (by Kafka record timestamp) until the topic is idle, then
cut at ``end_ms`` -- end offsets are not used (Tansu reports them wrong). Undecodable records
are skipped and counted, never fatal: a report should still come out of a messy topic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from ..aggregate.report import WindowReport
from ..config import SidecarConfig
from ..control.commands import ControlCommand
from ..control.plane import is_barrier
from ..control.records import AuditRecord
from ..errors import BrokerError
from ..kafka import read_until_idle
from ..outcomes.report import QualityReport, QualityVerdict
from ..untrusted import decoded_or_none
from .model import Recording

T = TypeVar("T")


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
    rec = Recording()
    skipped = 0

    async def read(topic: str) -> list[Any]:
        return [
            r
            for r in await read_until_idle(
                cfg, topic, role="report", since_ms=start_ms, idle_s=idle_s
            )
            if _in_range(r.timestamp, start_ms, end_ms)
        ]

    def decoded(records: list[Any], type_: type[T]) -> list[tuple[int, T]]:
        nonlocal skipped
        decode: Callable[[bytes], T] = msgspec.json.Decoder(type_).decode
        out = []
        for r in records:
            value = decoded_or_none(decode, r.value)
            if value is None:
                skipped += 1
            else:
                out.append((r.timestamp, value))
        return out

    rec.reports.extend(v for _, v in decoded(await read(cfg.aggregate.reports_topic), WindowReport))
    commands = [r for r in await read(cfg.topics.control) if not is_barrier(r.headers)]
    rec.commands.extend(decoded(commands, ControlCommand))
    if with_audit:
        with contextlib.suppress(BrokerError):  # no audit topic: the report does without
            audits = decoded(await read(cfg.audit_topic), AuditRecord)
            rec.audits.extend(v for _, v in audits)
    with contextlib.suppress(BrokerError):  # no outcomes stage: no quality section
        quality = decoded(await read(cfg.outcomes.quality_topic), QualityReport)
        rec.quality.extend(v for _, v in quality)
    with contextlib.suppress(BrokerError):
        verdicts = decoded(await read(cfg.outcomes.verdicts_topic), QualityVerdict)
        rec.verdicts.extend(v for _, v in verdicts)
    rec.meta["rules"] = msgspec.to_builtins(cfg.aggregate.rules)
    initial = {"mode": cfg.rollout.mode.value, "share_bp": cfg.rollout.canary_share_bp}
    rec.meta["initial"] = {cfg.rollout.name: initial}
    return ReadResult(rec.normalised(), skipped)


__all__ = ["ReadResult", "read_recording"]
