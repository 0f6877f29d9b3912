"""The report of a ranking rollout: ranking charts in place of the binary ones.

``recorded_recommend.jsonl`` is what ``sidecar demo --scenario recommend --quick`` recorded: a
diversity-collapsing 2.0.0 rolled back in shadow by the aggregator, then 2.1.0 ramped and
promoted. Regenerate it with ``sidecar demo --scenario recommend --quick --out-dir d``.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.report.model import command_timeline, read_jsonl
from sidecar.report.page import build_charts, render_page

RECORDED = Path(__file__).parent / "recorded_recommend.jsonl"
FLAGS = Path(__file__).parent / "recorded_flags.jsonl"


def test_ranking_charts_replace_the_binary_ones() -> None:
    rec = read_jsonl(RECORDED)
    assert any(r.ranking is not None for r in rec.reports)
    charts = {c.key: c for c in build_charts(rec)}
    assert {"ranking_agreement", "ranking_exposure"} <= set(charts)
    assert not {"decision_rates", "ratio", "drift", "disagreement"} & set(charts)
    agreement = charts["ranking_agreement"]
    overlap = [v for _, v in agreement.series[0].points if v is not None]
    assert overlap and all(0.0 <= v <= 1.0 for v in overlap)
    exposure = charts["ranking_exposure"]
    assert any(h.value == 0.5 for h in exposure.hlines)  # the coverage guard's threshold
    assert exposure.highlights  # the collapse's breaching windows
    rollback = [e for e in command_timeline(rec) if e.command.action == "rollback"]
    assert rollback and rollback[0].command.issued_by == "demo-guard"
    html = render_page(rec)
    assert "Rankings: exposure" in html and "rollback by the aggregator" in html


def test_binary_reports_have_no_ranking_charts() -> None:
    keys = {c.key for c in build_charts(read_jsonl(FLAGS))}
    assert "ratio" in keys and not any(k.startswith("ranking") for k in keys)
