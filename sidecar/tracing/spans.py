"""The OpenTelemetry side of :mod:`sidecar.tracing` (imported only when tracing is on).

A batch is traced with timestamps taken as it goes (``time.time_ns``, a few per batch) and
its spans are made when it is committed, all at once, with those start and end times:

* ``sidecar.batch`` (kind CONSUMER): from the moment the batch was consumed until its offsets
  were committed. Linked (span links) to the trace context of the first ``max_links``
  distinct requests in it that carry a valid ``traceparent``: a batch has many parents, so
  links, not a parent, connect it to them (the OpenTelemetry messaging conventions).
* ``sidecar.champion``: consumed -> the champion's decisions ready (decode, validate, route,
  score the champion, encode).
* ``sidecar.candidate``: consumed -> the candidate's part ready (it scores concurrently,
  from the start), when the batch had a candidate stage.
* ``sidecar.produce``: one per hand-over to the producer (the champion's decisions, then
  the candidate stage's outputs), until the broker acknowledged all of it.

The sidecar samples batches itself (``tracing.sample_ratio``): a batch left out costs one
random number and makes no object. The provider is the sidecar's own, never the global one
(a model's own OpenTelemetry use is left alone).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    set_span_in_context,
)

from .. import __version__
from ..config import SidecarConfig
from ..kafka import Delivery
from ..models.base import BatchScores
from ..pipeline import BatchResult, StagedBatch
from ..routing import RoutingPolicy
from ..tracecontext import trace_headers
from ..untrusted import clip, printable

log = logging.getLogger(__name__)

Attributes = dict[str, Any]
#: Attribute values an operator's text may put in a span are cut to this.
_TEXT_LIMIT = 200


def exporter_for(config: SidecarConfig) -> SpanExporter | None:
    """The span exporter ``tracing.exporter`` names (None: ``none``)."""
    settings = config.tracing
    if settings.exporter == "none":
        return None
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if settings.endpoint:
        return OTLPSpanExporter(endpoint=settings.endpoint.rstrip("/") + "/v1/traces")
    return OTLPSpanExporter()  # the OTEL_EXPORTER_OTLP_* variables, else localhost:4318


def provider_for(config: SidecarConfig, instance_id: str) -> TracerProvider:
    """A tracer provider of its own (not the global one): service name and instance on the
    resource, every span kept (the sidecar samples batches itself), exported in the
    background (``BatchSpanProcessor``: a thread, never the event loop)."""
    settings = config.tracing
    service = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or "sidecar"
    resource = Resource.create(
        {
            "service.name": service,
            "service.version": __version__,
            "service.instance.id": instance_id,
            "sidecar.rollout": config.rollout.name,
        }
    )
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    exporter = exporter_for(config)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class BatchTracer:
    """Starts a :class:`BatchTrace` per sampled batch and emits control-command spans."""

    def __init__(
        self,
        provider: TracerProvider,
        config: SidecarConfig,
        *,
        names: Mapping[str, tuple[str, str]],
        owns_provider: bool = False,
    ) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("sidecar", __version__)
        settings = config.tracing
        self.sample_ratio = settings.sample_ratio
        self.max_links = settings.max_links
        self._owns_provider = owns_provider
        # Constant for the life of the instance: made once.
        self.common: Attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": config.topics.requests,
            "messaging.consumer.group.name": config.kafka.group_id,
            "sidecar.rollout": config.rollout.name,
        }
        self.model_attributes: dict[str, Attributes] = {
            arm: {f"sidecar.{arm}.model": name, f"sidecar.{arm}.version": version}
            for arm, (name, version) in names.items()
        }
        for attrs in self.model_attributes.values():
            self.common.update(attrs)

    @classmethod
    def from_config(cls, config: SidecarConfig, instance_id: str) -> BatchTracer:
        models = config.models
        names = {"champion": (models.champion.name, models.champion.version)}
        if models.candidate is not None:
            names["candidate"] = (models.candidate.name, models.candidate.version)
        return cls(provider_for(config, instance_id), config, names=names, owns_provider=True)

    def batch(
        self,
        batches: Mapping[Any, Sequence[Any]],
        records: Sequence[Any],
        policy: RoutingPolicy,
        shed: bool,
    ) -> BatchTrace | None:
        """A trace for a batch just consumed (``batches``: aiokafka's ``getmany`` result),
        or None when the batch is not sampled."""
        if self.sample_ratio < 1.0 and random.random() >= self.sample_ratio:
            return None
        try:
            return BatchTrace(self, batches, records, policy, shed)
        except Exception as exc:  # never a reason not to serve the batch
            _failed(exc)
            return None

    def links(self, records: Iterable[Any]) -> tuple[list[Link], bool]:
        """Links to the traces of the first ``max_links`` distinct valid ``traceparent``
        headers of ``records``, and whether there were more (scanning stops there)."""
        links: list[Link] = []
        if not self.max_links:
            return links, False
        seen: set[bytes] = set()
        for record in records:
            headers = record.headers
            if not headers:
                continue
            found = trace_headers(headers)
            if found is None:
                continue
            parent = found[0][1]
            if parent in seen:
                continue
            if len(links) >= self.max_links:
                return links, True
            seen.add(parent)
            _version, trace_id, span_id, flags = parent.split(b"-")[:4]
            context = SpanContext(
                int(trace_id, 16),
                int(span_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(int(flags, 16) & 0xFF),
            )
            links.append(
                Link(
                    context,
                    {
                        "messaging.destination.partition.id": str(record.partition),
                        "messaging.kafka.offset": record.offset,
                    },
                )
            )
        return links, False

    def command(self, outcome: object, started_ns: int) -> None:
        """A span for one control record handled (applied, noted, rejected, duplicate);
        never raises."""
        try:
            self._command(outcome, started_ns)
        except Exception as exc:
            _failed(exc)

    def _command(self, outcome: object, started_ns: int) -> None:
        from ..control.records import audit_record

        audit = audit_record(outcome, instance_id="", applied_at_ms=0)
        attrs: Attributes = {
            "sidecar.rollout": self.common["sidecar.rollout"],
            "sidecar.control.outcome": audit.outcome,
        }
        for name, value in (
            ("action", audit.action),
            ("command_id", audit.command_id),
            ("issued_by", audit.issued_by),
            ("reject_reason", audit.reason),
        ):
            if value is not None:  # signed by a trusted key or not: untrusted text
                attrs[f"sidecar.control.{name}"] = printable(clip(str(value), _TEXT_LIMIT))
        for name, number in (("from_epoch", audit.from_epoch), ("to_epoch", audit.to_epoch)):
            if number is not None:
                attrs[f"sidecar.control.{name}"] = number
        if audit.mode is not None:
            attrs["sidecar.policy.mode"] = audit.mode
        span = self.tracer.start_span(
            "sidecar.control",
            context=Context(),
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            start_time=started_ns,
        )
        span.end()

    def flush(self, timeout_s: float = 5.0) -> None:
        """Export what is buffered (at the end of ``run``); shut the provider down when it is
        this tracer's own."""
        self.provider.force_flush(int(timeout_s * 1000))
        if self._owns_provider:
            self.provider.shutdown()


class BatchTrace:
    """Timestamps and results of one batch as it goes; its spans are made in
    :meth:`committed` (the runner calls one method per step, each a few attribute sets)."""

    __slots__ = (
        "_acks",
        "_early",
        "_early_ns",
        "_late",
        "_late_ns",
        "_pending",
        "_produce",
        "_tracer",
        "attributes",
        "links",
        "start_ns",
    )

    def __init__(
        self,
        tracer: BatchTracer,
        batches: Mapping[Any, Sequence[Any]],
        records: Sequence[Any],
        policy: RoutingPolicy,
        shed: bool,
    ) -> None:
        self.start_ns = time.time_ns()
        self._tracer = tracer
        partitions = sorted(tp.partition for tp in batches)
        self.links, capped = tracer.links(records)
        self.attributes: Attributes = {
            **tracer.common,
            "messaging.batch.message_count": len(records),
            "sidecar.partitions": partitions,
            "sidecar.offsets": [
                f"{tp.partition}:{part[0].offset}-{part[-1].offset}"
                for tp, part in sorted(batches.items(), key=lambda item: item[0].partition)
                if part
            ],
            "sidecar.policy.epoch": policy.epoch,
            "sidecar.policy.mode": policy.mode.value,
            "sidecar.policy.canary_share_bp": policy.canary_share_bp,
            "sidecar.candidate.shed": shed,
            "sidecar.trace_links": len(self.links),
            "sidecar.trace_links_capped": capped,
        }
        if len(partitions) == 1:
            self.attributes["messaging.destination.partition.id"] = str(partitions[0])
        self._early: BatchResult | None = None
        self._early_ns = 0
        self._late: BatchResult | None = None
        self._late_ns = 0
        self._pending = False
        #: Hand-overs to the producer: [started, last acknowledged, outputs, failed, left].
        self._produce: list[list[int]] = []
        self._acks = 0

    # -- steps (called by the runner) ------------------------------------------------------

    def staged(self, staged: StagedBatch) -> None:
        """The champion stage is done: its decisions are about to be produced."""
        self._early_ns = time.time_ns()
        self._early = staged.early
        self._pending = staged.pending is not None

    def finished(self, late: BatchResult | None) -> None:
        """The candidate stage is done (``late``: what it produces)."""
        self._late_ns = time.time_ns()
        self._late = late

    def sent(self, deliveries: Sequence[Delivery]) -> None:
        """Outputs handed to the producer; the hand-over ends when the last is acknowledged."""
        if not deliveries:  # nothing to produce at this stage: no span
            return
        started = self._late_ns if self._late_ns else self._early_ns
        entry = [started, 0, sum(len(d.indices) for d in deliveries), 0, len(deliveries)]
        self._produce.append(entry)

        def acked(future: Any) -> None:
            entry[1] = max(entry[1], time.time_ns())
            if future.cancelled() or future.exception() is not None:
                entry[3] += 1
            entry[4] -= 1

        for delivery in deliveries:
            delivery.future.add_done_callback(acked)

    def committed(self) -> None:
        """The batch's offsets are committed: make and end its spans (never raises: tracing
        must not stop the committer)."""
        try:
            self._emit(time.time_ns())
        except Exception as exc:
            _failed(exc)

    def _emit(self, end_ns: int) -> None:
        tracer = self._tracer.tracer
        attrs = self.attributes
        early, late = self._early, self._late
        results = [r for r in (early, late) if r is not None]
        decided: dict[str, int] = {}
        dead: dict[str, int] = {}
        decisions = comparisons = dead_letters = fallbacks = 0
        for result in results:
            decisions += len(result.decisions)
            comparisons += len(result.comparisons)
            dead_letters += len(result.dead_letters)
            fallbacks += result.champion_fallbacks
            for key, n in result.decided_by.items():
                decided[key] = decided.get(key, 0) + n
            for key, n in result.dead_letter_kinds.items():
                dead[key] = dead.get(key, 0) + n
        attrs["sidecar.decisions"] = decisions
        attrs["sidecar.comparisons"] = comparisons
        attrs["sidecar.dead_letters"] = dead_letters
        attrs["sidecar.champion_fallbacks"] = fallbacks
        for key, n in decided.items():
            attrs[f"sidecar.decided_by.{key}"] = n
        if dead:
            attrs["sidecar.dead_letter_kinds"] = [f"{k}={n}" for k, n in sorted(dead.items())]
        batch = tracer.start_span(
            "sidecar.batch",
            context=Context(),
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=self.links,
            start_time=self.start_ns,
        )
        parent = set_span_in_context(batch)
        if early is not None:
            span = tracer.start_span(
                "sidecar.champion",
                context=parent,
                attributes=self._scores("champion", early.champion),
                start_time=self.start_ns,
            )
            _status(span, early.champion)
            span.end(end_time=self._early_ns)
        candidate = late.candidate if late is not None else None
        if self._pending and self._late_ns:
            span = tracer.start_span(
                "sidecar.candidate",
                context=parent,
                attributes=self._scores("candidate", candidate),
                start_time=self.start_ns,
            )
            _status(span, candidate)
            span.end(end_time=self._late_ns)
        elif early is not None and early.candidate is not None:
            # Not asked (none, skipped, shed) or scored in one stage: no span of its own.
            error = early.candidate.error
            batch.set_attribute("sidecar.candidate.status", error.kind if error else "scored")
        for started, acked, outputs, failed, left in self._produce:
            span = tracer.start_span(
                "sidecar.produce",
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes={"sidecar.outputs": outputs, "sidecar.produce.failed": failed},
                start_time=started,
            )
            if failed:  # the committer sent them again (it committed only once acknowledged)
                span.set_status(Status(StatusCode.ERROR, "not acknowledged at first: sent again"))
            span.end(end_time=acked if acked and not left else end_ns)
        batch.end(end_time=end_ns)

    def _scores(self, arm: str, scores: BatchScores | None) -> Attributes:
        attrs: Attributes = dict(self._tracer.model_attributes.get(arm, {}))
        if scores is not None:
            attrs["sidecar.model.latency_ms"] = round(scores.latency_ms, 3)
            attrs[f"sidecar.{arm}.status"] = scores.error.kind if scores.error else "scored"
            if scores.record_error is not None:
                attrs["sidecar.model.record_error"] = scores.record_error.kind
        return attrs


def _status(span: Span, scores: BatchScores | None) -> None:
    error = scores.error if scores is not None else None
    if error is not None and error.kind not in ("skipped", "shed"):
        span.set_status(
            Status(StatusCode.ERROR, printable(clip(f"{error.kind}: {error.message}", _TEXT_LIMIT)))
        )


_failures = 0


def _failed(exc: Exception) -> None:
    """Making a span raised (a bug, or the SDK): logged (the first time with its traceback),
    never passed on."""
    global _failures
    _failures += 1
    if _failures == 1:
        log.error("tracing: making spans failed; the data path goes on", exc_info=exc)
    else:
        log.debug("tracing: making spans failed again: %r", exc)
