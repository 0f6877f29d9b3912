"""``sidecar demo --scenario migrate``: a MAJOR release without surprising its consumers.

The story, on the embedded broker with two in-process sidecars:

1. fraud-lr 3.0.0 is a MAJOR release by ``sidecar contract diff`` (its release note is
   printed); it ships with API v2 of the decisions. ``ledger``, a downstream service, still
   parses v1 (``flagged``, ``score_pct``); ``alerts`` reads v2.
2. The candidate is promoted; ledger keeps working through the v1 adapter.
3. The operator deprecates v1 (sunset a few seconds out, a migration guide): ledger's v1
   records now carry ``deprecation``/``sunset``/``link`` headers.
4. A sunset attempted while ledger still reads v1 is refused by every instance (audited).
5. Ledger sees the notice and migrates to v2 (from where it stood, deduplicating by request
   id); once it is no longer an active reader, v1 is sunset: its topic gets nothing more and
   its adapter is unloaded.
6. Checks: every request reached ledger (through v1, then v2), v1 got none after its sunset.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec

from ..broker import EmbeddedBroker
from ..config import SidecarConfig, config_from_dict
from ..control.client import build_command, issue
from ..control.keys import KeySet, SigningKey, TrustStore, write_key_set
from ..examples import fraud
from ..examples.outputs import V1
from ..kafka import (
    ensure_config_topics,
    new_consumer,
    new_producer,
    seek_since,
    topic_partitions,
)
from ..manifest import release_notes
from ..models.contract import derived_manifest
from ..outputs.cli import active_readers
from ..runner import Sidecar
from ..traffic import generated_items, produce_values

log = logging.getLogger(__name__)
GUIDE = str(V1["link"])


@dataclass
class MigrateResult:
    ok: bool
    summary: str


@dataclass
class Ledger:
    """The downstream service that parses v1 until it migrates to v2."""

    cfg: SidecarConfig
    v1_topic: str
    ids: set[str] = field(default_factory=set)
    v1_records: int = 0
    v2_records: int = 0
    parse_errors: int = 0
    notice: dict[str, bytes] | None = None
    on: str = "v1"
    last_v1_ms: int = 0

    async def read(self, topic: str, group: str, since_ms: int | None, stop: asyncio.Event) -> None:
        consumer = new_consumer(self.cfg, "demo", group_id=group, auto_offset_reset="earliest")
        await consumer.start()
        try:
            if since_ms is None:
                consumer.subscribe([topic])
            else:  # migrating: from where v1 stood (a little before), deduplicated by id
                tps = await topic_partitions(consumer, topic, wait_s=5)
                consumer.assign(tps)
                await seek_since(consumer, tps, since_ms)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        self._one(r, topic == self.v1_topic)
                if batch and since_ms is None:
                    await consumer.commit()
        finally:
            await consumer.stop()

    def _one(self, record: Any, v1: bool) -> None:
        try:
            doc = msgspec.json.decode(record.value)
            if v1:  # the v1 shape: flagged, score_pct
                _ = (bool(doc["flagged"]), float(doc["score_pct"]))
                self.v1_records += 1
                self.last_v1_ms = max(self.last_v1_ms, record.timestamp)
                headers = dict(record.headers)
                if "deprecation" in headers and self.notice is None:
                    self.notice = headers
            else:  # v2: the current Decision
                _ = (bool(doc["decision"]), float(doc["score"]))
                self.v2_records += 1
            self.ids.add(doc["request_id"])
        except Exception:
            self.parse_errors += 1


class Migrate:
    def __init__(self, out: TextIO, rate: float, broker_port: int, out_dir: Path) -> None:
        self.out, self.rate, self.broker_port, self.out_dir = out, rate, broker_port, out_dir
        self.produced: list[str] = []
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:5.1f}s] {text}", file=self.out, flush=True)

    def config(self, bootstrap: str, keys: KeySet) -> SidecarConfig:
        features = [{"name": f} for f in fraud.CANDIDATE_FEATURES]
        return config_from_dict(
            {
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "group_id": "demo-migrate-sidecar",
                    "session_timeout_ms": 6000,
                    "heartbeat_interval_ms": 1000,
                },
                "topics": {
                    "requests": "migrate.requests",
                    "decisions": "migrate.decisions",
                    "comparisons": "migrate.comparisons",
                    "dead_letter": "migrate.dead-letter",
                    "control": "migrate.control",
                    "partitions": 3,
                },
                "rollout": {"name": "fraud-lr-v3", "mode": "shadow"},
                "models": {
                    "champion": {
                        "name": "fraud-lr",
                        "version": "1.4.0",
                        "target": "sidecar.examples.fraud:champion",
                        "threshold": 0.3,
                        "features": [{"name": f} for f in fraud.CHAMPION_FEATURES],
                    },
                    "candidate": {
                        "name": "fraud-lr",
                        "version": "3.0.0",
                        "target": "sidecar.examples.fraud:candidate",
                        "threshold": 0.5,
                        "features": features,
                    },
                },
                "metrics": {"port": 0},
                "pipeline": {"drain_timeout_s": 10},
                "control": {
                    "trust_file": str(keys.trust_file),
                    "signing_key_file": str(keys.sidecar),
                    "allow_create_time": True,
                    "heartbeat_interval_s": 0.5,
                    "min_promoted_age_s": 0,
                },
                "outputs": {
                    "api_version": "v2",
                    "versions": [
                        {"version": "v1", "topic": "migrate.decisions.v1", **copy.deepcopy(V1)}
                    ],
                    "readers_interval_s": 1.0,
                    "active_window_s": 4.0,
                },
            },
            source="sidecar demo --scenario migrate",
        )

    async def traffic(self, cfg: SidecarConfig, stop: asyncio.Event) -> None:
        producer = new_producer(cfg, "demo")
        await producer.start()
        try:
            chunk = max(1, int(self.rate / 10))
            while not stop.is_set():
                items = generated_items(chunk, seed=len(self.produced), start_id=len(self.produced))
                await produce_values(producer, cfg.topics.requests, items)
                self.produced += [msgspec.json.decode(v)["request_id"] for _, v in items]
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()

    async def run(self) -> MigrateResult:
        with tempfile.TemporaryDirectory(prefix="sidecar-migrate-") as tmp:
            keys = write_key_set(Path(tmp) / "keys", "demo")
            broker = EmbeddedBroker(
                port=self.broker_port,
                log_path=self.out_dir / "broker.log",
                port_flag="--broker-port",
            )
            await asyncio.to_thread(broker.start)
            try:
                return await self._story(self.config(broker.bootstrap_servers, keys), keys)
            finally:
                await asyncio.to_thread(broker.stop)

    async def _story(self, cfg: SidecarConfig, keys: KeySet) -> MigrateResult:
        checks: dict[str, bool] = {}
        operator = SigningKey.from_file(keys.operator)
        trust = TrustStore.from_file(keys.trust_file)

        async def command(action: Any, reason: str, **kw: Any) -> Any:
            cmd = build_command(action, cfg.rollout.name, reason=reason, **kw)
            return await issue(cfg, cmd, key=operator, trust=trust, timeout_s=15)

        champion = derived_manifest(cfg.models.champion)
        candidate = derived_manifest(cfg.models.candidate)  # type: ignore[arg-type]
        note = release_notes(champion, candidate, GUIDE)
        (self.out_dir / "release-notes.md").write_text(note)
        bump = note.split("**", 2)[1]
        self.say(f"fraud-lr 3.0.0 is a {bump} release (release-notes.md); it ships with API v2")
        checks["candidate is MAJOR"] = bump == "MAJOR"
        await ensure_config_topics(cfg)
        v1_topic = cfg.outputs.versions[0].topic
        stop, ledger_stop = asyncio.Event(), asyncio.Event()
        ledger = Ledger(cfg, v1_topic)
        sidecars = [Sidecar(cfg, instance_id=f"migrate-{i + 1}") for i in range(2)]
        tasks = [asyncio.create_task(s.run()) for s in sidecars]
        tasks.append(asyncio.create_task(self.traffic(cfg, stop)))
        reader = asyncio.create_task(ledger.read(v1_topic, "ledger-v1", None, ledger_stop))
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sidecars)), 30)
            await self._until(lambda: ledger.v1_records > 300, 30)
            self.say(f"ledger parses v1 ({ledger.v1_records} decisions so far: flagged, score_pct)")
            promoted = await command("promote", "3.0.0 wins; v1 consumers served by the adapter")
            checks["promote applied"] = promoted.code == 0
            self.say(f"operator: promote -> {promoted.message}")
            before = ledger.v1_records
            await self._until(lambda: ledger.v1_records > before + 300, 30)
            self.say(f"ledger still parses v1 after the promotion ({ledger.v1_records} decisions)")
            dep = await command(
                "deprecate",
                "v2 is the contract of fraud-lr 3",
                output_version="v1",
                sunset_ms=int(time.time() * 1000) + 6000,
                link=GUIDE,
            )
            checks["deprecate applied"] = dep.code == 0
            self.say(f"operator: deprecate v1, sunset in 6 s -> {dep.message}")
            await self._until(lambda: ledger.notice is not None, 30)
            assert ledger.notice is not None
            self.say(
                "ledger got its notice: deprecation "
                f"{ledger.notice['deprecation'].decode()}, sunset "
                f"{ledger.notice['sunset'].decode()}, {ledger.notice['link'].decode()}"
            )
            checks["deprecation notice on v1 records"] = True
            await asyncio.sleep(6.5)  # the announced sunset date passes; ledger still reads
            readers = await active_readers(cfg, "v1", sample_s=1.0)
            refused = await command(
                "sunset", "v1's date has come", output_version="v1", active_readers=len(readers)
            )
            checks["sunset refused while ledger reads v1"] = refused.code != 0 and bool(readers)
            self.say(
                f"operator: sunset v1 with {len(readers)} active reader(s) "
                f"({', '.join(r.group for r in readers)}) -> refused: {refused.message}"
            )
            # Ledger migrates: v2 from a little before the last v1 record it read.
            ledger_stop.set()
            await reader
            ledger.on = "v2"
            ledger_stop = asyncio.Event()
            since = ledger.last_v1_ms - 2000
            reader = asyncio.create_task(
                ledger.read(cfg.topics.decisions, "ledger-v2", since, ledger_stop)
            )
            self.say("ledger migrates to v2 (from where it stood on v1, deduplicating by id)")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                readers = await active_readers(cfg, "v1", sample_s=1.0)
                if not readers:
                    break
            checks["ledger no longer reads v1"] = not readers
            done = await command("sunset", "nobody reads v1", output_version="v1", active_readers=0)
            checks["sunset applied"] = done.code == 0
            checks["adapter unloaded"] = all(s.pipeline.output_versions == [] for s in sidecars)
            self.say(f"operator: sunset v1 -> {done.message}")
            sunset_at = len(self.produced)
            await self._until(lambda: len(self.produced) > sunset_at + int(self.rate * 2), 30)
            stop.set()
            produced = list(self.produced)
            await self._until(lambda: sum(s.processed for s in sidecars) >= len(produced), 30)
            await self._until(lambda: set(produced) <= ledger.ids, 30)
            checks["ledger got every request (v1, then v2)"] = set(produced) <= ledger.ids
            checks["ledger parsed everything"] = ledger.parse_errors == 0
            v1_after = await self._v1_ids(cfg, v1_topic)
            checks["v1 got nothing after its sunset"] = not (v1_after & set(produced[sunset_at:]))
        finally:
            stop.set()
            ledger_stop.set()
            for s in sidecars:
                s.request_stop()
            for task in [*tasks, reader]:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 30)
            for s in sidecars:
                s.close_models()
        lines = [f"  {'ok  ' if v else 'FAIL'} {k}" for k, v in checks.items()]
        summary = (
            f"migrate: {len(self.produced)} requests; ledger read {ledger.v1_records} v1 and "
            f"{ledger.v2_records} v2 decisions\n" + "\n".join(lines)
        )
        return MigrateResult(all(checks.values()), summary)

    async def _until(self, done: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the migrate story stalled")
            await asyncio.sleep(0.1)

    async def _v1_ids(self, cfg: SidecarConfig, topic: str) -> set[str]:
        from ..kafka import read_until_idle

        return {
            msgspec.json.decode(r.value)["request_id"]
            for r in await read_until_idle(cfg, topic, role="demo", idle_s=1.0)
        }


async def run_migrate(out: TextIO, rate: float, broker_port: int, out_dir: Path) -> MigrateResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return await Migrate(out, rate, broker_port, out_dir).run()
