"""Readiness logic (pure) and the HTTP server that serves it (a real server on a free port)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from sidecar.broker import free_port
from sidecar.health import (
    SERVING,
    STARTING,
    STOPPED,
    BrokerProbe,
    Check,
    HealthServer,
    HealthState,
    ModelStatus,
    assignment_check,
    control_check,
    model_check,
    run_while_serving,
    topics_check,
)
from sidecar.models.health import BreakerState


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


OK = [Check("partitions", True, "3 assigned"), Check("broker", True, "ok")]


def test_not_ready_until_the_loop_publishes_serving_with_every_check_passing() -> None:
    state = HealthState("sidecar")
    ready, body = state.readiness()
    assert not ready and body["phase"] == STARTING and body["failing"] == ["phase"]
    state.publish(STARTING, OK)
    assert not state.readiness()[0]
    state.publish(SERVING, OK)
    ready, body = state.readiness()
    assert ready and body["status"] == "ready" and body["failing"] == []
    assert body["checks"]["partitions"] == {"ok": True, "detail": "3 assigned"}
    state.publish(SERVING, [*OK, Check("control", False, "not replayed")])
    ready, body = state.readiness()
    assert not ready and body["failing"] == ["control"]
    state.publish(STOPPED, [])
    assert not state.readiness()[0]


def test_a_stale_snapshot_fails_readiness_then_liveness() -> None:
    clock = Clock()
    state = HealthState("sidecar", stale_after_s=10, stall_after_s=60, clock=clock)
    assert state.liveness()[0]  # nothing published yet: alive (still starting up)
    clock.t += 1000
    assert state.liveness()[0]
    state.publish(SERVING, OK)
    clock.t += 11
    ready, body = state.readiness()
    assert not ready and body["failing"] == ["event_loop"]
    assert "stalled" in body["checks"]["event_loop"]["detail"]
    assert state.liveness()[0]
    clock.t += 50
    alive, body = state.liveness()
    assert not alive and body["status"] == "stalled"
    state.publish(STOPPED, [])
    clock.t += 1000
    assert state.liveness()[0]  # stopped on purpose: not a stall


def test_partitions_check_explains_an_idle_member() -> None:
    assert not assignment_check(None, "req", None).ok
    joining = assignment_check(0, "req", 3)
    assert not joining.ok and "joining the consumer group" in joining.detail
    standby = assignment_check(0, "req", 3, joined=True)
    assert standby.ok and standby.detail.startswith("standby:")
    assert "more members than req has 3 partitions" in standby.detail
    good = assignment_check(2, "req", 6)
    assert good == Check("partitions", True, "2 partitions of req assigned")


def test_only_an_open_champion_breaker_makes_the_instance_unready() -> None:
    champ = ModelStatus("champion", "m", "1.0.0", BreakerState.CLOSED)
    cand = ModelStatus("candidate", "m", "2.0.0", BreakerState.OPEN)
    check = model_check([champ, cand])
    assert check.ok and "candidate m@2.0.0: open" in check.detail
    assert model_check([ModelStatus("champion", "m", "1", BreakerState.HALF_OPEN)]).ok
    bad = model_check([ModelStatus("champion", "m", "1", BreakerState.OPEN), cand])
    assert not bad.ok and "champion circuit breaker open" in bad.detail
    assert not model_check([]).ok


def test_control_check() -> None:
    assert control_check(False, None).ok
    assert not control_check(True, None).ok
    assert not control_check(True, False).ok
    assert control_check(True, True).ok


class _Consumer:
    """Stands in for aiokafka's consumer (third-party) in the probe's timing logic only;
    tests/integration/test_health_broker.py probes a real one."""

    def __init__(self) -> None:
        self.fail: Exception | None = None
        self.calls = 0

    async def topics(self) -> set[str]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {"t"}


async def test_broker_probe_goes_stale_after_failures() -> None:
    clock = Clock()
    probe = BrokerProbe(interval_s=5, timeout_s=1, stale_after_s=15, clock=clock)
    consumer = _Consumer()
    assert not probe.check().ok and probe.due()
    await probe.probe(consumer)
    assert probe.check().ok and not probe.due()
    consumer.fail = ConnectionError("refused")
    clock.t += 5
    await probe.probe(consumer)
    assert probe.check().ok  # one failure within the staleness window is tolerated
    clock.t += 11
    check = probe.check()
    assert not check.ok and "16.0s ago: ConnectionError: refused" in check.detail


async def test_broker_probe_times_out() -> None:
    class Hanging:
        async def topics(self) -> set[str]:
            await asyncio.sleep(10)
            return set()

    probe = BrokerProbe(timeout_s=0.05)
    await probe.probe(Hanging())
    assert not probe.check().ok and "TimeoutError" in probe.check().detail


def _get(url: str) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


@pytest.fixture
def server() -> Any:
    registry = CollectorRegistry()
    Counter("sidecar_demo_things", "things", registry=registry).inc(3)
    state = HealthState("sidecar")
    srv = HealthServer(registry, state, "127.0.0.1", free_port()).start()
    yield srv
    srv.close()


def test_endpoints(server: HealthServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    code, ctype, body = _get(f"{base}/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert b"sidecar_demo_things_total 3.0" in body
    code, ctype, body = _get(f"{base}/healthz")
    assert code == 200 and ctype == "application/json" and json.loads(body)["status"] == "alive"
    code, _, body = _get(f"{base}/readyz")
    assert code == 503 and json.loads(body)["status"] == "not_ready"
    server.health.publish(SERVING, OK)
    code, _, body = _get(f"{base}/readyz")
    assert code == 200 and json.loads(body)["checks"]["broker"]["ok"] is True
    assert _get(f"{base}/readyz/?verbose=1")[0] == 200
    assert _get(f"{base}/nope")[0] == 404


def test_serve_with_port_zero_is_off() -> None:
    from sidecar.metrics import SidecarMetrics

    assert SidecarMetrics().serve(0) is None


@pytest.mark.parametrize("component", ["sidecar", "aggregator"])
def test_metrics_carry_process_gc_and_readiness_series(component: str) -> None:
    from sidecar.aggregate.metrics import AggregateMetrics
    from sidecar.metrics import SidecarMetrics

    metrics = SidecarMetrics() if component == "sidecar" else AggregateMetrics()
    health = HealthState(component)
    server = metrics.serve(free_port(), "127.0.0.1", health=health)
    assert server is not None
    try:
        health.publish(SERVING, [*OK, Check("control", False, "not replayed")])
        url = f"http://127.0.0.1:{server.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.close()
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert f"\n{series}" in text, series
    assert 'python_gc_collections_total{generation="0"}' in text
    assert f'sidecar_ready{{component="{component}"}} 0.0' in text
    assert f'sidecar_readiness_check{{check="control",component="{component}"}} 0.0' in text
    assert f'sidecar_readiness_check{{check="broker",component="{component}"}} 1.0' in text
    assert "_ms_" not in text and "_ms{" not in text, "latency and time metrics are in seconds"


async def test_a_dead_http_thread_is_reported_and_a_closed_one_is_not(server: HealthServer) -> None:
    """``HealthServer.watch`` runs as a supervised task: it raises once the serving thread is
    gone (the instance stops to be restarted), and returns quietly after ``close``."""
    watcher = asyncio.create_task(server.watch(every_s=0.01))
    await asyncio.sleep(0.05)
    assert not watcher.done() and server.alive
    server._httpd.shutdown()  # the thread ends without close(): as if it had died
    with pytest.raises(RuntimeError, match="stopped"):
        await asyncio.wait_for(watcher, 5)
    other = HealthServer(CollectorRegistry(), HealthState("x"), "127.0.0.1", free_port()).start()
    quiet = asyncio.create_task(other.watch(every_s=0.01))
    other.close()
    await asyncio.wait_for(quiet, 5)


async def test_a_service_stops_and_fails_when_its_http_server_dies() -> None:
    """The aggregator and the outcomes stage run under run_while_serving: a dead serving
    thread asks the service to stop (it drains) and the error surfaces (exit non-zero)."""
    srv = HealthServer(CollectorRegistry(), HealthState("aggregator"), "127.0.0.1", free_port())
    srv.start()
    stop = asyncio.Event()

    async def service() -> None:
        await stop.wait()

    async def kill_server() -> None:
        await asyncio.sleep(0.2)
        srv._httpd.shutdown()  # the thread ends without close(): as if it had died

    killer = asyncio.create_task(kill_server())
    with pytest.raises(RuntimeError, match=r"HTTP server .* stopped"):
        await asyncio.wait_for(run_while_serving(service(), srv, stop.set), 10)
    await killer
    assert stop.is_set()  # the service was asked to stop first


async def test_a_service_that_ends_ends_the_watch() -> None:
    srv = HealthServer(CollectorRegistry(), HealthState("outcomes"), "127.0.0.1", free_port())
    srv.start()

    async def service() -> None:
        await asyncio.sleep(0.1)

    await asyncio.wait_for(run_while_serving(service(), srv, lambda: None), 10)
    assert srv.alive  # untouched: the caller closes it
    srv.close()


def test_topics_check_names_each_missing_topic_and_its_setting() -> None:
    named = {"r": "topics.requests", "d": "topics.decisions", "c": "topics.comparisons"}
    assert topics_check(named, None).ok  # not listed yet: the broker check covers that
    assert topics_check(named, {"r", "d", "c", "other"}).ok
    check = topics_check(named, {"r"})
    assert not check.ok and check.name == "topics"
    assert check.detail.startswith(
        "missing on the broker: d (topics.decisions), c (topics.comparisons)"
    )


async def test_broker_probe_keeps_the_topics_last_listed() -> None:
    probe = BrokerProbe(clock=Clock())
    consumer = _Consumer()
    await probe.probe(consumer)
    assert probe.topics == {"t"}
    consumer.fail = ConnectionError("refused")
    probe.last_attempt = None
    await probe.probe(consumer)
    assert probe.topics == {"t"}  # a failed request says nothing about the topics
