"""The ``[aggregate]`` config section: windows, guard rules and where reports/commands go.

Kept here (not in ``sidecar.config``) so the aggregator owns its knobs; ``SidecarConfig`` only
holds one ``aggregate`` field of this type. Importing it pulls in numpy via the package, which
the sidecar needs anyway.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .config import AggregatorConfig
from .guards import GuardRule, default_rules
from .kinds import RBO_P
from .paired import (
    BATCH_SAMPLE,
    HOST_SHARE,
    LATENCY_MARGIN,
    LATENCY_MIN_DIFF_MS,
    MIN_LATENCY_BATCHES,
)

Meta = msgspec.Meta


class AggregateSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``sidecar aggregate`` / ``sidecar replay`` settings (times in milliseconds)."""

    #: Closed ``WindowReport``s (JSON), keyed by rollout.
    reports_topic: str = "inference.reports"
    #: Consumer group of the aggregator on the comparisons topic.
    group_id: str = "sidecar-aggregator"
    #: Log what would be published (reports, commands) and publish nothing.
    dry_run: bool = False
    #: The aggregator's private key (role ``guard``): signs rollback, pause and verdict
    #: commands (``sidecar ctl keygen --role guard``). Needed unless ``dry_run``.
    signing_key_file: str | None = None
    #: Publish guard verdicts (signed ``verdict`` commands with ``guards_ok``) on the control
    #: topic, so ramps advance only while the guards say go (``control.ramp_gate``).
    verdicts: bool = True
    #: A window with fewer compared records gives no verdict (neither go nor stop).
    verdict_min_records: Annotated[int, Meta(ge=1)] = 200
    #: A verdict is published when it changes, when the policy epoch moves (a ramp step), and
    #: at least this often while it stays the same.
    verdict_interval_s: Annotated[float, Meta(gt=0)] = 60.0
    #: Prometheus port of ``sidecar aggregate`` (0 disables); host is ``metrics.host``.
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 9101
    #: When set, late comparison records (their window already closed) are copied here as-is.
    late_topic: str | None = None
    window_ms: Annotated[int, Meta(gt=0)] = 60_000
    #: Hop of hopping windows; unset for tumbling windows.
    hop_ms: Annotated[int, Meta(gt=0)] | None = None
    grace_ms: Annotated[int, Meta(ge=0)] = 0
    allowed_lateness_ms: Annotated[int, Meta(ge=0)] = 5_000
    #: Wall-clock time after which a silent partition stops holding the watermark back.
    idle_timeout_ms: Annotated[int, Meta(gt=0)] = 30_000
    #: Comparisons whose event time is further than this ahead of the aggregator's clock are
    #: dead-lettered, not aggregated: one record dated in the year 9999 would otherwise move
    #: the watermark there and make every later record late (no windows, no guards).
    max_future_ms: Annotated[int, Meta(gt=0)] = 300_000
    #: Minimum compared pairs for paired, rate and drift figures in a report.
    min_pairs: Annotated[int, Meta(ge=1)] = 200
    min_latency_count: Annotated[int, Meta(ge=1)] = 50
    #: Paired latency (guards ``latency_median``/``latency_tail``): a batch counts as
    #: "candidate slower" when the candidate took more than this many times the champion's
    #: time on the same batch ...
    latency_margin: Annotated[float, Meta(ge=1.0)] = LATENCY_MARGIN
    #: ... and at least this many milliseconds more.
    latency_min_diff_ms: Annotated[float, Meta(ge=0.0)] = LATENCY_MIN_DIFF_MS
    #: Fewest distinct batches (model calls) in a window for the paired latency figures.
    min_latency_batches: Annotated[int, Meta(ge=1)] = MIN_LATENCY_BATCHES
    #: Distinct batches kept per window for them (a uniform sample, mergeable).
    latency_batch_sample: Annotated[int, Meta(ge=16, le=65_536)] = BATCH_SAMPLE
    #: A timeout of one arm is put down to the host (not the model) when the other arm's
    #: call on the same batch took at least this share of the timed-out call's time.
    timeout_host_share: Annotated[float, Meta(gt=0.0, le=1.0)] = HOST_SHARE
    #: Ranking outputs: the persistence ``p`` of rank-biased overlap (``ranking.rbo``);
    #: 0.9 puts ~86% of the weight on the top 10 ranks.
    rbo_p: Annotated[float, Meta(gt=0.0, lt=1.0)] = RBO_P
    #: Regression outputs: a pair counts as differing (``regression.diff_share``) when
    #: ``|candidate - champion|`` exceeds this plus ``regression_tolerance_rel`` x
    #: ``|champion|``.
    regression_tolerance_abs: Annotated[float, Meta(ge=0.0)] = 0.0
    regression_tolerance_rel: Annotated[float, Meta(ge=0.0)] = 0.1
    #: Helper processes that decode comparisons while the loop fetches (0: decode in the
    #: loop). One is worth ~+20% on two cores; more help only with more idle cores.
    decode_processes: Annotated[int, Meta(ge=0, le=16)] = 1
    #: Per-partition window aggregates when ``topics.comparisons_key = "routing_key"``
    #: (keyed by rollout; the merge stage reads them back).
    partials_topic: str = "inference.window-partials"
    #: Merge stage: report a window without the partitions that have not sent their partial
    #: this long after its first one (``closed_by = "merge_timeout"``).
    merge_timeout_ms: Annotated[int, Meta(gt=0)] = 10_000
    #: Most windows open at once; past it the oldest close early (``closed_by="capacity"``).
    max_open_windows: Annotated[int, Meta(ge=1)] = 1_000
    #: Most rollouts, and most rollout pairs (rollout, both models and versions: a new one at
    #: every candidate version), an aggregator takes over its life: a bound on state and
    #: metric series when something writes made-up names to the comparisons or partials
    #: topics. Records of others are dead-lettered with the reason (``rollout.name`` always
    #: keeps a slot); a restart starts the count afresh.
    max_rollouts: Annotated[int, Meta(ge=1)] = 64
    max_rollout_pairs: Annotated[int, Meta(ge=1)] = 1_024
    #: Most comparison records taken per poll.
    max_batch: Annotated[int, Meta(ge=1)] = 10_000
    fetch_timeout_ms: Annotated[int, Meta(ge=1)] = 200
    #: Offsets are committed at least this often (and after every batch that closed a window).
    commit_interval_ms: Annotated[int, Meta(ge=0)] = 1_000
    #: Guard rules (TOML ``[[aggregate.rules]]`` tables); default: ``default_rules()``.
    rules: list[GuardRule] = msgspec.field(default_factory=default_rules)

    def __post_init__(self) -> None:
        if self.hop_ms is not None and self.hop_ms > self.window_ms:
            raise ValueError("aggregate.hop_ms must not exceed aggregate.window_ms")
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("aggregate.rules: rule names must be unique")

    def aggregator_config(self) -> AggregatorConfig:
        return AggregatorConfig(
            window_ms=self.window_ms,
            hop_ms=self.hop_ms,
            grace_ms=self.grace_ms,
            allowed_lateness_ms=self.allowed_lateness_ms,
            idle_timeout_ms=self.idle_timeout_ms,
            min_pairs=self.min_pairs,
            min_latency_count=self.min_latency_count,
            max_open_windows=self.max_open_windows,
            latency_margin=self.latency_margin,
            latency_min_diff_ms=self.latency_min_diff_ms,
            min_latency_batches=self.min_latency_batches,
            latency_batch_sample=self.latency_batch_sample,
            timeout_host_share=self.timeout_host_share,
            rbo_p=self.rbo_p,
            regression_tolerance_abs=self.regression_tolerance_abs,
            regression_tolerance_rel=self.regression_tolerance_rel,
        )


__all__ = ["AggregateSettings"]
