"""Prometheus metrics of ``sidecar aggregate``: the latest window's figures per rollout as
gauges (NaN while a figure has insufficient data), guard states, and throughput counters."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..health import ReadinessCollector
from ..metrics import standard_collectors
from .guards import GuardEngine, GuardEvent
from .report import FIGURES, WindowReport

if TYPE_CHECKING:
    from ..health import HealthServer, HealthState


class AggregateMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or standard_collectors(CollectorRegistry())
        r = self.registry
        self.readiness = ReadinessCollector("aggregator")
        r.register(self.readiness)
        self.figure = Gauge(
            "sidecar_aggregate_figure",
            "Latest closed window's figure (decision-rate ratio, PSI, JS, KS, error rates, "
            "p99 latencies...); NaN when the window had too little data",
            ["rollout", "figure"],
            registry=r,
        )
        self.window_end = Gauge(
            "sidecar_aggregate_window_end_timestamp_seconds",
            "Event-time end of the latest closed window (Unix time)",
            ["rollout"],
            registry=r,
        )
        self.window_records = Gauge(
            "sidecar_aggregate_window_records",
            "Records in the latest closed window",
            ["rollout"],
            registry=r,
        )
        self.guard_active = Gauge(
            "sidecar_aggregate_guard_active",
            "1 while a guard rule is in breach (fired and not yet cleared)",
            ["rollout", "rule"],
            registry=r,
        )
        self.guard_events = Counter(
            "sidecar_aggregate_guard_events",
            "Guard events (fired/cleared) by rule and action",
            ["rollout", "rule", "action", "kind"],
            registry=r,
        )
        self.commands = Counter(
            "sidecar_aggregate_commands",
            "Control commands published (or only logged, outcome=dry_run)",
            ["rollout", "action", "outcome"],
            registry=r,
        )
        self.consumed = Counter(
            "sidecar_aggregate_comparisons", "Comparison records consumed", registry=r
        )
        self.undecodable = Counter(
            "sidecar_aggregate_undecodable",
            "Comparison records that failed to decode",
            registry=r,
        )
        self.late = Counter(
            "sidecar_aggregate_late_records",
            "Records behind the watermark whose windows had all closed",
            ["rollout"],
            registry=r,
        )
        self.reports = Counter(
            "sidecar_aggregate_reports", "Window reports closed", ["rollout"], registry=r
        )
        self.closed_early = Counter(
            "sidecar_aggregate_windows_closed_early",
            "Windows closed before their watermark because too many were open",
            ["rollout"],
            registry=r,
        )
        self.guard_resets = Counter(
            "sidecar_aggregate_guard_resets",
            "Times a rollout's guard state was reset because it moved to another policy epoch "
            "(mode, share or candidate changed)",
            ["rollout"],
            registry=r,
        )
        self.fallbacks = Counter(
            "sidecar_aggregate_champion_fallbacks",
            "Records the candidate decided while the policy said the champion decides "
            "(shadow, rolled_back): the champion failed and fell back to the candidate",
            ["rollout"],
            registry=r,
        )
        self.policy_epoch = Gauge(
            "sidecar_aggregate_policy_epoch",
            "Highest policy epoch in the latest closed window's comparisons",
            ["rollout"],
            registry=r,
        )
        self.open_windows = Gauge(
            "sidecar_aggregate_open_windows", "Windows currently open", registry=r
        )

    def serve(
        self, port: int, host: str = "127.0.0.1", health: HealthState | None = None
    ) -> HealthServer | None:
        """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0: off)."""
        from ..health import HealthState, serve

        self.readiness.health = health = health or HealthState("aggregator")
        return serve(
            self.registry,
            health,
            port,
            host,
            setting="aggregate.metrics_port",
        )

    def observe_report(self, report: WindowReport, guards: GuardEngine) -> None:
        rollout = report.rollout
        for name, get in FIGURES.items():
            fig = get(report)
            value = fig.value if fig.ok and fig.value is not None else math.nan
            self.figure.labels(rollout, name).set(value)
        self.window_end.labels(rollout).set(report.window_end_ms / 1000)
        self.window_records.labels(rollout).set(report.counts.records)
        self.reports.labels(rollout).inc()
        if report.closed_by == "capacity":
            self.closed_early.labels(rollout).inc()
        if report.counts.candidate_fallbacks:
            self.fallbacks.labels(rollout).inc(report.counts.candidate_fallbacks)
        if report.policy_epoch_max is not None:
            self.policy_epoch.labels(rollout).set(report.policy_epoch_max)
        active = set(guards.active(rollout))
        for rule in guards.rules:
            self.guard_active.labels(rollout, rule.name).set(int(rule.name in active))

    def observe_event(self, event: GuardEvent) -> None:
        self.guard_events.labels(
            event.rollout, event.rule.name, event.rule.action, event.kind
        ).inc()


__all__ = ["AggregateMetrics"]
