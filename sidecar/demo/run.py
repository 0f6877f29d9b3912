"""``sidecar demo``: the whole system on the embedded broker, telling one rollout story.

Everything runs in this process as asyncio tasks, through the same code as production: two
:class:`~sidecar.runner.Sidecar` instances in one consumer group, one
:class:`~sidecar.aggregate.service.AggregatorService`, a traffic generator, and operator
commands issued with :func:`sidecar.control.client.issue` (the code behind ``sidecar ctl``),
signed with a key generated for this run. Guard actions are the aggregator's own: the demo only
watches for them. Event time is wall time, with windows of a few seconds, so a story takes a
minute or two.

The truth reaches the product the way it does in production: each fraud the generator makes
becomes a chargeback (an ``Outcome``) on the outcomes topic a few seconds later, and the
outcomes stage (:class:`~sidecar.outcomes.service.OutcomesService`) joins it to the comparison
by request id. The quality figures shown (average precision per model, label coverage) and the
quality gate the operator waits for before ramping come from that stage's reports and verdicts,
not from labels kept in the demo. In the recommend story the clicks are the outcomes (each
request's clicked items, a few seconds later) and the stage's NDCG@10 is the figure shown;
until the stage has a window of an act, the comparisons against the generator's clicks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec
import numpy as np
from aiokafka import TopicPartition

from ..aggregate.actions import is_guard_command
from ..aggregate.service import AggregatorService
from ..broker import EmbeddedBroker
from ..config import SidecarConfig
from ..contracts import Comparison
from ..control.client import EXIT_OK, build_command, issue
from ..control.commands import ControlCommand
from ..control.keys import KeySet, SigningKey, TrustStore, write_key_set
from ..control.plane import CONTROL_PARTITION, is_barrier
from ..control.records import AuditRecord
from ..errors import SidecarError
from ..kafka import (
    ensure_config_topics,
    new_consumer,
    new_producer,
    stop_quietly,
    topic_partitions,
)
from ..outcomes.contract import Outcome
from ..outcomes.gates import quality_gate
from ..outcomes.report import GateDecision, QualityReport, QualityVerdict
from ..outcomes.service import OutcomesService
from ..report.model import CommandEntry, Recording, command_timeline, write_jsonl
from ..report.page import render_page
from ..report.source import read_recording
from ..routing import Mode
from ..runner import Sidecar
from ..traffic import produce_values
from ..untrusted import decoded_or_none
from .scenarios import (
    CHAMPION_VERSION,
    CHARGEBACK_DELAY_S,
    DOMAINS,
    STORIES,
    Act,
    AveragePrecision,
    Calibration,
    Domain,
    Quality,
    ScenarioName,
    Settings,
    Timing,
    act_config,
    acts,
    calibrate,
    timing,
)
from .view import (
    CLEAR,
    Snapshot,
    guard_states,
    render_line,
    render_panel,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Operator:
    """The demo operator's key, and the trust file the instances verify it with."""

    key: SigningKey
    trust: TrustStore


INSTANCES = 2
PLAN_SHARES = (100, 500, 1000, 5000, 10000)


@dataclass
class DemoOptions:
    scenario: ScenarioName = "flags"
    duration_s: float = 90.0
    rate: float = 1000.0
    fraud_rate: float = 0.02
    flag_ratio: float = 2.0
    flag_shift: float | None = None
    seed: int = 0
    out_dir: Path = Path("sidecar-demo")
    #: None: a refreshing panel when stdout is a terminal, one line per update otherwise.
    live: bool | None = None
    broker_port: int = 0


@dataclass
class SeenQuality:
    """What the outcomes stage says of an act's models so far."""

    ap_champion: float = math.nan
    ap_candidate: float = math.nan
    pairs: int = 0
    frauds: int = 0
    text: str = ""


@dataclass
class ActResult:
    act: Act
    ok: bool
    outcome: str
    #: Average precision of each model, from the outcomes stage (chargebacks joined).
    ap_champion: float = math.nan
    ap_candidate: float = math.nan
    #: Judged transactions behind them, and the chargebacks among them.
    pairs: int = 0
    frauds: int = 0
    #: Seconds from the act's first scored request to the guard command being applied.
    time_to_action_s: float | None = None
    #: The quality gate the operator waited for (acts with ``quality_gate``), and when it was
    #: met (seconds after the deployment).
    gate: GateDecision | None = None
    gate_met_after_s: float | None = None


@dataclass
class DemoResult:
    ok: bool
    acts: list[ActResult]
    recording: Recording
    timeline: list[CommandEntry]
    calibration: Calibration | None
    timing: Timing
    report_path: Path
    record_path: Path
    log_path: Path
    summary: str
    elapsed_s: float


# --------------------------------------------------------------------------- traffic


class Traffic:
    """Seeded requests of a domain at ``rate`` per second; remembers the generator's truth
    about each (fraud or not, the items its user would click). In the fraud stories the
    truth also reaches the product as it does in production: the chargeback of each fraud
    follows 0.5-3 s later as an ``Outcome`` on the outcomes topic (keyed by request id, with
    the amount at stake as its value)."""

    def __init__(
        self,
        cfg: SidecarConfig,
        rate: float,
        seed: int,
        fraud_rate: float,
        domain: Domain = DOMAINS["fraud"],
    ) -> None:
        self.cfg, self.rate, self.seed, self.fraud_rate = cfg, rate, seed, fraud_rate
        self.domain = domain
        self.sent = 0
        self.truth: dict[str, Any] = {}
        self.chargebacks = 0
        #: (due ``time.monotonic()``, request id, outcome record): chargebacks not sent yet.
        self._due: list[tuple[float, str, bytes]] = []

    async def run(self) -> None:
        producer = new_producer(self.cfg, "demo-traffic", linger_ms=5, max_batch_size=1 << 20)
        await producer.start()
        rng = np.random.default_rng(self.seed + 7)
        try:
            topic = self.cfg.topics.requests
            partitions = len(await producer.partitions_for(topic))
            outcomes_partitions = len(await producer.partitions_for(self.cfg.outcomes.topic))
            chunk = max(1, int(self.rate / 10))
            start = time.monotonic()
            while True:
                requests, truth = self.domain.generate(
                    chunk, self.seed + self.sent, self.sent, self.fraud_rate
                )
                self.truth.update(truth)
                if self.domain.name == "fraud":
                    self._chargebacks(requests, truth, rng)
                elif self.domain.name == "recommend":
                    self._clicks(requests, truth, rng)
                items = [(str(r["routing_key"]).encode(), msgspec.json.encode(r)) for r in requests]
                await produce_values(producer, topic, items, partitions)
                self.sent += chunk
                due = []
                while self._due and self._due[0][0] <= time.monotonic():
                    _, rid, value = heapq.heappop(self._due)
                    due.append((rid.encode(), value))
                if due:
                    await produce_values(
                        producer, self.cfg.outcomes.topic, due, outcomes_partitions
                    )
                    self.chargebacks += len(due)
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await producer.stop()

    def _chargebacks(
        self, requests: list[dict[str, Any]], truth: dict[str, Any], rng: np.random.Generator
    ) -> None:
        """Schedule the chargeback of each fraud among ``requests`` (the truth names them)."""
        now_ms, mono = time.time_ns() // 1_000_000, time.monotonic()
        for r in requests:
            rid = str(r["request_id"])
            if not truth.get(rid):
                continue
            delay = float(rng.uniform(*CHARGEBACK_DELAY_S))
            chargeback = Outcome(
                request_id=rid,
                label=True,
                ts=now_ms + int(delay * 1000),
                value=round(max(float(r["features"]["amount"]), 0.0), 2),
                routing_key=str(r["routing_key"]),
                source="chargebacks",
            )
            heapq.heappush(self._due, (mono + delay, rid, msgspec.json.encode(chargeback)))

    def _clicks(
        self, requests: list[dict[str, Any]], truth: dict[str, Any], rng: np.random.Generator
    ) -> None:
        """Schedule the click outcome (the items clicked) of each request with a click."""
        now_ms, mono = time.time_ns() // 1_000_000, time.monotonic()
        for r in requests:
            rid = str(r["request_id"])
            clicked = truth.get(rid)
            if not clicked:
                continue
            delay = float(rng.uniform(*CHARGEBACK_DELAY_S))
            click = Outcome(
                request_id=rid,
                label=sorted(clicked),
                ts=now_ms + int(delay * 1000),
                routing_key=str(r["routing_key"]),
                source="clicks",
            )
            heapq.heappush(self._due, (mono + delay, rid, msgspec.json.encode(click)))


# --------------------------------------------------------------------------- observer


class Observer:
    """Tails the comparisons (for the quality figure of stories whose truth does not go
    through the outcomes stage), control and audit topics."""

    def __init__(
        self, cfg: SidecarConfig, truth: Callable[[str], Any], quality: Quality | None = None
    ) -> None:
        self.cfg = cfg
        self.truth = truth
        self.quality = AveragePrecision() if quality is None else quality
        self.commands: list[tuple[int, ControlCommand]] = []
        self.audits: list[AuditRecord] = []
        self.comparisons = 0

    async def run(self) -> None:
        cfg = self.cfg
        consumer = new_consumer(cfg, "demo-observer", fetch_max_wait_ms=100)
        await consumer.start()
        try:
            tps = [TopicPartition(cfg.topics.control, CONTROL_PARTITION)]
            for topic in (cfg.topics.comparisons, cfg.audit_topic):
                tps += await topic_partitions(consumer, topic, wait_s=5.0)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            comparison = msgspec.json.Decoder(Comparison).decode
            audit = msgspec.json.Decoder(AuditRecord).decode
            command = msgspec.json.Decoder(ControlCommand).decode
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for tp, records in batch.items():
                    for rec in records:  # untrusted: what does not decode is skipped
                        if tp.topic == cfg.topics.comparisons:
                            if (c := decoded_or_none(comparison, rec.value)) is not None:
                                self._comparison(c)
                        elif tp.topic == cfg.audit_topic:
                            if (a := decoded_or_none(audit, rec.value)) is not None:
                                self.audits.append(a)
                        elif not is_barrier(rec.headers) and (
                            (cmd := decoded_or_none(command, rec.value)) is not None
                        ):
                            self.commands.append((rec.timestamp, cmd))
        finally:
            await stop_quietly(consumer)

    def _comparison(self, c: Comparison) -> None:
        self.comparisons += 1
        self.quality.add(c, self.truth(c.request_id))

    def average_precision(self, rollout: str) -> tuple[float, float, int, int]:
        """The domain's quality figure for both arms (named for the fraud stories')."""
        return self.quality.summary(rollout)

    def recording(self) -> Recording:
        return Recording(commands=list(self.commands), audits=list(self.audits))


# --------------------------------------------------------------------------- the demo


def _event_text(e: CommandEntry) -> str:
    c = e.command
    args = ""
    if c.args.share_bp is not None:
        args = f" {c.args.share_bp / 100:g}%"
    elif c.args.plan is not None:
        args = " " + " -> ".join(f"{s.share_bp / 100:g}%" for s in c.args.plan)
    who = "by the AGGREGATOR" if is_guard_command(c) else f"by {c.issued_by}"
    verdict = (
        f"applied by {len(e.applied_by)}/{INSTANCES}, now {e.mode}"
        + (f" {e.share_bp / 100:g}%" if e.mode == "canary" else "")
        if e.applied
        else e.outcome
    )
    reason = c.reason if len(c.reason) <= 110 else c.reason[:107] + "..."
    stamp = time.strftime("%H:%M:%S", time.gmtime(e.ts_ms / 1000))
    return f"{stamp} {c.action}{args} {who}: {reason}\n      -> {verdict}"


class Demo:
    def __init__(self, opts: DemoOptions, out: TextIO) -> None:
        self.opts = opts
        self.out = out
        self.live = out.isatty() if opts.live is None else opts.live
        self.started = time.monotonic()
        self.act_index = 0
        self.act: Act | None = None
        self.acts: list[Act] = []
        self.phase = "starting the embedded broker"
        self.sidecars: list[Sidecar] = []
        self.scored_before = 0
        self.traffic: Traffic | None = None
        self.observer: Observer | None = None
        self.aggregator: AggregatorService | None = None
        self.outcomes: OutcomesService | None = None
        self.printed_events = 0
        self.history: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=20)
        self.timing: Timing | None = None
        self._sidecar_tasks: list[asyncio.Task[None]] = []
        self._cfgs: dict[str, SidecarConfig] = {}

    # -- view ------------------------------------------------------------------------------

    def scored(self) -> int:
        return self.scored_before + sum(s.processed for s in self.sidecars)

    def events(self) -> list[str]:
        if self.observer is None:
            return []
        # Duplicate advances (both instances propose the same step) are in the report only.
        timeline = command_timeline(self.observer.recording())
        return [_event_text(e) for e in timeline if e.outcome != "duplicate"]

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        produced = self.traffic.sent if self.traffic else 0
        scored = self.scored()
        self.history.append((now, produced, scored))
        t0, p0, s0 = self.history[0]
        dt = max(now - t0, 1e-6)
        agg = self.aggregator
        act = self.act
        rollout = act.rollout if act else "-"
        reports = [r for r in agg.reports if r.rollout == rollout] if agg else []
        report = reports[-1] if reports else None
        policy = self.sidecars[0].policy.current if self.sidecars else None
        ramp = ""
        if (
            policy is not None
            and policy.mode is Mode.CANARY
            and act is not None
            and act.operator == "ramp"
            and policy.canary_share_bp in PLAN_SHARES
        ):
            ramp = f"ramp step {PLAN_SHARES.index(policy.canary_share_bp) + 1}/5"
        quality = self.quality(act)
        return Snapshot(
            scenario=self.opts.scenario,
            elapsed_s=now - self.started,
            act_index=self.act_index,
            acts=len(self.acts),
            headline=act.headline if act else "setting up",
            phase=self.phase,
            produced=produced,
            produced_rate=(produced - p0) / dt if len(self.history) > 1 else 0.0,
            scored_rate=(scored - s0) / dt if len(self.history) > 1 else 0.0,
            backlog=max(produced - scored, 0),
            rollout=rollout,
            mode=policy.mode.value if policy else "-",
            share_bp=policy.canary_share_bp if policy else 0,
            epoch=policy.epoch if policy else 0,
            ramp=ramp,
            instances=len(self.sidecars),
            report=report,
            guards=guard_states(
                [r for r in agg.guards.rules if r.figure not in self.domain.hidden_figures]
                if agg
                else [],
                report,
                agg.guards.active(rollout) if agg else [],
            ),
            quality_name=self.domain.quality.name,
            quality_unit=self.domain.quality.unit,
            ap_champion=quality.ap_champion,
            ap_candidate=quality.ap_candidate,
            ap_pairs=quality.pairs,
            quality=quality.text,
            gate=self.gate_text(act),
            events=self.events(),
        )

    def quality(self, act: Act | None) -> SeenQuality:
        """What the outcomes stage says of ``act``'s models so far: the verdict over its
        final windows when there is one, else the latest provisional report."""
        result = SeenQuality()
        stage = self.outcomes
        if act is None:
            return result
        if self.domain.name == "recommend" and stage is not None:
            ranking = self._ranking_quality(act, stage)
            if ranking is not None:
                return ranking
        if self.domain.name != "fraud":  # not from the outcomes stage: the generator's truth
            if self.observer is not None:
                seen = self.observer.average_precision(act.rollout)
                result.ap_champion, result.ap_candidate, pairs, positives = seen
                result.pairs, result.frauds = pairs, positives
                result.text = f"vs the generator's truth, {pairs:,} {self.domain.quality.unit}"
            return result
        if stage is None:
            return result
        verdict = stage.verdicts.get(act.rollout)
        if verdict is not None and verdict.candidate_version == act.version:
            ap = verdict.metrics["average_precision"]
            result.ap_champion = ap.champion if ap.champion is not None else math.nan
            result.ap_candidate = ap.candidate if ap.candidate is not None else math.nan
            result.pairs, result.frauds = verdict.judged_pairs, verdict.labelled
            cov = f"{verdict.label_coverage:.1%}" if verdict.label_coverage is not None else "-"
            result.text = (
                f"outcomes stage, final windows: {verdict.windows}, "
                f"{verdict.judged_pairs:,} judged, "
                f"{verdict.labelled:,} chargebacks (coverage {cov})"
            )
            return result
        latest: QualityReport | None = None
        for r in stage.recent:
            if r.rollout == act.rollout and r.candidate.version == act.version:
                latest = r
        if latest is not None:
            champion, candidate = latest.champion, latest.candidate
            result.ap_champion = champion.average_precision.value or math.nan
            result.ap_candidate = candidate.average_precision.value or math.nan
            result.pairs, result.frauds = latest.counts.records, latest.counts.labelled
            result.text = (
                f"outcomes stage, provisional window, {latest.counts.records:,} judged, "
                f"{latest.counts.labelled:,} chargebacks so far"
            )
        return result

    def _ranking_quality(self, act: Act, stage: OutcomesService) -> SeenQuality | None:
        """NDCG@K of ``act``'s models from the outcomes stage (clicks joined): its verdict
        over final windows, else its latest provisional report (None: neither yet)."""
        verdict = stage.verdicts.get(act.rollout)
        if verdict is not None and verdict.candidate_version == act.version:
            ndcg = verdict.metrics.get("ndcg")
            if ndcg is not None and ndcg.champion is not None and ndcg.candidate is not None:
                return SeenQuality(
                    ap_champion=ndcg.champion,
                    ap_candidate=ndcg.candidate,
                    pairs=verdict.judged_pairs,
                    frauds=verdict.labelled,
                    text=f"outcomes stage, final windows: {verdict.windows}, "
                    f"{verdict.judged_pairs:,} judged, {verdict.labelled:,} with clicks",
                )
        latest: QualityReport | None = None
        for r in stage.recent:
            if r.rollout == act.rollout and r.candidate.version == act.version and r.ranking:
                latest = r
        if latest is None or latest.ranking is None:
            return None
        rk = latest.ranking
        if rk.ndcg_champion.value is None or rk.ndcg_candidate.value is None:
            return None
        return SeenQuality(
            ap_champion=rk.ndcg_champion.value,
            ap_candidate=rk.ndcg_candidate.value,
            pairs=rk.requests,
            frauds=latest.counts.labelled,
            text=f"outcomes stage, {latest.status} window, {rk.requests:,} judged, "
            f"{latest.counts.labelled:,} with clicks",
        )

    def verdict(self, act: Act) -> QualityVerdict | None:
        v = self.outcomes.verdicts.get(act.rollout) if self.outcomes else None
        return v if v is not None and v.candidate_version == act.version else None

    def gate(self, act: Act, cfg: SidecarConfig) -> GateDecision:
        """The quality gate of ``act``'s rollout: the function the control plane calls."""
        requirement = cfg.outcomes.for_rollout(act.rollout).non_inferiority
        return quality_gate(
            self.verdict(act),
            requirement,
            champion_version=CHAMPION_VERSION,
            candidate_version=act.version,
        )

    def gate_text(self, act: Act | None) -> str:
        if act is None or not act.quality_gate or not self.acts:
            return ""
        cfg = self._cfgs.get(act.key)
        if cfg is None:
            return ""
        d = self.gate(act, cfg)
        return f"{'MET' if d.ok else 'not met'} ({d.code}): {d.reason}"

    def say(self, text: str) -> None:
        """A story line: in the panel's "now" line live, printed otherwise."""
        self.phase = text
        if not self.live:
            print(f"[{time.monotonic() - self.started:4.0f}s] {text}", file=self.out, flush=True)

    async def show(self) -> None:
        last_line = 0.0
        while True:
            snap = self.snapshot()
            if self.live:
                self.out.write(CLEAR + render_panel(snap) + "\n")
                self.out.flush()
            else:
                for e in snap.events[self.printed_events :]:
                    print(f"  >> {e}", file=self.out)
                self.printed_events = len(snap.events)
                if time.monotonic() - last_line >= 3.0:
                    print(render_line(snap), file=self.out, flush=True)
                    last_line = time.monotonic()
            await asyncio.sleep(0.5)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> DemoResult:
        opts = self.opts
        out_dir = opts.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "demo.log"
        handler = logging.FileHandler(log_path, mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        try:
            with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
                return await self._run(write_key_set(Path(tmp) / "keys", "demo"), log_path)
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            handler.close()

    async def _run(self, keys: KeySet, log_path: Path) -> DemoResult:
        opts = self.opts
        print(
            f"sidecar demo ({opts.scenario}): fitting the example models and choosing "
            "thresholds...",
            file=self.out,
            flush=True,
        )
        story = STORIES[opts.scenario]
        cal = (
            await asyncio.to_thread(
                calibrate, opts.fraud_rate, opts.flag_ratio, opts.flag_shift, opts.seed + 99
            )
            if story.calibrated
            else None
        )
        tim = self.timing = timing(opts.duration_s, opts.rate)
        self.acts = acts(opts.scenario, cal)
        operator = _Operator(
            SigningKey.from_file(keys.operator), TrustStore.from_file(keys.trust_file)
        )
        wall_start = time.time_ns() // 1_000_000
        broker = EmbeddedBroker(
            port=opts.broker_port, log_path=opts.out_dir / "broker.log", port_flag="--broker-port"
        )
        await asyncio.to_thread(broker.start)
        tasks: list[asyncio.Task[Any]] = []
        results: list[ActResult] = []
        recording = Recording()
        try:
            settings = Settings(
                broker.bootstrap_servers,
                keys,
                tim,
                state_dir=str(keys.trust_file.parent.parent / "state"),
                rollouts=tuple(a.rollout for a in self.acts),
            )
            cfgs = [act_config(settings, a) for a in self.acts]
            self._cfgs = {a.key: c for a, c in zip(self.acts, cfgs, strict=True)}
            base = cfgs[0]
            await ensure_config_topics(base)
            self.traffic = Traffic(base, opts.rate, opts.seed, opts.fraud_rate, self.domain)
            self.observer = Observer(base, self.traffic.truth.get, self.domain.quality())
            self.aggregator = AggregatorService(base)
            self.outcomes = OutcomesService(base)
            tasks = [
                asyncio.create_task(self.aggregator.run(), name="demo-aggregator"),
                asyncio.create_task(self.outcomes.run(), name="demo-outcomes"),
                asyncio.create_task(self.observer.run(), name="demo-observer"),
            ]
            await asyncio.wait_for(self.aggregator.ready.wait(), 30)
            await asyncio.wait_for(self.outcomes.ready.wait(), 30)
            tasks.append(asyncio.create_task(self.traffic.run(), name="demo-traffic"))
            tasks.append(asyncio.create_task(self.show(), name="demo-view"))
            for i, (act, cfg) in enumerate(zip(self.acts, cfgs, strict=True), start=1):
                self.act_index, self.act = i, act
                results.append(await self._act(act, cfg, operator, tim))
                self._check(tasks)
            self.say("done: stopping traffic, the aggregator and the outcomes stage")
        finally:
            await self._stop_sidecars()
            if self.aggregator is not None:
                self.aggregator.request_stop()
            if self.outcomes is not None:
                self.outcomes.request_stop()
            for task in tasks:
                if task.get_name() not in ("demo-aggregator", "demo-outcomes"):
                    task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 20)
            try:
                if results:
                    recording = (
                        await read_recording(cfgs[-1], wall_start, None, idle_s=1.0)
                    ).recording
            except Exception:  # do not hide what went wrong before: report with what we saw
                log.exception("reading the topics for the report failed")
                if self.observer is not None:
                    recording = self.observer.recording()
            finally:
                await asyncio.to_thread(broker.stop)
        return self._finish(recording, results, cal, tim, log_path)

    def _check(self, tasks: list[asyncio.Task[Any]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise SidecarError(f"{task.get_name()} failed: {task.exception()}")

    async def _start_sidecars(self, cfg: SidecarConfig, act: Act) -> list[asyncio.Task[None]]:
        self.sidecars = [Sidecar(cfg, instance_id=f"{act.key}-{i + 1}") for i in range(INSTANCES)]
        tasks = [
            asyncio.create_task(s.run(), name=f"sidecar-{s.instance_id}") for s in self.sidecars
        ]
        self._sidecar_tasks = tasks
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in self.sidecars)), 60)
        return tasks

    async def _hand_over(self, old: SidecarConfig, new: SidecarConfig) -> None:
        """Start the new deployment's consumer group where the previous one committed."""
        reader = new_consumer(old, "demo", group_id=old.kafka.group_id)
        await reader.start()
        try:
            topic = old.topics.requests
            tps = await topic_partitions(reader, topic, wait_s=5.0)
            offsets = {tp: await reader.committed(tp) for tp in tps}
        finally:
            await reader.stop()
        todo = {tp: off for tp, off in offsets.items() if off is not None}
        if not todo:
            return
        writer = new_consumer(new, "demo", group_id=new.kafka.group_id)
        await writer.start()
        try:
            writer.assign(list(todo))
            await writer.commit(todo)
        finally:
            await writer.stop()
        log.info("handed over offsets %s to group %s", todo, new.kafka.group_id)

    async def _stop_sidecars(self) -> None:
        tasks = self._sidecar_tasks
        for s in self.sidecars:
            s.request_stop()
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for s in self.sidecars:
            s.close_models()
        self.scored_before += sum(s.processed for s in self.sidecars)
        self.sidecars = []
        self._sidecar_tasks = []

    def _modes(self) -> set[Mode]:
        return {s.policy.current.mode for s in self.sidecars}

    def _guard_commands(self, act: Act, action: str) -> list[ControlCommand]:
        agg = self.aggregator
        return [
            c
            for c in (agg.commands if agg else [])
            if c.rollout == act.rollout and c.action == action
        ]

    async def _until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return True
            await asyncio.sleep(0.2)
        return done()

    async def _operator(
        self, cfg: SidecarConfig, operator: _Operator, action: Any, reason: str, **kw: Any
    ) -> bool:
        cmd = build_command(action, cfg.rollout.name, reason=reason, **kw)
        result = await issue(cfg, cmd, key=operator.key, trust=operator.trust, timeout_s=15)
        if result.code != EXIT_OK:
            log.warning("operator %s: %s", action, result.message)
        return result.code == EXIT_OK

    async def _act(
        self, act: Act, cfg: SidecarConfig, operator: _Operator, tim: Timing
    ) -> ActResult:
        window = tim.window_s
        previous = self.sidecars[0].config if self.sidecars else None
        await self._stop_sidecars()
        if previous is not None:
            await self._hand_over(previous, cfg)
        self.say(f"deploying candidate {act.version} on {INSTANCES} sidecar instances (shadow)")
        await self._start_sidecars(cfg, act)
        started = time.monotonic()
        self.say("shadow: both models score every request; the champion decides")
        if act.operator == "ramp":
            if act.shadow_windows:
                self.say(
                    f"shadow for {act.shadow_windows} windows of {window:g}s: the guards look "
                    "at the candidate before anyone is exposed"
                )
                await asyncio.sleep(act.shadow_windows * window + 0.5)
                if self._guard_commands(act, "rollback"):
                    return await self._settle(act, ActResult(act, False, "rolled back in shadow"))
            if act.quality_gate:
                req = cfg.outcomes.for_rollout(act.rollout).non_inferiority
                self.say(
                    f"shadow until the quality gate is met: candidate {req.metric} >= champion - "
                    f"{req.margin:g} at {req.confidence:.0%} on >= {req.min_pairs:,} transactions "
                    "whose chargeback windows have closed"
                )
                limit = 12 * window + 3 * cfg.outcomes.quality.label_window_ms / 1000 + 10
                met = await self._until(lambda: self.gate(act, cfg).ok, limit)
                gate = self.gate(act, cfg)
                if not met:
                    failed = ActResult(
                        act, False, f"quality gate not met: {gate.reason}", gate=gate
                    )
                    return await self._settle(act, failed)
                gate_after = time.monotonic() - started
                gate_met = gate  # as it stood when the operator started the ramp
                self.say(f"quality gate met after {gate_after:.0f}s: {gate.reason}")
            self.say(f"operator: sidecar ctl ramp {tim.plan}")
            ok = await self._operator(
                cfg,
                operator,
                "ramp",
                (
                    "shadow looks healthy: ramp 1% -> 100%"
                    if act.shadow_windows
                    else "new candidate: ramp 1% -> 100%, the guards watch every step"
                ),
                plan=tim.plan,
            )
            if not ok:
                return await self._settle(act, ActResult(act, False, "the ramp was not applied"))
            self.say("ramping: the sidecars advance each step after its hold and sample floor")
        else:
            self.say("shadow: the aggregator compares both models window by window")
        ramp_s = 5 * (tim.hold_s + 1.5) + 15
        if act.expect == "promoted":
            ok = await self._until(
                lambda: self._modes() == {Mode.PROMOTED} or Mode.ROLLED_BACK in self._modes(),
                ramp_s,
            )
            promoted = self._modes() == {Mode.PROMOTED}
            outcome = (
                "promoted after every ramp step"
                + (", the ramp started once its quality gate was met" if act.quality_gate else "")
                if promoted
                else (f"not promoted: modes {sorted(m.value for m in self._modes())}")
            )
            if promoted:
                self.say(f"promoted: the candidate {act.version} decides every request")
            result = ActResult(act, ok and promoted, outcome)
            if act.quality_gate:
                result.gate = gate_met
                result.gate_met_after_s = gate_after
            return await self._settle(act, result, windows=2)
        if act.expect == "rollback":
            ok = await self._until(
                lambda: (
                    self._modes() == {Mode.ROLLED_BACK}
                    and bool(self._guard_commands(act, "rollback"))
                ),
                15 * window + 20 + (ramp_s if act.operator == "ramp" else 0),
            )
            took = time.monotonic() - started
            cmds = self._guard_commands(act, "rollback")
            if ok:
                self.say(
                    f"rolled back by the aggregator {took:.0f}s after deployment: {cmds[0].reason}"
                )
            outcome = (
                f"rolled back by the aggregator ({cmds[0].command_id.split(':')[2]})"
                if ok
                else "no rollback by the aggregator"
            )
            return await self._settle(
                act, ActResult(act, ok, outcome, time_to_action_s=took if ok else None)
            )
        # paused: the aggregator pauses the ramp; then the operator rolls back.
        ok = await self._until(
            lambda: bool(self._guard_commands(act, "pause")) and self._pause_applied(act),
            15 * window + ramp_s,
        )
        took = time.monotonic() - started
        if not ok:
            return await self._settle(act, ActResult(act, False, "the ramp was not paused"))
        self.say(
            "the aggregator paused the ramp; the operator looks at the evidence and rolls back"
        )
        await asyncio.sleep(window)
        reason = "latency regression confirmed: the aggregator paused the ramp on its latency guard"
        rolled = await self._operator(cfg, operator, "rollback", reason)
        return await self._settle(
            act,
            ActResult(
                act,
                rolled,
                "paused by the aggregator, rolled back by the operator"
                if rolled
                else "paused, but the rollback was not applied",
                time_to_action_s=took,
            ),
        )

    def _pause_applied(self, act: Act) -> bool:
        if self.observer is None:
            return False
        return any(
            a.outcome == "applied" and a.action == "pause" and a.rollout == act.rollout
            for a in self.observer.audits
        )

    async def _settle(self, act: Act, result: ActResult, windows: float = 1.5) -> ActResult:
        """Let a few more windows close (so the report shows the state after), then read
        what the outcomes stage says of the act's models."""
        assert self.timing is not None
        await asyncio.sleep(windows * self.timing.window_s + 0.5)
        seen = self.quality(act)
        result.ap_champion, result.ap_candidate = seen.ap_champion, seen.ap_candidate
        result.pairs, result.frauds = seen.pairs, seen.frauds
        return result

    # -- the end ---------------------------------------------------------------------------

    def _finish(
        self,
        recording: Recording,
        results: list[ActResult],
        cal: Calibration | None,
        tim: Timing,
        log_path: Path,
    ) -> DemoResult:
        opts = self.opts
        elapsed = time.monotonic() - self.started
        agg = self.aggregator
        recording.meta.update(
            {
                "title": f"sidecar demo: {opts.scenario}",
                "story": [r.act.headline + "." for r in results],
                "rules": msgspec.to_builtins(agg.guards.rules) if agg else None,
                "initial": {r.act.rollout: {"mode": "shadow"} for r in results},
                "facts": self._facts(results, cal, tim),
            }
        )
        record_path = opts.out_dir / "recorded.jsonl"
        report_path = opts.out_dir / "report.html"
        write_jsonl(recording, record_path)
        report_path.write_text(render_page(recording), encoding="utf-8")
        timeline = command_timeline(recording)
        ok = bool(results) and all(r.ok for r in results) and len(results) == len(self.acts)
        summary = self._summary(
            results, timeline, cal, elapsed, report_path, record_path, log_path, ok
        )
        return DemoResult(
            ok,
            results,
            recording,
            timeline,
            cal,
            tim,
            report_path,
            record_path,
            log_path,
            summary,
            elapsed,
        )

    @property
    def domain(self) -> Domain:
        return DOMAINS[STORIES[self.opts.scenario].domain]

    def _facts(
        self, results: list[ActResult], cal: Calibration | None, tim: Timing
    ) -> dict[str, str]:
        opts = self.opts
        q = self.domain.quality
        traffic = (
            f"{opts.rate:g} card transactions/s, fraud rate {opts.fraud_rate:.1%}"
            if cal is not None
            else f"{opts.rate:g} recommendation requests/s, 100 candidate items each"
        )
        champion = self.domain.champion_text + (
            f", threshold {cal.champion_threshold:g} (flags {cal.champion_rate:.2%} on the "
            "calibration sample)"
            if cal is not None
            else ""
        )
        facts = {
            "traffic": f"{traffic}, seed {opts.seed}; windows of {tim.window_s:g}s (event "
            "time = wall time)",
            "champion": champion,
            "ramp plan": tim.plan,
        }
        for r in results:
            threshold = f"threshold {r.act.threshold:g}, " if cal is not None else ""
            facts[f"candidate {r.act.version}"] = (
                f"{threshold}options {r.act.options or '{}'}: {r.outcome}"
                + (f" after {r.time_to_action_s:.0f}s" if r.time_to_action_s else "")
            )
            facts[f"{q.name}, rollout {r.act.rollout}"] = (
                f"champion {r.ap_champion:.3f}, candidate {r.ap_candidate:.3f} over {r.pairs:,} "
                f"{q.unit} ({self._positives(r)}), {self._quality_source()}"
            )
            if r.gate is not None:
                facts[f"quality gate, rollout {r.act.rollout}"] = (
                    f"{'met' if r.gate.ok else 'not met'}"
                    + (f" {r.gate_met_after_s:.0f}s after deployment" if r.gate_met_after_s else "")
                    + f" (checked by the operator before the ramp): {r.gate.reason}"
                )
        return facts

    def _quality_source(self) -> str:
        if self.domain.name == "fraud":
            return (
                "the outcomes stage's figures: chargebacks joined to the comparisons by request id"
            )
        if self.domain.name == "recommend":
            return (
                "the outcomes stage's figures: clicks joined to the comparisons by request id "
                "(the generator's clicks for an act the stage has no window of)"
            )
        return "from the comparisons topic against the generator's truth"

    def _source_short(self) -> str:
        if self.domain.name == "recommend":
            return "outcomes stage (clicks)"
        return "outcomes stage" if self.domain.name == "fraud" else "vs the generator's truth"

    def _positives(self, r: ActResult) -> str:
        return f"{r.frauds} fraud" if self.domain.name == "fraud" else f"{r.frauds} with a click"

    def _summary(
        self,
        results: list[ActResult],
        timeline: list[CommandEntry],
        cal: Calibration | None,
        elapsed: float,
        report: Path,
        record: Path,
        log_path: Path,
        ok: bool,
    ) -> str:
        lines = [
            "",
            f"sidecar demo ({self.opts.scenario}) {'finished' if ok else 'FAILED'} in "
            f"{elapsed:.0f}s: {self.traffic.sent if self.traffic else 0:,} "
            f"{self.domain.quality.unit}, "
            f"{self.scored():,} scored by {INSTANCES} sidecar instances"
            + (
                f", {self.traffic.chargebacks:,} "
                + ("chargebacks" if self.domain.name == "fraud" else "click outcomes")
                if self.traffic and self.domain.name in ("fraud", "recommend")
                else ""
            ),
        ]
        for i, r in enumerate(results, start=1):
            lines.append(f"  act {i}: {r.act.headline}.")
            q = self.domain.quality
            lines.append(
                f"         {q.name} ({self._source_short()}: {r.pairs:,} {q.unit}, "
                f"{self._positives(r)}): champion {r.ap_champion:.3f}, candidate "
                f"{r.ap_candidate:.3f}"
            )
            if r.gate is not None:
                when = f" after {r.gate_met_after_s:.0f}s" if r.gate_met_after_s else ""
                lines.append(
                    f"         quality gate {'met' if r.gate.ok else 'NOT met'}{when}: "
                    f"{r.gate.reason}"
                )
            lines.append(f"         outcome: {'ok' if r.ok else 'UNEXPECTED'}: {r.outcome}")
        duplicates = sum(e.outcome == "duplicate" for e in timeline)
        lines.append(
            "  control commands"
            + (f" ({duplicates} duplicate advances ignored, as designed):" if duplicates else ":")
        )
        for e in timeline:
            if e.outcome != "duplicate":
                lines.append("    " + _event_text(e).replace("\n", "\n    "))
        lines += [
            f"  report:   {report}  (open it in a browser; works offline)",
            f"  recorded: {record}  (sidecar report --input {record} --out report.html)",
            f"  logs:     {log_path}",
        ]
        return "\n".join(lines)


async def run_demo(opts: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """Run one demo story to the end; the result says whether it went as the story says."""
    demo = Demo(opts, out or sys.stdout)
    return await demo.run()


__all__ = [
    "ActResult",
    "DemoOptions",
    "DemoResult",
    "Observer",
    "SeenQuality",
    "Traffic",
    "run_demo",
]
