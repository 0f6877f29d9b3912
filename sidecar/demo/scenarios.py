"""The demo's stories: which candidates are deployed, what the operator does, what must happen.

A story is data: a :class:`Scenario` names its :class:`Domain` (what traffic is generated, which
models serve it, how quality is judged against the generator's truth) and its acts (which
candidate, what the operator does, what must become of it); :mod:`sidecar.demo.run` plays any
of them the same way. A new story is a new entry in :data:`STORIES`.

Pure except :func:`calibrate`, which fits the example models (numpy, ~1 s) to pick thresholds:
the healthy candidate gets the threshold at which it flags as often as the champion does, the
"bad" one keeps the champion's (shared) threshold plus a score shift that makes it flag about
``flag_ratio`` times as often -- better ranking, twice the flags: the failure this project is
for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..config import SidecarConfig, config_from_dict
from ..contracts import Comparison
from ..control.keys import KeySet
from ..examples import fraud, recommend
from ..outcomes.ranking import PairedRankingQuality

CHAMPION_THRESHOLD = 0.3
CHAMPION_VERSION = "1.4.0"
ROLLOUT_PREFIX = "fraud-lr"
ScenarioName = Literal["flags", "errors", "latency", "benign", "recommend"]
SCENARIOS: tuple[ScenarioName, ...] = ("flags", "errors", "latency", "benign", "recommend")
SCENARIO_HELP = {
    "flags": "a candidate that ranks fraud better but flags ~2x at the shared threshold is "
    "rolled back in shadow by the aggregator; then a healthy one ramps to 100% and is promoted",
    "errors": "a candidate that fails on 1 batch in 4 is ramped; the aggregator rolls it back "
    "(champion traffic is never harmed: its share falls back to the champion)",
    "latency": "a candidate 40 ms slower per batch is ramped; the aggregator pauses the ramp "
    "(slower on most of the same batches) and the operator rolls back",
    "benign": "only the healthy candidate: shadow, ramp 1% -> 100%, promoted",
    "recommend": "a recommender re-ranking 100 candidates per request (top 10): a matrix-"
    "factorisation candidate whose popularity boost collapses diversity is rolled back in "
    "shadow by the aggregator (catalogue coverage, one item's exposure); a personal one "
    "ramps to 100% and is promoted",
}
Expect = Literal["rollback", "promoted", "paused"]


@dataclass(frozen=True)
class Calibration:
    """Thresholds and shift chosen on a seeded sample of the generator (not on the demo's
    traffic, so nothing is tuned on what is then measured)."""

    fraud_rate: float
    champion_threshold: float
    champion_rate: float
    healthy_threshold: float
    flag_shift: float
    bad_rate: float

    @property
    def bad_ratio(self) -> float:
        return self.bad_rate / self.champion_rate if self.champion_rate else math.nan


def calibrate(
    fraud_rate: float, flag_ratio: float = 2.0, flag_shift: float | None = None, seed: int = 99
) -> Calibration:
    data = fraud.generate(60_000, seed=seed, fraud_rate=fraud_rate)
    champ = fraud.champion().predict(data.features[:, : len(fraud.CHAMPION_FEATURES)])
    cand = fraud.candidate()
    rate = float(np.mean(champ >= CHAMPION_THRESHOLD))
    healthy = float(np.quantile(cand.predict(data.features), 1.0 - rate))

    def bad_rate(shift: float) -> float:
        model = fraud.LogisticModel(cand.coef, cand.intercept, shift)
        return float(np.mean(model.predict(data.features) >= CHAMPION_THRESHOLD))

    if flag_shift is None:
        lo, hi = -3.0, 3.0
        for _ in range(40):  # the flag rate is monotone in the shift: bisect
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if bad_rate(mid) < flag_ratio * rate else (lo, mid)
        flag_shift = round((lo + hi) / 2, 3)
    return Calibration(
        fraud_rate, CHAMPION_THRESHOLD, rate, healthy, flag_shift, bad_rate(flag_shift)
    )


@dataclass(frozen=True)
class Act:
    """One candidate deployed behind the sidecars, and what should become of it."""

    key: str
    rollout: str
    version: str
    target: str
    options: dict[str, Any]
    threshold: float
    headline: str
    #: "watch": stay in shadow and let the aggregator judge; "ramp": the operator starts the
    #: ramp after ``shadow_windows`` windows of shadow.
    operator: Literal["watch", "ramp"]
    expect: Expect
    shadow_windows: int = 2
    timeout_ms: int = 250
    #: Which domain's models and traffic (see :data:`DOMAINS`).
    domain: str = "fraud"
    #: The operator starts the ramp only once the outcomes stage's quality gate is met (the
    #: candidate is not worse than the champion on the chargebacks it has seen).
    quality_gate: bool = False


@dataclass(frozen=True)
class Timing:
    window_s: float
    hold_s: float
    min_samples: int
    rate: float

    @property
    def plan(self) -> str:
        """The ramp, in ``sidecar ctl ramp`` syntax: 1% -> 5% -> 10% -> 50% -> 100%."""
        return ",".join(
            f"{share}:{self.hold_s:g}s:{self.min_samples}"
            for share in ("1%", "5%", "10%", "50%", "100%")
        )


def timing(duration_s: float, rate: float) -> Timing:
    """Windows and ramp holds that make a story of about ``duration_s`` seconds."""
    # Windows of ~3,000 pairs at the default rates: the ratio's noise stays far from 1.5.
    window_s = 3.0 if duration_s >= 60 else 2.0
    hold_s = round(max(window_s * 1.5, 0.45 * duration_s / 5), 1)
    # Each instance counts its own comparisons (about half): the floor is met well within the
    # hold at the configured rate, so the hold paces the ramp.
    return Timing(window_s, hold_s, max(50, int(rate * hold_s * 0.15)), rate)


def acts(scenario: ScenarioName, cal: Calibration | None) -> list[Act]:
    """The acts of ``scenario`` (fraud stories need the calibration)."""
    return STORIES[scenario].acts(cal)


def _fraud_acts(scenario: ScenarioName, cal: Calibration | None) -> list[Act]:
    assert cal is not None, "fraud stories are calibrated first"
    cand = "sidecar.examples.fraud:candidate"
    healthy = Act(
        "healthy",
        f"{ROLLOUT_PREFIX}-v2-1",
        "2.1.0",
        cand,
        {},
        round(cal.healthy_threshold, 4),
        f"Healthy candidate fraud-lr 2.1.0, threshold {cal.healthy_threshold:.3f} (chosen so "
        f"it flags as often as the champion): shadow until its quality gate is met on the "
        "chargebacks, then ramp 1% -> 100%",
        "ramp",
        "promoted",
        quality_gate=True,
    )
    if scenario == "benign":
        return [healthy]
    if scenario == "flags":
        bad = Act(
            "bad",
            f"{ROLLOUT_PREFIX}-v2",
            "2.0.0",
            cand,
            {"flag_shift": cal.flag_shift},
            cal.champion_threshold,
            f"Candidate fraud-lr 2.0.0 at the shared threshold {cal.champion_threshold:g}: it "
            f"ranks fraud better but flags ~{cal.bad_ratio:.1f}x as often. Shadow only; the "
            "aggregator is watching",
            "watch",
            "rollback",
        )
        return [bad, healthy]
    if scenario == "errors":
        return [
            Act(
                "errors",
                f"{ROLLOUT_PREFIX}-v2-errors",
                "2.0.1",
                "sidecar.examples.faulty:raising",
                {"every": 4},
                round(cal.healthy_threshold, 4),
                "Candidate fraud-lr 2.0.1 fails on 1 batch in 4 (an exception): ramp starts, "
                "the aggregator watches the error rate",
                "ramp",
                "rollback",
                shadow_windows=0,
            )
        ]
    return [
        Act(
            "latency",
            f"{ROLLOUT_PREFIX}-v2-slow",
            "2.0.2",
            "sidecar.examples.faulty:slow",
            {"delay_s": 0.04},
            round(cal.healthy_threshold, 4),
            "Candidate fraud-lr 2.0.2 takes 40 ms longer per batch: ramp starts, the aggregator "
            "compares both models' latency batch by batch",
            "ramp",
            "paused",
            shadow_windows=0,
        )
    ]


@dataclass(frozen=True)
class Topics:
    requests: str = "demo.requests"
    decisions: str = "demo.decisions"
    comparisons: str = "demo.comparisons"
    dead_letter: str = "demo.dead-letter"
    control: str = "demo.control"
    reports: str = "demo.reports"
    outcomes: str = "demo.outcomes"
    quality: str = "demo.quality"
    verdicts: str = "demo.quality-verdicts"


@dataclass(frozen=True)
class Settings:
    bootstrap: str
    keys: KeySet
    timing: Timing
    topics: Topics = field(default_factory=Topics)
    partitions: int = 6
    #: Where the outcomes stage keeps its stores (a directory of the run).
    state_dir: str = "sidecar-demo/state"
    #: Every act's rollout: comparisons are keyed by rollout, so the outcomes stage routes
    #: chargebacks to the partitions of the rollouts it knows.
    rollouts: tuple[str, ...] = ()


#: Chargebacks arrive this long after their transaction (uniform), in the demo's compressed
#: time; the label window covers the longest.
CHARGEBACK_DELAY_S = (0.5, 3.0)
LABEL_WINDOW_MS = 3_500


def act_config(s: Settings, act: Act) -> SidecarConfig:
    """The sidecars' (and the aggregator's) config for one act."""
    window_ms = int(s.timing.window_s * 1000)
    t = s.topics
    quality = {
        "label_window_ms": LABEL_WINDOW_MS,
        "missing": "negative",
        "non_inferiority": {
            "metric": "auc",
            "margin": 0.02,
            "confidence": 0.95,
            "min_pairs": int(s.timing.rate * s.timing.window_s),
        },
    }
    if act.domain == "recommend":
        # Clicks are the outcomes: both arms' top K judged by NDCG@K, the gate on it.
        quality["ranking_k"] = recommend.K
        quality["non_inferiority"] = {**quality["non_inferiority"], "metric": "ndcg"}  # type: ignore[dict-item]
    tree: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": s.bootstrap,
            # One group per act (a new deployment); its offsets are handed over from the
            # previous act's group, so nothing is skipped or scored twice.
            "group_id": f"demo-sidecar-{act.key}",
            "client_id": "demo",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "topics": {
            "requests": t.requests,
            "decisions": t.decisions,
            "comparisons": t.comparisons,
            "dead_letter": t.dead_letter,
            "control": t.control,
            "partitions": s.partitions,
        },
        "rollout": {"name": act.rollout, "mode": "shadow"},
        "models": DOMAINS[act.domain].models(act),
        "pipeline": {"drain_timeout_s": 10},
        "metrics": {"port": 0},
        "control": {
            "trust_file": str(s.keys.trust_file),
            "signing_key_file": str(s.keys.sidecar),
            # The embedded broker keeps producer-chosen record times (see the README).
            "allow_create_time": True,
            "heartbeat_interval_s": 0.5,
            "tick_interval_s": 0.5,
            # The control plane itself holds the ramp's last step (to 100%) until the
            # outcomes stage's verdict about this candidate version passes.
            "promote_gate": "quality" if act.quality_gate else "none",
        },
        "aggregate": {
            "reports_topic": t.reports,
            "group_id": "demo-aggregator",
            "signing_key_file": str(s.keys.guard),
            "metrics_port": 0,
            "window_ms": window_ms,
            "allowed_lateness_ms": min(500, window_ms // 2),
            "idle_timeout_ms": max(1000, window_ms),
            "commit_interval_ms": 500,
        },
        # Ground truth: chargebacks (the generator's frauds, delayed) joined to the
        # comparisons; no chargeback within the label window means legitimate.
        "outcomes": {
            "topic": t.outcomes,
            "quality_topic": t.quality,
            "verdicts_topic": t.verdicts,
            "group_id": "demo-outcomes",
            "state_dir": s.state_dir,
            "signing_key_file": str(s.keys.guard),
            "metrics_port": 0,
            "report_window_ms": window_ms,
            "comparison_lateness_ms": min(500, window_ms // 2),
            "outcome_grace_ms": 1000,
            "provisional_interval_ms": 1000,
            "idle_timeout_ms": max(2000, window_ms),
            "min_pairs": 500,
            "quality": quality,
            "rollouts": {name: quality for name in (*s.rollouts, act.rollout)},
            # Quality guards alert only in the demo: the decision-rate guard tells act 1.
            "rules": [
                {
                    "name": "quality_cost",
                    "figure": "cost_diff",
                    "threshold": 0.0,
                    "bound": "lo",
                    "min_pairs": 500,
                    "consecutive": 2,
                    "action": "alert",
                }
            ],
        },
    }
    return config_from_dict(tree, source="sidecar demo")


# --------------------------------------------------------------------------- domains

RANKING_FIGURES = (
    "overlap_at_k",
    "rbo",
    "kendall_tau",
    "top_item_kept",
    "top_item_dropped",
    "exposure_psi",
    "exposure_js",
    "popularity_lift",
    "coverage_ratio",
    "item_exposure_jump",
)
KIND_FIGURES = (
    *RANKING_FIGURES,
    "label_agreement",
    "label_psi",
    "label_rate_ratio",
    "value_mean_diff",
    "value_diff_share",
    "value_psi",
    "value_ks",
)
#: Figures of a binary model's score and decision (meaningless for a ranking).
BINARY_FIGURES = frozenset(
    {
        "decision_rate_ratio",
        "psi_candidate_vs_champion",
        "psi_champion_vs_reference",
        "champion_nan_rate",
    }
)


class Quality:
    """How a domain judges both arms against the generator's truth, per rollout, from the
    comparisons the sidecars really wrote (``truth`` maps request ids to what the generator
    knows about them)."""

    #: E.g. "average precision"; ``unit``: what a request is ("transactions").
    name = ""
    unit = "requests"

    def add(self, c: Comparison, truth: Any) -> None:
        raise NotImplementedError

    def summary(self, rollout: str) -> tuple[float, float, int, int]:
        """Champion's and candidate's figure, requests judged, positives among them."""
        raise NotImplementedError


class AveragePrecision(Quality):
    name, unit = "average precision", "transactions"

    def __init__(self) -> None:
        self.scores: dict[str, tuple[list[float], list[float], list[bool]]] = {}

    def add(self, c: Comparison, truth: Any) -> None:
        a, b = c.champion.score, c.candidate.score
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return
        champ, cand, labels = self.scores.setdefault(c.rollout, ([], [], []))
        champ.append(a)
        cand.append(b)
        labels.append(bool(truth))

    def summary(self, rollout: str) -> tuple[float, float, int, int]:
        from .view import average_precision

        got = self.scores.get(rollout)
        if got is None or not got[2]:
            return math.nan, math.nan, 0, 0
        champ, cand, labels = got
        return (
            average_precision(champ, labels),
            average_precision(cand, labels),
            len(labels),
            sum(labels),
        )


class RankingNdcg(Quality):
    """NDCG@10 of both arms' lists against the items the generator's user would click."""

    name, unit = "NDCG@10", "requests"

    def __init__(self) -> None:
        self.state: dict[str, PairedRankingQuality] = {}
        self.pending: dict[str, tuple[list[list[str]], list[list[str]], list[set[str]]]] = {}
        self.clicked: dict[str, int] = {}

    def add(self, c: Comparison, truth: Any) -> None:
        a, b = c.champion.items, c.candidate.items
        if a is None or b is None or truth is None:
            return
        champ, cand, clicks = self.pending.setdefault(c.rollout, ([], [], []))
        champ.append(a)
        cand.append(b)
        clicks.append(truth)
        self.clicked[c.rollout] = self.clicked.get(c.rollout, 0) + bool(truth)
        if len(clicks) >= 500:
            self._flush(c.rollout)

    def _flush(self, rollout: str) -> None:
        champ, cand, clicks = self.pending.pop(rollout, ([], [], []))
        if clicks:
            self.state.setdefault(rollout, PairedRankingQuality(recommend.K)).add(
                champ, cand, clicks
            )

    def summary(self, rollout: str) -> tuple[float, float, int, int]:
        self._flush(rollout)
        q = self.state.get(rollout)
        if q is None:
            return math.nan, math.nan, 0, 0
        r = q.report()
        nan = math.nan
        return (
            nan if r.ndcg_champion.value is None else r.ndcg_champion.value,
            nan if r.ndcg_candidate.value is None else r.ndcg_candidate.value,
            r.requests,
            self.clicked.get(rollout, 0),
        )


@dataclass(frozen=True)
class Domain:
    """The traffic, models and quality measure of a family of stories."""

    name: str
    #: ``(n, seed, start_id)`` -> request objects and, per request id, the truth.
    generate: Any
    #: An act -> the ``[models]`` table (champion and candidate).
    models: Any
    quality: type[Quality]
    champion_text: str
    #: Guard figures the live view leaves out (those of other output kinds).
    hidden_figures: frozenset[str] = frozenset()


def _fraud_batch(
    n: int, seed: int, start_id: int, fraud_rate: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = fraud.generate(n, seed=seed, fraud_rate=fraud_rate)
    requests = fraud.request_dicts(data, start_id=start_id)
    truth = {f"req-{start_id + int(i)}": True for i in np.flatnonzero(data.is_fraud)}
    return requests, truth


def _fraud_models(act: Act) -> dict[str, Any]:
    return {
        "champion": {
            "name": "fraud-lr",
            "version": CHAMPION_VERSION,
            "target": "sidecar.examples.fraud:champion",
            "threshold": CHAMPION_THRESHOLD,
            "features": [{"name": f} for f in fraud.CHAMPION_FEATURES],
        },
        "candidate": {
            "name": "fraud-lr",
            "version": act.version,
            "target": act.target,
            "options": act.options,
            "threshold": act.threshold,
            "timeout_ms": act.timeout_ms,
            "features": [{"name": f} for f in fraud.CANDIDATE_FEATURES],
        },
    }


RECS_VERSION = "1.0.0"


def _recommend_batch(
    n: int, seed: int, start_id: int, _rate: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = recommend.generate(n, seed=seed)
    requests = recommend.request_dicts(data, start_id=start_id)
    clicks = recommend.click_sets(data, seed=seed + 1)
    return requests, {r["request_id"]: c for r, c in zip(requests, clicks, strict=True)}


def _recommender(version: str, target: str, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "recs",
        "version": version,
        "target": target,
        "options": options,
        "output_kind": "ranking",
        "k": recommend.K,
        "items_from": "request",
        "timeout_ms": 500,
        "features": [{"name": f} for f in recommend.FEATURES],
    }


def _recommend_models(act: Act) -> dict[str, Any]:
    return {
        "champion": _recommender(RECS_VERSION, "sidecar.examples.recommend:popularity", {}),
        "candidate": _recommender(act.version, act.target, act.options),
    }


DOMAINS: dict[str, Domain] = {
    "fraud": Domain(
        "fraud",
        _fraud_batch,
        _fraud_models,
        AveragePrecision,
        f"fraud-lr {CHAMPION_VERSION} (6 features)",
        frozenset(KIND_FIGURES),
    ),
    "recommend": Domain(
        "recommend",
        _recommend_batch,
        _recommend_models,
        RankingNdcg,
        f"recs {RECS_VERSION}: segment popularity, re-ranking {recommend.CANDIDATES} "
        f"candidates to the top {recommend.K}",
        (BINARY_FIGURES | frozenset(KIND_FIGURES)) - frozenset(RANKING_FIGURES),
    ),
}


def _recommend_acts(_scenario: ScenarioName, _cal: Calibration | None) -> list[Act]:
    mf = "sidecar.examples.recommend:matrix_factorisation"
    return [
        Act(
            "collapse",
            "recs-mf-v2",
            "2.0.0",
            mf,
            {"popularity_boost": 8.0},
            0.5,
            "Candidate recs 2.0.0, matrix factorisation with a popularity boost that swamps "
            "its user factors: every user gets the same best-sellers. Shadow only; the "
            "aggregator compares both rankings of every request",
            "watch",
            "rollback",
            domain="recommend",
        ),
        Act(
            "personal",
            "recs-mf-v2-1",
            "2.1.0",
            mf,
            {},
            0.5,
            "Candidate recs 2.1.0, matrix factorisation without the boost: personal lists, "
            "wider catalogue coverage; shadow, then ramp 1% -> 100%",
            "ramp",
            "promoted",
            domain="recommend",
        ),
    ]


@dataclass(frozen=True)
class Scenario:
    name: ScenarioName
    domain: str
    #: ``(scenario, calibration)`` -> the acts, in order.
    make_acts: Any
    #: Fraud stories pick thresholds on a calibration sample first.
    calibrated: bool = True

    def acts(self, cal: Calibration | None) -> list[Act]:
        return list(self.make_acts(self.name, cal))


STORIES: dict[ScenarioName, Scenario] = {
    s.name: s
    for s in (
        Scenario("flags", "fraud", _fraud_acts),
        Scenario("errors", "fraud", _fraud_acts),
        Scenario("latency", "fraud", _fraud_acts),
        Scenario("benign", "fraud", _fraud_acts),
        Scenario("recommend", "recommend", _recommend_acts, calibrated=False),
    )
}


__all__ = [
    "CHARGEBACK_DELAY_S",
    "DOMAINS",
    "LABEL_WINDOW_MS",
    "SCENARIOS",
    "SCENARIO_HELP",
    "STORIES",
    "Act",
    "Calibration",
    "Domain",
    "Quality",
    "ScenarioName",
    "Settings",
    "Timing",
    "Topics",
    "act_config",
    "acts",
    "calibrate",
    "timing",
]
