"""The ``WindowReport`` JSON contract: one per closed window, keyed by rollout on the reports topic.

All statistics are :class:`~sidecar.aggregate.stats.Figure` structs with an explicit status, so
a consumer never mistakes "not enough data" for "no difference".
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ..contracts import OUTPUT_SCHEMA_VERSION
from .kinds import LabelReport, RankingReport, RegressionReport
from .paired import PairedFailures, PairedLatency
from .stats import Figure, PsiBand, insufficient

REPORT_SCHEMA_VERSION = OUTPUT_SCHEMA_VERSION


class OffsetRange(msgspec.Struct, frozen=True, kw_only=True):
    """First and last comparison-topic offsets aggregated from one partition (evidence)."""

    partition: int
    first: int
    last: int


class LatencyReport(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    missing: int
    p50: Figure
    p95: Figure
    p99: Figure


class DriftReport(msgspec.Struct, frozen=True, kw_only=True):
    """Distribution shift of scores: PSI (+ band), Jensen-Shannon distance, binned KS."""

    psi: Figure
    psi_band: PsiBand | None
    js_distance: Figure
    ks: Figure


class ArmReport(msgspec.Struct, frozen=True, kw_only=True):
    """One model's figures over the window."""

    model: str
    version: str
    scored: int
    score_nan: int
    score_missing: int
    decided: int
    errors: dict[str, int]
    error_rate: Figure
    decision_rate: Figure
    latency: LatencyReport
    drift_vs_reference: DriftReport
    reference_window_start_ms: int | None
    #: Share of records whose score was NaN/infinite or otherwise invalid (error kind
    #: ``invalid_output``). Absent from reports of older aggregators.
    nan_rate: Figure = msgspec.field(default_factory=lambda: insufficient(0, "not_reported"))


class PairedReport(msgspec.Struct, frozen=True, kw_only=True):
    """Both arms' decisions on the same requests (only pairs where both decided)."""

    pairs: int
    both_yes: int
    champion_yes_candidate_no: int
    champion_no_candidate_yes: int
    both_no: int
    champion_decision_rate: Figure
    candidate_decision_rate: Figure
    decision_rate_diff: Figure
    decision_rate_ratio: Figure
    flip_yes_to_no: Figure
    flip_no_to_yes: Figure
    mcnemar: Figure


class ReportCounts(msgspec.Struct, frozen=True, kw_only=True):
    records: int
    duplicates: int
    late: int
    served_champion: int
    served_candidate: int
    served_none: int
    dedupe_false_positive_rate: float
    #: Records with at least one feature outside a manifest's range (``out_of_range``).
    out_of_range: int = 0
    #: Per feature, records where it was out of range.
    out_of_range_features: dict[str, int] = {}
    #: Records decided under a policy mode where the champion decides everything
    #: (``shadow``, ``rolled_back``) ...
    champion_decides: int = 0
    #: ... and of those, the ones the candidate decided: the champion failed and
    #: ``rollout.champion_failure = "fallback_candidate"`` let the unpromoted candidate decide.
    candidate_fallbacks: int = 0


#: Why a window was closed: its watermark passed (the normal case), too many windows were open
#: (``aggregate.max_open_windows``; later records of it count as late), a replay ended, or (a
#: rollout shared by several aggregators) not every partition reported within
#: ``aggregate.merge_timeout_ms`` (see ``partitions_missing``).
ClosedBy = Literal["watermark", "capacity", "flush", "merge_timeout"]


class WindowReport(msgspec.Struct, frozen=True, kw_only=True):
    """Everything known about one rollout's champion/candidate pair over one event-time window."""

    rollout: str
    window_start_ms: int
    window_end_ms: int
    champion: ArmReport
    candidate: ArmReport
    counts: ReportCounts
    paired: PairedReport
    drift_candidate_vs_champion: DriftReport
    latency_p99_ratio: Figure
    min_ts_ms: int | None
    max_ts_ms: int | None
    offsets: list[OffsetRange]
    emitted_at_ms: int
    #: Share of records with a feature outside a manifest's range: a data-quality signal
    #: (absent from reports of older aggregators: insufficient data).
    out_of_range_rate: Figure = msgspec.field(
        default_factory=lambda: insufficient(0, "not_reported")
    )
    #: ``watermark`` unless the window was closed early (then it may be missing records).
    closed_by: ClosedBy = "watermark"
    #: Comparison partitions whose share of the window is missing (merge timeout only).
    partitions_missing: list[int] = []
    #: Lowest and highest ``policy_epoch`` of the window's records, and the ``policy_mode`` of
    #: the highest: the routing policy the window ended under (a window may straddle a control
    #: command; both arms score every request in every mode, so the paired figures hold
    #: across it). None in reports of older aggregators.
    policy_epoch_min: int | None = None
    policy_epoch_max: int | None = None
    policy_mode: str | None = None
    #: Records per ``policy_mode``.
    policy_modes: dict[str, int] = {}
    #: ``counts.candidate_fallbacks / counts.champion_decides`` (Wilson interval): how often
    #: the candidate decided while it was not meant to decide anything.
    champion_fallback_rate: Figure = msgspec.field(
        default_factory=lambda: insufficient(0, "not_reported")
    )
    #: Failures on the same requests, host problems left out (see ``paired``).
    failures: PairedFailures | None = None
    #: Latency over the same batches, compared batch by batch (see ``paired``).
    latency_paired: PairedLatency | None = None
    schema_version: str = REPORT_SCHEMA_VERSION
    #: Non-binary models (see ``sidecar.aggregate.kinds``): both arms' rankings, labels
    #: (multiclass, regression bands) and regression values on the same requests; absent
    #: when no record of the window had them.
    ranking: RankingReport | None = None
    labels: LabelReport | None = None
    regression: RegressionReport | None = None


def figure_of(report: WindowReport, name: str) -> Figure:
    """Look up a figure by short name (see ``FIGURES``) or dotted path (``paired.mcnemar``)."""
    getter = FIGURES.get(name)
    if getter is not None:
        return getter(report)
    obj: object = report
    for part in name.split("."):
        if obj is None:  # an optional part older aggregators did not report
            return insufficient(0, "not_reported")
        if not hasattr(obj, part):
            raise KeyError(f"unknown figure {name!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Figure):
        raise KeyError(f"{name!r} is not a figure")
    return obj


def _p_value(f: Figure) -> Figure:
    if f.p_value is None:
        return f
    return Figure(value=f.p_value, n=f.n, status=f.status, reason=f.reason)


class _Getter(msgspec.Struct, frozen=True):
    path: str
    p_value: bool = False

    def __call__(self, report: WindowReport) -> Figure:
        obj: object = report
        for part in self.path.split("."):
            if obj is None:  # an optional part older aggregators did not report
                return insufficient(0, "not_reported")
            obj = getattr(obj, part)
        assert isinstance(obj, Figure)
        return _p_value(obj) if self.p_value else obj


#: Short names for the figures guards usually watch.
FIGURES: dict[str, _Getter] = {
    "decision_rate_ratio": _Getter("paired.decision_rate_ratio"),
    "decision_rate_diff": _Getter("paired.decision_rate_diff"),
    "champion_decision_rate": _Getter("paired.champion_decision_rate"),
    "candidate_decision_rate": _Getter("paired.candidate_decision_rate"),
    "flip_yes_to_no": _Getter("paired.flip_yes_to_no"),
    "flip_no_to_yes": _Getter("paired.flip_no_to_yes"),
    "mcnemar_statistic": _Getter("paired.mcnemar"),
    "mcnemar_p_value": _Getter("paired.mcnemar", p_value=True),
    "psi_candidate_vs_champion": _Getter("drift_candidate_vs_champion.psi"),
    "js_candidate_vs_champion": _Getter("drift_candidate_vs_champion.js_distance"),
    "ks_candidate_vs_champion": _Getter("drift_candidate_vs_champion.ks"),
    "psi_champion_vs_reference": _Getter("champion.drift_vs_reference.psi"),
    "psi_candidate_vs_reference": _Getter("candidate.drift_vs_reference.psi"),
    "js_candidate_vs_reference": _Getter("candidate.drift_vs_reference.js_distance"),
    "ks_candidate_vs_reference": _Getter("candidate.drift_vs_reference.ks"),
    "candidate_error_rate": _Getter("candidate.error_rate"),
    "champion_error_rate": _Getter("champion.error_rate"),
    "candidate_nan_rate": _Getter("candidate.nan_rate"),
    "champion_nan_rate": _Getter("champion.nan_rate"),
    "candidate_excess_error_rate": _Getter("failures.candidate_excess_error_rate"),
    "candidate_excess_timeout_rate": _Getter("failures.candidate_excess_timeout_rate"),
    "candidate_error_calls": _Getter("failures.candidate_error_calls"),
    "candidate_timeout_calls": _Getter("failures.candidate_timeout_calls"),
    "champion_fallback_rate": _Getter("champion_fallback_rate"),
    "candidate_latency_p99": _Getter("candidate.latency.p99"),
    "champion_latency_p99": _Getter("champion.latency.p99"),
    "latency_p99_ratio": _Getter("latency_p99_ratio"),
    "latency_p50_ratio": _Getter("latency_paired.p50_ratio"),
    "latency_p95_ratio": _Getter("latency_paired.p95_ratio"),
    "latency_slower_share": _Getter("latency_paired.slower_share"),
    "latency_slower_p_value": _Getter("latency_paired.slower_share", p_value=True),
    "latency_tail_excess": _Getter("latency_paired.tail_excess"),
    "out_of_range_rate": _Getter("out_of_range_rate"),
    # Rankings
    "overlap_at_k": _Getter("ranking.overlap"),
    "rbo": _Getter("ranking.rbo"),
    "kendall_tau": _Getter("ranking.kendall_tau"),
    "top_item_kept": _Getter("ranking.top_item_kept"),
    "top_item_dropped": _Getter("ranking.top_item_dropped"),
    "exposure_psi": _Getter("ranking.exposure_psi"),
    "exposure_js": _Getter("ranking.exposure_js"),
    "popularity_lift": _Getter("ranking.popularity_lift"),
    "coverage_ratio": _Getter("ranking.coverage_ratio"),
    "item_exposure_jump": _Getter("ranking.top_exposure_jump"),
    # Labels (multiclass, regression bands)
    "label_agreement": _Getter("labels.agreement"),
    "label_psi": _Getter("labels.psi"),
    "label_rate_ratio": _Getter("labels.rate_ratio_extreme"),
    # Regression values
    "value_mean_diff": _Getter("regression.mean_diff"),
    "value_diff_share": _Getter("regression.diff_share"),
    "value_psi": _Getter("regression.psi"),
    "value_ks": _Getter("regression.ks"),
}
