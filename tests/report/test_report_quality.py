"""The report's ground-truth section: charts of final quality windows with their intervals,
label coverage, the reliability diagram pooled over windows, and each rollout's verdict."""

from __future__ import annotations

import re

import msgspec
import numpy as np
import pytest

from sidecar.outcomes.quality import Costs, Layout, contribution
from sidecar.outcomes.report import (
    PairKey,
    QualityReport,
    QualityRequirement,
    quality_report,
    quality_verdict,
)
from sidecar.report.model import Recording, decode_jsonl, encode_jsonl
from sidecar.report.page import build_charts, render_page
from sidecar.report.quality import pooled_reliability, quality_charts

KEY = PairKey("fraud-v2", "fraud-lr", "1.4.0", "fraud-lr", "2.1.0")
LAYOUT = Layout()
T0 = 1_700_000_000_000


def window(i: int, status: str = "final", n: int = 3000) -> tuple[QualityReport, np.ndarray]:
    rng = np.random.default_rng(i)
    y = (rng.random(n) < 0.1).astype(np.int8)
    z = rng.normal(size=n) + 1.5 * y
    p1 = 1 / (1 + np.exp(-(z + rng.normal(size=n) - 2)))
    p2 = 1 / (1 + np.exp(-(z - 2)))
    acc = contribution(
        LAYOUT,
        p1,
        p2,
        (p1 > 0.3).astype(np.int8),
        (p2 > 0.3).astype(np.int8),
        y,
        np.full(n, np.nan),
        Costs(),
    )
    acc[0] += n  # requests
    acc[2] += int(y.sum())  # labelled: the positives (the rest negative by rule)
    start = T0 + i * 10_000
    report = quality_report(
        KEY,
        start,
        start + 10_000,
        LAYOUT,
        acc,
        status=status,  # type: ignore[arg-type]
        label_window_ms=5000,
        missing="negative",
        stream_time_ms=start,
        final_at_ms=start + 15_000,
        now_ms=start + 16_000,
    )
    return report, acc


@pytest.fixture(scope="module")
def rec() -> Recording:
    finals = [window(i) for i in range(4)]
    total = sum(acc for _, acc in finals)
    verdict = quality_verdict(
        KEY,
        LAYOUT,
        total,
        windows=4,
        first_window_start_ms=T0,
        last_window_end_ms=T0 + 40_000,
        requirement=QualityRequirement(),
        now_ms=T0 + 60_000,
    )
    provisional = [window(i, "provisional", 500)[0] for i in range(4, 6)]
    return Recording(
        quality=[r for r, _ in finals] + provisional, verdicts=[verdict], meta={"title": "t"}
    ).normalised()


def test_quality_charts_follow_the_final_windows(rec: Recording) -> None:
    charts = {c.key: c for c in quality_charts(rec)}
    assert set(charts) == {"quality_auc", "quality_cost", "quality_coverage"}
    auc = {s.name: s for s in charts["quality_auc"].series}
    values = [v for _, v in auc["candidate ROC AUC"].points]
    assert len(values) == 4 and all(v is not None for v in values)
    lows = [v for _, v in auc["candidate 95% lo"].points]
    highs = [v for _, v in auc["candidate 95% hi"].points]
    assert all(lo < v < hi for lo, v, hi in zip(lows, values, highs, strict=True))
    cov = {s.name: s for s in charts["quality_coverage"].series}
    assert len(cov["latest provisional"].points) == 2 and len(cov["final"].points) == 4
    assert {c.key for c in build_charts(Recording())}.isdisjoint(charts)


def test_the_reliability_diagram_pools_counts_over_windows(rec: Recording) -> None:
    finals = [q for q in rec.quality if q.status == "final"]
    pooled = pooled_reliability(finals, "candidate")
    assert sum(p.count for p in pooled) == sum(q.counts.records for q in finals)
    first_bin = [q.candidate.reliability[0] for q in finals]
    n = sum(b.count for b in first_bin)
    mean = sum(b.count * (b.mean_predicted or 0) for b in first_bin) / n
    assert pooled[0].mean_predicted == pytest.approx(mean)


def test_the_page_shows_each_rollouts_verdict_and_gate(rec: Recording) -> None:
    page = render_page(rec)
    assert 'class="verdict met"' in page and "quality gate <b>MET</b>" in page
    assert 'class="reliability"' in page and page.count("<circle") >= 8
    for key in ("quality_auc", "quality_cost", "quality_coverage"):
        assert f'id="plot-{key}"' in page
    assert re.search(r"4 final window\(s\)", page)


def test_quality_and_verdicts_round_trip_through_jsonl(rec: Recording) -> None:
    again = decode_jsonl(encode_jsonl(rec)).normalised()
    assert again.quality == rec.quality and again.verdicts == rec.verdicts
    twice = Recording(quality=rec.quality + rec.quality).normalised()
    assert len(twice.quality) == len(rec.quality)  # a report published twice counts once
    assert msgspec.json.decode(msgspec.json.encode(rec.verdicts[0]), type=type(rec.verdicts[0]))
