"""``sidecar replay``: run the windows and guards over a range of the comparisons topic and
print when each guard would have fired. Reads without a consumer group; publishes nothing.

Range bounds are ``offset:N`` (the same offset on every partition) or a time (ISO-8601, or
epoch milliseconds). Times select records by their **Kafka record timestamp** (when the sidecar
produced the comparison); windows then use the comparisons' event time (``ts``) as live.
Start times are sought with ``offsets_for_times`` when the broker answers it (Tansu does not:
the range is then read from the beginning and filtered). The range ends at the ``to`` bound
or when the topic has been idle for ``idle_s`` -- never at end offsets, which Tansu gets wrong.
Windows still open at the end are flushed and marked partial.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from aiokafka import AIOKafkaConsumer, TopicPartition

from ..config import SidecarConfig
from ..errors import BrokerError
from ..kafka import new_consumer, stop_quietly
from .actions import COMMAND_ACTIONS, command_id
from .guards import GuardEngine, GuardEvent
from .ingest import ComparisonDecoder, RecordLike, ingest
from .manager import WindowManager
from .report import WindowReport, figure_of
from .settings import AggregateSettings


class Bound(NamedTuple):
    kind: Literal["offset", "time"]
    value: int


def parse_bound(text: str) -> Bound:
    """``offset:123`` | epoch milliseconds | ISO-8601 (naive = UTC); ValueError says the forms."""
    t = text.strip()
    if t.startswith("offset:"):
        num = t[len("offset:") :]
        if not num.isdigit():
            raise ValueError(f"{text!r}: an offset bound looks like 'offset:123' (>= 0)")
        return Bound("offset", int(num))
    if t.isdigit():
        return Bound("time", int(t))
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"{text!r}: expected 'offset:N', epoch milliseconds (e.g. 1718000000000) or an "
            "ISO-8601 time (e.g. 2024-06-10T08:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return Bound("time", int(when.timestamp() * 1000))


def check_range(start: Bound | None, end: Bound | None) -> None:
    same_kind = start is not None and end is not None and start.kind == end.kind
    if same_kind and start is not None and end is not None and end.value <= start.value:
        raise ValueError(f"empty range: --to ({end.value}) must be after --from ({start.value})")


@dataclass
class ReplayResult:
    reports: list[WindowReport] = field(default_factory=list)
    events: list[GuardEvent] = field(default_factory=list)
    #: Reports of windows still open at the end of the range (flushed, possibly partial).
    partial: set[tuple[str, int]] = field(default_factory=set)
    records: int = 0
    undecodable: int = 0


class Replayer:
    """Windows + guards over records fed in order; deterministic (the clock is fixed at 0, so
    no partition ever turns idle and windows close on event time alone)."""

    def __init__(self, settings: AggregateSettings) -> None:
        self.manager = WindowManager(settings.aggregator_config())
        self.guards = GuardEngine(settings.rules)
        self.result = ReplayResult()
        self._decoder = ComparisonDecoder()

    def feed(self, records: Sequence[RecordLike]) -> None:
        if not records:
            return
        got = ingest(records, self._decoder)
        self.result.records += len(records)
        self.result.undecodable += got.undecodable
        self._reports(self.manager.process(got.batch, 0).reports)

    def finish(self) -> ReplayResult:
        flushed = self.manager.flush(0)
        self.result.partial |= {(r.rollout, r.window_start_ms) for r in flushed}
        self._reports(flushed)
        return self.result

    def _reports(self, reports: list[WindowReport]) -> None:
        for report in reports:
            self.result.reports.append(report)
            self.result.events += self.guards.evaluate(report)


async def read_range(
    cfg: SidecarConfig,
    start: Bound | None,
    end: Bound | None,
    replayer: Replayer,
    *,
    idle_s: float = 2.0,
) -> ReplayResult:
    """Feed ``[start, end)`` of the comparisons topic (all partitions) to ``replayer``."""
    topic = cfg.topics.comparisons
    consumer = new_consumer(
        cfg, "replay", auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20
    )
    try:
        await consumer.start()
    except Exception as exc:
        await stop_quietly(consumer)
        raise BrokerError(f"cannot reach broker {cfg.kafka.bootstrap_servers}: {exc}") from exc
    try:
        if topic not in await consumer.topics():
            raise BrokerError(f"topic {topic} does not exist; check topics.comparisons")
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await _seek(consumer, tps, start)
        done: set[TopicPartition] = set()
        last_new = time.monotonic()
        while len(done) < len(tps) and time.monotonic() - last_new < idle_s:
            batches = await consumer.getmany(timeout_ms=200, max_records=20_000)
            if batches:
                last_new = time.monotonic()
            kept: list[RecordLike] = []
            for tp, recs in batches.items():
                for rec in recs:
                    if _past(rec, end):
                        done.add(tp)
                        consumer.pause(tp)
                        break
                    if start is None or start.kind == "offset" or rec.timestamp >= start.value:
                        kept.append(rec)
            replayer.feed(kept)
        return replayer.finish()
    finally:
        await stop_quietly(consumer)


def _past(rec: object, end: Bound | None) -> bool:
    if end is None:
        return False
    pos = getattr(rec, "offset") if end.kind == "offset" else getattr(rec, "timestamp")  # noqa: B009
    return bool(pos >= end.value)


async def _seek(consumer: AIOKafkaConsumer, tps: list[TopicPartition], start: Bound | None) -> None:
    if start is None:
        await consumer.seek_to_beginning(*tps)
        return
    if start.kind == "offset":
        for tp in tps:
            consumer.seek(tp, start.value)
        return
    try:
        found = await consumer.offsets_for_times({tp: start.value for tp in tps})
    except Exception:  # broker without ListOffsets-by-time: scan and filter instead
        found = {}
    for tp in tps:
        hit = found.get(tp)
        if hit is None or hit.timestamp is None or hit.timestamp < 0:
            await consumer.seek_to_beginning(tp)  # unknown: filter by timestamp while reading
        else:
            consumer.seek(tp, hit.offset)


# --------------------------------------------------------------------------- output


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _num(report: WindowReport, name: str) -> str:
    fig = figure_of(report, name)
    return "-" if not fig.ok or fig.value is None else f"{fig.value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def format_events(events: Sequence[GuardEvent]) -> str:
    rows = []
    for e in events:
        r = e.rule
        limit = r.threshold if e.kind == "fired" else r.clear
        would = command_id(e) if e.kind == "fired" and r.action in COMMAND_ACTIONS else "-"
        rows.append(
            [
                e.rollout,
                iso(e.window_start_ms),
                iso(e.window_end_ms),
                r.name,
                e.kind,
                f"{e.value:.4g}",
                f"{r.comparison} {limit:g}",
                r.action,
                would,
            ]
        )
    header = [
        "rollout",
        "window start (UTC)",
        "window end",
        "rule",
        "event",
        "value",
        "threshold",
        "action",
        "command id",
    ]
    return _table(header, rows)


WINDOW_FIGURES = (
    ("ratio", "decision_rate_ratio"),
    ("champ_rate", "champion_decision_rate"),
    ("cand_rate", "candidate_decision_rate"),
    ("psi", "psi_candidate_vs_champion"),
    ("ks", "ks_candidate_vs_champion"),
    ("err_excess", "candidate_excess_error_rate"),
    ("timeout_excess", "candidate_excess_timeout_rate"),
    ("slower", "latency_slower_share"),
    ("p50_ratio", "latency_p50_ratio"),
    ("champ_err", "champion_error_rate"),
    ("fallback", "champion_fallback_rate"),
)


def _policy(rep: WindowReport) -> str:
    """``mode@epoch`` the window ended under (``lo-hi`` when it straddled commands)."""
    lo, hi = rep.policy_epoch_min, rep.policy_epoch_max
    if hi is None:
        return "-"
    epochs = str(hi) if lo == hi else f"{lo}-{hi}"
    return f"{rep.policy_mode}@{epochs}"


def format_windows(result: ReplayResult) -> str:
    rows = []
    for rep in result.reports:
        mark = "*" if (rep.rollout, rep.window_start_ms) in result.partial else ""
        rows.append(
            [
                rep.rollout,
                iso(rep.window_start_ms) + mark,
                str(rep.counts.records),
                str(rep.counts.late),
                _policy(rep),
                *(_num(rep, name) for _, name in WINDOW_FIGURES),
            ]
        )
    header = [
        "rollout",
        "window start (UTC)",
        "records",
        "late",
        "policy",
        *(s for s, _ in WINDOW_FIGURES),
    ]
    return _table(header, rows)


def format_result(result: ReplayResult) -> str:
    fired = [e for e in result.events if e.kind == "fired"]
    out = [
        f"replayed {result.records} comparisons ({result.undecodable} undecodable) into "
        f"{len(result.reports)} windows; guards fired {len(fired)} time(s) "
        "(nothing was published)",
        "",
        "guard events:" if result.events else "guard events: none",
    ]
    if result.events:
        out += [format_events(result.events)]
    out += ["", "windows (* = still open at the end of the range, flushed partial):"]
    out += [format_windows(result)]
    return "\n".join(out)


def run_replay(
    cfg: SidecarConfig, start: Bound | None, end: Bound | None, idle_s: float = 2.0
) -> ReplayResult:
    return asyncio.run(read_range(cfg, start, end, Replayer(cfg.aggregate), idle_s=idle_s))


__all__ = [
    "Bound",
    "ReplayResult",
    "Replayer",
    "check_range",
    "format_result",
    "parse_bound",
    "read_range",
    "run_replay",
]
