"""Liveness and readiness on the metrics port: ``/metrics``, ``/healthz`` and ``/readyz``.

Why a thread and not an asyncio server: the HTTP side runs in a stdlib ``ThreadingHTTPServer``
on a daemon thread (as ``prometheus_client.start_http_server`` did), so it answers even while
the event loop is busy or wedged -- which is exactly when ``/healthz`` and a stale ``/readyz``
matter -- and it can be started before the loop runs. It never touches asyncio objects: the
event loop publishes an immutable :class:`Snapshot` every second (:class:`HealthWatcher`) and
the HTTP threads read it under a lock. A snapshot that stops being refreshed is itself a
finding: readiness fails after ``stale_after_s`` and liveness after ``stall_after_s``.

Readiness of a sidecar (all must pass): it is serving (connected, control replayed, not
stopping), has partitions assigned or is an idle standby of its group, reached a broker
recently (a metadata request every few seconds), its champion's circuit breaker is not open,
its control plane has caught up with the control topic, and none of its background tasks has
died. The aggregator: consumer started, partitions assigned (or standby), broker reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .errors import ConfigError
from .models.health import BreakerState
from .progress import lag_detail

if TYPE_CHECKING:
    from .aggregate.service import AggregatorService
    from .progress import PartitionLag
    from .runner import Sidecar

log = logging.getLogger(__name__)

#: Seconds between two snapshots published by the event loop.
PUBLISH_INTERVAL_S = 1.0
#: A snapshot older than this makes ``/readyz`` fail (the loop stopped publishing).
STALE_AFTER_S = 10.0
#: A snapshot older than this makes ``/healthz`` fail: the loop is wedged, restart the process.
STALL_AFTER_S = 60.0
#: Seconds between broker probes (one metadata request), their timeout, and how long after
#: the last successful one the broker still counts as reachable.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0
BROKER_STALE_AFTER_S = 15.0

#: Phases of a component; only ``serving`` can be ready.
STARTING, SERVING, STOPPING, STOPPED = "starting", "serving", "stopping", "stopped"


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness condition. ``detail`` says what was seen (and what to do when failing)."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    phase: str
    checks: tuple[Check, ...]
    #: ``time.monotonic()`` when published.
    at: float
    #: Published by the event loop (not the initial placeholder).
    live: bool


class HealthState:
    """The latest snapshot of one component; written by the event loop, read by HTTP threads."""

    def __init__(
        self,
        component: str,
        *,
        stale_after_s: float = STALE_AFTER_S,
        stall_after_s: float = STALL_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.component = component
        self.stale_after_s = stale_after_s
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot = Snapshot(STARTING, (), clock(), live=False)

    def publish(self, phase: str, checks: Iterable[Check]) -> None:
        snap = Snapshot(phase, tuple(checks), self._clock(), live=True)
        with self._lock:
            self._snapshot = snap

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, JSON body). Ready only while serving, fresh, and every check passes."""
        snap = self.snapshot
        age = self._clock() - snap.at
        checks = list(snap.checks)
        if snap.live and snap.phase in (STARTING, SERVING) and age > self.stale_after_s:
            checks.append(
                Check(
                    "event_loop",
                    False,
                    f"health snapshot is {age:.1f}s old (> {self.stale_after_s:.0f}s): the "
                    "event loop is blocked or stalled",
                )
            )
        failing = [c.name for c in checks if not c.ok]
        ready = snap.phase == SERVING and not failing
        if snap.phase != SERVING:
            failing.insert(0, "phase")
        body = {
            "component": self.component,
            "status": "ready" if ready else "not_ready",
            "phase": snap.phase,
            "failing": failing,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
            "age_s": round(age, 3),
        }
        return ready, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Alive unless the event loop published once and then stopped for ``stall_after_s``
        while the component should be running (a wedged loop never recovers by itself)."""
        snap = self.snapshot
        age = self._clock() - snap.at
        stalled = snap.live and snap.phase in (STARTING, SERVING) and age > self.stall_after_s
        body = {
            "component": self.component,
            "status": "stalled" if stalled else "alive",
            "phase": snap.phase,
            "age_s": round(age, 3),
        }
        return not stalled, body


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True, slots=True)
class ModelStatus:
    arm: str
    name: str
    version: str
    breaker: BreakerState


def assignment_check(
    assigned: int | None, topic: str, topic_partitions: int | None, joined: bool = False
) -> Check:
    """Partitions of ``topic`` assigned to this member.

    A member with none is ready once it has joined the group (``joined``: its last group join
    completed, with an empty assignment): it is an idle *standby* when the group has more
    members than ``topic`` has partitions, and takes over partitions in the next rebalance when
    another member leaves. Holding it unready would stall a rolling update (a Deployment with
    more replicas than partitions never becomes available) for no benefit: no traffic is
    routed to a Kafka consumer by readiness. Before its first join it is not ready.
    """
    if assigned is None:
        return Check("partitions", False, "consumer not started")
    if assigned == 0:
        known = f"{topic_partitions} partitions" if topic_partitions else "its partitions"
        if joined:
            return Check(
                "partitions",
                True,
                f"standby: a group member with no partition of {topic} assigned (the group "
                f"has more members than {topic} has {known}); it takes over partitions when "
                "a member leaves",
            )
        return Check(
            "partitions",
            False,
            f"no partitions of {topic} assigned yet: joining the consumer group",
        )
    return Check("partitions", True, f"{assigned} partitions of {topic} assigned")


def model_check(models: Sequence[ModelStatus]) -> Check:
    """Not ready while the champion's breaker is open (its decisions are all fallbacks).

    An open *candidate* breaker leaves the instance ready (reported in the detail): a failing
    candidate never touches champion traffic, and the aggregator's error-rate guard acts on it.
    """
    if not models:
        return Check("models", False, "no models loaded")
    parts, ok = [], True
    for m in models:
        state = m.breaker.name.lower()
        parts.append(f"{m.arm} {m.name}@{m.version}: {state}")
        if m.arm == "champion" and m.breaker is BreakerState.OPEN:
            ok = False
    detail = "; ".join(parts)
    if not ok:
        detail += " (champion circuit breaker open: decisions follow rollout.champion_failure)"
    return Check("models", ok, detail)


def control_check(enabled: bool, caught_up: bool | None) -> Check:
    if not enabled:
        return Check("control", True, "control plane disabled (configured policy only)")
    if not caught_up:
        return Check("control", False, "control topic not replayed up to its start-up barrier")
    return Check("control", True, "control topic replayed; tailing it")


def tasks_check(failure: object | None) -> Check:
    """Not ready once a background task (committer, control tail, heartbeat) died: the
    instance is stopping to be restarted, and must not look healthy meanwhile."""
    if failure is None:
        return Check("tasks", True, "background tasks running")
    return Check("tasks", False, f"{failure}; the process exits to be restarted")


def lag_check(lags: list[PartitionLag] | None) -> Check:
    """Consumer lag per partition, for the operator reading ``/readyz`` (always passes: an
    instance catching up is doing its job; alert on ``sidecar_partition_lag_seconds``)."""
    return Check("lag", True, lag_detail(lags))


def topics_check(named: dict[str, str], present: set[str] | None) -> Check:
    """The topics a component reads and writes (topic -> its setting) are on the broker.

    One can vanish under a running process: deleted by mistake, or lost with an in-memory
    broker that restarted. Outputs then wait unacknowledged and nothing is committed, while
    every other check passes; this one says which topic and which setting."""
    if present is None:
        return Check("topics", True, "not listed yet")
    missing = [f"{t} ({setting})" for t, setting in named.items() if t not in present]
    if missing:
        return Check(
            "topics",
            False,
            f"missing on the broker: {', '.join(missing)}; nothing is committed until they "
            "are back (recreate them with their partition counts, then restart the instance)",
        )
    return Check("topics", True, f"{len(named)} topics present")


class BrokerProbe:
    """Broker reachability: the time of the last successful metadata request.

    aiokafka retries fetches silently, so "the consume loop runs" says nothing about the
    broker; one metadata request every ``interval_s`` does, at negligible cost.
    """

    def __init__(
        self,
        *,
        interval_s: float = PROBE_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
        stale_after_s: float = BROKER_STALE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self._clock = clock
        self.last_ok: float | None = None
        self.last_attempt: float | None = None
        self.last_error: str | None = None
        #: The topics the broker listed at the last successful request (None: none yet).
        self.topics: set[str] | None = None

    def due(self) -> bool:
        return self.last_attempt is None or self._clock() - self.last_attempt >= self.interval_s

    async def probe(self, consumer: Any) -> None:
        """One metadata request through ``consumer`` (any aiokafka consumer)."""
        self.last_attempt = self._clock()
        try:
            topics = await asyncio.wait_for(consumer.topics(), self.timeout_s)
        except Exception as exc:  # any failure means "not reached"; say which
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            self.last_ok = self._clock()
            self.last_error = None
            self.topics = set(topics)

    def check(self) -> Check:
        if self.last_ok is None:
            why = f" ({self.last_error})" if self.last_error else ""
            return Check("broker", False, f"no successful metadata request yet{why}")
        age = self._clock() - self.last_ok
        if age > self.stale_after_s:
            why = f": {self.last_error}" if self.last_error else ""
            return Check("broker", False, f"last successful metadata request {age:.1f}s ago{why}")
        return Check("broker", True, f"metadata request succeeded {age:.1f}s ago")


Collect = Callable[[], Awaitable[tuple[str, list[Check]]]]


class HealthWatcher:
    """Runs on the event loop: collects a component's checks and publishes them."""

    def __init__(
        self, state: HealthState, collect: Collect, interval_s: float = PUBLISH_INTERVAL_S
    ) -> None:
        self.state = state
        self._collect = collect
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> HealthWatcher:
        self._task = asyncio.create_task(self._loop(), name=f"health-{self.state.component}")
        return self

    async def _loop(self) -> None:
        while True:
            try:
                phase, checks = await self._collect()
                self.state.publish(phase, checks)
            except Exception:  # a bug here must never take the component down
                log.exception("health: collecting %s checks failed", self.state.component)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Stop publishing and report the component stopped (so it is never ready again)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.state.publish(STOPPED, [])


def _assigned(consumer: Any, topic: str) -> tuple[int | None, int | None, bool]:
    """(partitions of ``topic`` assigned, partitions it has, whether a group join completed)."""
    if consumer is None:
        return None, None, False
    assigned = sum(1 for tp in consumer.assignment() if tp.topic == topic)
    parts = consumer.partitions_for_topic(topic)
    return assigned, len(parts) if parts else None, group_joined(consumer)


def group_joined(consumer: Any) -> bool:
    """Whether the consumer's last group join completed (its assignment may be empty).

    aiokafka has no public API for it: its subscription holds an assignment (possibly empty)
    once a join completed, and None before. Read defensively: an aiokafka without these
    attributes makes an empty assignment unready, as before.
    """
    subscription = getattr(getattr(consumer, "_subscription", None), "subscription", None)
    return getattr(subscription, "assignment", None) is not None


def watch_sidecar(sidecar: Sidecar, probe: BrokerProbe | None = None) -> HealthWatcher:
    """Start publishing a :class:`~sidecar.runner.Sidecar`'s readiness to ``sidecar.health``."""
    from .runner import output_settings

    probe = probe or BrokerProbe()
    topic = sidecar.config.topics.requests
    named = {topic: "topics.requests"} | output_settings(sidecar.config)
    said: list[Check] = []

    async def collect() -> tuple[str, list[Check]]:
        consumer = sidecar.consumer
        if consumer is not None and probe.due():
            await probe.probe(consumer)
        topics = topics_check(named, probe.topics)
        if said and said[-1].ok != topics.ok:  # say it once when it changes, not every second
            (log.info if topics.ok else log.error)("topics: %s", topics.detail)
        said[:] = [topics]
        phase = STOPPING if sidecar.stopping else SERVING if sidecar.ready.is_set() else STARTING
        models = [
            ModelStatus(arm, m.name, m.version, m.breaker.state)
            for arm, m in (("champion", sidecar.champion), ("candidate", sidecar.candidate))
            if m is not None
        ]
        assigned, parts, joined = _assigned(consumer, topic)
        plane = sidecar.control
        return phase, [
            assignment_check(assigned, topic, parts, joined),
            probe.check(),
            topics,
            model_check(models),
            control_check(
                sidecar.config.control.enabled, None if plane is None else plane.caught_up
            ),
            tasks_check(sidecar.failure),
            lag_check(sidecar.lag),
        ]

    return HealthWatcher(sidecar.health, collect).start()


def watch_aggregator(service: AggregatorService, probe: BrokerProbe | None = None) -> HealthWatcher:
    """Start publishing an :class:`~sidecar.aggregate.service.AggregatorService`'s readiness."""
    probe = probe or BrokerProbe()
    topic = service.config.topics.comparisons

    async def collect() -> tuple[str, list[Check]]:
        consumer = service.consumer
        if consumer is not None and probe.due():
            await probe.probe(consumer)
        phase = STOPPING if service.stopping else SERVING if service.ready.is_set() else STARTING
        assigned, parts, joined = _assigned(consumer, topic)
        return phase, [assignment_check(assigned, topic, parts, joined), probe.check()]

    return HealthWatcher(service.health, collect).start()


class ReadinessCollector:
    """``sidecar_ready{component}`` and ``sidecar_readiness_check{component,check}`` (1 or
    0), read from a :class:`HealthState` at scrape time: alert rules can see what ``/readyz``
    says (e.g. a control plane that has not caught up) without probing it themselves."""

    def __init__(self, component: str, health: HealthState | None = None) -> None:
        self.component = component
        self.health = health

    def collect(self) -> Iterable[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "sidecar_ready",
            "1 while /readyz answers 200 (every check passes)",
            labels=["component"],
        )
        checks = GaugeMetricFamily(
            "sidecar_readiness_check",
            "1 while this readiness check passes; /readyz has its detail",
            labels=["component", "check"],
        )
        if self.health is not None:
            ok, body = self.health.readiness()
            ready.add_metric([self.component], int(ok))
            for name, check in body["checks"].items():
                checks.add_metric([self.component, name], int(check["ok"]))
        return [ready, checks]


# --------------------------------------------------------------------------- HTTP


class HealthServer:
    """``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz`` (JSON; 200 or 503)."""

    def __init__(
        self, registry: CollectorRegistry, health: HealthState, host: str, port: int
    ) -> None:
        self.registry = registry
        self.health = health
        handler = type("_Handler", (_Handler,), {"server_ref": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"http-{health.component}", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        log.info(
            "%s: /metrics, /healthz and /readyz on http://%s:%d",
            self.health.component,
            self.host,
            self.port,
        )
        return self

    def close(self) -> None:
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def watch(self, every_s: float = 1.0) -> None:
        """Until closed: raise once the serving thread is gone (run it as a supervised task,
        so an instance whose probes and metrics went dark stops to be restarted)."""
        while not getattr(self, "_closed", False):
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"the HTTP server on {self.host}:{self.port} (/metrics, /healthz, /readyz) "
                    "stopped"
                )
            await asyncio.sleep(every_s)


async def run_while_serving(
    service: Awaitable[None], server: HealthServer | None, request_stop: Callable[[], None]
) -> None:
    """Run ``service`` (a long-running command's main coroutine) while ``server`` serves: if
    the serving thread dies, the service is asked to stop (it drains and commits) and the
    server's error is raised, so the process exits non-zero and is restarted instead of
    running on with its probes and metrics dark."""
    if server is None:
        await service
        return
    run = asyncio.ensure_future(service)
    watch = asyncio.ensure_future(server.watch())
    try:
        await asyncio.wait((run, watch), return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and not run.done():
            request_stop()
            await run
            watch.result()  # raises: the server stopped
        await run
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch


class _Handler(BaseHTTPRequestHandler):
    server_ref: HealthServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        srv = self.server_ref
        if path == "/metrics":
            self._send(200, generate_latest(srv.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/livez"):
            ok, body = srv.health.liveness()
            self._send(200 if ok else 503, orjson.dumps(body), "application/json")
        elif path == "/readyz":
            ok, body = srv.health.readiness()
            self._send(200 if ok else 503, orjson.dumps(body), "application/json")
        elif path == "/":
            self._send(200, b"/metrics /healthz /readyz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


def serve(
    registry: CollectorRegistry,
    health: HealthState,
    port: int,
    host: str = "127.0.0.1",
    setting: str = "metrics.port",
) -> HealthServer | None:
    """Start the server on ``host:port`` (``port`` 0: disabled, returns None).

    A port that cannot be bound is a ConfigError naming ``setting`` (the config key of
    ``port``), not an ``OSError`` traceback.
    """
    if not port:
        return None
    try:
        server = HealthServer(registry, health, host, port)
    except OSError as exc:
        env = "SIDECAR_" + setting.upper().replace(".", "__")
        why = exc.strerror or str(exc)
        hint = (
            "another process (a second sidecar on this machine?) listens there"
            if exc.errno == errno.EADDRINUSE
            else "check metrics.host"
        )
        raise ConfigError(
            f"cannot serve /metrics on {host}:{port} ({why}): {hint}; set {setting} "
            f"(or {env}) to a free port, or to 0 to turn the endpoint off"
        ) from None
    return server.start()


__all__ = [
    "BrokerProbe",
    "Check",
    "HealthServer",
    "HealthState",
    "HealthWatcher",
    "ModelStatus",
    "ReadinessCollector",
    "Snapshot",
    "assignment_check",
    "control_check",
    "group_joined",
    "model_check",
    "serve",
    "tasks_check",
    "watch_aggregator",
    "watch_sidecar",
]
