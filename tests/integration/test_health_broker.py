"""``/healthz`` and ``/readyz`` of a real sidecar and a real aggregator on the broker."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from kafka_helpers import create_topics, make_config, produce, unique, wait_until

from sidecar.aggregate.service import AggregatorService
from sidecar.broker import free_port
from sidecar.health import HealthServer
from sidecar.runner import Sidecar
from sidecar.traffic import generated_items

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    def fetch() -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    code, body = await asyncio.to_thread(fetch)
    return code, json.loads(body) if path != "/metrics" else {"text": body.decode()}


async def wait_for_status(port: int, path: str, code: int, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        last = await get(port, path)
        if last[0] == code:
            return last[1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"{path} never answered {code}; last: {last}")


def serve(sidecar: Sidecar) -> HealthServer:
    server = sidecar.metrics.serve(free_port(), "127.0.0.1", health=sidecar.health)
    assert server is not None
    return server


async def test_a_sidecar_is_ready_once_serving_and_not_ready_before_or_after(
    bootstrap: str,
) -> None:
    cfg = make_config(bootstrap)
    await create_topics(cfg)
    await produce(cfg, generated_items(200, seed=3))
    sidecar = Sidecar(cfg)
    server = serve(sidecar)
    try:
        code, body = await get(server.port, "/readyz")
        assert code == 503 and body["phase"] == "starting"
        assert (await get(server.port, "/healthz"))[0] == 200

        task = asyncio.create_task(sidecar.run())
        body = await wait_for_status(server.port, "/readyz", 200)
        assert body["phase"] == "serving" and body["failing"] == []
        checks = body["checks"]
        assert set(checks) == {
            "partitions",
            "broker",
            "topics",
            "models",
            "control",
            "tasks",
            "lag",
        }
        assert "3 partitions of" in checks["partitions"]["detail"]
        assert "champion fraud-lr@1.4.0: closed" in checks["models"]["detail"]
        assert checks["control"]["detail"] == "control topic replayed; tailing it"
        assert sidecar.control is not None and sidecar.control.caught_up
        await wait_until(lambda: sidecar.processed >= 200, 30)
        metrics = (await get(server.port, "/metrics"))[1]["text"]
        assert "sidecar_records_consumed_total" in metrics

        sidecar.request_stop()
        await asyncio.wait_for(task, 60)
        code, body = await get(server.port, "/readyz")
        assert code == 503 and body["phase"] == "stopped"
        assert (await get(server.port, "/healthz"))[0] == 200
    finally:
        sidecar.request_stop()
        sidecar.close_models()
        server.close()


@pytest.mark.slow
async def test_an_idle_standby_member_is_ready_and_says_it_is_a_standby(bootstrap: str) -> None:
    # More replicas than partitions (a Deployment scaled past the topic): the member without
    # partitions must be ready, or the rollout of such a Deployment never completes.
    cfg = make_config(bootstrap, partitions=1)
    await create_topics(cfg)
    sidecars = [Sidecar(cfg, instance_id=unique("h")) for _ in range(2)]
    servers = [serve(s) for s in sidecars]
    tasks = [asyncio.create_task(s.run()) for s in sidecars]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sidecars)), 30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answers = [await get(srv.port, "/readyz") for srv in servers]
            details = sorted(body["checks"]["partitions"]["detail"] for _, body in answers)
            if [code for code, _ in answers] == [200, 200] and details[1].startswith("standby"):
                break
            await asyncio.sleep(0.3)
        else:
            raise AssertionError(f"expected one owner and one ready standby: {answers}")
        assert details[0] == f"1 partitions of {cfg.topics.requests} assigned"
        assert "more members than" in details[1]
        assert all(body["failing"] == [] for _, body in answers)
        metrics = (await get(servers[0].port, "/metrics"))[1]["text"]
        assert 'sidecar_readiness_check{check="partitions",component="sidecar"} 1.0' in metrics
    finally:
        for s in sidecars:
            s.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for s, srv in zip(sidecars, servers, strict=True):
            s.close_models()
            srv.close()


async def test_a_sidecar_without_a_broker_is_alive_but_not_ready() -> None:
    cfg = make_config(f"127.0.0.1:{free_port()}")
    sidecar = Sidecar(cfg)
    server = serve(sidecar)
    task = asyncio.create_task(sidecar.run())
    try:
        await asyncio.sleep(2.5)
        code, body = await get(server.port, "/readyz")
        assert code == 503 and body["phase"] == "starting"
        assert body["checks"]["partitions"]["detail"] == "consumer not started"
        assert (await get(server.port, "/healthz"))[0] == 200
    finally:
        sidecar.request_stop()
        await asyncio.wait_for(task, 30)
        sidecar.close_models()
        server.close()


@pytest.mark.slow
async def test_the_aggregator_is_ready_once_consuming(bootstrap: str) -> None:
    cfg = make_config(
        bootstrap,
        partitions=1,
        aggregate={"group_id": unique("agg"), "dry_run": True, "metrics_port": 0},
    )
    await create_topics(cfg)
    service = AggregatorService(cfg)
    server = service.metrics.serve(free_port(), "127.0.0.1", health=service.health)
    assert server is not None
    try:
        code, body = await get(server.port, "/readyz")
        assert code == 503 and body["component"] == "aggregator"
        task = asyncio.create_task(service.run())
        body = await wait_for_status(server.port, "/readyz", 200)
        assert set(body["checks"]) == {"partitions", "broker"}
        assert "1 partitions of" in body["checks"]["partitions"]["detail"]
        service.request_stop()
        await asyncio.wait_for(task, 30)
        code, body = await get(server.port, "/readyz")
        assert code == 503 and body["phase"] == "stopped"
    finally:
        service.request_stop()
        server.close()


async def test_an_output_topic_deleted_under_a_running_sidecar_makes_it_unready(
    bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: with its comparisons topic gone the instance held its outputs, committed
    nothing, and every check still passed (ready, broker reachable) without a word."""
    from confluent_kafka.admin import AdminClient

    cfg = make_config(bootstrap, pipeline={"drain_timeout_s": 2})
    await create_topics(cfg)
    sidecar = Sidecar(cfg)
    server = serve(sidecar)
    task = asyncio.create_task(sidecar.run())
    try:
        await wait_for_status(server.port, "/readyz", 200)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin.delete_topics([cfg.topics.comparisons]).values():
            await asyncio.to_thread(future.result, 30)
        body = await wait_for_status(server.port, "/readyz", 503)
        assert "topics" in body["failing"]
        detail = body["checks"]["topics"]["detail"]
        assert f"missing on the broker: {cfg.topics.comparisons} (topics.comparisons)" in detail
        assert body["checks"]["broker"]["ok"]  # reachable: it is the topic that is gone
        assert any("topics: missing on the broker" in r.getMessage() for r in caplog.records)
    finally:
        sidecar.request_stop()
        await asyncio.wait_for(task, 60)
        sidecar.close_models()
        server.close()
