"""Prometheus metrics of one sidecar process. Updated once per batch, never per record.

Units are Prometheus' base units (seconds); every registry also carries the standard
``process_*``, ``python_gc_*`` and ``python_info`` series (:func:`standard_collectors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from .health import ReadinessCollector
from .pipeline import BatchResult
from .routing import Mode, RoutingPolicy

if TYPE_CHECKING:
    from .health import HealthServer, HealthState
    from .progress import PartitionLag

#: Seconds: 0.5 ms to 5 s.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


def standard_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    """Register the collectors of prometheus_client's default registry on ``registry``:
    ``process_*`` (CPU, memory, open files), ``python_gc_*`` and ``python_info``.

    Our registries are custom (several sidecars and an aggregator share a process in the demo
    and the tests), so the defaults must be added by hand. The process collector reads
    ``/proc`` only when scraped; without ``/proc`` it exports nothing.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or standard_collectors(CollectorRegistry())
        r = self.registry
        self.readiness = ReadinessCollector("sidecar")
        r.register(self.readiness)
        self.consumed = Counter(
            "sidecar_records_consumed", "Request records consumed", ["topic"], registry=r
        )
        self.decisions = Counter(
            "sidecar_decisions",
            "Decisions produced, by the arm that decided (fallbacks included)",
            ["rollout", "arm", "model", "version"],
            registry=r,
        )
        self.comparisons = Counter(
            "sidecar_comparisons", "Comparison records produced", ["rollout"], registry=r
        )
        self.dead_letters = Counter(
            "sidecar_dead_letters", "Records sent to the dead-letter topic", ["kind"], registry=r
        )
        self.model_latency = Histogram(
            "sidecar_model_batch_latency_seconds",
            "Wall time of one model call on one batch",
            ["arm", "model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_errors = Counter(
            "sidecar_model_errors",
            "Records a model failed on, by error kind (timeout, exception, invalid_output...)",
            ["arm", "model", "version", "kind"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sidecar_batch_records",
            "Records per consumed batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_records",
            "Consumed records whose outputs are not yet acknowledged",
            registry=r,
        )
        self.policy_epoch = Gauge(
            "sidecar_policy_epoch", "Epoch of the routing policy in force", ["rollout"], registry=r
        )
        self.policy_mode = Gauge(
            "sidecar_policy_mode",
            "1 for the routing mode in force, 0 for the others",
            ["rollout", "mode"],
            registry=r,
        )
        self.canary_share = Gauge(
            "sidecar_candidate_share_bp",
            "Share of buckets the candidate decides, in basis points",
            ["rollout"],
            registry=r,
        )
        self.commits = Counter(
            "sidecar_offset_commits", "Offset commits after acknowledged outputs", registry=r
        )
        self.produce_retries = Counter(
            "sidecar_produce_retries", "Output batches sent again after a failure", registry=r
        )
        self.candidate_shed = Counter(
            "sidecar_candidate_shed_records",
            "Records the candidate was not asked to score because its lane was full "
            "(pipeline.candidate_backlog batches behind): the champion decided, the "
            "comparison says shed",
            registry=r,
        )
        self.champion_fallbacks = Counter(
            "sidecar_champion_fallbacks",
            "Records the policy gave the champion but the candidate decided, because the "
            "champion failed (rollout.champion_failure = fallback_candidate)",
            ["rollout"],
            registry=r,
        )
        self.model_health = Gauge(
            "sidecar_model_health",
            "Circuit breaker of a model: 0 closed (healthy), 1 half-open (probing), 2 open",
            ["arm", "model", "version"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sidecar_consumer_lag_records",
            "Records of the requests topic behind this instance's position on its assigned "
            "partitions (high watermark of the last fetch minus position; sampled every few "
            "seconds by `sidecar run`)",
            ["topic"],
            registry=r,
        )
        self._lag_labels: set[tuple[str, str]] = set()
        self.partition_lag_records = Gauge(
            "sidecar_partition_lag_records",
            "Records of one assigned partition of the requests topic behind this instance",
            ["topic", "partition"],
            registry=r,
        )
        self.partition_lag_seconds = Gauge(
            "sidecar_partition_lag_seconds",
            "While behind, the age of the last record consumed from the partition (0 when "
            "caught up): an upper bound on how late its next decision is",
            ["topic", "partition"],
            registry=r,
        )
        self.feature_out_of_range = Counter(
            "sidecar_feature_out_of_range",
            "Request feature values outside a model manifest's allowed range or categories",
            ["arm", "feature"],
            registry=r,
        )

    def serve(
        self, port: int, host: str = "127.0.0.1", health: HealthState | None = None
    ) -> HealthServer | None:
        """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0: off); pass the
        sidecar's ``health`` so ``/readyz`` reports it (without one it is never ready)."""
        from .health import HealthState, serve

        self.readiness.health = health = health or HealthState("sidecar")
        return serve(self.registry, health, port, host)

    def observe_lag(self, topic: str, lags: Sequence[PartitionLag]) -> None:
        """Set the lag gauges from a sample; partitions no longer assigned are removed (their
        new owner reports them)."""
        if all(x.records is not None for x in lags):
            self.consumer_lag.labels(topic).set(sum(x.records or 0 for x in lags))
        current = set()
        for x in lags:
            labels = (topic, str(x.partition))
            current.add(labels)
            if x.records is not None:
                self.partition_lag_records.labels(*labels).set(x.records)
            if x.seconds is not None:
                self.partition_lag_seconds.labels(*labels).set(x.seconds)
        for labels in self._lag_labels - current:
            for gauge in (self.partition_lag_records, self.partition_lag_seconds):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._lag_labels = current

    def observe_policy(self, policy: RoutingPolicy) -> None:
        self.policy_epoch.labels(policy.rollout).set(policy.epoch)
        for mode in Mode:
            self.policy_mode.labels(policy.rollout, mode.value).set(int(mode is policy.mode))
        self.canary_share.labels(policy.rollout).set(policy.candidate_share_bp)

    def observe_batch(
        self, topic: str, consumed: int, result: BatchResult, names: dict[str, tuple[str, str]]
    ) -> None:
        """``names`` maps arm -> (model, version)."""
        self.consumed.labels(topic).inc(consumed)
        self.batch_size.observe(consumed)
        rollout = result.policy.rollout if result.policy else ""
        if result.champion_fallbacks:
            self.champion_fallbacks.labels(rollout).inc(result.champion_fallbacks)
        for label, n in result.decided_by.items():
            arm = "champion" if label == "default" else label
            if arm not in names:
                continue
            model, version = names[arm]
            self.decisions.labels(rollout, label, model, version).inc(n)
        if len(result.comparisons):
            self.comparisons.labels(rollout).inc(len(result.comparisons))
        for kind, n in result.dead_letter_kinds.items():
            self.dead_letters.labels(kind).inc(n)
        for (arm, feature), n in result.out_of_range.items():
            self.feature_out_of_range.labels(arm, feature).inc(n)
        for arm, scores in (("champion", result.champion), ("candidate", result.candidate)):
            if scores is None or arm not in names:
                continue
            model, version = names[arm]
            if scores.error is not None and scores.error.kind in ("skipped", "unavailable"):
                continue
            self.model_latency.labels(arm, model, version).observe(scores.latency_ms / 1000)
            failed = int((~scores.valid).sum())
            if failed:
                error = scores.error or scores.record_error
                kind = error.kind if error else "unknown"
                self.model_errors.labels(arm, model, version, kind).inc(failed)
