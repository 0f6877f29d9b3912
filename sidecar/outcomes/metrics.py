"""Prometheus metrics of ``sidecar outcomes``: the join's flow and state, the latest final
quality figures per rollout (with their intervals), label coverage, the reliability diagram,
the quality gate, and the quality guards."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..aggregate.guards import GuardEngine, GuardEvent
from ..aggregate.stats import Figure
from ..health import ReadinessCollector
from ..metrics import standard_collectors
from .report import ArmQuality, QualityReport, QualityVerdict

if TYPE_CHECKING:
    from ..health import HealthServer, HealthState

#: Per-arm figures exported as ``sidecar_outcomes_quality{metric}`` (report field names).
ARM_METRICS = (
    "auc",
    "average_precision",
    "log_loss",
    "brier",
    "calibration_error",
    "precision",
    "recall",
    "f1",
    "accuracy",
    "mean_cost",
)
#: Differences exported as ``sidecar_outcomes_quality_diff{metric,bound}``.
DIFF_METRICS = ("auc", "average_precision", "log_loss", "brier", "cost", "accuracy", "recall", "f1")


def _v(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else math.nan


def _ok(fig: Figure) -> tuple[float, float, float]:
    if not fig.ok:
        return math.nan, math.nan, math.nan
    return _v(fig.value), _v(fig.lo), _v(fig.hi)


class OutcomesMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or standard_collectors(CollectorRegistry())
        r = self.registry
        self.readiness = ReadinessCollector("outcomes")
        r.register(self.readiness)
        self.consumed = Counter(
            "sidecar_outcomes_records",
            "Records consumed by the join, by input (comparisons, outcomes)",
            ["input"],
            registry=r,
        )
        self.skipped = Counter(
            "sidecar_outcomes_skipped",
            "Records the join left out, by input and reason (undecodable, future, "
            "implausible_time, too_many_pairs; partials: unusable)",
            ["input", "reason"],
            registry=r,
        )
        self.joined = Counter(
            "sidecar_outcomes_joined",
            "Requests whose first outcome met their comparison",
            ["rollout"],
            registry=r,
        )
        self.late = Counter(
            "sidecar_outcomes_late_comparisons",
            "Comparisons whose quality window was already final (dropped)",
            ["rollout"],
            registry=r,
        )
        self.duplicates = Counter(
            "sidecar_outcomes_duplicate_comparisons",
            "Comparisons of a request already stored (dropped: a request counts once)",
            registry=r,
        )
        self.outside_window = Counter(
            "sidecar_outcomes_outside_label_window",
            "Outcomes that happened after their request's label window (ignored)",
            registry=r,
        )
        self.routed = Counter(
            "sidecar_outcomes_routed",
            "Outcome records the router forwarded to the join's tasks",
            registry=r,
        )
        self.dead_letters = Counter(
            "sidecar_outcomes_dead_letters",
            "Outcome records dead-lettered by the router, by kind",
            ["kind"],
            registry=r,
        )
        self.stored = Gauge(
            "sidecar_outcomes_stored_requests",
            "Requests held in the stores, waiting for their windows to become final",
            registry=r,
        )
        self.orphans = Gauge(
            "sidecar_outcomes_unmatched_outcomes",
            "Request ids holding outcomes that arrived before a comparison (kept until no "
            "comparison could still need them)",
            registry=r,
        )
        self.open_windows = Gauge(
            "sidecar_outcomes_open_windows", "Quality windows not final yet", registry=r
        )
        self.stream_time = Gauge(
            "sidecar_outcomes_stream_time_seconds",
            "Largest event time applied (the clock that makes windows final), Unix time",
            registry=r,
        )
        self.changelog_records = Counter(
            "sidecar_outcomes_changelog_records",
            "Records written to the changelog, by kind (input, final, expire, retire)",
            ["kind"],
            registry=r,
        )
        self.restore_seconds = Gauge(
            "sidecar_outcomes_restore_seconds",
            "Duration of the last restore of a task from its changelog",
            registry=r,
        )
        self.partials = Counter(
            "sidecar_outcomes_partials",
            "Quality partials sent to the merge stage (shared rollouts)",
            registry=r,
        )
        self.restored_records = Counter(
            "sidecar_outcomes_restored_records",
            "Changelog records replayed into stores at restore",
            registry=r,
        )
        self.reports = Counter(
            "sidecar_outcomes_reports",
            "Quality reports published, by status",
            ["rollout", "status"],
            registry=r,
        )
        self.quality = Gauge(
            "sidecar_outcomes_quality",
            "Latest final window's figure per arm (NaN: too little data); bound: value, lo, hi",
            ["rollout", "arm", "metric", "bound"],
            registry=r,
        )
        self.quality_diff = Gauge(
            "sidecar_outcomes_quality_diff",
            "Latest final window's candidate minus champion difference, with its 95% interval",
            ["rollout", "metric", "bound"],
            registry=r,
        )
        self.coverage = Gauge(
            "sidecar_outcomes_label_coverage",
            "Share of judgeable requests with an outcome in the latest report, by status",
            ["rollout", "status"],
            registry=r,
        )
        self.judged = Gauge(
            "sidecar_outcomes_judged_pairs",
            "Judged pairs of the latest final window",
            ["rollout"],
            registry=r,
        )
        self.window_end = Gauge(
            "sidecar_outcomes_final_window_end_timestamp_seconds",
            "Event-time end of the latest final window (Unix time)",
            ["rollout"],
            registry=r,
        )
        self.reliability = Gauge(
            "sidecar_outcomes_reliability",
            "Reliability diagram of the latest final window: per score bin (its upper edge), "
            "the mean score (predicted) and the observed positive rate (observed)",
            ["rollout", "arm", "bin", "kind"],
            registry=r,
        )
        self.gate = Gauge(
            "sidecar_outcomes_gate_met",
            "1 when the rollout's latest verdict meets its non-inferiority requirement",
            ["rollout"],
            registry=r,
        )
        self.gate_pairs = Gauge(
            "sidecar_outcomes_verdict_judged_pairs",
            "Judged pairs pooled in the rollout's latest verdict",
            ["rollout"],
            registry=r,
        )
        self.guard_active = Gauge(
            "sidecar_outcomes_guard_active",
            "1 while a quality guard rule is in breach",
            ["rollout", "rule"],
            registry=r,
        )
        self.guard_events = Counter(
            "sidecar_outcomes_guard_events",
            "Quality guard events (fired/cleared) by rule and action",
            ["rollout", "rule", "action", "kind"],
            registry=r,
        )
        self.commands = Counter(
            "sidecar_outcomes_commands",
            "Control commands from quality guards: published (or dry_run)",
            ["rollout", "action", "outcome"],
            registry=r,
        )

    def serve(
        self, port: int, host: str = "127.0.0.1", health: HealthState | None = None
    ) -> HealthServer | None:
        from ..health import HealthState, serve

        self.readiness.health = health = health or HealthState("outcomes")
        return serve(self.registry, health, port, host, setting="outcomes.metrics_port")

    def observe_report(self, report: QualityReport, guards: GuardEngine) -> None:
        rollout = report.rollout
        self.reports.labels(rollout, report.status).inc()
        self.coverage.labels(rollout, report.status).set(_v(report.label_coverage.value))
        if report.status != "final":
            return
        for arm_name, arm in (("champion", report.champion), ("candidate", report.candidate)):
            self._arm(rollout, arm_name, arm)
        for metric in DIFF_METRICS:
            value, lo, hi = _ok(getattr(report.diff, metric))
            for bound, x in (("value", value), ("lo", lo), ("hi", hi)):
                self.quality_diff.labels(rollout, metric, bound).set(x)
        self.judged.labels(rollout).set(report.counts.records)
        self.window_end.labels(rollout).set(report.window_end_ms / 1000)
        active = set(guards.active(rollout))
        for rule in guards.rules:
            self.guard_active.labels(rollout, rule.name).set(int(rule.name in active))

    def _arm(self, rollout: str, name: str, arm: ArmQuality) -> None:
        for metric in ARM_METRICS:
            value, lo, hi = _ok(getattr(arm, metric))
            for bound, x in (("value", value), ("lo", lo), ("hi", hi)):
                self.quality.labels(rollout, name, metric, bound).set(x)
        for b in arm.reliability:
            edge = f"{b.hi:.2f}"
            self.reliability.labels(rollout, name, edge, "predicted").set(_v(b.mean_predicted))
            self.reliability.labels(rollout, name, edge, "observed").set(_v(b.observed_rate))

    def observe_verdict(self, verdict: QualityVerdict) -> None:
        self.gate.labels(verdict.rollout).set(int(verdict.gate.ok))
        self.gate_pairs.labels(verdict.rollout).set(verdict.judged_pairs)

    def forget_rollout(self, rollout: str) -> int:
        """Remove every series labelled with ``rollout`` (its last rollout pair was retired:
        a stage that lives for months must not export the figures of rollouts long gone).
        Returns how many series went."""
        removed = 0
        for metric, names in (
            (self.joined, ("rollout",)),
            (self.late, ("rollout",)),
            (self.reports, ("rollout", "status")),
            (self.quality, ("rollout", "arm", "metric", "bound")),
            (self.quality_diff, ("rollout", "metric", "bound")),
            (self.coverage, ("rollout", "status")),
            (self.judged, ("rollout",)),
            (self.window_end, ("rollout",)),
            (self.reliability, ("rollout", "arm", "bin", "kind")),
            (self.gate, ("rollout",)),
            (self.gate_pairs, ("rollout",)),
            (self.guard_active, ("rollout", "rule")),
            (self.guard_events, ("rollout", "rule", "action", "kind")),
            (self.commands, ("rollout", "action", "outcome")),
        ):
            series: set[tuple[str, ...]] = {
                tuple(sample.labels[n] for n in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("rollout") == rollout
            }
            for labels in series:
                metric.remove(*labels)
            removed += len(series)
        return removed

    def observe_event(self, event: GuardEvent) -> None:
        self.guard_events.labels(
            event.rollout, event.rule.name, event.rule.action, event.kind
        ).inc()


__all__ = ["ARM_METRICS", "DIFF_METRICS", "OutcomesMetrics"]
