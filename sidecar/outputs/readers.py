"""Who still reads an output version: consumer groups, read from the cluster itself.

What is measured, per consumer group and version topic (no cooperation from consumers):

* **committed offsets** of the group on the topic's partitions (OffsetFetch). A group with
  none there does not read the topic; one with some does, or did;
* **last consumed**: the timestamp of the last record the group committed past (the record at
  ``committed - 1``, fetched). The group's last commit was at or after it, so it is a lower
  bound of the last commit time that needs no history -- Kafka does not report commit times;
* **moved**: whether the committed offsets changed between two looks (``sample_s`` apart for
  ``sidecar deprecations status``; between polls for the sidecar's gauge);
* **members**: live members whose subscription names the topic, when the broker reports
  subscriptions (Apache Kafka does; the embedded broker does not: unknown);
* **lag** (records): the partition's end offset less the committed offset -- the broker's
  high watermark, which Tansu under-reports for multi-record batches, so it is shown but never
  used to judge activity.

A group is an **active reader** while any of these hold: its offsets moved, a live member
subscribes to the topic, or the last record it consumed is younger than
``outputs.active_window_s``. A consumer that stopped reading stays active for that window
(it may be restarting); a migrated one stops moving on the old topic and ages out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from ..config import SidecarConfig
from ..errors import BrokerError
from ..kafka.clients import new_admin, new_consumer, stop_quietly

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class GroupReading:
    """One consumer group on one topic."""

    group: str
    topic: str
    #: Partition -> committed offset (only partitions with a commit).
    committed: dict[int, int]
    #: Partition -> the broker's end offset (see the module docstring: not trusted).
    end: dict[int, int] = field(default_factory=dict)
    last_consumed_ms: int | None = None
    moved: bool = False
    #: Live members subscribed to the topic; None when the broker does not say.
    members: int | None = None
    state: str | None = None
    active: bool = False
    why: str = ""

    @property
    def lag(self) -> int | None:
        if not self.end:
            return None
        return sum(max(0, self.end.get(p, 0) - off) for p, off in self.committed.items())

    def judge(self, now: int, window_s: float) -> None:
        """Set :attr:`active` and :attr:`why` from what was measured."""
        reasons = []
        if self.moved:
            reasons.append("committed offsets moved")
        if self.members:
            reasons.append(f"{self.members} live member(s) subscribed")
        if self.last_consumed_ms is not None and now - self.last_consumed_ms < window_s * 1000:
            age = max(0.0, (now - self.last_consumed_ms) / 1000)
            reasons.append(f"last consumed a record {age:.0f}s ago")
        self.active = bool(reasons)
        if reasons:
            self.why = "; ".join(reasons)
        elif self.last_consumed_ms is None:
            self.why = "no committed record to date"
        else:
            age = (now - self.last_consumed_ms) / 1000
            self.why = f"idle: offsets still, last consumed {age:.0f}s ago"

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "topic": self.topic,
            "active": self.active,
            "why": self.why,
            "committed": {str(p): o for p, o in sorted(self.committed.items())},
            "lag": self.lag,
            "last_consumed_ms": self.last_consumed_ms,
            "moved": self.moved,
            "members": self.members,
            "state": self.state,
        }


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _subscribed(metadata: bytes) -> list[str] | None:
    """Topics of a consumer member's subscription (None when the broker sent none)."""
    if not metadata:
        return None
    try:
        from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

        decoded = ConsumerProtocolMemberMetadata.decode(metadata)
        return list(decoded.subscription)
    except Exception:  # another protocol's metadata: unknown
        return None


class GroupInspector:
    """Looks at the consumer groups of a set of topics; one admin client and one plain
    consumer, reused across looks (the sidecar's watch polls with one)."""

    def __init__(self, cfg: SidecarConfig, *, ignore_groups: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.ignore = set(ignore_groups)
        self._admin: Any = None
        self._consumer: AIOKafkaConsumer | None = None
        #: DescribeGroups works here (the embedded broker sends some answers aiokafka
        #: cannot parse: then members stay unknown, and the error is not repeated).
        self._describe = True
        #: Groups whose committed offsets could not be read in the last look (not allowed to
        #: Describe them, being deleted, ...): whether they read a topic is unknown.
        self.unreadable: set[str] = set()

    async def start(self) -> None:
        self._admin = new_admin(self.cfg, "readers")
        self._consumer = new_consumer(self.cfg, "readers", fetch_max_wait_ms=50)
        try:
            await self._admin.start()
            await self._consumer.start()
        except Exception as exc:
            await self.stop()
            raise BrokerError(
                f"cannot reach broker {self.cfg.kafka.bootstrap_servers}: {exc}"
            ) from exc

    async def stop(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None
        await stop_quietly(self._consumer)
        self._consumer = None

    async def __aenter__(self) -> GroupInspector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        from ..kafka.reading import topic_partitions

        assert self._consumer is not None
        return await topic_partitions(self._consumer, topic, wait_s=2.0)

    async def committed(
        self, topics: Sequence[str]
    ) -> tuple[dict[str, dict[str, dict[int, int]]], dict[str, list[TopicPartition]]]:
        """topic -> group -> partition -> committed offset, and each topic's partitions."""
        admin = self._admin
        assert admin is not None
        tps = {t: await self._partitions(t) for t in topics}
        every = [tp for parts in tps.values() for tp in parts]
        groups = [g for g, _kind in await admin.list_consumer_groups() if g not in self.ignore]
        found: dict[str, dict[str, dict[int, int]]] = {t: {} for t in topics}
        self.unreadable = set()
        for group in sorted(groups):
            try:
                offsets = await admin.list_consumer_group_offsets(group, partitions=every)
            except Exception as exc:  # not authorised, being deleted, a broker quirk
                log.warning("cannot read the committed offsets of group %s: %s", group, exc)
                self.unreadable.add(group)
                continue
            for tp, meta in offsets.items():
                if meta is not None and meta.offset is not None and meta.offset >= 0:
                    found.setdefault(tp.topic, {}).setdefault(group, {})[tp.partition] = meta.offset
        return found, tps

    async def members(
        self, groups: Sequence[str]
    ) -> dict[str, tuple[str | None, dict[str, int] | None]]:
        """group -> (state, topic -> subscribed live members; None when not reported)."""
        admin = self._admin
        assert admin is not None
        out: dict[str, tuple[str | None, dict[str, int] | None]] = {}
        if not groups or not self._describe:
            return out
        try:
            with _quiet("aiokafka.conn", "aiokafka"):  # it logs a parse failure as an error
                responses = await admin.describe_consumer_groups(list(groups))
        except Exception as exc:  # the embedded broker answers some groups with bad bytes
            log.info("describing consumer groups failed (%s); members stay unknown", exc)
            self._describe = False
            return out
        for response in responses:
            for entry in response.groups:
                error, group, state, _ptype, _proto, members = entry[:6]
                if error:
                    continue
                tally: dict[str, int] = {}
                known = True
                for member in members:
                    topics = _subscribed(member[-2])
                    if topics is None:
                        known = False
                        break
                    for t in topics:
                        tally[t] = tally.get(t, 0) + 1
                counts = tally if known else None
                live = state not in ("Empty", "Dead")
                out[group] = (state, counts if live else ({} if counts is not None else None))
        return out

    async def record_times(
        self, wanted: dict[TopicPartition, set[int]]
    ) -> dict[tuple[TopicPartition, int], int]:
        """The timestamp of the record at each given offset (when it can still be read);
        one seek per partition and round, as many rounds as a partition has offsets."""
        consumer = self._consumer
        assert consumer is not None
        times: dict[tuple[TopicPartition, int], int] = {}
        queues = {tp: sorted(offsets) for tp, offsets in wanted.items() if offsets}
        deadline = time.monotonic() + 10.0
        while queues and time.monotonic() < deadline:
            round_ = {tp: offsets.pop(0) for tp, offsets in queues.items()}
            queues = {tp: offsets for tp, offsets in queues.items() if offsets}
            consumer.assign(list(round_))
            for tp, offset in round_.items():
                consumer.seek(tp, offset)
            pending = set(round_)
            round_deadline = min(deadline, time.monotonic() + 3.0)
            while pending and time.monotonic() < round_deadline:
                batch = await consumer.getmany(*pending, timeout_ms=200)
                for tp, records in batch.items():
                    for rec in records:
                        if rec.offset >= round_[tp]:
                            times[(tp, round_[tp])] = rec.timestamp
                            pending.discard(tp)
                            break
        return times

    async def look(
        self,
        topics: Sequence[str],
        *,
        window_s: float,
        sample_s: float = 0.0,
        previous: dict[tuple[str, str], dict[int, int]] | None = None,
    ) -> dict[str, list[GroupReading]]:
        """The consumer groups of each topic, judged (see the module docstring). With
        ``sample_s``, offsets are read twice that far apart; with ``previous`` (the
        ``committed`` of an earlier look, by (topic, group)), they are compared with it."""
        committed, tps = await self.committed(topics)
        if sample_s > 0:
            await asyncio.sleep(sample_s)
            later, _ = await self.committed(topics)
            previous = {
                (t, g): offs for t, groups in committed.items() for g, offs in groups.items()
            }
            committed = later
        assert self._consumer is not None
        every = [tp for parts in tps.values() for tp in parts]
        end: dict[TopicPartition, int] = {}
        with contextlib.suppress(Exception):
            end = await self._consumer.end_offsets(every)
        groups = sorted({g for by_group in committed.values() for g in by_group})
        members = await self.members(groups)
        wanted: dict[TopicPartition, set[int]] = {}
        for t, by_group in committed.items():
            for offs in by_group.values():
                for p, off in offs.items():
                    if off > 0:
                        wanted.setdefault(TopicPartition(t, p), set()).add(off - 1)
        times = await self.record_times(wanted)
        now = now_ms()
        out: dict[str, list[GroupReading]] = {}
        for topic in topics:
            readings = []
            for group, offs in sorted(committed.get(topic, {}).items()):
                state, counts = members.get(group, (None, None))
                stamps = [
                    times[(TopicPartition(topic, p), o - 1)]
                    for p, o in offs.items()
                    if (TopicPartition(topic, p), o - 1) in times
                ]
                before = (previous or {}).get((topic, group))
                reading = GroupReading(
                    group=group,
                    topic=topic,
                    committed=offs,
                    end={tp.partition: o for tp, o in end.items() if tp.topic == topic},
                    last_consumed_ms=max(stamps) if stamps else None,
                    moved=before is not None and before != offs,
                    members=None if counts is None else counts.get(topic, 0),
                    state=state,
                )
                reading.judge(now, window_s)
                readings.append(reading)
            out[topic] = readings
        return out
