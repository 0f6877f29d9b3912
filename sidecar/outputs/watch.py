"""The sidecar's watch over the readers of its older output versions: every
``outputs.readers_interval_s`` it looks at the consumer groups of each version's topic (see
:mod:`.readers`) and sets ``sidecar_output_active_readers``, ``sidecar_output_readers`` and
``sidecar_output_sunset_timestamp_seconds``. A sunset version is dropped from the gauges. It
never stops the sidecar: a failed look is logged and tried again at the next interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from ..config import SidecarConfig
from ..metrics import SidecarMetrics
from .lifecycle import OutputState
from .readers import GroupInspector, GroupReading

log = logging.getLogger(__name__)


class ReaderWatch:
    def __init__(
        self,
        cfg: SidecarConfig,
        metrics: SidecarMetrics,
        states: Callable[[], Sequence[OutputState]],
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._states = states
        self._previous: dict[tuple[str, str], dict[int, int]] = {}
        self._shown: set[str] = set()
        #: The latest look, by version (tests and logs read it).
        self.latest: dict[str, list[GroupReading]] = {}

    async def run(self) -> None:
        interval = self.cfg.outputs.readers_interval_s
        inspector = GroupInspector(self.cfg, ignore_groups=[self.cfg.kafka.group_id])
        try:
            while True:
                try:
                    if inspector._admin is None:
                        await inspector.start()
                    await self.look(inspector)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never stop serving because of a look
                    log.warning("looking at the readers of the output versions failed: %s", exc)
                    await inspector.stop()
                await asyncio.sleep(interval)
        finally:
            await inspector.stop()

    async def look(self, inspector: GroupInspector) -> None:
        topics = {v.version: v.topic for v in self.cfg.outputs.versions}
        live = [s for s in self._states() if not s.is_sunset and s.version in topics]
        for gone in self._shown - {s.version for s in live}:
            self._forget(gone, topics[gone])
        if not live:
            return
        found = await inspector.look(
            [topics[s.version] for s in live],
            window_s=self.cfg.outputs.active_window_s,
            previous=self._previous,
        )
        m = self.metrics
        for state in live:
            topic = topics[state.version]
            readings = found.get(topic, [])
            for r in readings:
                if r.moved or (r.topic, r.group) not in self._previous:
                    self._previous[(r.topic, r.group)] = dict(r.committed)
            m.output_readers.labels(state.version, topic).set(len(readings))
            m.output_active_readers.labels(state.version, topic).set(
                sum(r.active for r in readings)
            )
            if state.sunset_ms is not None:
                m.output_sunset.labels(state.version).set(state.sunset_ms / 1000)
            self.latest[state.version] = readings
            self._shown.add(state.version)

    def _forget(self, version: str, topic: str) -> None:
        m = self.metrics
        for gauge, labels in (
            (m.output_readers, (version, topic)),
            (m.output_active_readers, (version, topic)),
            (m.output_sunset, (version,)),
        ):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(*labels)
        self._shown.discard(version)
        self.latest.pop(version, None)
