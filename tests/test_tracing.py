"""OpenTelemetry spans per batch and per control command (``[tracing]``, extra ``otel``):
against the broker with the SDK's in-memory exporter; off, OpenTelemetry is never imported;
on without the package, a clear ConfigError."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from control_helpers import control_config, ctl, setup
from kafka_helpers import create_topics, make_config, wait_until
from records import Rec

from sidecar.config import SidecarConfig
from sidecar.examples import fraud
from sidecar.runner import Sidecar
from sidecar.tracing import check_tracing, new_tracer

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from sidecar.tracing.spans import BatchTracer  # noqa: E402

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def trace_id(i: int) -> str:
    return f"{0xABC0000000000000 + i:032x}"


def parent_of(i: int) -> bytes:
    return f"00-{trace_id(i)}-{i + 1:016x}-01".encode()


def in_memory(cfg: SidecarConfig, **settings: Any) -> tuple[BatchTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = msgspec.structs.replace(
        cfg, tracing=msgspec.structs.replace(cfg.tracing, enabled=True, **settings)
    )
    assert cfg.models.candidate is not None
    names = {
        "champion": (cfg.models.champion.name, cfg.models.champion.version),
        "candidate": (cfg.models.candidate.name, cfg.models.candidate.version),
    }
    return BatchTracer(provider, cfg, names=names), exporter


async def produce_traced(cfg: SidecarConfig, n: int, traced_every: int, garbage: int) -> set[str]:
    """``n`` requests (every ``traced_every``-th with a ``traceparent``) and ``garbage``
    undecodable records, each traced; the trace ids sent."""
    docs = fraud.request_dicts(fraud.generate(n, seed=11))
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    await producer.start()
    sent: set[str] = set()
    try:
        futures = []
        for i, doc in enumerate(docs):
            headers = []
            if i % traced_every == 0:
                headers = [("traceparent", parent_of(i)), ("tracestate", b"v=1")]
                sent.add(trace_id(i))
            key = doc["routing_key"].encode() if doc.get("routing_key") else None
            futures.append(
                await producer.send(
                    cfg.topics.requests, msgspec.json.encode(doc), key=key, headers=headers
                )
            )
        for j in range(garbage):
            i = n + j
            futures.append(
                await producer.send(
                    cfg.topics.requests, b"{not json", headers=[("traceparent", parent_of(i))]
                )
            )
            sent.add(trace_id(i))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_a_span_per_batch_with_children_and_links(bootstrap: str) -> None:
    cfg = make_config(bootstrap, control={"enabled": False})
    await create_topics(cfg)
    n, garbage = 400, 3
    sent = await produce_traced(cfg, n, traced_every=10, garbage=garbage)
    tracer, exporter = in_memory(cfg, max_links=128)
    sidecar = Sidecar(cfg, tracer=tracer)
    task = asyncio.create_task(sidecar.run())
    try:

        def all_committed() -> bool:
            batches = by_name(exporter.get_finished_spans(), "sidecar.batch")
            return sum(s.attributes["messaging.batch.message_count"] for s in batches) >= n + 3

        await wait_until(all_committed, timeout_s=90)
    finally:
        sidecar.request_stop()
        await asyncio.wait_for(task, 60)
        sidecar.close_models()
    spans = exporter.get_finished_spans()
    batches = by_name(spans, "sidecar.batch")
    assert sum(s.attributes["messaging.batch.message_count"] for s in batches) == n + garbage
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        if span.parent is not None:
            children[span.parent.span_id].append(span)
    linked: set[str] = set()
    totals = defaultdict(int)
    for batch in batches:
        a = batch.attributes
        assert batch.parent is None and batch.kind.name == "CONSUMER"
        assert a["messaging.destination.name"] == cfg.topics.requests
        assert a["messaging.consumer.group.name"] == cfg.kafka.group_id
        assert a["sidecar.policy.epoch"] == 0 and a["sidecar.policy.mode"] == "canary"
        assert a["sidecar.policy.canary_share_bp"] == 2000
        assert (a["sidecar.champion.model"], a["sidecar.champion.version"]) == ("fraud-lr", "1.4.0")
        assert a["sidecar.candidate.version"] == "2.0.0"
        assert set(a["sidecar.partitions"]) <= {0, 1, 2} and a["sidecar.partitions"]
        assert a["sidecar.candidate.shed"] is False
        for key in ("decisions", "comparisons", "dead_letters", "champion_fallbacks"):
            totals[key] += a[f"sidecar.{key}"]
        assert a["sidecar.trace_links"] == len(batch.links)
        assert not a["sidecar.trace_links_capped"]
        for link in batch.links:
            linked.add(f"{link.context.trace_id:032x}")
            assert link.context.is_remote
            assert link.attributes["messaging.destination.partition.id"] in {"0", "1", "2"}
        kids = children[batch.context.span_id]
        names = sorted(k.name for k in kids)
        assert names.count("sidecar.champion") == 1
        assert names.count("sidecar.candidate") <= 1
        assert "sidecar.produce" in names
        for kid in kids:
            assert kid.context.trace_id == batch.context.trace_id
            assert batch.start_time <= kid.start_time <= kid.end_time <= batch.end_time
        champion = next(k for k in kids if k.name == "sidecar.champion")
        assert champion.attributes["sidecar.champion.status"] == "scored"
        assert champion.attributes["sidecar.model.latency_ms"] > 0
        produced = sum(k.attributes["sidecar.outputs"] for k in kids if k.name == "sidecar.produce")
        # Every output of the batch was handed to the producer inside one of its produce spans.
        assert (
            produced
            == a["sidecar.decisions"] + a["sidecar.comparisons"] + a["sidecar.dead_letters"]
        )
    assert linked == sent  # every traced request, the dead-lettered ones too, is linked
    assert totals["decisions"] == n and totals["comparisons"] == n
    assert totals["dead_letters"] == garbage
    assert any(
        "sidecar.candidate" in [k.name for k in children[b.context.span_id]] for b in batches
    )


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_control_commands_and_new_epochs_are_traced(bootstrap: str, tmp_path: Path) -> None:
    cfg = control_config(bootstrap, tmp_path)
    await setup(cfg)
    tracer, exporter = in_memory(cfg)
    sidecar = Sidecar(cfg, tracer=tracer, instance_id="inst-0")
    task = asyncio.create_task(sidecar.run())
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 30)
        assert (await ctl(cfg, "canary", share_bp=600)).code == 0
        again = await ctl(cfg, "canary", share_bp=600)  # a no-op: rejected
        assert again.code != 0
        await produce_traced(cfg, 50, traced_every=5, garbage=0)

        def traced_at_new_epoch() -> bool:
            batches = by_name(exporter.get_finished_spans(), "sidecar.batch")
            return sum(s.attributes["messaging.batch.message_count"] for s in batches) >= 50

        await wait_until(traced_at_new_epoch, timeout_s=60)
    finally:
        sidecar.request_stop()
        await asyncio.wait_for(task, 60)
        sidecar.close_models()
    spans = exporter.get_finished_spans()
    commands = by_name(spans, "sidecar.control")
    applied = [c for c in commands if c.attributes["sidecar.control.outcome"] == "applied"]
    assert len(applied) == 1
    a = applied[0].attributes
    assert a["sidecar.control.action"] == "canary"
    assert (a["sidecar.control.from_epoch"], a["sidecar.control.to_epoch"]) == (0, 1)
    assert a["sidecar.policy.mode"] == "canary"
    rejected = [c for c in commands if c.attributes["sidecar.control.outcome"] == "rejected"]
    assert [r.attributes["sidecar.control.reject_reason"] for r in rejected] == ["no_change"]
    for batch in by_name(spans, "sidecar.batch"):
        assert batch.attributes["sidecar.policy.epoch"] == 1
        assert batch.attributes["sidecar.policy.canary_share_bp"] == 600


def test_links_are_capped_deduplicated_and_only_valid() -> None:
    cfg = make_config("unused:9092")
    tracer, _ = in_memory(cfg, max_links=3)
    records = [
        Rec(b"{}", offset=0, headers=(("traceparent", b"00-garbage"),)),
        Rec(b"{}", offset=1, headers=(("traceparent", parent_of(1)),)),
        Rec(b"{}", offset=2, headers=(("traceparent", parent_of(1)),)),  # the same parent
        Rec(b"{}", offset=3),
        Rec(b"{}", offset=4, headers=(("TraceParent", parent_of(4)),)),
        Rec(b"{}", offset=5, headers=(("traceparent", parent_of(5)),)),
        Rec(b"{}", offset=6, headers=(("traceparent", parent_of(6)),)),
    ]
    links, capped = tracer.links(records)
    assert [f"{link.context.trace_id:032x}" for link in links] == [
        trace_id(1),
        trace_id(4),
        trace_id(5),
    ]
    assert [link.attributes["messaging.kafka.offset"] for link in links] == [1, 4, 5]
    assert links[0].context.span_id == 2 and links[0].context.trace_flags.sampled
    assert capped
    fewer, capped = tracer.links(records[:5])
    assert len(fewer) == 2 and not capped
    none, _ = in_memory(cfg, max_links=0)
    assert none.links(records) == ([], False)


def test_sampling_leaves_batches_out() -> None:
    cfg = make_config("unused:9092")
    from sidecar.routing import Mode, RoutingPolicy

    policy = RoutingPolicy(rollout="r", mode=Mode.SHADOW)
    never, _ = in_memory(cfg, sample_ratio=0.0)
    always, _ = in_memory(cfg, sample_ratio=1.0)
    assert all(never.batch({}, [], policy, False) is None for _ in range(100))
    assert all(always.batch({}, [], policy, False) is not None for _ in range(100))
    half, _ = in_memory(cfg, sample_ratio=0.5)
    kept = sum(half.batch({}, [], policy, False) is not None for _ in range(2000))
    assert 800 < kept < 1200


def test_the_configured_exporters() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from sidecar.tracing.spans import exporter_for

    cfg = make_config("unused:9092", tracing={"enabled": True})
    assert isinstance(exporter_for(cfg), OTLPSpanExporter)
    cfg = make_config("unused:9092", tracing={"enabled": True, "endpoint": "http://col:4318/"})
    exporter = exporter_for(cfg)
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "http://col:4318/v1/traces"
    cfg = make_config(
        "unused:9092", tracing={"enabled": True, "exporter": "console", "service_name": "fraud"}
    )
    assert isinstance(exporter_for(cfg), ConsoleSpanExporter)
    tracer = new_tracer(cfg, "inst-9")
    assert tracer is not None
    resource = tracer.provider.resource.attributes
    assert resource["service.name"] == "fraud" and resource["service.instance.id"] == "inst-9"
    tracer.flush()
    assert new_tracer(make_config("unused:9092"), "inst-9") is None


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})},
        check=False,
    )


@pytest.mark.broker
def test_off_never_imports_opentelemetry(bootstrap: str) -> None:
    """A sidecar with tracing off serves batches without OpenTelemetry ever imported."""
    out = run_python(
        """
        import asyncio, os, sys
        from kafka_helpers import create_topics, make_config, produce, wait_until
        from sidecar.runner import Sidecar
        from sidecar.traffic import generated_items

        async def main():
            cfg = make_config(os.environ["BOOTSTRAP"], control={"enabled": False})
            await create_topics(cfg)
            await produce(cfg, generated_items(200, seed=1))
            sidecar = Sidecar(cfg)
            assert sidecar.tracer is None
            task = asyncio.create_task(sidecar.run())
            await wait_until(lambda: sidecar.processed >= 200, timeout_s=60)
            sidecar.request_stop()
            await task
            sidecar.close_models()
            print("processed", sidecar.processed)
            print("otel", sorted(m for m in sys.modules if m.startswith("opentelemetry")))

        asyncio.run(main())
        """,
        env={"BOOTSTRAP": bootstrap},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "processed 200" in out.stdout
    assert "otel []" in out.stdout


@pytest.mark.parametrize("blocked", ["opentelemetry", "opentelemetry.exporter"])
def test_on_without_the_package_is_a_config_error(blocked: str, tmp_path: Path) -> None:
    """Simulated by blocking the import: the constructor and `sidecar run` say what to do."""
    from kafka_helpers import write_toml

    path = write_toml(make_config("127.0.0.1:1", tracing={"enabled": True}), tmp_path / "c.toml")
    out = run_python(
        f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if not installed
        from kafka_helpers import make_config
        from sidecar.errors import ConfigError
        from sidecar.runner import Sidecar
        try:
            Sidecar(make_config("127.0.0.1:1", tracing={{"enabled": True}}))
        except ConfigError as exc:
            print("ConfigError:", exc)
        from sidecar.cli import main
        sys.exit(main(["run", "--config", {str(path)!r}, "--workers", "1"]))
        """
    )
    assert "ConfigError:" in out.stdout, out.stderr[-3000:]
    assert "pip install 'sidecar[otel]'" in out.stdout
    assert blocked in out.stdout
    assert out.returncode != 0
    assert "pip install 'sidecar[otel]'" in out.stderr


def test_check_tracing() -> None:
    check_tracing(make_config("unused:9092").tracing)  # off: nothing to check
    check_tracing(make_config("unused:9092", tracing={"enabled": True}).tracing)  # installed


def test_a_failing_tracer_never_stops_the_data_path(caplog: pytest.LogCaptureFixture) -> None:
    from sidecar.routing import Mode, RoutingPolicy

    caplog.set_level("DEBUG", logger="sidecar.tracing.spans")
    cfg = make_config("unused:9092")
    tracer, exporter = in_memory(cfg)
    policy = RoutingPolicy(rollout="r", mode=Mode.SHADOW)
    assert tracer.batch({}, [object()], policy, False) is None  # a record without headers

    class Broken:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter gone")

    trace = tracer.batch({}, [], policy, False)
    assert trace is not None
    tracer.tracer = Broken()  # type: ignore[assignment]
    trace.committed()
    tracer.command(object(), 0)
    assert not exporter.get_finished_spans()
    assert "making spans failed" in caplog.text


def test_otlp_export_reaches_a_collector() -> None:
    """Spans made from the config go over OTLP/HTTP to ``<endpoint>/v1/traces`` (a local
    stand-in collector decodes them)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from sidecar.routing import Mode, RoutingPolicy

    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = make_config(
            "unused:9092", tracing={"enabled": True, "endpoint": endpoint, "service_name": "t"}
        )
        tracer = new_tracer(cfg, "inst-1")
        assert tracer is not None
        policy = RoutingPolicy(rollout="fraud-v2", mode=Mode.SHADOW)
        recs = [Rec(b"{}", offset=7, headers=(("traceparent", parent_of(3)),))]
        trace = tracer.batch({}, recs, policy, False)
        assert trace is not None
        trace.committed()
        tracer.flush()
    finally:
        server.shutdown()
    assert received and all(path == "/v1/traces" for path, _, _ in received)
    assert all(kind == "application/x-protobuf" for _, kind, _ in received)
    spans = []
    for _, _, body in received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert service["service.name"] == "t"
            assert service["service.instance.id"] == "inst-1"
            for scope in resource_spans.scope_spans:
                spans.extend(scope.spans)
    assert [s.name for s in spans] == ["sidecar.batch"]
    assert [link.trace_id.hex() for link in spans[0].links] == [trace_id(3)]
