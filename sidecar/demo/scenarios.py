"""The demo's stories: which candidates are deployed, what the operator does, what must happen.

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
from ..examples import fraud

CHAMPION_THRESHOLD = 0.3
CHAMPION_VERSION = "1.4.0"
ROLLOUT_PREFIX = "fraud-lr"
ScenarioName = Literal["flags", "errors", "latency", "benign"]
SCENARIOS: tuple[ScenarioName, ...] = ("flags", "errors", "latency", "benign")
SCENARIO_HELP = {
    "flags": "a candidate that ranks fraud better but flags ~2x at the shared threshold is "
    "rolled back in shadow by the aggregator; then a healthy one ramps to 100% and is promoted",
    "errors": "a candidate that fails on 1 batch in 4 is ramped; the aggregator rolls it back "
    "(champion traffic is never harmed: its share falls back to the champion)",
    "latency": "a candidate 40 ms slower per batch is ramped; the aggregator pauses the ramp "
    "on the p99 ratio and the operator rolls back",
    "benign": "only the healthy candidate: shadow, ramp 1% -> 100%, promoted",
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


def acts(scenario: ScenarioName, cal: Calibration) -> list[Act]:
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
            "watches the p99 latency ratio",
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
    keys_file: str
    key_id: str
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
    features = [{"name": f} for f in fraud.CANDIDATE_FEATURES]
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
        "models": {
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
                "features": features,
            },
        },
        "pipeline": {"drain_timeout_s": 10},
        "metrics": {"port": 0},
        "control": {
            "keys_file": s.keys_file,
            "key_id": s.key_id,
            "heartbeat_interval_s": 0.5,
            "tick_interval_s": 0.5,
        },
        "aggregate": {
            "reports_topic": t.reports,
            "group_id": "demo-aggregator",
            "key_id": s.key_id,
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
            "key_id": s.key_id,
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


__all__ = [
    "CHARGEBACK_DELAY_S",
    "LABEL_WINDOW_MS",
    "SCENARIOS",
    "SCENARIO_HELP",
    "Act",
    "Calibration",
    "ScenarioName",
    "Settings",
    "Timing",
    "Topics",
    "act_config",
    "acts",
    "calibrate",
    "timing",
]
