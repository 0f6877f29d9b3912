"""The ``QualityReport`` and ``QualityVerdict`` contracts, and how they are built from an
accumulator (pure: no Kafka).

A ``QualityReport`` is one rollout pair's quality over one window of request event time:
``provisional`` while labels may still arrive (requests without an outcome follow the
rollout's ``missing`` rule as if their label windows had closed now), ``final`` once every
request of the window has had its whole label window (plus ``outcome_grace_ms``). Every report
says its label coverage (the share of judgeable requests with an outcome).

A ``QualityVerdict`` pools every final window of a rollout pair and carries, per metric, both
arms' values, the paired difference and its standard error, so a gate can apply any
non-inferiority requirement to it (:func:`sidecar.outcomes.gates.quality_gate`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import msgspec

from ..aggregate.report import OffsetRange
from ..aggregate.stats import Figure, insufficient, wilson
from ..contracts import OUTPUT_SCHEMA_VERSION
from .figures import QUALITY_FIGURE_PATHS
from .quality import ArmFigures, FloatArray, Layout, figures
from .ranking import PairedRankingQuality, RankingQualityReport

MissingRule = Literal["unlabelled", "negative"]
ReportStatus = Literal["provisional", "final"]
QualityMetric = Literal[
    "auc",
    "average_precision",
    "log_loss",
    "brier",
    "cost",
    "accuracy",
    "recall",
    "f1",
    "ndcg",
    "ctr",
    "mrr",
]
#: Whether a larger value of the metric is better (the non-inferiority test's direction).
HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "average_precision": True,
    "accuracy": True,
    "recall": True,
    "f1": True,
    "log_loss": False,
    "brier": False,
    "cost": False,
}
#: Metrics of ranking rollouts (CTR@k, NDCG@k, mean reciprocal rank; higher is better).
RANKING_METRICS = ("ndcg", "ctr", "mrr")


class PairKey(NamedTuple):
    """One rollout between two model versions: what a quality window is kept per."""

    rollout: str
    champion_model: str
    champion_version: str
    candidate_model: str
    candidate_version: str


class PairNames(msgspec.Struct, frozen=True):
    """A record's fields naming a rollout pair (changelog chunks, quality partials)."""

    rollout: str
    champion_model: str
    champion_version: str
    candidate_model: str
    candidate_version: str

    @property
    def key(self) -> PairKey:
        return PairKey(
            self.rollout,
            self.champion_model,
            self.champion_version,
            self.candidate_model,
            self.candidate_version,
        )


class ReliabilityBin(msgspec.Struct, frozen=True, kw_only=True):
    """One bin of the reliability diagram: scores in [lo, hi)."""

    lo: float
    hi: float
    count: int
    mean_predicted: float | None
    observed_rate: float | None


class ArmQuality(msgspec.Struct, frozen=True, kw_only=True):
    """One model on the window's judged requests. Precision, recall, F1 and accuracy are at the
    model's own threshold (its decisions in the comparisons); ranking and probability figures
    use its scores."""

    model: str
    version: str
    precision: Figure
    recall: Figure
    f1: Figure
    accuracy: Figure
    auc: Figure
    average_precision: Figure
    log_loss: Figure
    brier: Figure
    #: Expected calibration error over the reliability bins (weighted by their counts).
    calibration_error: Figure
    #: Mean cost of an error per judged request (``fp_cost``/``fn_cost``, weighted by the
    #: outcome's ``value`` as ``cost_value`` says), with a 95% interval.
    mean_cost: Figure
    total_cost: float
    reliability: list[ReliabilityBin]


class QualityDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Candidate minus champion on the same requests, with 95% intervals and p-values:
    DeLong's test for ROC AUC; a paired bootstrap for average precision and F1; paired means
    for log loss, Brier and cost; paired proportions for accuracy and recall (Newcombe)."""

    auc: Figure
    average_precision: Figure
    log_loss: Figure
    brier: Figure
    cost: Figure
    accuracy: Figure
    recall: Figure
    f1: Figure
    calibration_error: Figure
    #: McNemar's test on correctness: ``value`` is the statistic (chi-square, or the smaller
    #: discordant count when exact), ``p_value`` the answer.
    correctness_mcnemar: Figure


class QualityCounts(msgspec.Struct, frozen=True, kw_only=True):
    #: Judged pairs: requests with an outcome, plus those negative by the missing rule (what
    #: guard rules' ``min_pairs`` counts).
    records: int
    #: Judgeable requests of the window (both arms scored and decided).
    requests: int
    #: Requests where an arm had no score or decision (never judged).
    unscored: int
    #: Judgeable requests with an outcome (of their kind: a number for a binary request, item
    #: ids for a ranking one).
    labelled: int
    positives: int
    negatives: int
    #: Without an outcome, counted as negative (``missing = "negative"``).
    assumed_negative: int
    #: Without an outcome, left out (``missing = "unlabelled"``).
    unlabelled: int
    #: With an outcome of the other kind (not judged): an item-set label for a binary
    #: request, a numeric one for a ranking request.
    unsupported_labels: int
    #: Outcomes that happened after their request's label window (ignored).
    outside_window: int
    #: Scores outside [0, 1], clipped.
    clipped_scores: int
    #: Sum of the outcomes' ``value`` over judged requests that have one.
    value_total: float


class QualityReport(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout pair's quality over one window of request event time."""

    rollout: str
    window_start_ms: int
    window_end_ms: int
    status: ReportStatus
    champion: ArmQuality
    candidate: ArmQuality
    diff: QualityDiff
    counts: QualityCounts
    #: Share of judgeable requests with an outcome (Wilson 95% interval).
    label_coverage: Figure
    label_window_ms: int
    missing: MissingRule
    #: Stream time (max event time seen) when the report was made, and when the window is or
    #: becomes final.
    stream_time_ms: int
    final_at_ms: int
    emitted_at_ms: int
    #: Comparison-topic offsets behind the figures: not tracked per request; a quality report
    #: cites its rollout pair and window (kept so guard evidence has one shape).
    offsets: list[OffsetRange] = []
    schema_version: str = OUTPUT_SCHEMA_VERSION
    #: Ranking rollouts (both arms return item lists; outcomes name the items acted on):
    #: CTR@k, NDCG@k and MRR of both arms on the same requests with 95% intervals, the
    #: differences' intervals paired (null for binary rollouts). Its ``requests`` are the
    #: judged ranking requests (with an item-set outcome, or none under ``missing =
    #: "negative"``); the binary figures above are then insufficient data.
    ranking: RankingQualityReport | None = None
    #: A shared rollout's final window merged without some tasks' final partials (the merge
    #: timeout passed): those comparison partitions (empty: every task's share is in).
    tasks_missing: list[int] = []


class MetricEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Both arms' value of a metric, their paired difference (candidate - champion) and its
    standard error (None where there is none)."""

    champion: float | None
    candidate: float | None
    diff: float | None
    se: float | None
    higher_is_better: bool


class QualityRequirement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Non-inferiority: the candidate is at least the champion minus ``margin`` (at most plus
    ``margin`` where lower is better: log loss, Brier, cost) with one-sided ``confidence``,
    on at least ``min_pairs`` judged pairs. Ranking rollouts use ``ndcg``, ``ctr`` or
    ``mrr`` (at the rollout's ``ranking_k``; the paired difference of the same requests)."""

    metric: QualityMetric = "auc"
    margin: Annotated[float, msgspec.Meta(ge=0)] = 0.01
    confidence: Annotated[float, msgspec.Meta(ge=0.5, lt=1)] = 0.95
    min_pairs: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: A verdict emitted longer ago than this does not count (unset: any age).
    max_age_s: Annotated[float, msgspec.Meta(gt=0)] | None = None


GateCode = Literal[
    "met", "no_verdict", "wrong_models", "stale", "too_few_pairs", "insufficient_data", "inferior"
]


class GateDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a quality gate lets a ramp step (or promotion) through, and why (or why not)."""

    ok: bool
    code: GateCode
    reason: str


class QualityVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout pair's quality over every final window so far, and its own gate."""

    rollout: str
    champion_model: str
    champion_version: str
    candidate_model: str
    candidate_version: str
    #: Judged pairs (for a ranking rollout: judged ranking requests), requests with an outcome,
    #: and their share of judgeable requests.
    judged_pairs: int
    labelled: int
    label_coverage: float | None
    #: Final windows pooled, and the event time they span.
    windows: int
    first_window_start_ms: int
    last_window_end_ms: int
    #: Per metric (``auc``, ...; for ranking rollouts also ``ndcg``, ``ctr``, ``mrr``).
    metrics: dict[str, MetricEstimate]
    #: The rollout's configured requirement, and what it says of this verdict.
    requirement: QualityRequirement
    gate: GateDecision
    emitted_at_ms: int
    schema_version: str = OUTPUT_SCHEMA_VERSION


# --------------------------------------------------------------------------- building


def _seed(key: PairKey, window_start_ms: int) -> int:
    """The bootstrap's seed: fixed per rollout pair and window, so a report is reproducible."""
    return zlib.crc32(repr((tuple(key), window_start_ms)).encode())


def _arm_quality(model: str, version: str, arm: ArmFigures) -> ArmQuality:
    return ArmQuality(
        model=model,
        version=version,
        precision=arm.precision,
        recall=arm.recall,
        f1=arm.f1,
        accuracy=arm.accuracy,
        auc=arm.auc,
        average_precision=arm.average_precision,
        log_loss=arm.log_loss,
        brier=arm.brier,
        calibration_error=arm.calibration_error,
        mean_cost=arm.mean_cost,
        total_cost=arm.total_cost,
        reliability=[
            ReliabilityBin(lo=lo, hi=hi, count=c, mean_predicted=mp, observed_rate=obs)
            for lo, hi, c, mp, obs in arm.reliability
        ],
    )


class Judging(NamedTuple):
    """What a report needs besides the accumulator: the stage's settings."""

    min_pairs: int = 100
    min_positives: int = 10
    resamples: int = 200


def counts_of(layout: Layout, acc: FloatArray) -> QualityCounts:
    c = {name: layout.counter(acc, name) for name in (
        "requests", "unscored", "labelled", "assumed_negative", "unlabelled", "unsupported",
        "outside_window", "clipped",
    )}  # fmt: skip
    judged = layout.judged(acc)
    positives = round(float(layout.decisions(acc)[1].sum()))
    return QualityCounts(
        records=judged,
        requests=c["requests"],
        unscored=c["unscored"],
        labelled=c["labelled"],
        positives=positives,
        negatives=judged - positives,
        assumed_negative=c["assumed_negative"],
        unlabelled=c["unlabelled"],
        unsupported_labels=c["unsupported"],
        outside_window=c["outside_window"],
        clipped_scores=c["clipped"],
        value_total=layout.sum(acc, "value"),
    )


def quality_report(
    key: PairKey,
    window_start_ms: int,
    window_end_ms: int,
    layout: Layout,
    acc: FloatArray,
    *,
    status: ReportStatus,
    label_window_ms: int,
    missing: MissingRule,
    stream_time_ms: int,
    final_at_ms: int,
    now_ms: int,
    judging: Judging | None = None,
    ranking: PairedRankingQuality | None = None,
) -> QualityReport:
    judging = judging or Judging()
    figs = figures(
        layout,
        acc,
        min_pairs=judging.min_pairs,
        min_positives=judging.min_positives,
        resamples=judging.resamples,
        seed=_seed(key, window_start_ms),
    )
    counts = counts_of(layout, acc)
    d = figs.diff
    return QualityReport(
        rollout=key.rollout,
        window_start_ms=window_start_ms,
        window_end_ms=window_end_ms,
        status=status,
        champion=_arm_quality(key.champion_model, key.champion_version, figs.champion),
        candidate=_arm_quality(key.candidate_model, key.candidate_version, figs.candidate),
        diff=QualityDiff(
            auc=d.auc,
            average_precision=d.average_precision,
            log_loss=d.log_loss,
            brier=d.brier,
            cost=d.cost,
            accuracy=d.accuracy,
            recall=d.recall,
            f1=d.f1,
            calibration_error=d.calibration_error,
            correctness_mcnemar=d.correctness_mcnemar,
        ),
        counts=counts,
        label_coverage=wilson(counts.labelled, counts.requests),
        label_window_ms=label_window_ms,
        missing=missing,
        stream_time_ms=stream_time_ms,
        final_at_ms=final_at_ms,
        emitted_at_ms=now_ms,
        ranking=None if ranking is None else ranking.report(min_count=judging.min_pairs),
    )


def _num(fig: Figure) -> float | None:
    v = fig.value
    return float(v) if fig.ok and v is not None and math.isfinite(v) else None


def quality_verdict(
    key: PairKey,
    layout: Layout,
    acc: FloatArray,
    *,
    windows: int,
    first_window_start_ms: int,
    last_window_end_ms: int,
    requirement: QualityRequirement,
    now_ms: int,
    judging: Judging | None = None,
    ranking: PairedRankingQuality | None = None,
) -> QualityVerdict:
    """The verdict over ``acc`` (every final window of the pair, merged) and ``ranking`` (the
    same windows' ranking accumulator, None for binary rollouts), with the rollout's own
    requirement applied."""
    from .gates import quality_gate  # the gate reads verdicts; verdicts carry its answer

    judging = judging or Judging()
    figs = figures(
        layout,
        acc,
        min_pairs=judging.min_pairs,
        min_positives=judging.min_positives,
        resamples=judging.resamples,
        seed=_seed(key, first_window_start_ms),
    )
    counts = counts_of(layout, acc)
    arms = (figs.champion, figs.candidate)
    diff = figs.diff
    metrics: dict[str, MetricEstimate] = {}
    for name, higher in HIGHER_IS_BETTER.items():
        metric = "mean_cost" if name == "cost" else name
        champion, candidate = (_num(getattr(a, metric)) for a in arms)
        d = _num(getattr(diff, name))
        metrics[name] = MetricEstimate(
            champion=champion,
            candidate=candidate,
            diff=d,
            se=diff.se.get(name) if d is not None else None,
            higher_is_better=higher,
        )
    judged = counts.records
    if ranking is not None:
        judged += round(float(ranking.state[0]))
        for name in RANKING_METRICS:
            est = ranking.estimate(name)
            ok = est is not None and est[4] >= judging.min_pairs
            metrics[name] = MetricEstimate(
                champion=est[0] if ok and est else None,
                candidate=est[1] if ok and est else None,
                diff=est[2] if ok and est else None,
                se=est[3] if ok and est else None,
                higher_is_better=True,
            )
    coverage = counts.labelled / counts.requests if counts.requests else None
    verdict = QualityVerdict(
        rollout=key.rollout,
        champion_model=key.champion_model,
        champion_version=key.champion_version,
        candidate_model=key.candidate_model,
        candidate_version=key.candidate_version,
        judged_pairs=judged,
        labelled=counts.labelled,
        label_coverage=coverage,
        windows=windows,
        first_window_start_ms=first_window_start_ms,
        last_window_end_ms=last_window_end_ms,
        metrics=metrics,
        requirement=requirement,
        gate=GateDecision(ok=False, code="no_verdict", reason="not evaluated yet"),
        emitted_at_ms=now_ms,
    )
    return msgspec.structs.replace(verdict, gate=quality_gate(verdict, requirement, now_ms=now_ms))


# --------------------------------------------------------------------------- figure lookup


@dataclass(frozen=True, slots=True)
class _QualityGetter:
    path: tuple[str, ...]
    p_value: bool

    def __call__(self, report: QualityReport) -> Figure:
        obj: object = report
        for part in self.path:
            obj = getattr(obj, part)
            if obj is None:  # a ranking figure of a binary rollout
                return insufficient(0, f"no_{part}")
        assert isinstance(obj, Figure)
        if self.p_value:
            if obj.p_value is None:
                return insufficient(obj.n, obj.reason or "no_p_value")
            return Figure(value=obj.p_value, n=obj.n, status=obj.status, reason=obj.reason)
        return obj


def _getter(spec: str) -> _QualityGetter:
    path, _, suffix = spec.partition(":")
    return _QualityGetter(tuple(path.split(".")), suffix == "p")


#: Quality figures by short name (the names guard rules use; see ``figures``).
QUALITY_FIGURES: dict[str, Callable[[QualityReport], Figure]] = {
    name: _getter(spec) for name, spec in QUALITY_FIGURE_PATHS.items()
}


__all__ = [
    "HIGHER_IS_BETTER",
    "QUALITY_FIGURES",
    "RANKING_METRICS",
    "ArmQuality",
    "GateCode",
    "GateDecision",
    "Judging",
    "MetricEstimate",
    "MissingRule",
    "PairKey",
    "QualityCounts",
    "QualityDiff",
    "QualityMetric",
    "QualityReport",
    "QualityRequirement",
    "QualityVerdict",
    "ReliabilityBin",
    "ReportStatus",
    "counts_of",
    "quality_report",
    "quality_verdict",
]
