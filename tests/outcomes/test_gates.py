"""The quality gate: which condition holds a ramp step back, and the non-inferiority bound."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from scipy import stats

from sidecar.outcomes.gates import quality_gate
from sidecar.outcomes.quality import Costs, Layout, contribution
from sidecar.outcomes.report import (
    MetricEstimate,
    PairKey,
    QualityRequirement,
    QualityVerdict,
    quality_verdict,
)

KEY = PairKey("fraud-v2", "fraud-lr", "1.4.0", "fraud-lr", "2.1.0")


def verdict(
    diff: float,
    se: float,
    *,
    pairs: int = 5000,
    metric: str = "auc",
    higher: bool = True,
    emitted_at_ms: int = 1_000_000,
) -> QualityVerdict:
    estimate = MetricEstimate(
        champion=0.8, candidate=0.8 + diff, diff=diff, se=se, higher_is_better=higher
    )
    base = quality_verdict(
        KEY,
        Layout(),
        Layout().zeros(),
        windows=3,
        first_window_start_ms=0,
        last_window_end_ms=3000,
        requirement=QualityRequirement(),
        now_ms=emitted_at_ms,
    )
    return msgspec.structs.replace(
        base, judged_pairs=pairs, metrics={metric: estimate}, emitted_at_ms=emitted_at_ms
    )


def test_no_verdict_yet_holds_the_step() -> None:
    d = quality_gate(None, QualityRequirement())
    assert not d.ok and d.code == "no_verdict" and "final" in d.reason


def test_the_bound_is_one_sided_at_the_confidence() -> None:
    req = QualityRequirement(metric="auc", margin=0.01, confidence=0.95, min_pairs=100)
    z = stats.norm.ppf(0.95)
    se = 0.004
    edge = -0.01 + z * se  # lower bound exactly at -margin
    assert quality_gate(verdict(edge + 1e-9, se), req).ok
    held = quality_gate(verdict(edge - 1e-6, se), req)
    assert not held.ok and held.code == "inferior"
    assert "lower 95% bound" in held.reason and "auc" in held.reason
    stricter = QualityRequirement(metric="auc", margin=0.01, confidence=0.99, min_pairs=100)
    assert not quality_gate(verdict(edge + 1e-9, se), stricter).ok


def test_lower_is_better_metrics_bound_from_above() -> None:
    req = QualityRequirement(metric="cost", margin=0.5, min_pairs=100)
    z = stats.norm.ppf(0.95)
    ok = verdict(0.5 - z * 0.1 - 1e-9, 0.1, metric="cost", higher=False)
    bad = verdict(0.5 - z * 0.1 + 1e-6, 0.1, metric="cost", higher=False)
    assert quality_gate(ok, req).ok
    decision = quality_gate(bad, req)
    assert decision.code == "inferior" and "upper 95% bound" in decision.reason


def test_too_few_pairs_wrong_models_stale_and_missing_metric() -> None:
    req = QualityRequirement(min_pairs=10_000)
    d = quality_gate(verdict(0.05, 0.001, pairs=9_999), req)
    assert d.code == "too_few_pairs" and "9,999 of 10,000" in d.reason
    req = QualityRequirement(min_pairs=10)
    d = quality_gate(verdict(0.05, 0.001), req, candidate_version="2.2.0")
    assert d.code == "wrong_models" and "2.1.0" in d.reason
    assert quality_gate(verdict(0.05, 0.001), req, champion_version="1.4.0").ok
    aged = QualityRequirement(min_pairs=10, max_age_s=60)
    assert quality_gate(verdict(0.05, 0.001), aged, now_ms=1_000_000 + 59_000).ok
    assert quality_gate(verdict(0.05, 0.001), aged, now_ms=1_000_000 + 61_000).code == "stale"
    f1 = QualityRequirement(metric="f1", min_pairs=10)
    assert quality_gate(verdict(0.05, 0.001), f1).code == "insufficient_data"


def test_a_verdict_from_real_data_carries_its_own_gate() -> None:
    rng = np.random.default_rng(4)
    n = 20_000
    y = (rng.random(n) < 0.1).astype(np.int8)
    z = rng.normal(size=n) + 1.5 * y
    p1 = 1 / (1 + np.exp(-(z + rng.normal(size=n) - 2)))  # the champion is noisier
    p2 = 1 / (1 + np.exp(-(z - 2)))
    layout = Layout()
    acc = contribution(
        layout,
        p1,
        p2,
        (p1 > 0.3).astype(np.int8),
        (p2 > 0.3).astype(np.int8),
        y,
        np.full(n, np.nan),
        Costs(),
    )
    v = quality_verdict(
        KEY,
        layout,
        acc,
        windows=4,
        first_window_start_ms=0,
        last_window_end_ms=4000,
        requirement=QualityRequirement(),
        now_ms=5,
    )
    assert v.gate.ok and v.gate.code == "met"
    assert v.metrics["auc"].diff > 0 and v.metrics["auc"].se > 0
    assert v.metrics["log_loss"].higher_is_better is False
    # Flip the arms: the candidate is the noisy one, far below the champion.
    acc2 = contribution(
        layout,
        p2,
        p1,
        (p2 > 0.3).astype(np.int8),
        (p1 > 0.3).astype(np.int8),
        y,
        np.full(n, np.nan),
        Costs(),
    )
    v2 = quality_verdict(
        KEY,
        layout,
        acc2,
        windows=4,
        first_window_start_ms=0,
        last_window_end_ms=4000,
        requirement=QualityRequirement(),
        now_ms=5,
    )
    assert not v2.gate.ok and v2.gate.code == "inferior"
    roundtrip = msgspec.json.decode(msgspec.json.encode(v2), type=QualityVerdict)
    assert quality_gate(roundtrip, QualityRequirement()) == v2.gate


@pytest.mark.parametrize("field", ["margin", "confidence", "min_pairs"])
def test_requirements_refuse_nonsense(field: str) -> None:
    bad = {"margin": -0.1, "confidence": 1.5, "min_pairs": 0}[field]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({field: bad}, QualityRequirement)
